// The session services end to end, as the user gets them: the real Debian desktop image in LXC
// on a node (`qvd node`: HKD and L7R in a network namespace of this test), the user connected
// with `qvd client` (its nxproxy on an Xvfb), and on the user's side the programs of
// test/support/services.ts standing for their printers and speakers, in the same namespace.
// One desktop for the whole file: each test connects with its own flags and disconnects.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { copyFileSync } from "node:fs";
import { join } from "node:path";
import * as D from "../src/db/index.ts";
import { run } from "../src/run.ts";
import { useTestDatabase } from "./support/db.ts";
import { desktopImage, TestNode, until } from "./support/node.ts";
import { startClientCups, startClientPulse, startXvfb, type ClientCups, type ClientPulse } from "./support/services.ts";

const isRoot = process.getuid?.() === 0;
const db = useTestDatabase();
const ALL = D.ALL_TENANTS;
const DISPLAY = 65;
const PORT = 8443;

describe.skipIf(!isRoot)("session services, end to end", () => {
  const node = new TestNode(db, "svcnode");
  const sql = () => db().sql;
  let vm: D.VmRow;
  let secret = "";
  let xvfb: { stop(): Promise<void> } | undefined;
  let cups: ClientCups;
  let pulse: ClientPulse;
  /** `qvd client` of the current connection, and what it printed. */
  let client: Bun.Subprocess | undefined;
  let clientOut: Promise<string> = Promise.resolve("");

  const vma = (method: string) => node.vma(`http://${vm.ip}:3030`, secret, `/vma/${method}`);
  const xState = async () => (await vma("x_state")).json?.state as string | undefined;
  const row = async () => (await sql()`SELECT vm_state, user_state, vma_secret FROM vm_runtimes WHERE vm_id = ${vm.id}`)[0]!;

  /** A shell script in the desktop, as root or as alice, with optional input. */
  const inDesktop = (script: string, o: { user?: boolean; stdin?: string | Uint8Array } = {}) =>
    run(
      [...node.ns.exec, "lxc-attach", "-n", `qvd-${vm.id}`, "-P", node.lxcPath, "--",
        ...(o.user ? ["setpriv", "--reuid", "alice", "--regid", "alice", "--clear-groups"] : []), "/bin/sh", "-c", script],
      { allowFail: true, timeoutMs: 30_000, stdin: o.stdin },
    );

  /**
   * The environment of the user's X session (the window manager's), as `export` lines: what a
   * program the user starts from the desktop gets (CUPS_SERVER, PULSE_SERVER… set by the services).
   */
  const sessionEnv = async () => {
    // As alice: the container's root may not read another user's process memory.
    const r = await inDesktop("tr '\\0' '\\n' < /proc/$(pgrep -x -u alice jwm | head -1)/environ", { user: true });
    expect(r.status, r.stderr).toBe(0);
    return r.stdout
      .split("\n")
      .filter((l) => /^[A-Z_][A-Z0-9_]*=/.test(l))
      .map((l) => `export ${l.slice(0, l.indexOf("="))}='${l.slice(l.indexOf("=") + 1).replace(/'/g, "'\\''")}'`)
      .join("\n");
  };
  /** Runs a script as alice with her X session's environment, as if started from the desktop. */
  const asSession = async (script: string, stdin?: string | Uint8Array) => inDesktop(`${await sessionEnv()}\n${script}`, { user: true, stdin });

  /** The windows on the session's display (xwininfo -root -tree in the desktop). */
  const windows = async () => (await asSession("xwininfo -root -tree")).stdout;

  /** The user connects with `qvd client` and these extra flags/environment. */
  async function connect(flags: string[] = [], env: Record<string, string> = {}): Promise<void> {
    await disconnect();
    const c = (client = Bun.spawn(
      [...node.ns.exec, "env", `DISPLAY=:${DISPLAY}`, "QVD_PASSWORD=alice-pw-1", `CUPS_SERVER=${cups.server}`, `PULSE_SERVER=${pulse.server}`,
        ...Object.entries(env).map(([k, v]) => `${k}=${v}`), node.binary, "client",
        "--host", "127.0.0.1", "--port", String(PORT), "--user", "alice", "--insecure", "--link", "lan", ...flags],
      { stdout: "pipe", stderr: "pipe" },
    ));
    clientOut = Promise.all([new Response(c.stdout).text(), new Response(c.stderr).text()]).then(([o, e]) => o + e);
    await until(async () => (await row()).user_state === "connected" || c.exitCode !== null, "the client's session", 300_000);
    expect(c.exitCode, c.exitCode !== null ? await clientOut : "").toBeNull();
    secret = (await row()).vma_secret;
    await until(async () => (await xState()) === "connected", "the NX session to connect", 60_000);
    await until(async () => (await inDesktop("pgrep -x -u alice jwm")).status === 0, "the session's window manager", 30_000);
  }

  /** The user's client goes away: the session is suspended. */
  async function disconnect(): Promise<void> {
    if (!client) return;
    client.kill("SIGTERM");
    await client.exited;
    client = undefined;
    await until(async () => (await xState()) !== "connected", "the session to be suspended", 60_000);
  }

  beforeAll(async () => {
    const { ensureDeps } = await import("../scripts/deps.ts");
    await ensureDeps(["xvfb", "nxproxy", "xwininfo"], () => {});
    const image = await desktopImage();
    await node.setup();
    const user = await D.create(sql(), D.users, ALL, { tenant_id: 1, name: "alice", password: "alice-pw-1" });
    const osf = await D.create(sql(), D.osfs, ALL, { tenant_id: 1, name: "debian", memory_mb: 1024 });
    await node.addImage(osf.id, "desktop.tar.gz", async (p) => copyFileSync(image, p));
    vm = await D.createVm(sql(), ALL, { user_id: user.id, osf_id: osf.id, name: "desktop" }, { range: "198.18.0.0/16" });
    const cert = join(node.root, "l7r.crt");
    const key = join(node.root, "l7r.key");
    await run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout", key, "-out", cert]);
    await node.start({ "hkd.timeout.vma_start": "60" }, { role: "node", args: ["--listen", `127.0.0.1:${PORT}`, "--cert", cert, "--key", key] });
    xvfb = await startXvfb(DISPLAY, { exec: node.ns.exec });
    cups = await startClientCups({ exec: node.ns.exec });
    pulse = await startClientPulse({ exec: node.ns.exec });
    await connect();
  }, 30 * 60_000);

  afterAll(async () => {
    await disconnect().catch(() => {});
    await xvfb?.stop();
    await cups?.stop();
    await pulse?.stop();
    await node.stop();
  }, 120_000);

  test("the image opens a text file in its text editor, on the session's display", async () => {
    const file = "/tmp/qvd-open-test.txt";
    expect((await asSession(`printf 'opened by xdg-open\\n' > ${file} && chmod 644 ${file}`)).status).toBe(0);
    expect((await asSession("xdg-mime query filetype /tmp/qvd-open-test.txt; xdg-mime query default text/plain")).stdout.split("\n").slice(0, 2)).toEqual([
      "text/plain",
      "qvd-xedit.desktop",
    ]);
    // xdg-open waits for the editor: start it in the background.
    expect((await asSession(`(xdg-open ${file} >/dev/null 2>&1 &)`)).status).toBe(0);
    await until(async () => (await inDesktop("pgrep -u alice -x xedit")).status === 0, "xedit to run", 20_000);
    const args = (await inDesktop("tr '\\0' ' ' < /proc/$(pgrep -u alice -x xedit | head -1)/cmdline", { user: true })).stdout.trim();
    expect(args).toBe(`/usr/bin/xedit ${file}`);
    await until(async () => (await windows()).includes('"xedit": ("xedit" "Xedit")'), "an xedit window on the display", 20_000);
    await inDesktop("pkill -u alice -x xedit");
  }, 120_000);
});
