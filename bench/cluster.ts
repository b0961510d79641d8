// Farm benchmark on test/support/farm.ts (three `qvd node` processes in network namespaces of
// their own, PostgreSQL over TCP and TLS with a streaming replica, the real desktop image).
// Prints:
//   1. connect → 101 for a running desktop through the L7R of another node (the peer hop) and
//      through its own node's L7R, median and p90 of N each (alternating);
//   2. the failover time: node A (running the desktop) killed with SIGKILL and cut off, until the
//      user's next connect through node B gets a 101 (the desktop started on B or C);
//   3. the time from the database primary stopping (and the replica's promotion) until the farm
//      serves a connect again;
//   4. one placement decision (src/db/placement.ts placeVm) with 1,000 nodes and 100,000 VMs in a
//      SYNTHETIC database (no nodes run; bench/farm.ts benchPlacement), median and p99.
// Prints figures; asserts nothing. Run as root: bun bench/cluster.ts [--connects 20] [--skip-farm]
import { copyFileSync } from "node:fs";
import * as D from "../src/db/index.ts";
import { setLogLevel } from "../src/log.ts";
import { TestFarm, type FarmNode } from "../test/support/farm.ts";
import { desktopImage, removeQvdBinary, until } from "../test/support/node.ts";
import { benchPlacement } from "./farm.ts";

setLogLevel("warn");
const arg = (name: string, def: number) =>
  process.argv.includes(name) ? Number(process.argv[process.argv.indexOf(name) + 1]) : def;
const CONNECTS = arg("--connects", 20);
const LOST_AFTER = 10;
const q = (xs: number[], p: number) =>
  [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(p * xs.length))]!;
const ms = (x: number) => `${x.toFixed(1)} ms`;
const s = (x: number) => `${(x / 1000).toFixed(1)} s`;
const ALL = D.ALL_TENANTS;
const PW = "bench-user-pw-1";

async function farmPart(): Promise<void> {
  if (process.getuid?.() !== 0) {
    console.log("parts 1-3 need root (network namespaces, LXC): skipped");
    return;
  }
  const image = await desktopImage();
  const farm = new TestFarm({
    settings: {
      "hkd.poll_interval": "2",
      "hkd.heartbeat_interval": "1",
      "hkd.vma_check_interval": "2",
      "hkd.timeout.vma_start": "60",
      "hkd.fence_after": "6",
      "cluster.lost_after": String(LOST_AFTER),
      "cluster.alive_within": "5",
      "l7r.timeout.vm_start": "120",
      "log.level": "info",
    },
  });
  try {
    const t0 = performance.now();
    await farm.start({ replica: true });
    console.log(`farm up (3 nodes, database with a replica) in ${s(performance.now() - t0)}`);
    const sql = () => farm.sql;
    const osf = await D.create(sql(), D.osfs, ALL, { tenant_id: 1, name: "debian", memory_mb: 1024 });
    await farm.addImage(osf.id, "desktop.tar.gz", async (p) => copyFileSync(image, p));
    const user = await D.create(sql(), D.users, ALL, { tenant_id: 1, name: "bench", password: PW });
    const vm = await D.createVm(
      sql(),
      ALL,
      { user_id: user.id, osf_id: osf.id, name: "bench-desktop" },
      { range: "198.18.0.0/16" },
    );
    const [a, b, c] = farm.nodes as [FarmNode, FarmNode, FarmNode];
    const released = () =>
      until(
        async () =>
          (await sql()`SELECT user_state FROM vm_runtimes WHERE vm_id = ${vm.id}`)[0]!.user_state === "disconnected",
        "the session to be released",
        30_000,
      );
    const connect101 = async (node: FarmNode, untilMs = 240_000) => {
      const end = Date.now() + untilMs;
      for (;;) {
        const r = await farm.connect(node, "bench", PW, vm.id).catch(() => undefined);
        r?.close();
        if (r?.status === 101) return r;
        if (Date.now() > end) throw new Error(`no 101 through node ${node.name}`);
        await Bun.sleep(200);
      }
    };

    // 1. The desktop on node A (the others drained while it starts); the first connect starts it.
    await sql()`UPDATE host_runtimes SET drain = true WHERE host_id <> ${a.host!.id}`;
    const first = await connect101(a);
    await sql()`UPDATE host_runtimes SET drain = false`;
    const startMs = first.ms101;
    console.log(`first connect (desktop stopped → started on node A → 101): ${s(startMs)}`);
    await released();
    const same: number[] = [];
    const other: number[] = [];
    for (let i = 0; i < CONNECTS; i++) {
      for (const [node, into] of [
        [a, same],
        [c, other],
      ] as const) {
        const r = await connect101(node, 30_000);
        into.push(r.ms101);
        await released();
      }
    }
    console.log(`connect → 101, running desktop on node A, ${CONNECTS} each:`);
    console.log(`  through node A's own L7R:   median ${ms(q(same, 0.5))}, p90 ${ms(q(same, 0.9))}`);
    console.log(
      `  through node C's L7R (hop): median ${ms(q(other, 0.5))}, p90 ${ms(q(other, 0.9))}  (hop adds ${ms(q(other, 0.5) - q(same, 0.5))}; aim < 10 ms)`,
    );

    // 2. Node A dies.
    const k0 = performance.now();
    await a.kill();
    await a.cut();
    await connect101(b, 300_000);
    const failover = performance.now() - k0;
    const where = (await farm.nodeOfVm(vm.id))?.name;
    console.log(
      `node A killed → desktop back through node B (now on node ${where}): ${s(failover)}  (aim: lost_after ${LOST_AFTER} s + start ${s(startMs)} + 2 s = ${s(LOST_AFTER * 1000 + startMs + 2000)})`,
    );
    await released();

    // 3. The database fails over.
    const { stoppedAt, promotedAt } = await farm.failover();
    await connect101(b, 120_000);
    const back = performance.now();
    console.log(
      `database primary stopped → replica promoted: ${s(promotedAt - stoppedAt)}; promoted → a connect served again: ${s(back - promotedAt)}  (aim: promotion + 2 s)`,
    );
  } finally {
    await farm.stop();
    await removeQvdBinary();
  }
}

async function placementPart(): Promise<void> {
  console.log("placement: a SYNTHETIC database with 1,000 nodes and 100,000 VMs (rows only, no nodes run)…");
  const r = await benchPlacement({ nodes: 1000, vms: 100_000 }); // bench/farm.ts
  console.log(`  one placement decision (placeVm, 200 timed): median ${ms(r.median)}, p99 ${ms(r.p99)}  (aim < 5 ms)`);
  console.log(`  full scans in its plan: ${r.seqScans.length ? r.seqScans.join("; ") : "none"}`);
}

const only = process.argv.includes("--placement-only");
if (!only && !process.argv.includes("--skip-farm")) await farmPart();
await placementPart();
process.exit(0);
