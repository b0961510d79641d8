// The session's sound: nxagent's multimedia channel (`media=1`) carries PulseAudio's native
// protocol to the client. When nxagent announces the channel's port, the user's PulseAudio runs
// (as the user, started here) with a tunnel sink to that port as the default sink; programs in the
// desktop find it on the usual Unix socket ($XDG_RUNTIME_DIR/pulse/native, also PULSE_SERVER).
// At suspend and at the end the tunnel goes and the PulseAudio this service started is stopped.
//
// Differences from the original, on purpose:
//   - the generated configuration has no TCP module and no module loading from /etc: the only
//     TCP listener of the session stays nxagent's (localhost, inside the desktop);
//   - PulseAudio logs to the VMA's log (stderr), not to a predictable file in /tmp;
//   - a null sink stays under the tunnel, so programs keep playing (into nothing) while the
//     client is away instead of failing;
//   - the tunnel retries (reconnect_interval_ms) instead of vanishing when the channel drops;
//   - only the PulseAudio this service started is ever signalled (its own process group).
import { lstatSync, mkdirSync, chownSync, chmodSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { logger } from "../log.ts";
import type { Daemon } from "../run.ts";
import { propertyOff, type Prepared, type ServiceContext, type SessionService } from "./services.ts";

const log = logger("vma.audio");

export interface AudioServiceOptions {
  /** vma.audio.enable */
  enable: boolean;
  /** vma.command.pulseaudio */
  pulseaudio?: string;
  /** vma.command.pactl */
  pactl?: string;
  /** The user's runtime directory (default /run/user/<uid>); created 0700 for the user when missing. */
  runtimeDir?: (uid: number) => string;
  /** vma.audio.latency_msec: the audio the tunnel keeps queued toward the client (default 60). */
  latencyMs?: number;
  /** Milliseconds between SIGTERM and SIGKILL when stopping PulseAudio (default 3000). */
  stopGraceMs?: number;
  /** Milliseconds PulseAudio has to answer after it was started (default 10000). */
  startTimeoutMs?: number;
}

/** The sink the desktop plays into: the tunnel to the client. */
export const TUNNEL_SINK = "QVD_Audio";
/**
 * How often the tunnel tries again when the channel refuses it: a client that set up no sound
 * (an original client without audio) refuses every try, each one an NX channel; gently.
 */
const RECONNECT_MS = 3000;
/** What is played while there is no tunnel. */
export const FALLBACK_SINK = "QVD_Silence";

/**
 * The port nxagent's multimedia channel listens on, from its line
 * `Info: Listening to multimedia connections on port 'tcp:localhost:7100'` (nxcomp Loop.cpp; older
 * nxcomp prints the bare number). Returns the PulseAudio server address, undefined for other lines.
 */
export function multimediaServer(line: string): string | undefined {
  const m = /^Info: Listening to multimedia connections on port '([^']*)'/.exec(line);
  if (!m) return undefined;
  const spec = m[1]!;
  let port: number;
  let t: RegExpExecArray | null;
  if (/^\d{1,5}$/.test(spec)) port = Number(spec);
  else if ((t = /^tcp:(?:localhost|127\.0\.0\.1):(\d{1,5})$/.exec(spec))) port = Number(t[1]);
  else if ((t = /^unix:(\/[\w./-]{1,200})$/.exec(spec)) && !spec.includes("..")) return `unix:${t[1]}`;
  else {
    log.warn("nxagent's multimedia channel is not on a local port, no sound", { spec: spec.slice(0, 100) });
    return undefined;
  }
  if (port < 1 || port > 65535) return undefined;
  // 127.0.0.1, not localhost: nxagent binds the IPv4 loopback, and a PulseAudio resolving
  // localhost to ::1 first would find nothing there.
  return `tcp:127.0.0.1:${port}`;
}

/** The PulseAudio script (`-n -F`): the Unix socket, a silent fallback, the tunnel. */
export function pulseConfig(server: string, socket: string): string {
  return [
    "# Written by the QVD VMA for this session; rewritten at every connection.",
    ".fail",
    `load-module module-native-protocol-unix socket=${socket}`,
    `load-module module-null-sink sink_name=${FALLBACK_SINK} sink_properties=device.description=Silence`,
    `load-module module-tunnel-sink-new sink_name=${TUNNEL_SINK} server=${server} reconnect_interval_ms=${RECONNECT_MS} sink_properties=device.description=QVD`,
    // The tunnel's sink appears once it has connected: the default is set again afterwards.
    ".nofail",
    `set-default-sink ${TUNNEL_SINK}`,
    "",
  ].join("\n");
}

/** Whether the client asked for sound: absent means yes (the original clients do not say). */
export function audioWanted(props: Record<string, string | number | boolean>): boolean {
  return !propertyOff(props, "qvd.client.audio.enabled");
}

export interface AudioService extends SessionService {
  /** Resolves once every start and stop asked so far is done (tests, benchmarks). */
  idle(): Promise<void>;
}

export function audioService(opts: AudioServiceOptions): AudioService {
  const pulseaudio = opts.pulseaudio ?? "/usr/bin/pulseaudio";
  const pactl = opts.pactl ?? "/usr/bin/pactl";
  const runtimeOf = opts.runtimeDir ?? ((uid: number) => `/run/user/${uid}`);
  const grace = opts.stopGraceMs ?? 3000;
  const latency = Math.round(opts.latencyMs ?? 60);
  if (!(latency >= 10 && latency <= 2000))
    throw new RangeError(`vma.audio.latency_msec must be 10…2000, not ${opts.latencyMs}`);
  const startTimeout = opts.startTimeoutMs ?? 10_000;

  /** Sound is on for the current x_start (media=1 was asked). */
  let active = false;
  let runtime = "";
  /** The PulseAudio this service started (undefined: none, or the user's own one is used). */
  let daemon: Daemon | undefined;
  /** Index of the tunnel module loaded with pactl into a PulseAudio already running. */
  let loadedModule: string | undefined;
  /** Calls run one after the other: a stop never overtakes a start. */
  let chain: Promise<void> = Promise.resolve();
  const serial = (what: string, f: () => Promise<void>) => {
    chain = chain.then(f).catch((err) => log.warn(`sound: ${what} failed`, { err: (err as Error).message }));
    return chain;
  };

  const pulseEnv = () => ({ XDG_RUNTIME_DIR: runtime, PULSE_SERVER: `unix:${runtime}/pulse/native` });

  async function pactlRun(ctx: ServiceContext, args: string[], timeoutMs = 5000) {
    return ctx.execAsUser([pactl, ...args], { env: pulseEnv(), timeoutMs });
  }

  /** A PulseAudio answers on the session's socket (ours from before, or the user's own). */
  async function answering(ctx: ServiceContext): Promise<boolean> {
    return (await pactlRun(ctx, ["info"], 3000)).status === 0;
  }

  async function loadTunnel(ctx: ServiceContext, server: string): Promise<void> {
    await unloadTunnel(ctx);
    // Ours loaded one from its script: every tunnel of ours goes (a user's own PulseAudio keeps its own).
    if (daemon) await pactlRun(ctx, ["unload-module", "module-tunnel-sink-new"]);
    const r = await pactlRun(ctx, [
      "load-module",
      "module-tunnel-sink-new",
      `sink_name=${TUNNEL_SINK}`,
      `server=${server}`,
      `reconnect_interval_ms=${RECONNECT_MS}`,
    ]);
    if (r.status !== 0) throw new Error(`pactl load-module: ${(r.stderr || r.stdout).trim().slice(0, 200)}`);
    loadedModule = r.stdout.trim();
    await makeDefault(ctx);
  }

  async function unloadTunnel(ctx: ServiceContext): Promise<void> {
    if (loadedModule === undefined) return;
    const idx = loadedModule;
    loadedModule = undefined;
    if (!/^\d+$/.test(idx)) return;
    const r = await pactlRun(ctx, ["unload-module", idx]);
    if (r.status !== 0) log.info("sound: tunnel already gone", { module: idx });
  }

  /** Waits for the tunnel's sink (it exists once connected) and makes it the default. */
  async function makeDefault(ctx: ServiceContext): Promise<void> {
    const until = Date.now() + startTimeout;
    while (Date.now() < until) {
      const r = await pactlRun(ctx, ["set-default-sink", TUNNEL_SINK], 3000);
      if (r.status === 0) return;
      await Bun.sleep(100);
    }
    log.warn("sound: the tunnel to the client did not come up; the desktop plays into silence until it does");
  }

  /** The runtime directory: the user's, 0700; refused when something else sits there. */
  function ensureRuntime(dir: string, uid: number, gid: number): void {
    let st;
    try {
      st = lstatSync(dir);
    } catch {
      mkdirSync(dirname(dir), { recursive: true, mode: 0o755 }); // /run/user in a fresh container
      mkdirSync(dir, { mode: 0o700 });
      if (process.getuid!() !== uid) chownSync(dir, uid, gid);
      chmodSync(dir, 0o700);
      return;
    }
    if (!st.isDirectory() || st.isSymbolicLink()) throw new Error(`${dir} is not a directory`);
    if (st.uid !== uid) throw new Error(`${dir} does not belong to uid ${uid}`);
  }

  async function start(ctx: ServiceContext, server: string): Promise<void> {
    if (!active) return;
    if (daemon || (await answering(ctx))) {
      // Ours still runs (a second announcement), or the user runs one: the tunnel goes into it.
      log.info("sound: loading the tunnel into the running PulseAudio", { server });
      await loadTunnel(ctx, server);
      return;
    }
    const cfg = join(ctx.runDir, `pulse-${ctx.account.uid}.pa`);
    rmSync(cfg, { force: true });
    // Not secret (a local port); written by the VMA where the user cannot change it.
    writeFileSync(cfg, pulseConfig(server, `${runtime}/pulse/native`), { mode: 0o644, flag: "wx" });
    // setpriv --pdeathsig: PulseAudio ends with the VMA even when the VMA is killed outright
    // (its own process group and session keep it out of xinit's).
    const guard = Bun.which("setpriv") ? ["setpriv", "--pdeathsig", "TERM", "--"] : [];
    const argv = [
      ...guard,
      pulseaudio,
      "-n",
      "-F",
      cfg,
      "--fail=yes",
      "--daemonize=no",
      "--exit-idle-time=-1",
      "--use-pid-file=yes",
      "--realtime=no",
      "--high-priority=no",
      "--log-target=stderr",
      "--log-level=warning",
    ];
    // PULSE_LATENCY_MSEC sizes the tunnel's stream on the client (the tunnel is a libpulse client
    // inside the daemon): it keeps that much audio queued, by default up to 200 ms.
    const env: Record<string, string> = { XDG_RUNTIME_DIR: runtime, PULSE_LATENCY_MSEC: String(latency) };
    // Without a session bus PulseAudio would try to autolaunch one on DISPLAY.
    if (!ctx.env.DBUS_SESSION_BUS_ADDRESS) env.DBUS_SESSION_BUS_ADDRESS = "disabled:";
    const d = ctx.runAsUser(argv, env);
    if (!d) throw new Error("no X session to run PulseAudio in");
    daemon = d;
    void d.exited.then((status) => {
      if (daemon === d) {
        daemon = undefined;
        if (active) log.warn("sound: PulseAudio ended", { status });
      }
    });
    const until = Date.now() + startTimeout;
    while (!(await answering(ctx))) {
      if (daemon !== d) throw new Error("PulseAudio exited at start (see the VMA's debug log)");
      if (Date.now() > until) throw new Error("PulseAudio did not answer in time");
      await Bun.sleep(100);
    }
    log.info("sound: PulseAudio started", { pid: d.pid, server });
    await makeDefault(ctx);
  }

  async function stop(ctx: ServiceContext): Promise<void> {
    await unloadTunnel(ctx).catch(() => {});
    const d = daemon;
    if (!d) return;
    daemon = undefined;
    d.killGroup("SIGTERM");
    const ended = await Promise.race([d.exited.then(() => true), Bun.sleep(grace).then(() => false)]);
    if (!ended) {
      log.warn("sound: PulseAudio did not stop, killing it", { pid: d.pid });
      d.killGroup("SIGKILL");
      await Promise.race([d.exited, Bun.sleep(2000)]);
    }
    log.info("sound: PulseAudio stopped", { pid: d.pid });
  }

  return {
    name: "audio",
    idle: () => chain,
    prepare(ctx: ServiceContext): Prepared {
      active = false;
      if (!opts.enable) return { options: [] };
      if (propertyOff(ctx.properties, "qvd.vm.audio.enable")) {
        log.info("sound off for this desktop (qvd.vm.audio.enable)");
        return { options: [] };
      }
      runtime = ctx.env.XDG_RUNTIME_DIR || runtimeOf(ctx.account.uid);
      ensureRuntime(runtime, ctx.account.uid, ctx.account.gid);
      // Set even when this client wants no sound: a resume by another client may.
      const env = pulseEnv();
      // nxagent's channels stay as the X session started (src/vma/session.ts): media=1 whatever
      // this client wants; its wish decides whether the desktop's PulseAudio starts.
      active = audioWanted(ctx.properties);
      if (!active) log.info("sound off: the client did not ask for it");
      return { options: ["media=1"], env };
    },
    onAgentLine(line: string, ctx: ServiceContext): void {
      if (!active) return;
      const server = multimediaServer(line);
      if (server) void serial("start", () => start(ctx, server));
    },
    suspended(ctx: ServiceContext): Promise<void> {
      return serial("stop", () => stop(ctx));
    },
    stopped(ctx: ServiceContext): Promise<void> {
      active = false;
      return serial("stop", () => stop(ctx));
    },
  };
}
