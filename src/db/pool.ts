// The one connection pool. Everything that talks to PostgreSQL goes through `connect()` and
// the typed functions of src/db/; roles never write SQL themselves.
import postgres from "postgres";
import { ConfigError } from "../errors.ts";

export type Sql = postgres.Sql<{}>;
/** A pool or a transaction: every query function accepts either. */
export type Db = postgres.Sql<{}> | postgres.TransactionSql<{}>;

export interface ConnectOptions {
  max?: number;
  connectTimeout?: number;
  applicationName?: string;
  /** For the listener's dedicated connection: notifications, closes, and no idle recycling. */
  listener?: { onnotify: (channel: string, payload: string) => void; onclose: () => void };
}

/**
 * Splits a URL into what postgres.js expects. Accepts libpq's form for unix sockets,
 * `postgres://user@/db?host=/run/postgresql`, which postgres.js does not read itself.
 */
export function parseDatabaseUrl(url: string): { url: string; path?: string } {
  // WHATWG URLs reject an empty host after credentials; give the parser a placeholder.
  const u = new URL(url.replace(/^(postgres(?:ql)?:\/\/(?:[^@/?]*@)?)(?=[/?]|$)/, "$1localhost"));
  const host = u.searchParams.get("host");
  if (!host?.startsWith("/")) return { url };
  u.searchParams.delete("host");
  const port = u.port || "5432";
  u.hostname = "localhost";
  return { url: u.toString(), path: `${host}/.s.PGSQL.${port}` };
}

/**
 * Every network hop is encrypted: a database reached over TCP on another host needs
 * `sslmode=require` or `verify-full` in its URL (`disable` is the administrator's explicit
 * choice). Unix sockets and loopback addresses stay on the machine.
 */
export function checkDatabaseTls(url: string): void {
  const target = parseDatabaseUrl(url);
  if (target.path) return;
  const u = new URL(target.url.replace(/^(postgres(?:ql)?:\/\/(?:[^@/?]*@)?)(?=[/?]|$)/, "$1localhost"));
  const host = u.hostname.replace(/^\[|\]$/g, "");
  if (host === "localhost" || /^127\./.test(host) || host === "::1") return;
  const mode = u.searchParams.get("sslmode");
  if (mode === "require" || mode === "verify-full" || mode === "disable") return;
  throw new ConfigError(`database.url: the database on ${host} is reached over the network: add ?sslmode=verify-full (or sslmode=require) so the connection is encrypted${mode ? ` (sslmode=${mode} is not enough)` : ""}`);
}

export function connect(url: string, opts: ConnectOptions = {}): Sql {
  checkDatabaseTls(url);
  const target = parseDatabaseUrl(url);
  return postgres(target.url, {
    path: target.path,
    max: opts.max ?? 10,
    connect_timeout: opts.connectTimeout ?? 10,
    // A listening connection must never be recycled: its LISTENs would silently go with it.
    idle_timeout: opts.listener ? null as unknown as undefined : 60,
    max_lifetime: opts.listener ? null : undefined,
    onnotice: () => {},
    // `onnotify` is supported by postgres.js but missing from its type declarations.
    ...({ onnotify: opts.listener?.onnotify } as {}),
    onclose: opts.listener?.onclose,
    connection: { application_name: opts.applicationName ?? "qvd", TimeZone: "UTC" },
    // Keep integers as numbers for counts; bigint columns (counters, audit ids) are cast in SQL.
    types: {},
  });
}

/** Runs `fn` in a transaction (or a savepoint when already inside one). */
export function transaction<T>(db: Db, fn: (tx: postgres.TransactionSql<{}>) => Promise<T>): Promise<T> {
  if ("savepoint" in db) return db.savepoint(fn) as Promise<T>;
  return (db as Sql).begin(fn) as Promise<T>;
}
