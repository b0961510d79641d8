// Expiry as the user feels it, end to end on a node: the real Debian desktop image in LXC
// (`qvd node`, HKD and L7R, in a network namespace of this test), the user connected with
// `qvd client` (its nxproxy on an Xvfb of the test), and the admin API setting the times. A soft expiry puts one notice
// window in the session (src/vma/expiry.ts), however often the node repeats its call; a new
// image tagged `default` tells the user when the desktop restarts; at the hard time the node
// stops the desktop, and the user's next connection starts the newly tagged image.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { copyFileSync, mkdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import type * as D from "../src/db/index.ts";
import { run } from "../src/run.ts";
import { NOTICE_TITLE, noticeText } from "../src/vma/expiry.ts";
import { useTestApi } from "./support/api.ts";
import { ok } from "./support/assert.ts";
import { useTestDatabase } from "./support/db.ts";
import { desktopImage, TestNode } from "./support/node.ts";
import { startXvfb } from "./support/services.ts";
import { until } from "./support/wait.ts";

const isRoot = process.getuid?.() === 0;
const db = useTestDatabase();
const DISPLAY = 64;
const PORT = 8443;
const output = join(import.meta.dir, "..", ".test-output");

describe.skipIf(!isRoot)("expiry, as the user sees it", () => {
  const node = new TestNode(db, "expnode");
  const sql = () => db().sql;
  let vm: D.VmRow;
  let osfId = 0;
  let di1: D.DiRow;
  let secret = "";
  let xvfb: { stop(): Promise<void> } | undefined;
  /** `qvd client` of the current connection. */
  let client: Bun.Subprocess | undefined;
  /** The session user's uid in the desktop (the L7R's choice). */
  let uid = 0;

  const vma = (method: string, body?: unknown) => node.vma(`http://${vm.ip}:3030`, secret, `/vma/${method}`, body);
  const xState = async () => (await vma("x_state")).json?.state as string | undefined;
  const row = async () =>
    (
      await sql()`SELECT vm_state, user_state, current_di_id, expire_soft_at, expire_hard_at, vma_secret FROM vm_runtimes WHERE vm_id = ${vm.id}`
    )[0]!;
  /** Windows of the user's X session titled as the notice (xwininfo in the desktop, as the user). */
  const noticeWindows = async () => {
    const r = await node.attach(vm.id, "xwininfo -display :100 -root -tree", "alice");
    expect(r.status, r.stderr).toBe(0);
    return r.stdout.split("\n").filter((l) => l.includes(`"${NOTICE_TITLE}"`));
  };
  /** The notice programs running in the desktop: uid and argv of each xmessage. */
  const xmessages = async () => {
    const r = await node.attach(
      vm.id,
      "for p in $(pgrep -x xmessage); do echo $(stat -c %u /proc/$p) $(base64 -w0 /proc/$p/cmdline); done",
    );
    return r.stdout
      .split("\n")
      .filter(Boolean)
      .map((l) => {
        const [uid, argv] = l.split(" ");
        return {
          uid: Number(uid),
          argv: Buffer.from(argv ?? "", "base64")
            .toString("utf8")
            .split("\0")
            .slice(0, -1),
        };
      })
      .filter((p) => p.argv.length > 0); // an xmessage exiting between pgrep and the read has no command line
  };
  /** The desktop's local HH:MM of a time (the notice speaks the desktop's time zone). */
  const desktopClock = async (d: Date) =>
    (await node.attach(vm.id, `date -d @${Math.floor(d.getTime() / 1000)} +%H:%M`)).stdout.trim();

  /** The image under the desktop's root: the id of the basefs that is its overlay's lower layer. */
  const rootLower = async () => {
    const mounts = (await node.attach(vm.id, "cat /proc/self/mountinfo")).stdout;
    const root = mounts.split("\n").find((l) => l.split(" ")[4] === "/") ?? "";
    return Number(/lowerdir=[^,]*\/basefs\/(\d+)(?:[/,]|$)/.exec(root)?.[1]);
  };

  /** The user connects with `qvd client` through the node's L7R (which starts the desktop if it is stopped). */
  async function connect(): Promise<void> {
    await disconnect();
    const c = (client = node.client({ port: PORT, user: "alice", password: "alice-pw-1", display: DISPLAY }));
    await until(
      async () => (await row()).user_state === "connected" || c.exitCode !== null,
      "the client's session",
      300_000,
    );
    expect(c.exitCode, c.exitCode !== null ? await new Response(c.stderr).text() : "").toBeNull();
    secret = (await row()).vma_secret;
    await until(async () => (await xState()) === "connected", "the NX session to connect", 60_000);
    // The session's window manager is up: X clients are served.
    await until(
      async () => (await node.attach(vm.id, "pgrep -x jwm")).status === 0,
      "the session's window manager",
      30_000,
    );
    uid = Number((await node.attach(vm.id, "stat -c %u /proc/$(pgrep -x nxagent)")).stdout.trim());
    expect(uid).toBeGreaterThan(0);
  }

  async function disconnect(): Promise<void> {
    client?.kill("SIGTERM");
    await client?.exited;
    client = undefined;
  }

  beforeAll(async () => {
    const { ensureDeps } = await import("../scripts/deps.ts");
    await ensureDeps(["xvfb", "nxproxy", "xwd", "imagemagick"], () => {});
    const image = await desktopImage();
    await node.setup();
    const desktop = await node.addDesktop(image, { password: "alice-pw-1", file: "desktop-1.tar.gz" });
    ({ vm, di: di1 } = desktop);
    osfId = desktop.osf.id;
    await node.startNode(PORT, { "hkd.timeout.vma_start": "60" });
    xvfb = await startXvfb(DISPLAY);
    await connect();
    expect((await row()).current_di_id).toBe(di1.id);
    expect(await rootLower()).toBe(di1.id);
  }, 30 * 60_000);
  // The admin API on the node's storage (started once the node is set up, stopped first).
  const { sa: admin } = useTestApi(db, () => ({ "path.storage.images": join(node.root, "storage", "images") }));

  afterAll(async () => {
    await disconnect().catch(() => {});
    await xvfb?.stop();
    await node.stop();
  }, 120_000);

  test("soft expiry set through the API: one notice window in the user's session, run as the user; the node's repeated calls add none", async () => {
    expect(await noticeWindows()).toEqual([]);
    await ok(
      admin.post(`/vms/${vm.id}/expire`, { soft_at: new Date(Date.now() - 1000).toISOString() }),
      "2xx",
      "expire",
    );
    await until(async () => (await noticeWindows()).length > 0, "the notice window", 60_000);
    // The node calls again every poll (2 s here); the same times, sent as the node sends them, too.
    const soft = (await row()).expire_soft_at as Date;
    for (let i = 0; i < 3; i++)
      expect((await vma("expire", { soft: soft.toISOString(), hard: null })).status).toBe(200);
    // A check that nothing happens: 6 s (three of the node's polls) add no second window.
    await Bun.sleep(6000);
    expect(await noticeWindows()).toHaveLength(1);
    const procs = await xmessages();
    expect(procs).toHaveLength(1);
    expect(procs[0]!.uid).toBe(uid);
    expect(procs[0]!.argv.at(-1)).toBe(noticeText(null));
    // For review: the client's screen with the notice.
    mkdirSync(output, { recursive: true });
    await run(
      [
        "sh",
        "-c",
        `xwd -root -silent -display :${DISPLAY} | /usr/bin/convert xwd:- ${join(output, "expiry-notice.png")}`,
      ],
      { allowFail: true },
    );
  }, 120_000);

  test("a new image tagged default: the user is told when the desktop restarts; at the hard time the node stops it; the next connect runs the new image, where a new expiry is shown again", async () => {
    const image = await desktopImage();
    const di2 = await node.addImage(osfId, "desktop-2.tar.gz", async (p) => copyFileSync(image, p));
    // The administrator's publication: running desktops on the old image are warned now and stopped in an hour.
    await ok(
      admin.post(`/dis/${di2.id}/tags`, { tag: "default", expire_soft_s: 0, expire_hard_s: 3600 }),
      "2xx",
      "tag default",
    );
    await ok(admin.post(`/dis/${di2.id}/tags`, { tag: "head" }), "2xx", "tag head");
    const hard = (await row()).expire_hard_at as Date;
    expect(hard).toBeInstanceOf(Date);
    const clock = await desktopClock(hard);
    const wanted = async () => (await xmessages()).filter((p) => p.argv.at(-1)!.includes(`at ${clock} `));
    await until(async () => (await wanted()).length === 1, `a notice naming ${clock}`, 60_000);
    // It replaced the first one.
    await until(
      async () => (await noticeWindows()).length === 1 && (await xmessages()).length === 1,
      "one notice window",
      30_000,
    );
    expect((await xmessages())[0]!.uid).toBe(uid);

    // The stop is brought forward: a few seconds from now.
    await ok(
      admin.post(`/vms/${vm.id}/expire`, { hard_at: new Date(Date.now() + 3000).toISOString() }),
      "2xx",
      "expire hard",
    );
    await until(async () => (await row()).vm_state === "stopped", "the node to stop the desktop", 120_000);
    await disconnect();
    await until(async () => (await row()).user_state === "disconnected", "the session to be released", 30_000);
    expect(readFileSync(node.logFile, "utf8")).toContain("its hard expiry time was reached");
    expect(await node.containers()).toEqual([]);
    const stopped = await row();
    expect([stopped.expire_soft_at, stopped.expire_hard_at, stopped.current_di_id]).toEqual([null, null, null]);

    // The user connects again: the desktop starts on the image `default` now points to.
    await connect();
    expect((await row()).current_di_id).toBe(di2.id);
    expect(await rootLower()).toBe(di2.id);
    // No expiry on the new desktop: no notice (a check that nothing appears within 3 s).
    await Bun.sleep(3000);
    expect(await noticeWindows()).toEqual([]);
    // A new expiry of the new desktop is shown again.
    await ok(
      admin.post(`/vms/${vm.id}/expire`, { soft_at: new Date(Date.now() - 1000).toISOString() }),
      "2xx",
      "expire",
    );
    await until(async () => (await noticeWindows()).length === 1, "the new desktop's notice", 60_000);
  }, 600_000);
});
