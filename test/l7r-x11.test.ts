// The L7R's X11 client (src/l7r/x11.ts) against a real Xvnc, as the browser desktop uses it:
// the cookie, letting a session's uid in by `localuser:#uid`, and keeping top-level windows
// fitted to the screen when RandR resizes it. Runs as root (setpriv to another uid).
import { afterAll, beforeAll, expect, test } from "bun:test";
import type { Subprocess } from "bun";
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { connectX11, X11Error, type X11Client } from "../src/l7r/x11.ts";
import { waitFor } from "./support/wait.ts";

const dir = mkdtempSync("/tmp/qvd-l7r-x11-");
const authFile = join(dir, "Xauthority");
const COOKIE = randomBytes(16);
// Uids without a passwd entry: admitted only as `#uid`.
const UID = 1999990;
const OTHER_UID = 1999991;
let xvnc: Subprocess;
let display: number;
const procs: Subprocess[] = [];
const clients: X11Client[] = [];
const env = () => ({ ...process.env, XAUTHORITY: authFile });

/** One Xauthority entry (FamilyWild: any address and display), the binary format libXau reads. */
function xauthEntry(cookie: Uint8Array): Buffer {
  const field = (b: Uint8Array) => Buffer.concat([Buffer.from([b.length >> 8, b.length & 0xff]), b]);
  return Buffer.concat([
    Buffer.from([0xff, 0xff]),
    field(Buffer.alloc(0)),
    field(Buffer.alloc(0)),
    field(Buffer.from("MIT-MAGIC-COOKIE-1")),
    field(cookie),
  ]);
}

async function connect(cookie: Uint8Array | null = COOKIE): Promise<X11Client> {
  const c = await connectX11({ display, cookie: cookie ?? undefined });
  clients.push(c);
  return c;
}

/** argv prefix: a process of `uid` with no cookie at all (no XAUTHORITY, no home to find one in). */
const noCookieAs = (uid: number) => [
  "setpriv",
  `--reuid=${uid}`,
  `--regid=${uid}`,
  "--clear-groups",
  "env",
  "-u",
  "XAUTHORITY",
  "HOME=/nonexistent",
];

/** Whether a process of `uid`, with no cookie at all, can open the display. */
async function canOpen(uid: number): Promise<boolean> {
  const p = Bun.spawn([...noCookieAs(uid), "xdpyinfo", "-display", `:${display}`], {
    stdout: "ignore",
    stderr: "ignore",
  });
  return (await p.exited) === 0;
}

function spawnAs(uid: number, argv: string[]): Subprocess {
  const p = Bun.spawn([...noCookieAs(uid), ...argv], { stdout: "ignore", stderr: "ignore" });
  procs.push(p);
  return p;
}

/** The root's children as xwininfo sees them: name → geometry "WxH+X+Y". */
async function topLevels(): Promise<Map<string, string>> {
  const p = Bun.spawn(["xwininfo", "-display", `:${display}`, "-root", "-children"], {
    env: env(),
    stdout: "pipe",
    stderr: "ignore",
  });
  const out = await new Response(p.stdout).text();
  await p.exited;
  const m = new Map<string, string>();
  for (const l of out.split("\n")) {
    const r = /^\s+0x[0-9a-f]+ "([^"]*)": .*?\s(\d+x\d+[+-]\d+[+-]\d+)\s/.exec(l);
    if (r) m.set(r[1]!, r[2]!);
  }
  return m;
}

beforeAll(async () => {
  writeFileSync(authFile, xauthEntry(COOKIE), { mode: 0o600 });
  // -displayfd: Xvnc picks a free display itself and writes its number once it accepts clients.
  xvnc = Bun.spawn(
    [
      "Xvnc",
      "-displayfd",
      "1",
      "-geometry",
      "800x600",
      "-depth",
      "24",
      "-rfbport",
      "-1",
      "-SecurityTypes",
      "None",
      "-nolisten",
      "tcp",
      "-auth",
      authFile,
    ],
    { stdout: "pipe", stderr: Bun.file(join(dir, "xvnc.log")) },
  );
  const reader = (xvnc.stdout as ReadableStream<Uint8Array>).getReader();
  let text = "";
  const deadline = setTimeout(() => xvnc.kill(), 15_000);
  while (!text.includes("\n")) {
    const { done, value } = await reader.read();
    if (done) throw new Error(`Xvnc did not start (${join(dir, "xvnc.log")})`);
    text += new TextDecoder().decode(value);
  }
  clearTimeout(deadline);
  display = Number(text.trim());
});

afterAll(async () => {
  for (const c of clients) c.close();
  for (const p of procs) p.kill();
  await Promise.all(procs.map((p) => p.exited));
  xvnc?.kill();
  await xvnc?.exited;
  rmSync(dir, { recursive: true, force: true });
});

test("a wrong cookie, or none, is refused with the server's reason", async () => {
  await expect(connect(randomBytes(16))).rejects.toThrow(
    "X server refused the connection: Invalid MIT-MAGIC-COOKIE-1 key",
  );
  await expect(connect(null)).rejects.toThrow("X server refused the connection: Authorization required");
});

test("the cookie connects: root window, screen size, resource ids", async () => {
  const x = await connect();
  expect([x.width, x.height]).toEqual([800, 600]);
  expect(x.root).toBeGreaterThan(0);
  expect(x.ridMask).toBeGreaterThan(0);
  expect(x.ridBase & x.ridMask).toBe(0);
  expect(await x.getGeometry(x.root)).toEqual({ x: 0, y: 0, width: 800, height: 600 });
});

test("X errors reject the request they answer, by name; later requests still work", async () => {
  const x = await connect();
  // Pipelined: each answer must reach its own request.
  const [bad, bad2, good] = await Promise.allSettled([
    x.getGeometry(0x1fffffff),
    x.configureWindow(0x1ffffffe, { x: 0, y: 0, width: 10, height: 10 }),
    x.queryTree(x.root),
  ]);
  expect(bad.status === "rejected" && String(bad.reason)).toMatch(/BadDrawable in GetGeometry/);
  expect(bad2.status === "rejected" && bad2.reason).toBeInstanceOf(X11Error);
  expect(bad2.status === "rejected" && String(bad2.reason)).toMatch(/BadWindow in ConfigureWindow/);
  expect(good.status === "fulfilled" && Array.isArray(good.value)).toBe(true);
});

test("allowLocalUser admits exactly that uid (localuser:#uid), without a cookie", async () => {
  expect(await canOpen(UID)).toBe(false);
  const x = await connect();
  await x.allowLocalUser(UID);
  expect(await canOpen(UID)).toBe(true);
  expect(await canOpen(OTHER_UID)).toBe(false);
  const p = Bun.spawn(["xhost"], { env: { ...env(), DISPLAY: `:${display}` }, stdout: "pipe", stderr: "ignore" });
  expect(await new Response(p.stdout).text()).toContain(`SI:localuser:#${UID}`);
});

test("getImage gives a rectangle's pixels (ZPixmap, B G R x); a rectangle off the screen is BadMatch, one too large is refused", async () => {
  const x = await connect();
  const r = Bun.spawn(["xsetroot", "-display", `:${display}`, "-solid", "#204080"], {
    env: env(),
    stdout: "ignore",
    stderr: "pipe",
  });
  expect(await r.exited).toBe(0);
  const img = await x.getImage(x.root, 10, 20, 3, 2);
  expect(img.depth).toBe(24);
  expect(img.data.length).toBe(3 * 2 * 4);
  for (let i = 0; i < 6; i++) expect([...img.data.subarray(4 * i, 4 * i + 3)]).toEqual([0x80, 0x40, 0x20]);
  await expect(x.getImage(x.root, x.width - 1, 0, 2, 2)).rejects.toThrow(/BadMatch in GetImage/);
  await expect(x.getImage(x.root, 0, 0, 800, 600)).rejects.toThrow(/larger than this client takes/);
  // The connection still serves.
  expect((await x.getImage(x.root, 0, 0, 1, 1)).data.length).toBe(4);
});

test("top-level windows follow the screen size; 1x1 windows are left alone", async () => {
  const x = await connect();
  await x.allowLocalUser(UID); // done by the test before too: inserting again is harmless
  const errors: Error[] = [];
  const stop = x.keepTopLevelsFitted({ onError: (e) => errors.push(e) });
  const watcher = await connect();
  await watcher.watchRoot();
  const sizes: string[] = [];
  watcher.onRootResize((w, h) => sizes.push(`${w}x${h}`));

  // These connect as nxproxy does: as the admitted uid, without cookie.
  spawnAs(UID, ["xlogo", "-display", `:${display}`, "-geometry", "1x1+3+3"]);
  await waitFor("xlogo's 1x1 window", async () => (await topLevels()).get("xlogo") === "1x1+3+3");
  spawnAs(UID, ["xmessage", "-display", `:${display}`, "hello"]);
  // A new top-level is fitted as it is mapped.
  await waitFor("xmessage fitted to 800x600", async () => (await topLevels()).get("xmessage") === "800x600+0+0");

  const r = Bun.spawn(["xrandr", "--display", `:${display}`, "--fb", "1000x700"], {
    env: env(),
    stdout: "ignore",
    stderr: "pipe",
  });
  expect(await r.exited).toBe(0);
  await waitFor("the root resize event", () => sizes.includes("1000x700"));
  await waitFor("xmessage fitted to 1000x700", async () => (await topLevels()).get("xmessage") === "1000x700+0+0");
  expect((await topLevels()).get("xlogo")).toBe("1x1+3+3");
  expect([x.width, x.height]).toEqual([1000, 700]);
  expect(errors).toEqual([]);

  // Stopped: a resize leaves the windows as they are.
  stop();
  expect(await x.fitTopLevels(1000, 700)).toBe(0);
  const r2 = Bun.spawn(["xrandr", "--display", `:${display}`, "--fb", "900x650"], {
    env: env(),
    stdout: "ignore",
    stderr: "ignore",
  });
  expect(await r2.exited).toBe(0);
  await waitFor("the second root resize event", () => sizes.includes("900x650"));
  expect((await topLevels()).get("xmessage")).toBe("1000x700+0+0");
  expect(await x.fitTopLevels(900, 650)).toBe(1);
  expect((await topLevels()).get("xmessage")).toBe("900x650+0+0");
});

test("a server claiming a reply over 1 MiB is cut off, not buffered", async () => {
  const path = join(dir, "fake-x");
  const setup = Buffer.alloc(80);
  setup[0] = 1;
  setup.writeUInt16LE(11, 2);
  setup.writeUInt16LE(18, 6); // 72 bytes follow: the fixed part, no vendor, no formats, one screen
  setup.writeUInt32LE(0x200000, 12);
  setup.writeUInt32LE(0x1fffff, 16);
  setup[28] = 1;
  setup.writeUInt32LE(0x123, 40); // root
  setup.writeUInt16LE(640, 60);
  setup.writeUInt16LE(480, 62);
  let sent = 0;
  const server = Bun.listen({
    unix: path,
    socket: {
      data(s, d) {
        if (d[0] === 0x6c) return void s.write(setup);
        const reply = Buffer.alloc(64 * 1024);
        reply[0] = 1;
        reply.writeUInt16LE(1, 2);
        reply.writeUInt32LE(1 << 20, 4); // 4 MiB follow
        sent += s.write(reply);
      },
    },
  });
  try {
    const x = await connectX11({ socket: path, cookie: COOKIE });
    clients.push(x);
    expect([x.root, x.width, x.height]).toEqual([0x123, 640, 480]);
    const closed = new Promise<Error | undefined>((resolve) => x.onClose(resolve));
    await expect(x.queryTree(x.root)).rejects.toThrow(/limit 1048576/);
    expect((await closed)?.message).toMatch(/limit/);
    expect(sent).toBeGreaterThan(0);
  } finally {
    server.stop(true);
  }
});
