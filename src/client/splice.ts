// The local half of a session: a 127.0.0.1 port P > 4000 for nxproxy (display P - 4000), and
// the splice between nxproxy's connection and the L7R stream. Bytes are passed on as they
// arrive (no copies, no strings); when a write is short the reading side is paused and the
// rest queued until `drain`; an end of stream on one side is passed on as a half-close.
import type { Socket, TCPSocketListener } from "bun";
import { dispatch, type Endpoint } from "./l7r.ts";

/** One direction: from `from` to `to`. */
class Flow {
  private queue: Uint8Array[] = [];
  private ended = false;
  finished = false;
  /** Bytes passed on, for logs and tests. */
  bytes = 0;

  constructor(
    private readonly from: Socket<Endpoint>,
    private readonly to: Socket<Endpoint>,
    private readonly onFinish: () => void,
  ) {}

  push(chunk: Uint8Array): void {
    if (this.finished || chunk.length === 0) return;
    if (this.queue.length) {
      // Already backed up (data dispatched after pause): keep our own copy, in order.
      this.queue.push(chunk.slice());
      return;
    }
    const n = this.to.write(chunk);
    if (n < 0) return; // `to` is closed; its close event ends the session
    this.bytes += n;
    if (n < chunk.length) {
      this.queue.push(chunk.slice(n));
      this.from.pause();
    }
  }

  drain(): void {
    while (this.queue.length) {
      const c = this.queue[0]!;
      const n = this.to.write(c);
      if (n < 0) return;
      this.bytes += n;
      if (n < c.length) {
        this.queue[0] = c.subarray(n);
        return;
      }
      this.queue.shift();
    }
    if (this.ended) this.finish();
    else this.from.resume();
  }

  end(): void {
    this.ended = true;
    if (!this.queue.length) this.finish();
  }

  private finish(): void {
    if (this.finished) return;
    this.finished = true;
    try {
      this.to.shutdown(); // FIN: the other side may still send
    } catch {}
    this.onFinish();
  }
}

export interface SpliceResult {
  /** Bytes from the server to nxproxy (including the ones read with the 101). */
  down: number;
  /** Bytes from nxproxy to the server. */
  up: number;
  /** Which side closed first. */
  closedBy: "server" | "local";
}

/**
 * Splices the server stream with nxproxy's socket. `first` (the bytes read after the 101) goes
 * to nxproxy before anything else. `serverEnded`: the server already sent its FIN. Resolves
 * when both directions are finished or either socket closes.
 */
export function splice(
  server: Socket<Endpoint>,
  local: Socket<Endpoint>,
  first: Uint8Array,
  serverEnded: boolean,
): Promise<SpliceResult> {
  return new Promise((resolve) => {
    let done = false;
    let closedBy: SpliceResult["closedBy"] | undefined;
    const finish = () => {
      if (done) return;
      done = true;
      try {
        server.end();
      } catch {}
      try {
        local.end();
      } catch {}
      resolve({ down: down.bytes, up: up.bytes, closedBy: closedBy ?? "server" });
    };
    const check = () => {
      if (down.finished && up.finished) finish();
    };
    const down = new Flow(server, local, () => {
      closedBy ??= "server";
      check();
    });
    const up = new Flow(local, server, () => {
      closedBy ??= "local";
      check();
    });
    server.data = {
      onData: (d) => down.push(d),
      onDrain: () => up.drain(),
      onEnd: () => down.end(),
      onClose: () => {
        closedBy ??= "server";
        finish();
      },
    };
    local.data = {
      onData: (d) => up.push(d),
      onDrain: () => down.drain(),
      onEnd: () => up.end(),
      onClose: () => {
        closedBy ??= "local";
        finish();
      },
    };
    down.push(first);
    if (serverEnded) down.end();
    else server.resume();
  });
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
      const l = Bun.listen<Endpoint>({ hostname: "127.0.0.1", port, allowHalfOpen: true, socket: { ...dispatch, open } });
      if (l.port > 4000) listener = l;
      else l.stop(true);
    } catch {}
  }
  if (!listener) throw new Error("no free local port above 4000 on 127.0.0.1");
  const l = listener;
  return { port: l.port, display: l.port - 4000, accepted, stop: () => l.stop() };
}
