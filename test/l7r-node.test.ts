// connect_to_vm through to the desktop: `qvd node` (HKD + L7R in one process) in a network
// namespace of this test, the real Debian desktop image, and a client speaking the QVD protocol
// from inside the namespace: list_of_vm, connect_to_vm → 102s → 101 → NX bytes from nxagent.
// A second namespace, joined to the first by a veth (the farm network), runs `qvd l7r` alone: a
// second node whose L7R takes a session over from the first node's and reaches the desktop
// through node A's node-to-node TLS endpoint (src/l7r/peer.ts): no route to the VM network, no
// vm_ports, and nothing but TLS between the nodes (captured with tcpdump).
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { createWriteStream, existsSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import * as D from "../src/db/index.ts";
import { run } from "../src/run.ts";
import { startTestApi } from "./support/api.ts";
import { ok } from "./support/assert.ts";
import { TEST_ADMIN, useTestDatabase } from "./support/db.ts";
import {
  cleanEnv,
  createNetns,
  desktopImage,
  farmCert,
  l7rProbe,
  l7rProbeArgv,
  TestNode,
  type Netns,
} from "./support/node.ts";
import { screenMean, startXvfb } from "./support/services.ts";
import { until } from "./support/wait.ts";

const isRoot = process.getuid?.() === 0;
const db = useTestDatabase();
const ALL = D.ALL_TENANTS;
const PORT = 8443;
const PEER_PORT = 8442;
/** The farm network between the two namespaces. */
const [ADDR_A, ADDR_B] = ["198.19.255.1", "198.19.255.2"];

describe.skipIf(!isRoot)("the L7R of a node, through to nxagent", () => {
  const node = new TestNode(db, "l7rnode");
  let vm: D.VmRow;
  const sql = () => db().sql;
  /** The second node (namespace, veth, `qvd l7r`), removed in afterAll whatever happened. */
  let nsB: Netns | undefined;
  let ifB = "";
  let l7rB: Bun.Subprocess | undefined;
  let dump: Bun.Subprocess | undefined;

  beforeAll(async () => {
    const image = await desktopImage();
    await node.setup();
    ({ vm } = await node.addDesktop(image, { password: "alice-pw-1" }));
    // Node B: its own namespace and a veth to node A's, the farm network (no route to the VM network).
    const nb = (nsB = await createNetns());
    const tag = nb.name.slice(-6);
    const ifA = `qa${tag}`;
    ifB = `qb${tag}`;
    await run([...node.ns.exec, "ip", "link", "add", ifA, "type", "veth", "peer", "name", ifB, "netns", nb.name]);
    await run([...node.ns.exec, "ip", "addr", "add", `${ADDR_A}/30`, "dev", ifA]);
    await run([...node.ns.exec, "ip", "link", "set", ifA, "up"]);
    await run([...nb.exec, "ip", "addr", "add", `${ADDR_B}/30`, "dev", ifB]);
    await run([...nb.exec, "ip", "link", "set", ifB, "up"]);
    // Node A is reached at its farm address, where its node-to-node endpoint listens.
    await sql()`UPDATE hosts SET address = ${ADDR_A} WHERE id = ${node.host.id}`;
    node.host.address = ADDR_A;
    await node.startNode(PORT, {
      "hkd.timeout.vma_start": "60",
      "cluster.peer.listen": "",
      "cluster.peer.port": String(PEER_PORT),
    });
  }, 30 * 60_000);

  afterAll(async () => {
    dump?.kill("SIGKILL");
    if (l7rB) {
      l7rB.kill("SIGTERM");
      await l7rB.exited;
    }
    await nsB?.remove(); // takes its end of the veth, and so the pair, with it
    await node.stop();
  }, 120_000);

  const probeArgv = (mode = "", ns: Netns = node.ns) => l7rProbeArgv(ns.exec, PORT, "alice", "alice-pw-1", vm.id, mode);
  const probe = (mode = "") => l7rProbe(node.ns.exec, PORT, "alice", "alice-pw-1", vm.id, mode);

  test("connect_to_vm starts the stopped desktop and upgrades to NX", async () => {
    const out = await probe();
    expect(out.list.status).toBe(200);
    expect(JSON.parse(out.list.body)).toEqual([
      { id: vm.id, name: "desktop", state: "stopped", blocked: 0, is_application: 0 },
    ]);
    const p: string[] = out.progress;
    expect(p[0]).toBe(`Session acquired for VM_ID: ${vm.id}`);
    expect(p).toContain(`Assigning VM ${vm.id} to host`);
    expect(p).toContain("Starting virtual machine");
    expect(p).toContain(`Starting X session at VM ${vm.id}`);
    expect(p).toContain(`Waiting for X session to come up on VM ${vm.id}`);
    expect(p.at(-2)).toBe(`Connecting X session for VM_ID: ${vm.id}`);
    expect(p.at(-1)).toBe("Connection established");
    expect(out.final.status).toBe(101);
    expect(out.final.reason).toBe("Switching Protocols");
    expect(out.final.lines).toHaveLength(1);
    expect(out.final.lines[0]).toMatch(/^X-QVD-Slave-Key: [A-Za-z0-9]{64}$/);
    // Our greeting went through the splice to nxagent, which answered with its own.
    expect(out.nx).toMatch(/^NXPROXY-\d+\.\d+\.\d+/);
    // The client has gone: the session is free again, the desktop keeps running.
    await until(
      async () => (await D.get(sql(), D.vms, ALL, vm.id)).user_state === "disconnected",
      "the session to be released",
      20_000,
    );
    expect((await D.get(sql(), D.vms, ALL, vm.id)).vm_state).toBe("running");
  }, 600_000);

  test("a second connection takes the session over: the first is closed, the second gets its 101", async () => {
    const first = Bun.spawn(probeArgv("hold"), { stdout: "pipe", stderr: "pipe" });
    await until(
      async () => (await D.get(sql(), D.vms, ALL, vm.id)).user_state === "connected",
      "the first session to connect",
      60_000,
    );
    const second = await probe();
    expect(second.progress).toContain(`Aborting contending session for VM_ID: ${vm.id}`);
    expect(second.final.status).toBe(101);
    await first.exited;
    const lines = (await new Response(first.stdout).text()).trim().split("\n");
    const out = JSON.parse(lines.pop()!);
    expect(out.final.status).toBe(101);
    expect(out.closedByServer).toBe(true);
    await until(
      async () => (await D.get(sql(), D.vms, ALL, vm.id)).user_state === "disconnected",
      "the session to be released",
      20_000,
    );
  }, 600_000);

  test("across two nodes: a connection through node B's L7R takes the session over from node A's and reaches the desktop through node A over TLS only", async () => {
    const { ensureDeps } = await import("../scripts/deps.ts");
    await ensureDeps(["tcpdump"], () => {});
    const nb = nsB!;
    const hostB = await D.create(sql(), D.hosts, ALL, { name: "l7rnode-b", address: ADDR_B });
    const logB = join(node.root, "l7r-b.log");
    const farmB = await farmCert("l7rnode-b", ADDR_B);
    const { cert, key } = await node.l7rCert();
    l7rB = Bun.spawn(
      [
        ...nb.exec,
        node.binary,
        "l7r",
        "--db",
        db().url,
        "--listen",
        `127.0.0.1:${PORT}`,
        "--cert",
        cert,
        "--key",
        key,
        "--set",
        "nodename=l7rnode-b",
        "--set",
        "log.level=debug",
        "--set",
        `cluster.peer.port=${PEER_PORT}`,
        ...Object.entries(farmB.settings).flatMap(([k, v]) => ["--set", `${k}=${v}`]),
      ],
      { stdout: "pipe", stderr: "pipe", env: cleanEnv() },
    );
    const out = createWriteStream(logB);
    for (const st of [l7rB.stdout, l7rB.stderr] as ReadableStream<Uint8Array>[])
      void st.pipeTo(new WritableStream({ write: (c) => void out.write(c) }));
    const listening = async () =>
      (await run([...nb.exec, "bash", "-c", `exec 3<>/dev/tcp/127.0.0.1/${PORT}`], { allowFail: true })).status === 0;
    await until(async () => (await listening()) || l7rB!.exitCode !== null, "node B's L7R to listen");
    expect(l7rB.exitCode, readFileSync(logB, "utf8")).toBeNull();
    // Node B has no way to the desktops but node A's endpoint: no route to the VM network.
    const running = (await sql()`SELECT host(vm_address) AS a FROM vm_runtimes WHERE vm_id = ${vm.id}`)[0]!.a as string;
    expect(
      (await run([...nb.exec, "bash", "-c", `exec 3<>/dev/tcp/${running}/3030`], { allowFail: true, timeoutMs: 5000 }))
        .status,
    ).not.toBe(0);

    // Everything between the nodes from here on is captured on node B's side of the farm network.
    const pcap = join(node.root, "farm.pcap");
    dump = Bun.spawn([...nb.exec, "tcpdump", "-i", ifB, "-U", "-s", "0", "-w", pcap, "tcp"], {
      stdout: "ignore",
      stderr: "ignore",
    });
    await until(() => existsSync(pcap) && statSync(pcap).size >= 24, "tcpdump to capture", 20_000);

    // Client 1 through node A holds the session; client 2 through node B takes it.
    const first = Bun.spawn(probeArgv("hold"), { stdout: "pipe", stderr: "pipe" });
    await until(
      async () => (await D.get(sql(), D.vms, ALL, vm.id)).user_state === "connected",
      "client 1's session (node A)",
      120_000,
    );
    expect((await sql()`SELECT l7r_host_id FROM vm_runtimes WHERE vm_id = ${vm.id}`)[0]!.l7r_host_id).toBe(
      node.host.id,
    );
    const second = Bun.spawn(probeArgv("hold", nb), { stdout: "pipe", stderr: "pipe" });
    // Client 1 is closed by node A (told through its host channel, not by a timeout).
    await first.exited;
    const out1 = JSON.parse((await new Response(first.stdout).text()).trim().split("\n").pop()!);
    expect(out1.final.status).toBe(101);
    expect(out1.closedByServer).toBe(true);
    // Client 2 gets its 101 from node B, and nxagent's greeting relayed by node A.
    const reader = second.stdout.getReader();
    let text = "";
    while (!text.includes("\n")) {
      const c = await reader.read();
      if (c.done) break;
      text += new TextDecoder().decode(c.value);
    }
    const out2 = JSON.parse(text.split("\n")[0]!);
    expect(out2.progress).toContain(`Aborting contending session for VM_ID: ${vm.id}`);
    expect(out2.final.status, readFileSync(logB, "utf8").slice(-3000)).toBe(101);
    expect(out2.nx).toMatch(/^NXPROXY-\d+\.\d+\.\d+/);
    const row = (await sql()`SELECT user_state, l7r_host_id, vma_secret FROM vm_runtimes WHERE vm_id = ${vm.id}`)[0]!;
    expect({ user_state: row.user_state, l7r_host_id: row.l7r_host_id }).toEqual({
      user_state: "connected",
      l7r_host_id: hostB.id,
    });
    second.kill("SIGTERM");
    await second.exited;
    await until(
      async () => (await D.get(sql(), D.vms, ALL, vm.id)).user_state === "disconnected",
      "the session to be released",
      20_000,
    );

    // What crossed the farm network: TCP to node A's endpoint only, and neither the VMA secret
    // nor the NX greetings (both sides' "NXPROXY-") in any captured byte. The pause lets tcpdump
    // take the connections' last packets before it stops: nothing tells when it has them.
    await Bun.sleep(500);
    dump.kill("SIGINT");
    await dump.exited;
    dump = undefined;
    const flows = (await run(["tcpdump", "-nn", "-r", pcap, "tcp"], { allowFail: true })).stdout
      .split("\n")
      .filter(Boolean);
    expect(flows.length).toBeGreaterThan(10);
    const endpointA = `${ADDR_A}.${PEER_PORT}`;
    for (const f of flows) {
      const [, from, to] = / IP (\S+) > (\S+?):/.exec(f) ?? [];
      expect([from, to].includes(endpointA) && [from, to].some((x) => x?.startsWith(`${ADDR_B}.`)), f).toBe(true);
    }
    const bytes = readFileSync(pcap);
    expect(row.vma_secret.length).toBeGreaterThan(8);
    expect(bytes.includes(Buffer.from(row.vma_secret))).toBe(false);
    expect(bytes.includes(Buffer.from("NXPROXY-"))).toBe(false);
    expect(bytes.includes(Buffer.from("x_start"))).toBe(false);
  }, 600_000);

  test("stop_vm of the running desktop: 102 progress, then 200 Machine stopped", async () => {
    const out = await probe("stop");
    expect(out.progress[0]).toBe("Stopping virtual machine");
    expect(out.final).toEqual({ status: 200, body: "Machine stopped\r\n" });
    expect((await D.get(sql(), D.vms, ALL, vm.id)).vm_state).toBe("stopped");
  }, 600_000);

  test("the heartbeat, with everything made through the admin API: qvd client shows the desktop; a file written in the home is there after a resume and after a restart; the objects' properties reach the desktop", async () => {
    const { ensureDeps } = await import("../scripts/deps.ts");
    await ensureDeps(["xvfb", "nxproxy", "xwd", "imagemagick"], () => {});
    const api = await startTestApi(db(), { "path.storage.images": join(node.root, "storage", "images") });
    const DISPLAY = 63;
    let xvfb: { stop(): Promise<void> } | undefined;
    try {
      // The user, OSF, image (uploaded), desktop and custom properties, as an administrator makes them.
      const admin = await api.login(TEST_ADMIN.name, TEST_ADMIN.password);
      const user = await ok(admin.post("/users", { name: "bea", password: "bea-pw-1" }), "2xx", "user");
      const osf = await ok(admin.post("/osfs", { name: "debian-api", memory_mb: 1024 }), "2xx", "osf");
      const di = await ok(admin.post("/dis", { osf_id: osf.id, path: "desktop-api.tar.gz" }), "2xx", "image");
      const image = await desktopImage();
      const up = await admin.request(`/dis/${di.id}/image`, {
        method: "PUT",
        headers: { "content-type": "application/octet-stream" },
        body: Bun.file(image),
      });
      expect(up.status, await up.clone().text()).toBe(200);
      expect((await ok(admin.get(`/dis/${di.id}`), "2xx", "image")).state).toBe("ready");
      const desk = await ok(admin.post("/vms", { user_id: user.id, osf_id: osf.id, name: "bea-desktop" }), "2xx", "vm");
      const objects: [string, number][] = [
        ["osfs", osf.id],
        ["dis", di.id],
        ["users", user.id],
        ["vms", desk.id],
      ];
      for (const key of ["hb.level", "hb.osfs", "hb.dis", "hb.users", "hb.vms"])
        await ok(admin.post("/properties", { key, applies_to: ["osf", "di", "user", "vm"] }), "2xx", `property ${key}`);
      for (const [path, id] of objects) {
        await ok(admin.put(`/${path}/${id}/properties/hb.level`, { value: path }), "2xx", `hb.level of ${path}`);
        await ok(admin.put(`/${path}/${id}/properties/hb.${path}`, { value: `set on ${path}` }), "2xx", `hb.${path}`);
      }

      xvfb = await startXvfb(DISPLAY);
      const mean = () => screenMean(DISPLAY);
      const state = async () =>
        (await ok(admin.get(`/vms/${desk.id}`), "2xx", "vm state")) as { vm_state: string; user_state: string };
      /** One user session with `qvd client`: connected, the desktop's pixels on the user's display, then `during`, then logout. */
      const session = async (during: () => Promise<void>, extra: string[] = []) => {
        // Clear the user's display, so the session's pixels are its own.
        await run(["xsetroot", "-display", `:${DISPLAY}`, "-solid", "black"], { allowFail: true });
        const before = await mean();
        const client = node.client({ port: PORT, user: "bea", password: "bea-pw-1", display: DISPLAY, args: extra });
        try {
          await until(
            async () => (await state()).user_state === "connected" || client.exitCode !== null,
            "the client's session",
            180_000,
          );
          expect(
            client.exitCode,
            await (client.exitCode !== null ? new Response(client.stderr).text() : ""),
          ).toBeNull();
          let m = before;
          await until(async () => (m = await mean()) > before + 0.05, "the desktop's pixels", 60_000);
          expect(m).toBeGreaterThan(before + 0.05);
          await during();
        } finally {
          client.kill("SIGTERM");
          await client.exited;
        }
        await until(async () => (await state()).user_state === "disconnected", "the session to be released", 20_000);
        return new Response(client.stdout).text();
      };
      const first = await session(async () => {
        const w = await node.attach(
          desk.id,
          "echo 'written in the first session' > /home/bea/heartbeat.txt && touch /tmp/first-boot",
          "bea",
        );
        expect(w.status, w.stderr).toBe(0);
        // The properties of the four objects reached the desktop, the VM's winning.
        const props = (await node.attach(desk.id, "cat /run/qvd/session.properties", "bea")).stdout;
        expect(props).toContain("hb.level=vms\n");
        for (const [path] of objects) expect(props).toContain(`hb.${path}=set on ${path}\n`);
        expect(props).toContain("qvd.vm.user.name=bea\n");
        expect(props).toContain("qvd.client.link=lan\n");
        expect(props).not.toContain("qvd.slave.key");
      });
      expect(first).toContain("Starting virtual machine");
      // Logged out and in again: the same running desktop, resumed.
      const second = await session(async () => {
        expect((await node.attach(desk.id, "cat /home/bea/heartbeat.txt; ls /tmp/first-boot", "bea")).stdout).toBe(
          "written in the first session\n/tmp/first-boot\n",
        );
      });
      expect(second).not.toContain("Starting virtual machine");
      // The user restarts the desktop (qvd client --stop): a new container, the same home.
      const third = await session(async () => {
        const r = await node.attach(desk.id, "cat /home/bea/heartbeat.txt; ls /tmp/first-boot", "bea");
        expect(r.stdout).toBe("written in the first session\n");
        expect(r.stderr).toContain("No such file");
      }, ["--stop"]);
      expect(third).toContain("Stopping virtual machine");
      expect(third).toContain("Starting virtual machine");
    } finally {
      await xvfb?.stop();
      await api.stop();
    }
  }, 900_000);
});
