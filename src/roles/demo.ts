// `qvd demo`: everything on one machine, with a PostgreSQL cluster that qvd manages itself in
// a directory (persistent across runs). For now: the database. Later: API, node and client.
// Installs nothing: `npm run demo` (scripts/demo.ts) checks the system programs first.
import { chmodSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { defineCommand } from "citty";
import { LocalCluster } from "../db/local-cluster.ts";
import { connect } from "../db/pool.ts";
import { initDatabase, migrateDatabase, schemaStatus } from "../db/schema.ts";
import { UserError } from "../errors.ts";

export const DEMO_DB = "qvd";
export const PASSWORD_FILE = "superadmin-password";
const PID_FILE = "demo.pid";

/** Refuses to share the directory with a running demo; records this one. */
function takeDir(dir: string): void {
  const pidFile = join(dir, PID_FILE);
  if (existsSync(pidFile)) {
    const pid = Number(readFileSync(pidFile, "utf8").trim());
    let alive = false;
    if (pid > 0 && pid !== process.pid) {
      try {
        alive = readFileSync(`/proc/${pid}/cmdline`, "utf8").includes("demo");
      } catch {}
    }
    if (alive) throw new UserError(`another qvd demo (pid ${pid}) is running in ${dir}: stop it first`);
  }
  writeFileSync(pidFile, `${process.pid}\n`);
}

const shellQuote = (s: string) => (/^[\w@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, "'\\''")}'`);

export default defineCommand({
  meta: { name: "demo", description: "Everything on one machine, with a managed local PostgreSQL (runs until Ctrl-C)" },
  args: {
    dir: { type: "string", description: "Directory for the demo's PostgreSQL cluster and files", default: "/var/lib/qvd/demo", valueHint: "DIR" },
  },
  async run({ args }) {
    const dir = resolve(args.dir);
    // A signal during the setup ends the demo as soon as the setup is done.
    let signalled: (sig: string) => void = () => {};
    const stopSignal = new Promise<string>((r) => (signalled = r));
    const onSignal = (sig: NodeJS.Signals) => () => signalled(sig);
    process.on("SIGINT", onSignal("SIGINT"));
    process.on("SIGTERM", onSignal("SIGTERM"));

    const cluster = new LocalCluster({ dir });
    console.log(`qvd demo in ${dir}`);
    mkdirSync(dir, { recursive: true, mode: 0o755 });
    takeDir(dir);
    let started = false;
    try {
      if (!cluster.initialised) {
        console.log(`Creating a PostgreSQL cluster in ${cluster.data}…`);
        await cluster.init();
      }
      if (await cluster.running()) {
        console.log("Stopping the PostgreSQL server left running by an earlier demo…");
        await cluster.stop("fast");
      }
      console.log(`Starting PostgreSQL (unix socket in ${dir}, no TCP)…`);
      await cluster.start();
      started = true;

      if (!(await cluster.databaseExists(DEMO_DB))) {
        console.log(`Creating database ${DEMO_DB}…`);
        await cluster.createDatabase(DEMO_DB);
      }
      const url = cluster.url(DEMO_DB);
      const passwordFile = join(dir, PASSWORD_FILE);
      const sql = connect(url, { max: 1 });
      try {
        const st = await schemaStatus(sql);
        if (st.version === null && st.tables > 0)
          throw new UserError(`database ${DEMO_DB} in ${dir} holds ${st.tables} tables but no QVD schema: remove ${dir} to start afresh`);
        if (st.version === null) {
          console.log("Initialising the QVD schema…");
          const res = await initDatabase(sql);
          writeFileSync(passwordFile, `${res.adminPassword}\n`, { mode: 0o600 });
          chmodSync(passwordFile, 0o600);
          console.log(`Schema version ${res.version}. Superadmin: ${res.adminName} (tenant *)`);
          console.log(`Password:   ${res.adminPassword}`);
          console.log(`This password is shown only once; it is also in ${passwordFile} (mode 0600).`);
        } else if (st.version > st.latest) {
          console.log(`Warning: the database schema (version ${st.version}) is newer than this qvd (version ${st.latest}).`);
        } else if (st.pending.length) {
          const res = await migrateDatabase(sql);
          console.log(`Schema migrated from version ${res.from} to ${res.to}.`);
        } else {
          console.log(`Reusing database ${DEMO_DB} (schema version ${st.version}); superadmin password in ${passwordFile}.`);
        }
      } finally {
        await sql.end({ timeout: 5 });
      }

      console.log(`Database URL: ${url}`);
      console.log(`Use it with: qvd db status --db ${shellQuote(url)}`);
      console.log("Running; press Ctrl-C to stop.");
      // Bun 1.4.5 spins a CPU when only signal handlers keep the event loop alive: keep a timer.
      const keepAlive = setInterval(() => {}, 2 ** 30);
      const sig = await stopSignal;
      clearInterval(keepAlive);
      console.log(`${sig}: stopping PostgreSQL…`);
    } finally {
      try {
        if (started || (await cluster.running())) await cluster.stop("fast");
      } finally {
        rmSync(join(dir, PID_FILE), { force: true });
      }
    }
    console.log("Stopped.");
  },
});
