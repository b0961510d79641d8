// A replicated database for failover tests and bench/cluster.ts: a primary and its streaming
// standby (pg_basebackup -R), two throwaway clusters on unix sockets in temp dirs (fsync off),
// the qvd schema in database `qvd`, and libpq's multi-host URL naming both, primary first.
//   const pair = await PgPair.start();
//   connect(pair.url())  ...  await pair.failover();  ...  await pair.stop();
// A watchdog stops both servers even if the test process dies without running its hooks.
import { chmodSync, mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import { LocalCluster } from "../../src/db/local-cluster.ts";
import { connect } from "../../src/db/pool.ts";
import { initDatabase } from "../../src/db/schema.ts";
import { TEST_ADMIN } from "./db.ts";
import { until } from "./wait.ts";

const SETTINGS = { fsync: "off", synchronous_commit: "off", max_connections: 200 };

export class PgPair {
  readonly dir: string;
  /** The server the URL names first; after failover() it is stopped (or a standby, see rejoinAsStandby). */
  readonly a: LocalCluster;
  readonly b: LocalCluster;
  private watchdog?: Bun.Subprocess;

  private constructor() {
    this.dir = mkdtempSync("/tmp/qvd-test-pgpair-");
    chmodSync(this.dir, 0o755); // the servers' user reaches its folder below
    this.a = new LocalCluster({ dir: join(this.dir, "a"), noSync: true, settings: SETTINGS });
    this.b = new LocalCluster({ dir: join(this.dir, "b"), noSync: true, settings: SETTINGS });
  }

  /** Primary `a` with the schema, standby `b` streaming from it. */
  static async start(): Promise<PgPair> {
    const p = new PgPair();
    try {
      await p.a.init();
      await p.a.start();
      p.startWatchdog();
      await p.a.createDatabase("qvd");
      const sql = connect(p.a.url("qvd"), { max: 1 });
      try {
        await initDatabase(sql, { adminName: TEST_ADMIN.name, adminPassword: TEST_ADMIN.password });
      } finally {
        await sql.end({ timeout: 5 });
      }
      await p.b.initStandbyOf(p.a);
      await p.b.start();
    } catch (err) {
      await p.stop();
      throw err;
    }
    return p;
  }

  /** The multi-host URL of database `db`: both socket directories, primary wanted. */
  url(db = "qvd"): string {
    return `postgres://postgres@/${db}?host=${this.a.dir},${this.b.dir}&target_session_attrs=read-write`;
  }

  /** Waits until the standby has replayed everything the primary wrote so far. */
  async caughtUp(timeoutMs = 30_000): Promise<void> {
    const pa = connect(this.a.url("qvd"), { max: 1 });
    const pb = connect(this.b.url("qvd"), { max: 1 });
    try {
      // The insert position, not the write one: with synchronous_commit off (SETTINGS) a commit
      // just made may not be written yet, and catching up to the write position would miss it.
      const [{ lsn }] = (await pa`SELECT pg_current_wal_insert_lsn()::text AS lsn`) as unknown as [{ lsn: string }];
      await until(
        async () => (await pb`SELECT pg_last_wal_replay_lsn() >= ${lsn}::pg_lsn AS done`)[0]!.done === true,
        "the standby to catch up",
        timeoutMs,
        50,
      );
    } finally {
      await Promise.all([pa.end({ timeout: 2 }), pb.end({ timeout: 2 })]);
    }
  }

  /** The primary stops at once (a crash, as far as clients see). */
  async stopPrimary(): Promise<void> {
    await this.a.stop("immediate");
  }

  /** The standby is promoted; resolves when it takes writes, with the promotion's duration. */
  async promote(): Promise<number> {
    const t0 = performance.now();
    await this.b.promote();
    return performance.now() - t0;
  }

  /** The whole failover: stopPrimary() then promote(). */
  async failover(): Promise<{ promoteMs: number }> {
    await this.stopPrimary();
    return { promoteMs: await this.promote() };
  }

  /** The old primary comes back as a standby of the new one (as after pg_rewind or a re-clone). */
  async rejoinAsStandby(): Promise<void> {
    rmSync(this.a.data, { recursive: true, force: true });
    await this.a.initStandbyOf(this.b);
    await this.a.start();
  }

  async stop(): Promise<void> {
    for (const c of [this.a, this.b])
      if (await c.running().catch(() => false)) await c.stop("immediate").catch(() => {});
    this.watchdog?.kill();
    rmSync(this.dir, { recursive: true, force: true });
  }

  private startWatchdog(): void {
    const asUser = this.a.user ? `runuser -u ${this.a.user} -- ` : "";
    const stops = [this.a, this.b]
      .map((c) => `${asUser}${c.bin}/pg_ctl -D ${c.data} stop -m immediate >/dev/null 2>&1`)
      .join("; ");
    const script = `cd /; while kill -0 ${process.pid} 2>/dev/null; do sleep 1; done; ${stops}; rm -rf ${this.dir}`;
    this.watchdog = Bun.spawn(["sh", "-c", script], { stdio: ["ignore", "ignore", "ignore"] });
    this.watchdog.unref();
  }
}
