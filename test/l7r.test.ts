// The L7R over real TLS and a real database, spoken to with the exact bytes the original
// clients send (Perl: CRLF; Qt: bare LF), per docs/PROTOCOL.md.
import { afterAll, beforeAll, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import * as D from "../src/db/index.ts";
import { startL7r, type L7r } from "../src/l7r/server.ts";
import { run } from "../src/run.ts";
import { useTestDatabase } from "./support/db.ts";
import { basic, WireClient } from "./support/qvd-wire.ts";
import { selfSignedCert } from "./support/tls.ts";
import { capture } from "./support/spawn.ts";

const db = useTestDatabase();
const ALL = D.ALL_TENANTS;
const dir = mkdtempSync("/tmp/qvd-l7r-");
let l7r: L7r;
let hostId: number;
let vmId: number;
let blockedVmId: number;
let otherVmId: number;
const ALICE = basic("alice", "alice-pw-1");

beforeAll(async () => {
  const sql = db().sql;
  await selfSignedCert(dir);
  const host = await D.create(sql, D.hosts, ALL, { name: "l7r-node", address: "127.0.0.1" });
  hostId = host.id;
  await sql`UPDATE host_runtimes SET state = 'running' WHERE host_id = ${hostId}`;
  const alice = await D.create(sql, D.users, ALL, { tenant_id: 1, name: "alice", password: "alice-pw-1" });
  const bob = await D.create(sql, D.users, ALL, { tenant_id: 1, name: "bob", password: "bob-pw-1", blocked: true });
  const osf = await D.create(sql, D.osfs, ALL, { tenant_id: 1, name: "desk", memory_mb: 128 });
  vmId = (
    await D.createVm(sql, ALL, { user_id: alice.id, osf_id: osf.id, name: "alice-1" }, { range: "198.18.0.0/16" })
  ).id;
  blockedVmId = (
    await D.createVm(sql, ALL, { user_id: alice.id, osf_id: osf.id, name: "alice-2" }, { range: "198.18.0.0/16" })
  ).id;
  await D.setVmBlocked(sql, ALL, blockedVmId, true, "maintenance");
  otherVmId = (
    await D.createVm(sql, ALL, { user_id: bob.id, osf_id: osf.id, name: "bob-1" }, { range: "198.18.0.0/16" })
  ).id;
  l7r = await startL7r({
    sql,
    databaseUrl: db().url,
    nodename: "l7r-node",
    hostname: "127.0.0.1",
    port: 0,
    tls: { cert: join(dir, "cert.pem"), key: join(dir, "key.pem") },
    timeouts: { request: 1 },
    limits: { maxHeaderBytes: 4096, maxRequestLine: 1024 },
    throttle: { accountTries: 5, delayS: 60 },
  });
});

afterAll(async () => {
  await l7r?.stop();
  rmSync(dir, { recursive: true, force: true });
});

const client = () => WireClient.connect(l7r.port);

test("ping, as the Qt client sends it (bare LF): 200 I am alive!", async () => {
  const c = await client();
  c.send("GET /qvd/ping HTTP/1.1\nUser-Agent: QVDClient Qt/0.01 (Linux)\n\n");
  const r = await c.response();
  expect(r.raw).toBe("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nI am alive!\r\n");
  c.end();
});

test("list_of_vm (Perl: CRLF), then again on the same connection (Qt: LF, other header case)", async () => {
  const c = await client();
  c.send(
    `GET /qvd/list_of_vm? HTTP/1.1\r\nAuthorization: ${ALICE}\r\nAccept: application/json\r\nUser-Agent: QVD::HTTPC/0.01 (linux)\r\n\r\n`,
  );
  const r = await c.response();
  expect(r.status).toBe(200);
  expect(r.headers.get("content-type")).toBe("application/json");
  expect(Number(r.headers.get("content-length"))).toBe(Buffer.byteLength(r.body));
  expect(JSON.parse(r.body)).toEqual([
    { id: vmId, name: "alice-1", state: "stopped", blocked: 0, is_application: 0 },
    { id: blockedVmId, name: "alice-2", state: "stopped", blocked: 1, is_application: 0 },
  ]);
  c.send(`GET /qvd/list_of_vm HTTP/1.1\nauthorization: ${ALICE}\nuser-agent: QVDClient Qt/0.01 (Linux)\n\n`);
  const r2 = await c.response();
  expect(r2.status).toBe(200);
  expect(JSON.parse(r2.body)).toHaveLength(2);
  c.send("GET /qvd/list_of_applications HTTP/1.1\r\nAuthorization: " + ALICE + "\r\n\r\n");
  expect(JSON.parse((await c.response()).body)).toEqual([]);
  c.end();
});

test("a wrong password: 401 with WWW-Authenticate, audited; the connection stays usable", async () => {
  const c = await client();
  c.send(`GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: ${basic("alice", "wrong")}\r\n\r\n`);
  const r = await c.response();
  expect(r.status).toBe(401);
  expect(r.reason).toBe("Unauthorized");
  expect(r.headers.get("www-authenticate")).toBe('Basic realm="QVD"');
  c.send("GET /qvd/list_of_vm HTTP/1.1\r\n\r\n"); // no credentials at all
  expect((await c.response()).status).toBe(401);
  c.send(`GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: ${basic("alice@nosuchtenant", "alice-pw-1")}\r\n\r\n`);
  expect((await c.response()).status).toBe(401);
  c.send(`GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: ${basic("alice@default", "alice-pw-1")}\r\n\r\n`);
  expect((await c.response()).status).toBe(200);
  const rows = await db()
    .sql`SELECT ok, object_name, address FROM audit_log WHERE action = 'user.login' AND source = 'l7r' ORDER BY id`;
  expect(rows.some((r) => !r.ok && r.object_name === "default/alice" && r.address === "127.0.0.1")).toBe(true);
  expect(rows.some((r) => r.ok && r.object_name === "default/alice")).toBe(true);
  c.end();
});

test("logins are split by the farm's rules: l7r.auth.plugin.default.separators and .tenant", async () => {
  const sql = db().sql;
  const acme = await D.create(sql, D.tenants, ALL, { name: "acme" });
  await D.create(sql, D.users, ALL, { tenant_id: acme.id, name: "dora", password: "dora-pw-1" });
  const status = async (login: string, password: string) => {
    const c = await client();
    c.send(`GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: ${basic(login, password)}\r\n\r\n`);
    const r = await c.response();
    c.end();
    return r.status;
  };
  // The defaults: '@' or '#', tenant "default".
  expect(await status("dora@acme", "dora-pw-1")).toBe(200);
  expect(await status("dora", "dora-pw-1")).toBe(401);
  const rules = { "l7r.auth.plugin.default.separators": "%", "l7r.auth.plugin.default.tenant": "acme" };
  for (const [k, v] of Object.entries(rules)) await D.setConfig(sql, 0, k, v);
  try {
    expect(await status("dora", "dora-pw-1")).toBe(200); // the default tenant is acme now
    expect(await status("DORA%Acme", "dora-pw-1")).toBe(200); // names are lower case
    expect(await status("dora@acme", "dora-pw-1")).toBe(401); // '@' is no separator now: no such login in acme
    expect(await status("alice%default", "alice-pw-1")).toBe(200);
    expect(await status("alice", "alice-pw-1")).toBe(401); // alice is not in acme
  } finally {
    for (const k of Object.keys(rules)) await D.deleteConfig(sql, 0, k);
  }
});

test("a blocked user gets the same 401", async () => {
  const c = await client();
  c.send(`GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: ${basic("bob", "bob-pw-1")}\r\n\r\n`);
  const r = await c.response();
  expect(r.status).toBe(401);
  expect(r.headers.get("www-authenticate")).toBe('Basic realm="QVD"');
  c.end();
});

const connectReq = (q: string, auth = ALICE, upgrade = "Connection: Upgrade\r\nUpgrade: QVD/1.0\r\n") =>
  `GET /qvd/connect_to_vm?${q} HTTP/1.1\r\nAuthorization: ${auth}\r\n${upgrade}\r\n`;
const PARAMS =
  "qvd.client.os=linux&qvd.client.link=adsl&qvd.client.keyboard=pc105%2Fes&qvd.client.geometry=1024x768&qvd.client.fullscreen=";

test("connect_to_vm pre-checks: unknown VM 404, blocked VM 403, missing Upgrade 426, no id 422, foreign parameter 403, another's VM 503", async () => {
  const c = await client();
  c.send(connectReq(`id=999999&${PARAMS}`));
  let r = await c.response();
  expect([r.status, r.body]).toEqual([404, "The requested virtual machine does not exist"]);
  c.send(connectReq(`id=${blockedVmId}&${PARAMS}`));
  r = await c.response();
  expect([r.status, r.body]).toEqual([403, "The requested virtual machine is offline for maintenance"]);
  c.send(connectReq(`id=${vmId}&${PARAMS}`, ALICE, "Connection: Upgrade\r\n"));
  r = await c.response();
  expect(r.status).toBe(426);
  expect(r.reason).toBe("Upgrade Required");
  c.send(connectReq(PARAMS));
  r = await c.response();
  expect([r.status, r.body]).toEqual([422, "parameter id is missing"]);
  c.send(connectReq(`id=${vmId}&foo=1&qvd.client.os=linux&bar=2`));
  r = await c.response();
  expect([r.status, r.body]).toEqual([403, "Invalid parameters foo bar"]);
  c.send(connectReq(`id=${otherVmId}&${PARAMS}`));
  r = (await c.final()).res;
  expect([r.status, r.body]).toEqual([
    503,
    "The requested virtual machine is not available: You are not allowed to access requested virtual machine, retry later.",
  ]);
  c.end();
});

test("connect_to_vm with no node to run the VM: 102 progress, then 503; the session is released", async () => {
  const c = await client();
  c.send(connectReq(`id=${vmId}&${PARAMS}`));
  const { progress, res } = await c.final();
  expect(progress).toEqual([`Session acquired for VM_ID: ${vmId}`, `Assigning VM ${vmId} to host`]);
  expect(res.status).toBe(503);
  expect(res.body).toBe(
    "The requested virtual machine is not available: Unable to assign vm to host, there is no host available, retry later.",
  );
  const [row] = await db().sql`SELECT user_state, l7r_session, l7r_host_id FROM vm_runtimes WHERE vm_id = ${vmId}`;
  expect(row).toEqual({ user_state: "disconnected", l7r_session: null, l7r_host_id: null });
  c.end();
});

test("stop_vm of a stopped VM: 200 Machine stopped", async () => {
  const c = await client();
  c.send(
    `GET /qvd/stop_vm?id=${vmId} HTTP/1.1\r\nAuthorization: ${ALICE}\r\nConnection: Upgrade\r\nUpgrade: QVD/1.0\r\n\r\n`,
  );
  const r = await c.response();
  expect([r.status, r.body]).toEqual([200, "Machine stopped\r\n"]);
  c.send(`GET /qvd/stop_vm?id=${otherVmId} HTTP/1.1\r\nAuthorization: ${ALICE}\r\n\r\n`);
  expect((await c.response()).status).toBe(403);
  c.end();
});

test("create_auth_token: a bearer token that lists the VMs on a new connection", async () => {
  const c = await client();
  c.send(`GET /qvd/create_auth_token HTTP/1.1\r\nAuthorization: ${ALICE}\r\n\r\n`);
  const r = await c.response();
  expect(r.status).toBe(200);
  const token = JSON.parse(r.body).auth_token as string;
  expect(token.endsWith("\n")).toBe(true);
  c.end();
  const c2 = await client();
  c2.send(`GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: Bearer ${token.trim()}\r\n\r\n`);
  const r2 = await c2.response();
  expect(r2.status).toBe(200);
  expect(JSON.parse(r2.body)).toHaveLength(2);
  c2.send(
    `GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: Bearer ${Buffer.from("not-a-token").toString("base64")}\r\n\r\n`,
  );
  expect((await c2.response()).status).toBe(401);
  c2.end();
});

test("create_auth_token?vm_id=: the token lists, stops and connects to that VM only, and passes on only that binding", async () => {
  const c = await client();
  c.send(`GET /qvd/create_auth_token?vm_id=${vmId} HTTP/1.1\r\nAuthorization: ${ALICE}\r\n\r\n`);
  const r = await c.response();
  expect(r.status).toBe(200);
  // Another user's VM, or one that does not exist, cannot be bound.
  c.send(`GET /qvd/create_auth_token?vm_id=999999 HTTP/1.1\r\nAuthorization: ${ALICE}\r\n\r\n`);
  expect((await c.response()).status).toBe(404);
  c.end();
  const bound = `Bearer ${(JSON.parse(r.body).auth_token as string).trim()}`;
  const c2 = await client();
  c2.send(`GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: ${bound}\r\n\r\n`);
  expect(JSON.parse((await c2.response()).body).map((v: { id: number }) => v.id)).toEqual([vmId]);
  c2.send(`GET /qvd/stop_vm?id=${blockedVmId} HTTP/1.1\r\nAuthorization: ${bound}\r\n\r\n`);
  expect((await c2.response()).status).toBe(403);
  c2.send(`GET /qvd/stop_vm?id=${vmId} HTTP/1.1\r\nAuthorization: ${bound}\r\n\r\n`);
  const stopped = await c2.response();
  expect(stopped.status).toBe(200);
  expect(stopped.body).toBe("Machine stopped\r\n");
  // A token makes no tokens, bound to its VM or not (test/security-identity.test.ts).
  const tokens = (await db().sql`SELECT count(*)::int AS n FROM user_tokens`)[0]!.n;
  for (const q of [`?vm_id=${blockedVmId}`, `?vm_id=${vmId}`, ""]) {
    c2.send(`GET /qvd/create_auth_token${q} HTTP/1.1\r\nAuthorization: ${bound}\r\n\r\n`);
    expect((await c2.response()).status).toBe(403);
  }
  expect((await db().sql`SELECT count(*)::int AS n FROM user_tokens`)[0]!.n).toBe(tokens);
  c2.end();
  // connect_to_vm to the user's other VM (unblocked for this check) is refused by the binding.
  await D.setVmBlocked(db().sql, ALL, blockedVmId, false);
  try {
    const c3 = await client();
    c3.send(
      `GET /qvd/connect_to_vm?id=${blockedVmId} HTTP/1.1\r\nAuthorization: ${bound}\r\nConnection: Upgrade\r\nUpgrade: QVD/1.0\r\n\r\n`,
    );
    const refused = await c3.response();
    expect(refused.status).toBe(503);
    expect(refused.body).toContain("You are not allowed to access requested virtual machine");
    c3.end();
  } finally {
    await D.setVmBlocked(db().sql, ALL, blockedVmId, true);
  }
  // The desktop client binds with --vm.
  const printed = await qvdClient(["--user", "alice", "--vm", "alice-1", "--print-token"], {
    QVD_PASSWORD: "alice-pw-1",
  });
  expect(printed.code).toBe(0);
  expect((await db().sql`SELECT vm_id FROM user_tokens ORDER BY created_at DESC LIMIT 1`)[0]!.vm_id).toBe(vmId);
});

test("unknown path or method: 404", async () => {
  const c = await client();
  c.send("GET /qvd/nothing HTTP/1.1\r\n\r\nPOST /qvd/ping HTTP/1.1\r\n\r\n");
  expect((await c.response()).status).toBe(404);
  expect((await c.response()).status).toBe(404);
  c.end();
});

test("with the browser desktop off (l7r.web = off: no web options), its page and WebSocket are 404", async () => {
  const c = await client();
  c.send("GET / HTTP/1.1\r\n\r\nGET /qvd/web/main.js HTTP/1.1\r\n\r\n");
  expect((await c.response()).status).toBe(404);
  expect((await c.response()).status).toBe(404);
  c.send(
    `GET /qvd/web/connect HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: https://127.0.0.1\r\nAuthorization: ${ALICE}\r\n\r\n`,
  );
  expect((await c.response()).status).toBe(404);
  c.end();
});

test("a malformed request line: 400 and the connection closed", async () => {
  const c = await client();
  c.send("this is not http at all\r\n\r\n");
  const r = await c.response();
  expect(r.status).toBe(400);
  await c.waitClosed();
});

test("Connection: close: answered, then closed; without it the connection stays", async () => {
  const c = await client();
  c.send("GET /qvd/ping HTTP/1.1\r\nConnection: keep-alive\r\n\r\n");
  expect((await c.response()).status).toBe(200);
  c.send("GET /qvd/ping HTTP/1.1\r\nConnection: Close\r\n\r\n");
  expect((await c.response()).status).toBe(200);
  await c.waitClosed();
});

test("HTTP/1.0: 505 and closed", async () => {
  const c = await client();
  c.send("GET /qvd/ping HTTP/1.0\r\n\r\n");
  expect((await c.response()).status).toBe(505);
  await c.waitClosed();
});

test("a malformed header line: 400 and closed", async () => {
  const c = await client();
  c.send("GET /qvd/ping HTTP/1.1\r\nBad Header Name: x\r\n\r\n");
  expect((await c.response()).status).toBe(400);
  await c.waitClosed();
});

test("oversized headers: 431 and closed, even before the header block ends", async () => {
  const c = await client();
  c.send(`GET /qvd/ping HTTP/1.1\r\nX-Big: ${"a".repeat(5000)}\r\n`);
  const r = await c.response();
  expect(r.status).toBe(431);
  await c.waitClosed();
});

test("a slow client is timed out: 408 and closed", async () => {
  const c = await client();
  c.send("GET /qvd/ping HTTP/1.1\r\nUser-Agent: slow");
  const r = await c.response(5000);
  expect(r.status).toBe(408);
  await c.waitClosed();
});

test("TLS 1.2 and later only", async () => {
  const tryVersion = async (flag: string) =>
    (
      await run(["sh", "-c", `echo | timeout 10 openssl s_client -connect 127.0.0.1:${l7r.port} ${flag} 2>&1`], {
        allowFail: true,
      })
    ).stdout;
  expect(await tryVersion("-tls1_2")).toMatch(/Protocol\s*:\s*TLSv1\.2/);
  // The server answers a TLS 1.1 hello with a protocol_version alert: no cipher agreed.
  const old = await tryVersion("-tls1_1 -cipher DEFAULT@SECLEVEL=0");
  expect(old).toContain("Cipher is (NONE)");
  expect(old).toMatch(/alert protocol version|no protocols available/);
});

test("repeated failed logins make the next try wait: 429 with Retry-After (security-login.test.ts has the rest)", async () => {
  await D.create(db().sql, D.users, ALL, { tenant_id: 1, name: "carol", password: "carol-pw-1" });
  const c = await client();
  for (let i = 0; i < 5; i++) {
    c.send(`GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: ${basic("carol", `wrong-${i}`)}\r\n\r\n`);
    expect((await c.response()).status).toBe(401);
  }
  c.send(`GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: ${basic("carol", "carol-pw-1")}\r\n\r\n`);
  const r = await c.response();
  expect(r.status).toBe(429);
  expect(r.headers.get("retry-after")).toBe("60");
  expect(r.body).toBe("Too many failed logins; try again in 60 seconds\r\n");
  const [n] = await db()
    .sql`SELECT count(*)::int AS n FROM audit_log WHERE action = 'user.login' AND object_name = 'default/carol' AND NOT ok`;
  expect(n!.n).toBe(5);
  c.end();
});

// --- qvd client with a bearer token, against this L7R ------------------------------------------

async function qvdClient(args: string[], env: Record<string, string> = {}) {
  return capture(
    [
      process.execPath,
      "src/main.ts",
      "client",
      "--host",
      "127.0.0.1",
      "--port",
      String(l7r.port),
      "--insecure",
      "--nxproxy-command",
      "/bin/false",
      ...args,
    ],
    { env: { PATH: process.env.PATH!, HOME: dir, ...env } },
  );
}

test("qvd client --print-token, then --token-file and QVD_TOKEN: Bearer for list_of_vm and connect_to_vm", async () => {
  const printed = await qvdClient(["--user", "alice", "--print-token"], { QVD_PASSWORD: "alice-pw-1" });
  expect(printed.code).toBe(0);
  const token = printed.stdout.trim();
  expect(token).toMatch(/^[A-Za-z0-9+/=]+$/);
  const tokenFile = join(dir, "token");
  await Bun.write(tokenFile, token + "\n");
  // The token is used for both requests: the list (desktop by name), then connect_to_vm, which
  // the L7R answers with its own 503 (no node runs desktops here) only after authenticating it.
  const before = (await db().sql`SELECT count(*)::int AS n FROM audit_log WHERE action = 'user.login'`)[0]!.n;
  for (const [args, env] of [
    [["--token-file", tokenFile], {}],
    [[], { QVD_TOKEN: token }],
  ] as [string[], Record<string, string>][]) {
    const r = await qvdClient([...args, "--vm", "alice-1"], env);
    expect(r.stderr).toContain("Unable to assign vm to host, there is no host available");
    expect(r.stdout).toContain(`Session acquired for VM_ID: ${vmId}`);
    expect(r.code).toBe(6);
  }
  // No password login happened (bearer logins are not password attempts).
  expect((await db().sql`SELECT count(*)::int AS n FROM audit_log WHERE action = 'user.login'`)[0]!.n).toBe(before);
});

test("qvd client with a token the L7R does not know: exit 3; an empty token file or a token with a password file: exit 2", async () => {
  const bad = await qvdClient(["--vm", "alice-1"], { QVD_TOKEN: Buffer.from("no-such-token").toString("base64") });
  expect(bad.code).toBe(3);
  expect(bad.stderr).toContain("refused the token");
  const empty = join(dir, "empty-token");
  await Bun.write(empty, "\n");
  const e = await qvdClient(["--token-file", empty]);
  expect(e.code).toBe(2);
  expect(e.stderr).toContain("the file is empty");
  const both = await qvdClient(["--token-file", join(dir, "token"), "--password-file", join(dir, "token")]);
  expect(both.code).toBe(2);
  const none = await qvdClient([]);
  expect(none.code).toBe(2);
  expect(none.stderr).toContain("--user is required");
});

test("a port still held (an L7R that is stopping) is tried again for a few seconds; held longer, a clear error", async () => {
  const options = (port: number) => ({
    sql: db().sql,
    databaseUrl: db().url,
    nodename: "l7r-node",
    hostname: "127.0.0.1",
    port,
    tls: { cert: join(dir, "cert.pem"), key: join(dir, "key.pem") },
  });
  const holder = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
  const port = holder.port;
  // Released after a second: the second L7R gets the port and answers.
  setTimeout(() => holder.stop(true), 1000);
  const second = await startL7r(options(port));
  try {
    expect(second.port).toBe(port);
    const c = await WireClient.connect(port);
    c.send("GET /qvd/ping HTTP/1.1\r\n\r\n");
    expect((await c.response()).status).toBe(200);
    c.end();
  } finally {
    await second.stop();
  }
  // Never released: start-up fails, naming the address, and leaves nothing listening.
  const keeper = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
  try {
    const err = await startL7r(options(keeper.port)).catch((e: Error) => e);
    expect(err).toBeInstanceOf(Error);
    expect((err as Error).message).toBe(
      `127.0.0.1:${keeper.port} is in use by another program (another L7R or qvd node?); waited 5 s`,
    );
  } finally {
    keeper.stop(true);
  }
}, 30_000);

test("a unix socket that cannot be made: start-up fails and leaves its TCP port free", async () => {
  const port = (() => {
    const probe = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
    const p = probe.port;
    probe.stop(true);
    return p;
  })();
  const err = await startL7r({
    sql: db().sql,
    databaseUrl: db().url,
    nodename: "l7r-node",
    hostname: "127.0.0.1",
    port,
    unix: join(dir, "no-such-dir", "l7r.sock"),
    tls: { cert: join(dir, "cert.pem"), key: join(dir, "key.pem") },
  }).catch((e: Error) => e);
  expect(err).toBeInstanceOf(Error);
  // The port is free again: bound here at once, with no retry.
  const again = Bun.listen({ hostname: "127.0.0.1", port, socket: { data() {} } });
  expect(again.port).toBe(port);
  again.stop(true);
});
