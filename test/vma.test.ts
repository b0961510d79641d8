// The VMA (`qvd vma`) with the real programs: nxagent under xinit, a real nxproxy on the
// client side drawing on a test Xvfb, screenshots of that Xvfb. Provisioning runs against a
// temporary root (useradd/groupadd --root), never against the host's /etc/passwd; the NX
// session then runs as the provisioned uid. A second part runs the VMA as PID 1 of a new PID
// namespace (unshare) to check signal handling and orphan reaping.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
  chmodSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { provision } from "../src/vma/provision.ts";
import { NOTICE_TITLE, noticeText } from "../src/vma/expiry.ts";
import { run } from "../src/run.ts";
import { startNxRelay, type NxRelay } from "./support/nx-relay.ts";
import { waitFor } from "./support/wait.ts";
import { freeDisplay, freePort } from "./support/free.ts";
import { minimalRoot } from "./support/image-root.ts";
import { stopAll } from "./support/spawn.ts";
import { writeVmaConfig } from "./support/vma-config.ts";

const repo = join(import.meta.dir, "..");
const SECRET = "s3cret-of-this-start-0123456789";
/** The NX cookies of x_start (the L7R makes one per x_start); nxproxy reaches nxagent through a relay that adds it. */
const COOKIE = "0123456789abcdef0123456789abcdef";
const COOKIE2 = "fedcba9876543210fedcba9876543210";
let work: string;
const started: { pid: number; kill: (sig?: number | NodeJS.Signals) => void; exited: Promise<number> }[] = [];
let xvfbDisplay = 0;
let nxDisplay = 100;

function spawn(argv: string[], env: Record<string, string> = {}) {
  const p = Bun.spawn(argv, { cwd: repo, env: { ...cleanEnv(), ...env }, stdout: "pipe", stderr: "pipe" });
  started.push(p);
  return p;
}

function cleanEnv(): Record<string, string> {
  const e: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) if (v !== undefined && !k.startsWith("QVD_")) e[k] = v;
  return e;
}

/** Collects a stream into a string buffer (for diagnostics and line waits). */
function collect(stream: ReadableStream<Uint8Array>): { text: () => string } {
  let buf = "";
  void (async () => {
    const dec = new TextDecoder();
    const r = stream.getReader();
    for (;;) {
      const { done, value } = await r.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
    }
  })();
  return { text: () => buf };
}

interface Vma {
  url: string;
  proc: ReturnType<typeof spawn>;
  err: { text: () => string };
  runDir: string;
}

async function startVma(
  name: string,
  settings: Record<string, string | number | boolean>,
  opts: { nodeAddress?: string; pid1?: boolean } = {},
): Promise<Vma> {
  const dir = join(work, name);
  mkdirSync(dir, { recursive: true });
  const runDir = join(dir, "run");
  const file = join(dir, "vma.json");
  writeVmaConfig(file, {
    vmId: 42,
    secret: SECRET,
    nodeAddress: opts.nodeAddress,
    settings: { "path.run": runDir, "vma.display": nxDisplay, ...settings },
  });
  const port = freePort();
  const cmd = [process.execPath, "src/main.ts", "vma", "--config", file, "--listen", `127.0.0.1:${port}`];
  const proc = spawn(opts.pid1 ? ["unshare", "--pid", "--fork", "--mount-proc", ...cmd] : cmd);
  const out = collect(proc.stdout);
  const err = collect(proc.stderr);
  await waitFor(
    `${name} to listen (stderr: ${err.text()})`,
    () =>
      out.text().includes("listening") ||
      (proc.exitCode !== null
        ? (() => {
            throw new Error(`vma exited: ${err.text()}`);
          })()
        : undefined),
    15_000,
  );
  return { url: `http://127.0.0.1:${port}`, proc, err, runDir };
}

async function call(v: Vma, method: "GET" | "POST", path: string, body?: unknown, secret: string | null = SECRET) {
  const headers: Record<string, string> = { "content-type": "application/json" };
  if (secret !== null) headers["x-qvd-vma-secret"] = secret;
  const r = await fetch(v.url + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  return { status: r.status, body: text ? JSON.parse(text) : undefined, text };
}

/** The image's /etc/skel in the provisioning tests. */
const SKEL = { ".profile": "# from skel\n" };

/** The colour of one pixel of an X display, as ImageMagick prints it (e.g. srgb(255,0,0)). */
async function pixel(display: number, x: number, y: number, savePng?: string): Promise<string> {
  const sh = `xwd -root -silent -display :${display} | /usr/bin/convert xwd:- ${savePng ? `-write ${savePng} ` : ""}-format '%[pixel:p{${x},${y}}]' info:-`;
  const p = Bun.spawn(["sh", "-c", sh], { stdout: "pipe", stderr: "pipe" });
  const [o, e] = await Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text(), p.exited]);
  if (!o) throw new Error(`screenshot failed: ${e}`);
  return o.trim();
}

/** Whether a TCP socket listens on `port` (from /proc/net/tcp{,6}: state 0A). */
function tcpListening(port: number): boolean {
  const hex = port.toString(16).toUpperCase().padStart(4, "0");
  return ["/proc/net/tcp", "/proc/net/tcp6"].some(
    (f) =>
      existsSync(f) &&
      readFileSync(f, "utf8")
        .split("\n")
        .some((l) => {
          const c = l.trim().split(/\s+/);
          return c[1]?.endsWith(`:${hex}`) && c[3] === "0A";
        }),
  );
}

let hostPasswd: string;

beforeAll(async () => {
  work = mkdtempSync(join(tmpdir(), "qvd-vma-"));
  chmodSync(work, 0o755); // the session runs as another uid and needs to reach its home (as /home in a guest)
  hostPasswd = readFileSync("/etc/passwd", "utf8");
  nxDisplay = freeDisplay(100);
  xvfbDisplay = freeDisplay(57);
  const x = spawn(["Xvfb", `:${xvfbDisplay}`, "-screen", "0", "1024x768x24", "-nolisten", "tcp", "-noreset"]);
  await waitFor("Xvfb", () => existsSync(`/tmp/.X11-unix/X${xvfbDisplay}`) || undefined, 10_000);
  void x;
});

afterAll(async () => {
  await stopAll(started);
  // The host's accounts were never touched.
  expect(readFileSync("/etc/passwd", "utf8")).toBe(hostPasswd);
  if (work && !process.env.QVD_TEST_KEEP) rmSync(work, { recursive: true, force: true });
});

describe("access", () => {
  let v: Vma;
  beforeAll(async () => {
    v = await startVma("access", { "vma.session.as_current_user": true, "vma.session.command": "/bin/sleep 1000" });
  });
  afterAll(() => v.proc.kill("SIGTERM"));

  test("no secret or a wrong one: 403 without details, before routing", async () => {
    for (const secret of [null, "", "wrong", SECRET + "x", SECRET.slice(0, -1)]) {
      for (const [m, p] of [
        ["GET", "/vma/ping"],
        ["POST", "/vma/x_start"],
        ["GET", "/nope"],
      ] as const) {
        const r = await call(v, m, p, undefined, secret);
        expect(r.status).toBe(403);
        expect(r.body).toEqual({ error: "forbidden" });
      }
    }
  });

  test("ping, x_state, unknown paths and methods", async () => {
    expect(await call(v, "GET", "/vma/ping")).toMatchObject({
      status: 200,
      body: { ok: true, vm_id: 42, state: "stopped" },
    });
    const s = await call(v, "GET", "/vma/x_state");
    expect(s.status).toBe(200);
    expect(s.body.state).toBe("stopped");
    expect(Number.isNaN(Date.parse(s.body.since))).toBe(false);
    expect((await call(v, "GET", "/vma/nope")).status).toBe(404);
    expect((await call(v, "POST", "/vma/ping")).status).toBe(404);
    expect((await call(v, "GET", "/vma/x_start")).status).toBe(404);
  });

  test("x_start parameters are checked: 422 naming the field", async () => {
    const ok = { user: "alice", uid: 20000, gid: 20000, cookie: COOKIE };
    const cases: [Record<string, unknown>, string][] = [
      [{ ...ok, geometry: "800x600,evil=1" }, "geometry"],
      [{ ...ok, geometry: "big" }, "geometry"],
      [{ ...ok, keyboard: "pc105/us,link=modem" }, "keyboard"],
      [{ ...ok, keyboard: "us" }, "keyboard"],
      [{ ...ok, link: "fast" }, "link"],
      [{ ...ok, client_os: "beos" }, "client_os"],
      [{ ...ok, fullscreen: "maybe" }, "fullscreen"],
      [{ ...ok, uid: 0 }, "uid"],
      [{ ...ok, gid: "x" }, "gid"],
      [{ ...ok, user: "Root;rm" }, "user"],
      [{ ...ok, home: "/home/../etc" }, "home"],
      [{ uid: 20000, gid: 20000 }, "user"],
      [{ ...ok, nxagent_args: "-foo" }, "nxagent_args"],
      [{ ...ok, properties: { "qvd.vm.user.groups": "audio;rm -rf" } }, "properties"],
      [{ user: "alice", uid: 20000, gid: 20000 }, "cookie"],
      [{ ...ok, cookie: COOKIE.toUpperCase() }, "cookie"],
      [{ ...ok, cookie: `${COOKIE},accept=0.0.0.0` }, "cookie"],
      [{ ...ok, cookie: "" }, "cookie"],
    ];
    for (const [body, field] of cases) {
      const r = await call(v, "POST", "/vma/x_start", body);
      expect(r.status, JSON.stringify(body)).toBe(422);
      expect(r.body.field).toBe(field);
      expect(r.body.error).toStartWith(`${field}: `);
    }
    const bad = await fetch(v.url + "/vma/x_start", {
      method: "POST",
      headers: { "x-qvd-vma-secret": SECRET },
      body: "{nope",
    });
    expect(bad.status).toBe(400);
    expect((await call(v, "GET", "/vma/x_state")).body.state).toBe("stopped");
  });

  test("requests from another address than the node's: 403, whatever the method (the VMA answers its node only)", async () => {
    const other = await startVma("other-node", { "vma.session.as_current_user": true }, { nodeAddress: "198.18.0.1" });
    const r = await call(other, "GET", "/vma/ping");
    expect(r.status).toBe(403);
    expect(r.body).toEqual({ error: "forbidden" });
    for (const [m, p] of [
      ["POST", "/vma/x_stop"],
      ["POST", "/vma/x_suspend"],
      ["POST", "/vma/poweroff"],
      ["POST", "/vma/expire"],
      ["GET", "/vma/nope"],
    ] as const)
      expect((await call(other, m, p, m === "POST" ? {} : undefined)).status, p).toBe(403);
    expect((await call(other, "GET", "/vma/x_state")).status).toBe(403);
    expect((await call(other, "GET", "/vma/x_state", undefined, "wrong-secret")).status).toBe(403);
    expect(
      (await call(other, "POST", "/vma/x_start", { user: "alice", uid: 20001, gid: 20001, cookie: "0".repeat(32) }))
        .status,
    ).toBe(403);
    other.proc.kill("SIGTERM");
    expect(await other.proc.exited).toBe(0);
  });

  test("expire answers; its body is checked", async () => {
    expect(await call(v, "POST", "/vma/expire", { soft: 1, hard: 2 })).toMatchObject({
      status: 200,
      body: { ok: true },
    });
    // What the node sends: ISO times, the hard one null when unset.
    expect((await call(v, "POST", "/vma/expire", { soft: "2026-12-06T17:00:00.000Z", hard: null })).status).toBe(200);
    expect((await call(v, "POST", "/vma/expire", { when: 1 })).status).toBe(422);
    // Only times get through, never text that would reach the notice or the hook.
    for (const soft of ["$(touch /tmp/pwned)", "-file /etc/shadow", "2026-12-06T17:00:00Z; id", "tomorrow", -5, 1e15])
      expect(await call(v, "POST", "/vma/expire", { soft })).toMatchObject({ status: 422, body: { field: "soft" } });
  });
});

describe("the expire hook (vma.on_action.expire)", () => {
  test("runs with the times as ISO arguments, once per expiry setting; a failure is 500 and runs again at the next call", async () => {
    const dir = join(work, "hook");
    mkdirSync(dir, { recursive: true });
    const out = join(dir, "calls");
    const hook = join(dir, "hook.sh");
    // Fails while the file `fail` exists; records each run's arguments, one line per run.
    writeFileSync(hook, `#!/bin/sh\necho "$*" >> ${out}\n[ ! -e ${join(dir, "fail")} ]\n`, { mode: 0o755 });
    const h = await startVma("hook", {
      "vma.session.as_current_user": true,
      "vma.session.command": "/bin/sleep 1000",
      "vma.on_action.expire": hook,
    });
    try {
      const calls = () => (existsSync(out) ? readFileSync(out, "utf8").trim().split("\n") : []);
      for (let i = 0; i < 3; i++)
        expect((await call(h, "POST", "/vma/expire", { soft: "2026-12-06T17:00:00Z", hard: null })).status).toBe(200);
      expect(calls()).toEqual([
        "vm.expiration.soft 2026-12-06T17:00:00.000Z vm.expiration.hard  qvd.vm.session.state stopped qvd.hook.on_action expire",
      ]);
      writeFileSync(join(dir, "fail"), "");
      expect((await call(h, "POST", "/vma/expire", { soft: 1796576400, hard: 1796580000 })).status).toBe(500);
      rmSync(join(dir, "fail"));
      expect((await call(h, "POST", "/vma/expire", { soft: 1796576400, hard: 1796580000 })).status).toBe(200);
      expect((await call(h, "POST", "/vma/expire", { soft: 1796576400, hard: 1796580000 })).status).toBe(200);
      expect(calls().slice(1)).toEqual(
        Array(2).fill(
          `vm.expiration.soft ${new Date(1796576400_000).toISOString()} vm.expiration.hard ${new Date(1796580000_000).toISOString()} qvd.vm.session.state stopped qvd.hook.on_action expire`,
        ),
      );
    } finally {
      h.proc.kill("SIGTERM");
      await h.proc.exited;
    }
  });
});

describe("provisioning (temporary root)", () => {
  test("creates group, user and home; keeps an existing home; idempotent", async () => {
    const dir = join(work, "prov");
    const root = minimalRoot(dir, SKEL);
    const acc = await provision(
      { user: "bob", uid: 51001, gid: 51001, home: "/home/bob", shell: "/bin/bash", groups: [] },
      root,
    );
    expect(acc).toMatchObject({ user: "bob", uid: 51001, gid: 51001, home: "/home/bob" });
    expect(readFileSync(join(root, "etc/passwd"), "utf8")).toContain("bob:x:51001:51001::/home/bob:/bin/bash");
    expect(readFileSync(join(root, "etc/group"), "utf8")).toContain("bob:x:51001:");
    const st = statSync(join(root, "home/bob"));
    expect([st.uid, st.gid, st.mode & 0o777]).toEqual([51001, 51001, 0o700]);
    expect(readFileSync(join(root, "home/bob/.profile"), "utf8")).toBe("# from skel\n");
    writeFileSync(join(root, "home/bob/work.txt"), "keep me");
    // Again: nothing added twice, the home is left as it is.
    await provision({ user: "bob", uid: 51001, gid: 51001, home: "/home/bob", shell: "/bin/bash", groups: [] }, root);
    expect(readFileSync(join(root, "etc/passwd"), "utf8").match(/^bob:/gm)).toHaveLength(1);
    expect(readFileSync(join(root, "home/bob/work.txt"), "utf8")).toBe("keep me");
    // A home that exists already (the backend's bind mount) gets its owner, not a wipe.
    mkdirSync(join(root, "home/carol"));
    writeFileSync(join(root, "home/carol/notes"), "old");
    const c = await provision(
      { user: "carol", uid: 51002, gid: 51002, home: "/home/carol", shell: "/bin/bash", groups: [] },
      root,
    );
    expect(c.uid).toBe(51002);
    expect(statSync(join(root, "home/carol")).uid).toBe(51002);
    expect(readFileSync(join(root, "home/carol/notes"), "utf8")).toBe("old");
    expect(existsSync(join(root, "home/carol/.profile"))).toBe(false);
    // A uid taken by another user: useradd fails, the group it added is removed again.
    await expect(
      provision({ user: "dave", uid: 51001, gid: 51003, home: "/home/dave", shell: "/bin/bash", groups: [] }, root),
    ).rejects.toThrow(/useradd/);
    expect(readFileSync(join(root, "etc/group"), "utf8")).not.toContain("dave:");
    expect(readFileSync("/etc/passwd", "utf8")).toBe(hostPasswd);
  });
});

describe("NX session (nxagent, nxproxy, Xvfb)", () => {
  let v: Vma;
  let root: string;
  const states: string[] = [];
  let proxy: ReturnType<typeof spawn> | undefined;
  const UID = 51010;

  const state = async () => {
    const s = (await call(v, "GET", "/vma/x_state")).body as { state: string; since: string };
    if (states.at(-1) !== s.state) states.push(s.state);
    return s;
  };
  const waitState = (want: string, timeoutMs = 20_000) =>
    waitFor(
      `state ${want} (seen ${states.join(" → ")}; vma: ${v.err.text().split("\n").slice(-8).join("\n")})`,
      async () => ((await state()).state === want ? true : undefined),
      timeoutMs,
      50,
    );
  let relay: NxRelay;
  const startProxy = () => {
    proxy = spawn(["nxproxy", "-S", `localhost:${relay.display}`], { DISPLAY: `:${xvfbDisplay}` });
    collect(proxy.stdout);
    return collect(proxy.stderr);
  };

  beforeAll(async () => {
    root = minimalRoot(join(work, "session"), SKEL);
    const session = join(work, "session", "session.sh");
    writeFileSync(session, "#!/bin/sh\necho session started as $(id -u) in $HOME\nexec sleep 1000\n");
    chmodSync(session, 0o755);
    v = await startVma("session", {
      "vma.provision.root": root,
      "vma.session.command": session,
      "vma.timeout.listening": 30,
      "identity.groups.allowed": "daemon",
    }); // the minimal root has no desktop groups
    relay = startNxRelay({ host: "127.0.0.1", targetPort: 4000 + nxDisplay, cookie: COOKIE });
  });
  afterAll(() => {
    relay?.stop();
    proxy?.kill("SIGKILL");
    v.proc.kill("SIGTERM");
    writeFileSync(join(work, "session", "vma.log"), v.err.text());
  });

  test("x_start provisions, nxagent listens on 4000+display", async () => {
    const properties = {
      "qvd.vm.user.groups": "daemon",
      "my.site": "a=b\nc",
      "qvd.client.link": "lan",
      "qvd.slave.key": "k".repeat(64),
    };
    const r = await call(v, "POST", "/vma/x_start", {
      user: "alice",
      uid: UID,
      gid: UID,
      keyboard: "pc105/us",
      client_os: "linux",
      link: "lan",
      geometry: "800x600",
      fullscreen: false,
      properties,
      cookie: COOKIE,
    });
    expect(r).toMatchObject({ status: 200, body: { state: "starting" } });
    states.push("starting");
    await waitState("listening");
    expect(["starting", "provisioning"]).toContain(states[1]!);
    // The cookie and the node's address (accept=) lock nxagent; the file is nxagent's (the
    // user's group) to read, not the user's to change.
    const conf = join(v.runDir, "nxagent.conf");
    // The services (src/roles/vma.ts) offer their channels whenever the node and the administrator
    // allow them (an X session keeps its channels across resumes): cups= printing, media=1 sound,
    // slave=1 the slave channel (x_start has a slave key).
    expect(readFileSync(conf, "utf8")).toBe(
      `nx/nx,keyboard=pc105/us,client=linux,link=lan,geometry=800x600,fullscreen=0,cups=2100,media=1,slave=1,tolerancechecks=risky,cookie=${COOKIE},accept=127.0.0.1:${nxDisplay}\n`,
    );
    expect([statSync(conf).uid, statSync(conf).gid, statSync(conf).mode & 0o777]).toEqual([
      process.getuid!(),
      UID,
      0o640,
    ]);
    expect(readFileSync(join(root, "etc/passwd"), "utf8")).toContain(`alice:x:${UID}:${UID}::/home/alice:`);
    // The session's qvd.vm.user.groups property gave the supplementary groups (not vma.user.groups).
    expect(readFileSync(join(root, "etc/group"), "utf8")).toMatch(/^daemon:x:\d+:alice$/m);
    // The properties, for programs in the desktop: the user's own file, without the slave key.
    const pf = join(v.runDir, "session.properties");
    expect(readFileSync(pf, "utf8")).toBe("my.site=a=b\\nc\nqvd.client.link=lan\nqvd.vm.user.groups=daemon\n");
    expect([statSync(pf).uid, statSync(pf).mode & 0o777]).toEqual([UID, 0o600]);
    // nxagent runs as the provisioned user, as a child (of xinit), not as PID 1.
    const pid = Number(readFileSync(join(v.runDir, "nxagent.pid"), "utf8"));
    expect(statSync(`/proc/${pid}`).uid).toBe(UID);
    // nxagent listens on 4000 + display. (Not probed with a bare TCP connect: nxagent takes
    // the first connection as the NX proxy's and aborts the session when it closes.)
    expect(tcpListening(4000 + nxDisplay)).toBe(true);
    // A second x_start while listening is refused.
    const again = await call(v, "POST", "/vma/x_start", { user: "alice", uid: UID, gid: UID, cookie: COOKIE });
    expect(again.status).toBe(409);
    expect(again.body.error).toContain("state listening");
  });

  test("a real nxproxy connects; the session's pixels arrive on the client's Xvfb", async () => {
    await waitState("listening");
    startProxy();
    await waitState("connected");
    const xs = Bun.spawn(["xsetroot", "-display", `:${nxDisplay}`, "-solid", "#ff0000"], { stderr: "pipe" });
    expect(await xs.exited).toBe(0);
    const png = join(work, "session", "screen-red.png");
    const px = await waitFor(
      "red pixels on the client",
      async () => {
        const p = await pixel(xvfbDisplay, 100, 100, png);
        return p === "srgb(255,0,0)" ? p : undefined;
      },
      15_000,
      300,
    );
    expect(px).toBe("srgb(255,0,0)");
    // The session program runs as the user, with its home.
    const log = await waitFor(
      "session log",
      () => {
        const f = join(root, "home/alice/.qvd-session.log");
        return existsSync(f) && readFileSync(f, "utf8").includes("session started")
          ? readFileSync(f, "utf8")
          : undefined;
      },
      20_000,
    );
    expect(log).toContain(`session started as ${UID} in ${join(root, "home/alice")}`);
  });

  /** Windows of the session titled as the expiry notice. */
  const notices = async () => {
    const tree = (await run(["xwininfo", "-display", `:${nxDisplay}`, "-root", "-tree"], { allowFail: true })).stdout;
    return tree.split("\n").filter((l) => l.includes(`"${NOTICE_TITLE}"`));
  };
  /** The notice programs (xmessage) running: pid, uid, argv. */
  const xmessages = () =>
    readdirSync("/proc")
      .filter((p) => /^\d+$/.test(p))
      .map((p) => {
        try {
          return {
            pid: Number(p),
            uid: statSync(`/proc/${p}`).uid,
            argv: readFileSync(`/proc/${p}/cmdline`, "utf8").split("\0").slice(0, -1),
          };
        } catch {
          return undefined;
        }
      })
      .filter((x) => x?.argv[0] === "/usr/bin/xmessage");

  test("soft expiry: one notice window in the session, as the user; repeats do not stack; new times replace it", async () => {
    const soft = new Date(Date.now() - 1000).toISOString();
    expect((await call(v, "POST", "/vma/expire", { soft, hard: null })).status).toBe(200);
    await waitFor("the notice window", async () => ((await notices()).length ? true : undefined), 15_000, 200);
    for (let i = 0; i < 3; i++) expect((await call(v, "POST", "/vma/expire", { soft, hard: null })).status).toBe(200);
    await Bun.sleep(1000); // a check that nothing happens: the repeated calls open no second window within 1 s
    expect(await notices()).toHaveLength(1);
    let procs = xmessages();
    expect(procs).toHaveLength(1);
    expect(procs[0]!.uid).toBe(UID);
    expect(procs[0]!.argv.at(-1)).toBe(noticeText(null));
    // A hard time: the window is replaced by one naming the restart time.
    const hard = new Date(Date.now() + 3600_000);
    expect((await call(v, "POST", "/vma/expire", { soft, hard: hard.toISOString() })).status).toBe(200);
    await waitFor(
      "the new notice",
      () => (xmessages().length === 1 && xmessages()[0]!.pid !== procs[0]!.pid ? true : undefined),
      15_000,
      200,
    );
    await waitFor("one window", async () => ((await notices()).length === 1 ? true : undefined), 15_000, 200);
    procs = xmessages();
    expect(procs[0]!.argv.at(-1)).toBe(noticeText(hard));
    expect(procs[0]!.argv.at(-1)).toContain(
      `at ${String(hard.getHours()).padStart(2, "0")}:${String(hard.getMinutes()).padStart(2, "0")}`,
    );
  });

  test("x_suspend suspends; x_start resumes with a new cookie; a new nxproxy reconnects", async () => {
    expect((await call(v, "POST", "/vma/x_suspend")).status).toBe(200);
    await waitState("suspended", 30_000);
    await waitFor(
      "nxproxy to end",
      () => (proxy!.exitCode !== null || proxy!.signalCode !== null ? true : undefined),
      15_000,
    );
    const r = await call(v, "POST", "/vma/x_start", {
      user: "alice",
      uid: UID,
      gid: UID,
      geometry: "640x480",
      cookie: COOKIE2,
    });
    expect(r).toMatchObject({ status: 200, body: { state: "starting" } });
    expect(readFileSync(join(v.runDir, "nxagent.conf"), "utf8")).toMatch(
      new RegExp(`geometry=640x480,.*,cookie=${COOKIE2},accept=127\\.0\\.0\\.1:`),
    );
    relay.cookie = COOKIE2; // nxagent reads the new one on resuming
    await waitState("listening");
    startProxy();
    await waitState("connected");
    // x_start while connected: nxagent is told to suspend, the caller to retry.
    const busy = await call(v, "POST", "/vma/x_start", { user: "alice", uid: UID, gid: UID, cookie: COOKIE });
    expect(busy.status).toBe(409);
    await waitState("suspended", 30_000);
    const r2 = await call(v, "POST", "/vma/x_start", { user: "alice", uid: UID, gid: UID, cookie: COOKIE });
    expect(r2.status).toBe(200);
    relay.cookie = COOKIE;
    await waitState("listening");
    startProxy();
    await waitState("connected");
    const xs = Bun.spawn(["xsetroot", "-display", `:${nxDisplay}`, "-solid", "#0000ff"]);
    expect(await xs.exited).toBe(0);
    await waitFor(
      "blue pixels after resume",
      async () => ((await pixel(xvfbDisplay, 50, 50)) === "srgb(0,0,255)" ? true : undefined),
      15_000,
      300,
    );
  });

  test("an expiry set while the session is suspended is shown at the resume, once", async () => {
    expect((await call(v, "POST", "/vma/x_suspend")).status).toBe(200);
    await waitState("suspended", 30_000);
    await waitFor(
      "nxproxy to end",
      () => (proxy!.exitCode !== null || proxy!.signalCode !== null ? true : undefined),
      15_000,
    );
    const soft = new Date(Date.now() - 1000).toISOString();
    const hard = new Date(Date.now() + 2 * 3600_000);
    for (let i = 0; i < 2; i++)
      expect((await call(v, "POST", "/vma/expire", { soft, hard: hard.toISOString() })).status).toBe(200);
    // The old times' window is closed; the new one waits for the user.
    await waitFor("the old notice to close", () => (xmessages().length === 0 ? true : undefined), 10_000, 200);
    await Bun.sleep(1500); // a check that nothing happens: no new notice within 1.5 s while nobody is connected
    expect(xmessages()).toHaveLength(0);
    expect((await call(v, "POST", "/vma/x_start", { user: "alice", uid: UID, gid: UID, cookie: COOKIE2 })).status).toBe(
      200,
    );
    relay.cookie = COOKIE2;
    await waitState("listening");
    startProxy();
    await waitState("connected");
    await waitFor(
      "the notice after the resume",
      async () => ((await notices()).length === 1 ? true : undefined),
      15_000,
      200,
    );
    expect((await call(v, "POST", "/vma/expire", { soft, hard: hard.toISOString() })).status).toBe(200);
    await Bun.sleep(1000); // a check that nothing happens: the same times again open no second window within 1 s
    expect(await notices()).toHaveLength(1);
    expect(xmessages().map((x) => [x!.uid, x!.argv.at(-1)])).toEqual([[UID, noticeText(hard)]]);
  });

  test("a new X session (the user logged out and in again) shows the notice again", async () => {
    const before = xmessages();
    expect(before).toHaveLength(1);
    expect((await call(v, "POST", "/vma/x_stop")).status).toBe(200);
    await waitState("stopped", 30_000);
    expect((await call(v, "POST", "/vma/x_start", { user: "alice", uid: UID, gid: UID, cookie: COOKIE })).status).toBe(
      200,
    );
    relay.cookie = COOKIE;
    await waitState("listening");
    startProxy();
    await waitState("connected");
    await waitFor(
      "the notice in the new session",
      async () => ((await notices()).length === 1 ? true : undefined),
      15_000,
      200,
    );
    expect(xmessages().map((x) => x!.argv.at(-1))).toEqual([before[0]!.argv.at(-1)]);
    expect(xmessages()[0]!.pid).not.toBe(before[0]!.pid);
  });

  test("x_stop ends nxagent; poweroff ends the VMA", async () => {
    const pid = Number(readFileSync(join(v.runDir, "nxagent.pid"), "utf8"));
    expect((await call(v, "POST", "/vma/x_stop")).body).toEqual({ state: "stopping" });
    await waitState("stopped", 30_000);
    expect(existsSync(`/proc/${pid}`)).toBe(false);
    expect(existsSync(join(v.runDir, "nxagent.pid"))).toBe(false);
    const seen = states.filter((x) => x !== "provisioning").filter((x, i, a) => x !== a[i - 1]);
    expect(seen.slice(0, 3)).toEqual(["starting", "listening", "connected"]);
    expect(seen.slice(-2)).toEqual(["stopping", "stopped"]);
    const r = await call(v, "POST", "/vma/poweroff");
    expect(r).toMatchObject({ status: 202, body: { state: "stopping" } });
    expect(await v.proc.exited).toBe(0);
  });
});

describe("as PID 1 (new PID namespace)", () => {
  test("reaps orphans and shuts the session down on SIGTERM", async () => {
    const dir = join(work, "pid1");
    mkdirSync(dir, { recursive: true });
    // The expire hook leaves an orphan behind: it is re-parented to PID 1, the VMA.
    const hook = join(dir, "hook.sh");
    writeFileSync(hook, "#!/bin/sh\n( exec sleep 0.3 </dev/null >/dev/null 2>&1 & )\nexit 0\n");
    chmodSync(hook, 0o755);
    const v = await startVma(
      "pid1",
      { "vma.session.as_current_user": true, "vma.session.command": "/bin/sleep 1000", "vma.on_action.expire": hook },
      { pid1: true },
    );
    const vmaPid = await waitFor(
      "the VMA's host pid",
      () => {
        const kids = readFileSync(`/proc/${v.proc.pid}/task/${v.proc.pid}/children`, "utf8")
          .trim()
          .split(/\s+/)
          .filter(Boolean);
        return kids.length ? Number(kids[0]) : undefined;
      },
      20_000,
    );
    expect(v.err.text()).toContain("pid1=true");
    expect((await call(v, "POST", "/vma/expire", {})).status).toBe(200);
    const zombies = () => {
      const kids = readFileSync(`/proc/${vmaPid}/task/${vmaPid}/children`, "utf8").trim().split(/\s+/).filter(Boolean);
      return kids.filter((k) => {
        try {
          return readFileSync(`/proc/${k}/stat`, "utf8").split(") ")[1]!.startsWith("Z");
        } catch {
          return false;
        }
      });
    };
    await Bun.sleep(500); // the hook's orphan (sleep 0.3) has exited by now: none of PID 1's children may stay a zombie
    await waitFor("orphans to be reaped", () => (zombies().length === 0 ? true : undefined), 5_000);
    // A session is running; SIGTERM stops it and ends PID 1 (the container).
    expect(
      (await call(v, "POST", "/vma/x_start", { user: "alice", uid: 20000, gid: 20000, cookie: COOKIE })).status,
    ).toBe(200);
    await waitFor(
      "listening",
      async () => ((await call(v, "GET", "/vma/x_state")).body.state === "listening" ? true : undefined),
      20_000,
    );
    process.kill(vmaPid, "SIGTERM");
    expect(await v.proc.exited).toBe(0);
    writeFileSync(join(dir, "vma.log"), v.err.text());
    expect(v.err.text()).toContain('reason="SIGTERM"');
    expect(existsSync(`/tmp/.X${nxDisplay}-lock`)).toBe(false);
  });
});
