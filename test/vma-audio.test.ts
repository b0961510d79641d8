// The session's sound (src/vma/audio.ts, src/client/audio.ts) with real PulseAudio daemons on
// this host: a "client" PulseAudio (a null sink standing for the user's speakers, a null source
// for their microphone) gets its port through startClientAudio (a relay PulseAudio); the audio
// service starts the desktop's PulseAudio as a throwaway uid when nxagent's multimedia line names
// that port; paplay of a tone in the "desktop" must arrive in the client's sink (parec of its
// monitor, Goertzel at the tone against other frequencies, no gaps). Then the same through a
// real nxagent and nxproxy, and through the real `qvd vma` (x_start, connect, suspend).
// Root is needed (setpriv to the throwaway uids).
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import {
  chmodSync,
  chownSync,
  existsSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { audioService, multimediaServer, pulseConfig, TUNNEL_SINK, type AudioService } from "../src/vma/audio.ts";
import type { ServiceContext } from "../src/vma/services.ts";
import { startClientAudio, tcpModuleArgs, type ClientAudio } from "../src/client/audio.ts";
import { spawnDaemon, type Daemon, type RunResult } from "../src/run.ts";
import { gaps, goertzel, peak, RATE, samples, sineWav, toneRatio } from "./support/tone.ts";
import { waitFor } from "./support/wait.ts";
import { freeDisplay, freePort } from "./support/free.ts";
import { minimalRoot } from "./support/image-root.ts";
import { startClientPulse, type ClientPulse } from "./support/services.ts";
import { capture } from "./support/spawn.ts";
import { writeVmaConfig } from "./support/vma-config.ts";
import { alive } from "../src/vma/session.ts";

/**
 * Holes in the first part of a sound are not counted: a new stream through PulseAudio's tunnel
 * sink sometimes stalls once near its start under load (the tunnel resizes its buffer when a
 * stream arrives; seen with PulseAudio's own settings too; bench/audio-latency.ts counts them).
 * Underruns later in the tone are.
 */
const START_MS = 450;
const UID = 61_402; // the desktop's user (no passwd entry needed)
const OTHER_UID = 61_403;
let work: string;
/** The client's PulseAudio (root here, as the user running `qvd client` in these tests). */
let clientPulse: ClientPulse;
let clientServer: string;
const daemons: Daemon[] = [];

async function sh(argv: string[], env: Record<string, string> = {}, timeoutMs = 10_000): Promise<RunResult> {
  const {
    code: status,
    stdout,
    stderr,
  } = await capture(argv, {
    cwd: "/",
    env: { PATH: process.env.PATH!, ...env },
    timeoutMs,
  });
  return { status, stdout, stderr };
}

const asUser = (uid: number) => ["setpriv", `--reuid=${uid}`, `--regid=${uid}`, "--clear-groups", "--"];

/** A desktop session's view for the service, with the user's programs run through setpriv. */
function desktop(props: Record<string, string | number | boolean>, name = "d"): ServiceContext & { dir: string } {
  const dir = join(work, name);
  const home = join(dir, "home");
  mkdirSync(home, { recursive: true });
  chownSync(home, UID, UID);
  const runDir = join(dir, "qvd-run");
  mkdirSync(runDir, { recursive: true, mode: 0o755 });
  const env = { PATH: "/usr/local/bin:/usr/bin:/bin", HOME: home, USER: "snd", LOGNAME: "snd", LANG: "C.UTF-8" };
  return {
    dir,
    account: { user: "snd", uid: UID, gid: UID, home, shell: "/bin/sh", groups: [] },
    properties: props,
    display: 100,
    runDir,
    homeOnDisk: home,
    env,
    runAsUser(argv, extra = {}) {
      const d = spawnDaemon([...asUser(UID), ...argv], {
        cwd: "/",
        env: { ...env, ...extra, DISPLAY: ":100" },
        detached: true,
      });
      daemons.push(d);
      return d;
    },
    execAsUser(argv, o = {}) {
      return sh([...asUser(UID), ...argv], { ...env, ...(o.env ?? {}) }, o.timeoutMs ?? 10_000);
    },
  };
}

const runtimeRoot = () => join(work, "run-user");
const service = (enable = true) =>
  audioService({ enable, runtimeDir: (uid) => join(runtimeRoot(), String(uid)), stopGraceMs: 2000 });

/** The pulseaudio processes of the desktop user this test started. */
const desktopPulse = () => daemons.filter((d) => alive(d.pid));

/** Records the client's sink while `play` runs; returns s16le mono samples. */
function recordWhile(play: () => Promise<unknown>): Promise<Int16Array> {
  return clientPulse.record(play, { leadMs: 300, tailMs: 500 });
}

/** paplay of a tone as the desktop's user with the session environment the service gave. */
async function playTone(ctx: ServiceContext, env: Record<string, string>, freq: number): Promise<RunResult> {
  const wav = join(work, `tone-${freq}.wav`);
  if (!existsSync(wav)) {
    writeFileSync(wav, sineWav(freq, 1.0));
    chmodSync(wav, 0o644);
  }
  return ctx.execAsUser(["paplay", wav], { env, timeoutMs: 10_000 });
}

/** TCP listeners of a process (ss), as "addr:port". */
async function listeners(pid: number): Promise<string[]> {
  const r = await sh(["ss", "-ltnpH"]);
  return r.stdout
    .split("\n")
    .filter((l) => l.includes(`pid=${pid},`))
    .map((l) => l.trim().split(/\s+/)[3]!);
}

beforeAll(async () => {
  work = mkdtempSync(join(tmpdir(), "qvd-audio-"));
  chmodSync(work, 0o755);
  mkdirSync(runtimeRoot(), { mode: 0o755 });
  // Mic stands for the user's microphone: the desktop must not reach it.
  clientPulse = await startClientPulse({ sink: "ClientOut", source: "Mic" });
  clientServer = clientPulse.server;
});

afterAll(async () => {
  for (const d of daemons) d.killGroup("SIGKILL");
  await clientPulse?.stop();
  rmSync(work, { recursive: true, force: true });
});

describe("nxagent's multimedia announcement", () => {
  test("the forms nxcomp prints give a loopback server", () => {
    expect(multimediaServer("Info: Listening to multimedia connections on port 'tcp:localhost:7100'.")).toBe(
      "tcp:127.0.0.1:7100",
    );
    expect(multimediaServer("Info: Listening to multimedia connections on port 'tcp:127.0.0.1:7100'.")).toBe(
      "tcp:127.0.0.1:7100",
    );
    expect(multimediaServer("Info: Listening to multimedia connections on port '7100'.")).toBe("tcp:127.0.0.1:7100");
    expect(multimediaServer("Info: Listening to multimedia connections on port 'unix:/tmp/.nx/media'.")).toBe(
      "unix:/tmp/.nx/media",
    );
  });

  test("anything else gives no server: other hosts, bad ports, paths leaving, lines not nxagent's", () => {
    for (const line of [
      "Info: Listening to multimedia connections on port 'tcp:evil.example:7100'.",
      "Info: Listening to multimedia connections on port 'tcp:10.0.0.1:7100'.",
      "Info: Listening to multimedia connections on port 'tcp:localhost:99999'.",
      "Info: Listening to multimedia connections on port '0'.",
      "Info: Listening to multimedia connections on port 'tcp:localhost:7100 server=tcp:evil:1'.",
      "Info: Listening to multimedia connections on port 'unix:/tmp/../etc/x'.",
      "Info: Listening to multimedia connections on port 'unix:relative'.",
      "Info: Listening to multimedia connections on port '(disabled)'.",
      "Info: Listening to CUPS connections on port 'tcp:localhost:2100'.",
      "x Info: Listening to multimedia connections on port '7100'.",
      "Info: Forwarding multimedia connections to port '7100'.",
    ])
      expect(multimediaServer(line)).toBeUndefined();
  });

  test("the generated PulseAudio script has no TCP module and the tunnel as the default", () => {
    const s = pulseConfig("tcp:127.0.0.1:7100", "/run/user/1000/pulse/native");
    expect(s).not.toContain("protocol-tcp");
    expect(s).toContain("module-native-protocol-unix socket=/run/user/1000/pulse/native");
    expect(s).toContain(`module-tunnel-sink-new sink_name=${TUNNEL_SINK} server=tcp:127.0.0.1:7100`);
    expect(s).toContain(`set-default-sink ${TUNNEL_SINK}`);
  });
});

describe("the tone checks themselves", () => {
  test("a tone is told from another and from silence; a 30 ms hole counts as a gap", () => {
    const tone = samples(sineWav(440, 1).slice(44));
    expect(toneRatio(tone, 440)).toBeGreaterThan(100);
    expect(goertzel(tone, 660)).toBeLessThan(goertzel(tone, 440) / 100);
    expect(toneRatio(new Int16Array(RATE / 2), 440)).toBeLessThan(2);
    expect(gaps(tone)).toBe(0);
    const holed = tone.slice();
    holed.fill(0, RATE / 10, RATE / 10 + Math.round(RATE * 0.03));
    expect(gaps(holed)).toBeGreaterThanOrEqual(2);
    expect(gaps(holed, RATE, START_MS)).toBe(0);
    const late = tone.slice();
    late.fill(0, Math.round(RATE * 0.6), Math.round(RATE * 0.63));
    expect(gaps(late, RATE, START_MS)).toBeGreaterThanOrEqual(2);
  });
});

describe("prepare: who switches sound on", () => {
  test("on by default (the original clients do not send qvd.client.audio.enabled): media=1 and the session's PulseAudio address", async () => {
    const ctx = desktop({}, "p1");
    const p = await service().prepare(ctx);
    const rt = join(runtimeRoot(), String(UID));
    expect(p.options).toEqual(["media=1"]);
    expect(p.env).toEqual({ XDG_RUNTIME_DIR: rt, PULSE_SERVER: `unix:${rt}/pulse/native` });
    const st = lstatSync(rt);
    expect([st.isDirectory(), st.uid, st.mode & 0o777]).toEqual([true, UID, 0o700]);
  });

  test("off by the node (vma.audio.enable), by the administrator's property in any spelling, or by the client", async () => {
    expect((await service(false).prepare(desktop({}, "p2"))).options).toEqual([]);
    for (const v of ["0", "false", "no", "OFF", " No ", 0, false]) {
      const p = await service().prepare(desktop({ "qvd.vm.audio.enable": v }, "p2"));
      expect(p).toEqual({ options: [] });
    }
    // A client without sound: the channel stays (nxagent keeps an X session's channels across
    // resumes, src/vma/session.ts), but no PulseAudio starts when nxagent announces it.
    for (const v of ["0", "false", 0]) {
      const s = service();
      const ctx = desktop({ "qvd.client.audio.enabled": v }, "p2");
      expect((await s.prepare(ctx)).options).toEqual(["media=1"]);
      const before = daemons.length;
      s.onAgentLine!("Info: Listening to multimedia connections on port 'tcp:localhost:7100'.", ctx);
      await s.idle();
      expect(daemons.length).toBe(before);
    }
  });

  test("a client's strange value cannot add or change nxagent options", async () => {
    for (const v of ["1,slave=1", "1:100", "media=7", "yes\nmedia=2"]) {
      expect((await service().prepare(desktop({ "qvd.client.audio.enabled": v }, "p3"))).options).toEqual(["media=1"]);
    }
    // The administrator's property wins over the client's wish.
    expect(
      (await service().prepare(desktop({ "qvd.vm.audio.enable": "no", "qvd.client.audio.enabled": "1" }, "p3")))
        .options,
    ).toEqual([]);
  });

  test("the tunnel's queue (vma.audio.latency_msec) outside 10…2000 ms is refused", () => {
    for (const ms of [0, 9, 2001, NaN]) expect(() => audioService({ enable: true, latencyMs: ms })).toThrow(RangeError);
  });

  test("a fresh container without /run/user: the parent is made (0755) and the user's directory (0700)", async () => {
    const rt = join(work, "fresh", "run", "user", String(UID));
    await audioService({ enable: true, runtimeDir: () => rt }).prepare(desktop({}, "p5"));
    expect(lstatSync(join(rt, "..")).mode & 0o777).toBe(0o755);
    expect([lstatSync(rt).uid, lstatSync(rt).mode & 0o777]).toEqual([UID, 0o700]);
  });

  test("a runtime directory that is a symlink or another user's is refused", async () => {
    const root = join(work, "rt-abuse");
    mkdirSync(root);
    const svcAt = (dir: string) => audioService({ enable: true, runtimeDir: () => dir });
    symlinkSync("/etc", join(root, "link"));
    await expect(async () => svcAt(join(root, "link")).prepare(desktop({}, "p4"))).toThrow(/not a directory/);
    mkdirSync(join(root, "other"));
    chownSync(join(root, "other"), OTHER_UID, OTHER_UID);
    await expect(async () => svcAt(join(root, "other")).prepare(desktop({}, "p4"))).toThrow(/does not belong/);
  });
});

describe("the client's side (startClientAudio)", () => {
  test("bad ports are refused before pactl runs", () => {
    for (const p of [0, -1, 65536, 1.5, NaN]) expect(() => tcpModuleArgs(p)).toThrow(RangeError);
    expect(tcpModuleArgs(4713)).toEqual([
      "load-module",
      "module-native-protocol-tcp",
      "port=4713",
      "listen=127.0.0.1",
      "auth-anonymous=1",
      "auth-ip-acl=127.0.0.1",
    ]);
  });

  test("no PulseAudio, or no pactl: no sound, one warning line, no exception", async () => {
    const warnings: string[] = [];
    const port = freePort();
    expect(
      await startClientAudio({ port, pulseServer: `unix:${work}/nothing-here`, warn: (l) => warnings.push(l) }),
    ).toBeUndefined();
    expect(
      await startClientAudio({ port, pactl: join(work, "no-pactl"), warn: (l) => warnings.push(l) }),
    ).toBeUndefined();
    expect(warnings.length).toBe(2);
    for (const w of warnings) expect(w).toMatch(/^qvd client: no sound: .+/);
    expect(warnings.join("\n")).not.toContain("\n    at ");
  });

  test("the port opens on 127.0.0.1 only, in a relay PulseAudio, and closes at stop", async () => {
    const port = freePort();
    const a = await startClientAudio({ port, pulseServer: clientServer });
    expect(a?.relay).toBeGreaterThan(0);
    expect(a?.module).toBeUndefined();
    const open = (await sh(["ss", "-ltnH", `sport = :${port}`])).stdout
      .trim()
      .split("\n")
      .filter(Boolean)
      .map((l) => l.split(/\s+/)[3]);
    expect(open).toEqual([`127.0.0.1:${port}`]);
    // A second session asking for the same port gets no sound, the first keeps it.
    const warnings: string[] = [];
    expect(await startClientAudio({ port, pulseServer: clientServer, warn: (l) => warnings.push(l) })).toBeUndefined();
    expect(warnings).toHaveLength(1);
    await a!.stop();
    await a!.stop();
    expect((await sh(["ss", "-ltnH", `sport = :${port}`])).stdout.trim()).toBe("");
    expect(alive(a!.relay!)).toBe(false);
  });

  test("the relay does not outlive a qvd client killed outright (SIGKILL)", async () => {
    const port = freePort();
    const script = join(work, "client-like.ts");
    writeFileSync(
      script,
      `import { startClientAudio } from ${JSON.stringify(join(import.meta.dir, "..", "src/client/audio.ts"))};
const a = await startClientAudio({ port: ${port}, pulseServer: ${JSON.stringify(clientServer)} });
console.log("relay " + a?.relay);
await Bun.sleep(60_000);
`,
    );
    const before = new Set(readdirSync(tmpdir()).filter((f) => f.startsWith("qvd-audio-")));
    const p = Bun.spawn([process.execPath, script], { stdout: "pipe", stderr: "pipe" });
    let out = "";
    const reader = (p.stdout as ReadableStream<Uint8Array>).getReader();
    const pid = await waitFor(
      "the relay's pid",
      async () => {
        const { value } = await reader.read();
        out += new TextDecoder().decode(value);
        return /relay (\d+)/.exec(out)?.[1];
      },
      10_000,
    );
    expect(alive(Number(pid))).toBe(true);
    p.kill("SIGKILL");
    await waitFor("the relay to end", () => !alive(Number(pid)), 5000);
    // Nothing of it left in the temporary directory (its script is gone once it runs). Other
    // programs may run relays meanwhile: only a script naming this port counts.
    const left = readdirSync(tmpdir())
      .filter((f) => f.startsWith("qvd-audio-") && !before.has(f))
      .filter((f) => {
        try {
          return readFileSync(join(tmpdir(), f, "relay.pa"), "utf8").includes(`port=${port} `);
        } catch {
          return false;
        }
      });
    expect(left).toEqual([]);
    expect((await sh(["ss", "-ltnH", `sport = :${port}`])).stdout.trim()).toBe("");
  }, 20_000);

  test("what the desktop reaches through the port: the relay's sink only, no module loading, no microphone, no exit", async () => {
    const port = freePort();
    const a = await startClientAudio({ port, pulseServer: clientServer });
    expect(a?.relay).toBeDefined();
    const desk = ["pactl", "-s", `tcp:127.0.0.1:${port}`];
    try {
      const load = await sh([...desk, "load-module", "module-pipe-sink", `file=${work}/written-by-desktop`]);
      expect(load.status).not.toBe(0);
      expect(existsSync(join(work, "written-by-desktop"))).toBe(false);
      const sources = (await sh([...desk, "list", "short", "sources"])).stdout;
      expect(sources).not.toContain("Mic");
      expect((await sh([...desk, "list", "short", "sinks"])).stdout).toMatch(/^\d+\s+QVD\s/m);
      expect((await sh([...desk, "exit"])).status).not.toBe(0);
      expect(alive(a!.relay!)).toBe(true);
      // Without a pulseaudio program (PipeWire-only machines) the port is the user's server, as
      // the original had it: the microphone is there (which is why the relay exists).
      const p2 = freePort();
      const direct = await startClientAudio({
        port: p2,
        pulseServer: clientServer,
        pulseaudio: join(work, "no-pulseaudio"),
      });
      expect(direct?.module).toMatch(/^\d+$/);
      expect((await sh(["pactl", "-s", `tcp:127.0.0.1:${p2}`, "list", "short", "sources"])).stdout).toContain("Mic");
      await direct!.stop();
      expect((await sh(["ss", "-ltnH", `sport = :${p2}`])).stdout.trim()).toBe("");
    } finally {
      await a!.stop();
    }
  }, 30_000);
});

describe("sound from the desktop reaches the client's sink", () => {
  let svc: AudioService;
  let ctx: ServiceContext & { dir: string };
  let client: ClientAudio | undefined;
  let env: Record<string, string>;
  let port: number;

  beforeAll(async () => {
    port = freePort();
    client = await startClientAudio({ port, pulseServer: clientServer });
    svc = service();
    ctx = desktop({ "qvd.client.audio.enabled": "1" }, "live");
  });
  afterAll(async () => {
    await svc.stopped?.(ctx);
    await client?.stop();
  });

  test("the announcement starts the user's PulseAudio with the tunnel; a 440 Hz tone arrives", async () => {
    expect(client).toBeDefined();
    env = (await svc.prepare(ctx)).env!;
    svc.onAgentLine!("Info: Listening to X11 connections on display ':100'.", ctx);
    expect(desktopPulse()).toHaveLength(0);
    svc.onAgentLine!(`Info: Listening to multimedia connections on port 'tcp:localhost:${port}'.`, ctx);
    await waitFor(
      "the tunnel sink as the default",
      async () => {
        const r = await ctx.execAsUser(["pactl", "get-default-sink"], { env });
        return r.stdout.trim() === TUNNEL_SINK;
      },
      10_000,
    );
    const pa = desktopPulse();
    expect(pa).toHaveLength(1);
    // It runs as the user, and listens on no TCP port (the only one in a desktop is nxagent's).
    expect(readFileSync(`/proc/${pa[0]!.pid}/status`, "utf8")).toMatch(new RegExp(`\\nUid:\\s+${UID}\\s`));
    expect(await listeners(pa[0]!.pid)).toEqual([]);
    const rec = await recordWhile(async () => expect((await playTone(ctx, env, 440)).status).toBe(0));
    expect(peak(rec)).toBeGreaterThan(3000);
    expect(toneRatio(rec, 440)).toBeGreaterThan(100);
    expect(gaps(rec, RATE, START_MS)).toBe(0);
    expect(goertzel(rec, 660)).toBeLessThan(goertzel(rec, 440) / 100);
  }, 30_000);

  test("at suspend the PulseAudio it started is stopped; nothing plays to the client", async () => {
    const pa = desktopPulse();
    expect(pa).toHaveLength(1);
    await svc.suspended!(ctx);
    expect(alive(pa[0]!.pid)).toBe(false);
    const rec = await recordWhile(async () => expect((await playTone(ctx, env, 440)).status).not.toBe(0));
    expect(peak(rec)).toBeLessThan(100);
  }, 30_000);

  test("at resume it starts again (a new tone, 660 Hz, arrives); a repeated announcement keeps one tunnel", async () => {
    await svc.prepare(ctx);
    const line = `Info: Listening to multimedia connections on port '${port}'.`;
    svc.onAgentLine!(line, ctx);
    svc.onAgentLine!(line, ctx);
    await svc.idle();
    expect(desktopPulse()).toHaveLength(1);
    const mods = await ctx.execAsUser(["pactl", "list", "short", "modules"], { env });
    expect(mods.stdout.split("\n").filter((l) => l.includes("module-tunnel-sink-new"))).toHaveLength(1);
    expect((await ctx.execAsUser(["pactl", "get-default-sink"], { env })).stdout.trim()).toBe(TUNNEL_SINK);
    const rec = await recordWhile(async () => expect((await playTone(ctx, env, 660)).status).toBe(0));
    expect(toneRatio(rec, 660)).toBeGreaterThan(100);
    expect(goertzel(rec, 440)).toBeLessThan(goertzel(rec, 660) / 100);
  }, 30_000);

  test("at the end of the session PulseAudio is gone; a stop with nothing running is harmless", async () => {
    const pa = desktopPulse();
    expect(pa).toHaveLength(1);
    await svc.stopped!(ctx);
    expect(alive(pa[0]!.pid)).toBe(false);
    await svc.stopped!(ctx);
    // A late announcement after the end starts nothing.
    svc.onAgentLine!(`Info: Listening to multimedia connections on port '${port}'.`, ctx);
    await svc.idle();
    expect(desktopPulse()).toHaveLength(0);
  }, 30_000);
});

describe("a VMA killed outright", () => {
  test("takes the user's PulseAudio with it (it is in a session of its own, out of xinit's group)", async () => {
    const port = freePort();
    const client = await startClientAudio({ port, pulseServer: clientServer });
    const ctx = desktop({}, "killed");
    const rt = join(runtimeRoot(), "killed");
    const script = join(work, "vma-like.ts");
    const src = (f: string) => JSON.stringify(join(import.meta.dir, "..", "src", f));
    writeFileSync(
      script,
      `import { audioService } from ${src("vma/audio.ts")};
import { spawnDaemon } from ${src("run.ts")};
const priv = ${JSON.stringify(asUser(UID))};
const env = ${JSON.stringify(ctx.env)};
const sh = async (argv, e) => { const p = Bun.spawn(argv, { env: e, stdout: "pipe", stderr: "pipe" }); const [o, er, s] = await Promise.all([new Response(p.stdout).text(), new Response(p.stderr).text(), p.exited]); return { status: s, stdout: o, stderr: er }; };
const ctx = { account: ${JSON.stringify(ctx.account)}, properties: {}, display: 100, runDir: ${JSON.stringify(ctx.runDir)}, homeOnDisk: env.HOME, env,
  runAsUser: (argv, extra = {}) => spawnDaemon([...priv, ...argv], { cwd: "/", env: { ...env, ...extra }, detached: true }),
  execAsUser: (argv, o = {}) => sh([...priv, ...argv], { ...env, ...(o.env ?? {}) }) };
const svc = audioService({ enable: true, runtimeDir: () => ${JSON.stringify(rt)} });
await svc.prepare(ctx);
svc.onAgentLine("Info: Listening to multimedia connections on port 'tcp:localhost:${port}'.", ctx);
await svc.idle();
console.log("started");
await Bun.sleep(60_000);
`,
    );
    const p = Bun.spawn([process.execPath, script], { stdout: "pipe", stderr: "pipe" });
    const out = new Response(p.stdout).text();
    let pa = 0;
    try {
      pa = await waitFor(
        "the user's PulseAudio",
        async () => {
          const r = (await sh(["pgrep", "-u", String(UID), "-f", `pulse-${UID}.pa`])).stdout
            .trim()
            .split("\n")
            .filter(Boolean);
          return r.length === 1 ? Number(r[0]) : undefined;
        },
        20_000,
      );
      await Bun.sleep(500);
      p.kill("SIGKILL");
      await p.exited;
      await waitFor("PulseAudio to end with the VMA", () => !alive(pa), 5000);
    } finally {
      p.kill("SIGKILL");
      if (pa && alive(pa)) process.kill(pa, "SIGKILL"); // (the test failed) leave nothing running
      void out;
      await client?.stop();
    }
  }, 30_000);
});

describe("a PulseAudio the user already runs", () => {
  test("gets the tunnel; at suspend loses it but keeps running (not ours to stop)", async () => {
    const port = freePort();
    const client = await startClientAudio({ port, pulseServer: clientServer });
    const svc = service();
    const ctx = desktop({}, "own");
    const env = (await svc.prepare(ctx)).env!;
    const own = join(ctx.dir, "own.pa");
    writeFileSync(
      own,
      `load-module module-native-protocol-unix socket=${env.XDG_RUNTIME_DIR}/pulse/native\nload-module module-null-sink sink_name=Mine\n`,
    );
    chmodSync(own, 0o644);
    const mine = ctx.runAsUser(
      [
        "pulseaudio",
        "-n",
        "-F",
        own,
        "--daemonize=no",
        "--exit-idle-time=-1",
        "--realtime=no",
        "--high-priority=no",
        "--log-target=stderr",
      ],
      { XDG_RUNTIME_DIR: env.XDG_RUNTIME_DIR!, DBUS_SESSION_BUS_ADDRESS: "disabled:" },
    )!;
    const before = daemons.length;
    await waitFor(
      "the user's PulseAudio",
      async () => (await ctx.execAsUser(["pactl", "info"], { env })).status === 0,
      10_000,
    );
    svc.onAgentLine!(`Info: Listening to multimedia connections on port 'tcp:localhost:${port}'.`, ctx);
    await svc.idle();
    expect(daemons.length).toBe(before); // no second PulseAudio
    expect((await ctx.execAsUser(["pactl", "get-default-sink"], { env })).stdout.trim()).toBe(TUNNEL_SINK);
    const rec = await recordWhile(async () => expect((await playTone(ctx, env, 440)).status).toBe(0));
    expect(toneRatio(rec, 440)).toBeGreaterThan(100);
    await svc.suspended!(ctx);
    expect(alive(mine.pid)).toBe(true);
    const sinks = (await ctx.execAsUser(["pactl", "list", "short", "sinks"], { env })).stdout;
    expect(sinks).toContain("Mine");
    expect(sinks).not.toContain(TUNNEL_SINK);
    mine.killGroup("SIGTERM");
    await client?.stop();
  }, 30_000);
});

describe("through a real nxagent and nxproxy", () => {
  test("nxagent's own announcement (media=1) starts the tunnel; a tone crosses the NX session to nxproxy's media= port", async () => {
    const nxHome = join(work, "nx");
    mkdirSync(nxHome, { recursive: true });
    const xd = freeDisplay(160);
    const xvfb = spawnDaemon(["Xvfb", `:${xd}`, "-screen", "0", "640x480x24", "-nolisten", "tcp", "-noreset"], {
      detached: true,
    });
    daemons.push(xvfb);
    await waitFor("Xvfb", () => existsSync(`/tmp/.X11-unix/X${xd}`), 10_000);
    const ad = freeDisplay(xd + 1);
    const options = join(nxHome, "nxagent.conf");
    // No cookie here (this is about the media channel): nxagent takes the local proxy only.
    writeFileSync(options, `nx/nx,link=lan,media=1,accept=127.0.0.1:${ad}\n`);
    const port = freePort();
    const client = await startClientAudio({ port, pulseServer: clientServer });
    expect(client).toBeDefined();
    const svc = service();
    const ctx = desktop({}, "nx-desktop");
    const env = (await svc.prepare(ctx)).env!;
    const agentLines: string[] = [];
    const xinit = spawnDaemon(
      [
        "xinit",
        "/bin/sleep",
        "1000",
        "--",
        "/usr/bin/nxagent",
        `:${ad}`,
        "-ac",
        "-name",
        "QVD",
        "-display",
        `nx/nx,options=${options}:${ad}`,
      ],
      {
        cwd: nxHome,
        env: { PATH: process.env.PATH!, HOME: nxHome },
        detached: true,
        onLine: (l) => {
          agentLines.push(l);
          svc.onAgentLine!(l, ctx);
        },
      },
    );
    daemons.push(xinit);
    try {
      await waitFor(
        "nxagent to listen",
        () => agentLines.some((l) => l.startsWith("Info: Waiting for connection")),
        15_000,
      );
      const proxy = spawnDaemon(["nxproxy", "-S", `media=${port}`, `localhost:${ad}`], {
        cwd: nxHome,
        env: { PATH: process.env.PATH!, HOME: nxHome, DISPLAY: `:${xd}` },
        detached: true,
      });
      daemons.push(proxy);
      await waitFor("the session", () => agentLines.some((l) => l.startsWith("Session: Session started")), 15_000);
      expect(agentLines).toContain(`Info: Listening to multimedia connections on port 'tcp:localhost:${7000 + ad}'.`);
      await svc.idle();
      expect((await ctx.execAsUser(["pactl", "get-default-sink"], { env })).stdout.trim()).toBe(TUNNEL_SINK);
      const rec = await recordWhile(async () => expect((await playTone(ctx, env, 440)).status).toBe(0));
      expect(toneRatio(rec, 440)).toBeGreaterThan(100);
      // The whole second arrived without holes (the tunnel's 60 ms queue did not run dry).
      expect(gaps(rec, RATE, START_MS)).toBe(0);
      proxy.killGroup("SIGTERM");
    } finally {
      await svc.stopped!(ctx);
      // nxagent leaves xinit's process group: end it by the pid it announced.
      const agent = agentLines.map((l) => /^Info: Agent running with pid '(\d+)'/.exec(l)?.[1]).find(Boolean);
      if (agent)
        try {
          process.kill(Number(agent), "SIGTERM");
        } catch {}
      xinit.killGroup("SIGTERM");
      xvfb.killGroup("SIGTERM");
      await client?.stop();
    }
  }, 60_000);
});

describe("through the real VMA (qvd vma): x_start, nxproxy, suspend", () => {
  const SUID = 51_405; // inside the default identity range (identity.uid.min/max)
  const COOKIE = "0a1b2c3d4e5f60718293a4b5c6d7e8f9";
  const SECRET = "audio-test-secret-0123456789";

  test("sound is played in the session, heard at the client; suspend stops the user's PulseAudio", async () => {
    const dir = join(work, "vma");
    const root = minimalRoot(dir);
    const xd = freeDisplay(170);
    const xvfb = spawnDaemon(["Xvfb", `:${xd}`, "-screen", "0", "640x480x24", "-nolisten", "tcp", "-noreset"], {
      detached: true,
    });
    daemons.push(xvfb);
    await waitFor("Xvfb", () => existsSync(`/tmp/.X11-unix/X${xd}`), 10_000);
    const nxd = freeDisplay(xd + 1);
    const runDir = join(dir, "run");
    const userRuntime = `/run/user/${SUID}`;
    const file = join(dir, "vma.json");
    writeVmaConfig(file, {
      secret: SECRET,
      settings: {
        "path.run": runDir,
        "vma.display": nxd,
        "vma.provision.root": root,
        "vma.session.command": "/bin/sleep 1000",
        "vma.timeout.listening": 30,
        "identity.groups.allowed": "daemon",
        "vma.printing.enable": false,
        "vma.slave.enable": false,
      },
    });
    const vport = freePort();
    const vmaLog: string[] = [];
    const vma = spawnDaemon(
      [
        process.execPath,
        join(import.meta.dir, "..", "src/main.ts"),
        "vma",
        "--config",
        file,
        "--listen",
        `127.0.0.1:${vport}`,
      ],
      {
        cwd: join(import.meta.dir, ".."),
        detached: true,
        env: { PATH: process.env.PATH!, HOME: "/root" },
        onLine: (l) => vmaLog.push(l),
      },
    );
    daemons.push(vma);
    const call = async (method: string, path: string, body?: unknown) => {
      const r = await fetch(`http://127.0.0.1:${vport}${path}`, {
        method,
        headers: { "content-type": "application/json", "x-qvd-vma-secret": SECRET },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      return (await r.json()) as Record<string, unknown>;
    };
    const state = async () => (await call("GET", "/vma/x_state")).state;
    const port = freePort();
    const client = await startClientAudio({ port, pulseServer: clientServer });
    const { startNxRelay } = await import("./support/nx-relay.ts");
    let relay: { stop(): void; display: number } | undefined;
    const userEnv = {
      XDG_RUNTIME_DIR: userRuntime,
      PULSE_SERVER: `unix:${userRuntime}/pulse/native`,
      HOME: "/",
      PATH: "/usr/bin:/bin",
    };
    const pulseOfUser = async () => (await sh(["pgrep", "-u", String(SUID), "-x", "pulseaudio"])).stdout.trim();
    try {
      await waitFor(
        `the VMA (${vmaLog.slice(-3).join(" / ")})`,
        async () => {
          try {
            return (await state()) === "stopped";
          } catch {
            return false;
          }
        },
        20_000,
      );
      const started = await call("POST", "/vma/x_start", {
        user: "sound",
        uid: SUID,
        gid: SUID,
        link: "lan",
        client_os: "linux",
        cookie: COOKIE,
        properties: { "qvd.client.audio.enabled": "1" },
      });
      expect(started, vmaLog.slice(-5).join("\n")).toMatchObject({ state: "starting" });
      await waitFor("listening", async () => (await state()) === "listening", 30_000);
      expect(readFileSync(join(runDir, "nxagent.conf"), "utf8")).toContain(",media=1");
      relay = startNxRelay({ host: "127.0.0.1", targetPort: 4000 + nxd, cookie: COOKIE });
      const proxy = spawnDaemon(["nxproxy", "-S", `media=${port}`, `localhost:${relay.display}`], {
        cwd: dir,
        detached: true,
        env: { PATH: process.env.PATH!, HOME: dir, DISPLAY: `:${xd}` },
      });
      daemons.push(proxy);
      await waitFor("connected", async () => (await state()) === "connected", 30_000);
      await waitFor(
        "the tunnel as the user's default sink",
        async () => (await sh([...asUser(SUID), "pactl", "get-default-sink"], userEnv)).stdout.trim() === TUNNEL_SINK,
        15_000,
      );
      const pa = await pulseOfUser();
      expect(pa).toMatch(/^\d+$/);
      const wav = join(work, "tone-vma.wav");
      writeFileSync(wav, sineWav(550, 1.0));
      chmodSync(wav, 0o644);
      const rec = await recordWhile(async () =>
        expect((await sh([...asUser(SUID), "paplay", wav], userEnv)).status).toBe(0),
      );
      expect(toneRatio(rec, 550)).toBeGreaterThan(100);
      expect(gaps(rec, RATE, START_MS)).toBe(0);
      // The client goes away: the session suspends and the user's PulseAudio is stopped.
      proxy.killGroup("SIGTERM");
      await waitFor("suspended", async () => (await state()) === "suspended", 30_000);
      await waitFor("the user's PulseAudio to stop", async () => (await pulseOfUser()) === "", 10_000);
    } finally {
      relay?.stop();
      await call("POST", "/vma/x_stop").catch(() => {});
      await waitFor("stopped", async () => (await state().catch(() => "stopped")) === "stopped", 30_000).catch(
        () => {},
      );
      vma.killGroup("SIGTERM");
      await client?.stop();
      rmSync(userRuntime, { recursive: true, force: true });
    }
  }, 120_000);
});
