// The admin CLI's side of the admin API: stored credentials (0600 under the user's config
// directory), the connection settings of one run (flags, environment, stored login), and an
// HTTP client that turns every failure into a one-line UserError with the CLI's exit code.
import { chmodSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { homedir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { UserError } from "../errors.ts";

/** Exit codes of `qvd admin` (README "Admin CLI"). */
export const EXIT = {
  ok: 0,
  refused: 1, // the API refused (4xx not listed below, 5xx) or a mass change partly failed
  usage: 2,
  unauthenticated: 3,
  forbidden: 4,
  notFound: 5,
  conflict: 6,
  unreachable: 7,
} as const;

export const usageError = (message: string) => new UserError(message, EXIT.usage);

/** What `qvd admin login` stores. */
export interface Credentials {
  url: string;
  token: string;
  name: string;
  tenant?: string;
  /** Absolute path of a PEM file to trust for this API. */
  ca?: string;
  insecure?: boolean;
}

export function credentialsFile(env: NodeJS.ProcessEnv = process.env): string {
  const base = env.XDG_CONFIG_HOME?.startsWith("/") ? env.XDG_CONFIG_HOME : join(env.HOME || homedir(), ".config");
  return join(base, "qvd", "admin.json");
}

export function loadCredentials(file = credentialsFile()): Credentials | undefined {
  if (!existsSync(file)) return undefined;
  let parsed: unknown;
  try {
    parsed = JSON.parse(readFileSync(file, "utf8"));
  } catch (err) {
    throw new UserError(
      `${file}: unreadable credentials (${(err as Error).message}); run qvd admin login again`,
      EXIT.unauthenticated,
    );
  }
  const c = parsed as Partial<Credentials>;
  if (!c || typeof c.url !== "string" || typeof c.token !== "string")
    throw new UserError(`${file}: not a qvd admin credentials file; run qvd admin login again`, EXIT.unauthenticated);
  return c as Credentials;
}

/** Writes the credentials with mode 0600 in a 0700 directory (created when missing). */
export function saveCredentials(c: Credentials, file = credentialsFile()): void {
  const dir = dirname(file);
  if (!existsSync(dir)) mkdirSync(dir, { recursive: true, mode: 0o700 });
  // Remove first so that an existing file with looser permissions is not reused.
  rmSync(file, { force: true });
  writeFileSync(file, JSON.stringify(c, null, 2) + "\n", { mode: 0o600, flag: "wx" });
  chmodSync(file, 0o600);
}

export function deleteCredentials(file = credentialsFile()): boolean {
  if (!existsSync(file)) return false;
  rmSync(file, { force: true });
  return true;
}

/** `https://host:port`, `host:port` or `…/api/v1` → `https://host:port/api/v1`. */
export function apiBase(url: string): string {
  let u = url.trim();
  if (!/^[a-z][a-z0-9+.-]*:\/\//i.test(u)) u = `https://${u}`;
  let parsed: URL;
  try {
    parsed = new URL(u);
  } catch {
    throw usageError(`--url ${url}: not a URL (expected https://HOST:PORT)`);
  }
  if (parsed.protocol !== "https:" && parsed.protocol !== "http:")
    throw usageError(`--url ${url}: only https:// (or http:// for local tests)`);
  let path = parsed.pathname.replace(/\/+$/, "");
  if (!path.endsWith("/api/v1")) path += "/api/v1";
  return `${parsed.protocol}//${parsed.host}${path}`;
}

/** Connection options a command was given (flags), before the environment and stored login. */
export interface ConnectionFlags {
  url?: string;
  token?: string;
  ca?: string;
  insecure?: boolean;
}

export interface Connection {
  base: string;
  token?: string;
  ca?: string;
  insecure: boolean;
  /** Where the settings came from, for messages. */
  stored?: Credentials;
}

/**
 * The API and token of this run: flags, then QVD_ADMIN_URL / QVD_ADMIN_TOKEN / QVD_ADMIN_CA /
 * QVD_ADMIN_INSECURE, then the stored login. `needToken` false is for login.
 */
export function connection(
  flags: ConnectionFlags,
  opts: { needToken?: boolean; env?: NodeJS.ProcessEnv } = {},
): Connection {
  const env = opts.env ?? process.env;
  const stored = loadCredentials(credentialsFile(env));
  const url = flags.url || env.QVD_ADMIN_URL || stored?.url;
  const token =
    flags.token ||
    env.QVD_ADMIN_TOKEN ||
    (url && stored && apiBase(url) === apiBase(stored.url) ? stored.token : undefined);
  if (!url)
    throw new UserError(
      "not logged in: run qvd admin login --url https://HOST:PORT --name NAME (or set QVD_ADMIN_URL and QVD_ADMIN_TOKEN)",
      EXIT.unauthenticated,
    );
  if (opts.needToken !== false && !token)
    throw new UserError(
      `not logged in to ${apiBase(url)}: run qvd admin login (or give --token / QVD_ADMIN_TOKEN)`,
      EXIT.unauthenticated,
    );
  const caFlag = flags.ca || env.QVD_ADMIN_CA;
  const insecureEnv = env.QVD_ADMIN_INSECURE === "1" || env.QVD_ADMIN_INSECURE === "true";
  return {
    base: apiBase(url),
    token,
    ca: caFlag ? resolve(caFlag) : stored?.ca,
    insecure:
      flags.insecure === true || insecureEnv || (flags.insecure === undefined && !caFlag && stored?.insecure === true),
    stored,
  };
}

export interface ApiAnswer<T = any> {
  status: number;
  body: T;
}

function exitCodeFor(status: number): number {
  switch (status) {
    case 401:
      return EXIT.unauthenticated;
    case 403:
      return EXIT.forbidden;
    case 404:
      return EXIT.notFound;
    case 409:
      return EXIT.conflict;
    default:
      return EXIT.refused;
  }
}

/** The API's error document as a one-line message. */
function messageOf(status: number, body: unknown): string {
  const e = (body as { error?: { message?: unknown } } | undefined)?.error;
  if (e && typeof e.message === "string") return e.message;
  if (typeof body === "string" && body.trim()) return `HTTP ${status}: ${body.trim().split("\n")[0]!.slice(0, 200)}`;
  return `HTTP ${status}`;
}

const TLS_CODES = /CERT|SELF_SIGNED|UNABLE_TO_(GET|VERIFY)|TLS|SSL|HOSTNAME|ALTNAME/i;

export class AdminClient {
  private caText?: string;
  private warned = false;

  constructor(readonly conn: Connection) {
    if (conn.ca) {
      try {
        this.caText = readFileSync(conn.ca, "utf8");
      } catch (err) {
        throw usageError(`--ca ${conn.ca}: cannot read the certificate file: ${(err as Error).message}`);
      }
    }
  }

  /** Calls the API; answers the parsed body of a 2xx response, throws a UserError otherwise. */
  async call<T = any>(
    method: string,
    path: string,
    opts: { query?: URLSearchParams | Record<string, string>; body?: unknown; token?: boolean } = {},
  ): Promise<ApiAnswer<T>> {
    const q = opts.query instanceof URLSearchParams ? opts.query : new URLSearchParams(opts.query ?? {});
    const qs = q.toString();
    const url = this.conn.base + path + (qs ? `?${qs}` : "");
    if (this.conn.insecure && !this.warned && url.startsWith("https:")) {
      this.warned = true;
      console.error("qvd: warning: --insecure: the API's certificate is not verified");
    }
    const headers: Record<string, string> = { accept: "application/json", "x-qvd-source": "cli" };
    if (opts.body !== undefined) headers["content-type"] = "application/json";
    if (opts.token !== false && this.conn.token) headers.authorization = `Bearer ${this.conn.token}`;
    const tls = this.conn.insecure ? { rejectUnauthorized: false } : this.caText ? { ca: this.caText } : undefined;
    let res: Response;
    try {
      res = await fetch(url, {
        method,
        headers,
        body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
        signal: AbortSignal.timeout(300_000),
        ...(tls ? { tls } : {}),
      } as RequestInit);
    } catch (err) {
      const e = err as { code?: string; message?: string; name?: string };
      const why = e.name === "TimeoutError" ? "no answer within 300 s" : (e.message ?? String(err));
      const hint = TLS_CODES.test(`${e.code ?? ""} ${why}`)
        ? " (the certificate is not trusted: give --ca FILE with the API's CA, or --insecure to skip the check)"
        : "";
      throw new UserError(`cannot reach the API at ${this.conn.base}: ${why}${hint}`, EXIT.unreachable);
    }
    const text = await res.text();
    let body: unknown = text;
    try {
      body = text ? JSON.parse(text) : undefined;
    } catch {}
    if (res.status >= 200 && res.status < 300) return { status: res.status, body: body as T };
    let message = messageOf(res.status, body);
    if (res.status === 401 && path !== "/login") message += " (qvd admin login)";
    throw new UserError(message, exitCodeFor(res.status));
  }

  get = <T = any>(path: string, query?: URLSearchParams | Record<string, string>) =>
    this.call<T>("GET", path, { query }).then((r) => r.body);
}
