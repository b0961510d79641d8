// A farm of three nodes (test/support/farm.ts): three `qvd node` processes, each in a network
// namespace of its own, joined by a farm network; PostgreSQL reached over it by TCP and TLS;
// one shared storage directory; the real desktop image (busybox for the placement counts).
// Booted once; the scenarios run in order and build on each other: placement, a desktop on
// another node, node death, return, contention, fencing, expiry, database failover.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { copyFileSync, readFileSync } from "node:fs";
import { join } from "node:path";
import * as D from "../src/db/index.ts";
import { checkDatabaseTls } from "../src/db/pool.ts";
import { run } from "../src/run.ts";
import { startTestApi, type TestApi } from "./support/api.ts";
import type { TestDatabase } from "./support/db.ts";
import { ADMIN, L7R_PORT, PEER_PORT, TestFarm, type FarmNode } from "./support/farm.ts";
import { busyboxImage, desktopImage, spawnClient, until } from "./support/node.ts";
import { screenMean, startXvfb } from "./support/services.ts";

const isRoot = process.getuid?.() === 0;
const ALL = D.ALL_TENANTS;
const FENCE_AFTER = 6;
const LOST_AFTER = 10;
const MAX_STARTING = 2;
/** Whether the roles take libpq's multi-host URLs (the database failover needs them). */
const multiHost = (() => {
  try {
    checkDatabaseTls(
      "postgres://u:p@198.19.0.2:5432,198.19.0.3:5432/qvd?sslmode=require&target_session_attrs=read-write",
    );
    return true;
  } catch {
    return false;
  }
})();

describe.skipIf(!isRoot)("a farm of three nodes", () => {
  const farm = new TestFarm({
    settings: {
      "hkd.poll_interval": "2",
      "hkd.heartbeat_interval": "1",
      "hkd.vma_check_interval": "2",
      "hkd.timeout.vma_start": "60",
      "hkd.fence_after": String(FENCE_AFTER),
      "cluster.lost_after": String(LOST_AFTER),
      "cluster.alive_within": "5",
      "hkd.max_starting": String(MAX_STARTING),
      "l7r.timeout.vm_start": "120",
      // 50 logins of one account at once (contention) are not a password guesser.
      "auth.throttle.account.tries": "200",
      "auth.throttle.address.tries": "1000",
    },
  });
  let api: TestApi;
  const sql = () => farm.sql;
  const vmOf: Record<string, D.VmRow> = {};
  const PW = "farm-user-pw-1";
  /** Every sample of where each desktop ran (lxc-ls in every node's namespace): a desktop on two nodes at once is recorded. */
  const twice: string[] = [];
  let sampling = true;
  let sampler: Promise<void> | undefined;

  beforeAll(async () => {
    const image = await desktopImage();
    if (multiHost) await farm.start({ replica: true });
    else await farm.start();
    api = await startTestApi({ url: farm.url, sql: farm.sql } as TestDatabase, {
      ...farm.settings,
      "path.storage.images": join(farm.storage, "images"),
    });
    const debian = await D.create(sql(), D.osfs, ALL, { tenant_id: 1, name: "debian", memory_mb: 1024 });
    const tiny = await D.create(sql(), D.osfs, ALL, { tenant_id: 1, name: "busybox", memory_mb: 4096 });
    await farm.addImage(debian.id, "desktop.tar.gz", async (p) => copyFileSync(image, p));
    await farm.addImage(tiny.id, "busybox.tar.gz", busyboxImage);
    const mk = async (name: string, osf: number) => {
      const u = await D.create(sql(), D.users, ALL, { tenant_id: 1, name, password: PW });
      vmOf[name] = await D.createVm(
        sql(),
        ALL,
        { user_id: u.id, osf_id: osf, name: `${name}-desktop` },
        { range: "198.18.0.0/16" },
      );
    };
    for (const n of ["alice", "bob", "carol"]) await mk(n, debian.id);
    for (let i = 1; i <= 12; i++) await mk(`p${i}`, tiny.id);
    sampler = (async () => {
      while (sampling) {
        const by = await farm.containersByNode();
        const seen = new Map<string, string[]>();
        for (const [node, cs] of Object.entries(by)) for (const c of cs) seen.set(c, [...(seen.get(c) ?? []), node]);
        for (const [c, nodes] of seen) if (nodes.length > 1) twice.push(`${c} on ${nodes.join(", ")}`);
        await Bun.sleep(300);
      }
    })();
  }, 30 * 60_000);

  afterAll(async () => {
    sampling = false;
    await sampler;
    await api?.stop();
    await farm.stop();
  }, 300_000);

  const state = async (vmId: number) =>
    (await sql()`SELECT vm_state, user_state, host_id, vma_secret FROM vm_runtimes WHERE vm_id = ${vmId}`)[0]!;
  const hostName = async (vmId: number) => (await farm.nodeOfVm(vmId))?.name;
  /**
   * A user's session with `qvd client` (nxproxy on an Xvfb display of the test) from the client
   * namespace on the farm network, through `node`'s L7R: resolves once the desktop's pixels are
   * on the display; `end()` logs out.
   */
  const session = async (node: FarmNode, user: string, display: number) => {
    const { ensureDeps } = await import("../scripts/deps.ts");
    await ensureDeps(["xvfb", "nxproxy", "xwd", "xsetroot", "imagemagick"], () => {});
    const vm = vmOf[user]!;
    const xvfb = await startXvfb(display);
    let client: ReturnType<typeof spawnClient> | undefined;
    const end = async () => {
      client?.kill("SIGTERM");
      await client?.exited;
      await xvfb.stop();
    };
    try {
      await run(["xsetroot", "-display", `:${display}`, "-solid", "black"], { allowFail: true });
      const mean = () => screenMean(display);
      const before = await mean();
      client = spawnClient(farm.clientNs.exec, farm.binary, {
        host: node.address,
        port: L7R_PORT,
        user,
        password: PW,
        display,
      });
      await until(
        async () => (await state(vm.id)).user_state === "connected" || client!.exitCode !== null,
        `${user}'s session`,
        300_000,
      );
      if (client.exitCode !== null)
        throw new Error(`qvd client exited: ${(await new Response(client.stderr).text()).trim()}`);
      await until(async () => (await mean()) > before + 0.05, "the desktop's pixels on the user's display", 90_000);
      return { end, client };
    } catch (err) {
      await end();
      throw err;
    }
  };

  /** connect_to_vm through `node` until a 101 (a released desktop needs lost_after and a start). */
  const connectUntil101 = async (node: FarmNode, user: string, ms = 180_000) => {
    const end = Date.now() + ms;
    let last = "";
    for (;;) {
      const c = await farm
        .connect(node, user, PW, vmOf[user]!.id)
        .catch((e: Error) => ({ status: 0, body: e.message, progress: [] as string[], nx: "", close() {} }));
      if (c.status === 101) return c as Awaited<ReturnType<TestFarm["connect"]>>;
      c.close();
      last = `${c.status} ${String(c.body).trim()} ${c.progress.slice(-2).join(" / ")}`;
      if (Date.now() > end) throw new Error(`no 101 through node ${node.name}: last answer ${last}`);
      await Bun.sleep(1000);
    }
  };

  test("placement: twelve desktops started together spread over the three nodes; none exceeds hkd.max_starting at once", async () => {
    const admin = await api.login(ADMIN.name, ADMIN.password);
    const ids = Array.from({ length: 12 }, (_, i) => vmOf[`p${i + 1}`]!.id);
    let maxStarting = 0;
    let watching = true;
    const watch = (async () => {
      while (watching) {
        const rows =
          await sql()`SELECT host_id, count(*)::int AS n FROM vm_runtimes WHERE vm_state = 'starting' AND vm_id = ANY(${ids}) GROUP BY host_id`;
        for (const r of rows) maxStarting = Math.max(maxStarting, r.n);
        await Bun.sleep(50);
      }
    })();
    const answers = await Promise.all(ids.map((id) => admin.post(`/vms/${id}/start`)));
    for (const a of answers) expect(a.status, JSON.stringify(a.body)).toBeLessThan(300);
    await until(
      async () =>
        (await sql()`SELECT count(*)::int AS n FROM vm_runtimes WHERE vm_state = 'running' AND vm_id = ANY(${ids})`)[0]!
          .n === 12,
      "twelve desktops running",
      300_000,
    );
    watching = false;
    await watch;
    const per =
      await sql()`SELECT h.name, count(*)::int AS n FROM vm_runtimes r JOIN hosts h ON h.id = r.host_id WHERE r.vm_id = ANY(${ids}) GROUP BY h.name ORDER BY h.name`;
    const counts = Object.fromEntries(per.map((r) => [r.name, r.n]));
    expect(Object.keys(counts).length, JSON.stringify(counts)).toBeGreaterThanOrEqual(2);
    expect(Math.max(...(Object.values(counts) as number[])), JSON.stringify(counts)).toBeLessThan(12);
    expect(maxStarting).toBeLessThanOrEqual(MAX_STARTING);
    // What the nodes themselves run agrees with the database.
    const by = await farm.containersByNode();
    for (const [name, n] of Object.entries(counts))
      expect(by[name]!.filter((c) => ids.some((id) => c === `qvd-${id}`)).length).toBe(n as number);
    // Free the nodes for what follows.
    await Promise.all(ids.map((id) => admin.post(`/vms/${id}/stop`)));
    await until(
      async () =>
        (await sql()`SELECT count(*)::int AS n FROM vm_runtimes WHERE vm_state = 'stopped' AND vm_id = ANY(${ids})`)[0]!
          .n === 12,
      "the twelve stopped",
      120_000,
    );
  }, 600_000);

  test("a desktop on another node: through node C's L7R to a desktop on node A, pixels on the user's display, only TLS between C and A, no VMA secret on the wire", async () => {
    const [a, , c] = farm.nodes as [FarmNode, FarmNode, FarmNode];
    const vm = vmOf.alice!;
    // Only node A takes new desktops while alice's starts: the others are drained for a moment.
    await sql()`UPDATE host_runtimes SET drain = true WHERE host_id <> ${a.host!.id}`;
    const pcap = join(farm.root, "c-a.pcap");
    let dump: Bun.Subprocess | undefined;
    try {
      dump = Bun.spawn(
        [
          ...farm.farmNs.exec,
          "tcpdump",
          "-i",
          "farmbr",
          "-U",
          "-w",
          pcap,
          "-s",
          "0",
          `host ${a.address} and host ${c.address}`,
        ],
        { stdout: "ignore", stderr: "ignore" },
      );
      await until(
        () => {
          try {
            return readFileSync(pcap).length >= 24;
          } catch {
            return false;
          }
        },
        "tcpdump to capture",
        20_000,
      );
      // The user's machine is on the farm network (the client namespace) and talks to node C.
      const s = await session(c, "alice", 71);
      try {
        expect(await hostName(vm.id)).toBe("a");
        // A file in alice's home, for the node death that follows.
        const w = await a.attach(vm.id, "echo 'written on node A' > /home/alice/farm.txt", "alice");
        expect(w.status, w.stderr).toBe(0);
      } finally {
        await s.end();
      }
      const secret = (await state(vm.id)).vma_secret as string;
      expect(secret.length).toBeGreaterThan(8);
      await until(async () => (await state(vm.id)).user_state === "disconnected", "the session to be released", 30_000);
      dump.kill("SIGTERM");
      await dump.exited;
      dump = undefined;
      const bytes = readFileSync(pcap);
      const flows = tcpFlows(bytes);
      expect(flows.size, "traffic between C and A").toBeGreaterThan(0);
      for (const [key, f] of flows) {
        // Every connection between the two nodes is to the peer endpoint, and TLS from its first byte each way.
        expect(f.ports.includes(PEER_PORT), `${key}: not the peer port`).toBe(true);
        for (const first of f.first)
          if (first) expect(first.subarray(0, 3).toString("hex"), `${key}: not a TLS record`).toMatch(/^1603(01|03)$/);
      }
      expect(bytes.includes(Buffer.from(secret)), "the VMA secret in the capture").toBe(false);
      expect(bytes.includes(Buffer.from("NXPROXY-")), "NX in clear in the capture").toBe(false);
      expect(bytes.includes(Buffer.from("x-qvd-vma-secret")), "a VMA call in clear").toBe(false);
    } finally {
      dump?.kill("SIGKILL");
      await sql()`UPDATE host_runtimes SET drain = false`;
    }
  }, 900_000);

  test("the desktop in a web browser takes the same path: a WebSocket to node C's L7R gets the screen of alice's desktop on node A", async () => {
    const c = farm.nodes[2]!;
    const vm = vmOf.alice!;
    const origin = `https://${c.address}:${L7R_PORT}`;
    const t = await run([
      ...farm.clientNs.exec,
      "curl",
      "-sk",
      "--max-time",
      "10",
      "-H",
      `Authorization: Basic ${Buffer.from(`alice:${PW}`).toString("base64")}`,
      `${origin}/qvd/create_auth_token`,
    ]);
    const token = (JSON.parse(t.stdout) as { auth_token: string }).auth_token.trim();
    const cases = [
      { name: "remote", send: [JSON.stringify({ token, id: vm.id, width: 800, height: 600 })], untilBinary: true },
    ];
    const probe = await run(
      [
        ...farm.clientNs.exec,
        process.execPath,
        join(import.meta.dir, "support", "ws-probe.ts"),
        `wss://${c.address}:${L7R_PORT}/qvd/web/connect`,
        origin,
        JSON.stringify(cases),
      ],
      { allowFail: true, timeoutMs: 320_000 },
    );
    const got = JSON.parse(probe.stdout.trim().split("\n").at(-1) ?? "{}") as { code?: number; frames?: string[] };
    const frames = got.frames ?? [];
    expect(
      frames.some((f) => f.startsWith("{") && JSON.parse(f).type === "progress"),
      probe.stdout + probe.stderr,
    ).toBe(true);
    expect(frames.some((f) => f.startsWith("{") && JSON.parse(f).type === "ready")).toBe(true);
    // Xvnc's own greeting, from the session's display on node C, showing the desktop of node A.
    expect(frames.at(-1)).toMatch(/^<binary \d+> RFB 003\.008/);
    expect(got.code).toBe(1000);
    expect(await hostName(vm.id)).toBe("a");
    await until(
      async () => (await state(vm.id)).user_state === "disconnected",
      "the browser's session to be released",
      30_000,
    );
  }, 600_000);

  let failoverMs = 0;
  test("node death: every process of node A killed mid-session and cut off; the next connect through node B gets the desktop back on B or C with the home's file", async () => {
    const [a, b] = farm.nodes as [FarmNode, FarmNode];
    const vm = vmOf.alice!;
    expect(await hostName(vm.id)).toBe("a");
    expect(await a.containers()).toContain(`qvd-${vm.id}`);
    // Mid-session: alice holds a session through node B to her desktop on node A.
    const held = await connectUntil101(b, "alice");
    expect(held.nx).toMatch(/^NXPROXY-/);
    const t0 = performance.now();
    await a.kill();
    await a.cut();
    held.close();
    expect(await a.containers()).toEqual([]);
    const back = await connectUntil101(b, "alice", 240_000);
    failoverMs = performance.now() - t0;
    back.close();
    const now = await farm.nodeOfVm(vm.id);
    expect(["b", "c"]).toContain(now?.name ?? "none");
    expect((await now!.attach(vm.id, "cat /home/alice/farm.txt", "alice")).stdout).toBe("written on node A\n");
    const [ra] = await sql()`SELECT state, lost_reason FROM host_runtimes WHERE host_id = ${a.host!.id}`;
    expect(ra!.state).toBe("lost");
    expect(twice).toEqual([]);
    console.log(`node death → desktop back: ${(failoverMs / 1000).toFixed(1)} s (lost_after ${LOST_AFTER} s)`);
  }, 600_000);

  test("return: node A comes back, removes its stale containers and does not run the released desktop", async () => {
    const a = farm.node("a");
    const vm = vmOf.alice!;
    expect(await a.knownContainers()).toContain(`qvd-${vm.id}`); // what the dead node left behind
    await a.cut(false);
    await a.start();
    await until(
      async () => !(await a.knownContainers()).includes(`qvd-${vm.id}`),
      "node A to remove its stale container",
      60_000,
    );
    await Bun.sleep(3000); // a few heartbeats and polls of the returned node
    expect(await a.containers()).toEqual([]);
    expect(["b", "c"]).toContain((await hostName(vm.id)) ?? "none");
    const [ra] = await sql()`SELECT state FROM host_runtimes WHERE host_id = ${a.host!.id}`;
    expect(ra!.state).toBe("running");
    // Its cleanup left the desktop's writable layer on shared storage alone: the desktop, running
    // on another node over that layer, still writes files, and its user still connects.
    const now = (await farm.nodeOfVm(vm.id))!;
    expect((await now.attach(vm.id, "touch /tmp/after-return && echo ok")).stdout).toBe("ok\n");
    const c = await connectUntil101(now, "alice", 60_000);
    expect(c.nx).toMatch(/^NXPROXY-/);
    c.close();
    expect(twice).toEqual([]);
  }, 300_000);

  test("contention: 50 concurrent connect_to_vm for one desktop through the three L7Rs cause exactly one start", async () => {
    const vm = vmOf.bob!;
    expect((await state(vm.id)).vm_state).toBe("stopped");
    const [before] = await sql()`SELECT run_attempts::int AS n FROM vm_counters WHERE vm_id = ${vm.id}`;
    const results = await Promise.all(
      Array.from({ length: 50 }, (_, i) =>
        farm.connect(farm.nodes[i % 3]!, "bob", PW, vm.id).then(
          (c) => (c.close(), { status: c.status, body: `${c.body} ${c.progress.at(-1) ?? ""}`.trim() }),
          (e: Error) => ({ status: 0, body: e.message }),
        ),
      ),
    );
    const [after] = await sql()`SELECT run_attempts::int AS n FROM vm_counters WHERE vm_id = ${vm.id}`;
    expect(after!.n - before!.n).toBe(1);
    expect(results.filter((r) => r.status === 101).length).toBeGreaterThan(0);
    expect(
      results.filter((r) => r.status !== 101 && !/contending|taken over/i.test(r.body)),
      JSON.stringify(results),
    ).toEqual([]);
    const by = await farm.containersByNode();
    expect(Object.values(by).filter((cs) => cs.includes(`qvd-${vm.id}`)).length).toBe(1);
    expect(twice).toEqual([]);
  }, 600_000);

  test("a stranger on the farm network reaches no desktop: not routed through the desktop's node, not through its node-to-node endpoint without a node certificate", async () => {
    const vm = vmOf.bob!;
    const node = (await farm.nodeOfVm(vm.id))!;
    const { vm_address } = (
      await sql()`SELECT host(vm_address) AS vm_address FROM vm_runtimes WHERE vm_id = ${vm.id}`
    )[0]!;
    const curl = (args: string[]) =>
      run([...farm.clientNs.exec, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3", ...args], {
        allowFail: true,
      });
    // The client machine routes the VM network through the desktop's node, as an attacker on the farm network would.
    await run([...farm.clientNs.exec, "ip", "route", "replace", "198.18.0.0/16", "via", node.address]);
    try {
      for (const port of [3030, 4100]) {
        const r = await curl([`http://${vm_address}:${port}/`]);
        expect(r.status, `${vm_address}:${port} answered ${r.stdout}`).not.toBe(0);
      }
    } finally {
      await run([...farm.clientNs.exec, "ip", "route", "del", "198.18.0.0/16"], { allowFail: true });
    }
    // The node-to-node endpoint takes only farm node certificates: without one, no HTTP answer at all.
    const peer = await curl(["-k", `https://${node.address}:${PEER_PORT}/`]);
    expect(peer.stdout).toBe("000");
  }, 120_000);

  test("fencing: a node cut off from the database stops its desktops after hkd.fence_after; another node serves them after cluster.lost_after", async () => {
    const vm = vmOf.bob!;
    const x = (await farm.nodeOfVm(vm.id))!;
    const other = farm.nodes.find((n) => n !== x)!;
    expect(await x.containers()).toContain(`qvd-${vm.id}`);
    const t0 = performance.now();
    await x.cut();
    // The node is alive (its processes run) but cannot reach the database: it fences itself.
    await until(
      async () => !(await x.containers()).includes(`qvd-${vm.id}`),
      `node ${x.name} to stop its desktop`,
      60_000,
    );
    const fencedS = (performance.now() - t0) / 1000;
    // Not before fence_after (less the heartbeat the node may have missed just before the cut).
    expect(fencedS).toBeGreaterThanOrEqual(FENCE_AFTER - 3);
    expect(x.running).toBe(true);
    const c = await connectUntil101(other, "bob", 240_000);
    c.close();
    expect(await hostName(vm.id)).not.toBe(x.name);
    // Back on the network: the fenced node rejoins and does not run the desktop.
    await x.cut(false);
    await until(
      async () => (await sql()`SELECT state FROM host_runtimes WHERE host_id = ${x.host!.id}`)[0]!.state === "running",
      `node ${x.name} to rejoin`,
      120_000,
    );
    // Once back it stays: the other nodes do not declare it lost again (a few heartbeats later).
    const lostTs = (await sql()`SELECT lost_ts FROM host_runtimes WHERE host_id = ${x.host!.id}`)[0]!.lost_ts;
    await Bun.sleep(4000);
    expect((await sql()`SELECT state, lost_ts FROM host_runtimes WHERE host_id = ${x.host!.id}`)[0]).toEqual({
      state: "running",
      lost_ts: lostTs,
    });
    expect(await x.containers()).not.toContain(`qvd-${vm.id}`);
    // The rejoined node's cleanup left the layer the desktop now runs over alone.
    const now = (await farm.nodeOfVm(vm.id))!;
    expect((await now.attach(vm.id, "touch /tmp/after-rejoin && echo ok")).stdout).toBe("ok\n");
    expect(twice).toEqual([]);
  }, 600_000);

  test("expiry: the soft expiry shows its notice in the session; the hard expiry stops the desktop", async () => {
    const vm = vmOf.carol!;
    const s = await session(farm.nodes[0]!, "carol", 72);
    const node = (await farm.nodeOfVm(vm.id))!;
    try {
      const { NOTICE_TITLE } = await import("../src/vma/expiry.ts");
      await D.setVmExpiry(sql(), ALL, vm.id, { soft_at: new Date(), hard_at: new Date(Date.now() + 3600_000) });
      // The session's window list: xmessage with the notice's title, run by the VMA as carol.
      const notices = async () =>
        (await node.attach(vm.id, "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done")).stdout
          .split("\n")
          .filter((l) => l.includes("xmessage") && l.includes(NOTICE_TITLE));
      await until(async () => (await notices()).length === 1, "the soft-expiry notice in the session", 60_000);
    } finally {
      await s.end();
    }
    await D.setVmExpiry(sql(), ALL, vm.id, { hard_at: new Date() });
    await until(async () => (await state(vm.id)).vm_state === "stopped", "the hard expiry to stop the desktop", 60_000);
    expect(await node.containers()).not.toContain(`qvd-${vm.id}`);
  }, 600_000);

  (multiHost ? test : test.todo)(
    "database failover: the primary stops, the replica is promoted; every node follows, no desktop stops, no node is lost, a new connect works",
    async () => {
      const vm = vmOf.alice!;
      // alice works in her desktop (qvd client, nxproxy, pixels) through node B during the failover.
      const held = await session(farm.nodes[1]!, "alice", 73);
      try {
        const runningBefore = (
          await sql()`SELECT vm_id FROM vm_runtimes WHERE vm_state = 'running' ORDER BY vm_id`
        ).map((r) => r.vm_id);
        const containersBefore = await farm.containersByNode();
        const lostBefore = (await sql()`SELECT host_id, state, lost_ts FROM host_runtimes ORDER BY host_id`).map(
          (r) => `${r.host_id} ${r.lost_ts?.toISOString()}`,
        );
        const { promotedAt } = await farm.failover();
        // Every node heartbeats on the new primary.
        await until(
          async () => {
            const rows =
              await sql()`SELECT count(*)::int AS n FROM host_runtimes WHERE ok_ts > now() - interval '2 seconds' AND state = 'running'`;
            return rows[0]!.n === farm.nodes.length;
          },
          "every node to heartbeat on the new primary",
          60_000,
        );
        const c = await connectUntil101(farm.nodes[2]!, "bob", 120_000);
        const backMs = performance.now() - promotedAt;
        c.close();
        // The session held through the failover is still open.
        expect(held.client.exitCode).toBeNull();
        expect((await state(vm.id)).user_state).toBe("connected");
        console.log(`database promoted → farm serving connects: ${(backMs / 1000).toFixed(1)} s`);
        expect(
          (
            await sql()`SELECT vm_id FROM vm_runtimes WHERE vm_state = 'running' AND vm_id <> ${vmOf.bob!.id} ORDER BY vm_id`
          ).map((r) => r.vm_id),
        ).toEqual(runningBefore.filter((id) => id !== vmOf.bob!.id));
        expect((await sql()`SELECT count(*)::int AS n FROM host_runtimes WHERE state = 'lost'`)[0]!.n).toBe(0);
        expect(
          (await sql()`SELECT host_id, state, lost_ts FROM host_runtimes ORDER BY host_id`).map(
            (r) => `${r.host_id} ${r.lost_ts?.toISOString()}`,
          ),
        ).toEqual(lostBefore);
        const after = await farm.containersByNode();
        for (const [n, cs] of Object.entries(containersBefore)) for (const ct of cs) expect(after[n]).toContain(ct);
        expect(await hostName(vm.id)).toBeDefined();
      } finally {
        await held.end();
      }
    },
    600_000,
  );

  test("no node logged the database password", () => {
    for (const n of farm.nodes)
      expect(readFileSync(n.logFile, "utf8").includes(farm.dbPassword), `node ${n.name}'s log`).toBe(false);
  });
});

/** TCP connections in a pcap file: their ports and the first payload of each direction. */
function tcpFlows(pcap: Buffer): Map<string, { ports: number[]; first: [Buffer | undefined, Buffer | undefined] }> {
  const flows = new Map<string, { ports: number[]; first: [Buffer | undefined, Buffer | undefined] }>();
  const le = pcap.readUInt32LE(0) === 0xa1b2c3d4 || pcap.readUInt32LE(0) === 0xa1b23c4d;
  const u32 = (o: number) => (le ? pcap.readUInt32LE(o) : pcap.readUInt32BE(o));
  for (let o = 24; o + 16 <= pcap.length; ) {
    const len = u32(o + 8);
    const pkt = pcap.subarray(o + 16, o + 16 + len);
    o += 16 + len;
    if (pkt.length < 34 || pkt.readUInt16BE(12) !== 0x0800) continue; // Ethernet, IPv4
    const ip = pkt.subarray(14);
    if (ip[9] !== 6) continue; // TCP
    const ihl = (ip[0]! & 0x0f) * 4;
    const total = ip.readUInt16BE(2);
    const tcp = ip.subarray(ihl, total);
    const [src, dst] = [ip.subarray(12, 16).join("."), ip.subarray(16, 20).join(".")];
    const [sp, dp] = [tcp.readUInt16BE(0), tcp.readUInt16BE(2)];
    const payload = tcp.subarray((tcp[12]! >> 4) * 4);
    const [lo, hi] = [`${src}:${sp}`, `${dst}:${dp}`].sort();
    const key = `${lo}-${hi}`;
    const f = flows.get(key) ?? { ports: [sp, dp], first: [undefined, undefined] };
    flows.set(key, f);
    const dir = `${src}:${sp}` === lo ? 0 : 1;
    if (payload.length > 0 && !f.first[dir]) f.first[dir] = Buffer.from(payload);
  }
  return flows;
}
