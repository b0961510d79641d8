// `qvd client`'s sound: the desktop's PulseAudio tunnels to nxproxy's `media=<port>`, and nxproxy
// forwards each of those connections to this port on 127.0.0.1, where the user's PulseAudio (or
// PipeWire's pulse server) listens for the time of the session: module-native-protocol-tcp,
// loaded with pactl (which honours PULSE_SERVER) and unloaded at the end.
//
// The tunnel carries no cookie (the client's cookie never goes to the desktop), so the module
// takes anonymous connections, from 127.0.0.1 only (listen= and auth-ip-acl=). Any local program
// of this machine can use it while the session runs; the original did the same.
import { logger } from "../log.ts";
import { run } from "../run.ts";

const log = logger("client.audio");

export interface ClientAudioOptions {
  /** The local TCP port nxproxy's `media=` forwards to. */
  port: number;
  /** A PulseAudio server address (pactl -s); default: PULSE_SERVER, else the user's default server. */
  pulseServer?: string;
  /** The pactl program (default "pactl" on PATH). */
  pactl?: string;
  /** Where the one-line warning goes when there is no sound (default: stderr). */
  warn?: (line: string) => void;
  /** Milliseconds pactl may take (default 5000). */
  timeoutMs?: number;
}

export interface ClientAudio {
  readonly port: number;
  /** The module index pactl returned. */
  readonly module: string;
  /** Unloads the module (once; later calls do nothing). */
  stop(): Promise<void>;
}

/** The pactl arguments that open the port (exported for tests). */
export function tcpModuleArgs(port: number): string[] {
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new RangeError(`bad audio port ${port}`);
  return ["load-module", "module-native-protocol-tcp", `port=${port}`, "listen=127.0.0.1", "auth-anonymous=1", "auth-ip-acl=127.0.0.1"];
}

/**
 * Opens `port` on the user's PulseAudio for the desktop's sound. undefined (and a one-line
 * warning) when there is no PulseAudio to talk to: the session then goes on without sound.
 */
export async function startClientAudio(o: ClientAudioOptions): Promise<ClientAudio | undefined> {
  const warn = o.warn ?? ((l: string) => process.stderr.write(`${l}\n`));
  const pactl = o.pactl ?? "pactl";
  const server = o.pulseServer ?? process.env.PULSE_SERVER;
  const base = server ? [pactl, "-s", server] : [pactl];
  const timeoutMs = o.timeoutMs ?? 5000;
  const args = tcpModuleArgs(o.port);
  let r;
  try {
    r = await run([...base, ...args], { allowFail: true, timeoutMs });
  } catch (err) {
    warn(`qvd client: no sound: cannot run ${pactl} (${(err as Error).message.split("\n")[0]})`);
    return undefined;
  }
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
      const u = await run([...base, "unload-module", module], { allowFail: true, timeoutMs }).catch((err: Error) => ({ status: -1, stderr: err.message, stdout: "" }));
      if (u.status !== 0) log.warn("could not unload the audio module", { module, err: u.stderr.trim().slice(0, 200) });
      else log.info("audio port closed", { port: o.port, module });
    },
  };
}
