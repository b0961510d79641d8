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

/**
 * One placement decision (src/db/placement.ts placeVm) in a SYNTHETIC farm database: `nodes`
 * nodes alive with random free memory and CPU, `vms` VMs, every node running its share, and on
 * each node what a busy moment looks like: 2 desktops starting, 1 placed, 1 running since the
 * node's heartbeat (the pending memory placement must add up). Times `decisions` calls after a
 * warm-up; checks the plan reads no VM table in full. `bun bench/farm.ts` runs it alone.
 */
export async function benchPlacement(
  opts: { nodes?: number; vms?: number; decisions?: number } = {},
): Promise<{ median: number; p99: number; seqScans: string[] }> {
  const nodes = opts.nodes ?? 1000;
  const n = opts.vms ?? 100_000;
  const decisions = opts.decisions ?? 200;
  const { placeVm, placementCandidates, placementPlan } = await import("../src/db/placement.ts");
  const f = await benchFarm({ n, running: 0 });
  try {
    const sql = f.sql;
    await sql`INSERT INTO hosts (name, address) SELECT 'node' || g, ('10.0.0.0'::inet + g)::text FROM generate_series(2, ${nodes}) g`;
    await sql`UPDATE host_runtimes SET state = 'running', ok_ts = now() - interval '2 seconds', usable_ram_mb = 32768 + 32768 * random(), usable_cpu = 16000 * random()`;
    // VM i on node i % nodes, running for an hour with its OSF recorded (as the node records it).
    await sql`WITH h AS (SELECT id, row_number() OVER (ORDER BY id) - 1 AS i FROM hosts)
      UPDATE vm_runtimes r SET host_id = h.id, vm_state = 'running', vm_state_ts = now() - interval '1 hour', current_osf_id = v.osf_id
        FROM h, vms v WHERE v.id = r.vm_id AND h.i = r.vm_id % ${nodes}`;
    const k = Math.floor(n / nodes); // VMs per node; the first four of each node's are busy
    await sql`UPDATE vm_runtimes SET vm_state = 'starting', vm_state_ts = now() WHERE vm_id / ${nodes} % ${k} IN (0, 1)`;
    await sql`UPDATE vm_runtimes SET vm_state = 'stopped', vm_cmd = 'start', vm_cmd_ts = now() WHERE vm_id / ${nodes} % ${k} = 2`;
    await sql`UPDATE vm_runtimes SET vm_state_ts = now() WHERE vm_id / ${nodes} % ${k} = 3`;
    await sql`VACUUM ANALYZE`;
    const pending = (await placementCandidates(sql, 0, 30)).reduce((s, c) => s + c.pending_mb, 0);
    if (pending === 0) throw new Error("the synthetic farm has no pending memory");
    const times: number[] = [];
    for (let i = 0; i < decisions + 20; i++) {
      const t = performance.now();
      if ((await placeVm(sql, 1024, 30)) === undefined) throw new Error("no node chosen");
      if (i >= 20) times.push(performance.now() - t);
    }
    times.sort((a, b) => a - b);
    const plan = await placementPlan(sql, 1024, 30);
    return {
      median: times[Math.floor(times.length / 2)]!,
      p99: times[Math.min(times.length - 1, Math.floor(times.length * 0.99))]!,
      seqScans: plan.filter((l) => /Seq Scan/.test(l)).map((l) => l.trim().replace(/\s+\(cost.*$/, "")),
    };
  } finally {
    await f.stop();
  }
}

if (import.meta.main) {
  const nodes = 1000;
  const vms = 100_000;
  console.log(
    `placement: a SYNTHETIC database with ${nodes.toLocaleString("en")} nodes and ${vms.toLocaleString("en")} VMs (rows only, no nodes run)…`,
  );
  const r = await benchPlacement({ nodes, vms });
  console.log(
    `  one placement decision (placeVm, 200 timed): median ${r.median.toFixed(1)} ms, p99 ${r.p99.toFixed(1)} ms  (aim < 5 ms)`,
  );
  console.log(`  full scans in its plan: ${r.seqScans.length ? r.seqScans.join("; ") : "none"}`);
  process.exit(0);
}
