// Desktop start benchmark on a real node: `qvd hkd` in a network namespace of its own, running
// LXC (the Debian image of `qvd di build`) and, unless --kvm-starts 0, KVM too (the image of
// `qvd di build --kvm`, vm.hypervisor = lxc,kvm). Prints, per backend, over N cold starts (the
// desktop not running; what the first start prepares once, the unpacked image or the extracted
// kernel and the new home disk, is reported apart):
//   - start command → `running` (the VMA answers), median and p90;
//   - start command → nxagent listening (after x_start), median and p90;
// and the memory one idle desktop costs the node: LXC, its processes and memory cgroup; KVM,
// QEMU's RSS and PSS after the VM settled. KVM figures come with the accelerator the node's
// probe chose (host_runtimes.hypervisor_notes): tcg is software emulation.
// Prints figures; asserts nothing. Run as root:
//   bun bench/vm-start.ts [--starts 10] [--kvm-starts 3]
import { chmodSync, copyFileSync, linkSync, mkdtempSync, readFileSync, readdirSync, rmSync } from "node:fs";
import { loadavg } from "node:os";
import { join } from "node:path";
import * as D from "../src/db/index.ts";
import { LocalCluster } from "../src/db/local-cluster.ts";
import { connect } from "../src/db/pool.ts";
import { initDatabase } from "../src/db/schema.ts";
import { setLogLevel } from "../src/log.ts";
import { run } from "../src/run.ts";
import { desktopImage, TestNode } from "../test/support/node.ts";
import { kvmTestImage } from "../test/support/kvm-image.ts";

setLogLevel("warn");
/** `--name N`: a count ≥ 0 (0 is kept: --kvm-starts 0 leaves KVM out). */
const count = (name: string, fallback: number) => {
  const i = process.argv.indexOf(name);
  if (i < 0) return fallback;
  const n = Number(process.argv[i + 1]);
  if (!Number.isInteger(n) || n < 0) {
    console.error(`${name} wants a whole number ≥ 0, not ${JSON.stringify(process.argv[i + 1] ?? "")}`);
    process.exit(2);
  }
  return n;
};
const STARTS = count("--starts", 10) || 1;
// A boot under tcg takes about 40 s: few starts by default.
const KVM_STARTS = count("--kvm-starts", 3);
// The VM settles (boot-time services finish, the guest kernel frees its init memory) before QEMU's memory is read.
const KVM_SETTLE_MS = 20_000;
// The machine is shared: measure when it is not already busy (up to 10 minutes of waiting).
const BUSY_LOAD = 3;
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
const q = (xs: number[], p: number) =>
  [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(p * xs.length))]!;
const s = (ms: number) => `${(ms / 1000).toFixed(2)} s`;
const load = () =>
  loadavg()
    .map((l) => l.toFixed(2))
    .join(" ");
const mib = (b: number) => `${(b / 1024 / 1024).toFixed(0)} MiB`;

async function waitQuiet(): Promise<void> {
  const end = Date.now() + 600_000;
  if (loadavg()[0]! > BUSY_LOAD)
    console.log(`load average ${load()}: waiting for it to drop below ${BUSY_LOAD} (10 minutes at most)`);
  while (loadavg()[0]! > BUSY_LOAD && Date.now() < end) await Bun.sleep(5_000);
}

interface Figures {
  first: number;
  toRunning: number[];
  toListening: number[];
  memory: string;
  loadBefore: string;
  loadAfter: string;
}

/**
 * 1 + `starts` cold starts of desktop `vm` (owned by `user`, uid `uid` in its sessions): start
 * command → running → x_start → nxagent listening, then a stop. `memory` is read at the last start.
 */
async function measure(
  vm: D.VmRow,
  user: string,
  uid: number,
  starts: number,
  o: { upMs: number; downMs: number; memory: () => Promise<string> },
): Promise<Figures> {
  const state = async () => (await D.get(sql, D.vms, ALL, vm.id)).vm_state;
  const vma = async (method: string, body?: unknown) => {
    const [r] = await sql`SELECT vma_secret FROM vm_runtimes WHERE vm_id = ${vm.id}`;
    const args = ["curl", "-s", "--max-time", "10", "-H", `x-qvd-vma-secret: ${r!.vma_secret}`];
    if (body !== undefined) args.push("-H", "content-type: application/json", "-d", JSON.stringify(body));
    return JSON.parse(
      (await run([...node.ns.exec, ...args, `http://${vm.ip}:3030/vma/${method}`], { allowFail: true })).stdout || "{}",
    );
  };
  await waitQuiet();
  const f: Figures = { first: 0, toRunning: [], toListening: [], memory: "", loadBefore: load(), loadAfter: "" };
  for (let i = 0; i <= starts; i++) {
    const t0 = performance.now();
    await D.startVm(sql, ALL, vm.id, { aliveWithinS: 60 });
    await poll(async () => (await state()) === "running", "running", o.upMs);
    const running = performance.now() - t0;
    await vma("x_start", { user, uid, gid: uid, cookie: "0123456789abcdef0123456789abcdef" }); // identity.uid.min and up; the NX cookie
    await poll(async () => (await vma("x_state")).state === "listening", "listening", o.upMs);
    const listening = performance.now() - t0;
    if (i === 0) f.first = running;
    else {
      f.toRunning.push(running);
      f.toListening.push(listening);
    }
    if (i === starts) f.memory = await o.memory();
    await D.stopVm(sql, ALL, vm.id);
    await poll(async () => (await state()) === "stopped", "stopped", o.downMs);
  }
  f.loadAfter = load();
  return f;
}

function report(f: Figures, starts: number, firstWhat: string, memoryWhat: string) {
  console.log(`  first start (${firstWhat}): ${s(f.first)} to running`);
  console.log(
    `  start command → running (VMA answers): median ${s(q(f.toRunning, 0.5))}, p90 ${s(q(f.toRunning, 0.9))} over ${starts} cold starts`,
  );
  console.log(
    `  start command → nxagent listening:     median ${s(q(f.toListening, 0.5))}, p90 ${s(q(f.toListening, 0.9))}`,
  );
  console.log(`  ${memoryWhat}: ${f.memory}`);
  console.log(`  load average (1, 5, 15 min) before: ${f.loadBefore}; after: ${f.loadAfter}`);
}

try {
  await initDatabase(sql, { adminPassword: "bench-admin-pw" });
  const image = await desktopImage();
  const kvmImage = KVM_STARTS > 0 ? await kvmTestImage() : "";
  await node.setup();
  if (KVM_STARTS > 0) {
    const { ensureDeps } = await import("../scripts/deps.ts");
    await ensureDeps(["qemu-system", "qemu-img", "e2fsprogs"], () => {});
  }
  const alice = await D.create(sql, D.users, ALL, { tenant_id: 1, name: "alice" });
  const osf = await D.create(sql, D.osfs, ALL, { tenant_id: 1, name: "debian", memory_mb: 1024 });
  await node.addImage(osf.id, "desktop.tar.gz", async (p) => copyFileSync(image, p));
  const vm = await D.createVm(
    sql,
    ALL,
    { user_id: alice.id, osf_id: osf.id, name: "desktop" },
    { range: "198.18.0.0/16" },
  );
  let kvm: { vm: D.VmRow; osf: D.OsfRow } | undefined;
  if (KVM_STARTS > 0) {
    const bob = await D.create(sql, D.users, ALL, { tenant_id: 1, name: "bob" });
    const kosf = await D.create(sql, D.osfs, ALL, {
      tenant_id: 1,
      name: "debian-kvm",
      memory_mb: 1024,
      hypervisor: "kvm",
      vcpus: 1,
      user_storage_mb: 256,
    });
    // A link where the filesystem allows it: the image is half a gigabyte.
    await node.addImage(kosf.id, "desktop.qcow2", async (p) => {
      try {
        linkSync(kvmImage, p);
      } catch {
        copyFileSync(kvmImage, p);
      }
    });
    kvm = {
      vm: await D.createVm(
        sql,
        ALL,
        { user_id: bob.id, osf_id: kosf.id, name: "desktop-kvm" },
        { range: "198.18.0.0/16" },
      ),
      osf: kosf,
    };
  }
  await node.start({
    "vm.hypervisor": kvm ? "lxc,kvm" : "lxc",
    "vm.kvm.accel": "auto",
    "hkd.timeout.vma_start": kvm ? "400" : "120",
    "log.level": "info",
  });

  const lxc = await measure(vm, "alice", 20001, STARTS, {
    upMs: 120_000,
    downMs: 120_000,
    memory: () => desktopMemory(vm.id),
  });
  console.log(`LXC (${STARTS} cold starts):`);
  report(lxc, STARTS, "image unpacked on the way", "one idle desktop (session started, no client)");

  if (kvm) {
    const [h] = await sql`SELECT hypervisor_notes FROM host_runtimes WHERE host_id = ${node.host.id}`;
    const notes = String(h!.hypervisor_notes);
    const probe = /(?:^|; )kvm: (.*?)(?=; lxc: |$)/.exec(notes)?.[1] ?? notes;
    let accel = "";
    const k = await measure(kvm.vm, "bob", 20002, KVM_STARTS, {
      upMs: 600_000,
      downMs: 300_000,
      memory: async () => {
        accel = qemuAccel(kvm!.vm.id);
        return qemuMemory(kvm!.vm.id, kvm!.osf.memory_mb);
      },
    });
    console.log(
      `KVM (${KVM_STARTS} cold starts, ${kvm.osf.vcpus} vCPU, ${kvm.osf.memory_mb} MiB, home disk ${kvm.osf.user_storage_mb} MiB; QEMU ran with accel=${accel || "?"}; the node's probe: "${probe}"):`,
    );
    if (accel !== "kvm")
      console.log("  (tcg is software emulation: boots are several times slower than with KVM acceleration)");
    report(
      k,
      KVM_STARTS,
      "kernel extracted from the image, home disk made and formatted",
      `one idle desktop after ${KVM_SETTLE_MS / 1000} s settled (session started, no client)`,
    );
  }
} finally {
  await node.stop().catch((e) => console.error(`node cleanup: ${e}`));
  await sql.end({ timeout: 5 });
  await cluster.stop("immediate").catch(() => {});
  rmSync(dir, { recursive: true, force: true });
}

/** Memory of a running desktop: the RSS of its processes and its memory cgroup's usage. */
async function desktopMemory(vmId: number): Promise<string> {
  const info = (
    await run([...node.ns.exec, "lxc-info", "-n", `qvd-${vmId}`, "-P", node.lxcPath, "-p", "-H"])
  ).stdout.trim();
  const init = Number(info);
  const cg = readFileSync(`/proc/${init}/cgroup`, "utf8")
    .split("\n")
    .find((l) => l.split(":")[1]?.split(",").includes("memory"));
  const cgDir = cg ? `/sys/fs/cgroup/memory${cg.split(":")[2]}` : "";
  let usage = NaN;
  let pids: number[] = [];
  try {
    usage = Number(readFileSync(join(cgDir, "memory.usage_in_bytes"), "utf8"));
    pids = readFileSync(join(cgDir, "cgroup.procs"), "utf8").split("\n").filter(Boolean).map(Number);
  } catch {
    pids = readdirSync("/proc")
      .filter((p) => /^\d+$/.test(p))
      .map(Number);
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
  return `RSS of its ${pids.length} processes ${mib(rss)} (${[...new Set(names)].join(", ")}); memory cgroup usage ${Number.isNaN(usage) ? "n/a" : mib(usage)} (includes page cache)`;
}

/** The QEMU of desktop `vmId` (the node's pid file, checked by process name). */
function qemuPid(vmId: number): number {
  const pid = Number(readFileSync(join(node.kvmPath, `qvd-${vmId}`, "qemu.pid"), "utf8").trim());
  if (!node.qemuPids().includes(pid)) throw new Error(`no QEMU runs for desktop ${vmId}`);
  return pid;
}

/** The accelerator QEMU runs with, from its command line (`-machine …,accel=X`). */
function qemuAccel(vmId: number): string {
  const argv = readFileSync(`/proc/${qemuPid(vmId)}/cmdline`, "utf8").split("\0");
  const machine = argv[argv.indexOf("-machine") + 1] ?? "";
  return /accel=(\w+)/.exec(machine)?.[1] ?? (argv.includes("-accel") ? argv[argv.indexOf("-accel") + 1]! : "");
}

/** QEMU's memory once the VM settled: RSS (VmRSS) and PSS (its shared pages split among their users). */
async function qemuMemory(vmId: number, memoryMb: number): Promise<string> {
  await Bun.sleep(KVM_SETTLE_MS);
  const pid = qemuPid(vmId);
  const kb = (text: string, field: string) =>
    Number(new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(text)?.[1] ?? NaN) * 1024;
  const rss = kb(readFileSync(`/proc/${pid}/status`, "utf8"), "VmRSS");
  const pss = kb(readFileSync(`/proc/${pid}/smaps_rollup`, "utf8"), "Pss");
  // Where it goes: the guest's RAM is the read-write mapping of exactly the VM's memory size (what
  // the guest touched); under tcg, the translated code is an anonymous rwx mapping (1 GiB by default).
  let ram = 0;
  let code = 0;
  for (const m of readFileSync(`/proc/${pid}/smaps`, "utf8").split(/\n(?=[0-9a-f]+-[0-9a-f]+ )/)) {
    const [, perms, , , inode] = m.split("\n")[0]!.split(/\s+/);
    if (perms === "rw-p" && kb(m, "Size") === memoryMb * 1024 * 1024) ram += kb(m, "Rss");
    else if (perms === "rwxp" && inode === "0") code += kb(m, "Rss");
  }
  return `QEMU's RSS ${mib(rss)} (guest RAM touched ${mib(ram)}, tcg translated code ${mib(code)}, the rest ${mib(rss - ram - code)}), PSS ${mib(pss)}`;
}
