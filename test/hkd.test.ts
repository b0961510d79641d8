// The HKD for real: a compiled `qvd hkd` inside a network namespace of this test, real LXC,
// real PostgreSQL, the VMA as the containers' init. Desktops start and stop on commands written
// to the database, homes persist, failures block VMs with a reason, and an HKD killed with
// SIGKILL reconciles without duplicates when it comes back.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { chmodSync, createWriteStream, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { createHash } from "node:crypto";
import { join } from "node:path";
import * as D from "../src/db/index.ts";
import { run } from "../src/run.ts";
import { ensureDeps } from "../scripts/deps.ts";
import { useTestDatabase } from "./support/db.ts";
import { busyboxImage, createNetns, qvdBinary, until, type Netns } from "./support/node.ts";

const isRoot = process.getuid?.() === 0;
const db = useTestDatabase();
const ALL = D.ALL_TENANTS;

describe.skipIf(!isRoot)("HKD with LXC", () => {
  let ns: Netns;
  let binary: string;
  let root: string;
  let host: D.HostRow;
  let vm: D.VmRow;
  let hkd: Bun.Subprocess | undefined;
  let logFile: string;
  const sql = () => db().sql;
  const lxcPath = () => join(root, "run", "lxc");

  /** The environment for a qvd child: no QVD_* settings leak in from the test's own. */
  const cleanEnv = () => Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("QVD_"))) as Record<string, string>;

  /** Starts `qvd hkd` in the namespace with the test's settings (and `extra`). */
  async function startHkd(extra: Record<string, string> = {}): Promise<void> {
    const settings: Record<string, string> = {
      nodename: "testnode",
      "path.run": join(root, "run"),
      "path.storage.root": join(root, "storage"),
      "vm.network.bridge": "qvdbr0",
      "hkd.poll_interval": "2",
      "hkd.heartbeat_interval": "1",
      "hkd.vma_check_interval": "2",
      "hkd.timeout.vma_start": "30",
      "hkd.qvd_binary": binary,
      "log.level": "debug",
      ...extra,
    };
    const argv = [...ns.exec, binary, "hkd", "--db", db().url, ...Object.entries(settings).flatMap(([k, v]) => ["--set", `${k}=${v}`])];
    const out = createWriteStream(logFile, { flags: "a" });
    hkd = Bun.spawn(argv, { stdout: "pipe", stderr: "pipe", env: cleanEnv() });
    for (const s of [hkd.stdout, hkd.stderr] as ReadableStream<Uint8Array>[])
      void (async () => {
        const reader = s.getReader();
        for (let c = await reader.read(); !c.done; c = await reader.read()) out.write(c.value);
      })();
    // Running, as reported by this very process (an earlier one may have left `running` behind).
    const ready = async () => {
      const [r] = await sql()`SELECT state, pid FROM host_runtimes WHERE host_id = ${host.id}`;
      return r!.state === "running" && r!.pid === hkd!.pid;
    };
    await until(async () => (await ready()) || hkd!.exitCode !== null, "the node to be running");
    if (hkd.exitCode !== null) throw new Error(`qvd hkd exited with ${hkd.exitCode}:\n${readFileSync(logFile, "utf8").slice(-3000)}`);
  }

  async function stopHkd(signal: "SIGTERM" | "SIGKILL" = "SIGTERM"): Promise<void> {
    if (!hkd) return;
    hkd.kill(signal);
    await hkd.exited;
    hkd = undefined;
  }

  const containers = async () =>
    (await run([...ns.exec, "lxc-ls", "-P", lxcPath(), "--running", "-1"], { allowFail: true })).stdout.split("\n").filter(Boolean);
  const links = async () => (await run(["ip", "-n", ns.name, "-o", "link", "show"])).stdout;
  const attach = (vmId: number, script: string) =>
    run([...ns.exec, "lxc-attach", "-n", `qvd-${vmId}`, "-P", lxcPath(), "--", "/bin/sh", "-c", script], { allowFail: true, timeoutMs: 20_000 });
  const vmState = async (id: number) => (await D.get(sql(), D.vms, ALL, id)).vm_state;
  const untilState = (id: number, state: string, ms = 60_000) => until(async () => (await vmState(id)) === state, `vm ${id} to be ${state}`, ms);
  const startCommand = (id: number) => D.startVm(sql(), ALL, id, { heartbeatWithinS: 60 });
  const curl = (args: string[]) => run([...ns.exec, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", ...args], { allowFail: true });

  /** An image file in the images folder, registered in the database as uploaded. */
  async function image(osfId: number, file: string, write: (path: string) => Promise<void>): Promise<D.DiRow> {
    const path = join(root, "storage", "images", file);
    await write(path);
    const bytes = readFileSync(path);
    const di = await D.create(sql(), D.dis, ALL, { osf_id: osfId, path: file });
    await D.finishDiUpload(sql(), di.id, bytes.length, createHash("sha256").update(bytes).digest("hex"));
    return di;
  }

  beforeAll(async () => {
    await ensureDeps(["lxc", "iproute2", "nftables", "nsenter", "busybox"], () => {});
    binary = await qvdBinary();
    ns = await createNetns();
    root = mkdtempSync("/tmp/qvd-test-hkd-");
    chmodSync(root, 0o755);
    mkdirSync(join(root, "storage", "images"), { recursive: true });
    logFile = join(root, "hkd.log");
    host = await D.create(sql(), D.hosts, ALL, { name: "testnode", address: "198.18.0.1" });
    const user = await D.create(sql(), D.users, ALL, { tenant_id: 1, name: "alice" });
    const osf = await D.create(sql(), D.osfs, ALL, { tenant_id: 1, name: "busybox", memory_mb: 128 });
    await image(osf.id, "busybox.tar.gz", busyboxImage);
    vm = await D.createVm(sql(), ALL, { user_id: user.id, osf_id: osf.id, name: "desk" }, { range: "198.18.0.0/16" });
    await startHkd();
  }, 600_000);

  afterAll(async () => {
    await stopHkd("SIGTERM").catch(() => {});
    if (ns) {
      for (const c of await containers().catch(() => [])) await run([...ns.exec, "lxc-stop", "-k", "-n", c, "-P", lxcPath()], { allowFail: true });
      await ns.remove();
    }
    if (process.env.KEEP_TEST_LOGS) console.log(`hkd log: ${logFile}`);
    else if (root) rmSync(root, { recursive: true, force: true });
  }, 120_000);

  test("a start command runs the desktop: container up, VMA answering only with its secret, DB running", async () => {
    await startCommand(vm.id);
    await untilState(vm.id, "running");
    const row = await D.get(sql(), D.vms, ALL, vm.id);
    expect(row.host_id).toBe(host.id);
    expect(row.vm_address).toBe(vm.ip);
    expect(await containers()).toEqual([`qvd-${vm.id}`]);
    const [{ vma_secret }] = (await sql()`SELECT vma_secret FROM vm_runtimes WHERE vm_id = ${vm.id}`) as unknown as [{ vma_secret: string }];
    expect((await curl(["-H", `x-qvd-vma-secret: ${vma_secret}`, `http://${vm.ip}:3030/vma/ping`])).stdout).toBe("200");
    expect((await curl([`http://${vm.ip}:3030/vma/ping`])).stdout).toBe("403");
    expect((await curl(["-H", "x-qvd-vma-secret: wrong", `http://${vm.ip}:3030/vma/ping`])).stdout).toBe("403");
    const [c] = await sql()`SELECT run_attempts::int, run_ok::int FROM vm_counters WHERE vm_id = ${vm.id}`;
    expect([c!.run_attempts, c!.run_ok]).toEqual([1, 1]);
  });

  test("the home persists across stop and start; a stop leaves no container, veth or overlay", async () => {
    expect((await attach(vm.id, "echo kept > /home/alice/note.txt")).status).toBe(0);
    const onHost = join(root, "storage", "homes", "default", "alice", "note.txt");
    expect(readFileSync(onHost, "utf8")).toBe("kept\n");
    expect((await attach(vm.id, "echo scratch > /root/scratch")).status).toBe(0);

    await D.stopVm(sql(), ALL, vm.id);
    await untilState(vm.id, "stopped");
    const row = await D.get(sql(), D.vms, ALL, vm.id);
    expect([row.host_id, row.vm_address, row.current_di_id]).toEqual([null, null, null]);
    expect(await containers()).toEqual([]);
    expect(await links()).not.toContain(`qvd${vm.id}`);
    expect(existsSync(join(root, "storage", "overlays", String(vm.id), "upper", "root", "scratch"))).toBe(false);
    expect(readFileSync("/proc/mounts", "utf8")).not.toContain(root);

    await startCommand(vm.id);
    await untilState(vm.id, "running");
    expect((await attach(vm.id, "cat /home/alice/note.txt")).stdout).toBe("kept\n");
    // The writable layer was not persistent: the scratch file is gone.
    expect((await attach(vm.id, "test -e /root/scratch && echo there || echo gone")).stdout.trim()).toBe("gone");
  });

  test("an HKD killed with SIGKILL comes back and adopts its running desktop: no duplicate, still stoppable", async () => {
    expect(await vmState(vm.id)).toBe("running");
    await stopHkd("SIGKILL");
    expect(await containers()).toEqual([`qvd-${vm.id}`]); // desktops outlive their HKD
    await startHkd();
    expect(await containers()).toEqual([`qvd-${vm.id}`]);
    expect(await vmState(vm.id)).toBe("running");
    // A second HKD on the same node is refused while this one runs.
    const second = await run([...ns.exec, binary, "hkd", "--db", db().url, "--set", `path.run=${join(root, "run")}`, "--set", "nodename=testnode"], { allowFail: true, timeoutMs: 30_000, env: cleanEnv() });
    expect(second.status).not.toBe(0);
    expect(second.stderr).toContain("only one may run per node");
    await D.stopVm(sql(), ALL, vm.id);
    await untilState(vm.id, "stopped");
    expect(await containers()).toEqual([]);
  });

  test("a desktop that the database says stopped but runs is stopped at the HKD's start", async () => {
    await startCommand(vm.id);
    await untilState(vm.id, "running");
    await stopHkd("SIGKILL");
    // Meanwhile someone (an administrator, another node's cluster monitor) cleared the row.
    await sql()`UPDATE vm_runtimes SET vm_state = 'stopped', host_id = NULL WHERE vm_id = ${vm.id}`;
    await startHkd();
    await until(async () => (await containers()).length === 0, "the orphan container to be stopped", 30_000);
    expect(await vmState(vm.id)).toBe("stopped");
  });

  test("a broken image blocks the VM with a readable reason and leaves nothing running", async () => {
    const osf = await D.create(sql(), D.osfs, ALL, { tenant_id: 1, name: "broken", memory_mb: 128 });
    await image(osf.id, "broken.tar.gz", async (p) => writeFileSync(p, Buffer.from("this is not a tarball at all")));
    const user = await D.create(sql(), D.users, ALL, { tenant_id: 1, name: "bob" });
    const bad = await D.createVm(sql(), ALL, { user_id: user.id, osf_id: osf.id, name: "bad" }, { range: "198.18.0.0/16" });
    await startCommand(bad.id);
    await until(async () => (await D.get(sql(), D.vms, ALL, bad.id)).blocked, "the VM to be blocked");
    await untilState(bad.id, "stopped");
    const row = await D.get(sql(), D.vms, ALL, bad.id);
    expect(row.blocked_reason).toMatch(/^start failed: disk image .* cannot be used: /);
    expect(await containers()).toEqual([]);
    // A blocked VM cannot be started again until an administrator unblocks it.
    await expect(startCommand(bad.id)).rejects.toThrow("is blocked");
  });

  test("a desktop whose VMA never answers is stopped within the timeout and blocked", async () => {
    await stopHkd("SIGTERM");
    // An image init that never starts the VMA.
    await startHkd({ "vm.lxc.vma_init": "0", "vm.lxc.init": "/sbin/init.sh", "hkd.timeout.vma_start": "3" });
    await D.update(sql(), D.vms, ALL, vm.id, { description: "silent" });
    await startCommand(vm.id);
    await until(async () => (await D.get(sql(), D.vms, ALL, vm.id)).blocked, "the VM to be blocked", 60_000);
    await untilState(vm.id, "stopped");
    expect((await D.get(sql(), D.vms, ALL, vm.id)).blocked_reason).toContain("did not answer within 3 s");
    expect(await containers()).toEqual([]);
    expect(await links()).not.toContain(`qvd${vm.id}`);
  });

  test("stopping the HKD (hkd.on_shutdown = stop) stops its desktops and marks the node stopped", async () => {
    await stopHkd("SIGTERM");
    await startHkd();
    await D.setVmBlocked(sql(), ALL, vm.id, false);
    await startCommand(vm.id);
    await untilState(vm.id, "running");
    await stopHkd("SIGTERM");
    expect(await vmState(vm.id)).toBe("stopped");
    expect(await containers()).toEqual([]);
    expect((await D.get(sql(), D.hosts, ALL, host.id)).state).toBe("stopped");
    expect(statSync(logFile).size).toBeGreaterThan(0);
  });
});
