// The one connection pool. Everything that talks to PostgreSQL goes through `connect()` and
// the typed functions of src/db/; roles never write SQL themselves.
import { Socket } from "node:net";
import { Duplex } from "node:stream";
import postgres from "postgres";
import { checkDatabaseTls, parseDatabaseUrl, wantsPrimary, type DbTarget } from "./url.ts";

// postgres.js's type parameter for custom column types: none here (its own default is `{}`).
// biome-ignore lint/complexity/noBannedTypes: the library's declared default
type NoCustomTypes = {};
export type Sql = postgres.Sql<NoCustomTypes>;
export type Tx = postgres.TransactionSql<NoCustomTypes>;
/** A pool or a transaction: every query function accepts either. */
export type Db = Sql | Tx;

export interface ConnectOptions {
  max?: number;
  connectTimeout?: number;
  applicationName?: string;
  /** For the listener's dedicated connection: notifications, closes, and no idle recycling. */
  listener?: { onnotify: (channel: string, payload: string) => void; onclose: () => void };
}

export { checkDatabaseTls, parseDatabaseUrl } from "./url.ts";

/** This process's pools (listening connections aside), for the metrics (src/metrics.ts). */
export const poolStats = { queries: 0, open: 0, max: 0 };

export function connect(url: string, opts: ConnectOptions = {}): Sql {
  checkDatabaseTls(url);
  // Connections are counted by the queries they run and their close (postgres.js exposes no pool state).
  const open = new Set<number>();
  if (!opts.listener) poolStats.max += opts.max ?? 10;
  const seen = (conn: number) => {
    poolStats.queries++;
    if (!open.has(conn)) open.add(conn), poolStats.open++;
  };
  const closed = (conn: number) => {
    if (open.delete(conn)) poolStats.open--;
  };
  const target = parseDatabaseUrl(url);
  const connectTimeout = opts.connectTimeout ?? 10;
  const multi = target.targets.length > 1;
  return postgres(target.url, {
    path: target.path,
    // Several servers: we choose the one to connect to (see serverChooser).
    ...(multi
      ? {
          socket: serverChooser(target.url, target.targets, wantsPrimary(target), connectTimeout),
          target_session_attrs: wantsPrimary(target) ? "read-write" : undefined,
        }
      : {}),
    max: opts.max ?? 10,
    connect_timeout: connectTimeout,
    // postgres.js waits up to 20 s between attempts after repeated failures; a database back
    // from an outage or a failover is used again within half a second.
    backoff: (retries: number) => Math.min(0.5, ((0.5 + Math.random() / 2) * 3 ** retries) / 100),
    // A listening connection must never be recycled: its LISTENs would silently go with it.
    idle_timeout: opts.listener ? (null as unknown as undefined) : 60,
    max_lifetime: opts.listener ? null : undefined,
    onnotice: () => {},
    // `onnotify` is supported by postgres.js but missing from its type declarations.
    ...({ onnotify: opts.listener?.onnotify } as object),
    onclose: opts.listener?.onclose ?? closed,
    ...(opts.listener ? {} : { debug: seen }),
    connection: { application_name: opts.applicationName ?? "qvd", TimeZone: "UTC" },
    // Keep integers as numbers for counts; bigint columns (counters, audit ids) are cast in SQL.
    types: {},
  });
}

/** Runs `fn` in a transaction (or a savepoint when already inside one). */
export function transaction<T>(db: Db, fn: (tx: Tx) => Promise<T>): Promise<T> {
  if ("savepoint" in db) return db.savepoint(fn) as Promise<T>;
  return (db as Sql).begin(fn) as Promise<T>;
}

/**
 * Opens each new connection of a multi-host URL. postgres.js has multi-host support of its own,
 * but while every server is down it retries without pause and never fails the query, so a node
 * would never notice the outage (nor fence itself); here postgres.js sees one server, and a
 * failure fails the query as with a one-host URL. Servers are tried in order from the last
 * good one; when a primary is wanted, each candidate is asked whether it takes writes
 * (a standby, or an old primary back as one, is skipped); new connections skip the question
 * for 10 s after an answer while none of them closes. postgres.js checks target_session_attrs
 * again on the connection itself.
 */
function serverChooser(url: string, targets: DbTarget[], primary: boolean, connectTimeoutS: number) {
  let preferred = 0;
  let verifiedAt = 0;
  const open = (t: DbTarget) => {
    const s = new Socket();
    if (t.path) s.connect(t.path);
    else s.connect(t.port, t.host);
    // postgres.js names the TLS server after these (verify-full checks the name).
    Object.assign(s, { host: t.host, port: t.port });
    // A closed connection (error, standby refused, idle) makes the next one ask again.
    s.once("close", () => (verifiedAt = 0));
    return s;
  };
  const takesWrites = async (t: DbTarget): Promise<boolean> => {
    const probe = postgres(url, {
      host: t.host,
      port: t.port,
      path: t.path,
      max: 1,
      connect_timeout: connectTimeoutS,
      fetch_types: false,
      prepare: false,
      onnotice: () => {},
      connection: { application_name: "qvd-probe" },
    });
    try {
      const [r] = await probe`SELECT pg_is_in_recovery() AS standby, current_setting('transaction_read_only') AS ro`;
      return !r!.standby && r!.ro === "off";
    } catch {
      return false;
    } finally {
      await probe.end({ timeout: 1 }).catch(() => {});
    }
  };
  // postgres.js writes to the socket it is given at once: hand it over connected.
  const connected = (t: DbTarget) =>
    new Promise<Socket | undefined>((resolve) => {
      const s = open(t);
      const done = (ok: boolean) => (clearTimeout(timer), ok || s.destroy(), resolve(ok ? s : undefined));
      const timer = setTimeout(() => done(false), connectTimeoutS * 1000);
      s.once("connect", () => done(true));
      s.once("error", () => done(false));
    });
  return async (): Promise<Socket | Duplex> => {
    const start = Date.now() - verifiedAt < 10_000 ? preferred : -1;
    if (start >= 0) {
      const s = await connected(targets[start]!);
      if (s) return s;
    }
    for (let i = 0; i < targets.length; i++) {
      const idx = (preferred + i) % targets.length;
      if (primary && !(await takesWrites(targets[idx]!))) continue;
      const s = await connected(targets[idx]!);
      if (!s) continue;
      preferred = idx;
      verifiedAt = Date.now();
      return s;
    }
    // None will do. The query fails with this reason once postgres.js has written to the
    // socket (a socket failing before that write leaves its connection stuck for good).
    const names = targets.map((t) => (t.path ? t.host : `${t.host}:${t.port}`)).join(", ");
    const why = new Error(`no database server ${primary ? "takes writes" : "answers"} (tried ${names})`);
    return new Duplex({ read() {}, write: (_c, _e, cb) => cb(why) });
  };
}

/** One round trip: whether the database answers (and the connection's credentials work). */
export async function ping(db: Db): Promise<void> {
  await db`SELECT 1`;
}

/** The database server's clock now (clock_timestamp, not the transaction's start). */
export async function databaseClock(db: Db): Promise<Date> {
  const [r] = await db`SELECT clock_timestamp() AS t`;
  return r!.t as Date;
}
