// Audio latency through the session's sound tunnel on loopback (issue 12; aim: under 150 ms).
// Run as root: bun bench/audio-latency.ts [--rounds 10] [--skip-nx] [--app-latency MS] [--tunnel-latency MS] [--relay-latency MS] [--tones N] [--no-relay] [--verbose]
//
// Method (printed with the figures): a "client" PulseAudio (null sink, TCP port opened by
// src/client/audio.ts) and the desktop's PulseAudio started by the VMA's audio service
// (src/vma/audio.ts) as a throwaway uid. parec records the client's sink monitor in 5 ms
// fragments. Each round spawns `paplay` of a 30 ms 1 kHz click as the desktop user and takes
// the time from that spawn to the arrival of the first recorded fragment holding the click.
// The same click played by paplay straight into the client's PulseAudio (no tunnel) is the
// baseline: it holds paplay's start and the recorder's own delay, so "added" = tunnel − baseline.
// Then 1 s tones (--tones N) along each path, counted when they arrive with a hole (an underrun).
// Paths: the tunnel straight to the client's port, and (unless --skip-nx) through a real
// nxagent (media=1) and nxproxy (media=<port>) as in a session.
import { chmodSync, chownSync, existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { cpus, loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import { startClientAudio } from "../src/client/audio.ts";
import { setLogLevel } from "../src/log.ts";
import { spawnDaemon, type Daemon, type RunResult } from "../src/run.ts";
import { audioService, TUNNEL_SINK } from "../src/vma/audio.ts";
import type { ServiceContext } from "../src/vma/services.ts";
import { gapOffsets, samples, sineWav } from "../test/support/tone.ts";

setLogLevel("error");
const opt = (name: string, dflt: number) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) || dflt : dflt;
};
const ROUNDS = opt("rounds", 10);
const SKIP_NX = process.argv.includes("--skip-nx");
/** The client's port in its PulseAudio directly, as the original client did (no relay). */
const NO_RELAY = process.argv.includes("--no-relay");
/** paplay's requested latency (--latency-msec); 0: paplay's default, as most programs. */
const APP_LATENCY = opt("app-latency", 0);
/** vma.audio.latency_msec for the service (default: the key's default). */
const TUNNEL_LATENCY = opt("tunnel-latency", 60);
/** The client relay's queue (src/client/audio.ts relayLatencyMs). */
const RELAY_LATENCY = opt("relay-latency", 20);
const paplayArgs = APP_LATENCY ? [`--latency-msec=${APP_LATENCY}`] : [];
const RATE = 44100;
const UID = 61_404;

if (process.getuid!() !== 0) {
  console.error("bench/audio-latency.ts runs as root (the desktop's PulseAudio runs as a throwaway uid)");
  process.exit(2);
}

const work = mkdtempSync(join(tmpdir(), "qvd-audio-bench-"));
chmodSync(work, 0o755);
const daemons: Daemon[] = [];
const cleanup = () => {
  for (const d of daemons) d.killGroup("SIGKILL");
  rmSync(work, { recursive: true, force: true });
};
process.on("exit", cleanup);

async function sh(argv: string[], env: Record<string, string> = {}, timeoutMs = 10_000): Promise<RunResult> {
  const p = Bun.spawn(argv, {
    cwd: "/",
    env: { PATH: process.env.PATH!, ...env },
    stdout: "pipe",
    stderr: "pipe",
    timeout: timeoutMs,
  });
  const [stdout, stderr, status] = await Promise.all([
    new Response(p.stdout).text(),
    new Response(p.stderr).text(),
    p.exited,
  ]);
  return { status, stdout, stderr };
}

async function waitFor(what: string, f: () => Promise<boolean> | boolean, ms = 15_000): Promise<void> {
  const until = Date.now() + ms;
  while (!(await f())) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(50);
  }
}

async function freePort(): Promise<number> {
  const s = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
  const p = s.port;
  s.stop(true);
  return p;
}

function clickWav(): string {
  const n = Math.round(0.03 * RATE);
  const b = Buffer.alloc(44 + n * 2);
  b.write("RIFF", 0);
  b.writeUInt32LE(36 + n * 2, 4);
  b.write("WAVEfmt ", 8);
  b.writeUInt32LE(16, 16);
  b.writeUInt16LE(1, 20);
  b.writeUInt16LE(1, 22);
  b.writeUInt32LE(RATE, 24);
  b.writeUInt32LE(RATE * 2, 28);
  b.writeUInt16LE(2, 32);
  b.writeUInt16LE(16, 34);
  b.write("data", 36);
  b.writeUInt32LE(n * 2, 40);
  for (let i = 0; i < n; i++) b.writeInt16LE(Math.round(16000 * Math.sin((2 * Math.PI * 1000 * i) / RATE)), 44 + i * 2);
  const f = join(work, "click.wav");
  writeFileSync(f, b);
  chmodSync(f, 0o644);
  return f;
}

// The client's PulseAudio (root, own runtime directory).
const c = join(work, "client");
mkdirSync(join(c, "home"), { recursive: true });
mkdirSync(join(c, "run"), { mode: 0o700 });
writeFileSync(
  join(c, "client.pa"),
  "load-module module-native-protocol-unix\nload-module module-null-sink sink_name=ClientOut\nset-default-sink ClientOut\n",
);
const clientServer = `unix:${c}/run/pulse/native`;
daemons.push(
  spawnDaemon(
    [
      "pulseaudio",
      "-n",
      "-F",
      join(c, "client.pa"),
      "--daemonize=no",
      "--exit-idle-time=-1",
      "--realtime=no",
      "--high-priority=no",
      "--log-target=stderr",
    ],
    {
      cwd: "/",
      env: {
        PATH: process.env.PATH!,
        HOME: join(c, "home"),
        XDG_RUNTIME_DIR: join(c, "run"),
        DBUS_SESSION_BUS_ADDRESS: "disabled:",
      },
      detached: true,
    },
  ),
);
await waitFor("the client's PulseAudio", async () => (await sh(["pactl", "-s", clientServer, "info"])).status === 0);

// The recorder: arrival time of every fragment, so the click's arrival is known to ~5 ms.
const rec = Bun.spawn(
  [
    "parec",
    "-s",
    clientServer,
    "-d",
    "ClientOut.monitor",
    "--raw",
    "--format=s16le",
    "--channels=1",
    `--rate=${RATE}`,
    "--latency-msec=5",
  ],
  {
    stdout: "pipe",
    stderr: "ignore",
    env: { PATH: process.env.PATH!, HOME: join(c, "home") },
  },
);
let armedAt = 0;
/** While set, every recorded fragment goes here (the tones). */
let recording: Uint8Array[] | undefined;
let heard: ((t: number) => void) | undefined;
void (async () => {
  const r = (rec.stdout as ReadableStream<Uint8Array>).getReader();
  for (;;) {
    const { done, value } = await r.read();
    if (done) break;
    const now = performance.now();
    recording?.push(value);
    if (!heard || now < armedAt) continue;
    const s = new Int16Array(value.buffer.slice(value.byteOffset, value.byteOffset + (value.byteLength & ~1)));
    if (s.some((v) => Math.abs(v) > 2000)) {
      const h = heard;
      heard = undefined;
      h(now);
    }
  }
})();

/** One click: ms from paplay's spawn to its sound in the recording. */
async function once(play: () => Promise<RunResult>): Promise<number> {
  await Bun.sleep(250); // the previous click is over
  const arrived = new Promise<number>((resolve) => (heard = resolve));
  armedAt = performance.now();
  const t0 = performance.now();
  const p = play();
  const t = await Promise.race([arrived, Bun.sleep(3000).then(() => NaN)]);
  const r = await p;
  if (r.status !== 0) throw new Error(`paplay failed: ${r.stderr.trim()}`);
  heard = undefined;
  return t - t0;
}

const stats = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return { median: s[Math.floor(s.length / 2)]!, min: s[0]!, max: s.at(-1)! };
};
const fmt = (x: number) => `${x.toFixed(1)} ms`;

// The desktop: its user's programs through setpriv, as the VMA's runAsUser does.
const dHome = join(work, "desktop");
mkdirSync(dHome);
chownSync(dHome, UID, UID);
const runDir = join(work, "qvd-run");
mkdirSync(runDir, { mode: 0o755 });
mkdirSync(join(work, "run-user"), { mode: 0o755 });
const priv = ["setpriv", `--reuid=${UID}`, `--regid=${UID}`, "--clear-groups", "--"];
const denv = { PATH: "/usr/bin:/bin", HOME: dHome, USER: "bench", LANG: "C.UTF-8" };
const ctx: ServiceContext = {
  account: { user: "bench", uid: UID, gid: UID, home: dHome, shell: "/bin/sh", groups: [] },
  properties: {},
  display: 100,
  runDir,
  homeOnDisk: dHome,
  env: denv,
  runAsUser(argv, extra = {}) {
    const d = spawnDaemon([...priv, ...argv], { cwd: "/", env: { ...denv, ...extra }, detached: true });
    daemons.push(d);
    return d;
  },
  execAsUser: (argv, o = {}) => sh([...priv, ...argv], { ...denv, ...(o.env ?? {}) }, o.timeoutMs ?? 10_000),
};

const click = clickWav();
const toneFile = join(work, "tone.wav");
writeFileSync(toneFile, sineWav(440, 1.0));
chmodSync(toneFile, 0o644);
const TONES = opt("tones", 5);
/** Per path: how many 1 s tones arrived with a hole (a 10 ms window without sound) in their first 450 ms, and later. */
const gapRows: [string, number, number][] = [];
const rows: [string, number[]][] = [];
const measure = async (name: string, play: () => Promise<RunResult>, playTone: () => Promise<RunResult>) => {
  await once(play); // warm-up (first stream, caches)
  const xs: number[] = [];
  for (let i = 0; i < ROUNDS; i++) xs.push(await once(play));
  rows.push([name, xs]);
  let early = 0;
  let late = 0;
  for (let i = 0; i < TONES; i++) {
    recording = [];
    await Bun.sleep(200);
    await playTone();
    await Bun.sleep(300);
    const got = samples(Buffer.concat(recording));
    recording = undefined;
    const at = gapOffsets(got);
    if (at.some((ms) => ms < 450)) early++;
    if (at.some((ms) => ms >= 450)) late++;
    if (at.length > 0) {
      if (process.argv.includes("--verbose")) console.log(`${name}: holes at ${at.join(", ")} ms`);
    }
  }
  gapRows.push([name, early, late]);
};

const direct = (f: string) => () => sh(["paplay", ...paplayArgs, "-s", clientServer, f], { HOME: join(c, "home") });
await measure("baseline: paplay straight into the client's PulseAudio", direct(click), direct(toneFile));

async function throughTunnel(
  name: string,
  announce: (port: number, svc: ReturnType<typeof audioService>) => Promise<() => Promise<void>>,
) {
  const port = await freePort();
  const client = await startClientAudio({
    port,
    pulseServer: clientServer,
    relayLatencyMs: RELAY_LATENCY,
    ...(NO_RELAY ? { pulseaudio: "/nonexistent/pulseaudio" } : {}),
  });
  if (!client) throw new Error("the client's PulseAudio did not open its port");
  const svc = audioService({
    enable: true,
    latencyMs: TUNNEL_LATENCY,
    runtimeDir: (uid) => join(work, "run-user", String(uid)),
  });
  const env = (await svc.prepare(ctx)).env!;
  const end = await announce(port, svc);
  await svc.idle();
  await waitFor(
    "the tunnel",
    async () => (await ctx.execAsUser(["pactl", "get-default-sink"], { env })).stdout.trim() === TUNNEL_SINK,
  );
  const inDesktop = (f: string) => () => ctx.execAsUser(["paplay", ...paplayArgs, f], { env });
  await measure(name, inDesktop(click), inDesktop(toneFile));
  await svc.stopped!(ctx);
  await end();
  await client.stop();
}

await throughTunnel("desktop paplay → tunnel sink → client's TCP port (loopback)", async (port, svc) => {
  svc.onAgentLine!(`Info: Listening to multimedia connections on port 'tcp:localhost:${port}'.`, ctx);
  return async () => {};
});

if (!SKIP_NX) {
  const free = (from: number) => {
    for (let d = from; ; d++) if (!existsSync(`/tmp/.X${d}-lock`) && !existsSync(`/tmp/.X11-unix/X${d}`)) return d;
  };
  await throughTunnel("desktop paplay → tunnel → nxagent media=1 → nxproxy media= → client", async (port, svc) => {
    const nx = join(work, "nx");
    mkdirSync(nx);
    const xd = free(180);
    const xvfb = spawnDaemon(["Xvfb", `:${xd}`, "-screen", "0", "640x480x24", "-nolisten", "tcp"], { detached: true });
    daemons.push(xvfb);
    await waitFor("Xvfb", () => existsSync(`/tmp/.X11-unix/X${xd}`));
    const ad = free(xd + 1);
    writeFileSync(join(nx, "o"), `nx/nx,link=lan,media=1,accept=127.0.0.1:${ad}\n`);
    let agentPid = 0;
    let started = false;
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
        `nx/nx,options=${join(nx, "o")}:${ad}`,
      ],
      {
        cwd: nx,
        env: { PATH: process.env.PATH!, HOME: nx },
        detached: true,
        onLine: (l) => {
          const m = /^Info: Agent running with pid '(\d+)'/.exec(l);
          if (m) agentPid = Number(m[1]);
          if (l.startsWith("Info: Waiting for connection")) started = true;
          svc.onAgentLine!(l, ctx);
        },
      },
    );
    daemons.push(xinit);
    await waitFor("nxagent", () => started);
    const proxy = spawnDaemon(["nxproxy", "-S", `media=${port}`, `localhost:${ad}`], {
      cwd: nx,
      env: { PATH: process.env.PATH!, HOME: nx, DISPLAY: `:${xd}` },
      detached: true,
    });
    daemons.push(proxy);
    return async () => {
      proxy.killGroup("SIGTERM");
      if (agentPid)
        try {
          process.kill(agentPid, "SIGTERM");
        } catch {}
      xinit.killGroup("SIGTERM");
      xvfb.killGroup("SIGTERM");
    };
  });
}

rec.kill();
console.log(
  `Audio latency on loopback, ${ROUNDS} rounds each (after one warm-up), median [min … max]; paplay ${APP_LATENCY ? `--latency-msec=${APP_LATENCY}` : "with its default buffer"}, vma.audio.latency_msec=${TUNNEL_LATENCY}, ${NO_RELAY ? "no client relay" : `client relay ${RELAY_LATENCY} ms`}:`,
);
console.log("Method: time from spawning paplay of a 30 ms 1 kHz click to the arrival of the first 5 ms");
console.log("fragment holding it in parec of the client's null-sink monitor. The baseline (no tunnel)");
console.log("holds paplay's start-up and the recorder's delay; added = path − baseline.");
const base = stats(rows[0]![1]).median;
for (const [name, xs] of rows) {
  const s = stats(xs);
  const added = name.startsWith("baseline") ? "" : `  added ${fmt(s.median - base)}`;
  console.log(`  ${name}: ${fmt(s.median)} [${fmt(s.min)} … ${fmt(s.max)}]${added}`);
}
console.log(
  `1 s tones with a hole (a 10 ms window without sound) in their first 450 ms / later, out of ${TONES}; load average ${loadavg()[0]!.toFixed(1)} on ${cpus().length} CPUs:`,
);
for (const [name, early, late] of gapRows) console.log(`  ${name}: ${early} / ${late}`);
process.exit(0);
