// The L7R's sockets: TLS on its TCP port and, when asked, on a unix socket; either may expect a
// PROXY v2 header from trusted relays before TLS (src/l7r/proxy-protocol.ts). Each accepted
// connection is counted by the admission bounds and handed to `accept`.
import { chmodSync, rmSync } from "node:fs";
import type { TCPSocketListener } from "bun";
import { UserError } from "../errors.ts";
import { logger } from "../log.ts";
import { ioHandlers, type Io, type IoData, type IoSocket } from "../nx/splice.ts";
import type { Admission } from "./admission.ts";
import type { L7rOptions } from "./options.ts";
import {
  inNetworks,
  looksLikeProxyHeader,
  MAX_HEADER,
  parseProxyHeader,
  type ProxyHeaderError,
} from "./proxy-protocol.ts";

/** A connection's socket events, with the TLS handshake's outcome. */
export type ConnIo = Io & { handshake?(ok: boolean): void };

/** `address`: the client's; `handshakeMs`: what is left of the handshake's time. */
export type Accept = (s: IoSocket, address: string, handshakeMs?: number) => void;

const log = logger("l7r");

/**
 * How long a port in use is tried again: the L7R of a node that was just killed (or is stopping)
 * may hold it for a moment, until it notices its parent is gone; a restart must not fail on that.
 */
export const BIND_RETRY_MS = 5000;

export interface Listening {
  port: number;
  stop(): void;
}

export async function listenL7r(
  o: L7rOptions,
  handshakeS: number,
  admission: Admission,
  accept: Accept,
): Promise<Listening> {
  const tlsOptions = {
    cert: Bun.file(o.tls.cert),
    key: Bun.file(o.tls.key),
    minVersion: 0x0303 /* TLS 1.2 */,
    ...(o.tls.clientCa ? { ca: Bun.file(o.tls.clientCa), requestCert: true, rejectUnauthorized: true } : {}),
  };
  // A TLS listener: `open` comes at the accept (there is a handshake handler), so the handshake is timed too.
  const tlsHandlers = {
    ...ioHandlers,
    open(s: IoSocket) {
      s.data = {};
      if (admission.admit(s, s.remoteAddress)) accept(s, s.remoteAddress);
    },
    handshake(s: IoSocket, ok: boolean) {
      (s.data?.io as ConnIo | undefined)?.handshake?.(ok);
    },
  };
  const served = { tls: tlsOptions, socket: tlsHandlers };
  /**
   * A listener whose trusted sources send a PROXY v2 header before TLS: the header is read in
   * clear, then the socket is upgraded to TLS with the bytes that came after it. A connection
   * from any other source must not begin with a header (refused), and is upgraded as it is.
   */
  const proxied = (trusted: (remote: string) => boolean) => ({
    socket: {
      ...ioHandlers,
      open(raw: IoSocket) {
        raw.data = {};
        const remote = raw.remoteAddress ?? "";
        // The preamble counts against the total; the address is counted once known.
        if (!admission.reserve()) return admission.refuse(raw, remote, "too many connections");
        const opened = Date.now();
        const mustHave = trusted(remote);
        let buf = new Uint8Array(0);
        let done = false;
        const timer = setTimeout(() => fail("no PROXY header in time"), handshakeS * 1000);
        const fail = (why: string) => {
          if (done) return;
          done = true;
          clearTimeout(timer);
          admission.unreserve();
          admission.refuse(raw, remote, why);
        };
        raw.data.io = {
          data: (c) => {
            if (done) return;
            buf = buf.length ? Buffer.concat([buf, c]) : Buffer.from(c);
            let address = remote;
            let rest = buf;
            if (mustHave) {
              let h;
              try {
                h = parseProxyHeader(buf);
              } catch (err) {
                return fail((err as ProxyHeaderError).message);
              }
              if (!h) return buf.length > MAX_HEADER ? fail("PROXY header too long") : undefined;
              if (h.address) address = h.address;
              rest = buf.subarray(h.length);
            } else if (looksLikeProxyHeader(buf)) {
              if (buf.length < 12) return; // too short to tell yet
              return fail("PROXY header from an untrusted source");
            }
            done = true;
            clearTimeout(timer);
            admission.unreserve();
            raw.data.io = undefined; // the raw side's events are the TLS socket's from here on
            if (!admission.admit(raw, address)) return;
            const up = (raw as any).upgradeTLS({
              tls: { ...tlsOptions, isServer: true },
              data: {},
              initialData: rest,
              socket: { ...ioHandlers, open() {}, handshake: tlsHandlers.handshake },
            });
            const s = up?.[1] as IoSocket | undefined;
            if (!s) {
              admission.leave(address);
              return raw.end();
            }
            s.data ??= {};
            accept(s, address, handshakeS * 1000 - (Date.now() - opened));
          },
          drain: () => {},
          end: () => fail("closed before TLS"),
          close: () => fail("closed before TLS"),
        };
      },
    },
  });
  const pp = o.proxyProtocol;
  const listenTcp = (): TCPSocketListener<IoData> =>
    pp?.networks.length
      ? Bun.listen<IoData>({ hostname: o.hostname, port: o.port, ...proxied((a) => inNetworks(a, pp.networks)) } as any)
      : Bun.listen<IoData>({ hostname: o.hostname, port: o.port, ...served } as any);
  const server = await bindRetrying(listenTcp, `${o.hostname}:${o.port}`);
  // The same on a unix socket, when asked (qvd demo relays 127.0.0.1:8443 to it from another
  // network namespace); a socket file left by an L7R that died is replaced.
  let unixServer: { stop(closeActive?: boolean): void } | undefined;
  if (o.unix) {
    try {
      rmSync(o.unix, { force: true });
      unixServer = Bun.listen<IoData>({ unix: o.unix, ...(pp?.unix ? proxied(() => true) : served) } as any);
      // Whoever can connect to it may speak for any address: only its owner (whatever the umask).
      if (pp?.unix) chmodSync(o.unix, 0o600);
    } catch (err) {
      unixServer?.stop(true);
      server.stop(true); // a failed start holds no port
      throw err;
    }
  }
  return {
    port: server.port,
    stop() {
      server.stop(true);
      if (unixServer) {
        unixServer.stop(true);
        rmSync(o.unix!, { force: true });
      }
    },
  };
}

/** `listen()`, tried again for BIND_RETRY_MS while its port is in use; then a clear error. */
async function bindRetrying<T>(listen: () => T, address: string): Promise<T> {
  const until = Date.now() + BIND_RETRY_MS;
  for (let warned = false; ; warned = true) {
    try {
      return listen();
    } catch (err) {
      if ((err as { code?: string }).code !== "EADDRINUSE") throw err;
      if (Date.now() >= until)
        throw new UserError(
          `${address} is in use by another program (another L7R or qvd node?); waited ${BIND_RETRY_MS / 1000} s`,
        );
      if (!warned) log.warn("address in use: trying again", { address, for_s: BIND_RETRY_MS / 1000 });
      await Bun.sleep(250);
    }
  }
}
