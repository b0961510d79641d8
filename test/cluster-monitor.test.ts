// Lost nodes against real PostgreSQL: the cluster monitor (src/hkd/monitor.ts) declares a
// stale node lost exactly once however many monitors race, never a fresh one, and nothing
// while its own database has not worked for cluster.lost_after (grace); the administrator's
// declare-lost, drain and clear-zombie through the API; the configuration keeps hkd.fence_after
// below cluster.lost_after. As root, with a real HKD and LXC: the grace after a database outage,
// and a node declared lost while it runs a desktop kills it, rejoins and starts desktops again.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { copyFileSync, readFileSync } from "node:fs";
import { join } from "node:path";
import * as D from "../src/db/index.ts";
import { leaveDrainingNode } from "../src/db/cluster.ts";
import { connect, type Sql } from "../src/db/pool.ts";
import { ClusterMonitor } from "../src/hkd/monitor.ts";
import { useTestApi } from "./support/api.ts";
import { TEST_ADMIN, useTestDatabase } from "./support/db.ts";
import { busyboxImage, l7rProbe, TestNode } from "./support/node.ts";
import { until } from "./support/wait.ts";

const isRoot = process.getuid?.() === 0;
const db = useTestDatabase();
const ALL = D.ALL_TENANTS;
const sql = () => db().sql;
const live = useTestApi(db, { "wat.multitenant": "1" });
const { api, sa } = live;
let osfId: number;

beforeAll(async () => {
  osfId = (await D.create(sql(), D.osfs, ALL, { tenant_id: 1, name: "small", memory_mb: 128 })).id;
});

let seq = 0;
/** A node row: `beat` seconds since its last heartbeat (null: none), in `state`. */
async function node(state: string, beat: number | null, extra: { drain?: boolean } = {}): Promise<number> {
  const [h] =
    await sql()`INSERT INTO hosts (name, address) VALUES (${`node-${++seq}`}, ${`198.19.0.${seq}`}) RETURNING id`;
  await sql()`UPDATE host_runtimes SET state = ${state}, ok_ts = CASE WHEN ${beat === null} THEN NULL ELSE now() - make_interval(secs => ${beat ?? 0}) END,
      state_ts = now() - interval '1 day', usable_ram_mb = 65536, usable_cpu = 4000, drain = ${extra.drain ?? false} WHERE host_id = ${h!.id}`;
  return h!.id;
}

/** A VM of a new user, running on `hostId` (as its node would have recorded it). */
async function desktopOn(hostId: number | null, state = "running"): Promise<number> {
  const user = await D.create(sql(), D.users, ALL, { tenant_id: 1, name: `user-${++seq}` });
  const vm = await D.createVm(
    sql(),
    ALL,
    { user_id: user.id, osf_id: osfId, name: `desk-${seq}` },
    { range: "198.18.0.0/16" },
  );
  if (hostId !== null)
    await sql()`UPDATE vm_runtimes SET vm_state = ${state}, host_id = ${hostId}, vm_address = ${vm.ip}::inet, vma_secret = 'secret', vma_port = 3030
      WHERE vm_id = ${vm.id}`;
  return vm.id;
}

const hostRow = (id: number) => D.get(sql(), D.hosts, ALL, id);
const vmRow = (id: number) => D.get(sql(), D.vms, ALL, id);

describe("the cluster monitor", () => {
  test("a stale node is declared lost exactly once by many concurrent monitors; fresh, stopped and lost ones are not", async () => {
    const stale = await node("running", 3600);
    const neverBeat = await node("starting", null);
    const fresh = await node("running", 1);
    const stopped = await node("stopped", 3600);
    const lost = await node("lost", 3600);
    const vms = [await desktopOn(stale), await desktopOn(stale, "starting")];
    const freshVm = await desktopOn(fresh);
    // Eight monitors, each with connections of its own, all at once.
    const pools: Sql[] = Array.from({ length: 8 }, () => connect(db().url, { max: 2 }));
    try {
      const monitors = pools.map(
        (p, i) =>
          new ClusterMonitor({
            sql: p,
            host: { id: fresh, name: `watcher-${i}` },
            lostAfterS: 300,
            dbOkForS: () => 1e6,
          }),
      );
      const rounds = await Promise.all(monitors.flatMap((m) => [m.check(), m.check()]));
      const declared = rounds.flat();
      expect(declared.filter((d) => d.hostId === stale)).toEqual([
        { hostId: stale, name: expect.any(String), vms: vms.sort((a, b) => a - b) },
      ]);
      expect(declared.filter((d) => d.hostId === neverBeat)).toHaveLength(1);
      expect(declared.filter((d) => ![stale, neverBeat].includes(d.hostId))).toEqual([]);
    } finally {
      await Promise.all(pools.map((p) => p.end()));
    }
    expect(await hostRow(stale)).toMatchObject({
      state: "lost",
      lost_reason: expect.stringMatching(
        /^no heartbeat for \d+ s \(cluster.lost_after 300 s\), seen by node watcher-\d$/,
      ),
    });
    for (const id of vms)
      expect(await vmRow(id)).toMatchObject({ vm_state: "stopped", host_id: null, vm_address: null });
    expect([(await hostRow(fresh)).state, (await hostRow(stopped)).state, (await hostRow(lost)).state]).toEqual([
      "running",
      "stopped",
      "lost",
    ]);
    expect(await vmRow(freshVm)).toMatchObject({ vm_state: "running", host_id: fresh });
    const audits =
      await sql()`SELECT source, arguments FROM audit_log WHERE action = 'host.declare_lost' AND object_id = ${stale}`;
    expect([...audits]).toEqual([
      {
        source: "hkd",
        arguments: { reason: expect.any(String), released_vms: vms, by_node: expect.stringMatching(/^watcher-/) },
      },
    ]);
  });

  test("while its own database has not worked for cluster.lost_after, a monitor declares nothing", async () => {
    const stale = await node("running", 3600);
    let okFor: number | undefined; // the database is failing now
    const m = new ClusterMonitor({
      sql: sql(),
      host: { id: 0, name: "watcher" },
      lostAfterS: 60,
      dbOkForS: () => okFor,
    });
    expect(await m.check()).toEqual([]);
    okFor = 59; // back, but not for long enough
    expect(await m.check()).toEqual([]);
    expect((await hostRow(stale)).state).toBe("running");
    okFor = 60;
    expect((await m.check()).map((d) => d.hostId)).toContain(stale);
  });
});

describe("the administrator's controls (API)", () => {
  test("declare-lost releases the node's VMs and needs a reason; a tenant's administrator gets 403, even holding host.stop_vms", async () => {
    const h = await node("running", 0);
    const vm = await desktopOn(h);
    const tenant = (await sa.post("/tenants", { name: "acme" })).body.id;
    const { id: boss, client: ta } = await live.admin("boss", {
      tenantId: tenant,
      tenant: "acme",
      roles: ["Tenant administrator"],
    });
    expect((await ta.post(`/hosts/${h}/declare_lost`, { reason: "mine now" })).status).toBe(403);
    // Even a role that grants the ACL gives no power over whole nodes in a tenant.
    const nodesRole = (await sa.post("/roles", { tenant_id: tenant, name: "Node keeper" })).body.id;
    for (const acl of ["host.see", "host.stop_vms", "host.block"]) await sa.put(`/roles/${nodesRole}/acls`, { acl });
    await sa.post(`/administrators/${boss}/roles`, { role_id: nodesRole });
    const ta2 = await api.login("boss", "boss-password", "acme");
    for (const action of ["declare_lost", "drain"]) {
      const r = await ta2.post(`/hosts/${h}/${action}`, action === "drain" ? {} : { reason: "mine now" });
      expect([action, r.status]).toEqual([action, 403]);
    }
    expect(await hostRow(h)).toMatchObject({ state: "running", drain: false });

    const noReason = await sa.post(`/hosts/${h}/declare_lost`, { reason: "  " });
    expect([noReason.status, noReason.body.error.field]).toEqual([422, "reason"]);
    const r = await sa.post(`/hosts/${h}/declare_lost`, { reason: "the PSU burnt" });
    expect(r.status).toBe(200);
    expect(r.body).toMatchObject({
      released_vms: [vm],
      host: { state: "lost", lost_reason: "the PSU burnt", lost_ts: expect.any(String) },
    });
    expect(await vmRow(vm)).toMatchObject({ vm_state: "stopped", host_id: null });
    expect((await sa.post(`/hosts/${h}/declare_lost`, { reason: "again" })).status).toBe(409);
    const [a] =
      await sql()`SELECT administrator_name, source, arguments FROM audit_log WHERE action = 'host.declare_lost' AND object_id = ${h} AND ok`;
    expect(a).toEqual({
      administrator_name: TEST_ADMIN.name,
      source: "api",
      arguments: { reason: "the PSU burnt", released_vms: [vm] },
    });
  });

  test("clear-zombie: refused while the zombie's node is alive (stop it instead), done once the node is lost", async () => {
    const h = await node("running", 0);
    const vm = await desktopOn(h, "zombie");
    const refused = await sa.post(`/vms/${vm}/clear_zombie`);
    expect([refused.status, refused.body.error.message]).toEqual([409, expect.stringContaining("which is alive")]);
    await sql()`UPDATE host_runtimes SET state = 'lost' WHERE host_id = ${h}`;
    // Another tenant's administrator does not even see the VM.
    const other = await api.login("boss", "boss-password", "acme");
    expect((await other.post(`/vms/${vm}/clear_zombie`)).status).toBe(404);
    expect((await vmRow(vm)).vm_state).toBe("zombie");
    expect((await sa.post(`/vms/${vm}/clear_zombie`)).status).toBe(200);
    expect(await vmRow(vm)).toMatchObject({ vm_state: "stopped", host_id: null });
  });

  test("a drained node takes no new desktops; undrained, it does", async () => {
    await sql()`UPDATE host_runtimes SET state = 'stopped'`; // only the node of this test is up
    const h = await node("running", 0);
    const vm = await desktopOn(null);
    expect((await sa.post(`/hosts/${h}/drain`)).body.drain).toBe(true);
    expect((await sa.get("/hosts?drain=true")).body.items.map((r: { id: number }) => r.id)).toEqual([h]);
    const refused = await sa.post(`/vms/${vm}/start`);
    expect(refused.status).toBe(409);
    expect((await sa.post(`/hosts/${h}/undrain`)).body.drain).toBe(false);
    const started = await sa.post(`/vms/${vm}/start`);
    expect([started.status, started.body.host_id]).toEqual([200, h]);
  });

  test("a user's connect moves their desktop off a draining node only when their session holds it", async () => {
    const draining = await node("running", 0, { drain: true });
    const vm = await desktopOn(draining);
    const mine = crypto.randomUUID();
    const held = (session: string) =>
      sql()`UPDATE vm_runtimes SET user_state = 'connecting', l7r_session = ${session}::uuid WHERE vm_id = ${vm}`;
    await held(crypto.randomUUID()); // someone else's session
    expect(await leaveDrainingNode(sql(), vm, mine)).toBe(false);
    expect((await vmRow(vm)).vm_cmd).toBeNull();
    await held(mine);
    expect(await leaveDrainingNode(sql(), vm, mine)).toBe(true);
    expect(await vmRow(vm)).toMatchObject({ vm_state: "running", vm_cmd: "stop" });
    // Its node stops it (released): nothing more to move, it starts elsewhere.
    await sql()`UPDATE vm_runtimes SET vm_state = 'stopped', vm_cmd = NULL, host_id = NULL WHERE vm_id = ${vm}`;
    expect(await leaveDrainingNode(sql(), vm, mine)).toBe(false);
    // On a node that is not draining nothing happens.
    const normal = await node("running", 0);
    const other = await desktopOn(normal);
    await sql()`UPDATE vm_runtimes SET user_state = 'connecting', l7r_session = ${mine}::uuid WHERE vm_id = ${other}`;
    expect(await leaveDrainingNode(sql(), other, mine)).toBe(false);
    expect((await vmRow(other)).vm_cmd).toBeNull();
  });

  test("PUT and DELETE /configs refuse to break hkd.fence_after < cluster.lost_after (422 naming both keys)", async () => {
    const put = await sa.put("/configs/cluster.lost_after", { value: "120" });
    expect([put.status, put.body.error.field]).toEqual([422, "value"]);
    expect(put.body.error.message).toContain(
      "hkd.fence_after (120, the default) must be less than cluster.lost_after (120, global)",
    );
    expect((await sa.put("/configs/hkd.fence_after", { value: "60" })).status).toBe(200);
    expect((await sa.put("/configs/cluster.lost_after", { value: "120" })).status).toBe(200);
    expect((await sa.put("/configs/hkd.fence_after", { value: "120" })).status).toBe(422);
    const del = await sa.del("/configs/hkd.fence_after"); // back to the default 120
    expect([del.status, del.body.error.message]).toEqual([
      422,
      expect.stringContaining("cluster.lost_after (120, global)"),
    ]);
    expect((await sa.del("/configs/cluster.lost_after")).status).toBe(200);
    expect((await sa.del("/configs/hkd.fence_after")).status).toBe(200);
    expect((await sql()`SELECT key FROM configs WHERE key IN ('hkd.fence_after', 'cluster.lost_after')`).length).toBe(
      0,
    );
  });
});

describe.skipIf(!isRoot)("a real node (HKD, LXC)", () => {
  const testNode = new TestNode(db, "monitor-node");
  const FAST = { "cluster.lost_after": "10", "hkd.fence_after": "5" };

  beforeAll(async () => {
    await sql()`UPDATE host_runtimes SET state = 'stopped'`; // the rows of the tests above
    await testNode.setup();
    await testNode.addImage(osfId, "busybox.tar.gz", busyboxImage);
  }, 600_000);
  afterAll(async () => {
    await testNode.stop();
  }, 120_000);

  test("after a database outage longer than lost_after, a node that heartbeats again within lost_after is not declared lost; one that does not is", async () => {
    await testNode.start(FAST);
    const other = await node("running", 0);
    await db().cluster.pause();
    try {
      await Bun.sleep(12_000); // the outage itself: every heartbeat is now older than lost_after
    } finally {
      await db().cluster.resume();
    }
    const reachable = async () => {
      try {
        await sql()`SELECT 1`;
        return true;
      } catch {
        return false; // the pool reconnects
      }
    };
    await until(reachable, "the database to answer again", 30_000);
    const [{ back }] = (await sql()`SELECT now() AS back`) as unknown as [{ back: Date }];
    await until(
      async () => ((await hostRow(testNode.host.id)).ok_ts?.getTime() ?? 0) > back.getTime(),
      "the node to heartbeat again",
      30_000,
    );
    // The other node takes a few of the monitor's rounds to notice the database is back: without
    // the grace, the monitor would declare it lost meanwhile. A check that nothing happens: the
    // sleeps give the monitor those rounds (3 s, then 14 s of the other node heartbeating).
    await Bun.sleep(3000);
    for (let i = 0; i < 14; i++) {
      await sql()`UPDATE host_runtimes SET ok_ts = now() WHERE host_id = ${other}`;
      await Bun.sleep(1000);
    }
    expect((await hostRow(other)).state).toBe("running");
    expect((await hostRow(testNode.host.id)).state).toBe("running");
    // It stops heartbeating: declared lost once it is lost_after old.
    await until(async () => (await hostRow(other)).state === "lost", "the silent node to be declared lost", 60_000);
    expect((await hostRow(other)).lost_reason).toMatch(/seen by node monitor-node$/);
    expect(readFileSync(testNode.logFile, "utf8")).toContain("declared a node lost");
    await testNode.kill("SIGTERM");
  }, 180_000);

  test("declared lost while it runs a desktop: the node kills it and rejoins; the VM is released and starts again", async () => {
    await testNode.kill("SIGTERM"); // left running when the test above failed
    await testNode.start(FAST);
    const vm = await desktopOn(null);
    const startOn = async () => (await sa.post(`/vms/${vm}/start`)).body;
    const untilVm = (state: string) =>
      until(async () => (await vmRow(vm)).vm_state === state, `vm ${vm} to be ${state}`, 60_000);
    expect((await startOn()).host_id).toBe(testNode.host.id);
    await untilVm("running");
    expect(await testNode.containers()).toEqual([`qvd-${vm}`]);

    const r = await sa.post(`/hosts/${testNode.host.id}/declare_lost`, { reason: "test: treat it as dead" });
    expect([r.status, r.body.released_vms]).toEqual([200, [vm]]);
    expect(await vmRow(vm)).toMatchObject({ vm_state: "stopped", host_id: null });
    await until(async () => (await testNode.containers()).length === 0, "the node to kill its desktop", 60_000);
    await until(async () => (await hostRow(testNode.host.id)).state === "running", "the node to rejoin", 60_000);
    const log = readFileSync(testNode.logFile, "utf8");
    expect(log).toContain("fencing: stopping every desktop of this node");
    expect(log).toContain("rejoining the farm after being declared lost");
    // The released VM is not run again by the node on its own…
    expect(await vmRow(vm)).toMatchObject({ vm_state: "stopped", host_id: null });
    expect(await testNode.containers()).toEqual([]);
    // …and a new start on it works.
    expect((await startOn()).host_id).toBe(testNode.host.id);
    await untilVm("running");
    expect(await testNode.containers()).toEqual([`qvd-${vm}`]);
    expect((await hostRow(testNode.host.id)).lost_reason).toBe("test: treat it as dead");
    await sa.post(`/vms/${vm}/stop`);
    await untilVm("stopped");
  }, 240_000);

  test("drained: a user's next connect (through another node's L7R) stops the desktop there and starts it on another node", async () => {
    const PORT = 8443;
    const nodeB = new TestNode(db, "monitor-node-b");
    try {
      if (!testNode.proc) await testNode.start(FAST);
      await sql()`UPDATE hosts SET address = '198.19.254.1' WHERE id = ${testNode.host.id}`; // addresses are unique; A runs no L7R
      await nodeB.setup();
      copyFileSync(
        join(testNode.root, "storage", "images", "busybox.tar.gz"),
        join(nodeB.root, "storage", "images", "busybox.tar.gz"),
      );
      await nodeB.startNode(PORT, FAST);
      const user = await D.create(sql(), D.users, ALL, { tenant_id: 1, name: "mover", password: "mover-password" });
      const vm = (
        await D.createVm(
          sql(),
          ALL,
          { user_id: user.id, osf_id: osfId, name: "moving-desk" },
          { range: "198.18.0.0/16" },
        )
      ).id;
      // The desktop runs on node A (B drained meanwhile, so placement cannot choose it).
      await sa.post(`/hosts/${nodeB.host.id}/drain`);
      expect((await sa.post(`/vms/${vm}/start`)).body.host_id).toBe(testNode.host.id);
      await until(async () => (await vmRow(vm)).vm_state === "running", "the desktop to run on node A", 60_000);
      await sa.post(`/hosts/${nodeB.host.id}/undrain`);
      await sa.post(`/hosts/${testNode.host.id}/drain`);

      const out = await l7rProbe(nodeB.ns.exec, PORT, "mover", "mover-password", vm);
      expect(out.progress).toContain("Moving the desktop off a draining node");
      // (The busybox desktop has no nxagent: the connect ends at x_start, after the move.)
      expect(await vmRow(vm)).toMatchObject({ vm_state: "running", host_id: nodeB.host.id });
      expect(await testNode.containers()).toEqual([]);
      expect(await nodeB.containers()).toEqual([`qvd-${vm}`]);
      await sa.post(`/vms/${vm}/stop`);
      await until(async () => (await vmRow(vm)).vm_state === "stopped", "the desktop to stop", 60_000);
    } finally {
      await nodeB.stop();
    }
  }, 600_000);
});
