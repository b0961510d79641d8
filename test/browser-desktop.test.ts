// The desktop in a web browser, end to end (src/web/desktop/README.md): the real Debian desktop
// image in LXC on a node (`qvd node` in a network namespace of this test), a real Chromium in
// that namespace opening https://127.0.0.1:8443/ on the node's L7R, and for the takeover a real
// `qvd client` with its nxproxy on an Xvfb. One desktop for the whole file.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { Browser, BrowserContext, Page } from "playwright-core";
import * as D from "../src/db/index.ts";
import { run } from "../src/run.ts";
import { HTTP_STATUS, launchChromium, SCREENSHOTS } from "./support/browser.ts";
import { useTestDatabase } from "./support/db.ts";
import { desktopShell } from "./support/desktop-session.ts";
import { desktopImage, TestNode, until } from "./support/node.ts";
import { sample } from "./support/prometheus.ts";
import { startXvfb } from "./support/services.ts";

const isRoot = process.getuid?.() === 0;
const db = useTestDatabase();
const ALL = D.ALL_TENANTS;
const PORT = 8443;
const ORIGIN = `https://127.0.0.1:${PORT}`;
const XVFB = 67;
const PASSWORD = "alice-web-pw-1";
const L7R_METRICS = 9101;
const HKD_METRICS = 9102;

describe.skipIf(!isRoot)("the desktop in a web browser", () => {
  const node = new TestNode(db, "webnode");
  const sql = () => db().sql;
  let vm: D.VmRow;
  let browser: Browser;
  let context: BrowserContext;
  let page: Page;
  let work: string;
  const errors: string[] = [];
  const shell = desktopShell(node, () => vm.id, "alice");
  const inDesktop = shell.inDesktop;
  /** A script in the X session; "no X session" (status 97) while there is none yet. */
  const asSession = (script: string) =>
    shell.asSession(script).catch((e: Error) => ({ status: 97, stdout: "", stderr: e.message }));
  let xvfb: { stop(): Promise<void> } | undefined;

  const row = async () =>
    (await sql()`SELECT vm_state, user_state, l7r_session FROM vm_runtimes WHERE vm_id = ${vm.id}`)[0]!;
  /** A request to the L7R from inside the namespace (curl -k): status line and headers, then the body. */
  const curl = (path: string, headers: string[] = []) =>
    run(
      [
        ...node.ns.exec,
        "curl",
        "-sk",
        "-i",
        "--max-time",
        "10",
        ...headers.flatMap((h) => ["-H", h]),
        `${ORIGIN}${path}`,
      ],
      { allowFail: true },
    );
  /** The session's X display in the desktop, as a PNG file here. */
  async function sessionScreenshot(name: string): Promise<string> {
    const r = await asSession("xwd -root -silent | base64 -w0");
    expect(r.status, r.stderr).toBe(0);
    const xwd = join(work, `${name}.xwd`);
    writeFileSync(xwd, Buffer.from(r.stdout.trim(), "base64"));
    const png = join(SCREENSHOTS, `${name}.png`);
    await run(["/usr/bin/convert", `xwd:${xwd}`, png]);
    return png;
  }
  /** The canvas the page draws the desktop on, as a PNG file. */
  async function canvasScreenshot(name: string): Promise<string> {
    const png = join(SCREENSHOTS, `${name}.png`);
    await page.locator("#screen canvas").screenshot({ path: png });
    return png;
  }
  const imageSize = async (png: string) => (await run(["/usr/bin/identify", "-format", "%wx%h", png])).stdout.trim();
  /** Root mean square difference of two images of one size, 0 (same) to 1. */
  async function difference(a: string, b: string): Promise<number> {
    const r = await run(["/usr/bin/compare", "-metric", "RMSE", a, b, "null:"], { allowFail: true });
    return Number(/\(([\d.e-]+)\)/.exec(r.stderr)?.[1] ?? NaN);
  }
  /** The session display's size, from inside the desktop. */
  const sessionSize = async () => /dimensions:\s+(\d+x\d+)/.exec((await asSession("xdpyinfo")).stdout)?.[1];
  /** The xterm's window id and its absolute position on the session's display. */
  async function xterm(): Promise<{ id: string; x: number; y: number; w: number; h: number } | undefined> {
    const m = /^\s*(0x[0-9a-f]+) .*\("xterm" "XTerm"\)\s+(\d+)x(\d+)\+-?\d+\+-?\d+\s+\+(-?\d+)\+(-?\d+)/m.exec(
      (await asSession("xwininfo -root -tree")).stdout,
    );
    return m ? { id: m[1]!, w: Number(m[2]), h: Number(m[3]), x: Number(m[4]), y: Number(m[5]) } : undefined;
  }
  /** The xterm's window id, once the display answers (a resuming nxagent may not for a moment). */
  async function xtermId(): Promise<string> {
    let id: string | undefined;
    await until(async () => (id = (await xterm())?.id) !== undefined, "the session's xterm", 60_000);
    return id!;
  }

  async function newPage(viewport = { width: 1024, height: 720 }) {
    await context?.close().catch(() => {});
    context = await browser.newContext({ viewport, ignoreHTTPSErrors: true, baseURL: ORIGIN });
    context.setDefaultTimeout(20_000);
    page = await context.newPage();
    errors.length = 0;
    page.on("console", (m) => void (m.type() === "error" && errors.push(`console: ${m.text()}`)));
    page.on("pageerror", (e) => errors.push(`page error: ${e.message}`));
    // Chromium runs in the node's namespace: the node's own network set-up (its bridge, a
    // desktop's veth) can abort a load in flight with ERR_NETWORK_CHANGED; load again then.
    await page
      .goto("/")
      .catch((e: Error) => (/ERR_NETWORK_CHANGED/.test(e.message) ? page.goto("/") : Promise.reject(e)));
  }
  async function login(password = PASSWORD) {
    await page.getByLabel("Name", { exact: true }).fill("alice");
    await page.getByLabel("Password", { exact: true }).fill(password);
    await page.getByRole("button", { name: "Log in" }).click();
  }
  /** Connects to the desktop from its list and waits for the canvas. */
  async function connect() {
    await page.getByRole("button", { name: "Connect" }).first().click();
    await page.locator("#screen canvas").waitFor({ timeout: 300_000 });
    await until(async () => (await row()).user_state === "connected", "the browser's session", 120_000);
  }

  beforeAll(async () => {
    const { ensureDeps } = await import("../scripts/deps.ts");
    await ensureDeps(["xvnc", "nxproxy", "chromium", "imagemagick", "xvfb", "xwd", "curl"], () => {});
    const image = await desktopImage();
    await node.setup();
    work = mkdtempSync("/tmp/qvd-browser-test-");
    mkdirSync(SCREENSHOTS, { recursive: true });
    ({ vm } = await node.addDesktop(image, { password: PASSWORD, vm: "web desktop" }));
    await D.create(sql(), D.users, ALL, { tenant_id: 1, name: "bob", password: "bob-web-pw-1" });
    await node.startNode(
      PORT,
      {
        "hkd.timeout.vma_start": "60",
        "l7r.metrics.listen": `127.0.0.1:${L7R_METRICS}`,
        "hkd.metrics.listen": `127.0.0.1:${HKD_METRICS}`,
      },
      { cn: "127.0.0.1" },
    );
    browser = await launchChromium({ netns: node.ns.name, args: ["--ignore-certificate-errors"] });
  }, 30 * 60_000);

  afterAll(async () => {
    await context?.close().catch(() => {});
    await browser?.close().catch(() => {});
    await xvfb?.stop();
    await node.stop();
    if (work) rmSync(work, { recursive: true, force: true });
  }, 120_000);

  test("the page: served at / with a strict Content-Security-Policy; a QVD client's requests are unaffected", async () => {
    const r = await curl("/", ["Accept-Encoding: gzip"]);
    const head = r.stdout.slice(0, r.stdout.indexOf("\r\n\r\n")).toLowerCase();
    expect(head).toStartWith("http/1.1 200");
    expect(head).toContain("content-security-policy: default-src 'self'");
    expect(head).not.toMatch(/content-security-policy:[^\n]*unsafe-(inline|eval)/);
    expect(head).toContain("x-frame-options: deny");
    expect(head).toContain("content-encoding: gzip");
    // The QVD protocol on the same port, as before.
    expect((await curl("/qvd/ping")).stdout).toContain("I am alive!");
    expect((await curl("/qvd/list_of_vm")).stdout).toMatch(/^HTTP\/1.1 401/);
    // A page under /qvd/web/ that is not an asset: 404, not the page.
    expect((await curl("/qvd/web/nothing.js")).stdout).toMatch(/^HTTP\/1.1 404/);
  });

  test("the WebSocket checks its Origin: another page's, none, or plain http is refused before the upgrade", async () => {
    const ws = (origin?: string) =>
      curl("/qvd/web/connect", [
        "Connection: Upgrade",
        "Upgrade: websocket",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        ...(origin ? [`Origin: ${origin}`] : []),
      ]);
    for (const bad of [
      "https://evil.example",
      `https://127.0.0.1:${PORT}.evil.example`,
      `http://127.0.0.1:${PORT}`,
      `https://127.0.0.1:9443`,
      undefined,
    ])
      expect((await ws(bad)).stdout, String(bad)).toMatch(/^HTTP\/1.1 403/);
    const ok = await run(
      [
        ...node.ns.exec,
        "curl",
        "-sk",
        "-i",
        "--max-time",
        "2",
        "-H",
        "Connection: Upgrade",
        "-H",
        "Upgrade: websocket",
        "-H",
        "Sec-WebSocket-Version: 13",
        "-H",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "-H",
        `Origin: ${ORIGIN}`,
        `${ORIGIN}/qvd/web/connect`,
      ],
      { allowFail: true },
    );
    expect(ok.stdout).toMatch(/^HTTP\/1.1 101/);
    expect(ok.stdout).toContain("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
  });

  test("a wrong password gets the page's message (and no browser password dialog)", async () => {
    await newPage();
    await login("not-the-password");
    await expect(page.getByRole("alert").textContent()).resolves.toContain("Wrong name or password");
    const r = await curl("/qvd/create_auth_token", [
      "X-QVD-Web: 1",
      `Authorization: Basic ${Buffer.from("alice:nope").toString("base64")}`,
    ]);
    expect(r.stdout).toMatch(/^HTTP\/1.1 401/);
    expect(r.stdout.toLowerCase()).not.toContain("www-authenticate");
  }, 60_000);

  test("log in and connect: the page's canvas shows the desktop's X display, with its xterm", async () => {
    await newPage();
    await login();
    await page.getByText("web desktop").waitFor();
    await connect();
    // The desktop's display is the size of the page's screen.
    const box = (await page.locator("#screen").boundingBox())!;
    await until(
      async () => (await sessionSize()) === `${Math.floor(box.width)}x${Math.floor(box.height)}`,
      "the desktop to take the page's size",
      60_000,
    ).catch(async (e) => {
      const conf = (await inDesktop("cat /run/qvd/nxagent.conf")).stdout;
      const outer = (
        await run(
          [
            "sh",
            "-c",
            `for d in ${node.root}/run/web/*/; do XAUTHORITY=$d/xauth xwininfo -root -children -display :0; done`,
          ],
          { allowFail: true },
        )
      ).stdout;
      throw new Error(
        `${(e as Error).message}: the desktop is ${await sessionSize()}, the page's screen ${box.width}x${box.height}; ${conf}; ${outer}`,
      );
    });
    await until(async () => (await xterm()) !== undefined, "the session's xterm", 60_000);
    // Both pictures once the screen has settled: the canvas is what the X display shows.
    let diff = 1;
    let shots: string[] = [];
    await until(
      async () => {
        shots = [await sessionScreenshot("browser-session-display"), await canvasScreenshot("browser-canvas")];
        diff = await difference(shots[0]!, shots[1]!);
        return diff < 0.02;
      },
      "the canvas to show the session's display",
      60_000,
    ).catch((e) => {
      throw new Error(`${(e as Error).message}: RMSE ${diff} between ${shots.join(" and ")}`);
    });
    expect(await imageSize(shots[1]!)).toBe(await imageSize(shots[0]!));
    // Not two blank pictures: the display has a window on it, and differs from a flat one.
    const flat = join(work, "flat.png");
    await run(["/usr/bin/convert", "-size", await imageSize(shots[0]!), "xc:black", flat]);
    expect(await difference(shots[0]!, flat)).toBeGreaterThan(0.05);
    expect(errors).toEqual([]);
  }, 600_000);

  test("typing in the page's xterm runs the command in the desktop", async () => {
    const t = (await xterm())!;
    const mark = `typed-in-the-browser-${Date.now().toString(36)}`;
    const typed = async () => (await inDesktop("cat /tmp/qvd-web-typed")).stdout.trim() === mark;
    // A click focuses the xterm (the window manager's click-to-focus), then the keys go to it.
    // Once in a while the first keys of a fresh session went nowhere: the screenshots of such a
    // try are kept, and the user's natural next move (click, type again) is the second try.
    for (let attempt = 1; ; attempt++) {
      await page.locator("#screen canvas").click({ position: { x: t.x + t.w / 2, y: t.y + t.h / 2 } });
      await page.keyboard.press("Control+U"); // an empty command line
      await page.keyboard.type(`echo ${mark} > /tmp/qvd-web-typed`);
      await page.keyboard.press("Enter");
      const ok = await until(typed, "the command typed in the browser", 20_000).then(
        () => true,
        () => false,
      );
      if (ok) break;
      await canvasScreenshot(`browser-typing-try-${attempt}-canvas`);
      await sessionScreenshot(`browser-typing-try-${attempt}-session`);
      if (attempt === 2)
        throw new Error(
          "the command typed in the browser did not run (twice; see .test-output/wat/browser-typing-try-*.png)",
        );
      console.warn("browser-desktop: the first typing try went nowhere; trying again");
    }
    // It ran as the desktop's user, in the session.
    expect((await inDesktop("stat -c %U /tmp/qvd-web-typed")).stdout.trim()).toBe("alice");
  }, 120_000);

  test("the WebSocket refuses what a stranger or another user sends, each with its close code", async () => {
    // Bob's token is good, but for his own desktops only.
    const r = await curl("/qvd/create_auth_token", [
      `Authorization: Basic ${Buffer.from("bob:bob-web-pw-1").toString("base64")}`,
    ]);
    const bobToken = (
      JSON.parse(r.stdout.slice(r.stdout.indexOf("\r\n\r\n") + 4)) as { auth_token: string }
    ).auth_token.trim();
    const hello = (o: Record<string, unknown>) => JSON.stringify({ id: vm.id, width: 800, height: 600, ...o });
    const cases = [
      { name: "binary first", send: [{ binary: 12 }] },
      { name: "not JSON", send: ["{token"] },
      { name: "too long", send: [hello({ token: "x".repeat(5000) })] },
      { name: "forged token", send: [hello({ token: Buffer.from("not-a-token").toString("base64") })] },
      { name: "token with a quote", send: [hello({ token: `a"b` })] },
      { name: "another user's desktop", send: [hello({ token: bobToken })] },
      { name: "no such desktop", send: [hello({ token: bobToken, id: 2 ** 31 })] },
      { name: "id as text", send: [hello({ token: bobToken, id: `${vm.id}` })] },
      { name: "screen too small", send: [hello({ token: bobToken, width: 10, height: 10 })] },
      { name: "screen too large", send: [hello({ token: bobToken, width: 100000, height: 600 })] },
    ];
    const probe = await run(
      [
        ...node.ns.exec,
        process.execPath,
        join(import.meta.dir, "support", "ws-probe.ts"),
        `wss://127.0.0.1:${PORT}/qvd/web/connect`,
        ORIGIN,
        JSON.stringify(cases),
      ],
      { allowFail: true, timeoutMs: 120_000 },
    );
    const got = Object.fromEntries(
      probe.stdout
        .trim()
        .split("\n")
        .filter(Boolean)
        .map((l) => JSON.parse(l))
        .map((x) => [x.name, x]),
    );
    const code = (name: string) => got[name]?.code;
    const error = (name: string) =>
      got[name]?.frames.map((f: string) => JSON.parse(f)).find((f: { type: string }) => f.type === "error");
    expect(code("binary first")).toBe(1008);
    expect(code("not JSON")).toBe(1008);
    expect(code("too long")).toBe(1008);
    expect(code("screen too small")).toBe(1008);
    expect(code("screen too large")).toBe(1008);
    for (const name of ["forged token", "token with a quote"]) {
      expect(code(name), name).toBe(4401);
      expect(error(name)).toEqual({ type: "error", status: 401, message: "Your login has expired; log in again" });
    }
    // Another user's desktop and one that does not exist answer alike: nothing tells them apart.
    for (const name of ["another user's desktop", "no such desktop", "id as text"]) {
      expect(code(name), name).toBe(4404);
      expect(error(name)?.status).toBe(404);
    }
    // None of them disturbed alice's session.
    expect((await row()).user_state).toBe("connected");
  }, 180_000);

  test("the session's display is reachable by no one else: no TCP, a private directory, the X display only with its cookie", async () => {
    const ns = (cmd: string) => run([...node.ns.exec, "sh", "-c", cmd], { allowFail: true });
    // Nothing of the session listens on TCP (the L7R's own ports are the only listeners).
    const tcp = (await ns("ss -Hltnp")).stdout;
    expect(tcp).not.toMatch(/Xvnc|nxproxy/);
    const [dir] = (await run(["sh", "-c", `ls -d ${node.root}/run/web/*/`])).stdout.trim().split("\n");
    const st = (await run(["stat", "-c", "%a %u", dir!, `${dir}rfb`, `${dir}xauth`])).stdout.trim().split("\n");
    const uid = Number(st[0]!.split(" ")[1]);
    expect(uid).toBeGreaterThanOrEqual(1_600_000_000);
    expect(st).toEqual([`700 ${uid}`, `600 ${uid}`, `600 ${uid}`]);
    // Xvnc's X display (an abstract socket too: no file mode guards it) takes no one without the cookie.
    const display = /@\/tmp\/\.X11-unix\/X(\d+)\b.*Xvnc/.exec((await ns("ss -Hxlp")).stdout)?.[1];
    expect(display).toBeDefined();
    const other = await ns(
      `setpriv --reuid=${uid + 1} --regid=${uid + 1} --clear-groups env -u XAUTHORITY xdpyinfo -display :${display}`,
    );
    expect(other.status).not.toBe(0);
    expect(other.stderr).toMatch(/Authorization required|unable to open display/);
    const root = await ns(`env -u XAUTHORITY xdpyinfo -display :${display}`);
    expect(root.status).not.toBe(0);
    // Nor its RFB socket.
    const rfb = await ns(
      `setpriv --reuid=65534 --regid=65534 --clear-groups curl -s --max-time 3 --unix-socket ${dir}rfb http://x/`,
    );
    expect(rfb.status).not.toBe(0);
  }, 60_000);

  test("resizing the browser window resizes the desktop; Full screen takes the whole screen and gives it back", async () => {
    const full = page.getByRole("button", { name: "Full screen" });
    await full.click();
    // The button says so once the browser's fullscreenchange has come.
    await page.waitForFunction(
      () =>
        document.fullscreenElement !== null &&
        document.getElementById("fullscreen")?.getAttribute("aria-pressed") === "true",
    );
    await full.click();
    await page.waitForFunction(
      () =>
        document.fullscreenElement === null &&
        document.getElementById("fullscreen")?.getAttribute("aria-pressed") === "false",
    );
    await page.setViewportSize({ width: 900, height: 640 });
    const box = (await page.locator("#screen").boundingBox())!;
    await until(
      async () => (await sessionSize()) === `${Math.floor(box.width)}x${Math.floor(box.height)}`,
      "the desktop to follow the window",
      60_000,
    ).catch(async (e) => {
      throw new Error(
        `${(e as Error).message}: the desktop is ${await sessionSize()}, the page's screen ${box.width}x${box.height}`,
      );
    });
  }, 120_000);

  test("clipboard both ways: the page's clipboard box and the desktop's CLIPBOARD selection", async () => {
    await page.getByRole("button", { name: "Clipboard" }).click();
    const box = page.getByLabel("Clipboard", { exact: true });
    const toDesktop = `from the browser ${Date.now().toString(36)}`;
    await box.fill(toDesktop);
    await box.dispatchEvent("change");
    await until(
      async () => (await asSession("xclip -o -selection clipboard")).stdout === toDesktop,
      "the desktop's clipboard to hold the page's text",
      30_000,
    );
    const toPage = `from the desktop ${Date.now().toString(36)}`;
    // xclip serves the selection until another owner takes it: in the background.
    expect(
      (await asSession(`printf '%s' '${toPage}' | xclip -selection clipboard -loops 3 >/dev/null 2>&1 &`)).status,
    ).toBe(0);
    await until(
      async () => (await box.inputValue()) === toPage,
      "the page's clipboard box to show the desktop's text",
      30_000,
    );
  }, 120_000);

  test("a qvd client takes the session over from the browser, and the browser back; the X session's windows stay", async () => {
    const before = (await xterm())!;
    xvfb = await startXvfb(XVFB, { exec: node.ns.exec });
    const client = node.client({ port: PORT, user: "alice", password: PASSWORD, display: XVFB });
    const session0 = (await row()).l7r_session;
    try {
      // The page says so, and offers to reconnect.
      await page.getByText("This desktop was opened elsewhere").waitFor({ timeout: 300_000 });
      await until(
        async () => (await row()).user_state === "connected" && (await row()).l7r_session !== session0,
        "the client's session",
        120_000,
      );
      expect(await xtermId()).toBe(before.id);
      // And back: the browser takes it from the client, whose session ends.
      await page.getByRole("button", { name: "Reconnect" }).click();
      await page.locator("#screen canvas").waitFor({ timeout: 120_000 });
      await until(async () => client.exitCode !== null, "the client to end", 120_000);
      await until(async () => (await row()).user_state === "connected", "the browser's session again", 120_000);
      expect(await xtermId()).toBe(before.id);
      expect((await inDesktop("cat /tmp/qvd-web-typed")).status).toBe(0);
    } finally {
      client.kill("SIGKILL");
      await client.exited;
    }
  }, 600_000);

  test("Disconnect lets the session go: the desktop keeps it suspended, and the session's display is gone", async () => {
    await page.getByRole("button", { name: "Disconnect" }).click();
    await until(async () => (await row()).user_state === "disconnected", "the session to be let go", 60_000);
    await page.getByRole("button", { name: "Connect" }).waitFor();
    // No process of a session uid, no directory.
    await until(
      async () => (await run(["sh", "-c", "ps -eo uid= | awk '$1 >= 1600000000' | wc -l"])).stdout.trim() === "0",
      "the display's processes to end",
      30_000,
    );
    await until(
      async () => (await run(["sh", "-c", `ls -A ${node.root}/run/web`])).stdout.trim() === "",
      "the display's directory to go",
      30_000,
    );
    expect(await xtermId()).toMatch(/^0x/);
  }, 120_000);

  test("the desktop stopped under the browser: the page says the session ended", async () => {
    await page.getByRole("button", { name: "Connect" }).click();
    await page.locator("#screen canvas").waitFor({ timeout: 120_000 });
    await until(async () => (await row()).user_state === "connected", "the browser's session", 120_000);
    await D.stopVm(sql(), ALL, vm.id);
    await page.getByText("The desktop session ended.").waitFor({ timeout: 120_000 });
    await until(async () => (await row()).vm_state === "stopped", "the desktop to stop", 120_000);
  }, 300_000);

  test("an expired login gets the page's message and the login form, not a broken socket", async () => {
    await sql()`UPDATE user_tokens SET expires_at = now() - interval '1 second'`;
    await page.getByRole("button", { name: "Reconnect" }).click();
    await page.getByText("Your login has expired; log in again").waitFor();
    await page.getByLabel("Password", { exact: true }).waitFor();
    // The browser itself logs the 401 of the page's request; the page adds nothing.
    expect(errors.filter((e) => !HTTP_STATUS(401).test(e))).toEqual([]);
  }, 60_000);

  test("metrics: the L7R and the HKD counted the logins, the connects by client and path, the start, the sessions' bytes", async () => {
    const scrape = async (port: number) => {
      const r = await run([...node.ns.exec, "curl", "-s", "--max-time", "5", `http://127.0.0.1:${port}/metrics`]);
      return r.stdout;
    };
    const l7r = await scrape(L7R_METRICS);
    // Logins: the wrong password and the good ones; the page's tokens, good and expired.
    expect(sample(l7r, 'qvd_l7r_logins_total{kind="password",result="failed"}')).toBeGreaterThanOrEqual(1);
    expect(sample(l7r, 'qvd_l7r_logins_total{kind="password",result="ok"}')).toBeGreaterThanOrEqual(2);
    expect(sample(l7r, 'qvd_l7r_logins_total{kind="token",result="ok"}')).toBeGreaterThanOrEqual(3);
    expect(sample(l7r, 'qvd_l7r_logins_total{kind="token",result="failed"}')).toBeGreaterThanOrEqual(2);
    // The first browser connect started the desktop; the reconnects resumed its X session; the QVD client took it over.
    expect(sample(l7r, 'qvd_l7r_connect_seconds_count{client="browser",path="cold"}')).toBeGreaterThanOrEqual(1);
    expect(sample(l7r, 'qvd_l7r_connect_seconds_count{client="browser",path="resumed"}')).toBeGreaterThanOrEqual(1);
    expect(sample(l7r, 'qvd_l7r_connects_total{client="qvd",result="ok"}')).toBe(1);
    expect(sample(l7r, 'qvd_l7r_connects_total{client="browser",result="ok"}')).toBeGreaterThanOrEqual(3);
    expect(sample(l7r, 'qvd_l7r_splice_bytes_total{client="browser",direction="down"}')).toBeGreaterThan(10_000);
    expect(sample(l7r, 'qvd_l7r_splice_bytes_total{client="qvd",direction="up"}')).toBeGreaterThan(0);
    // No session is held now.
    expect(sample(l7r, 'qvd_l7r_sessions{client="browser"}')).toBe(0);
    expect(sample(l7r, 'qvd_l7r_sessions{client="qvd"}')).toBe(0);
    const hkd = await scrape(HKD_METRICS);
    expect(sample(hkd, 'qvd_hkd_starts_total{result="ok"}')).toBeGreaterThanOrEqual(1);
    expect(sample(hkd, "qvd_hkd_start_seconds_count")).toBeGreaterThanOrEqual(1);
    expect(sample(hkd, "qvd_hkd_command_lag_seconds_count")).toBeGreaterThanOrEqual(1);
    expect(sample(hkd, "qvd_hkd_command_lag_seconds_sum")).toBeLessThan(60);
    expect(hkd).toContain("# TYPE qvd_hkd_desktops gauge");
    expect(sample(hkd, "qvd_db_queries_total")).toBeGreaterThan(0);
  }, 60_000);
});
