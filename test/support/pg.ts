// A throwaway PostgreSQL cluster for the tests, on src/db/local-cluster.ts: a temp dir, a unix
// socket only, run as an unprivileged user when the tests run as root. One cluster per test
// run; each test file gets its own database, cloned from a template that already holds the
// schema. A watchdog stops the cluster even if the test process dies without running its hooks.
import { mkdtempSync, rmSync } from "node:fs";
import { LocalCluster } from "../../src/db/local-cluster.ts";

export class PgCluster {
  readonly dir: string;
  readonly data: string;
  private readonly cluster: LocalCluster;
  private dbCounter = 0;
  private watchdog?: Bun.Subprocess;

  constructor() {
    this.dir = mkdtempSync("/tmp/qvd-test-pg-");
    this.cluster = new LocalCluster({
      dir: this.dir,
      noSync: true,
      settings: { fsync: "off", synchronous_commit: "off", full_page_writes: "off", max_connections: 200 },
    });
    this.data = this.cluster.data;
  }

  /** libpq-style URL of a database in this cluster (unix socket in `dir`). */
  url(db = "postgres"): string {
    return this.cluster.url(db);
  }

  async start(): Promise<void> {
    await this.cluster.init();
    await this.cluster.start();
    // Stop the server when this process goes away, whatever the way.
    const asUser = this.cluster.user ? `runuser -u ${this.cluster.user} -- ` : "";
    const script = `cd /; while kill -0 ${process.pid} 2>/dev/null; do sleep 1; done; ${asUser}${this.cluster.bin}/pg_ctl -D ${this.data} stop -m immediate >/dev/null 2>&1; rm -rf ${this.dir}`;
    this.watchdog = Bun.spawn(["sh", "-c", script], { stdio: ["ignore", "ignore", "ignore"] });
    this.watchdog.unref();
  }

  /** A real restart of the server process (connections are cut). */
  async restart(): Promise<void> {
    await this.cluster.restart();
  }

  /**
   * Takes the server away until `resume()` (an outage, for fencing tests). A clean shutdown:
   * with the throwaway cluster's fsync and synchronous_commit off, a crash-like one would lose
   * the last commits, which is not the outage under test.
   */
  async pause(): Promise<void> {
    await this.cluster.stop("fast");
  }

  async resume(): Promise<void> {
    await this.cluster.start();
  }

  async stop(): Promise<void> {
    await this.cluster.stop("immediate").catch(() => {});
    rmSync(this.dir, { recursive: true, force: true });
    this.watchdog?.kill();
  }

  /** Creates a new database (empty, or a copy of `template`) and returns its name. */
  async createDatabase(template?: string): Promise<string> {
    const name = `t${process.pid}_${++this.dbCounter}`;
    await this.cluster.createDatabase(name, template);
    return name;
  }
}
