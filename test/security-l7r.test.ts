// A stranger on the network against the L7R (README, "Security model": must never exhaust
// memory or CPU): the real `qvd l7r` binary in a process of its own, its memory read from /proc. The
// attacks: one TLS connection with pipelined bad logins and then junk; many connections from one
// address; clients that stall at every stage. And PROXY protocol v2 on the unix socket (as the
// demo's relay uses it): the header gives the client's address; from an untrusted source, or
// malformed, it is refused.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { join } from "node:path";
import * as D from "../src/db/index.ts";
import { proxyHeader, SIGNATURE, trustedSources } from "../src/l7r/proxy-protocol.ts";
import { startL7r, type L7r } from "../src/l7r/server.ts";
import { useTestDatabase } from "./support/db.ts";
import { Peer } from "./support/l7r-peer.ts";
import { cleanEnv, farmCert, qvdBinary } from "./support/node.ts";
import { basic } from "./support/qvd-wire.ts";
import { poll } from "./support/wait.ts";
import { selfSignedCert } from "./support/tls.ts";

const db = useTestDatabase();
const ALL = D.ALL_TENANTS;
const dir = mkdtempSync("/tmp/qvd-sec-l7r-");
const sock = join(dir, "l7r.sock");
const MIB = 1024 * 1024;
/** Limits of the L7R under test (small, so the tests reach them). */
const PER_ADDRESS = 12;
let l7r: Bun.Subprocess;
let port = 0;
let log = "";

const vmRss = (field: "VmRSS" | "VmHWM") =>
  Number(new RegExp(`${field}:\\s+(\\d+) kB`).exec(readFileSync(`/proc/${l7r.pid}/status`, "utf8"))?.[1] ?? 0) * 1024;
const ping = async (p: Peer) => {
  p.write("GET /qvd/ping HTTP/1.1\r\n\r\n");
  return p.response(30_000);
};
const header = (address: string) => proxyHeader({ address, port: 40000 }, { address: "127.0.0.1", port: 8443 });

beforeAll(async () => {
  const sql = db().sql;
  await selfSignedCert(dir);
  const host = await D.create(sql, D.hosts, ALL, { name: "sec-l7r", address: "127.0.0.1" });
  await sql`UPDATE host_runtimes SET state = 'running' WHERE host_id = ${host.id}`;
  await D.create(sql, D.users, ALL, { tenant_id: 1, name: "alice", password: "alice-pw-1" });
  const binary = await qvdBinary();
  const set = {
    ...(await farmCert("sec-l7r", "127.0.0.1")).settings,
    "cluster.peer.port": "0", // a lone node: any free port for its node-to-node endpoint
    nodename: "sec-l7r",
    "log.level": "warn",
    "l7r.listen.unix": sock,
    "l7r.proxy_protocol": "v2",
    "l7r.proxy_protocol.trusted": "unix",
    "l7r.timeout.handshake": "2",
    "l7r.timeout.first_request": "3",
    "l7r.timeout.request": "2",
    "l7r.limit.connections_per_address": String(PER_ADDRESS),
  };
  l7r = Bun.spawn(
    [
      binary,
      "l7r",
      "--config",
      "/dev/null",
      "--db",
      db().url,
      "--listen",
      "127.0.0.1:0",
      "--cert",
      join(dir, "cert.pem"),
      "--key",
      join(dir, "key.pem"),
      ...Object.entries(set).flatMap(([k, v]) => ["--set", `${k}=${v}`]),
    ],
    { stdout: "pipe", stderr: "pipe", env: cleanEnv() },
  );
  void (l7r.stderr as ReadableStream<Uint8Array>).pipeTo(
    new WritableStream({ write: (c) => void (log += Buffer.from(c).toString()) }),
  );
  const reader = (l7r.stdout as ReadableStream<Uint8Array>).getReader();
  let out = "";
  while (!/listening on [^\n]*:(\d+)\n/.test(out)) {
    const c = await reader.read();
    if (c.done) throw new Error(`qvd l7r exited: ${log}`);
    out += Buffer.from(c.value).toString();
  }
  port = Number(/listening on [^\n]*:(\d+)\n/.exec(out)![1]);
  reader.releaseLock();
  void (l7r.stdout as ReadableStream).pipeTo(new WritableStream());
}, 300_000);

afterAll(async () => {
  if (l7r && l7r.exitCode === null) {
    l7r.kill("SIGTERM");
    await l7r.exited;
  }
  rmSync(dir, { recursive: true, force: true });
});

describe("a stranger cannot exhaust the L7R", () => {
  test("one TLS connection, 40 pipelined bad logins then junk: the L7R stays under 256 MiB, answers 4xx or closes, and a bystander's ping is answered", async () => {
    const before = vmRss("VmRSS");
    const attacker = await Peer.open({ port });
    expect(await attacker.handshake()).toBe(true);
    let logins = "";
    for (let i = 0; i < 40; i++)
      logins += `GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: ${basic("alice", `wrong-${i}`)}\r\n\r\n`;
    attacker.write(logins);
    const junk = Buffer.alloc(256 * 1024, "GET /qvd/ping HTTP/1.1\r\nX-Junk: " + "j".repeat(200) + "\r\n");
    const flood = attacker.flood(junk, 1024 * MIB, 8000);
    let peak = 0;
    const sampler = setInterval(() => (peak = Math.max(peak, vmRss("VmRSS"))), 50);
    // A bystander, meanwhile: after 1.5 s of the flood (time under attack is the point; there is
    // no event to wait for).
    await Bun.sleep(1500);
    const bystander = await Peer.open({ port });
    expect(await bystander.handshake()).toBe(true);
    const pong = await ping(bystander);
    await flood;
    clearInterval(sampler);
    bystander.end();
    console.log(
      `attack: ${(attacker.sent / MIB).toFixed(1)} MiB sent; L7R RSS ${(before / MIB).toFixed(0)} MiB before, peak ${(peak / MIB).toFixed(0)} MiB (VmHWM ${(vmRss("VmHWM") / MIB).toFixed(0)} MiB); answers ${attacker.statuses().length}`,
    );
    expect(pong?.status).toBe(200);
    expect(pong?.body).toBe("I am alive!\r\n");
    expect(vmRss("VmHWM")).toBeLessThan(256 * MIB);
    const statuses = attacker.statuses();
    expect(attacker.closed || statuses.some((s) => s >= 400 && s < 500)).toBe(true);
    // Not vacuous: the bad logins were answered before anything closed the connection.
    expect(statuses.length).toBeGreaterThan(0);
    expect(statuses.every((s) => s < 500)).toBe(true);
    attacker.destroy();
    expect(l7r.exitCode).toBeNull();
  }, 60_000);

  test("a client pipelining 20,000 pings is slowed by backpressure, not refused: every ping answered in order, nothing over the input bound", async () => {
    const p = await Peer.open({ port });
    expect(await p.handshake()).toBe(true);
    const N = 20_000;
    const one = "GET /qvd/ping HTTP/1.1\r\n\r\n";
    const all = Buffer.from(one.repeat(N));
    await p.flood(all, all.length, 120_000);
    expect(p.sent).toBe(all.length);
    while (p.statuses().length < N && !(await p.closedWithin(0))) await p.wait(200);
    const st = p.statuses();
    expect(st.length).toBe(N);
    expect(st.every((s) => s === 200)).toBe(true);
    expect(vmRss("VmHWM")).toBeLessThan(256 * MIB);
    p.end();
  }, 180_000);

  test(`many connections from one address: the ${PER_ADDRESS + 1}th is refused, memory stays bounded, another address is served`, async () => {
    // Through the unix socket with PROXY headers: the attacker is 203.0.113.7, the bystander 203.0.113.8.
    const attackers: Peer[] = [];
    for (let i = 0; i < PER_ADDRESS; i++) {
      const p = await Peer.open({ unix: sock }, { preamble: header("203.0.113.7") });
      expect(await p.handshake()).toBe(true);
      attackers.push(p);
    }
    const extra = await Peer.open({ unix: sock }, { preamble: header("203.0.113.7") });
    expect(await extra.handshake(5000)).toBe(false);
    expect(await extra.closedWithin(5000)).toBe(true);
    // Every held connection floods junk at once.
    const junk = Buffer.alloc(64 * 1024, "X".repeat(100) + "\r\n");
    const floods = attackers.map((p) => {
      p.write("GET /qvd/list_of_vm HTTP/1.1\r\n");
      return p.flood(junk, 256 * MIB, 5000);
    });
    const bystander = await Peer.open({ unix: sock }, { preamble: header("203.0.113.8") });
    expect(await bystander.handshake()).toBe(true);
    expect((await ping(bystander))?.status).toBe(200);
    await Promise.all(floods);
    expect(vmRss("VmHWM")).toBeLessThan(256 * MIB);
    // Too much junk in one request head: 431 and closed (not buffered).
    for (const p of attackers) expect(await p.closedWithin(5000)).toBe(true);
    const refusals = attackers.flatMap((p) => p.statuses());
    expect(refusals.length).toBeGreaterThan(0); // not vacuous: the heads were answered, not just dropped
    expect(refusals.every((s) => s === 431)).toBe(true);
    // The slots are free again.
    const again = await Peer.open({ unix: sock }, { preamble: header("203.0.113.7") });
    expect(await again.handshake()).toBe(true);
    expect((await ping(again))?.status).toBe(200);
    again.end();
    bystander.end();
  }, 60_000);
});

describe("slow clients are closed at every stage", () => {
  test("a TCP connection that never starts TLS is closed after the handshake timeout", async () => {
    const p = await Peer.open({ port }, { tls: false });
    expect(await p.closedWithin(8000)).toBe(true);
  }, 15_000);

  test("a TLS client that sends nothing is closed after the first-request timeout", async () => {
    const p = await Peer.open({ port });
    expect(await p.handshake()).toBe(true);
    expect(await p.closedWithin(10_000)).toBe(true);
  }, 15_000);

  test("one byte of a request head, then nothing: 408 and closed after the request timeout", async () => {
    const p = await Peer.open({ port });
    expect(await p.handshake()).toBe(true);
    p.write("G");
    expect(await p.closedWithin(10_000)).toBe(true);
    expect(p.statuses()).toEqual([408]);
  }, 15_000);

  test("half a PROXY header on the trusted socket, then nothing: closed after the handshake timeout", async () => {
    const p = await Peer.open({ unix: sock }, { preamble: header("203.0.113.9").subarray(0, 10), tls: false });
    expect(await p.closedWithin(8000)).toBe(true);
  }, 15_000);
});

describe("PROXY protocol v2", () => {
  test("the header from the trusted unix socket sets the client's address: it is the one audited for a failed login", async () => {
    // Only its owner may connect to the socket that may speak for any address.
    expect(statSync(sock).mode & 0o777).toBe(0o600);
    const p = await Peer.open({ unix: sock }, { preamble: header("203.0.113.42") });
    expect(await p.handshake()).toBe(true);
    p.write(`GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: ${basic("proxied-one", "not-her-password")}\r\n\r\n`);
    expect((await p.response())?.status).toBe(401);
    p.end();
    const rows = await db()
      .sql`SELECT address FROM audit_log WHERE action = 'user.login' AND source = 'l7r' AND NOT ok ORDER BY id DESC LIMIT 1`;
    expect(rows[0]?.address).toBe("203.0.113.42");
    // IPv6 too.
    const q = await Peer.open(
      { unix: sock },
      { preamble: proxyHeader({ address: "2001:db8::5", port: 1 }, { address: "2001:db8::1", port: 8443 }) },
    );
    expect(await q.handshake()).toBe(true);
    q.write(`GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: ${basic("proxied-two", "still-not-it")}\r\n\r\n`);
    expect((await q.response())?.status).toBe(401);
    q.end();
    const v6 = await db()
      .sql`SELECT address FROM audit_log WHERE action = 'user.login' AND source = 'l7r' AND NOT ok ORDER BY id DESC LIMIT 1`;
    expect(v6[0]?.address).toBe("2001:db8::5");
  }, 30_000);

  test("a header from an untrusted source (TCP) is refused: the connection is closed", async () => {
    const p = await Peer.open({ port }, { preamble: header("203.0.113.66") });
    expect(await p.handshake(5000)).toBe(false);
    expect(await p.closedWithin(5000)).toBe(true);
  }, 15_000);

  test("the trusted socket without a header, or with a malformed one, is refused", async () => {
    const bad: [string, Uint8Array][] = [];
    const h = header("203.0.113.5");
    const mut = (f: (b: Uint8Array) => void) => {
      const b = Uint8Array.from(h);
      f(b);
      return b;
    };
    bad.push(["no header (TLS at once)", new Uint8Array(0)]);
    bad.push(["a broken signature", mut((b) => (b[5] = 0x41))]);
    bad.push(["version 1", mut((b) => (b[12] = 0x11))]);
    bad.push(["an unknown command", mut((b) => (b[12] = 0x2f))]);
    bad.push(["an unknown family", mut((b) => (b[13] = 0x51))]);
    bad.push(["a datagram transport", mut((b) => (b[13] = 0x12))]);
    bad.push(["an address block shorter than IPv4's", mut((b) => (b[15] = 4))]);
    bad.push(["a length over the bound", mut((b) => ((b[14] = 0xff), (b[15] = 0xff)))]);
    bad.push(["the text PROXY v1 header", new TextEncoder().encode("PROXY TCP4 203.0.113.5 127.0.0.1 40000 8443\r\n")]);
    for (const [what, preamble] of bad) {
      const p = await Peer.open({ unix: sock }, preamble.length ? { preamble } : {});
      expect(await p.handshake(5000), what).toBe(false);
      expect(await p.closedWithin(5000), what).toBe(true);
    }
    // A LOCAL header (the relay's own health check) is accepted.
    const local = Uint8Array.from([...SIGNATURE, 0x20, 0x00, 0x00, 0x00]);
    const ok = await Peer.open({ unix: sock }, { preamble: local });
    expect(await ok.handshake()).toBe(true);
    expect((await ping(ok))?.status).toBe(200);
    ok.end();
    expect(l7r.exitCode).toBeNull();
  }, 60_000);
});

describe("PROXY protocol v2 from trusted networks (the TCP listener)", () => {
  let inproc: L7r;
  beforeAll(async () => {
    await D.create(db().sql, D.hosts, ALL, { name: "sec-l7r-net", address: "127.0.0.2" });
    await db()
      .sql`UPDATE host_runtimes SET state = 'running' WHERE host_id = (SELECT id FROM hosts WHERE name = 'sec-l7r-net')`;
    inproc = await startL7r({
      sql: db().sql,
      databaseUrl: db().url,
      nodename: "sec-l7r-net",
      hostname: "127.0.0.1",
      port: 0,
      tls: { cert: join(dir, "cert.pem"), key: join(dir, "key.pem") },
      proxyProtocol: trustedSources("127.0.0.0/8"),
    });
  });
  afterAll(async () => {
    await inproc?.stop();
  });

  test("from 127.0.0.0/8 a header is required and names the client; without one the connection is refused", async () => {
    const p = await Peer.open({ port: inproc.port }, { preamble: header("198.51.100.23") });
    expect(await p.handshake()).toBe(true);
    p.write(`GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: ${basic("proxied-three", "nope")}\r\n\r\n`);
    expect((await p.response())?.status).toBe(401);
    p.end();
    const rows = await db()
      .sql`SELECT address FROM audit_log WHERE action = 'user.login' AND object_name = 'default/proxied-three' ORDER BY id DESC LIMIT 1`;
    expect(rows[0]?.address).toBe("198.51.100.23");
    const bare = await Peer.open({ port: inproc.port });
    expect(await bare.handshake(5000)).toBe(false);
    expect(await bare.closedWithin(5000)).toBe(true);
    await poll(() => inproc.load().connections === 0, 5000);
    expect(inproc.load().connections).toBe(0);
  }, 30_000);
});
