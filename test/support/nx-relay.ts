// What the L7R does between a client's nxproxy and nxagent, without the rest of the L7R: a TCP
// relay that puts the session's cookie into each connection's NX greeting (src/nx/handshake.ts).
// Tests that drive the VMA directly point `nxproxy -S localhost:<port - 4000>` at it.
// As a program (for a network namespace: `nsenter … bun test/support/nx-relay.ts LISTEN_PORT
// HOST PORT COOKIE`) it prints "listening" once it accepts connections.
import type { Socket } from "bun";
import { spliceNx } from "../../src/nx/handshake.ts";
import { ioHandlers, type IoData } from "../../src/nx/splice.ts";

export interface NxRelay {
  port: number;
  /** The display number nxproxy is given (port - 4000). */
  display: number;
  /** The cookie of the connections from now on (a resumed session has a new one). */
  cookie: string;
  stop(): void;
}

/** A relay on 127.0.0.1:`port` (default: the first free one from 4150) to `host:targetPort`. */
export function startNxRelay(o: { host: string; targetPort: number; cookie: string; port?: number }): NxRelay {
  const relay = { cookie: o.cookie } as NxRelay;
  const handlers = {
    ...ioHandlers,
    open(s: Socket<IoData>) {
      // The client greets at once: keep what comes before nxagent's socket is open.
      const early: Uint8Array[] = [];
      s.data = { io: { data: (c) => void early.push(new Uint8Array(c)), drain() {}, end() {}, close() {} } };
      void Bun.connect<IoData>({ hostname: o.host, port: o.targetPort, data: {}, socket: ioHandlers } as any).then(
        (agent) =>
          void spliceNx(s, agent as any, {
            cookie: relay.cookie,
            timeoutMs: 30_000,
            initial: { toB: Buffer.concat(early) },
          }),
        () => s.end(),
      );
    },
  };
  for (let port = o.port ?? 4150; port < (o.port ?? 4150) + 200; port++) {
    try {
      const l = Bun.listen<IoData>({ hostname: "127.0.0.1", port, socket: handlers } as any);
      Object.assign(relay, { port, display: port - 4000, stop: () => l.stop(true) });
      return relay;
    } catch {
      if (o.port) break;
    }
  }
  throw new Error("no free port for the NX relay");
}

if (import.meta.main) {
  const [listen, host, port, cookie] = process.argv.slice(2);
  startNxRelay({ port: Number(listen), host: host!, targetPort: Number(port), cookie: cookie! });
  console.log("listening");
}
