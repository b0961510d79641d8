// `qvd client`'s sound: the desktop's PulseAudio tunnels to nxproxy's `media=<port>`, and nxproxy
// forwards each of those connections to this port on 127.0.0.1. The tunnel carries no cookie (the
// client's cookie never goes to the desktop), so whatever listens there takes anonymous
// connections, from 127.0.0.1 only.
//
// The original loaded module-native-protocol-tcp into the user's own PulseAudio. Then whoever
// speaks through the media channel (any program in the desktop) has the user's whole sound server:
// it can record the microphone and load modules (module-pipe-sink writes files). Here, when a
// `pulseaudio` program is installed, the port belongs to a relay instead: a PulseAudio of its own,
// as the user, that refuses module loading and has only a tunnel sink to the user's server (no
// source: nothing to record). Without one (PipeWire-only machines), the module goes into the
// user's server as the original did, and a warning in the log says so.
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { logger } from "../log.ts";
import { run, spawnDaemon, type Daemon } from "../run.ts";

const log = logger("client.audio");

export interface ClientAudioOptions {
  /** The local TCP port nxproxy's `media=` forwards to. */
  port: number;
  /** A PulseAudio server address (pactl -s); default: PULSE_SERVER, else the user's default server. */
  pulseServer?: string;
  /** The pactl program (default "pactl" on PATH). */
  pactl?: string;
  /** The PulseAudio daemon for the relay (default "pulseaudio" on PATH); none there: no relay. */
  pulseaudio?: string;
  /** Milliseconds of sound the relay keeps queued toward the user's server (default 20). */
  relayLatencyMs?: number;
  /** Where the one-line warning goes when there is no sound (default: stderr). */
  warn?: (line: string) => void;
  /** Milliseconds pactl may take (default 5000). */
  timeoutMs?: number;
}

export interface ClientAudio {
  readonly port: number;
  /** The relay PulseAudio's pid (when there is one). */
  readonly relay?: number;
  /** The module index pactl returned (no relay: the module is in the user's server). */
  readonly module?: string;
  /** Stops the relay or unloads the module (once; later calls do nothing). */
  stop(): Promise<void>;
}

/** The pactl arguments that open the port (exported for tests). */
export function tcpModuleArgs(port: number): string[] {
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new RangeError(`bad audio port ${port}`);
  return [
    "load-module",
    "module-native-protocol-tcp",
    `port=${port}`,
    "listen=127.0.0.1",
    "auth-anonymous=1",
    "auth-ip-acl=127.0.0.1",
  ];
}

/** A program by name on PATH, or a path: whether it can be run. */
const findProgram = (p: string) => Bun.which(p) !== null;

/** A PulseAudio server address safe to put into a module argument (no spaces, quotes, or `=`). */
const SAFE_SERVER = /^(unix:)?\/[\w./@-]{1,200}$|^(tcp6?:)?[\w.:[\]-]{1,200}$/;

/** The relay's script: the TCP port for the desktop, a tunnel to the user's server, nothing else. */
export function relayScript(port: number, userServer: string): string {
  tcpModuleArgs(port);
  if (!SAFE_SERVER.test(userServer))
    throw new Error(`unusable PulseAudio server address ${JSON.stringify(userServer.slice(0, 80))}`);
  return [
    `load-module module-native-protocol-tcp port=${port} listen=127.0.0.1 auth-anonymous=1 auth-ip-acl=127.0.0.1`,
    `load-module module-tunnel-sink-new sink_name=QVD server=${userServer} reconnect_interval_ms=1000 sink_properties=device.description=QVD`,
    "",
  ].join("\n");
}

const tcpUp = (port: number) =>
  new Promise<boolean>((resolve) => {
    const s = net.connect(port, "127.0.0.1");
    s.once("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.once("error", () => resolve(false));
  });

async function startRelay(
  o: ClientAudioOptions,
  pactl: string,
  userServer: string,
  timeoutMs: number,
): Promise<ClientAudio | undefined> {
  const pa = o.pulseaudio ?? "pulseaudio";
  // Something answering there already would pass for the relay.
  if (await tcpUp(o.port)) {
    log.warn("the audio port is taken", { port: o.port });
    return undefined;
  }
  const dir = mkdtempSync(join(tmpdir(), "qvd-audio-")); // 0700: its state, pid and sockets
  let d: Daemon | undefined;
  try {
    const script = join(dir, "relay.pa");
    writeFileSync(script, relayScript(o.port, userServer), { mode: 0o600 });
    const env: Record<string, string | undefined> = {
      ...process.env,
      PULSE_RUNTIME_PATH: dir,
      PULSE_STATE_PATH: dir,
      PULSE_SERVER: undefined,
      // The relay's tunnel is a libpulse stream: this sizes its queue toward the user's server.
      PULSE_LATENCY_MSEC: String(o.relayLatencyMs ?? 20),
    };
    // setpriv --pdeathsig: the relay ends with qvd client even when that is killed outright.
    const guard = Bun.which("setpriv") ? ["setpriv", "--pdeathsig", "TERM", "--"] : [];
    const daemon = spawnDaemon(
      [
        ...guard,
        pa,
        "-n",
        "-F",
        script,
        "--fail=yes",
        "--daemonize=no",
        "--use-pid-file=no",
        "--disallow-module-loading",
        "--disallow-exit",
        "--exit-idle-time=-1",
        "--log-target=stderr",
        "--log-level=error",
      ],
      { cwd: "/", env, detached: true, onLine: (l) => log.debug("relay", { line: l }) },
    );
    d = daemon;
    let ended = false;
    void daemon.exited.then(() => {
      ended = true;
    });
    const until = Date.now() + timeoutMs;
    for (;;) {
      if (ended) throw new Error("the relay PulseAudio exited at start");
      if (Date.now() > until) throw new Error("the relay PulseAudio did not come up in time");
      if (await tcpUp(o.port)) {
        const sinks = await run([pactl, "-s", `tcp:127.0.0.1:${o.port}`, "list", "short", "sinks"], {
          allowFail: true,
          timeoutMs,
        });
        if (/^\d+\s+QVD\s/m.test(sinks.stdout) && !ended) break;
      }
      await Bun.sleep(50);
    }
    // It has read its script and keeps nothing there: nothing is left behind even if qvd client is killed.
    rmSync(dir, { recursive: true, force: true });
    log.info("audio relay up", { port: o.port, pid: daemon.pid, to: userServer });
    let stopped = false;
    return {
      port: o.port,
      relay: daemon.pid,
      async stop() {
        if (stopped) return;
        stopped = true;
        daemon.killGroup("SIGTERM");
        if (!(await Promise.race([daemon.exited.then(() => true), Bun.sleep(2000).then(() => false)]))) {
          daemon.killGroup("SIGKILL");
          await Promise.race([daemon.exited, Bun.sleep(1000)]);
        }
        rmSync(dir, { recursive: true, force: true });
        log.info("audio relay stopped", { port: o.port });
      },
    };
  } catch (err) {
    d?.killGroup("SIGKILL");
    rmSync(dir, { recursive: true, force: true });
    log.warn("no audio relay", { err: (err as Error).message });
    return undefined;
  }
}

/**
 * Opens `port` for the desktop's sound: a relay PulseAudio tunnelling to the user's server, or
 * (no `pulseaudio` program) the module in the user's server. undefined (and a one-line warning)
 * when no PulseAudio answers: the session then goes on without sound.
 */
export async function startClientAudio(o: ClientAudioOptions): Promise<ClientAudio | undefined> {
  const warn = o.warn ?? ((l: string) => process.stderr.write(`${l}\n`));
  const pactl = o.pactl ?? "pactl";
  const server = o.pulseServer ?? process.env.PULSE_SERVER;
  const base = server ? [pactl, "-s", server] : [pactl];
  const timeoutMs = o.timeoutMs ?? 5000;
  const args = tcpModuleArgs(o.port);
  // Whether the user's server answers, and where it is (the relay's tunnel goes there).
  let info;
  try {
    info = await run([...base, "info"], { allowFail: true, timeoutMs });
  } catch (err) {
    warn(`qvd client: no sound: cannot run ${pactl} (${(err as Error).message.split("\n")[0]})`);
    return undefined;
  }
  if (info.status !== 0) {
    const why = (info.stderr || info.stdout).trim().split("\n").pop() || `exit ${info.status}`;
    warn(`qvd client: no sound: no local PulseAudio answers (${why})`);
    return undefined;
  }
  const said = /^Server String: (.+)$/m.exec(info.stdout)?.[1]?.trim();
  const userServer = server ?? (said?.startsWith("/") ? `unix:${said}` : said);
  if (userServer && SAFE_SERVER.test(userServer) && findProgram(o.pulseaudio ?? "pulseaudio")) {
    const relay = await startRelay(o, pactl, userServer, timeoutMs);
    if (relay) return relay;
  }
  log.warn("sound goes straight into the local PulseAudio (no relay): programs in the desktop can use all of it");
  const r = await run([...base, ...args], { allowFail: true, timeoutMs }).catch((err: Error) => ({
    status: -1,
    stdout: "",
    stderr: err.message,
  }));
  const module = r.stdout.trim();
  if (r.status !== 0 || !/^\d+$/.test(module)) {
    const why = (r.stderr || r.stdout).trim().split("\n").pop() || `exit ${r.status}`;
    warn(`qvd client: no sound: the local PulseAudio did not open port ${o.port} (${why})`);
    return undefined;
  }
  log.info("audio port open", { port: o.port, module });
  let stopped = false;
  return {
    port: o.port,
    module,
    async stop() {
      if (stopped) return;
      stopped = true;
      const u = await run([...base, "unload-module", module], { allowFail: true, timeoutMs }).catch((err: Error) => ({
        status: -1,
        stderr: err.message,
        stdout: "",
      }));
      if (u.status !== 0) log.warn("could not unload the audio module", { module, err: u.stderr.trim().slice(0, 200) });
      else log.info("audio port closed", { port: o.port, module });
    },
  };
}
