// A byte relay from a TCP port of this machine to a unix socket. `qvd demo` runs its node in a
// network namespace of its own; the node's L7R also listens on a unix socket (a filesystem
// socket is reachable from every namespace), and this relay lets the user's client reach it at
// 127.0.0.1:8443. Bytes pass as they are (TLS stays end to end), through the one splice of src/nx;
// with `proxyProtocol`, a PROXY v2 header first tells the L7R the client's address (the demo's
// node trusts it on its unix socket: l7r.proxy_protocol), for its per-address limits and throttle.
import { proxyHeader } from "../l7r/proxy-protocol.ts";
import { ioHandlers, splice, type IoData, type IoSocket } from "../nx/splice.ts";
import { logger } from "../log.ts";

const log = logger("demo");

export interface Relay {
  port: number;
  /** Connections being relayed now. */
  readonly active: number;
  stop(): void;
}

export function startRelay(o: { hostname: string; port: number; unix: string; proxyProtocol?: boolean }): Relay {
  let active = 0;
  const server = Bun.listen<IoData>({
    hostname: o.hostname,
    port: o.port,
    exclusive: true,
    allowHalfOpen: true,
    socket: {
      ...ioHandlers,
      open(client: IoSocket) {
        client.data = {};
        active++;
        // Until the unix side is connected, what the client sends is kept (a TLS hello, at most).
        const early: Uint8Array[] = [];
        let ended = false;
        let closed = false;
        client.data.io = {
          data: (c) => void early.push(Buffer.from(c)),
          drain: () => {},
          end: () => void (ended = true),
          close: () => void (closed = true),
        };
        Bun.connect<IoData>({ unix: o.unix, data: {}, allowHalfOpen: true, socket: ioHandlers } as any).then(
          (node: IoSocket) => {
            if (closed) {
              node.end();
              active--;
              return;
            }
            const header = o.proxyProtocol
              ? [
                  proxyHeader(
                    { address: client.remoteAddress, port: client.remotePort },
                    { address: client.localAddress, port: client.localPort },
                  ),
                ]
              : [];
            const first = [...header, ...early];
            const done = splice(client, node, { toB: first.length ? Buffer.concat(first) : undefined });
            if (ended) client.data.io?.end();
            void done.then(() => active--);
          },
          (err: Error) => {
            log.warn("the node's L7R cannot be reached", { socket: o.unix, error: err.message });
            client.end();
            active--;
          },
        );
      },
    },
  } as any);
  return {
    port: server.port,
    get active() {
      return active;
    },
    stop: () => server.stop(true),
  };
}
