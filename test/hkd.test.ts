// The HKD for real: a compiled `qvd hkd` inside a network namespace of this test, real LXC,
// real PostgreSQL, the VMA as the containers' init. Desktops start and stop on commands written
// to the database, homes persist, failures block VMs with a reason, and an HKD killed with
// SIGKILL reconciles without duplicates when it comes back.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import * as D from "../src/db/index.ts";
import { run } from "../src/run.ts";
import { useTestDatabase } from "./support/db.ts";
import { busyboxImage, cleanEnv, TestNode, until } from "./support/node.ts";

const isRoot = process.getuid?.() === 0;
const db = useTestDatabase();
const ALL = D.ALL_TENANTS;

describe.skipIf(!isRoot)("HKD with LXC", () => {
  const node = new TestNode(db);
  let vm: D.VmRow;
  const sql = () => db().sql;
  const vmState = async (id: number) => (await D.get(sql(), D.vms, ALL, id)).vm_state;
  const untilState = (id: number, state: string, ms = 60_000) =>
    until(async () => (await vmState(id)) === state, `vm ${id} to be ${state}`, ms);
  const startCommand = (id: number) => D.startVm(sql(), ALL, id, { aliveWithinS: 60 });
  const curl = (args: string[]) =>
    run([...node.ns.exec, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", ...args], {
      allowFail: true,
    });

  beforeAll(async () => {
    await node.setup();
    const user = await D.create(sql(), D.users, ALL, { tenant_id: 1, name: "alice" });
    const osf = await D.create(sql(), D.osfs, ALL, { tenant_id: 1, name: "busybox", memory_mb: 128 });
    await node.addImage(osf.id, "busybox.tar.gz", busyboxImage);
    vm = await D.createVm(sql(), ALL, { user_id: user.id, osf_id: osf.id, name: "desk" }, { range: "198.18.0.0/16" });
    await node.start();
  }, 600_000);

  afterAll(async () => {
    await node.stop();
  }, 120_000);

  test("a start command runs the desktop: container up, VMA answering only with its secret, DB running", async () => {
    await startCommand(vm.id);
    await untilState(vm.id, "running");
    const row = await D.get(sql(), D.vms, ALL, vm.id);
    expect(row.host_id).toBe(node.host.id);
    expect(row.vm_address).toBe(vm.ip);
    expect(await node.containers()).toEqual([`qvd-${vm.id}`]);
    const [{ vma_secret }] = (await sql()`SELECT vma_secret FROM vm_runtimes WHERE vm_id = ${vm.id}`) as unknown as [
      { vma_secret: string },
    ];
    expect((await curl(["-H", `x-qvd-vma-secret: ${vma_secret}`, `http://${vm.ip}:3030/vma/ping`])).stdout).toBe("200");
    expect((await curl([`http://${vm.ip}:3030/vma/ping`])).stdout).toBe("403");
    expect((await curl(["-H", "x-qvd-vma-secret: wrong", `http://${vm.ip}:3030/vma/ping`])).stdout).toBe("403");
    const [c] = await sql()`SELECT run_attempts::int, run_ok::int FROM vm_counters WHERE vm_id = ${vm.id}`;
    expect([c!.run_attempts, c!.run_ok]).toEqual([1, 1]);
  });

  test("the home persists across stop and start; a stop leaves no container, veth or overlay", async () => {
    expect((await node.attach(vm.id, "echo kept > /home/alice/note.txt")).status).toBe(0);
    const onHost = join(node.root, "storage", "homes", "default", "alice", "note.txt");
    expect(readFileSync(onHost, "utf8")).toBe("kept\n");
    expect((await node.attach(vm.id, "echo scratch > /root/scratch")).status).toBe(0);

    await D.stopVm(sql(), ALL, vm.id);
    await untilState(vm.id, "stopped");
    const row = await D.get(sql(), D.vms, ALL, vm.id);
    expect([row.host_id, row.vm_address, row.current_di_id]).toEqual([null, null, null]);
    expect(await node.containers()).toEqual([]);
    expect(await node.links()).not.toContain(`qvd${vm.id}`);
    expect(existsSync(join(node.root, "storage", "overlays", String(vm.id), "upper", "root", "scratch"))).toBe(false);
    expect(readFileSync("/proc/mounts", "utf8")).not.toContain(node.root);
    expect(await node.cgroupsOf(vm.id)).toEqual([]);

    await startCommand(vm.id);
    await untilState(vm.id, "running");
    expect((await node.attach(vm.id, "cat /home/alice/note.txt")).stdout).toBe("kept\n");
    // The writable layer was not persistent: the scratch file is gone.
    expect((await node.attach(vm.id, "test -e /root/scratch && echo there || echo gone")).stdout.trim()).toBe("gone");
  });

  test("an HKD killed with SIGKILL comes back and adopts its running desktop: no duplicate, still stoppable", async () => {
    expect(await vmState(vm.id)).toBe("running");
    await node.kill("SIGKILL");
    expect(await node.containers()).toEqual([`qvd-${vm.id}`]); // desktops outlive their HKD
    await node.start();
    expect(await node.containers()).toEqual([`qvd-${vm.id}`]);
    expect(await vmState(vm.id)).toBe("running");
    // A second HKD on the same node is refused while this one runs.
    const second = await run(
      [
        ...node.ns.exec,
        node.binary,
        "hkd",
        "--db",
        db().url,
        "--set",
        `path.run=${join(node.root, "run")}`,
        "--set",
        "nodename=testnode",
      ],
      { allowFail: true, timeoutMs: 30_000, env: cleanEnv() },
    );
    expect(second.status).not.toBe(0);
    expect(second.stderr).toContain("only one may run per node");
    await D.stopVm(sql(), ALL, vm.id);
    await untilState(vm.id, "stopped");
    expect(await node.containers()).toEqual([]);
  });

  test("a desktop that the database says stopped but runs is stopped at the HKD's start", async () => {
    await startCommand(vm.id);
    await untilState(vm.id, "running");
    await node.kill("SIGKILL");
    // Meanwhile someone (an administrator, another node's cluster monitor) cleared the row.
    await sql()`UPDATE vm_runtimes SET vm_state = 'stopped', host_id = NULL WHERE vm_id = ${vm.id}`;
    await node.start();
    await until(async () => (await node.containers()).length === 0, "the orphan container to be stopped", 30_000);
    expect(await vmState(vm.id)).toBe("stopped");
  });

  test("a desktop that died while its HKD was down is marked stopped, and its leftovers cleaned", async () => {
    await startCommand(vm.id);
    await untilState(vm.id, "running");
    await node.kill("SIGKILL");
    await run([...node.ns.exec, "lxc-stop", "-k", "-n", `qvd-${vm.id}`, "-P", node.lxcPath]);
    expect(existsSync(join(node.lxcPath, `qvd-${vm.id}`))).toBe(true); // its configuration is still there
    await node.start();
    expect(await vmState(vm.id)).toBe("stopped");
    expect(existsSync(join(node.lxcPath, `qvd-${vm.id}`))).toBe(false);
    expect(await node.links()).not.toContain(`qvd${vm.id}`);
  });

  test("a database outage shorter than hkd.fence_after stops no desktop", async () => {
    await startCommand(vm.id);
    await untilState(vm.id, "running");
    const initPid = async () =>
      (
        await run([...node.ns.exec, "lxc-info", "-n", `qvd-${vm.id}`, "-P", node.lxcPath, "-p", "-H"], {
          allowFail: true,
        })
      ).stdout.trim();
    const pid = await initPid();
    const failedBeats = () => readFileSync(node.logFile, "utf8").split("heartbeat failed").length - 1;
    const before = failedBeats();
    const logSize = readFileSync(node.logFile, "utf8").length;
    await db().cluster.pause();
    try {
      await until(() => failedBeats() >= before + 3, "three heartbeats to fail", 60_000);
    } finally {
      await db().cluster.resume();
    }
    const resumed = new Date(); // the server runs on this machine's clock
    const okTs = async () =>
      (await sql()`SELECT ok_ts FROM host_runtimes WHERE host_id = ${node.host.id}`)[0]!.ok_ts as Date;
    await until(async () => (await okTs().catch(() => resumed)) > resumed, "a heartbeat after the outage", 30_000);
    expect(await node.containers()).toEqual([`qvd-${vm.id}`]);
    expect(await initPid()).toBe(pid);
    expect(await vmState(vm.id)).toBe("running");
    expect(readFileSync(node.logFile, "utf8").slice(logSize)).not.toContain("fencing");
    await D.stopVm(sql(), ALL, vm.id);
    await untilState(vm.id, "stopped");
  });

  test("without the database for hkd.fence_after seconds, the node stops its desktops; back, it reconciles", async () => {
    await node.kill("SIGTERM");
    await node.start({ "hkd.fence_after": "5" });
    await startCommand(vm.id);
    await untilState(vm.id, "running");
    await db().cluster.pause();
    try {
      await until(async () => (await node.containers()).length === 0, "the node to fence itself", 60_000);
    } finally {
      await db().cluster.resume();
    }
    // The database still says running; the node corrects it when it can reach it again.
    await until(
      async () => {
        try {
          return (await vmState(vm.id)) === "stopped";
        } catch {
          return false; // the pool reconnects
        }
      },
      "the node to mark its fenced desktop stopped",
      60_000,
    );
    expect(await node.containers()).toEqual([]);
    expect(readFileSync(node.logFile, "utf8")).toContain("fencing: stopping every desktop of this node");
  });

  test("a broken image blocks the VM with a readable reason and leaves nothing running", async () => {
    const osf = await D.create(sql(), D.osfs, ALL, { tenant_id: 1, name: "broken", memory_mb: 128 });
    await node.addImage(osf.id, "broken.tar.gz", async (p) =>
      writeFileSync(p, Buffer.from("this is not a tarball at all")),
    );
    const user = await D.create(sql(), D.users, ALL, { tenant_id: 1, name: "bob" });
    const bad = await D.createVm(
      sql(),
      ALL,
      { user_id: user.id, osf_id: osf.id, name: "bad" },
      { range: "198.18.0.0/16" },
    );
    await startCommand(bad.id);
    await until(async () => (await D.get(sql(), D.vms, ALL, bad.id)).blocked, "the VM to be blocked");
    await untilState(bad.id, "stopped");
    const row = await D.get(sql(), D.vms, ALL, bad.id);
    expect(row.blocked_reason).toMatch(/^start failed: disk image .* cannot be used: /);
    expect(await node.containers()).toEqual([]);
    // A blocked VM cannot be started again until an administrator unblocks it.
    await expect(startCommand(bad.id)).rejects.toThrow("is blocked");
  });

  test("a desktop whose VMA never answers is stopped within the timeout and blocked", async () => {
    await node.kill("SIGTERM");
    // An image init that never starts the VMA.
    await node.start({ "vm.lxc.vma_init": "0", "vm.lxc.init": "/sbin/init.sh", "hkd.timeout.vma_start": "3" });
    await D.update(sql(), D.vms, ALL, vm.id, { description: "silent" });
    await startCommand(vm.id);
    await until(async () => (await D.get(sql(), D.vms, ALL, vm.id)).blocked, "the VM to be blocked", 60_000);
    await untilState(vm.id, "stopped");
    expect((await D.get(sql(), D.vms, ALL, vm.id)).blocked_reason).toContain("did not answer within 3 s");
    expect(await node.containers()).toEqual([]);
    expect(await node.links()).not.toContain(`qvd${vm.id}`);
  });

  test("with hkd.on_shutdown = leave, desktops outlive a stopped HKD and are adopted by the next", async () => {
    await node.kill("SIGTERM");
    await node.start({ "hkd.on_shutdown": "leave" });
    await D.setVmBlocked(sql(), ALL, vm.id, false);
    await startCommand(vm.id);
    await untilState(vm.id, "running");
    await node.kill("SIGTERM");
    expect(await node.containers()).toEqual([`qvd-${vm.id}`]);
    expect(await vmState(vm.id)).toBe("running");
    await node.start();
    expect(readFileSync(node.logFile, "utf8")).toContain(`adopted running desktop vm=${vm.id}`);
    await D.stopVm(sql(), ALL, vm.id);
    await untilState(vm.id, "stopped");
    expect(await node.containers()).toEqual([]);
  });

  test("stopping the HKD (hkd.on_shutdown = stop) stops its desktops and marks the node stopped", async () => {
    await node.kill("SIGTERM");
    await node.start();
    await startCommand(vm.id);
    await untilState(vm.id, "running");
    await node.kill("SIGTERM");
    expect(await vmState(vm.id)).toBe("stopped");
    expect(await node.containers()).toEqual([]);
    expect((await D.get(sql(), D.hosts, ALL, node.host.id)).state).toBe("stopped");
    expect(statSync(node.logFile).size).toBeGreaterThan(0);
  });
});
