// connect_to_vm through to the desktop: `qvd node` (HKD + L7R in one process) in a network
// namespace of this test, the real Debian desktop image, and a client speaking the QVD protocol
// from inside the namespace: list_of_vm, connect_to_vm → 102s → 101 → NX bytes from nxagent.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { copyFileSync } from "node:fs";
import { join } from "node:path";
import * as D from "../src/db/index.ts";
import { run } from "../src/run.ts";
import { useTestDatabase } from "./support/db.ts";
import { desktopImage, TestNode, until } from "./support/node.ts";

const isRoot = process.getuid?.() === 0;
const db = useTestDatabase();
const ALL = D.ALL_TENANTS;
const PORT = 8443;

describe.skipIf(!isRoot)("the L7R of a node, through to nxagent", () => {
  const node = new TestNode(db, "l7rnode");
  let vm: D.VmRow;
  const sql = () => db().sql;

  beforeAll(async () => {
    const image = await desktopImage();
    await node.setup();
    const cert = join(node.root, "l7r.crt");
    const key = join(node.root, "l7r.key");
    await run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout", key, "-out", cert]);
    const user = await D.create(sql(), D.users, ALL, { tenant_id: 1, name: "alice", password: "alice-pw-1" });
    const osf = await D.create(sql(), D.osfs, ALL, { tenant_id: 1, name: "debian", memory_mb: 1024 });
    await node.addImage(osf.id, "desktop.tar.gz", async (p) => copyFileSync(image, p));
    vm = await D.createVm(sql(), ALL, { user_id: user.id, osf_id: osf.id, name: "desktop" }, { range: "198.18.0.0/16" });
    await node.start({ "hkd.timeout.vma_start": "60" }, { role: "node", args: ["--listen", `127.0.0.1:${PORT}`, "--cert", cert, "--key", key] });
  }, 30 * 60_000);

  afterAll(async () => {
    await node.stop();
  }, 120_000);

  const probeArgv = (mode = "") => [...node.ns.exec, join(import.meta.dir, "..", "node_modules", ".bin", "bun"), join(import.meta.dir, "support", "l7r-probe.ts"), String(PORT), "alice", "alice-pw-1", String(vm.id), mode];
  const probe = async () => {
    const r = await run(probeArgv(), { timeoutMs: 300_000 });
    return JSON.parse(r.stdout.trim().split("\n").pop()!);
  };

  test("connect_to_vm starts the stopped desktop and upgrades to NX", async () => {
    const out = await probe();
    expect(out.list.status).toBe(200);
    expect(JSON.parse(out.list.body)).toEqual([{ id: vm.id, name: "desktop", state: "stopped", blocked: 0, is_application: 0 }]);
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
    await until(async () => (await D.get(sql(), D.vms, ALL, vm.id)).user_state === "disconnected", "the session to be released", 20_000);
    expect((await D.get(sql(), D.vms, ALL, vm.id)).vm_state).toBe("running");
  }, 600_000);

  test("a second connection takes the session over: the first is closed, the second gets its 101", async () => {
    const first = Bun.spawn(probeArgv("hold"), { stdout: "pipe", stderr: "pipe" });
    await until(async () => (await D.get(sql(), D.vms, ALL, vm.id)).user_state === "connected", "the first session to connect", 60_000);
    const second = await probe();
    expect(second.progress).toContain(`Aborting contending session for VM_ID: ${vm.id}`);
    expect(second.final.status).toBe(101);
    await first.exited;
    const lines = (await new Response(first.stdout).text()).trim().split("\n");
    const out = JSON.parse(lines.pop()!);
    expect(out.final.status).toBe(101);
    expect(out.closedByServer).toBe(true);
    await until(async () => (await D.get(sql(), D.vms, ALL, vm.id)).user_state === "disconnected", "the session to be released", 20_000);
  }, 600_000);

  test("stop_vm of the running desktop: 102 progress, then 200 Machine stopped", async () => {
    const r = await run(probeArgv("stop"), { timeoutMs: 300_000 });
    const out = JSON.parse(r.stdout.trim().split("\n").pop()!);
    expect(out.progress[0]).toBe("Stopping virtual machine");
    expect(out.final).toEqual({ status: 200, body: "Machine stopped\r\n" });
    expect((await D.get(sql(), D.vms, ALL, vm.id)).vm_state).toBe("stopped");
  }, 600_000);

  test("qvd client through this L7R: pixels arrive, a file written in the home is there after logging out and in", async () => {
    const { ensureDeps } = await import("../scripts/deps.ts");
    await ensureDeps(["xvfb", "nxproxy", "xwd", "imagemagick"], () => {});
    const DISPLAY = 63;
    const xvfb = Bun.spawn(["Xvfb", `:${DISPLAY}`, "-screen", "0", "1024x768x24", "-nolisten", "tcp"], { stdout: "ignore", stderr: "ignore" });
    const mean = async () => Number((await run(["sh", "-c", `xwd -root -silent -display :${DISPLAY} | /usr/bin/convert xwd:- -format '%[fx:mean]' info:-`], { allowFail: true })).stdout.trim()) || 0;
    /** One user session with `qvd client`: connected, the desktop's pixels on the user's display, then `during`, then logout. */
    const session = async (during: () => Promise<void>) => {
      const before = await mean();
      const client = Bun.spawn([...node.ns.exec, "env", `DISPLAY=:${DISPLAY}`, "QVD_PASSWORD=alice-pw-1", node.binary, "client", "--host", "127.0.0.1", "--port", String(PORT), "--user", "alice", "--insecure", "--vm", String(vm.id), "--link", "lan"], { stdout: "ignore", stderr: "ignore" });
      try {
        await until(async () => (await D.get(sql(), D.vms, ALL, vm.id)).user_state === "connected", "the client's session", 120_000);
        let m = before;
        await until(async () => (m = await mean()) > before + 0.05, "the desktop's pixels", 60_000);
        expect(m).toBeGreaterThan(before + 0.05);
        await during();
      } finally {
        client.kill("SIGTERM");
        await client.exited;
      }
      await until(async () => (await D.get(sql(), D.vms, ALL, vm.id)).user_state === "disconnected", "the session to be released", 20_000);
    };
    try {
      await until(async () => (await run(["xwd", "-root", "-silent", "-display", `:${DISPLAY}`], { allowFail: true })).status === 0, "Xvfb", 20_000);
      await session(async () => {
        const w = await node.attach(vm.id, "echo 'written in the first session' > /home/alice/heartbeat.txt", "alice");
        expect(w.status).toBe(0);
      });
      // Clear the user's display, so the second session's pixels are its own.
      await run(["xsetroot", "-display", `:${DISPLAY}`, "-solid", "black"], { allowFail: true });
      await session(async () => {
        expect((await node.attach(vm.id, "cat /home/alice/heartbeat.txt", "alice")).stdout).toBe("written in the first session\n");
      });
    } finally {
      xvfb.kill("SIGKILL");
    }
  }, 600_000);
});
