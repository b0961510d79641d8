// The farm's node-to-node endpoint (src/l7r/peer.ts) and its certificates (src/farm/certs.ts),
// attacked from "another machine on the farm network": a client without a certificate, with
// another CA's, with a farm certificate of no node, asking for desktops that are not on the
// node or not in its session, for VMA methods beyond the two the connect path needs, for
// other ports. Node A's endpoint runs in this process over the test database; its desktop's
// VMA is the real VMA server (src/vma/server.ts) on 127.0.0.1, and the stand-ins for nxagent
// and for a desktop of another node are plain TCP listeners that count what reaches them.
// Then `qvd l7r` and `qvd node` refuse to start without this node's farm certificate.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { X509Certificate } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { join } from "node:path";
import type { Socket, TCPSocketListener } from "bun";
import * as D from "../src/db/index.ts";
import { checkNodeTls, createFarmCa, issueNodeCert } from "../src/farm/certs.ts";
import { PeerClient, startPeerServer, UNPROVEN_PER_ADDRESS, type PeerServer } from "../src/l7r/peer.ts";
import { VmaError } from "../src/hkd/vma-client.ts";
import { startVmaServer } from "../src/vma/server.ts";
import { run } from "../src/run.ts";
import { useTestDatabase } from "./support/db.ts";
import { cleanEnv, farmCaDir, farmCert, type FarmCert } from "./support/node.ts";
import { poll } from "./support/wait.ts";
import { capture } from "./support/spawn.ts";
import { testSession } from "./support/vma-session.ts";

const db = useTestDatabase();
const ALL = D.ALL_TENANTS;
const SECRET = "vma-secret-of-this-start-0123456789abcdef";
const dir = mkdtempSync("/tmp/qvd-farm-peer-");
const SESSION_B = "6f1c1d52-3c1e-4a43-9d55-0c7f4b8a0001";
const SESSION_OTHER = "6f1c1d52-3c1e-4a43-9d55-0c7f4b8a0002";

let server: PeerServer;
let vma: ReturnType<typeof startVmaServer>;
let hosts: Record<"a" | "b" | "c", D.HostRow>;
let certs: Record<"a" | "b" | "c" | "stranger", FarmCert>;
let foreign: { ca: string; cert: string; key: string };
let vmHere: D.VmRow;
let vmThere: D.VmRow;
/** A stand-in nxagent (echoes, counts connections) and a desktop of another node (counts). */
const reached = { agent: 0, elsewhere: 0 };
let agent: TCPSocketListener;
let elsewhere: TCPSocketListener;

const clientOf = (c: FarmCert | { ca: string; cert: string; key: string }) =>
  new PeerClient({ tls: { ca: c.ca, cert: c.cert, key: c.key }, port: server.port, connectS: 3 });
const nodeA = () => ({ name: hosts.a.name, address: "127.0.0.1" });
/** Node A's node-to-node endpoint on a free loopback port, with these timeouts and limit. */
const nodeAServer = (o: { timeouts: { handshake: number; request?: number }; maxConnections: number }) =>
  startPeerServer({ sql: db().sql, nodename: "peer-a", hostname: "127.0.0.1", port: 0, tls: certs.a, ...o });

/** Raw TLS to node A's endpoint: what it answers to `request` (empty when it closed without an answer). */
async function raw(
  tls: Record<string, unknown>,
  request: string | Uint8Array,
  waitMs = 3000,
): Promise<{ answer: string; closed: boolean }> {
  let answer = "";
  let closed = false;
  let done!: () => void;
  const over = new Promise<void>((r) => (done = r));
  const s = await Bun.connect({
    hostname: "127.0.0.1",
    port: server.port,
    tls: { ...tls, rejectUnauthorized: false },
    socket: {
      handshake(sock: Socket, ok: boolean) {
        if (ok) sock.write(request);
      },
      data(_s: Socket, c: Uint8Array) {
        answer += Buffer.from(c).toString("latin1");
        if (/\r\n\r\n/.test(answer)) done();
      },
      close() {
        closed = true;
        done();
      },
      error() {
        closed = true;
        done();
      },
    },
  } as any).catch(() => undefined);
  await Promise.race([over, Bun.sleep(waitMs)]);
  s?.end();
  return { answer, closed };
}

const tlsOf = (c: { ca: string; cert: string; key: string }) => ({
  ca: Bun.file(c.ca),
  cert: Bun.file(c.cert),
  key: Bun.file(c.key),
});

beforeAll(async () => {
  const sql = db().sql;
  const mk = async (name: string, address: string) => D.create(sql, D.hosts, ALL, { name, address });
  hosts = {
    a: await mk("peer-a", "127.0.0.1"),
    b: await mk("peer-b", "127.0.0.3"),
    c: await mk("peer-c", "127.0.0.4"),
  };
  certs = {
    a: await farmCert("peer-a", "127.0.0.1"),
    b: await farmCert("peer-b", "127.0.0.3"),
    c: await farmCert("peer-c", "127.0.0.4"),
    stranger: await farmCert("not-a-node", "127.0.0.1"),
  };
  // Another farm's CA, and a certificate it gave to a name that is a node of ours.
  await createFarmCa(join(dir, "other-ca"));
  const f = await issueNodeCert({
    caDir: join(dir, "other-ca"),
    name: "peer-b",
    address: "127.0.0.3",
    outDir: join(dir, "foreign"),
  });
  foreign = { ca: join(dir, "other-ca", "ca.crt"), ...f };

  agent = Bun.listen({
    hostname: "127.0.0.1",
    port: 0,
    socket: { open: () => void reached.agent++, data: (s, c) => void s.write(c) },
  });
  elsewhere = Bun.listen({
    hostname: "127.0.0.2",
    port: 0,
    socket: { open: () => void reached.elsewhere++, data() {} },
  });

  // The real VMA of node A's desktop, answering node A (127.0.0.1) with its secret only.
  const session = testSession({
    display: 99,
    tolerancechecks: "strict",
    sessionCommand: [],
    asCurrentUser: true,
    root: "/",
    homePath: dir,
    runDir: join(dir, "vma-run"),
    timeouts: { starting: 10_000, listening: 10_000, suspending: 10_000, stopping: 10_000 },
  });
  vma = startVmaServer(
    { secret: SECRET, nodeAddress: "127.0.0.1", vmId: 1, session, expireCommand: "", powerOff: () => {} },
    "127.0.0.1",
    0,
  );

  const user = await D.create(sql, D.users, ALL, { tenant_id: 1, name: "pia", password: "pia-pw-1" });
  const osf = await D.create(sql, D.osfs, ALL, { tenant_id: 1, name: "desk" });
  vmHere = await D.createVm(sql, ALL, { user_id: user.id, osf_id: osf.id, name: "here" }, { range: "198.18.0.0/16" });
  vmThere = await D.createVm(sql, ALL, { user_id: user.id, osf_id: osf.id, name: "there" }, { range: "198.18.0.0/16" });
  // VM "here" runs on node A, its session held by node B's L7R; VM "there" runs on node C (in node B's session too).
  await sql`UPDATE vm_runtimes SET host_id = ${hosts.a.id}, vm_state = 'running', vm_address = '127.0.0.1', vma_port = ${vma.port!}, x_port = ${agent.port},
      vma_secret = ${SECRET}, user_state = 'connecting', l7r_host_id = ${hosts.b.id}, l7r_session = ${SESSION_B}::uuid WHERE vm_id = ${vmHere.id}`;
  await sql`UPDATE vm_runtimes SET host_id = ${hosts.c.id}, vm_state = 'running', vm_address = '127.0.0.2', vma_port = ${elsewhere.port}, x_port = ${elsewhere.port},
      vma_secret = 'secret-of-another-node', user_state = 'connecting', l7r_host_id = ${hosts.b.id}, l7r_session = ${SESSION_OTHER}::uuid WHERE vm_id = ${vmThere.id}`;
  server = nodeAServer({ timeouts: { handshake: 2, request: 2 }, maxConnections: 8 });
});

afterAll(async () => {
  server?.stop();
  vma?.stop(true);
  agent?.stop(true);
  elsewhere?.stop(true);
  rmSync(dir, { recursive: true, force: true });
});

describe("qvd farm: the CA and node certificates", () => {
  test("the CA key is 0600 and never overwritten; a node certificate names the node (CN, SANs), serves both TLS ends, and is signed by the CA", async () => {
    const caDir = join(await farmCaDir(), "ca");
    expect(statSync(join(caDir, "ca.key")).mode & 0o777).toBe(0o600);
    expect(statSync(certs.a.key).mode & 0o777).toBe(0o600);
    await expect(createFarmCa(caDir)).rejects.toThrow(/never overwritten/);
    const x = new X509Certificate(readFileSync(certs.a.cert));
    const ca = new X509Certificate(readFileSync(certs.a.ca));
    expect(x.subject).toBe("CN=peer-a");
    expect(x.subjectAltName).toBe("DNS:peer-a, IP Address:127.0.0.1");
    expect(x.ca).toBe(false);
    expect(ca.ca).toBe(true);
    expect(x.verify(ca.publicKey)).toBe(true);
    const text = (await run(["openssl", "x509", "-in", certs.a.cert, "-noout", "-text"])).stdout;
    expect(text).toContain("TLS Web Server Authentication, TLS Web Client Authentication");
    expect(text).toContain("prime256v1");
    // A name that would smuggle subject fields or options is refused.
    await expect(
      issueNodeCert({ caDir, name: "a/CN=b", address: "127.0.0.1", outDir: join(dir, "bad") }),
    ).rejects.toThrow(/node name/);
    await expect(
      issueNodeCert({ caDir, name: "ok", address: "1.2.3.4,DNS:evil", outDir: join(dir, "bad") }),
    ).rejects.toThrow(/--address/);
  });
});

describe("qvd farm, the command", () => {
  const qvd = async (...args: string[]) => {
    const r = await capture([process.execPath, "src/main.ts", "farm", ...args], { env: cleanEnv() });
    return { ...r, stderr: r.stderr.trim() };
  };

  test("ca makes a CA once; cert issues a node's certificate the node accepts, and replaces it only with --force", async () => {
    const ca = join(dir, "cli-ca");
    expect((await qvd("ca", "--dir", ca)).code).toBe(0);
    expect(statSync(join(ca, "ca.key")).mode & 0o777).toBe(0o600);
    const again = await qvd("ca", "--dir", ca);
    expect(again.code).toBe(1);
    expect(again.stderr).toBe(
      `qvd: ${join(ca, "ca.crt")} exists: a farm CA is never overwritten (remove it yourself to start a new farm)`,
    );
    const out = join(dir, "cli-node");
    const made = await qvd(
      "cert",
      "--ca-dir",
      ca,
      "--name",
      "node7",
      "--address",
      "10.1.2.3",
      "--out",
      out,
      "--days",
      "30",
    );
    expect(made.code, made.stderr).toBe(0);
    expect(made.stdout).toContain(`cluster.tls.cert = ${join(out, "node.crt")}`);
    const x = new X509Certificate(readFileSync(join(out, "node.crt")));
    expect(x.subjectAltName).toBe("DNS:node7, IP Address:10.1.2.3");
    expect(new Date(x.validTo).getTime() - Date.now()).toBeLessThan(31 * 86400_000);
    expect(
      checkNodeTls({
        ca: join(ca, "ca.crt"),
        cert: join(out, "node.crt"),
        key: join(out, "node.key"),
        nodename: "node7",
      }).name,
    ).toBe("node7");
    const twice = await qvd("cert", "--ca-dir", ca, "--name", "node7", "--address", "10.1.2.3", "--out", out);
    expect(twice.code).toBe(1);
    expect(twice.stderr).toContain("give --force to replace it");
    expect(
      (await qvd("cert", "--ca-dir", ca, "--name", "node7", "--address", "10.1.2.3", "--out", out, "--force")).code,
    ).toBe(0);
  }, 60_000);
});

describe("who may speak to the endpoint", () => {
  const ping = `GET /vma/x_state?vm=1&session=${SESSION_B} HTTP/1.1\r\n\r\n`;

  test("no client certificate: refused in the handshake, nothing answered", async () => {
    const r = await raw({ ca: Bun.file(certs.a.ca) }, ping);
    expect(r.answer).toBe("");
    expect(r.closed).toBe(true);
  });

  test("a certificate of another CA (even naming a node of the farm): refused in the handshake", async () => {
    const r = await raw(tlsOf(foreign), ping);
    expect(r.answer).toBe("");
    expect(r.closed).toBe(true);
    await expect(clientOf(foreign).vma(nodeA(), vmHere.id, SESSION_B, "x_state", undefined, 2000)).rejects.toThrow(
      VmaError,
    );
  });

  test("a farm certificate whose CN is no node: closed before any request is read", async () => {
    const r = await raw(tlsOf(certs.stranger), ping);
    expect(r.answer).toBe("");
    expect(r.closed).toBe(true);
  });

  test("a lost node's certificate: closed until it rejoins", async () => {
    await db().sql`UPDATE host_runtimes SET state = 'lost' WHERE host_id = ${hosts.c.id}`;
    try {
      const r = await raw(tlsOf(certs.c), ping);
      expect(r.answer).toBe("");
      expect(r.closed).toBe(true);
    } finally {
      await db().sql`UPDATE host_runtimes SET state = 'stopped' WHERE host_id = ${hosts.c.id}`;
    }
  });

  test("the caller checks the endpoint too: node A's address answering with another node's certificate is refused", async () => {
    const b = clientOf(certs.b);
    await expect(
      b.vma({ name: "peer-c", address: "127.0.0.1" }, vmHere.id, SESSION_B, "x_state", undefined, 2000),
    ).rejects.toThrow(/cannot reach node peer-c at 127\.0\.0\.1:\d+: .*(altnames|does not match)/);
    b.close();
  });
});

describe("what a node may ask for", () => {
  test("x_state of a desktop of this node in the caller's session: the VMA's answer, without the caller knowing the secret", async () => {
    const b = clientOf(certs.b);
    await poll(() => server.connections() === 0, 10_000, 20); // the earlier tests' connections are gone
    const st = await b.vma<{ state: string }>(nodeA(), vmHere.id, SESSION_B, "x_state", undefined, 3000);
    expect(st.state).toBe("stopped");
    // The same kept-alive connection serves the next call.
    expect(server.connections()).toBe(1);
    expect((await b.vma<{ state: string }>(nodeA(), vmHere.id, SESSION_B, "x_state", undefined, 3000)).state).toBe(
      "stopped",
    );
    expect(server.connections()).toBe(1);
    // x_start's body reaches the VMA, whose refusal comes back with its status.
    const err = await b
      .vma<never>(nodeA(), vmHere.id, SESSION_B, "x_start", { user: "x", bogus: 1 }, 3000)
      .catch((e: unknown) => e as VmaError);
    expect(err).toBeInstanceOf(VmaError);
    expect(err.status).toBe(422);
    // A large body (more than a TLS record, more than the VMA takes) arrives whole: the VMA's own 413.
    const large = await b
      .vma<never>(nodeA(), vmHere.id, SESSION_B, "x_start", { user: "x", pad: "a".repeat(200_000) }, 3000)
      .catch((e: unknown) => e as VmaError);
    expect(large.status).toBe(413);
    b.close();
  });

  test("a desktop that is not on this node, or not in the caller's session: 404, and nothing reaches it", async () => {
    const b = clientOf(certs.b);
    const c = clientOf(certs.c);
    const before = { ...reached };
    const notHere = await b
      .vma<never>(nodeA(), vmThere.id, SESSION_OTHER, "x_state", undefined, 3000)
      .catch((e: unknown) => e as VmaError);
    expect(notHere.status).toBe(404);
    // Node C (a real node) asking for node B's session of a desktop on node A.
    const notYours = await c
      .vma<never>(nodeA(), vmHere.id, SESSION_B, "x_state", undefined, 3000)
      .catch((e: unknown) => e as VmaError);
    expect(notYours.status).toBe(404);
    // Node B with a session id that is not the desktop's.
    const wrongSession = await b
      .vma<never>(nodeA(), vmHere.id, SESSION_OTHER, "x_state", undefined, 3000)
      .catch((e: unknown) => e as VmaError);
    expect(wrongSession.status).toBe(404);
    await expect(b.nx(nodeA(), vmThere.id, SESSION_OTHER, 3000)).rejects.toThrow(/404/);
    expect(reached).toEqual(before);
    b.close();
    c.close();
  });

  test("only x_start and x_state are relayed: any other VMA method, verb or path is refused and reaches nothing", async () => {
    const before = { ...reached };
    const q = `vm=${vmHere.id}&session=${SESSION_B}`;
    const ask = async (line: string, extra = "") =>
      (await raw(tlsOf(certs.b), `${line} HTTP/1.1\r\n${extra}\r\n`)).answer.split("\r\n")[0];
    for (const m of [
      "poweroff",
      "ping",
      "x_stop",
      "x_suspend",
      "expire",
      "x_state/../poweroff",
      "..%2Fpoweroff",
      "constructor",
      "__proto__",
    ])
      expect(await ask(`GET /vma/${m}?${q}`)).toBe("HTTP/1.1 403 Forbidden");
    expect(await ask(`POST /vma/poweroff?${q}`, "Content-Length: 2\r\n\r\n{}")).toBe("HTTP/1.1 403 Forbidden");
    expect(await ask(`POST /vma/x_state?${q}`, "Content-Length: 0\r\n")).toBe("HTTP/1.1 405 Method Not Allowed");
    expect(await ask(`GET /vma/x_start?${q}`)).toBe("HTTP/1.1 405 Method Not Allowed");
    // No raw "connect to address:port", in any spelling.
    expect(await ask(`CONNECT 127.0.0.2:${elsewhere.port}`)).toMatch(/^HTTP\/1\.1 (400|404) /);
    expect(await ask(`GET http://127.0.0.2:${elsewhere.port}/nx?${q}`)).toMatch(/^HTTP\/1\.1 (400|404) /);
    expect(await ask(`GET /connect?host=127.0.0.2&port=${elsewhere.port}&${q}`)).toBe("HTTP/1.1 404 Not Found");
    expect(await ask(`GET /vma/x_state?vm=${vmHere.id}`)).toBe("HTTP/1.1 400 Bad Request");
    expect(await ask(`GET /vma/x_state?vm=1%20OR%201=1&session=${SESSION_B}`)).toBe("HTTP/1.1 400 Bad Request");
    expect(await ask(`GET /vma/x_state?vm=${vmHere.id}&session=x'::uuid`)).toBe("HTTP/1.1 400 Bad Request");
    expect(reached).toEqual(before);
  });

  test("the NX stream goes to the desktop's nxagent port only, whatever else the request names, both ways", async () => {
    const b = clientOf(certs.b);
    const before = { ...reached };
    // Extra parameters naming another address and port change nothing.
    const head = `GET /nx?vm=${vmHere.id}&session=${SESSION_B}&host=127.0.0.2&port=${elsewhere.port} HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: qvd-nx\r\nHost: 127.0.0.2:${elsewhere.port}\r\n\r\n`;
    const r = await raw(tlsOf(certs.b), head + "hello through the relay");
    expect(r.answer.split("\r\n")[0]).toBe("HTTP/1.1 101 Switching Protocols");
    expect(reached.elsewhere).toBe(before.elsewhere);
    expect(reached.agent).toBe(before.agent + 1);
    // Through the caller's side: a socket that carries bytes both ways.
    const s = await b.nx(nodeA(), vmHere.id, SESSION_B, 3000);
    let echoed = "";
    s.data.io = { data: (c) => void (echoed += Buffer.from(c).toString()), drain() {}, end() {}, close() {} };
    s.write("NXPROXY-3.5.0 cookie=x ");
    await poll(() => echoed.includes("NXPROXY"), 5000, 20);
    expect(echoed).toBe("NXPROXY-3.5.0 cookie=x ");
    s.end();
    // Without the upgrade headers there is no stream.
    expect(
      (await raw(tlsOf(certs.b), `GET /nx?vm=${vmHere.id}&session=${SESSION_B} HTTP/1.1\r\n\r\n`)).answer.split(
        "\r\n",
      )[0],
    ).toBe("HTTP/1.1 426 Upgrade Required");
    b.close();
  });
});

describe("bounds", () => {
  test("oversized heads and bodies are refused and the connection closed; a connection that never completes its handshake is closed", async () => {
    const big = await raw(
      tlsOf(certs.b),
      `GET /vma/x_state?vm=1&session=${SESSION_B} HTTP/1.1\r\nX: ${"a".repeat(8000)}\r\n\r\n`,
    );
    expect(big.answer.split("\r\n")[0]).toBe("HTTP/1.1 431 Request Header Fields Too Large");
    const body = await raw(
      tlsOf(certs.b),
      `POST /vma/x_start?vm=1&session=${SESSION_B} HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n`,
    );
    expect(body.answer.split("\r\n")[0]).toMatch(/^HTTP\/1\.1 413 /);
    // A plain TCP connection that says nothing: closed by the handshake deadline (2 s here).
    let closed = false;
    const s = await Bun.connect({
      hostname: "127.0.0.1",
      port: server.port,
      socket: { data() {}, close: () => void (closed = true) },
    });
    await poll(() => closed, 15_000);
    expect(closed).toBe(true);
    s.end();
  });

  test("past cluster.peer.limit.connections further connections are closed at once", async () => {
    const small = nodeAServer({ timeouts: { handshake: 60 }, maxConnections: 2 });
    const held: Socket[] = [];
    try {
      for (let i = 0; i < 2; i++)
        held.push(await Bun.connect({ hostname: "127.0.0.1", port: small.port, socket: { data() {} } }));
      await poll(() => small.connections() >= 2, 5000, 20);
      const b = new PeerClient({ tls: certs.b, port: small.port, connectS: 3 });
      await expect(b.vma(nodeA(), vmHere.id, SESSION_B, "x_state", undefined, 2000)).rejects.toThrow(VmaError);
      for (const s of held) s.end();
      await poll(() => small.connections() === 0, 5000, 20);
      expect((await b.vma<{ state: string }>(nodeA(), vmHere.id, SESSION_B, "x_state", undefined, 3000)).state).toBe(
        "stopped",
      );
      b.close();
    } finally {
      small.stop();
    }
  });

  test("connections without a node's certificate are bounded per address; a node's kept connection is not among them", async () => {
    const srv = nodeAServer({ timeouts: { handshake: 60 }, maxConnections: 1000 });
    const held: Socket[] = [];
    const b = new PeerClient({ tls: certs.b, port: srv.port, connectS: 3 });
    try {
      expect((await b.vma<{ state: string }>(nodeA(), vmHere.id, SESSION_B, "x_state", undefined, 3000)).state).toBe(
        "stopped",
      );
      for (let i = 0; i < UNPROVEN_PER_ADDRESS; i++)
        held.push(await Bun.connect({ hostname: "127.0.0.1", port: srv.port, socket: { data() {} } }));
      await poll(() => srv.connections() >= UNPROVEN_PER_ADDRESS + 1, 5000, 20);
      // One more from this address is closed at once, even a node's new connection…
      await expect(
        new PeerClient({ tls: certs.c, port: srv.port, connectS: 3 }).vma(
          nodeA(),
          vmHere.id,
          SESSION_B,
          "x_state",
          undefined,
          2000,
        ),
      ).rejects.toThrow(VmaError);
      // …while node B's kept connection goes on working.
      expect((await b.vma<{ state: string }>(nodeA(), vmHere.id, SESSION_B, "x_state", undefined, 3000)).state).toBe(
        "stopped",
      );
      expect(srv.connections()).toBe(UNPROVEN_PER_ADDRESS + 1);
    } finally {
      for (const s of held) s.end();
      b.close();
      srv.stop();
    }
  });
});

describe("a node without its farm certificate does not start", () => {
  const qvd = async (role: string, settings: Record<string, string>) => {
    const p = Bun.spawn(
      [
        process.execPath,
        "src/main.ts",
        role,
        "--config",
        "/dev/null",
        "--db",
        db().url,
        "--listen",
        "127.0.0.1:0",
        "--cert",
        certs.a.cert,
        "--key",
        certs.a.key,
        ...Object.entries(settings).flatMap(([k, v]) => ["--set", `${k}=${v}`]),
      ],
      { env: cleanEnv(), stdout: "pipe", stderr: "pipe", stdin: "ignore" },
    );
    const timer = setTimeout(() => p.kill("SIGKILL"), 30_000);
    const [stderr, code] = await Promise.all([new Response(p.stderr).text(), p.exited]);
    clearTimeout(timer);
    return { stderr: stderr.trim(), code };
  };

  test("qvd l7r and qvd node: no files, another CA's certificate, another node's, or a key that does not match: one line naming what to fix", async () => {
    for (const role of ["l7r", "node"]) {
      const none = await qvd(role, { nodename: "peer-a" });
      expect(none.code).toBe(78);
      expect(none.stderr).toBe(
        'qvd: a node needs its farm certificate: set cluster.tls.ca, cluster.tls.cert, cluster.tls.key; make them with qvd farm ca and qvd farm cert --name peer-a (README "Node certificates")',
      );
    }
    const other = await qvd("l7r", {
      nodename: "peer-b",
      "cluster.tls.ca": certs.a.ca,
      "cluster.tls.cert": foreign.cert,
      "cluster.tls.key": foreign.key,
    });
    expect(other.code).toBe(78);
    expect(other.stderr).toBe(`qvd: farm certificate ${foreign.cert}: not signed by the farm CA ${certs.a.ca}`);
    const notMine = await qvd("node", { nodename: "peer-a", ...certs.b.settings });
    expect(notMine.code).toBe(78);
    expect(notMine.stderr).toBe(
      `qvd: farm certificate ${certs.b.cert}: made for node "peer-b", but this node is "peer-a" (nodename)`,
    );
    const wrongKey = await qvd("l7r", { nodename: "peer-a", ...certs.a.settings, "cluster.tls.key": certs.b.key });
    expect(wrongKey.code).toBe(78);
    expect(wrongKey.stderr).toBe(`qvd: farm certificate ${certs.b.key}: not the key of ${certs.a.cert}`);
    const missing = await qvd("l7r", {
      nodename: "peer-a",
      ...certs.a.settings,
      "cluster.tls.cert": join(dir, "nope.crt"),
    });
    expect(missing.code).toBe(78);
    expect(missing.stderr).toBe(
      `qvd: cannot read the farm certificates (cluster.tls.ca, cluster.tls.cert): no such file ${join(dir, "nope.crt")}`,
    );
  }, 120_000);
});
