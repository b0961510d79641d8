// A throwaway PostgreSQL cluster for the tests: initdb + pg_ctl in a temp dir, a unix socket
// only (no TCP port), run as an unprivileged user when the tests run as root (initdb refuses
// root). One cluster per test run; each test file gets its own database, cloned from a
// template that already holds the schema. A watchdog stops the cluster even if the test
// process dies without running its hooks.
import { chmodSync, chownSync, existsSync, mkdtempSync, readdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import { connect, type Sql } from "../../src/db/pool.ts";
import { run } from "../../src/run.ts";

function pgBinDir(): string {
  const onPath = Bun.which("pg_ctl");
  if (onPath) return onPath.replace(/\/pg_ctl$/, "");
  const base = "/usr/lib/postgresql";
  const versions = existsSync(base) ? readdirSync(base).filter((v) => /^\d+$/.test(v)).sort((a, b) => +b - +a) : [];
  for (const v of versions) if (existsSync(`${base}/${v}/bin/pg_ctl`)) return `${base}/${v}/bin`;
  throw new Error("PostgreSQL server binaries not found: install the postgresql package (the test command does)");
}

export class PgCluster {
  readonly dir: string;
  readonly data: string;
  private readonly bin = pgBinDir();
  private readonly asUser: string[];
  private dbCounter = 0;
  private watchdog?: Bun.Subprocess;

  constructor() {
    this.dir = mkdtempSync("/tmp/qvd-test-pg-");
    this.data = join(this.dir, "data");
    // initdb refuses to run as root: run the server as the `postgres` user (or nobody).
    if (process.getuid?.() === 0) {
      const user = existsSync("/var/lib/postgresql") ? "postgres" : "nobody";
      const pw = Bun.spawnSync(["id", "-u", user]).stdout.toString().trim();
      const gr = Bun.spawnSync(["id", "-g", user]).stdout.toString().trim();
      chownSync(this.dir, Number(pw), Number(gr));
      chmodSync(this.dir, 0o755);
      this.asUser = ["runuser", "-u", user, "--"];
    } else this.asUser = [];
  }

  /** libpq-style URL of a database in this cluster (unix socket in `dir`). */
  url(db = "postgres"): string {
    return `postgres://postgres@/${db}?host=${encodeURIComponent(this.dir)}`;
  }

  private pgctl(...args: string[]) {
    return run([...this.asUser, `${this.bin}/pg_ctl`, "-D", this.data, ...args], { timeoutMs: 60_000 });
  }

  async start(): Promise<void> {
    await run([...this.asUser, `${this.bin}/initdb`, "-D", this.data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", "--locale=C"], { timeoutMs: 120_000 });
    await this.startServer();
    // Stop the server when this process goes away, whatever the way.
    const script = `while kill -0 ${process.pid} 2>/dev/null; do sleep 1; done; ${this.asUser.join(" ")} ${this.bin}/pg_ctl -D ${this.data} stop -m immediate >/dev/null 2>&1; rm -rf ${this.dir}`;
    this.watchdog = Bun.spawn(["sh", "-c", script], { stdio: ["ignore", "ignore", "ignore"] });
    this.watchdog.unref();
  }

  private async startServer(): Promise<void> {
    const opts = `-c listen_addresses='' -c unix_socket_directories='${this.dir}' -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200`;
    await this.pgctl("-l", join(this.dir, "server.log"), "-w", "-o", opts, "start");
  }

  /** A real restart of the server process (connections are cut). */
  async restart(): Promise<void> {
    await this.pgctl("-m", "fast", "-w", "stop");
    await this.startServer();
  }

  async stop(): Promise<void> {
    await this.pgctl("-m", "immediate", "-w", "stop").catch(() => {});
    rmSync(this.dir, { recursive: true, force: true });
    this.watchdog?.kill();
  }

  /** Creates a new database (empty, or a copy of `template`) and returns its name. */
  async createDatabase(template?: string): Promise<string> {
    const name = `t${process.pid}_${++this.dbCounter}`;
    const admin = connect(this.url(), { max: 1 });
    try {
      await admin.unsafe(`CREATE DATABASE ${name}${template ? ` TEMPLATE ${template}` : ""}`);
    } finally {
      await admin.end();
    }
    return name;
  }
}
