// Fuzzing the L7R's request reader (src/nx/http.ts) and a live L7R. Inputs are generated (QVD
// requests in the dialects the clients use) and mutated (flipped, inserted, deleted, repeated
// bytes, long lines, many headers), from a seed printed in the output (QVD_FUZZ_SEED replays a
// run). The reader, fed in random chunk boundaries: nothing but HttpParseError is thrown, it
// never holds more than one request head's worth, and the chunking changes nothing. The live
// L7R: no 5xx, it keeps serving.
import { afterAll, beforeAll, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import * as D from "../src/db/index.ts";
import { createUserToken } from "../src/db/tokens.ts";
import { startL7r, type L7r } from "../src/l7r/server.ts";
import { MAX_HEADER, parseProxyHeader, proxyHeader, ProxyHeaderError } from "../src/l7r/proxy-protocol.ts";
import { HttpParseError, RequestReader, type ReaderLimits } from "../src/nx/http.ts";
import { useTestDatabase } from "./support/db.ts";
import { Peer } from "./support/l7r-peer.ts";
import { fuzzSeed, seededRng, type Rng } from "./support/fuzz.ts";
import { poll } from "./support/wait.ts";
import { selfSignedCert } from "./support/tls.ts";

const SEED = fuzzSeed("l7r", 0x5eed1);

const PATHS = [
  "/qvd/ping",
  "/qvd/list_of_vm",
  "/qvd/list_of_applications",
  "/qvd/connect_to_vm",
  "/qvd/stop_vm",
  "/qvd/authenticate_user",
  "/qvd/create_auth_token",
  "/",
  "/qvd/",
  "*",
  "/qvd/ping/../list_of_vm",
  "http://x/qvd/ping",
];
const QUERY_VALUES = [
  "1",
  "0",
  "-1",
  "99999999999999999999",
  "1e3",
  "0x10",
  "abc",
  "%00",
  "%zz",
  "%2F..%2F",
  "a+b",
  "",
  "NaN",
  "1.5",
  "2147483648",
  "'; DROP TABLE vms; --",
];
const QUERY_KEYS = [
  "id",
  "vm_id",
  "qvd.client.os",
  "qvd.client.link",
  "qvd.client.keyboard",
  "qvd.client.geometry",
  "custom.x",
  "qvd.vm.user.home",
  "x",
  "",
];
const HEADERS = [
  "Authorization",
  "authorization",
  "Connection",
  "Upgrade",
  "User-Agent",
  "Accept",
  "Content-Length",
  "Transfer-Encoding",
  "Host",
  "X-Forwarded-For",
];
/** A valid bearer token of alice (set before the live test): the cases reach past authentication. */
let validToken = "";
const AUTH = () => [
  `Bearer ${Buffer.from(validToken).toString("base64")}`,
  `Bearer ${Buffer.from(validToken).toString("base64")}`,
  `Basic ${Buffer.from("alice:wrong").toString("base64")}`,
  `Basic ${Buffer.from("nobody@nowhere:x").toString("base64")}`,
  `Basic ${Buffer.from(":").toString("base64")}`,
  `Basic ${Buffer.from("@:").toString("base64")}`,
  "Basic !!!notbase64",
  "Bearer " + Buffer.from("not-a-token").toString("base64"),
  "Bearer ",
  "Basic",
  "Digest x",
];

function generate(r: Rng): string {
  const eol = r.pick(["\r\n", "\n", "\r\n", "\r\n"]);
  let out = r.int(4) === 0 ? eol.repeat(1 + r.int(3)) : "";
  const n = 1 + r.int(3);
  for (let i = 0; i < n; i++) {
    const q = Array.from({ length: r.int(4) }, () => `${r.pick(QUERY_KEYS)}=${r.pick(QUERY_VALUES)}`).join("&");
    const method = r.pick(["GET", "GET", "GET", "POST", "HEAD", "get", "G\u00e9T"]);
    const version = r.pick(["HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 ", ""]);
    out += `${method} ${r.pick(PATHS)}${q || r.int(3) === 0 ? `?${q}` : ""} ${version}${eol}`;
    const hn = r.int(5);
    for (let h = 0; h < hn; h++) {
      const name = r.pick(HEADERS);
      const value =
        name.toLowerCase() === "authorization"
          ? r.pick(AUTH())
          : r.pick(["Upgrade", "QVD/1.0", "close", "5", "chunked", "x", ""]);
      out += `${name}:${r.int(2) ? " " : ""}${value}${eol}`;
      if (r.int(10) === 0) out += ` folded${eol}`;
    }
    out += eol;
  }
  return out;
}

/** A well-formed request with alice's token and hostile parameters: reaches the handlers' own checks. */
function deep(r: Rng): string {
  const path = r.pick(["/qvd/connect_to_vm", "/qvd/stop_vm", "/qvd/create_auth_token", "/qvd/list_of_vm"]);
  const q = Array.from(
    { length: 1 + r.int(3) },
    () => `${r.pick(["id", "id", "vm_id", ...QUERY_KEYS])}=${r.pick(QUERY_VALUES)}`,
  ).join("&");
  return `GET ${path}?${q} HTTP/1.1\r\nAuthorization: Bearer ${Buffer.from(validToken).toString("base64")}\r\nConnection: Upgrade\r\nUpgrade: QVD/1.0\r\n\r\n`;
}

function mutate(r: Rng, s: Uint8Array): Uint8Array {
  const b = Array.from(s);
  const ops = 1 + r.int(4);
  for (let i = 0; i < ops; i++) {
    const at = r.int(b.length + 1);
    switch (r.int(8)) {
      case 0: // flip a bit
        if (b.length) b[Math.min(at, b.length - 1)]! ^= 1 << r.int(8);
        break;
      case 1: // insert a random byte (often a special one)
        b.splice(at, 0, r.pick([0, 10, 13, 32, 58, 9, 0xff, 0x80, r.int(256)]));
        break;
      case 2: // delete a run
        b.splice(at, 1 + r.int(8));
        break;
      case 3: // repeat a run
        b.splice(at, 0, ...b.slice(at, at + 1 + r.int(16)));
        break;
      case 4: // a long line
        b.splice(at, 0, ...Array(r.pick([100, 5000, 9000, 40000])).fill(r.pick([65, 32, 58])));
        break;
      case 5: // many header lines
        b.splice(at, 0, ...Buffer.from("X-A: b\r\n".repeat(r.pick([50, 101, 500]))));
        break;
      case 6: // truncate
        b.length = at;
        break;
      default: // random bytes
        b.splice(at, 0, ...Array.from({ length: 1 + r.int(32) }, () => r.int(256)));
    }
  }
  return Uint8Array.from(b);
}

/** Splits bytes into random chunks (single bytes sometimes). */
function chunks(r: Rng, b: Uint8Array): Uint8Array[] {
  const out: Uint8Array[] = [];
  for (let i = 0; i < b.length; ) {
    const n = r.int(3) === 0 ? 1 : 1 + r.int(Math.max(1, Math.min(b.length - i, 4096)));
    out.push(b.subarray(i, i + n));
    i += n;
  }
  return out;
}

type Outcome = string;
/** Feeds chunks; returns what the reader made of them (requests and the error that ended it). */
function read(limits: Partial<ReaderLimits>, parts: Uint8Array[], maxHeld: { v: number }, bound: number): Outcome[] {
  const r = new RequestReader(limits);
  const out: Outcome[] = [];
  for (const p of parts) {
    r.push(p);
    for (;;) {
      let req;
      try {
        req = r.next();
      } catch (e) {
        if (!(e instanceof HttpParseError)) throw e;
        out.push(`error ${e.status}`);
        return out;
      }
      if (!req) break;
      out.push(`${req.method} ${req.target} ${JSON.stringify([...req.headers])} ${JSON.stringify(req.query)}`);
    }
    maxHeld.v = Math.max(maxHeld.v, r.buffered);
    if (r.buffered > bound) throw new Error(`reader holds ${r.buffered} bytes after next() (bound ${bound})`);
  }
  return out;
}

test("request reader: 12,000 generated and mutated inputs in random chunks: only HttpParseError, bounded, chunking changes nothing", () => {
  const r = seededRng(SEED);
  const limits = { maxRequestLine: 1024, maxHeaderBytes: 4096, maxHeaders: 100 };
  const bound = limits.maxRequestLine + limits.maxHeaderBytes + 2;
  const held = { v: 0 };
  const statuses = new Map<string, number>();
  for (let i = 0; i < 12_000; i++) {
    const base = new TextEncoder().encode(generate(r));
    const input = i % 4 === 0 ? base : mutate(r, base);
    let whole: Outcome[];
    let split: Outcome[];
    try {
      whole = read(limits, [input], { v: 0 }, Infinity);
      split = read(limits, chunks(r, input), held, bound);
    } catch (e) {
      throw new Error(
        `case ${i} (seed ${SEED}): ${(e as Error).stack}\ninput: ${JSON.stringify(Buffer.from(input).toString("latin1").slice(0, 500))}`,
      );
    }
    // Chunks may end early (a request incomplete at the end looks the same), never differently.
    expect(split, `case ${i} (seed ${SEED})`).toEqual(whole);
    const last = whole.at(-1) ?? "none";
    const k = last.startsWith("error") ? last : "request";
    statuses.set(k, (statuses.get(k) ?? 0) + 1);
  }
  console.log(`reader: ${[...statuses].map(([k, n]) => `${k}: ${n}`).join(", ")}; most bytes held: ${held.v}`);
  // The mix reached parse errors and complete requests alike.
  expect(statuses.get("request") ?? 0).toBeGreaterThan(1000);
  expect([...statuses.keys()].filter((k) => k.startsWith("error")).length).toBeGreaterThanOrEqual(3);
});

// --- the live L7R ---------------------------------------------------------------------------

const db = useTestDatabase();
const dir = mkdtempSync("/tmp/qvd-l7r-fuzz-");
let l7r: L7r;

beforeAll(async () => {
  const sql = db().sql;
  await selfSignedCert(dir);
  const host = await D.create(sql, D.hosts, D.ALL_TENANTS, { name: "fuzz-l7r", address: "127.0.0.1" });
  await sql`UPDATE host_runtimes SET state = 'running' WHERE host_id = ${host.id}`;
  const alice = await D.create(sql, D.users, D.ALL_TENANTS, { tenant_id: 1, name: "alice", password: "alice-pw-1" });
  const osf = await D.create(sql, D.osfs, D.ALL_TENANTS, { tenant_id: 1, name: "desk", memory_mb: 128 });
  await D.createVm(
    sql,
    D.ALL_TENANTS,
    { user_id: alice.id, osf_id: osf.id, name: "alice-1" },
    { range: "198.18.0.0/16" },
  );
  validToken = (await createUserToken(sql, D.ALL_TENANTS, { userId: alice.id, ttlSeconds: 3600, multiUse: true }))
    .token;
  l7r = await startL7r({
    sql,
    databaseUrl: db().url,
    nodename: "fuzz-l7r",
    hostname: "127.0.0.1",
    port: 0,
    tls: { cert: join(dir, "cert.pem"), key: join(dir, "key.pem") },
    timeouts: { request: 1, firstRequest: 2 },
    limits: { maxHeaderBytes: 8192, maxRequestLine: 2048 },
  });
});

afterAll(async () => {
  await l7r?.stop();
  rmSync(dir, { recursive: true, force: true });
});

test("a live L7R: 2,500 fuzzed connections, never a 5xx (but 505 for another HTTP version), and it keeps answering", async () => {
  const r = seededRng(SEED ^ 0x9e3779b9);
  const seen = new Map<number, number>();
  const bad: string[] = [];
  let silent = 0; // connections closed without an answer
  const N = 2500;
  let next = 0;
  const one = async (i: number, input: Uint8Array) => {
    const p = await Peer.open({ port: l7r.port });
    if (!(await p.handshake())) throw new Error(`case ${i}: no TLS handshake`);
    for (const c of chunks(r, input)) p.write(c);
    // A ping after it: answered unless the case closed the connection (or left a header open).
    p.write("\r\n\r\nGET /qvd/ping HTTP/1.1\r\n\r\n");
    const end = Date.now() + 15_000;
    while (!p.closed && !p.got.includes("I am alive!") && Date.now() < end) await p.wait(50);
    // Whatever came back starts with a well-formed status line (version, 3-digit code, reason, CRLF).
    const text = p.got.toString("latin1");
    if (!text) silent++;
    else if (!/^HTTP\/1\.1 [1-5]\d\d [^\r\n]*\r\n/.test(text))
      bad.push(`case ${i}: not an HTTP status line: ${JSON.stringify(text.slice(0, 120))}`);
    for (const s of p.statuses()) {
      seen.set(s, (seen.get(s) ?? 0) + 1);
      // 505 is the protocol's answer to another HTTP version (src/nx/http.ts), not a failure.
      // 503 is connect_to_vm's answer when no node can run the desktop (none runs here).
      const unavailable =
        s === 503 && p.got.toString("latin1").includes("The requested virtual machine is not available");
      if (s >= 500 && s !== 505 && !unavailable)
        bad.push(
          `case ${i}: ${s} for ${JSON.stringify(Buffer.from(input).toString("latin1").slice(0, 300))}: ${p.got.toString("latin1").slice(0, 300)}`,
        );
    }
    p.destroy();
  };
  const inputs = Array.from({ length: N }, (_, i) => {
    if (i % 4 === 1) return new TextEncoder().encode(deep(r));
    const base = new TextEncoder().encode(generate(r));
    return i % 4 === 0 ? base : mutate(r, base);
  });
  const worker = async () => {
    while (next < N) {
      const i = next++;
      await one(i, inputs[i]!);
    }
  };
  await Promise.all(Array.from({ length: 8 }, worker));
  console.log(
    `live L7R: statuses ${[...seen]
      .sort((a, b) => a[0] - b[0])
      .map(([s, n]) => `${s}×${n}`)
      .join(" ")}; ${silent} closed without an answer`,
  );
  expect(bad).toEqual([]);
  // Nearly every connection got an answer (a status line), not a silent close.
  expect(silent).toBeLessThan(N / 10);
  const p = await Peer.open({ port: l7r.port });
  expect(await p.handshake()).toBe(true);
  p.write("GET /qvd/ping HTTP/1.1\r\n\r\n");
  expect((await p.response())?.status).toBe(200);
  p.destroy();
  // Every connection counted in was counted out (no slot leaks towards the per-address limit).
  await poll(() => l7r.load().connections === 0, 5000);
  expect(l7r.load()).toEqual({ connections: 0, byAddress: {} });
}, 600_000);

test("PROXY v2 parser: 10,000 mutated headers in random prefixes: only ProxyHeaderError, never past its bound, addresses well-formed", () => {
  const r = seededRng(SEED ^ 0x51ed);
  const bases = [
    proxyHeader({ address: "203.0.113.7", port: 1234 }, { address: "127.0.0.1", port: 8443 }),
    proxyHeader({ address: "2001:db8::7", port: 1 }, { address: "::1", port: 8443 }),
    proxyHeader({ address: "", port: 0 }, { address: "", port: 0 }),
  ];
  let ok = 0;
  let refused = 0;
  for (let i = 0; i < 10_000; i++) {
    const input = i % 5 === 0 ? r.pick(bases) : mutate(r, r.pick(bases));
    // Any prefix (a header arriving in pieces): undefined, a header, or ProxyHeaderError.
    const cut = r.int(input.length + 1);
    for (const b of [input.subarray(0, cut), input]) {
      try {
        const h = parseProxyHeader(b);
        if (!h) continue;
        expect(h.length).toBeLessThanOrEqual(Math.min(b.length, MAX_HEADER));
        expect(h.address === "" || /^(\d{1,3}\.){3}\d{1,3}$|^[0-9a-f:]+$/.test(h.address)).toBe(true);
        ok++;
      } catch (e) {
        if (!(e instanceof ProxyHeaderError)) throw new Error(`case ${i} (seed ${SEED}): ${(e as Error).stack}`);
        refused++;
      }
    }
  }
  console.log(`PROXY parser: ${ok} headers, ${refused} refused`);
  expect(ok).toBeGreaterThan(1000);
  expect(refused).toBeGreaterThan(1000);
});
