// A throwaway PostgreSQL with a large farm for the benchmarks: N users with a VM each (the
// first `running` of them running on one node), one OSF, the superadmin. Filled with set-based
// SQL (seconds for 10,000), fsync off. `stop()` removes everything.
import { chmodSync, mkdtempSync, rmSync } from "node:fs";
import { LocalCluster } from "../src/db/local-cluster.ts";
import { connect, type Sql } from "../src/db/pool.ts";
import { hashPassword, initDatabase } from "../src/db/schema.ts";

export interface BenchFarm {
  sql: Sql;
  url: string;
  adminPassword: string;
  /** Seconds the filling took. */
  setupSeconds: number;
  stop(): Promise<void>;
}

export async function benchFarm(opts: { n: number; running: number; adminPassword?: string }): Promise<BenchFarm> {
  const adminPassword = opts.adminPassword ?? "bench-admin-pw";
  const dir = mkdtempSync("/tmp/qvd-bench-");
  chmodSync(dir, 0o755);
  const cluster = new LocalCluster({ dir, noSync: true, settings: { fsync: "off", synchronous_commit: "off" } });
  let sql: Sql | undefined;
  const stop = async () => {
    await sql?.end({ timeout: 5 });
    await cluster.stop("immediate").catch(() => {});
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    await cluster.init();
    await cluster.start();
    await cluster.createDatabase("bench");
    const url = cluster.url("bench");
    sql = connect(url, { max: 10 });
    await initDatabase(sql, { adminPassword });
    const t0 = performance.now();
    const hash = await hashPassword("user-password"); // one hash for all: hashing 10,000 would only time argon2
    await sql`INSERT INTO osfs (tenant_id, name) VALUES (1, 'bench')`;
    await sql`INSERT INTO hosts (name, address) VALUES ('bench-node', '198.18.0.1')`;
    await sql`UPDATE host_runtimes SET state = 'running', ok_ts = now(), usable_ram_mb = 1e6, usable_cpu = 100`;
    await sql`INSERT INTO users (tenant_id, name, password_hash) SELECT 1, 'user' || g, ${hash} FROM generate_series(1, ${opts.n}) g`;
    await sql`INSERT INTO vms (tenant_id, user_id, osf_id, name, ip)
              SELECT 1, u.id, (SELECT id FROM osfs LIMIT 1), 'desktop-' || u.name, ('198.18.0.0'::inet + 2 + row_number() OVER (ORDER BY u.id))
                FROM users u`;
    await sql`UPDATE vm_runtimes SET vm_state = 'running', host_id = (SELECT id FROM hosts LIMIT 1)
               WHERE vm_id IN (SELECT id FROM vms ORDER BY id LIMIT ${opts.running})`;
    await sql`ANALYZE`;
    return { sql, url, adminPassword, setupSeconds: (performance.now() - t0) / 1000, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}
