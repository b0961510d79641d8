// Login throttling that cannot lock the owner out (src/auth/throttle.ts), on the real admin API
// and a real L7R over one test database: waits announced with Retry-After and kept, refused
// tries that change nothing, parallel tries counted before the password is checked, per-address
// limits, addresses an account logged in from, and X-Forwarded-For only from trusted proxies.
// Windows are small (1–4 s); the tests wait past them but never assert timings.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import net from "node:net";
import tls from "node:tls";
import { clientAddress, trustedProxies } from "../src/api/client-address.ts";
import { decide, DEFAULT_POLICY } from "../src/auth/throttle.ts";
import * as D from "../src/db/index.ts";
import { startL7r, type L7r } from "../src/l7r/server.ts";
import { ApiClient, createAdmin, startTestApi, useTestApi, type ApiResponse, type TestApi } from "./support/api.ts";
import { useTestDatabase } from "./support/db.ts";
import { basic } from "./support/qvd-wire.ts";
import { selfSignedCert } from "./support/tls.ts";

const db = useTestDatabase();
const sql = () => db().sql;
const ALL = D.ALL_TENANTS;
// account: 3 free failures; address: 6; then waits of 2, 4, 4… seconds.
const POLICY = {
  "auth.throttle.account.tries": "3",
  "auth.throttle.address.tries": "6",
  "auth.throttle.delay": "2",
  "auth.throttle.max_delay": "4",
};
const { api, sa } = useTestApi(db, { ...POLICY, "api.trusted_proxies": "127.0.0.1, ::1" }); // behind a trusted proxy (this machine)
let direct: TestApi; // no trusted proxies: X-Forwarded-For means nothing (no superadmin logs in there)
let l7r: L7r;
const dir = mkdtempSync("/tmp/qvd-security-login-");

beforeAll(async () => {
  direct = await startTestApi(db(), POLICY);
  for (const name of ["ada", "ben", "cyd", "dot", "eve", "fay"]) await createAdmin(sa, name, {});
  await selfSignedCert(dir);
  const host = await D.create(sql(), D.hosts, ALL, { name: "login-node", address: "127.0.0.1" });
  await sql()`UPDATE host_runtimes SET state = 'running' WHERE host_id = ${host.id}`;
  for (const name of ["una", "vic", "wes", "xan", "yul"])
    await D.create(sql(), D.users, ALL, { tenant_id: 1, name, password: `${name}-pw-1` });
  l7r = await startL7r({
    sql: sql(),
    databaseUrl: db().url,
    nodename: "login-node",
    hostname: "127.0.0.1",
    port: 0,
    tls: { cert: join(dir, "cert.pem"), key: join(dir, "key.pem") },
    throttle: { accountTries: 3, addressTries: 6, delayS: 2, maxDelayS: 4 },
  });
});

afterAll(async () => {
  await l7r?.stop();
  await direct?.stop();
  rmSync(dir, { recursive: true, force: true });
});

// --- helpers ----------------------------------------------------------------------------------

/** POST /login through `via`, as the client at `from` (X-Forwarded-For, as a proxy adds it). */
const apiLogin = (name: string, password: string, from?: string, via: TestApi = api): Promise<ApiResponse> =>
  new ApiClient(via.url).call("POST", "/login", { name, password }, from ? { "x-forwarded-for": from } : {});

/** One list_of_vm with Basic auth on a new TLS connection from a loopback address of our choice. */
function l7rList(
  login: string,
  password: string,
  from = "127.0.0.1",
): Promise<{ status: number; retryAfter: string | null; body: string }> {
  return new Promise((resolve, reject) => {
    const tcp = net.connect({ host: "127.0.0.1", port: l7r.port, localAddress: from });
    const s = tls.connect({ socket: tcp, rejectUnauthorized: false }, () =>
      s.write(`GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: ${basic(login, password)}\r\n\r\n`),
    );
    let buf = Buffer.alloc(0);
    s.on("data", (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      const end = buf.indexOf("\r\n\r\n");
      if (end < 0) return;
      const head = buf.subarray(0, end).toString("latin1");
      const length = Number(/\r\ncontent-length:\s*(\d+)/i.exec(head)?.[1] ?? 0);
      if (buf.length < end + 4 + length) return;
      s.destroy();
      resolve({
        status: Number(head.split(" ")[1]),
        retryAfter: /\r\nretry-after:\s*(\S+)/i.exec(head)?.[1] ?? null,
        body: buf.subarray(end + 4, end + 4 + length).toString(),
      });
    });
    s.on("error", reject);
  });
}

/** Keeps trying (refused) until just before `until`, then waits until just after it. */
async function hammerUntil(until: number, attempt: () => Promise<{ status: number }>) {
  let refused = 0;
  while (Date.now() < until - 800) {
    expect((await attempt()).status).toBe(429);
    refused++;
    await Bun.sleep(100);
  }
  expect(refused).toBeGreaterThan(0);
  await Bun.sleep(Math.max(0, until - Date.now()) + 150);
}

const failures = async (action: string, account: string) =>
  (
    await sql()`SELECT count(*)::int AS n FROM audit_log WHERE action = ${action} AND object_name = ${account} AND NOT ok AND error NOT LIKE 'too many%'`
  )[0]!.n as number;

// --- the admin API ------------------------------------------------------------------------------

describe("API", () => {
  test("wrong passwords make the right one wait only until the announced Retry-After; refused tries do not extend it", async () => {
    const from = "198.51.100.1";
    for (let i = 0; i < 3; i++) expect((await apiLogin("ada", `guess-${i}`, from)).status).toBe(401);
    const refused = await apiLogin("ada", "ada-password", from);
    expect(refused.status).toBe(429);
    const wait = Number(refused.headers.get("retry-after"));
    expect(wait).toBe(2);
    expect(refused.body.error.message).toBe(`too many failed logins; try again in ${wait} seconds`);
    await hammerUntil(Date.now() + wait * 1000, () => apiLogin("ada", "ada-password", from));
    // After the wait ONE try is checked: a wrong one doubles the next wait…
    expect((await apiLogin("ada", "guess-again", from)).status).toBe(401);
    const again = await apiLogin("ada", "ada-password", from);
    expect([again.status, again.headers.get("retry-after")]).toEqual([429, "4"]);
    await hammerUntil(Date.now() + 4000, () => apiLogin("ada", "ada-password", from));
    // …and the owner's right one, once the wait is over, gets in.
    const ok = await apiLogin("ada", "ada-password", from);
    expect(ok.status).toBe(200);
    expect(ok.body.token).toBeString();
    expect(await failures("login", "*/ada")).toBe(4); // only the checked failures
  });

  test("parallel wrong tries on many connections: only the allowed three are checked", async () => {
    const answers = await Promise.all(
      Array.from({ length: 12 }, (_, i) => apiLogin("ben", `parallel-${i}`, "198.51.100.2")),
    );
    const statuses = answers.map((a) => a.status).sort();
    expect(statuses.filter((s) => s === 401)).toHaveLength(3);
    expect(statuses.filter((s) => s === 429)).toHaveLength(9);
    expect(answers.filter((a) => a.status === 429).every((a) => Number(a.headers.get("retry-after")) >= 1)).toBe(true);
    expect(await failures("login", "*/ben")).toBe(3);
  });

  test("every spelling of a name counts for the one account: case and tenant variants buy no guesses", async () => {
    await createAdmin(sa, "gus", {});
    const from = "198.51.100.20";
    for (const name of ["GUS", "Gus@default", "gUs@*"]) expect((await apiLogin(name, "guess", from)).status).toBe(401);
    expect((await apiLogin("gus", "gus-password", from)).status).toBe(429);
  });

  test("one address spraying many accounts is throttled; another account's owner elsewhere is not", async () => {
    const sprayer = "198.51.100.3";
    for (let i = 0; i < 6; i++) expect((await apiLogin(`nobody${i}`, "spray-password", sprayer)).status).toBe(401);
    // Even a right password waits, from that address.
    const r = await apiLogin("cyd", "cyd-password", sprayer);
    expect(r.status).toBe(429);
    expect(Number(r.headers.get("retry-after"))).toBeGreaterThanOrEqual(1);
    expect((await apiLogin("dot", "dot-password", "198.51.100.4")).status).toBe(200);
    const rows =
      await sql()`SELECT DISTINCT address FROM audit_log WHERE action = 'login' AND object_name LIKE '*/nobody%'`;
    expect(rows.map((x) => x.address)).toEqual([sprayer]);
  });

  test("strangers elsewhere cannot keep the owner out of an address the account logged in from", async () => {
    const home = "198.51.100.5";
    expect((await apiLogin("eve", "eve-password", home)).status).toBe(200);
    // Many sources guess; the account makes every new address wait.
    const answers = [];
    for (let i = 0; i < 6; i++) answers.push((await apiLogin("eve", `botnet-${i}`, `203.0.113.${10 + i}`)).status);
    expect(answers.slice(0, 3)).toEqual([401, 401, 401]);
    expect(answers.slice(3)).toEqual([429, 429, 429]);
    expect((await apiLogin("eve", "eve-password", "203.0.113.99")).status).toBe(429);
    // The owner at home is not held back by them.
    expect((await apiLogin("eve", "eve-password", home)).status).toBe(200);
  });

  test("an unknown account or tenant answers as a known one does, throttle included", async () => {
    const from = "198.51.100.6";
    const known = await apiLogin("fay", "wrong-password", from);
    const unknown = await apiLogin("nosuchadmin", "wrong-password", "198.51.100.7");
    const noTenant = await new ApiClient(api.url).call(
      "POST",
      "/login",
      { name: "fay", tenant: "nosuchtenant", password: "x" },
      { "x-forwarded-for": "198.51.100.8" },
    );
    for (const r of [known, unknown, noTenant])
      expect([r.status, r.body]).toEqual([401, { error: { status: 401, message: "wrong tenant, name or password" } }]);
    for (let i = 0; i < 2; i++) await apiLogin("nosuchadmin", "wrong-password", "198.51.100.7");
    for (let i = 0; i < 2; i++) await apiLogin("fay", "wrong-password", from);
    for (const r of [
      await apiLogin("fay", "wrong-password", from),
      await apiLogin("nosuchadmin", "wrong-password", "198.51.100.7"),
    ]) {
      expect(r.status).toBe(429);
      expect(r.body.error.message).toBe(`too many failed logins; try again in ${r.headers.get("retry-after")} seconds`);
    }
  });

  test("X-Forwarded-For from a peer that is not a trusted proxy is ignored", async () => {
    // Each try claims another address; all are the socket's (127.0.0.1) and counted together.
    for (let i = 0; i < 6; i++)
      expect((await apiLogin(`forged${i}`, "spray-password", `192.0.2.${i + 1}`, direct)).status).toBe(401);
    const r = await apiLogin("dot", "dot-password", "192.0.2.77", direct);
    expect(r.status).toBe(429);
    const rows =
      await sql()`SELECT DISTINCT address FROM audit_log WHERE action = 'login' AND object_name LIKE '*/forged%'`;
    expect(rows.map((x) => x.address)).toEqual(["127.0.0.1"]);
    // The trusted proxy's own hop is used, not a forged one left of it.
    const via = await new ApiClient(api.url).call(
      "POST",
      "/login",
      { name: "dot", password: "dot-password" },
      { "x-forwarded-for": "192.0.2.200, 198.51.100.4, ::1" },
    );
    expect(via.status).toBe(200);
    const [s] = await sql()`SELECT address FROM admin_sessions ORDER BY created_at DESC LIMIT 1`;
    expect(s!.address).toBe("198.51.100.4");
  });
});

// --- the L7R --------------------------------------------------------------------------------------

describe("L7R", () => {
  test("wrong passwords make the right one wait only until the announced Retry-After; refused tries do not extend it", async () => {
    const from = "127.0.0.11";
    for (let i = 0; i < 3; i++) expect((await l7rList("una", `guess-${i}`, from)).status).toBe(401);
    const refused = await l7rList("una", "una-pw-1", from);
    expect([refused.status, refused.retryAfter, refused.body]).toEqual([
      429,
      "2",
      "Too many failed logins; try again in 2 seconds\r\n",
    ]);
    await hammerUntil(Date.now() + 2000, () => l7rList("una", "una-pw-1", from));
    expect((await l7rList("una", "guess-again", from)).status).toBe(401);
    const again = await l7rList("una", "una-pw-1", from);
    expect([again.status, again.retryAfter]).toEqual([429, "4"]);
    await hammerUntil(Date.now() + 4000, () => l7rList("una", "una-pw-1", from));
    const ok = await l7rList("una", "una-pw-1", from);
    expect(ok.status).toBe(200);
    expect(await failures("user.login", "default/una")).toBe(4);
  });

  test("parallel wrong tries on many connections: only the allowed three are checked", async () => {
    const answers = await Promise.all(
      Array.from({ length: 12 }, (_, i) => l7rList("vic", `parallel-${i}`, "127.0.0.12")),
    );
    expect(answers.filter((a) => a.status === 401)).toHaveLength(3);
    expect(answers.filter((a) => a.status === 429)).toHaveLength(9);
    expect(await failures("user.login", "default/vic")).toBe(3);
  });

  test("one address spraying many accounts is throttled; another account's owner elsewhere is not", async () => {
    for (let i = 0; i < 6; i++) expect((await l7rList(`nobody${i}`, "spray-pw", "127.0.0.13")).status).toBe(401);
    expect((await l7rList("wes", "wes-pw-1", "127.0.0.13")).status).toBe(429);
    expect((await l7rList("xan", "xan-pw-1", "127.0.0.14")).status).toBe(200);
    const rows =
      await sql()`SELECT DISTINCT address FROM audit_log WHERE action = 'user.login' AND object_name LIKE 'default/nobody%'`;
    expect(rows.map((x) => x.address)).toEqual(["127.0.0.13"]);
  });

  test("strangers elsewhere cannot keep the owner out of an address the account logged in from", async () => {
    expect((await l7rList("yul", "yul-pw-1", "127.0.0.15")).status).toBe(200);
    for (let i = 0; i < 5; i++) await l7rList("yul", `botnet-${i}`, `127.0.1.${i + 1}`);
    expect((await l7rList("yul", "yul-pw-1", "127.0.1.99")).status).toBe(429);
    expect((await l7rList("yul", "yul-pw-1", "127.0.0.15")).status).toBe(200);
  });

  test("an unknown user or tenant answers as a known one does", async () => {
    const a = await l7rList("wes", "wrong", "127.0.0.16");
    const b = await l7rList("nosuchuser", "wrong", "127.0.0.17");
    const c = await l7rList("wes@nosuchtenant", "wrong", "127.0.0.18");
    expect([b, c]).toEqual([a, a]);
    expect(a.status).toBe(401);
  });
});

// --- the pure parts -------------------------------------------------------------------------------

test("client address: only trusted peers may name another, and only the hop left of the trusted ones counts", () => {
  const trusted = trustedProxies("10.0.0.0/8, 192.0.2.1, ::1");
  expect(clientAddress("198.51.100.9", "203.0.113.1", trusted)).toBe("198.51.100.9"); // untrusted peer
  expect(clientAddress("10.1.2.3", "203.0.113.1", trusted)).toBe("203.0.113.1");
  expect(clientAddress("10.1.2.3", "6.6.6.6, 203.0.113.1, 10.9.9.9", trusted)).toBe("203.0.113.1"); // forged left hop ignored
  expect(clientAddress("::ffff:10.1.2.3", "203.0.113.1", trusted)).toBe("203.0.113.1"); // IPv4-mapped peer
  expect(clientAddress("::1", "2001:db8::7", trusted)).toBe("2001:db8::7");
  expect(clientAddress("10.1.2.3", "not-an-address, 203.0.113.1", trusted)).toBe("203.0.113.1");
  expect(clientAddress("10.1.2.3", "203.0.113.1, <script>", trusted)).toBe("10.1.2.3"); // garbage: the last trusted hop
  expect(clientAddress("10.1.2.3", "", trusted)).toBe("10.1.2.3");
  expect(clientAddress("10.1.2.3", "10.4.4.4, 192.0.2.1", trusted)).toBe("10.4.4.4"); // all trusted: the farthest
  expect(clientAddress("10.1.2.3", "203.0.113.1", trustedProxies(""))).toBe("10.1.2.3");
});

test("throttle decision: free tries, then one try per announced wait; tries in flight hold the slot; old failures are forgotten", () => {
  const p = { ...DEFAULT_POLICY, delayS: 2, maxDelayS: 8, forgetS: 3600 };
  const now = new Date("2026-01-01T12:00:00Z");
  const at = (s: number) => new Date(now.getTime() + s * 1000);
  const row = (failures: number, failedAgo: number | null, pending = 0, leaseLeft = 60) => ({
    key: "k",
    failures,
    failed_at: failedAgo === null ? null : at(-failedAgo),
    pending,
    pending_until: pending ? at(leaseLeft) : null,
  });
  expect(decide(row(0, null), 3, now, p).admit).toBe(true);
  expect(decide(row(2, 0, 0), 3, now, p).admit).toBe(true); // the third free try
  expect(decide(row(2, 0, 1), 3, now, p)).toEqual({ admit: false, waitS: 2 }); // the third is in flight
  expect(decide(row(3, 1), 3, now, p)).toEqual({ admit: false, waitS: 1 }); // 1 s of the 2 s wait left
  expect(decide(row(3, 2), 3, now, p).admit).toBe(true); // the wait is over: one try
  expect(decide(row(3, 2, 1), 3, now, p)).toEqual({ admit: false, waitS: 4 }); // …and only one
  expect(decide(row(3, 2, 1, -1), 3, now, p).admit).toBe(true); // a try whose process died holds its slot only for its lease
  expect(decide(row(10, 7), 3, now, p)).toEqual({ admit: false, waitS: 1 }); // capped at max_delay (8 s)
  expect(decide(row(10, 3601), 3, now, p).admit).toBe(true); // forgotten
  const d = decide(row(10, 3601), 3, now, p);
  expect(d.admit && d.update.failures).toBe(0);
});
