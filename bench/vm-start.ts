// Desktop start benchmark on a real node: the Debian image of `qvd di build`, `qvd hkd` in a
// network namespace of its own, real LXC. Prints, over N cold starts (the container not
// running; the image already unpacked after the first start, which is reported apart):
//   - start command → `running` (the VMA answers), median and p90;
//   - start command → nxagent listening (after x_start), median and p90;
// and the memory one idle desktop (container, VMA, nxagent, session) costs the node.
// Prints figures; asserts nothing. Run as root: bun bench/vm-start.ts [--starts 10]
import { chmodSync, copyFileSync, mkdtempSync, readFileSync, readdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import * as D from "../src/db/index.ts";
import { LocalCluster } from "../src/db/local-cluster.ts";
import { connect } from "../src/db/pool.ts";
import { initDatabase } from "../src/db/schema.ts";
import { setLogLevel } from "../src/log.ts";
import { run } from "../src/run.ts";
import { desktopImage, TestNode } from "../test/support/node.ts";

setLogLevel("warn");
const STARTS = Number(process.argv[process.argv.indexOf("--starts") + 1]) || 10;
const ALL = D.ALL_TENANTS;
const dir = mkdtempSync("/tmp/qvd-bench-vm-");
chmodSync(dir, 0o755);
const cluster = new LocalCluster({ dir, noSync: true, settings: { fsync: "off", synchronous_commit: "off" } });
await cluster.init();
await cluster.start();
await cluster.createDatabase("bench");
const url = cluster.url("bench");
const sql = connect(url, { max: 4 });
const node = new TestNode(() => ({ name: "bench", url, sql, cluster: cluster as never }), "benchnode");

const poll = async (pred: () => Promise<boolean>, what: string, ms = 120_000) => {
  const end = Date.now() + ms;
  while (!(await pred())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(10);
  }
};
const q = (xs: number[], p: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(p * xs.length))]!;

try {
  await initDatabase(sql, { adminPassword: "bench-admin-pw" });
  const image = await desktopImage();
  await node.setup();
  const user = await D.create(sql, D.users, ALL, { tenant_id: 1, name: "alice" });
  const osf = await D.create(sql, D.osfs, ALL, { tenant_id: 1, name: "debian", memory_mb: 1024 });
  await node.addImage(osf.id, "desktop.tar.gz", async (p) => copyFileSync(image, p));
  const vm = await D.createVm(sql, ALL, { user_id: user.id, osf_id: osf.id, name: "desktop" }, { range: "198.18.0.0/16" });
  await node.start({ "hkd.timeout.vma_start": "120", "log.level": "info" });

  const state = async () => (await D.get(sql, D.vms, ALL, vm.id)).vm_state;
  const vma = async (method: string, body?: unknown) => {
    const [r] = await sql`SELECT vma_secret FROM vm_runtimes WHERE vm_id = ${vm.id}`;
    const args = ["curl", "-s", "--max-time", "10", "-H", `x-qvd-vma-secret: ${r!.vma_secret}`];
    if (body !== undefined) args.push("-H", "content-type: application/json", "-d", JSON.stringify(body));
    return JSON.parse((await run([...node.ns.exec, ...args, `http://${vm.ip}:3030/vma/${method}`])).stdout || "{}");
  };

  const toRunning: number[] = [];
  const toListening: number[] = [];
  let first = 0;
  let memory = "";
  for (let i = 0; i <= STARTS; i++) {
    const t0 = performance.now();
    await D.startVm(sql, ALL, vm.id, { aliveWithinS: 60 });
    await poll(async () => (await state()) === "running", "running");
    const running = performance.now() - t0;
    await vma("x_start", { user: "alice", uid: 20001, gid: 20001, cookie: "0123456789abcdef0123456789abcdef" }); // identity.uid.min; the NX cookie
    await poll(async () => (await vma("x_state")).state === "listening", "listening");
    const listening = performance.now() - t0;
    if (i === 0) first = running;
    else {
      toRunning.push(running);
      toListening.push(listening);
    }
    if (i === STARTS) memory = await desktopMemory(vm.id);
    await D.stopVm(sql, ALL, vm.id);
    await poll(async () => (await state()) === "stopped", "stopped");
  }
  console.log(`first start (image unpacked on the way): ${(first / 1000).toFixed(2)} s to running`);
  console.log(`start command → running (VMA answers): median ${(q(toRunning, 0.5) / 1000).toFixed(2)} s, p90 ${(q(toRunning, 0.9) / 1000).toFixed(2)} s over ${STARTS} cold starts`);
  console.log(`start command → nxagent listening:     median ${(q(toListening, 0.5) / 1000).toFixed(2)} s, p90 ${(q(toListening, 0.9) / 1000).toFixed(2)} s`);
  console.log(`one idle desktop (session started, no client): ${memory}`);
} finally {
  await node.stop().catch((e) => console.error(`node cleanup: ${e}`));
  await sql.end({ timeout: 5 });
  await cluster.stop("immediate").catch(() => {});
  rmSync(dir, { recursive: true, force: true });
}

/** Memory of a running desktop: the RSS of its processes and its memory cgroup's usage. */
async function desktopMemory(vmId: number): Promise<string> {
  const info = (await run([...node.ns.exec, "lxc-info", "-n", `qvd-${vmId}`, "-P", node.lxcPath, "-p", "-H"])).stdout.trim();
  const init = Number(info);
  const cg = readFileSync(`/proc/${init}/cgroup`, "utf8").split("\n").find((l) => l.split(":")[1]?.split(",").includes("memory"));
  const cgDir = cg ? `/sys/fs/cgroup/memory${cg.split(":")[2]}` : "";
  let usage = NaN;
  let pids: number[] = [];
  try {
    usage = Number(readFileSync(join(cgDir, "memory.usage_in_bytes"), "utf8"));
    pids = readFileSync(join(cgDir, "cgroup.procs"), "utf8").split("\n").filter(Boolean).map(Number);
  } catch {
    pids = readdirSync("/proc").filter((p) => /^\d+$/.test(p)).map(Number);
  }
  let rss = 0;
  const names: string[] = [];
  for (const pid of pids) {
    try {
      const status = readFileSync(`/proc/${pid}/status`, "utf8");
      rss += Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0) * 1024;
      names.push(/Name:\s+(\S+)/.exec(status)?.[1] ?? "?");
    } catch {}
  }
  const mib = (b: number) => `${(b / 1024 / 1024).toFixed(0)} MiB`;
  return `RSS of its ${pids.length} processes ${mib(rss)} (${[...new Set(names)].join(", ")}); memory cgroup usage ${Number.isNaN(usage) ? "n/a" : mib(usage)} (includes page cache)`;
}
