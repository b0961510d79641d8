// Placement, the start queue and the one-home rule, against real PostgreSQL (and a real L7R
// over TLS for what the user is told): bursts spread by free memory minus what each node has
// taken on since its heartbeat, never beyond a node's room; drained, blocked, stale, lost,
// stopped and frontend-only nodes get nothing; queued starts keep their order and the user
// hears their place; a home is never in use by two desktops, in any race.
import { afterAll, beforeAll, beforeEach, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import { Config } from "../src/config.ts";
import * as D from "../src/db/index.ts";
import * as L from "../src/db/lifecycle.ts";
import { startL7r, type L7r } from "../src/l7r/server.ts";
import { useTestDatabase } from "./support/db.ts";
import { basic, WireClient } from "./support/qvd-wire.ts";
import { selfSignedCert } from "./support/tls.ts";

const db = useTestDatabase();
const ALL = D.ALL_TENANTS;
const sql = () => db().sql;
const ALIVE = 30;
let seq = 0;

/** A node with a heartbeat `okAgoS` seconds ago reporting `ramMb` free. */
async function node(
  ramMb: number,
  o: {
    okAgoS?: number;
    state?: string;
    blocked?: boolean;
    drain?: boolean;
    backend?: boolean;
    cpu?: number;
    name?: string;
    hypervisors?: ("lxc" | "kvm")[];
  } = {},
): Promise<number> {
  const h = await D.create(sql(), D.hosts, ALL, {
    name: o.name ?? `n${++seq}`,
    address: `198.19.0.${++seq % 250}`,
    backend: o.backend ?? true,
  });
  if (o.hypervisors) await D.setHostHypervisors(sql(), h.id, o.hypervisors, "");
  await sql()`UPDATE host_runtimes SET state = ${o.state ?? "running"}, blocked = ${o.blocked ?? false}, drain = ${o.drain ?? false},
      ok_ts = now() - make_interval(secs => ${o.okAgoS ?? 1}), usable_ram_mb = ${ramMb}, usable_cpu = ${o.cpu ?? 2000}
    WHERE host_id = ${h.id}`;
  return h.id;
}

let osf512: number;
/** A user with `n` desktops of 512 MiB; their ids. */
async function desktops(
  n: number,
  o: { tenant?: number; osf?: number; user?: string; password?: string } = {},
): Promise<number[]> {
  const u = await D.create(sql(), D.users, ALL, {
    tenant_id: o.tenant ?? 1,
    name: o.user ?? `u${++seq}`,
    ...(o.password ? { password: o.password } : {}),
  });
  const ids: number[] = [];
  for (let i = 0; i < n; i++)
    ids.push(
      (
        await D.createVm(
          sql(),
          ALL,
          { user_id: u.id, osf_id: o.osf ?? osf512, name: `${u.name}-d${i + 1}` },
          { range: "198.18.0.0/16" },
        )
      ).id,
    );
  return ids;
}
/** `n` users with one desktop each. */
const oneEach = async (n: number) =>
  (await Promise.all(Array.from({ length: n }, () => desktops(1)))).map((d) => d[0]!);

const start = (vmId: number, by: "api" | "l7r" = "api") => D.startVm(sql(), ALL, vmId, { aliveWithinS: ALIVE, by });
const placedOn = async (vms: number[]) =>
  (await sql()`SELECT vm_id, host_id FROM vm_runtimes WHERE vm_id IN ${sql()(vms)}`).map(
    (r) => r.host_id as number | null,
  );
const count = (hosts: (number | null)[], id: number) => hosts.filter((h) => h === id).length;

beforeAll(async () => {
  osf512 = (await D.create(sql(), D.osfs, ALL, { tenant_id: 1, name: "m512", memory_mb: 512 })).id;
});

// Every test sees only the nodes and desktops it makes.
beforeEach(async () => {
  await sql()`UPDATE vm_runtimes SET vm_state = 'stopped', vm_cmd = NULL, vm_cmd_ts = NULL, host_id = NULL, home_key = NULL`;
  await sql()`UPDATE host_runtimes SET state = 'stopped'`;
});

describe("placement", () => {
  test("the liveness window is one key, cluster.alive_within (30 s by default)", () => {
    expect(D.aliveWithinS(new Config())).toBe(30);
  });

  test("twelve starts placed together spread by free memory and what each node took on; none beyond its room", async () => {
    const [a, b, c] = [await node(4096), await node(3072), await node(2048)];
    const vms = await oneEach(12);
    const res = await Promise.allSettled(vms.map((v) => start(v)));
    expect(res.filter((r) => r.status === "rejected")).toEqual([]);
    const hosts = await placedOn(vms);
    const n = [count(hosts, a), count(hosts, b), count(hosts, c)];
    expect(n[0]! + n[1]! + n[2]!).toBe(12);
    // Every node got some, none more than its reported free memory holds.
    for (const [i, ram] of [4096, 3072, 2048].entries()) {
      expect(n[i]!).toBeGreaterThan(0);
      expect(n[i]! * 512).toBeLessThanOrEqual(ram);
    }
    // Free memory ends up close: each pick was within a sixth of the best node's free memory.
    const free = [4096 - 512 * n[0]!, 3072 - 512 * n[1]!, 2048 - 512 * n[2]!];
    expect(Math.max(...free) - Math.min(...free)).toBeLessThanOrEqual(1536);
    // The placed memory is pending on each node until its next heartbeat.
    const cand = await D.placementCandidates(sql(), 0, ALIVE);
    expect(cand.map((x) => [x.id, x.pending_mb])).toEqual([
      [a, n[0]! * 512],
      [b, n[1]! * 512],
      [c, n[2]! * 512],
    ]);
  });

  test("a concurrent burst beyond the farm's room: exactly the room is placed, the rest refused", async () => {
    const nodes = [await node(1024), await node(1024), await node(1500)];
    const vms = await oneEach(14);
    const res = await Promise.allSettled(vms.map((v) => start(v, "l7r")));
    const refused = res.filter((r): r is PromiseRejectedResult => r.status === "rejected");
    expect(refused.length).toBe(14 - 6);
    for (const r of refused) expect(String(r.reason.message)).toMatch(/^no node is available/);
    const hosts = await placedOn(vms);
    expect(nodes.map((h) => count(hosts, h))).toEqual([2, 2, 2]);
  });

  test("desktops placed, starting or running since the node's last heartbeat count against it; earlier ones are in its report", async () => {
    const h = await node(2048, { okAgoS: 5 });
    const [x, y, z] = await oneEach(3);
    await sql()`UPDATE vm_runtimes SET host_id = ${h}, vm_state = 'running', vm_state_ts = now() WHERE vm_id = ${x!}`;
    await sql()`UPDATE vm_runtimes SET host_id = ${h}, vm_state = 'starting', vm_state_ts = now() - interval '1 hour' WHERE vm_id = ${y!}`;
    await sql()`UPDATE vm_runtimes SET host_id = ${h}, vm_cmd = 'start', vm_cmd_ts = now(), vm_state_ts = now() - interval '1 hour' WHERE vm_id = ${z!}`;
    expect((await D.placementCandidates(sql(), 0, ALIVE)).map((c) => [c.id, c.free_mb, c.pending_mb])).toEqual([
      [h, 512, 1536],
    ]);
    expect(await D.placementCandidates(sql(), 513, ALIVE)).toEqual([]);
    expect(await D.placeVm(sql(), 1024, ALIVE)).toBeUndefined();
    // x has run since before the heartbeat: the node's report already shows its memory.
    await sql()`UPDATE vm_runtimes SET vm_state_ts = now() - interval '1 minute' WHERE vm_id = ${x!}`;
    expect((await D.placementCandidates(sql(), 1024, ALIVE)).map((c) => [c.id, c.free_mb])).toEqual([[h, 1024]]);
    expect(await D.placeVm(sql(), 1024, ALIVE)).toBe(h);
  });

  test("drained, blocked, stale, lost, stopped and frontend-only nodes are never chosen, however much room they have", async () => {
    const good = await node(1024);
    const big = 1e6;
    const excluded = [
      await node(big, { drain: true }),
      await node(big, { blocked: true }),
      await node(big, { okAgoS: ALIVE + 1 }),
      await node(big, { state: "lost" }),
      await node(big, { state: "stopped" }),
      await node(big, { state: "starting" }),
      await node(big, { backend: false }),
    ];
    expect((await D.placementCandidates(sql(), 512, ALIVE)).map((c) => c.id)).toEqual([good]);
    const vms = await oneEach(3);
    const res = await Promise.allSettled(vms.map((v) => start(v)));
    expect(res.map((r) => r.status).sort()).toEqual(["fulfilled", "fulfilled", "rejected"]);
    const hosts = await placedOn(vms);
    expect(count(hosts, good)).toBe(2);
    for (const e of excluded) expect(count(hosts, e)).toBe(0);
  });

  test("a desktop goes only to a node that runs its hypervisor; when no running node does, the refusal says so", async () => {
    const kvmOsf = (
      await D.create(sql(), D.osfs, ALL, {
        tenant_id: 1,
        name: `kvm${++seq}`,
        memory_mb: 512,
        hypervisor: "kvm",
        vcpus: 2,
      })
    ).id;
    const kvmDesktop = async () => (await desktops(1, { osf: kvmOsf }))[0]!;
    const lxcOnly = await node(1e6); // a node's default: what nodes ran before KVM existed
    const noRoom =
      "no node is available to run this VM (none running, unblocked, not draining, alive and with enough free memory)";

    // Only an lxc node runs: a KVM desktop is refused for that reason, not for room.
    const k1 = await kvmDesktop();
    const err = await start(k1).catch((e) => e);
    expect(err).toBeInstanceOf(D.ConflictError);
    expect(err.message).toBe("no node is available to run this VM: no running node runs kvm desktops (they run lxc)");
    expect(await placedOn([k1])).toEqual([null]);
    expect(await D.placementCandidates(sql(), 0, ALIVE, "kvm")).toEqual([]);
    expect(await D.placeVm(sql(), 512, ALIVE, "kvm")).toBeUndefined();

    // A node running both takes both kinds; the lxc-only one never takes a KVM desktop, however much room it has.
    const both = await node(2048, { hypervisors: ["kvm", "lxc"] });
    expect((await sql()`SELECT hypervisors FROM host_runtimes WHERE host_id = ${both}`)[0]!.hypervisors).toEqual([
      "kvm",
      "lxc",
    ]);
    const kvms = [k1, await kvmDesktop(), await kvmDesktop()];
    for (const v of kvms) await start(v);
    expect(await placedOn(kvms)).toEqual([both, both, both]);
    await sql()`UPDATE host_runtimes SET blocked = true WHERE host_id = ${lxcOnly}`;
    const [l1] = await desktops(1);
    await start(l1!);
    expect(await placedOn([l1!])).toEqual([both]);
    // Now full: the next KVM desktop is refused for room (a node does run kvm), and stays unplaced.
    const k4 = await kvmDesktop();
    expect((await start(k4).catch((e) => e)).message).toBe(noRoom);
    // A blocked node that runs kvm is no candidate, but it does run kvm: the reason is not "none runs kvm".
    await sql()`UPDATE host_runtimes SET blocked = true WHERE host_id = ${both}`;
    expect((await start(k4).catch((e) => e)).message).toBe(noRoom);

    // A KVM-only node never gets an LXC desktop; with only such nodes the refusal names the kind.
    await sql()`UPDATE host_runtimes SET state = 'stopped' WHERE host_id IN (${lxcOnly}, ${both})`;
    const kvmOnly = await node(1e6, { hypervisors: ["kvm"] });
    const [l2] = await desktops(1);
    expect((await start(l2!).catch((e) => e)).message).toBe(
      "no node is available to run this VM: no running node runs lxc desktops (they run kvm)",
    );
    expect(await D.placementCandidates(sql(), 0, ALIVE, "lxc")).toEqual([]);
    await start(k4);
    expect([await placedOn([k4]), await placedOn([l2!])]).toEqual([[kvmOnly], [null]]);
  });

  test("a node's hypervisors: only lxc and kvm, written with the probes' notes", async () => {
    const h = await node(1024);
    await D.setHostHypervisors(sql(), h, ["lxc", "kvm", "lxc"], "kvm: tcg: /dev/kvm missing");
    const row = await D.get(sql(), D.hosts, ALL, h);
    expect([row.hypervisors, row.hypervisor_notes]).toEqual([["kvm", "lxc"], "kvm: tcg: /dev/kvm missing"]);
    await expect(D.setHostHypervisors(sql(), h, ["xen" as "kvm"], "")).rejects.toThrow("unknown hypervisor xen");
    // The table refuses other kinds too, whoever writes it.
    await expect(sql()`UPDATE host_runtimes SET hypervisors = '{lxc,xen}' WHERE host_id = ${h}`).rejects.toThrow(
      /check constraint/,
    );
    await D.setHostHypervisors(sql(), h, [], "no backend can run here");
    expect((await D.get(sql(), D.hosts, ALL, h)).hypervisors).toEqual([]);
    expect(await D.placementCandidates(sql(), 0, ALIVE, "lxc")).toEqual([]);
  });

  test("the window: a heartbeat 25 s old is alive within 30 s, not within 20 s", async () => {
    const h = await node(4096, { okAgoS: 25 });
    expect((await D.placementCandidates(sql(), 512, 30)).map((c) => c.id)).toEqual([h]);
    expect(await D.placementCandidates(sql(), 512, 20)).toEqual([]);
  });
});

describe("the start queue", () => {
  test("queued starts stand in the order their commands were given; the node claims the oldest first", async () => {
    const h = await node(1e6);
    const vms = (await oneEach(6)).reverse(); // commands given in the reverse order of the ids
    for (const v of vms) await start(v);
    const places = await Promise.all(vms.map((v) => D.startQueuePlace(sql(), v)));
    expect(places.map((p) => [p!.host_id, p!.ahead, p!.starting])).toEqual(vms.map((_, i) => [h, i, 0]));
    expect((await L.claimStarts(sql(), h, 4)).map((c) => c.vmId).sort()).toEqual(vms.slice(0, 4).sort());
    expect(await D.startQueuePlace(sql(), vms[0]!)).toBeUndefined(); // starting: no longer queued
    const rest = await Promise.all(vms.slice(4).map((v) => D.startQueuePlace(sql(), v)));
    expect(rest.map((p) => [p!.ahead, p!.starting])).toEqual([
      [0, 4],
      [1, 4],
    ]);
  });
});

describe("a start its node never took", () => {
  test("is withdrawn when the node stopped heartbeating, never while it is alive or once it took it", async () => {
    const live = await node(1e6);
    const dead = await node(1e6, { name: "gone-quiet" });
    const [a, b, c] = await oneEach(3);
    for (const [v, h] of [
      [a, live],
      [b, dead],
      [c, dead],
    ] as const)
      await sql()`UPDATE vm_runtimes SET host_id = ${h}, vm_cmd = 'start', vm_cmd_ts = now(), home_key = ${`x/${v}`} WHERE vm_id = ${v!}`;
    expect((await L.claimStarts(sql(), dead, 1)).map((c) => c.vmId)).toEqual([b!]); // the node took b before it went quiet
    await sql()`UPDATE host_runtimes SET ok_ts = now() - interval '1 minute' WHERE host_id = ${dead}`;
    expect(await D.withdrawStaleStart(sql(), a!, ALIVE)).toBe(false);
    expect(await D.withdrawStaleStart(sql(), b!, ALIVE)).toBe(false);
    expect(await D.withdrawStaleStart(sql(), c!, ALIVE)).toBe(true);
    const rows =
      await sql()`SELECT vm_id, host_id, vm_cmd, vm_state, home_key FROM vm_runtimes WHERE vm_id IN (${a!}, ${b!}, ${c!})`;
    const byId = new Map(rows.map((r) => [r.vm_id as number, [r.host_id, r.vm_cmd, r.vm_state, r.home_key]]));
    expect([a!, b!, c!].map((v) => byId.get(v))).toEqual([
      [live, "start", "stopped", `x/${a}`],
      [dead, null, "starting", `x/${b}`],
      [null, null, "stopped", null],
    ]);
    // The dead node, back, cannot take what was withdrawn.
    expect(await L.claimStarts(sql(), dead, 10)).toEqual([]);
  });
});

describe("one home, one desktop", () => {
  /** The node runs the VM through its whole life and stops it (the lifecycle's own events). */
  async function runAndStop(vmId: number, host: number) {
    expect((await L.claimStarts(sql(), host, 10)).map((c) => c.vmId)).toContain(vmId);
    expect(await L.transition(sql(), "started", "hkd", vmId, host)).toBe(true);
    expect(await L.transition(sql(), "stop_begun", "hkd", vmId, host)).toBe(true);
    expect(await L.transition(sql(), "stopped", "hkd", vmId, host)).toBe(true);
  }

  test("a user's second desktop is refused while the first runs (409 naming it), and starts once it has stopped", async () => {
    const h = await node(1e6);
    const [d1, d2] = await desktops(2, { user: "homer" });
    await start(d1!);
    const err = await start(d2!).catch((e) => e);
    expect(err).toBeInstanceOf(D.HomeInUseError);
    expect(err.status).toBe(409);
    expect(err.message).toBe('the home of user "homer" is in use by their desktop "homer-d1"; stop it first');
    const [r] = await sql()`SELECT vm_cmd, host_id, home_key FROM vm_runtimes WHERE vm_id = ${d2!}`;
    expect(r).toEqual({ vm_cmd: null, host_id: null, home_key: null }); // nothing of the refused start stays
    await runAndStop(d1!, h);
    expect((await start(d2!)).host_id).toBe(h);
  });

  test("two desktops of one home started at once, twenty times: exactly one wins each time", async () => {
    const h = await node(1e6);
    const [d1, d2] = await desktops(2);
    for (let round = 0; round < 20; round++) {
      const res = await Promise.allSettled([start(d1!, "l7r"), start(d2!, "api")]);
      const won = res.flatMap((r, i) => (r.status === "fulfilled" ? [[d1, d2][i]!] : []));
      expect(won.length).toBe(1);
      const lost = res.find((r) => r.status === "rejected") as PromiseRejectedResult;
      expect(lost.reason).toBeInstanceOf(D.HomeInUseError);
      await runAndStop(won[0]!, h);
    }
  });

  test("homes are per tenant: a user of the same name in another tenant runs a desktop at the same time", async () => {
    await node(1e6);
    const acme = await D.create(sql(), D.tenants, ALL, { name: "acme" });
    const [mine] = await desktops(1, { user: "twin" });
    const acmeOsf = await D.create(sql(), D.osfs, ALL, { tenant_id: acme.id, name: "m512", memory_mb: 512 });
    const [theirs] = await desktops(1, { user: "twin", tenant: acme.id, osf: acmeOsf.id });
    await start(mine!);
    await start(theirs!);
    const keys = await sql()`SELECT home_key FROM vm_runtimes WHERE vm_id IN (${mine!}, ${theirs!}) ORDER BY vm_id`;
    expect(new Set(keys.map((k) => k.home_key)).size).toBe(2);
  });
});

describe("what the user hears from the L7R", () => {
  const dir = mkdtempSync("/tmp/qvd-placement-");
  let l7r: L7r;
  const PARAMS = "qvd.client.os=linux&qvd.client.geometry=1024x768";
  const connect = async (user: string, vmId: number) => {
    const c = await WireClient.connect(l7r.port);
    c.send(
      `GET /qvd/connect_to_vm?id=${vmId}&${PARAMS} HTTP/1.1\r\nAuthorization: ${basic(user, "user-pw-1")}\r\nConnection: Upgrade\r\nUpgrade: QVD/1.0\r\n\r\n`,
    );
    const out = await c.final();
    c.end();
    return out;
  };

  beforeAll(async () => {
    await selfSignedCert(dir);
    await D.create(sql(), D.hosts, ALL, { name: "pl-front", address: "127.0.0.1", backend: false });
    l7r = await startL7r({
      sql: sql(),
      databaseUrl: db().url,
      nodename: "pl-front",
      hostname: "127.0.0.1",
      port: 0,
      aliveWithinS: ALIVE,
      tls: { cert: join(dir, "cert.pem"), key: join(dir, "key.pem") },
      timeouts: { vmStart: 3 },
    });
  });
  afterAll(async () => {
    await l7r?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  test("a start queued behind a node's starts: 102 lines say so and how many are ahead", async () => {
    await sql()`UPDATE host_runtimes SET state = 'running' WHERE host_id = (SELECT id FROM hosts WHERE name = 'pl-front')`;
    const busy = await node(1e6, { name: "busy" });
    const starting = await oneEach(4);
    await sql()`UPDATE vm_runtimes SET host_id = ${busy}, vm_state = 'starting' WHERE vm_id IN ${sql()(starting)}`;
    const queued = await oneEach(2);
    for (const v of queued) await start(v);
    await desktops(1, { user: "carol", password: "user-pw-1" });
    const [carolVm] = (await sql()`SELECT v.id FROM vms v JOIN users u ON u.id = v.user_id WHERE u.name = 'carol'`).map(
      (r) => r.id as number,
    );
    const { progress, res } = await connect("carol", carolVm!);
    expect(progress).toContain("Waiting for a free start slot on node busy (2 ahead)");
    expect(res.status).toBe(503); // nothing claims it here: the start times out
    const [r] = await sql()`SELECT host_id, vm_cmd FROM vm_runtimes WHERE vm_id = ${carolVm!}`;
    expect(r).toEqual({ host_id: busy, vm_cmd: "start" });
  });

  test("a start placed on a node that went quiet before taking it is placed again at the user's next connect", async () => {
    await sql()`UPDATE host_runtimes SET state = 'running' WHERE host_id = (SELECT id FROM hosts WHERE name = 'pl-front')`;
    const quiet = await node(1e6, { okAgoS: ALIVE + 30 });
    const fresh = await node(1e6);
    const [vm] = await desktops(1, { user: "erin", password: "user-pw-1" });
    await sql()`UPDATE vm_runtimes SET host_id = ${quiet}, vm_cmd = 'start', vm_cmd_ts = now() WHERE vm_id = ${vm!}`;
    const { progress } = await connect("erin", vm!);
    expect(progress).toContain(`Assigning VM ${vm} to host`);
    const [r] = await sql()`SELECT host_id, vm_cmd FROM vm_runtimes WHERE vm_id = ${vm!}`;
    expect(r).toEqual({ host_id: fresh, vm_cmd: "start" });
  });

  test("connecting to a second desktop of a home in use: 503 naming the desktop that holds it", async () => {
    await sql()`UPDATE host_runtimes SET state = 'running' WHERE host_id = (SELECT id FROM hosts WHERE name = 'pl-front')`;
    await node(1e6);
    const [d1, d2] = await desktops(2, { user: "dave", password: "user-pw-1" });
    await start(d1!);
    const { res } = await connect("dave", d2!);
    expect([res.status, res.body]).toEqual([
      503,
      'The requested virtual machine is not available: the home of user "dave" is in use by their desktop "dave-d1"; stop it first, retry later.',
    ]);
  });
});
