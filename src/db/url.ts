// Database URLs as libpq reads them, including its multi-host form for a replicated database:
//   postgres://user:pw@a:5432,b:5432/qvd?target_session_attrs=read-write&sslmode=verify-full
//   postgres://user@/qvd?host=/run/pg-a,/run/pg-b          (unix socket directories)
// No postgres import here: src/config.ts checks URLs with it.
import { ConfigError } from "../errors.ts";

/** One server of a URL: a TCP host and port, or a unix socket (`path`). */
export interface DbTarget {
  host: string;
  port: number;
  /** The socket file (`<dir>/.s.PGSQL.<port>`) when the host is a directory. */
  path?: string;
}

export interface ParsedDatabaseUrl {
  /** A one-host URL postgres.js can read (the first server; libpq's host/port params removed). */
  url: string;
  /** The first server's socket file, for a one-host URL on a unix socket. */
  path?: string;
  /** Every server, in the URL's order. */
  targets: DbTarget[];
  /** target_session_attrs as given (postgres.js reads it from `url` too). */
  targetSessionAttrs?: string;
}

const SCHEME = /^(postgres(?:ql)?:\/\/)(?:([^@/?]*)@)?([^/?]*)(.*)$/;

function splitHostPort(s: string): { host: string; port?: number } {
  const v6 = /^\[([^\]]*)\](?::(\d*))?$/.exec(s);
  if (v6) return { host: v6[1]!, port: v6[2] ? Number(v6[2]) : undefined };
  const i = s.lastIndexOf(":");
  if (i < 0) return { host: s };
  return { host: s.slice(0, i), port: s.slice(i + 1) ? Number(s.slice(i + 1)) : undefined };
}

const validPort = (p: number | undefined) => p === undefined || (Number.isInteger(p) && p >= 1 && p <= 65535);

/**
 * Splits a URL into its servers and a one-host URL for postgres.js. Accepts libpq's forms:
 * several `host:port` in the authority, `?host=` (names or socket directories, comma
 * separated) with `?port=` (one for all, or one per host). Throws on anything else.
 */
export function parseDatabaseUrl(url: string): ParsedDatabaseUrl {
  try {
    return parse(url);
  } catch (err) {
    if (err instanceof ConfigError) throw err;
    throw new ConfigError("database.url: expected a URL");
  }
}

function parse(url: string): ParsedDatabaseUrl {
  const m = SCHEME.exec(url);
  if (!m) throw new ConfigError("database.url: expected a URL");
  const [, scheme, userinfo, authority, rest] = m as unknown as [string, string, string | undefined, string, string];
  const listed = authority.split(",").map((h) => splitHostPort(decodeURIComponent(h)));
  // WHATWG URLs reject an empty host after credentials; give the parser a placeholder.
  const u = new URL(`${scheme}${userinfo !== undefined ? userinfo + "@" : ""}localhost${rest}`);
  const qHosts = u.searchParams.get("host")?.split(",");
  const qPorts = u.searchParams.get("port")?.split(",").map(Number);
  const hostsOf = qHosts ?? listed.map((l) => l.host);
  if (qPorts && qPorts.length !== 1 && qPorts.length !== hostsOf.length)
    throw new ConfigError(
      `database.url: ${qPorts.length} ports for ${hostsOf.length} hosts (give one port, or one per host)`,
    );
  const targets: DbTarget[] = hostsOf.map((h, i) => {
    const port = qPorts ? qPorts[qPorts.length === 1 ? 0 : i] : qHosts ? undefined : listed[i]?.port;
    if (!validPort(port)) throw new ConfigError(`database.url: invalid port for host ${h || "localhost"}`);
    const host = h || "localhost";
    const p = port ?? 5432;
    return host.startsWith("/") ? { host, port: p, path: `${host}/.s.PGSQL.${p}` } : { host, port: p };
  });
  if (targets.length === 0) throw new ConfigError("database.url: no host");
  const tsa = u.searchParams.get("target_session_attrs") ?? undefined;
  if (tsa !== undefined && !["read-write", "primary", "any"].includes(tsa))
    throw new ConfigError(
      `database.url: target_session_attrs=${tsa}: qvd writes to its database; use read-write (or primary)`,
    );
  const first = targets[0]!;
  // A one-host URL, unchanged when it is the plain form postgres.js reads itself.
  if (targets.length === 1 && !first.path && !qHosts && !qPorts) return { url, targets, targetSessionAttrs: tsa };
  u.searchParams.delete("host");
  u.searchParams.delete("port");
  u.hostname = first.path ? "localhost" : first.host.includes(":") ? `[${first.host}]` : first.host;
  u.port = String(first.port);
  return { url: u.toString(), path: targets.length === 1 ? first.path : undefined, targets, targetSessionAttrs: tsa };
}

const isLoopback = (host: string) => host === "localhost" || /^127\./.test(host) || host === "::1";

/**
 * Every network hop is encrypted: a database reached over TCP on another host needs
 * `sslmode=require` or `verify-full` in its URL (`disable` is the administrator's explicit
 * choice). Unix sockets and loopback addresses stay on the machine. With several hosts, each
 * one counts.
 */
export function checkDatabaseTls(url: string): void {
  const parsed = parseDatabaseUrl(url);
  const remote = parsed.targets.find((t) => !t.path && !isLoopback(t.host));
  if (!remote) return;
  const mode = new URL(parsed.url).searchParams.get("sslmode");
  if (mode === "require" || mode === "verify-full" || mode === "disable") return;
  throw new ConfigError(
    `database.url: the database on ${remote.host} is reached over the network: add ?sslmode=verify-full (or sslmode=require) so the connection is encrypted${mode ? ` (sslmode=${mode} is not enough)` : ""}`,
  );
}

/**
 * Whether connections must land on the primary: qvd writes, so with several hosts an absent
 * target_session_attrs means read-write (libpq would take any server); `any` keeps libpq's.
 */
export function wantsPrimary(parsed: ParsedDatabaseUrl): boolean {
  const t = parsed.targetSessionAttrs;
  return t === undefined ? parsed.targets.length > 1 : t !== "any";
}
