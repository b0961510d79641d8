// The VM lifecycle table against real PostgreSQL: every event's UPDATE changes a row exactly
// when the table allows it (tried on rows in every state, command, node and block), writes what
// the table says, and is refused to actors the table does not name. Then the lost-node
// functions: declare lost, rejoin, clear a zombie; and the start queue's order and cap.
import { describe, expect, test, beforeAll } from "bun:test";
import { readFileSync } from "node:fs";
import * as D from "../src/db/index.ts";
import * as L from "../src/db/lifecycle.ts";
import { VM_STATES } from "../src/db/vms.ts";
import { useTestDatabase } from "./support/db.ts";

const db = useTestDatabase();
const ALL = D.ALL_TENANTS;
const sql = () => db().sql;

class Rollback extends Error {}

describe("the VM lifecycle table", () => {
  let alive: number; // a running node: the acting node
  let lost: number; // a node declared lost
  let vmId: number;
  let vm2: number;

  beforeAll(async () => {
    alive = (await D.create(sql(), D.hosts, ALL, { name: "alive", address: "198.19.0.1" })).id;
    lost = (await D.create(sql(), D.hosts, ALL, { name: "lost", address: "198.19.0.2" })).id;
    await sql()`UPDATE host_runtimes SET state = 'running', ok_ts = now() WHERE host_id = ${alive}`;
    await sql()`UPDATE host_runtimes SET state = 'lost' WHERE host_id = ${lost}`;
    const user = await D.create(sql(), D.users, ALL, { tenant_id: 1, name: "lc" });
    const osf = await D.create(sql(), D.osfs, ALL, { tenant_id: 1, name: "lc", memory_mb: 128 });
    vmId = (await D.createVm(sql(), ALL, { user_id: user.id, osf_id: osf.id, name: "lc1" }, { range: "198.18.0.0/16" }))
      .id;
    vm2 = (await D.createVm(sql(), ALL, { user_id: user.id, osf_id: osf.id, name: "lc2" }, { range: "198.18.0.0/16" }))
      .id;
  });

  // What the table means, restated independently of the SQL builder.
  function allows(
    t: L.VmTransition,
    row: { state: string; cmd: string | null; host: number | null; blocked: boolean },
  ): boolean {
    if (!(t.from as readonly string[]).includes(row.state)) return false;
    if (t.cmd && !(t.cmd as readonly (string | null)[]).includes(row.cmd)) return false;
    if (t.unblocked && row.blocked) return false;
    switch (t.node) {
      case "this":
        return row.host === alive;
      case "placing":
        return row.host === null || row.host === alive;
      case "assigned":
        return row.host !== null;
      case "dead":
        return row.host !== alive;
      case "any":
        return true;
    }
  }

  test("every event changes exactly the rows the table allows, and writes what it says", async () => {
    let tried = 0;
    let changed = 0;
    for (const event of L.VM_EVENTS) {
      const t: L.VmTransition = L.VM_TRANSITIONS[event];
      for (const state of VM_STATES)
        for (const cmd of [null, "start", "stop"])
          for (const host of [null, alive, lost])
            for (const blocked of [false, true]) {
              if (host === null && state !== "stopped" && state !== "zombie") continue; // the schema's CHECK
              const row = { state, cmd, host, blocked };
              const after = await sql()
                .begin(async (tx) => {
                  await tx`UPDATE vm_runtimes SET vm_state = ${state}, vm_cmd = ${cmd}, host_id = ${host}, blocked = ${blocked},
              vm_address = '198.18.5.5', vma_secret = 'secret', vma_port = 3030, home_key = 'default/lc', expire_hard_at = now()
            WHERE vm_id = ${vmId}`;
                  const did = await L.transition(tx, event, t.actors[0]!, vmId, alive);
                  const [r] =
                    await tx`SELECT vm_state, vm_cmd, vm_cmd_ts, host_id, vma_secret, vm_address, home_key, expire_hard_at FROM vm_runtimes WHERE vm_id = ${vmId}`;
                  throw new Rollback(JSON.stringify({ did, r }));
                })
                .catch((e) => {
                  if (!(e instanceof Rollback))
                    throw new Error(`${event} on ${JSON.stringify(row)}: ${(e as Error).message}`);
                  return JSON.parse(e.message) as { did: boolean; r: Record<string, unknown> };
                });
              tried++;
              const label = `${event} on ${JSON.stringify(row)}`;
              expect([label, after.did]).toEqual([label, allows(t, row)]);
              if (!after.did) {
                expect([label, after.r.vm_state, after.r.vm_cmd, after.r.host_id]).toEqual([label, state, cmd, host]);
                continue;
              }
              changed++;
              expect([label, after.r.vm_state]).toEqual([label, t.to ?? state]);
              expect([label, after.r.vm_cmd]).toEqual([label, t.cmdAfter === undefined ? cmd : t.cmdAfter]);
              if (t.cmdAfter) expect(after.r.vm_cmd_ts).not.toBeNull();
              if (t.release)
                expect([
                  label,
                  after.r.host_id,
                  after.r.vma_secret,
                  after.r.vm_address,
                  after.r.home_key,
                  after.r.expire_hard_at,
                ]).toEqual([label, null, null, null, null, null]);
              else
                expect([label, after.r.host_id, after.r.vma_secret]).toEqual([
                  label,
                  t.assign ? alive : host,
                  "secret",
                ]);
            }
    }
    expect(tried).toBeGreaterThan(1000);
    expect(changed).toBeGreaterThan(50);
  }, 120_000);

  test("an actor the table does not name cannot cause an event", async () => {
    await expect(L.transition(sql(), "node_lost", "api", vmId, alive)).rejects.toThrow("api may not cause node_lost");
    await expect(L.transition(sql(), "started", "l7r", vmId, alive)).rejects.toThrow("l7r may not cause started");
    await expect(L.transition(sql(), "start_requested", "hkd", vmId, alive)).rejects.toThrow(
      "hkd may not cause start_requested",
    );
  });

  test("claimStarts takes at most max, oldest command first, with each command's age; a cap of 0 takes none", async () => {
    await sql()`UPDATE vm_runtimes SET vm_state = 'stopped', vm_cmd = NULL, host_id = NULL, blocked = false, home_key = NULL WHERE vm_id IN ${sql()([vmId, vm2])}`;
    expect(await L.requestStart(sql(), vm2, alive)).toBe(true);
    await sql()`UPDATE vm_runtimes SET vm_cmd_ts = now() - interval '1 minute' WHERE vm_id = ${vm2}`;
    expect(await L.requestStart(sql(), vmId, alive, { homeKey: "default/lc" })).toBe(true);
    expect(await L.requestStart(sql(), vmId, alive)).toBe(false); // already has a command
    expect(await L.claimStarts(sql(), alive, 0)).toEqual([]);
    expect(await L.claimStarts(sql(), lost, 5)).toEqual([]); // another node's starts are not its own
    // With each, the seconds from its command to the claim: vm2's command is a minute old.
    const [first] = await L.claimStarts(sql(), alive, 1);
    expect(first!.vmId).toBe(vm2);
    expect(first!.lagS).toBeGreaterThanOrEqual(60);
    expect(first!.lagS).toBeLessThan(120);
    const [second] = await L.claimStarts(sql(), alive, 1);
    expect(second!.vmId).toBe(vmId);
    expect(second!.lagS).toBeGreaterThanOrEqual(0);
    expect(second!.lagS).toBeLessThan(60);
    expect(await L.claimStarts(sql(), alive, 1)).toEqual([]);
  });

  test("declareNodeLost releases the node's VMs and sessions in one go, only once, only when stale", async () => {
    const node = (await D.create(sql(), D.hosts, ALL, { name: "dying", address: "198.19.0.3" })).id;
    await sql()`UPDATE host_runtimes SET state = 'running', ok_ts = now() WHERE host_id = ${node}`;
    await sql()`UPDATE vm_runtimes SET vm_state = 'running', vm_cmd = 'stop', host_id = ${node}, vm_address = '198.18.9.1', vma_secret = 's',
        home_key = 'default/lc', user_state = 'connected', l7r_host_id = ${node}, l7r_session = gen_random_uuid() WHERE vm_id = ${vmId}`;
    await sql()`UPDATE vm_runtimes SET vm_state = 'zombie', vm_cmd = NULL, host_id = ${node}, home_key = NULL,
        user_state = 'connected', l7r_host_id = ${alive}, l7r_session = gen_random_uuid() WHERE vm_id = ${vm2}`;
    // A fresh heartbeat: not stale, nothing happens.
    expect(await L.declareNodeLost(sql(), node, "no heartbeat", { staleForS: 300 })).toEqual({
      declared: false,
      vms: [],
    });
    expect((await D.get(sql(), D.vms, ALL, vmId)).vm_state).toBe("running");
    await sql()`UPDATE host_runtimes SET ok_ts = now() - interval '10 minutes' WHERE host_id = ${node}`;
    expect(await L.declareNodeLost(sql(), node, "no heartbeat for 600 s", { staleForS: 300 })).toEqual({
      declared: true,
      vms: [vmId, vm2].sort((a, b) => a - b),
    });
    expect(await L.declareNodeLost(sql(), node, "again", { by: "admin" })).toEqual({ declared: false, vms: [] });
    const [h] = await sql()`SELECT state, lost_ts, lost_reason FROM host_runtimes WHERE host_id = ${node}`;
    expect([h!.state, h!.lost_reason, h!.lost_ts !== null]).toEqual(["lost", "no heartbeat for 600 s", true]);
    const rows =
      await sql()`SELECT vm_id, vm_state, vm_cmd, host_id, vm_address, vma_secret, home_key, user_state, user_cmd, l7r_host_id
      FROM vm_runtimes WHERE vm_id IN ${sql()([vmId, vm2])} ORDER BY vm_id`;
    for (const r of rows)
      expect([r.vm_state, r.vm_cmd, r.host_id, r.vm_address, r.vma_secret, r.home_key]).toEqual([
        "stopped",
        null,
        null,
        null,
        null,
        null,
      ]);
    const byId = new Map(rows.map((r) => [r.vm_id, r]));
    // The lost node's own L7R sessions are over; another L7R's session is told to end.
    expect([byId.get(vmId)!.user_state, byId.get(vmId)!.l7r_host_id]).toEqual(["disconnected", null]);
    expect([byId.get(vm2)!.user_state, byId.get(vm2)!.user_cmd]).toEqual(["connected", "abort"]);
    // The node's own writes are refused now: its heartbeat, and any event about the VMs.
    expect(await D.heartbeat(sql(), node, { pid: 1, usableRamMb: 1, usableCpu: 1, version: "x" })).toBe(false);
    expect(await L.claimStops(sql(), node)).toEqual([]);
    // A stopped node is not declared lost; a lost one rejoins once.
    expect(await L.rejoinHost(sql(), node)).toBe(true);
    expect(await L.rejoinHost(sql(), node)).toBe(false);
    const [h2] = await sql()`SELECT state, lost_ts FROM host_runtimes WHERE host_id = ${node}`;
    expect([h2!.state, h2!.lost_ts !== null]).toEqual(["starting", true]);
    await sql()`UPDATE host_runtimes SET state = 'stopped' WHERE host_id = ${node}`;
    expect((await L.declareNodeLost(sql(), node, "x", { by: "admin" })).declared).toBe(false);
    // An administrator's reason is kept, but not without bound.
    await sql()`UPDATE host_runtimes SET state = 'running' WHERE host_id = ${node}`;
    expect((await L.declareNodeLost(sql(), node, "x".repeat(100_000), { by: "admin" })).declared).toBe(true);
    expect((await sql()`SELECT length(lost_reason)::int AS n FROM host_runtimes WHERE host_id = ${node}`)[0]!.n).toBe(
      2000,
    );
  });

  test("clearZombie: a zombie on a dead node is cleared; on a live node, or not a zombie, a clear refusal", async () => {
    await sql()`UPDATE vm_runtimes SET vm_state = 'zombie', vm_cmd = NULL, host_id = ${alive}, vm_address = '198.18.9.2', user_cmd = NULL WHERE vm_id = ${vmId}`;
    await expect(L.clearZombie(sql(), ALL, vmId)).rejects.toThrow(
      /zombie on node "alive", which is alive: stop the VM/,
    );
    // Another tenant's administrator does not see it.
    const acme = await D.create(sql(), D.tenants, ALL, { name: "acme" });
    await expect(L.clearZombie(sql(), D.tenantScope(acme.id), vmId)).rejects.toThrow(/not found/);
    await sql()`UPDATE host_runtimes SET state = 'stopped' WHERE host_id = ${alive}`;
    await L.clearZombie(sql(), ALL, vmId);
    const r = await D.get(sql(), D.vms, ALL, vmId);
    expect([r.vm_state, r.host_id, r.vm_address]).toEqual(["stopped", null, null]);
    await expect(L.clearZombie(sql(), ALL, vmId)).rejects.toThrow(/is stopped, not a zombie/);
    await sql()`UPDATE host_runtimes SET state = 'running' WHERE host_id = ${alive}`;
  });

  test("the documentation lists every event of the table", () => {
    const doc = readFileSync(new URL("../src/db/README.md", import.meta.url), "utf8");
    for (const e of L.VM_EVENTS) expect(doc).toContain(`\`${e}\``);
    expect(doc).toContain(L.lifecycleMarkdown());
  });
});
