// A real desktop, end to end on the node side: the Debian image built by `qvd di build`, a
// node (`qvd hkd` in a network namespace of this test) starting it in LXC, the VMA starting
// the user's X session under nxagent, and a real nxproxy showing it on an Xvfb of the test,
// checked by a screenshot's pixels (saved under .test-output/ for review).
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import * as D from "../src/db/index.ts";
import { useTestDatabase } from "./support/db.ts";
import { desktopImage, TestNode, until } from "./support/node.ts";
import { screenMean, startXvfb } from "./support/services.ts";
import { newNxCookie } from "../src/nx/handshake.ts";

const isRoot = process.getuid?.() === 0;
const db = useTestDatabase();
const ALL = D.ALL_TENANTS;
const DISPLAY = 61;
const output = join(import.meta.dir, "..", ".test-output");
/** nxagent's cookie for this session; nxproxy reaches nxagent through a relay that adds it, as the L7R does. */
const COOKIE = newNxCookie();

describe.skipIf(!isRoot)("a real desktop through NX", () => {
  const node = new TestNode(db, "desknode");
  let vm: D.VmRow;
  let secret = "";
  const children: Bun.Subprocess[] = [];
  let xvfb: { stop(): Promise<void> } | undefined;
  const sql = () => db().sql;

  /** Calls the VMA of the desktop from the node's namespace. */
  const vma = (method: string, body?: unknown) => node.vma(`http://${vm.ip}:3030`, secret, `/vma/${method}`, body);
  const nxState = async () => (await vma("x_state")).json?.state as string | undefined;

  beforeAll(async () => {
    const { ensureDeps } = await import("../scripts/deps.ts");
    await ensureDeps(["xvfb", "nxproxy", "xwd", "imagemagick", "debootstrap"], () => {});
    const image = await desktopImage();
    await node.setup();
    ({ vm } = await node.addDesktop(image));
    await node.start({ "hkd.timeout.vma_start": "60" });
    xvfb = await startXvfb(DISPLAY);
    mkdirSync(output, { recursive: true });
  }, 30 * 60_000);

  afterAll(async () => {
    for (const c of children) c.kill("SIGKILL");
    await xvfb?.stop();
    await node.stop();
  }, 120_000);

  test("the desktop starts: the image is unpacked, the container runs, the VMA answers", async () => {
    await D.startVm(sql(), ALL, vm.id, { aliveWithinS: 60 });
    await until(
      async () => (await D.get(sql(), D.vms, ALL, vm.id)).vm_state === "running",
      "the desktop to run",
      180_000,
    );
    const [r] = await sql()`SELECT vma_secret FROM vm_runtimes WHERE vm_id = ${vm.id}`;
    secret = r!.vma_secret;
    expect((await vma("ping")).status).toBe(200);
    expect(await nxState()).toBe("stopped");
  });

  test("x_start: the user's session runs under nxagent, which listens on 4100", async () => {
    const res = await vma("x_start", {
      user: "alice",
      uid: 20001,
      gid: 20001,
      geometry: "1024x768",
      keyboard: "pc105/us",
      link: "lan",
      client_os: "linux",
      cookie: COOKIE,
    });
    expect(res.status).toBe(200);
    await until(async () => (await nxState()) === "listening", "nxagent to listen", 60_000);
    // The session is the user's: nxagent runs as uid 20001, not as root.
    const ps = (await node.attach(vm.id, "ps -eo uid,comm")).stdout;
    expect(ps).toMatch(/^\s*20001 nxagent$/m);
    expect(ps).not.toMatch(/^\s*0 nxagent$/m);
    expect((await node.attach(vm.id, "cat /proc/net/tcp")).stdout).toMatch(/:1004 00000000:0000 0A/); // 4100 = 0x1004, LISTEN
    expect((await node.attach(vm.id, "stat -c %u /home/alice")).stdout.trim()).toBe("20001");
  });

  test("a real nxproxy shows the desktop on the client's X display", async () => {
    const before = await screenMean(DISPLAY);
    const relay = Bun.spawn(
      [
        ...node.ns.exec,
        join(import.meta.dir, "..", "node_modules", ".bin", "bun"),
        join(import.meta.dir, "support", "nx-relay.ts"),
        "4150",
        vm.ip!,
        "4100",
        COOKIE,
      ],
      { stdout: "pipe", stderr: "inherit" },
    );
    children.push(relay);
    await relay.stdout.getReader().read(); // "listening"
    const proxy = Bun.spawn([...node.ns.exec, "env", `DISPLAY=:${DISPLAY}`, "nxproxy", "-S", "localhost:150"], {
      stdout: "ignore",
      stderr: "ignore",
    });
    children.push(proxy);
    await until(async () => (await nxState()) === "connected", "the NX session to connect", 60_000);
    // jwm's tray and the xterm arrive: the black screen gets content.
    let mean = 0;
    await until(async () => (mean = await screenMean(DISPLAY)) > before + 0.05, "the desktop's pixels", 60_000);
    await screenMean(DISPLAY, join(output, "desktop-through-nx.png"));
    expect(mean).toBeGreaterThan(before + 0.05);
    // The session's programs run as the user.
    const ps = (await node.attach(vm.id, "ps -eo uid,comm")).stdout;
    expect(ps).toMatch(/^\s*20001 jwm$/m);
    expect(ps).toMatch(/^\s*20001 xterm$/m);
    proxy.kill("SIGTERM");
    await proxy.exited;
  });

  test("stopping the desktop ends the session and leaves nothing running", async () => {
    await D.stopVm(sql(), ALL, vm.id);
    await until(
      async () => (await D.get(sql(), D.vms, ALL, vm.id)).vm_state === "stopped",
      "the desktop to stop",
      120_000,
    );
    expect(await node.containers()).toEqual([]);
    expect(await node.links()).not.toContain(`qvd${vm.id}`);
    expect(await node.cgroupsOf(vm.id)).toEqual([]);
    expect(readFileSync("/proc/mounts", "utf8")).not.toContain(node.root);
  });
});
