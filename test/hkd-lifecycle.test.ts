// The HKD runs one desktop's operations one after the other, against real LXC and PostgreSQL:
// the real HKD from the sources (test/support/hkd-harness.ts) in this test's network namespace,
// its real LXC backend wrapped so the test sees every backend call and can make a start or a
// cleanup fail on cue. Each test is one of the faults of the old, scattered lifecycle:
// a stop during a failing start tore down twice; a start claimed while a run existed was dropped;
// a zombie was never retried and could not be stopped; every claimed start ran at once.
import { afterAll, afterEach, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import * as D from "../src/db/index.ts";
import { useTestDatabase } from "./support/db.ts";
import { busyboxImage, TestNode } from "./support/node.ts";
import { until } from "./support/wait.ts";

const isRoot = process.getuid?.() === 0;
const db = useTestDatabase();
const ALL = D.ALL_TENANTS;
const HARNESS = new URL("./support/hkd-harness.ts", import.meta.url).pathname;

describe.skipIf(!isRoot)("one desktop's operations, one after the other", () => {
  const node = new TestNode(db);
  let vm: D.VmRow;
  let vm2: D.VmRow;
  let cues: string;
  const sql = () => db().sql;
  const row = async (id: number) =>
    (await sql()`SELECT vm_state, vm_cmd, host_id, vma_secret, blocked FROM vm_runtimes WHERE vm_id = ${id}`)[0]!;
  const untilState = (id: number, state: string, ms = 60_000) =>
    until(async () => (await row(id)).vm_state === state, `vm ${id} to be ${state}`, ms);
  const requestStart = async (id: number) => expect(await D.requestStart(sql(), id, node.host.id)).toBe(true);
  const cue = (name: string) => join(cues, name);
  const calls = () => (existsSync(cue("calls")) ? readFileSync(cue("calls"), "utf8").trim().split("\n") : []);
  /** Backend calls `call` for `vmId` after the first `after` line. */
  const callsAfter = (after: string, call: string, vmId: number) => {
    const all = calls();
    return all.slice(all.indexOf(after) + 1).filter((c) => c === `${call} ${vmId}`).length;
  };
  const startHarness = (settings: Record<string, string> = {}) =>
    node.start(
      { "hkd.timeout.kill": "5", "hkd.timeout.poweroff": "5", ...settings },
      { command: [process.execPath, HARNESS], env: { HKD_TEST_CUES: cues } },
    );

  beforeAll(async () => {
    await node.setup();
    cues = join(node.root, "cues");
    mkdirSync(cues);
    const osf = await D.create(sql(), D.osfs, ALL, { tenant_id: 1, name: "busybox", memory_mb: 128 });
    await node.addImage(osf.id, "busybox.tar.gz", busyboxImage);
    const alice = await D.create(sql(), D.users, ALL, { tenant_id: 1, name: "alice" });
    const bob = await D.create(sql(), D.users, ALL, { tenant_id: 1, name: "bob" });
    vm = await D.createVm(sql(), ALL, { user_id: alice.id, osf_id: osf.id, name: "desk" }, { range: "198.18.0.0/16" });
    vm2 = await D.createVm(sql(), ALL, { user_id: bob.id, osf_id: osf.id, name: "desk2" }, { range: "198.18.0.0/16" });
    await startHarness({ "hkd.zombie_retry": "3600" });
  }, 600_000);

  afterAll(async () => {
    await node.stop();
  }, 120_000);

  // Each test starts from stopped, unblocked VMs and no cues, whatever the last one left.
  afterEach(async () => {
    for (const c of ["start-hold", "start-go", "cleanup-fail"]) rmSync(cue(c), { force: true });
    for (const v of [vm, vm2]) {
      await D.setVmBlocked(sql(), ALL, v.id, false);
      if ((await row(v.id)).vm_state === "stopped") continue;
      await D.stopVm(sql(), ALL, v.id).catch(() => {});
      await untilState(v.id, "stopped", 30_000).catch(() => {});
    }
  }, 120_000);

  test("a stop during a failing start tears the desktop down once", async () => {
    writeFileSync(cue("start-hold"), "");
    await requestStart(vm.id);
    await until(() => calls().includes(`start-held ${vm.id}`), "the start to be under way");
    await D.stopVm(sql(), ALL, vm.id);
    await until(async () => (await row(vm.id)).vm_cmd === null, "the node to take the stop");
    writeFileSync(cue("start-go"), ""); // the start fails now, with the stop waiting on it
    await untilState(vm.id, "stopped");
    await Bun.sleep(2000); // a check that nothing happens: no second teardown within 2 s
    expect(callsAfter(`start-failed ${vm.id}`, "cleanup", vm.id)).toBe(1);
    expect(await node.containers()).toEqual([]);
    const r = await D.get(sql(), D.vms, ALL, vm.id);
    expect([r.blocked, r.blocked_reason]).toEqual([
      true,
      "start failed: the container failed while starting (test cue)",
    ]);
  });

  test("a start claimed while the node still runs the VM's last run replaces it instead of being dropped", async () => {
    await requestStart(vm.id);
    await untilState(vm.id, "running");
    const first = (await row(vm.id)).vma_secret as string;
    // The database takes the VM from the node while its desktop runs (an administrator's repair),
    // then places a new start on the same node.
    await sql()`UPDATE vm_runtimes SET vm_state = 'stopped', host_id = NULL, vm_address = NULL, vma_secret = NULL WHERE vm_id = ${vm.id}`;
    await requestStart(vm.id);
    await untilState(vm.id, "running", 30_000);
    const now = await row(vm.id);
    expect(now.vma_secret).not.toBe(first);
    expect(await node.containers()).toEqual([`qvd-${vm.id}`]);
    expect((await node.vma(`http://${vm.ip}:3030`, now.vma_secret, "/vma/ping")).status).toBe(200);
    expect((await node.vma(`http://${vm.ip}:3030`, first, "/vma/ping")).status).toBe(403);
    await D.stopVm(sql(), ALL, vm.id);
    await untilState(vm.id, "stopped");
  });

  test("a zombie can be stopped from the API: its node retries the teardown at once", async () => {
    await requestStart(vm.id);
    await untilState(vm.id, "running");
    writeFileSync(cue("cleanup-fail"), "");
    await D.stopVm(sql(), ALL, vm.id);
    await untilState(vm.id, "zombie");
    expect((await row(vm.id)).host_id).toBe(node.host.id); // still the node's to tear down
    rmSync(cue("cleanup-fail"));
    await D.stopVm(sql(), ALL, vm.id); // hkd.zombie_retry is an hour: only the command retries now
    await untilState(vm.id, "stopped", 30_000);
    expect(await node.containers()).toEqual([]);
    expect(await node.links()).not.toContain(`qvd${vm.id}`);
  });

  test("a zombie is retried with backoff until its teardown succeeds", async () => {
    await node.kill("SIGTERM");
    await startHarness({ "hkd.zombie_retry": "1" });
    await requestStart(vm.id);
    await untilState(vm.id, "running");
    writeFileSync(cue("cleanup-fail"), "");
    const mark = calls().length;
    await D.stopVm(sql(), ALL, vm.id);
    await untilState(vm.id, "zombie");
    const attempts = () =>
      calls()
        .slice(mark)
        .filter((c) => c === `cleanup ${vm.id}`).length;
    await until(() => attempts() >= 3, "the node to retry the teardown twice", 30_000);
    await untilState(vm.id, "zombie"); // the third attempt failed as well
    rmSync(cue("cleanup-fail"));
    await untilState(vm.id, "stopped", 30_000);
    expect(await node.containers()).toEqual([]);
    expect(readFileSync(node.logFile, "utf8")).toContain("retrying the teardown of a zombie");
  });

  test("hkd.max_starting = 1: a second start waits in the database until the first is over", async () => {
    await node.kill("SIGTERM");
    await startHarness({ "hkd.max_starting": "1" });
    writeFileSync(cue("start-hold"), "");
    await requestStart(vm.id);
    await until(() => calls().includes(`start-held ${vm.id}`), "the first start to be under way");
    await requestStart(vm2.id);
    await Bun.sleep(3000); // a check that nothing happens: notified, and a poll (hkd.poll_interval = 2) passed, the second start still waits
    expect([(await row(vm2.id)).vm_state, (await row(vm2.id)).vm_cmd]).toEqual(["stopped", "start"]);
    expect(calls()).not.toContain(`prepare ${vm2.id}`);
    rmSync(cue("start-hold"));
    writeFileSync(cue("start-go"), "");
    await untilState(vm2.id, "running");
    const starts = calls().filter((c) => c.startsWith("start "));
    expect(starts.slice(-2)).toEqual([`start ${vm.id}`, `start ${vm2.id}`]);
    expect((await row(vm.id)).vm_state).toBe("stopped");
  });
});
