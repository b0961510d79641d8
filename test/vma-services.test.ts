// The VMA's session services on the host (as root), without nxagent: the desktop's printing
// (src/vma/printing.ts) against a real client CUPS with cups-pdf printers (test/support/services.ts)
// reached directly on 127.0.0.1:<port> instead of nxagent's channel 2100; the session's own
// cupsd runs as `nobody`, as it runs as the user in a desktop. A hostile "client CUPS" (a small
// IPP responder) offers printer names built to inject options. The checks of what a service may
// add to nxagent's options line, and the order of the Session's calls to its services over a real
// nxagent session (src/vma/session.ts) are here too.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import {
  chmodSync,
  existsSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { run, spawnDaemon } from "../src/run.ts";
import type { ServiceContext, SessionService } from "../src/vma/services.ts";
import {
  execAs,
  nxagentOptions,
  privPrefix,
  serviceOptionProblem,
  type Session,
  type SessionOptions,
} from "../src/vma/session.ts";
import {
  clientWantsPrinting,
  cupsDir,
  cupsSocket,
  MAX_PRINTERS,
  printingService,
  usablePrinterNames,
} from "../src/vma/printing.ts";
import { startClientCups, type ClientCups } from "./support/services.ts";
import { startNxRelay, type NxRelay } from "./support/nx-relay.ts";
import { until } from "./support/wait.ts";
import { freeDisplay } from "./support/free.ts";
import { minimalRoot } from "./support/image-root.ts";
import { sharesService } from "../src/vma/shares.ts";
import { stopAll } from "./support/spawn.ts";
import { testSession } from "./support/vma-session.ts";

const PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const NOBODY = { user: "nobody", uid: 65534, gid: 65534, shell: "/bin/sh", groups: [] as number[] };
const COOKIE = "0123456789abcdef0123456789abcdef";
let work: string;

beforeAll(() => {
  work = mkdtempSync("/tmp/qvd-vma-services-");
  chmodSync(work, 0o755);
});
afterAll(() => rmSync(work, { recursive: true, force: true }));

/** What the Session gives a service, for `nobody` (the Session's own helpers: setpriv, the session env only). */
function context(
  name: string,
  properties: Record<string, string | number | boolean>,
  clientOs = "linux",
): ServiceContext {
  const dir = join(work, name);
  const runDir = join(dir, "run");
  const home = join(dir, "home");
  mkdirSync(runDir, { recursive: true, mode: 0o755 });
  mkdirSync(home, { recursive: true });
  chmodSync(dir, 0o755);
  const account = { ...NOBODY, home };
  const env = { PATH, HOME: home, USER: "nobody", LOGNAME: "nobody", LANG: "C" };
  const prefix = privPrefix(account);
  return {
    account,
    properties,
    clientOs,
    display: 100,
    runDir,
    homeOnDisk: home,
    env,
    runAsUser: (argv, e) => spawnDaemon([...prefix, ...argv], { cwd: "/", env: { ...env, ...e }, detached: true }),
    execAsUser: (argv, o = {}) => execAs(prefix, argv, { ...env, ...(o.env ?? {}) }, o),
  };
}

/** lpstat/lp/lpadmin as nobody against the session's cupsd (as a program in the desktop would). */
const asUser = (ctx: ServiceContext, argv: string[]) =>
  ctx.execAsUser(argv, { env: { CUPS_SERVER: cupsSocket(ctx.runDir) } });
const queues = async (ctx: ServiceContext) =>
  (await asUser(ctx, ["lpstat", "-e"])).stdout.split("\n").filter(Boolean).sort();

describe("nxagent options a service may add", () => {
  test("name=value of safe characters, never the session's own options, never twice", () => {
    expect(serviceOptionProblem("cups=2100", [])).toBeUndefined();
    expect(serviceOptionProblem("media=1", ["cups=2100"])).toBeUndefined();
    for (const bad of [
      "cups=2100,accept=0.0.0.0",
      "cups=2100:100",
      "cups=",
      "=1",
      "cups 2100",
      "Cups=1",
      "cups=a\nb",
      "media=1;x",
      `x=${"a".repeat(201)}`,
    ])
      expect(serviceOptionProblem(bad, [])).toBeString();
    for (const own of [
      "cookie=" + COOKIE,
      "accept=10.0.0.1",
      "keyboard=pc105/us",
      "tolerancechecks=bypass",
      "client=linux",
      "options=/tmp/x",
    ])
      expect(serviceOptionProblem(own, [])).toContain("session's own");
    expect(serviceOptionProblem("cups=2101", ["cups=2100"])).toContain("twice");
  });

  test("nxagentOptions appends the services' options after the session's and refuses an injected one", () => {
    const p = { user: "u", uid: 1, gid: 1, cookie: COOKIE, client_os: "linux" };
    expect(nxagentOptions(p, 100, "risky", "10.0.0.1", ["cups=2100", "slave=1", "media=1"])).toBe(
      `nx/nx,client=linux,cups=2100,slave=1,media=1,tolerancechecks=risky,cookie=${COOKIE},accept=10.0.0.1:100`,
    );
    expect(() => nxagentOptions(p, 100, "risky", "10.0.0.1", ["cups=2100,accept=0.0.0.0"])).toThrow(
      /bad nxagent option/,
    );
    expect(() => nxagentOptions(p, 100, "risky", "10.0.0.1", ["accept=0.0.0.0"])).toThrow(/session's own/);
  });
});

describe("printing: who gets it", () => {
  test("the client asks with qvd.client.printing.enabled=1; windows clients get none", () => {
    expect(clientWantsPrinting({ "qvd.client.printing.enabled": 1 }, "linux")).toBe(true);
    expect(clientWantsPrinting({ "qvd.client.printing.enabled": "1" })).toBe(true);
    expect(clientWantsPrinting({ "qvd.client.printing.enabled": true }, "darwin")).toBe(true);
    expect(clientWantsPrinting({}, "linux")).toBe(false);
    expect(clientWantsPrinting({ "qvd.client.printing.enabled": "0" }, "linux")).toBe(false);
    expect(clientWantsPrinting({ "qvd.client.printing.enabled": "1" }, "windows")).toBe(false);
    expect(clientWantsPrinting({ "qvd.client.printing.enabled": "1", "qvd.client.os": "winnt" })).toBe(false);
  });

  test("prepare: cups=<display+2000> when the node and the administrator allow it, whatever the client wants (never for Windows clients)", async () => {
    const on = { "qvd.client.printing.enabled": "1" };
    const prep = async (enable: boolean, props: Record<string, string>, os = "linux") =>
      (await printingService({ enable }).prepare(context("prep", props, os))).options;
    expect(await prep(true, on)).toEqual(["cups=2100"]);
    expect(await prep(false, on)).toEqual([]);
    for (const off of ["0", "false", "no", "No"])
      expect(await prep(true, { ...on, "qvd.vm.printing.enable": off })).toEqual([]);
    expect(await prep(true, { ...on, "qvd.vm.printing.enable": "1" })).toEqual(["cups=2100"]);
    // The channel stays for the X session's life (src/vma/session.ts); the client's wish decides whether printers are added.
    expect(await prep(true, {})).toEqual(["cups=2100"]);
    expect(await prep(true, on, "windows")).toEqual([]);
    // The session finds its CUPS through CUPS_SERVER, set even when this client does not print.
    const ctx = context("prep", {});
    expect((await printingService({ enable: true }).prepare(ctx)).env).toEqual({ CUPS_SERVER: cupsSocket(ctx.runDir) });
  });

  test("printer names from the client: only [A-Za-z0-9_.-]{1,100}, at most 32, no duplicates", () => {
    const hostile = [
      "ok_1",
      "x -E -v file:/etc/shadow",
      "-E",
      "../../etc",
      "a/b",
      "$(reboot)",
      "`id`",
      "name;rm",
      "é",
      "a".repeat(101),
      "ok_1",
      "",
      "-",
      "Office.2nd-floor",
    ];
    const r = usablePrinterNames(hostile.join("\n"));
    // A name like "-E" is harmless: it only ever follows "QVD-" in one argv entry, or ends a URI.
    expect(r.names).toEqual(["ok_1", "-E", "-", "Office.2nd-floor"]);
    expect(r.refused).toContain("x -E -v file:/etc/shadow");
    const many = Array.from({ length: 40 }, (_, i) => `p${i}`);
    expect(usablePrinterNames(many.join("\n")).names).toEqual(many.slice(0, MAX_PRINTERS));
  });
});

describe("printing to the client's printers (cupsd as the user, a client CUPS with cups-pdf)", () => {
  let client: ClientCups;
  let ctx: ServiceContext;
  let svc: ReturnType<typeof printingService>;

  beforeAll(async () => {
    client = await startClientCups();
    // cups-pdf writes a remote user's PDF as that user (or its AnonUser, nobody): the output
    // directories must be writable by them, as its own /var/spool/cups-pdf/ANONYMOUS is (1777).
    for (const p of client.printers) chmodSync(p.outDir, 0o1777);
    ctx = context("print", { "qvd.client.printing.enabled": "1" });
    svc = printingService({ enable: true, clientCups: () => client.server });
  }, 60_000);
  afterAll(async () => {
    await svc?.stopped?.(ctx);
    await client?.stop();
  });

  test("at connect the client's printers appear as QVD-<name>, the client's default the default; lp prints on the client's printer", async () => {
    const [def, other] = client.printers;
    const prep = await svc.prepare(ctx);
    expect(prep.options).toEqual(["cups=2100"]);
    // The configuration is the user's, in a directory nobody else may enter.
    const dir = cupsDir(ctx.runDir);
    expect([statSync(dir).uid, statSync(dir).mode & 0o777]).toEqual([NOBODY.uid, 0o700]);
    expect(readFileSync(join(dir, "cupsd.conf"), "utf8")).not.toMatch(/^(Port|Listen) .*\d$/m); // the socket only, no TCP port
    const t0 = Date.now();
    await svc.connected!(ctx);
    const ms = Date.now() - t0;
    expect(await queues(ctx)).toEqual([`QVD-${other.name}`, `QVD-${def.name}`].sort());
    expect((await asUser(ctx, ["lpstat", "-d"])).stdout.trim()).toBe(`system default destination: QVD-${def.name}`);
    expect((await asUser(ctx, ["lpstat", "-v", `QVD-${def.name}`])).stdout).toContain(
      `ipp://${client.server}/printers/${def.name}`,
    );
    // The session's cupsd runs as the user, not root, and listens on no TCP port.
    const pid = Number((await run(["pgrep", "-f", `cupsd -f -c ${dir}/cupsd.conf`])).stdout.trim().split("\n")[0]);
    expect(statSync(`/proc/${pid}`).uid).toBe(NOBODY.uid);
    const tcp = (await run(["ss", "-Hltnp"])).stdout;
    expect(tcp).not.toContain(`pid=${pid},`);
    console.log(`printers registered ${ms} ms after connect (cupsd start included)`);

    // A job printed in the desktop (the default queue) comes out as a PDF on the client's side.
    const text = `QVD print test ${Date.now()}`;
    const file = join(ctx.homeOnDisk, "page.txt");
    writeFileSync(file, `${text}\nsecond line\n`);
    chmodSync(file, 0o644);
    const lp = await asUser(ctx, ["lp", file]);
    expect(lp.status).toBe(0);
    expect(lp.stdout).toContain(`QVD-${def.name}`);
    const got = await client.waitForPdf(def, text);
    expect(got).toContain("second line");
    // …and a named queue on the other printer.
    const lp2 = await asUser(ctx, ["lp", "-d", `QVD-${other.name}`, file]);
    expect(lp2.status).toBe(0);
    await client.waitForPdf(other, text);
  }, 90_000);

  test("suspend removes every QVD-* printer (and only those); a resume brings them back; stop ends the cupsd and its files", async () => {
    // A queue of the user's own survives.
    const mine = await asUser(ctx, [
      "lpadmin",
      "-p",
      "mine",
      "-E",
      "-v",
      `ipp://${client.server}/printers/${client.printers[0].name}`,
    ]);
    expect(mine.status).toBe(0);
    await svc.suspended!(ctx);
    expect(await queues(ctx)).toEqual(["mine"]);
    // Resume with printing refused by the client (--no-printing): no QVD-* printers.
    const noPrint = { ...ctx, properties: { "qvd.client.printing.enabled": "0" } };
    expect((await svc.prepare(noPrint)).options).toEqual(["cups=2100"]);
    await svc.connected!(noPrint);
    expect(await queues(ctx)).toEqual(["mine"]);
    await svc.suspended!(noPrint);
    // Resume with printing: back.
    expect((await svc.prepare(ctx)).options).toEqual(["cups=2100"]);
    await svc.connected!(ctx);
    expect((await queues(ctx)).filter((q) => q.startsWith("QVD-"))).toHaveLength(2);
    const dir = cupsDir(ctx.runDir);
    const pid = Number((await run(["pgrep", "-f", `cupsd -f -c ${dir}/cupsd.conf`])).stdout.trim());
    await svc.suspended!(ctx);
    await svc.stopped!(ctx);
    expect(existsSync(`/proc/${pid}`)).toBe(false);
    expect(existsSync(dir)).toBe(false);
  }, 60_000);

  test("an unreachable client CUPS: no printers, the session goes on", async () => {
    const c = context("unreachable", { "qvd.client.printing.enabled": "1" });
    const s = printingService({ enable: true, clientCups: () => "127.0.0.1:1" });
    await s.prepare(c);
    await s.connected!(c);
    expect(await queues(c)).toEqual([]);
    await s.stopped!(c);
    expect(existsSync(cupsDir(c.runDir))).toBe(false);
  }, 30_000);
});

describe("printing: the session's CUPS directory", () => {
  test("an old one the user shaped (symlinks to root's files, the directory itself a link) is removed without touching what the links point to; the new one is the user's, handed over only when complete", async () => {
    const canary = join(work, "root-canary");
    mkdirSync(join(canary, "sub"), { recursive: true });
    writeFileSync(join(canary, "sub/keep"), "root's\n");
    const c = context("olddir", { "qvd.client.printing.enabled": "1" });
    const dir = cupsDir(c.runDir);
    // The previous session's directory, the user's, with links they made.
    mkdirSync(join(dir, "spool"), { recursive: true });
    await run(["chown", "-R", `${NOBODY.uid}:${NOBODY.gid}`, dir]);
    await c.execAsUser(["ln", "-s", join(canary, "sub"), join(dir, "state")]);
    await c.execAsUser(["ln", "-s", canary, join(dir, "spool", "evil")]);
    const s = printingService({ enable: true, clientCups: () => "127.0.0.1:1" });
    await s.prepare(c);
    expect(readFileSync(join(canary, "sub/keep"), "utf8")).toBe("root's\n");
    expect([statSync(canary).uid, statSync(join(canary, "sub")).uid]).toEqual([0, 0]);
    expect(lstatSync(join(dir, "state")).isDirectory()).toBe(true); // a fresh one, not the link
    for (const f of ["", "state", "spool", "spool/tmp", "cupsd.conf", "cups-files.conf"])
      expect(lstatSync(join(dir, f)).uid).toBe(NOBODY.uid);
    await s.stopped!(c);
    expect(existsSync(dir)).toBe(false);
    expect(readdirSync(c.runDir)).toEqual([]); // nothing left aside
    // The directory itself a symbolic link (to root's directory): the link goes, not its target.
    symlinkSync(canary, dir);
    await s.prepare(c);
    expect(readFileSync(join(canary, "sub/keep"), "utf8")).toBe("root's\n");
    expect(lstatSync(dir).isDirectory()).toBe(true);
    await s.stopped!(c);
  }, 30_000);
});

/** IPP attribute: tag, name, value. */
function attr(tag: number, name: string, value: string | Uint8Array): Buffer {
  const v = typeof value === "string" ? Buffer.from(value) : Buffer.from(value);
  const n = Buffer.from(name);
  const b = Buffer.alloc(1 + 2 + n.length + 2 + v.length);
  b[0] = tag;
  b.writeUInt16BE(n.length, 1);
  n.copy(b, 3);
  b.writeUInt16BE(v.length, 3 + n.length);
  v.copy(b, 5 + n.length);
  return b;
}
const int32 = (n: number) => {
  const b = Buffer.alloc(4);
  b.writeInt32BE(n);
  return b;
};

/** A "client CUPS" that answers every IPP request with the printers `names` (and the first as default). */
function hostileCups(names: string[]): { server: string; stop(): void; requests: number[] } {
  const requests: number[] = [];
  const srv = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(req) {
      const body = Buffer.from(await req.arrayBuffer());
      const op = body.readUInt16BE(2);
      requests.push(op);
      const head = Buffer.alloc(8);
      head.writeUInt16BE(0x0200, 0);
      head.writeUInt16BE(0x0000, 2);
      head.writeUInt32BE(body.readUInt32BE(4), 4);
      const parts = [
        head,
        Buffer.from([0x01]),
        attr(0x47, "attributes-charset", "utf-8"),
        attr(0x48, "attributes-natural-language", "en"),
      ];
      const list = op === 0x4001 ? names.slice(0, 1) : names; // CUPS-Get-Default: one
      for (const n of list) {
        parts.push(
          Buffer.from([0x04]),
          attr(0x42, "printer-name", n),
          attr(0x45, "printer-uri-supported", `ipp://127.0.0.1/printers/${encodeURIComponent(n)}`),
          attr(0x23, "printer-type", int32(0x1004)),
          attr(0x23, "printer-state", int32(3)),
          attr(0x22, "printer-is-accepting-jobs", Buffer.from([1])),
        );
      }
      parts.push(Buffer.from([0x03]));
      return new Response(Buffer.concat(parts), { headers: { "content-type": "application/ipp" } });
    },
  });
  return { server: `127.0.0.1:${srv.port}`, stop: () => srv.stop(true), requests };
}

describe("a hostile client CUPS", () => {
  test("printer names made to inject lpadmin options or paths are skipped; no more than 32 queues; nothing written outside", async () => {
    const canary = join(work, "canary");
    const evil = [
      `x -E -v file:${canary}`,
      "-v",
      `--version`,
      "-x",
      `a/../../${canary}`,
      `$(touch ${canary})`,
      `;touch ${canary}`,
      "good_one",
      "QVD-nested",
      "x\ny",
      ...Array.from({ length: 40 }, (_, i) => `many${i}`),
    ];
    const h = hostileCups(evil);
    const c = context("hostile", { "qvd.client.printing.enabled": "1" });
    const s = printingService({ enable: true, clientCups: () => h.server });
    try {
      await s.prepare(c);
      await s.connected!(c);
      expect(h.requests.length).toBeGreaterThan(0); // lpstat did ask it
      const q = await queues(c);
      expect(q.length).toBe(MAX_PRINTERS);
      for (const name of q) expect(name).toMatch(/^QVD-[A-Za-z0-9_.-]+$/);
      expect(q).toContain("QVD-good_one");
      expect(q).toContain("QVD--v"); // a name, not an option: it follows "QVD-" in one argv entry
      expect(existsSync(canary)).toBe(false);
      for (const name of q) {
        const v = (await asUser(c, ["lpstat", "-v", name])).stdout;
        expect(v).toMatch(new RegExp(`ipp://${h.server.replace(/\./g, "\\.")}/printers/[A-Za-z0-9_.-]+$`, "m"));
      }
    } finally {
      await s.stopped!(c);
      h.stop();
    }
  }, 60_000);
});

type Proc = { kill(sig?: number | NodeJS.Signals): void; exited: Promise<number> };

/**
 * What the two describes below with a real nxagent start: an Xvfb from display `from` on for
 * nxproxy (its process in `procs`), a Session with nxagent on the next free display (`o` over the
 * defaults both use), and a relay to that nxagent adding `cookie`.
 */
async function startNxSession(
  from: number,
  procs: Proc[],
  cookie: string,
  o: Pick<SessionOptions, "asCurrentUser" | "root" | "homePath" | "runDir" | "timeouts" | "services">,
): Promise<{ xvfb: number; session: Session; relay: NxRelay }> {
  const xvfb = freeDisplay(from);
  procs.push(
    Bun.spawn(["Xvfb", `:${xvfb}`, "-screen", "0", "800x600x24", "-nolisten", "tcp", "-noreset"], {
      stdout: "ignore",
      stderr: "ignore",
    }),
  );
  await until(() => existsSync(`/tmp/.X11-unix/X${xvfb}`), `Xvfb :${xvfb}`, 10_000);
  const display = freeDisplay(xvfb + 1);
  const session = testSession({
    display,
    tolerancechecks: "risky",
    sessionCommand: ["/bin/sleep", "1000"],
    ...o,
  });
  return { xvfb, session, relay: startNxRelay({ host: "127.0.0.1", targetPort: 4000 + display, cookie }) };
}

describe("the Session's calls to its services (real nxagent and nxproxy)", () => {
  const calls: string[] = [];
  const lines: string[] = [];
  const seen: { nxState: string; props: Record<string, unknown> }[] = [];
  let session: Session;
  let relay: NxRelay;
  const procs: Proc[] = [];
  let xvfb = 0;
  const COOKIE2 = "fedcba9876543210fedcba9876543210";

  const recorder: SessionService = {
    name: "recorder",
    prepare(ctx) {
      calls.push("prepare");
      seen.push({ nxState: session.nxState, props: { ...ctx.properties } });
      // A resume's client that wants no sound: the service asks for no channel this time.
      return {
        options: ctx.properties["qvd.client.audio.enabled"] === "0" ? [] : ["media=1"],
        env: { QVD_TEST_GOOD: "1" },
      };
    },
    onAgentLine: (l) => void lines.push(l),
    connected: () => void calls.push("connected"),
    async suspended() {
      await Bun.sleep(300); // a slow hook does not let the next one overtake it
      calls.push("suspended");
    },
    stopped: () => void calls.push("stopped"),
  };
  // Asks for what no service may have; its refused parts are dropped, the rest of the session goes on.
  const greedy: SessionService = {
    name: "greedy",
    prepare: () => ({
      options: ["accept=0.0.0.0", "cups=2100,accept=0.0.0.0", "media=2", "slave=1"],
      env: { LD_PRELOAD: "/tmp/evil.so", HOME: "/", PATH: "/tmp", "BAD-NAME": "x" },
    }),
  };
  const broken: SessionService = {
    name: "broken",
    prepare: () => {
      throw new Error("cannot prepare");
    },
    connected: () => {
      throw new Error("cannot connect");
    },
    stopped: () => void calls.push("broken stopped"),
  };

  const waitState = (s: string, ms = 30_000) =>
    until(() => session.state === s, s, ms, 50, {
      detail: () => {
        const log = join(session.opts.runDir, "nxagent.log");
        return ` (now ${session.state}, ${session.lastError ?? ""}): ${existsSync(log) ? readFileSync(log, "utf8").slice(-1500) : ""}`;
      },
    });
  const proxy = () => {
    const p = Bun.spawn(["nxproxy", "-S", `localhost:${relay.display}`], {
      env: { ...process.env, DISPLAY: `:${xvfb}` },
      stdout: "ignore",
      stderr: "ignore",
    });
    procs.push(p);
    return p;
  };

  beforeAll(async () => {
    const dir = join(work, "session");
    mkdirSync(dir, { recursive: true });
    ({ xvfb, session, relay } = await startNxSession(160, procs, COOKIE, {
      asCurrentUser: true,
      root: "/",
      homePath: dir,
      runDir: join(dir, "run"),
      timeouts: { starting: 20_000, listening: 30_000, suspending: 20_000, stopping: 20_000 },
      services: [recorder, greedy, broken],
    }));
  }, 20_000);
  afterAll(async () => {
    if (session) await session.shutdown(5000);
    relay?.stop();
    await stopAll(procs);
  });

  test("prepare at x_start: checked options before the session's locks, checked env for the X session; connected, suspended at their states", async () => {
    session.start({
      user: "root",
      uid: 0,
      gid: 0,
      cookie: COOKIE,
      client_os: "linux",
      properties: { "qvd.client.audio.enabled": "1", "qvd.slave.key": "k".repeat(64) },
    });
    await waitState("listening");
    expect(calls).toEqual(["prepare"]);
    expect(seen[0]!.props["qvd.slave.key"]).toBe("k".repeat(64)); // services get the slave key (the desktop's properties file does not)
    expect(readFileSync(session.optionsFile, "utf8")).toBe(
      `nx/nx,client=linux,media=1,slave=1,tolerancechecks=risky,cookie=${COOKIE},accept=127.0.0.1:${session.opts.display}\n`,
    );
    expect(session.serviceOptions).toEqual(["media=1", "slave=1"]);
    // The X session got the good variable, not the loader's or a changed HOME/PATH.
    const environ = readFileSync(`/proc/${session.nxagentPid}/environ`, "utf8").split("\0");
    expect(environ).toContain("QVD_TEST_GOOD=1");
    expect(environ.some((e) => e.startsWith("LD_PRELOAD="))).toBe(false);
    expect(environ).not.toContain("HOME=/");
    expect(environ).not.toContain("PATH=/tmp");
    proxy();
    await waitState("connected");
    await until(() => calls.includes("connected"), "the services' connected hook", 5000, 20);
    expect(calls).toEqual(["prepare", "connected"]);
    expect(lines.some((l) => /^Session: Session started/.test(l))).toBe(true);
    session.suspend();
    await waitState("suspended");
  }, 60_000);

  test("a resume prepares again (new properties) before nxagent is signalled; a stop while connected ends with suspended, then stopped", async () => {
    session.start({
      user: "root",
      uid: 0,
      gid: 0,
      cookie: COOKIE2,
      client_os: "linux",
      properties: { "qvd.slave.key": "m".repeat(64), "qvd.client.audio.enabled": "0" },
    });
    expect(session.state).toBe("starting");
    // The cookie is in the options file at once (the L7R connects with it); the services' options follow.
    expect(readFileSync(session.optionsFile, "utf8")).toContain(`cookie=${COOKIE2}`);
    relay.cookie = COOKIE2;
    await waitState("listening");
    expect(calls).toEqual(["prepare", "connected", "suspended", "prepare"]);
    expect(seen[1]).toEqual({
      nxState: "suspended",
      props: { "qvd.slave.key": "m".repeat(64), "qvd.client.audio.enabled": "0" },
    }); // before the SIGHUP
    // nxagent keeps the channels its X session started with, whatever a resume's services ask.
    expect(readFileSync(session.optionsFile, "utf8")).toBe(
      `nx/nx,client=linux,media=1,slave=1,tolerancechecks=risky,cookie=${COOKIE2},accept=127.0.0.1:${session.opts.display}\n`,
    );
    expect(session.serviceOptions).toEqual(["media=1", "slave=1"]);
    proxy();
    await waitState("connected");
    session.stop();
    await waitState("stopped");
    await until(
      () => calls.includes("stopped") && calls.includes("broken stopped"),
      "the services' stopped hooks",
      5000,
      20,
    );
    expect(calls.filter((c) => c !== "broken stopped")).toEqual([
      "prepare",
      "connected",
      "suspended",
      "prepare",
      "connected",
      "suspended",
      "stopped",
    ]);
    expect(calls).toContain("broken stopped"); // a service whose prepare threw still gets its cleanup
    // nxagent's lines reach the services without the session's cookie.
    expect(lines.join("\n")).not.toContain(COOKIE2);
  }, 60_000);
});

describe("printing through nxagent's CUPS channel (real nxagent and nxproxy, a provisioned user, the slave channel's namespace)", () => {
  const UID = 51020;
  let session: Session;
  let relay: NxRelay;
  let client: ClientCups;
  let root: string;
  let xvfb = 0;
  const procs: Proc[] = [];
  const COOKIE3 = "00112233445566778899aabbccddeeff";

  /** Waits for `f`, saying the session's state when it times out. */
  const waitInSession = (what: string, f: () => Promise<boolean> | boolean, ms = 30_000) =>
    until(f, what, ms, 100, { detail: () => ` (state ${session.state})` });
  /** A program in the desktop, as its user, with the session's CUPS_SERVER. */
  const inDesktop = (argv: string[]) =>
    execAs(privPrefix({ user: "alice", uid: UID, gid: UID, home: "/home/alice", shell: "/bin/sh", groups: [] }), argv, {
      PATH,
      HOME: join(root, "home/alice"),
      CUPS_SERVER: cupsSocket(session.opts.runDir),
    });
  const desktopQueues = async () =>
    (await inDesktop(["lpstat", "-e"])).stdout
      .split("\n")
      .filter((l) => l.startsWith("QVD-"))
      .sort();

  beforeAll(async () => {
    const dir = join(work, "nxprint");
    root = minimalRoot(dir);
    client = await startClientCups();
    for (const p of client.printers) chmodSync(p.outDir, 0o1777);
    ({ xvfb, session, relay } = await startNxSession(170, procs, COOKIE3, {
      asCurrentUser: false,
      root,
      homePath: "/home",
      runDir: join(dir, "run"),
      timeouts: { starting: 30_000, listening: 30_000, suspending: 20_000, stopping: 20_000 },
      // As qvd vma has it: the slave channel's service runs the X session (and so the user's
      // cupsd) in its nested user+mount namespace (src/vma/shares.ts).
      services: [printingService({ enable: true }), sharesService({ enabled: true, qvd: process.execPath })],
    }));
  }, 60_000);
  afterAll(async () => {
    if (session) await session.shutdown(5000);
    relay?.stop();
    await stopAll(procs);
    await client?.stop();
  });

  test("the client's printers appear through 127.0.0.1:<display+2000>; lp in the desktop comes out of the client's printer; gone at suspend", async () => {
    session.start({
      user: "alice",
      uid: UID,
      gid: UID,
      cookie: COOKIE3,
      client_os: "linux",
      properties: { "qvd.client.printing.enabled": "1", "qvd.slave.key": "s".repeat(64) },
    });
    await waitInSession("listening", () => session.state === "listening");
    const cups = `cups=${session.opts.display + 2000}`;
    expect(readFileSync(session.optionsFile, "utf8")).toContain(`,${cups},`);
    const nx = Bun.spawn(["nxproxy", "-S", `cups=${client.port}`, `localhost:${relay.display}`], {
      env: { ...process.env, DISPLAY: `:${xvfb}` },
      stdout: "ignore",
      stderr: "ignore",
    });
    procs.push(nx);
    await waitInSession("connected", () => session.state === "connected");
    const t0 = Date.now();
    const want = client.printers.map((p) => `QVD-${p.name}`).sort();
    await waitInSession(
      "the client's printers in the desktop",
      async () => JSON.stringify(await desktopQueues()) === JSON.stringify(want),
    );
    console.log(`printers in the desktop ${Date.now() - t0} ms after connected (through nxagent/nxproxy)`);
    // The default is set right after the queues are added.
    await waitInSession(
      "the client's default as the default",
      async () => (await inDesktop(["lpstat", "-d"])).stdout.includes(`QVD-${client.printers[0].name}`),
      5000,
    );
    // The session's cupsd is the user's, in the session's namespace when there is FUSE for one.
    const pid = Number(
      (await run(["pgrep", "-f", `cupsd -f -c ${cupsDir(session.opts.runDir)}/cupsd.conf`])).stdout.trim(),
    );
    expect(statSync(`/proc/${pid}`).uid).toBe(UID);
    if (existsSync("/dev/fuse"))
      expect(readlinkSync(`/proc/${pid}/ns/user`)).not.toBe(readlinkSync("/proc/self/ns/user"));
    const text = `Through the NX channel ${Date.now()}`;
    const lp = await execAs(
      privPrefix({ user: "alice", uid: UID, gid: UID, home: "/", shell: "/bin/sh", groups: [] }),
      ["lp"],
      { PATH, CUPS_SERVER: cupsSocket(session.opts.runDir) },
      { stdin: `${text}\n` },
    );
    expect(lp.status).toBe(0);
    expect(await client.waitForPdf(client.printers[0], text)).toContain(text);
    session.suspend();
    await waitInSession("suspended", () => session.state === "suspended");
    await waitInSession("the QVD printers to go", async () => (await desktopQueues()).length === 0, 15_000);
    session.stop();
    await waitInSession("stopped", () => session.state === "stopped");
    await waitInSession("the session's cupsd to end", () => !existsSync(`/proc/${pid}`), 10_000);
    expect(existsSync(cupsDir(session.opts.runDir))).toBe(false);
  }, 120_000);
});
