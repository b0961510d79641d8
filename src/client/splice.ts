// The local half of a session: a 127.0.0.1 port P > 4000 for nxproxy (display P - 4000), and
// its splice with the L7R stream — the same splice as the L7R's (src/nx/splice.ts: no copies,
// backpressure, half-close).
import type { Socket, TCPSocketListener } from "bun";
import { splice as spliceSockets, type IoData, type IoSocket } from "../nx/splice.ts";
import { dispatch, type Endpoint } from "./l7r.ts";

export interface SpliceResult {
  /** Bytes from the server to nxproxy (including the ones read with the 101). */
  down: number;
  /** Bytes from nxproxy to the server. */
  up: number;
  /** Which side ended or closed first. */
  closedBy: "server" | "local";
}

/**
 * Lets the one splice of src/nx drive a socket created with the client's `dispatch` handlers:
 * the socket's events go to whatever `io` the splice installs. `first` notes the side that
 * ends or closes first.
 */
function bridge(s: Socket<Endpoint>, first: () => void): IoSocket {
  const ep: Endpoint & IoData = {
    onData: (c) => ep.io?.data(c),
    onDrain: () => ep.io?.drain(),
    onEnd: () => {
      first();
      ep.io?.end();
    },
    onClose: (err) => {
      first();
      ep.io?.close(err);
    },
  };
  s.data = ep;
  return s as unknown as IoSocket;
}

/**
 * Splices the server stream with nxproxy's socket. `first` (the bytes read after the 101) goes
 * to nxproxy before anything else. `serverEnded`: the server already sent its FIN. Resolves
 * when both directions are finished or either socket closes.
 */
export async function splice(
  server: Socket<Endpoint>,
  local: Socket<Endpoint>,
  first: Uint8Array,
  serverEnded: boolean,
): Promise<SpliceResult> {
  let closedBy: SpliceResult["closedBy"] | undefined;
  const s = bridge(server, () => (closedBy ??= "server"));
  const l = bridge(local, () => (closedBy ??= "local"));
  const done = spliceSockets(s, l, { toB: first });
  if (serverEnded) {
    closedBy ??= "server";
    s.data.io?.end();
  } else server.resume();
  local.resume();
  const r = await done;
  return { down: r.aToB, up: r.bToA, closedBy: closedBy ?? "server" };
}

/** A listener on 127.0.0.1 at a port above 4000 that hands over its first connection. */
export interface LocalPort {
  port: number;
  /** nxproxy's display number: port - 4000. */
  display: number;
  /** The first connection (later ones are refused). */
  accepted: Promise<Socket<Endpoint>>;
  stop(): void;
}

const idle: Endpoint = { onData() {}, onDrain() {}, onEnd() {}, onClose() {} };

export function listenLocal(): LocalPort {
  let accept!: (s: Socket<Endpoint>) => void;
  const accepted = new Promise<Socket<Endpoint>>((r) => (accept = r));
  let taken = false;
  const open = (s: Socket<Endpoint>) => {
    if (taken) {
      s.data = { ...idle };
      return void s.terminate();
    }
    taken = true;
    s.pause(); // until the splice is set up; nothing is lost meanwhile
    s.data = { ...idle };
    s.setNoDelay(true);
    accept(s);
  };
  let listener: TCPSocketListener<Endpoint> | undefined;
  // An ephemeral port is almost always above 4000; otherwise random ones in 20000-59999.
  for (let attempt = 0; attempt < 50 && !listener; attempt++) {
    const port = attempt === 0 ? 0 : 20000 + Math.floor(Math.random() * 40000);
    try {
      const l = Bun.listen<Endpoint>({
        hostname: "127.0.0.1",
        port,
        allowHalfOpen: true,
        socket: { ...dispatch, open },
      });
      if (l.port > 4000) listener = l;
      else l.stop(true);
    } catch {}
  }
  if (!listener) throw new Error("no free local port above 4000 on 127.0.0.1");
  const l = listener;
  return { port: l.port, display: l.port - 4000, accepted, stop: () => l.stop() };
}
