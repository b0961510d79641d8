// Shared pieces of the subcommands: the common flags (--config, --db, --set key=value) and
// turning them into the effective configuration.
import type { ArgsDef } from "citty";
import { loadConfig, type Config } from "./config.ts";
import { listConfigRows } from "./db/configs.ts";
import { connect, ping, type Sql } from "./db/pool.ts";
import { requireCurrentSchema } from "./db/schema.ts";
import { ConfigError, UserError } from "./errors.ts";
import { setLogFormat, setLogLevel } from "./log.ts";

export const commonArgs = {
  config: { type: "string", description: "Configuration file (default /etc/qvd/node.conf)", valueHint: "FILE" },
  db: { type: "string", description: "Database URL (else QVD_DATABASE_URL or database.url)", valueHint: "URL" },
  set: { type: "string", description: "Set a configuration key for this run (repeatable)", valueHint: "KEY=VALUE" },
} as const satisfies ArgsDef;

/** Every `--set k=v` (and `--set=k=v`) of the raw command line, in order. */
export function setFlags(rawArgs: string[]): { flag: string; key: string; value: string }[] {
  const out: { flag: string; key: string; value: string }[] = [];
  for (let i = 0; i < rawArgs.length; i++) {
    const a = rawArgs[i]!;
    let kv: string | undefined;
    if (a === "--set") kv = rawArgs[++i];
    else if (a.startsWith("--set=")) kv = a.slice(6);
    else continue;
    const eq = kv?.indexOf("=") ?? -1;
    if (!kv || eq <= 0) throw new ConfigError(`--set ${kv ?? ""}: expected KEY=VALUE`);
    out.push({ flag: `--set ${kv.slice(0, eq)}`, key: kv.slice(0, eq).trim(), value: kv.slice(eq + 1) });
  }
  return out;
}

/**
 * The last `--db URL` (or `--db=URL`) of the raw command line. Read from the raw arguments
 * because citty turns `--no-db` into db=false, which would drop an explicit --db.
 */
function dbFlag(rawArgs: string[]): string | undefined {
  let url: string | undefined;
  for (let i = 0; i < rawArgs.length; i++) {
    const a = rawArgs[i]!;
    if (a === "--db") url = rawArgs[++i] ?? "";
    else if (a.startsWith("--db=")) url = a.slice(5);
  }
  return url;
}

/**
 * The node configuration for a command: file, environment, then flags. `extra` maps a
 * command's own flags to keys (e.g. `--listen` → l7r.listen).
 */
export function configFromArgs(
  args: { config?: string; db?: string },
  rawArgs: string[],
  extra: { flag: string; key: string; value: string | undefined }[] = [],
): Config {
  const flags = setFlags(rawArgs);
  const db = dbFlag(rawArgs) ?? (typeof args.db === "string" ? args.db : undefined);
  if (db !== undefined) flags.push({ flag: "--db", key: "database.url", value: db });
  for (const e of extra) if (e.value !== undefined) flags.push({ flag: e.flag, key: e.key, value: e.value });
  const cfg = loadConfig({ file: args.config, flags });
  setLogLevel(cfg.get("log.level"));
  setLogFormat(cfg.get("log.format"));
  return cfg;
}

/** A database URL with its password masked, for messages. */
export function maskUrl(url: string): string {
  return url.replace(/^(\w+:\/\/[^:@/]*:)[^@]*@/, "$1********@").replace(/([?&]password=)[^&]*/, "$1********");
}

/**
 * A daemon's configuration with the database's rows (global and per tenant) layered over it,
 * once the database answers and holds this binary's schema version (src/db/schema.ts).
 */
export async function layerDatabaseConfig(
  sql: Sql,
  url: string,
  cfg: Config,
  warn: (m: string) => void,
): Promise<Config> {
  const rows = await listConfigRows(sql).catch((err: Error) => {
    throw new UserError(`cannot use the database ${maskUrl(url)}: ${err.message}`);
  });
  await requireCurrentSchema(sql);
  return cfg.withDatabase(
    rows.map((r) => ({ tenantId: r.tenant_id, key: r.key, value: r.value })),
    warn,
  );
}

/** Connects with the configured URL, runs `fn`, and always closes the pool. */
export async function withDatabase<T>(cfg: Config, fn: (sql: Sql) => Promise<T>): Promise<T> {
  const url = cfg.databaseUrl();
  const sql = connect(url, { max: 2, connectTimeout: cfg.get("database.connect_timeout") });
  try {
    await ping(sql).catch((err: Error) => {
      throw new UserError(
        `cannot connect to the database ${maskUrl(url)}: ${err.message} (set --db, QVD_DATABASE_URL or database.url)`,
      );
    });
    return await fn(sql);
  } finally {
    await sql.end({ timeout: 5 });
  }
}
