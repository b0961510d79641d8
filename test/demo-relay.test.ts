// The demo's relay from 127.0.0.1:<port> to the node L7R's unix socket (src/demo/relay.ts) and
// its certificate (src/demo/tls.ts): TLS goes through end to end and verifies against the demo's
// cert for 127.0.0.1; half-closes pass; a missing socket closes the client's connection.
import { afterAll, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { startRelay } from "../src/demo/relay.ts";
import { parseProxyHeader } from "../src/l7r/proxy-protocol.ts";
import { demoCertificate } from "../src/demo/tls.ts";
import { poll } from "./support/wait.ts";

const work = mkdtempSync(join(tmpdir(), "qvd-relay-"));
afterAll(() => rmSync(work, { recursive: true, force: true }));

/** Connects to the relay and collects what arrives until the connection closes. */
function client(port: number, opts: { ca?: string; send: string; halfClose?: boolean }) {
  let got = "";
  let authError: Error | null = null;
  const closed = new Promise<void>((resolve, reject) => {
    Bun.connect({
      hostname: "127.0.0.1",
      port,
      allowHalfOpen: true,
      // Verified here, not by Bun: the handshake's error is what the test looks at.
      tls: opts.ca ? { ca: opts.ca, rejectUnauthorized: false } : undefined,
      socket: {
        open(s) {
          if (!opts.ca) {
            s.write(opts.send);
            if (opts.halfClose) s.shutdown();
          }
        },
        handshake(s, _ok, err) {
          authError = err;
          s.write(opts.send);
          if (opts.halfClose) s.shutdown();
        },
        data(_s, d) {
          got += Buffer.from(d).toString();
        },
        close: () => resolve(),
        error: (_s, e) => reject(e),
      },
    }).catch(reject);
  });
  return { closed, got: () => got, authError: () => authError };
}

test("TLS through the relay: the client verifies the demo's certificate for 127.0.0.1; bytes both ways", async () => {
  const tls = await demoCertificate(work);
  expect(tls.created).toBe(true);
  expect(statSync(tls.key).mode & 0o777).toBe(0o600);
  expect((await demoCertificate(work)).created).toBe(false);

  const sock = join(work, "tls.sock");
  const server = Bun.listen({
    unix: sock,
    tls: { cert: Bun.file(tls.cert), key: Bun.file(tls.key) },
    socket: {
      data(s, d) {
        s.end(Buffer.from(d).toString().toUpperCase());
      },
    },
  });
  const relay = startRelay({ hostname: "127.0.0.1", port: 0, unix: sock });
  try {
    const c = client(relay.port, { ca: readFileSync(tls.cert, "utf8"), send: "hello through the relay" });
    await c.closed;
    expect(c.authError()).toBeNull();
    expect(c.got()).toBe("HELLO THROUGH THE RELAY");
    // Against another certificate, the same connection does not verify.
    const other = await demoCertificate(join(work, "other"));
    const d = client(relay.port, { ca: readFileSync(other.cert, "utf8"), send: "x" });
    await d.closed;
    expect(d.authError()).not.toBeNull();
  } finally {
    relay.stop();
    server.stop(true);
  }
});

test("a half-close passes: the server sees the client's FIN and still answers", async () => {
  const sock = join(work, "plain.sock");
  let received = "";
  const server = Bun.listen({
    unix: sock,
    allowHalfOpen: true,
    socket: {
      data(_s, d) {
        received += Buffer.from(d).toString();
      },
      end(s) {
        s.end(`got ${received.length} bytes`);
      },
    },
  });
  const relay = startRelay({ hostname: "127.0.0.1", port: 0, unix: sock });
  try {
    const c = client(relay.port, { send: "x".repeat(100_000), halfClose: true });
    await c.closed;
    expect(received.length).toBe(100_000);
    expect(c.got()).toBe("got 100000 bytes");
    await poll(() => relay.active === 0, 5000, 10); // the relay counts the connection out once it has closed its side
    expect(relay.active).toBe(0);
  } finally {
    relay.stop();
    server.stop(true);
  }
});

test("no L7R behind the socket: the client's connection is closed; a port in use is refused", async () => {
  const relay = startRelay({ hostname: "127.0.0.1", port: 0, unix: join(work, "nobody.sock") });
  try {
    const c = client(relay.port, { send: "anyone?" });
    await c.closed;
    expect(c.got()).toBe("");
    expect(() => startRelay({ hostname: "127.0.0.1", port: relay.port, unix: join(work, "nobody.sock") })).toThrow();
  } finally {
    relay.stop();
  }
});

test("with proxyProtocol, the relay sends a PROXY v2 header with the client's address before the client's bytes", async () => {
  const sock = join(work, "proxied.sock");
  let received = Buffer.alloc(0);
  const server = Bun.listen({
    unix: sock,
    socket: {
      data(s, d) {
        received = Buffer.concat([received, d]);
        if (received.includes("hello")) s.end("ok");
      },
    },
  });
  const relay = startRelay({ hostname: "127.0.0.1", port: 0, unix: sock, proxyProtocol: true });
  try {
    const c = client(relay.port, { send: "hello" });
    await c.closed;
    expect(c.got()).toBe("ok");
    const h = parseProxyHeader(received)!;
    expect(h.address).toBe("127.0.0.1");
    expect(h.port).toBeGreaterThan(0);
    expect(received.subarray(h.length).toString()).toBe("hello");
  } finally {
    relay.stop();
    server.stop(true);
  }
});
