// The demo's database: a PostgreSQL cluster that qvd manages itself in <dir>/data (unix socket
// in <dir>, no TCP), the `qvd` database and its schema; all kept across runs.
import { chmodSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { LocalCluster } from "../db/local-cluster.ts";
import { connect } from "../db/pool.ts";
import { initDatabase, migrateDatabase, schemaStatus } from "../db/schema.ts";
import { UserError } from "../errors.ts";

export const DEMO_DB = "qvd";
export const PASSWORD_FILE = "superadmin-password";

/** Writes a secret to a file only root can read. */
export function writeSecret(file: string, secret: string): void {
  writeFileSync(file, `${secret}\n`, { mode: 0o600 });
  chmodSync(file, 0o600);
}

/**
 * Starts the cluster (creating it, the database and the schema on the first run) and returns
 * its URL; the superadmin's password goes to <dir>/superadmin-password. `started` is called as soon as the server runs, so the caller can stop it on failure.
 */
export async function startDatabase(
  cluster: LocalCluster,
  dir: string,
  say: (line: string) => void,
  started: () => void,
): Promise<string> {
  if (!cluster.initialised) {
    say(`Creating a PostgreSQL cluster in ${cluster.data}…`);
    await cluster.init();
  }
  if (await cluster.running()) {
    say("Stopping the PostgreSQL server left running by an earlier demo…");
    await cluster.stop("fast");
  }
  say(`Starting PostgreSQL (unix socket in ${cluster.dir}, no TCP)…`);
  await cluster.start();
  started();

  if (!(await cluster.databaseExists(DEMO_DB))) {
    say(`Creating database ${DEMO_DB}…`);
    await cluster.createDatabase(DEMO_DB);
  }
  const url = cluster.url(DEMO_DB);
  const passwordFile = join(dir, PASSWORD_FILE);
  const sql = connect(url, { max: 1 });
  try {
    const st = await schemaStatus(sql);
    if (st.version === null && st.tables > 0)
      throw new UserError(
        `database ${DEMO_DB} in ${dir} holds ${st.tables} tables but no QVD schema: remove ${dir} to start afresh`,
      );
    if (st.version === null) {
      say("Initialising the QVD schema…");
      const res = await initDatabase(sql);
      writeSecret(passwordFile, res.adminPassword);
      say(`Schema version ${res.version}. Superadmin: ${res.adminName} (tenant *)`);
      say(`Password:   ${res.adminPassword}`);
      say(`This password is shown only once; it is also in ${passwordFile} (mode 0600).`);
    } else if (st.version > st.latest) {
      say(`Warning: the database schema (version ${st.version}) is newer than this qvd (version ${st.latest}).`);
    } else if (st.pending.length) {
      const res = await migrateDatabase(sql);
      say(`Schema migrated from version ${res.from} to ${res.to}.`);
    } else {
      say(`Reusing database ${DEMO_DB} (schema version ${st.version}); superadmin password in ${passwordFile}.`);
    }
  } finally {
    await sql.end({ timeout: 5 });
  }
  return url;
}
