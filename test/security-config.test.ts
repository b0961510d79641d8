// The control plane as an attacker with a tenant's administrator account sees it: config scopes
// (farm-wide keys stay farm-wide), the farm's LDAP credentials never sent to a tenant's server,
// secrets masked in answers, the audit log and `qvd config show`, CSRF on cookie sessions, the
// API's idle timeout and event-stream limits, and VM addresses that are never handed out twice.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { connect as tcpConnect, createServer, type Server } from "node:net";
import { join } from "node:path";
import { authenticateLogin, tenantConfig } from "../src/auth/chain.ts";
import { Config, KEYS, loadConfig, type ConfigKey } from "../src/config.ts";
import { checkDatabaseTls } from "../src/db/pool.ts";
import { useTestApi, type ApiClient } from "./support/api.ts";
import { ok } from "./support/assert.ts";
import { TEST_ADMIN, useTestDatabase } from "./support/db.ts";
import { LDAP_SUFFIX, LdapServer } from "./support/ldap.ts";
import { waitFor, within } from "./support/wait.ts";

const db = useTestDatabase();
const sql = () => db().sql;
const PEOPLE = `ou=people,${LDAP_SUFFIX}`;
const READER = `cn=reader,${LDAP_SUFFIX}`;
const FARM_PW = "farm-reader-secret-pw";
const LDIF = [
  `dn: ${LDAP_SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n`,
  `dn: ${PEOPLE}\nobjectClass: organizationalUnit\nou: people\n`,
  `dn: ${READER}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\ncn: reader\nuserPassword: ${FARM_PW}\n`,
  `dn: uid=alice,${PEOPLE}\nobjectClass: inetOrgPerson\nuid: alice\ncn: alice\nsn: alice\nuserPassword: alice-ldap-pw\n`,
].join("\n");

const IDLE_S = 4;
const ldap = new LdapServer();
let boss: ApiClient; // the Tenant administrator of acme
let acme: number;

beforeAll(async () => {
  const { ensureDeps } = await import("../scripts/deps.ts");
  await ensureDeps(["slapd", "ldap-utils", "openssl"], () => {});
  await ldap.start(LDIF);
}, 120_000);
const live = useTestApi(db, {
  "wat.multitenant": "1",
  "api.timeout.idle": String(IDLE_S),
  "api.events.max_streams": "3",
  "api.events.max_streams_per_admin": "2",
});
const { api, sa } = live;
beforeAll(async () => {
  acme = (await ok(sa.post("/tenants", { name: "acme" }), 201)).id;
  boss = (await live.admin("boss", { tenantId: acme, tenant: "acme", roles: ["Tenant administrator"] })).client;
});
afterAll(async () => {
  await ldap.stop();
});

describe("config scopes", () => {
  test("every key says whether a tenant may override it; only cluster keys may, and followers name keys", () => {
    for (const [k, d] of Object.entries(KEYS)) {
      expect([k, typeof d.tenant]).toEqual([k, "boolean"]);
      if (d.tenant) expect([k, d.scope]).toEqual([k, "cluster"]);
      if ("sameScopeAs" in d && d.sameScopeAs) expect([k, d.sameScopeAs in KEYS]).toEqual([k, true]);
    }
    for (const k of [
      "auth.ldap.bind_password",
      "auth.ldap.bind_dn",
      "auth.ldap.starttls",
      "auth.ldap.ca_file",
      "auth.ldap.ca",
    ] as ConfigKey[])
      expect([k, (KEYS[k] as { sameScopeAs?: string }).sameScopeAs]).toEqual([k, "auth.ldap.url"]);
    expect(KEYS["hkd.fence_after"].tenant).toBe(false);
    expect(KEYS["l7r.auth.plugins"].tenant).toBe(true);
  });

  test("a farm-wide key cannot be set for a tenant: 403 for the tenant's administrator and for a superadministrator", async () => {
    // auth.ldap.ca_file too: a tenant naming a node file would make the L7R read it (tenants give auth.ldap.ca).
    for (const key of [
      "vm.network.range",
      "hkd.fence_after",
      "cluster.lost_after",
      "wat.multitenant",
      "api.session.ttl",
      "auth.ldap.ca_file",
    ]) {
      const value =
        key === "vm.network.range"
          ? "10.9.0.0/16"
          : key === "wat.multitenant"
            ? "0"
            : key === "auth.ldap.ca_file"
              ? "/etc/shadow"
              : "3600";
      const mine = await boss.put(`/configs/${key}`, { value });
      expect([key, mine.status]).toEqual([key, 403]);
      expect(mine.body.error.message).toBe(`${key} is a farm-wide setting: a tenant cannot override it`);
      expect([key, (await sa.put(`/configs/${key}`, { value, tenant_id: acme })).status]).toEqual([key, 403]);
    }
    expect((await sql()`SELECT count(*)::int AS n FROM configs WHERE tenant_id = ${acme}`)[0]!.n).toBe(0);
    // A tenant's own business still works.
    expect((await ok(boss.put("/configs/auth.ldap.timeout", { value: "3" }))).value).toBe("3");
    await ok(boss.del("/configs/auth.ldap.timeout"));
  });

  test("a tenant's own value of a key it may override is used: its TOTP issuer", async () => {
    await ok(boss.put("/configs/auth.totp.issuer", { value: "Acme VDI" }));
    try {
      const u = (await ok(boss.post("/users", { name: "totp-user", password: "totp-user-pw" }), 201)).id;
      expect((await ok(boss.post(`/users/${u}/totp`))).uri).toStartWith("otpauth://totp/Acme%20VDI:");
      const other = (await ok(sa.post("/users", { tenant_id: 1, name: "totp-user", password: "totp-user-pw" }), 201))
        .id;
      expect((await ok(sa.post(`/users/${other}/totp`))).uri).toStartWith("otpauth://totp/QVD:");
    } finally {
      await ok(boss.del("/configs/auth.totp.issuer"));
    }
  });

  test("rows of farm-wide keys already in a tenant's scope are ignored, with a warning", async () => {
    await sql()`INSERT INTO configs (tenant_id, key, value) VALUES (${acme}, 'hkd.fence_after', '7'), (${acme}, 'vm.network.range', '10.66.0.0/16')`;
    try {
      const warnings: string[] = [];
      const cfg = new Config().withDatabase(
        [
          { tenantId: 0, key: "hkd.fence_after", value: "100" },
          { tenantId: acme, key: "hkd.fence_after", value: "7" },
          { tenantId: acme, key: "osf.default.memory", value: "512" },
        ],
        (m) => warnings.push(m),
      );
      expect(cfg.get("hkd.fence_after")).toBe(100);
      expect(cfg.get("osf.default.memory")).toBe(512);
      expect(warnings).toEqual([
        `ignoring database config hkd.fence_after of tenant ${acme}: tenants may not override it`,
      ]);
      // The L7R's per-tenant view and the API's agree.
      const tcfg = await tenantConfig(sql(), loadConfig({ env: {}, defaultFileExists: () => false }), acme);
      expect(tcfg.get("vm.network.range")).toBe("198.18.0.0/16");
      const items = (await ok(sa.get(`/configs?tenant_id=${acme}`))).items;
      expect(items.find((i: any) => i.key === "vm.network.range")).toMatchObject({
        value: "198.18.0.0/16",
        source: "default",
        tenant: false,
      });
    } finally {
      await sql()`DELETE FROM configs WHERE tenant_id = ${acme}`;
    }
  });
});

/** A TCP listener on loopback that records what it receives and never answers. */
async function recorder(): Promise<{ url: string; received: () => string; close: () => Promise<void> }> {
  const chunks: Buffer[] = [];
  const server: Server = createServer((s) => {
    s.on("data", (d: Buffer) => chunks.push(d));
    s.on("error", () => {});
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const port = (server.address() as { port: number }).port;
  return {
    url: `ldap://127.0.0.1:${port}`,
    received: () => Buffer.concat(chunks).toString("latin1"),
    close: () =>
      new Promise<void>((r) => {
        server.close(() => r());
        (server as unknown as { closeAllConnections?: () => void }).closeAllConnections?.();
      }),
  };
}

describe("LDAP credentials go only where their scope sends them", () => {
  const nodeCfg = () =>
    loadConfig({
      env: {},
      defaultFileExists: () => false,
      flags: [{ flag: "--set", key: "wat.multitenant", value: "1" }],
    });

  beforeAll(async () => {
    // The farm's directory: search then bind with the farm's service account (a real slapd).
    await ok(sa.put("/configs/l7r.auth.plugins", { value: "ldap" }));
    await ok(sa.put("/configs/auth.ldap.url", { value: ldap.url }));
    await ok(sa.put("/configs/auth.ldap.search_base", { value: PEOPLE }));
    await ok(sa.put("/configs/auth.ldap.bind_dn", { value: READER }));
    await ok(sa.put("/configs/auth.ldap.bind_password", { value: FARM_PW }));
    await ok(sa.post("/users", { tenant_id: 1, name: "alice" }), 201);
    await ok(sa.post("/users", { tenant_id: acme, name: "alice" }), 201);
  });
  afterAll(async () => {
    await sql()`DELETE FROM configs WHERE key LIKE 'auth.%' OR key LIKE 'l7r.auth.%'`;
  });

  test("the farm's own directory works with the farm's service account", async () => {
    const r = await authenticateLogin(sql(), nodeCfg(), { login: "alice@default", password: "alice-ldap-pw" });
    expect(r.ok).toBe(true);
  });

  test("a tenant's administrator points auth.ldap.url at their server: it never receives the farm's bind DN or password", async () => {
    const rec = await recorder();
    try {
      await ok(boss.put("/configs/auth.ldap.url", { value: rec.url }));
      await ok(boss.put("/configs/auth.ldap.timeout", { value: "1" }));
      const r = await authenticateLogin(sql(), nodeCfg(), { login: "alice@acme", password: "alice-ldap-pw" });
      expect(r.ok).toBe(false);
      expect(rec.received()).not.toContain(FARM_PW);
      expect(rec.received()).not.toContain(READER);
      const tcfg = await tenantConfig(sql(), nodeCfg(), acme);
      expect([tcfg.get("auth.ldap.bind_dn"), tcfg.get("auth.ldap.bind_password")]).toEqual(["", ""]);

      // Control: the same listener does see a bind account, when it is the tenant's own.
      await ok(boss.put("/configs/auth.ldap.bind_dn", { value: "cn=acme-reader,dc=acme" }));
      await ok(boss.put("/configs/auth.ldap.bind_password", { value: "acme-own-pw" }));
      expect((await authenticateLogin(sql(), nodeCfg(), { login: "alice@acme", password: "alice-ldap-pw" })).ok).toBe(
        false,
      );
      expect(rec.received()).toContain("acme-own-pw");
      expect(rec.received()).not.toContain(FARM_PW);
    } finally {
      await sql()`DELETE FROM configs WHERE tenant_id = ${acme}`;
      await rec.close();
    }
  });

  test("the farm's credentials set in node.conf, the environment or flags do not follow a tenant's URL either", () => {
    const cfg = loadConfig({
      env: { QVD_AUTH_LDAP_BIND_PASSWORD: FARM_PW },
      defaultFileExists: () => false,
      flags: [{ flag: "--set auth.ldap.bind_dn", key: "auth.ldap.bind_dn", value: READER }],
    });
    const tenant = cfg.withDatabase([
      { tenantId: 0, key: "auth.ldap.url", value: ldap.url },
      { tenantId: 7, key: "auth.ldap.url", value: "ldap://tenant.example:389" },
    ]);
    expect([tenant.get("auth.ldap.bind_dn"), tenant.get("auth.ldap.bind_password")]).toEqual(["", ""]);
    const farm = cfg.withDatabase([{ tenantId: 0, key: "auth.ldap.url", value: ldap.url }]);
    expect([farm.get("auth.ldap.bind_dn"), farm.get("auth.ldap.bind_password")]).toEqual([READER, FARM_PW]);
  });

  test("a tenant cannot turn off StartTLS or swap the credentials towards the farm's server", () => {
    const cfg = new Config().withDatabase([
      { tenantId: 0, key: "auth.ldap.url", value: "ldap://farm.example:389" },
      { tenantId: 0, key: "auth.ldap.starttls", value: "1" },
      { tenantId: 0, key: "auth.ldap.bind_password", value: FARM_PW },
      { tenantId: 7, key: "auth.ldap.starttls", value: "0" },
      { tenantId: 7, key: "auth.ldap.bind_dn", value: "cn=admin,dc=example,dc=org" },
    ]);
    expect(cfg.get("auth.ldap.starttls")).toBe(true);
    expect(cfg.get("auth.ldap.bind_dn")).toBe("");
    expect(cfg.get("auth.ldap.bind_password")).toBe(FARM_PW);
  });
});

describe("secrets are masked", () => {
  const SECRET = "audit-me-not-pw";

  test("PUT /configs of a secret: not echoed, not in the audit log, not in GET /configs (global and tenant)", async () => {
    const put = await sa.put("/configs/auth.ldap.bind_password", { value: SECRET });
    expect(put.status).toBe(200);
    expect(put.body.value).toBe("********");
    const mine = await boss.put("/configs/auth.ldap.bind_password", { value: SECRET + "-acme" });
    expect(mine.status).toBe(200);
    expect(JSON.stringify(mine.body)).not.toContain(SECRET);
    // A refused request is audited too, and masked as well.
    expect((await sa.put("/configs/auth.ldap.bind_password", { value: SECRET, tenant_id: 99999 })).status).toBe(404);
    expect((await sa.put("/configs/auth.ldap.bind_passwd", { value: SECRET })).status).toBe(404);
    const entries = await sql()`SELECT arguments::text AS a FROM audit_log WHERE action = 'config.set'`;
    expect(entries.length).toBeGreaterThanOrEqual(4);
    for (const e of entries) expect(e.a).not.toContain(SECRET);
    expect(JSON.stringify((await ok(sa.get("/audit?limit=1000"))).items)).not.toContain(SECRET);
    for (const path of ["/configs", `/configs?tenant_id=${acme}`])
      expect(JSON.stringify(await ok(sa.get(path)))).not.toContain(SECRET);
    expect(JSON.stringify(await ok(boss.get("/configs")))).not.toContain(SECRET);
    // A non-secret value is still shown in the audit log.
    await ok(sa.put("/configs/auth.ldap.search_filter", { value: "(cn=%u)" }));
    const [last] = await sql()`SELECT arguments FROM audit_log WHERE action = 'config.set' ORDER BY id DESC LIMIT 1`;
    expect(last!.arguments).toMatchObject({ value: "(cn=%u)" });
  });

  test("qvd config show masks secrets that come from the database", async () => {
    const p = Bun.spawn(
      [process.execPath, "src/main.ts", "config", "show", "--json", "--db", db().url, "--tenant", String(acme)],
      {
        cwd: join(import.meta.dir, ".."),
        env: { PATH: process.env.PATH ?? "/usr/bin:/bin", HOME: process.env.HOME ?? "/root" },
        stdout: "pipe",
        stderr: "pipe",
      },
    );
    const [out, code] = [await new Response(p.stdout).text(), await p.exited];
    expect(code).toBe(0);
    expect(out).not.toContain(SECRET);
    const s = JSON.parse(out).settings.find((x: { key: string }) => x.key === "auth.ldap.bind_password");
    // The tenant's own password is not used without its own URL: the farm's (also masked) is.
    expect(s).toMatchObject({ value: "********", source: "database (global)" });
  });
});

describe("VM addresses", () => {
  let host: number;
  let user: number;
  let osf: number;
  const newVm = async (name: string) => ok(sa.post("/vms", { user_id: user, osf_id: osf, name }), 201);
  const setState = (vm: number, state: string, address: string | null) =>
    sql()`UPDATE vm_runtimes SET vm_state = ${state}, host_id = ${state === "stopped" ? null : host}, vm_address = ${address} WHERE vm_id = ${vm}`;

  beforeAll(async () => {
    host = (await ok(sa.post("/hosts", { name: "node-addr", address: "198.18.0.250" }), 201)).id;
    user = (await ok(sa.post("/users", { tenant_id: acme, name: "addr-user" }), 201)).id;
    osf = (await ok(sa.post("/osfs", { tenant_id: acme, name: "addr-osf" }), 201)).id;
  });

  test("a VM that is not stopped keeps its address: PATCH ip (null or another) is 409 naming the state, also in a mass change", async () => {
    const vm = await newVm("addr-running");
    for (const state of ["starting", "running", "stopping", "zombie"]) {
      await setState(vm.id, state, state === "zombie" ? null : vm.ip);
      for (const ip of [null, "198.18.99.99"]) {
        const r = await boss.patch(`/vms/${vm.id}`, { ip });
        expect([state, ip, r.status]).toEqual([state, ip, 409]);
        expect(r.body.error.message).toBe(
          `vm "addr-running" is ${state}: its address cannot change until it is stopped`,
        );
      }
      const mass = await boss.patch(`/vms?id=${vm.id}`, { ip: null });
      expect(mass.body.results).toEqual([expect.objectContaining({ id: vm.id, ok: false, status: 409 })]);
      expect((await ok(sa.get(`/vms/${vm.id}`))).ip).toBe(vm.ip);
    }
    // The next VM does not get it; other changes of the running VM still work.
    expect((await newVm("addr-next")).ip).not.toBe(vm.ip);
    expect((await ok(boss.patch(`/vms/${vm.id}`, { description: "still fine" }))).description).toBe("still fine");
    // Stopped, its address may change and be freed.
    await setState(vm.id, "stopped", null);
    expect((await ok(boss.patch(`/vms/${vm.id}`, { ip: null }))).ip).toBeNull();
  });

  test("an address a desktop still runs with is not handed out, and no two desktops run with one address", async () => {
    // As a database from before this fix may hold it: a running desktop whose VM lost its ip.
    const old = await newVm("addr-legacy");
    await sql()`ALTER TABLE vms DISABLE TRIGGER vms_ip_guard`;
    try {
      await setState(old.id, "running", old.ip);
      await sql()`UPDATE vms SET ip = NULL WHERE id = ${old.id}`;
    } finally {
      await sql()`ALTER TABLE vms ENABLE TRIGGER vms_ip_guard`;
    }
    const next = await newVm("addr-after-legacy");
    expect(next.ip).not.toBe(old.ip);
    // A node starting a VM with an address in use is refused before the desktop runs.
    const { saveStartingRuntime } = await import("../src/db/node.ts");
    await sql()`UPDATE vm_runtimes SET vm_state = 'starting', host_id = ${host} WHERE vm_id = ${next.id}`;
    await expect(
      saveStartingRuntime(sql(), host, next.id, {
        diId: 0,
        osfId: osf,
        address: old.ip,
        vmaPort: 3030,
        xPort: 4100,
        vmaSecret: "s",
      }),
    ).rejects.toThrow(`address ${old.ip} is in use by another running desktop`);
    await expect(sql()`UPDATE vm_runtimes SET vm_address = ${old.ip} WHERE vm_id = ${next.id}`).rejects.toThrow(
      /vm_runtimes_address/,
    );
    await setState(next.id, "stopped", null);
    await setState(old.id, "stopped", null);
  });
});

describe("CSRF: changes authenticated by the session cookie", () => {
  let cookie: string;
  let target: number;
  const blocked = async () => (await ok(sa.get(`/users/${target}`))).blocked as boolean;
  const raw = (path: string, headers: Record<string, string>, body?: string) =>
    fetch(api.url + path, { method: "POST", headers, body }).then(async (r) => ({
      status: r.status,
      body: (await r.json()) as any,
    }));

  beforeAll(async () => {
    const r = await fetch(`${api.url}/login`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ name: TEST_ADMIN.name, password: TEST_ADMIN.password, tenant: "*" }),
    });
    cookie = /qvd_session=[^;]+/.exec(r.headers.get("set-cookie") ?? "")![0];
    target = (await ok(sa.post("/users", { tenant_id: acme, name: "csrf-target" }), 201)).id;
  });

  test("what a cross-site page can send is refused with 403 and changes nothing", async () => {
    const host = new URL(api.url).host;
    for (const [what, headers, body] of [
      ["no body, no type, no Origin", {}, undefined],
      ["text/plain", { "content-type": "text/plain" }, "{}"],
      ["a form", { "content-type": "application/x-www-form-urlencoded" }, "a=1"],
      ["JSON from another Origin", { "content-type": "application/json", origin: "http://evil.example" }, "{}"],
      ["JSON, Origin null", { "content-type": "application/json", origin: "null" }, "{}"],
      ["Sec-Fetch-Site cross-site", { "content-type": "application/json", "sec-fetch-site": "cross-site" }, "{}"],
      ["Sec-Fetch-Site same-site", { "sec-fetch-site": "same-site", origin: `http://${host}` }, undefined],
      ["a Basic header is not a bearer", { authorization: "Basic eDp5" }, undefined],
    ] as [string, Record<string, string>, string | undefined][]) {
      const r = await raw(`/users/${target}/block`, { cookie, ...headers }, body);
      expect([what, r.status]).toEqual([what, 403]);
      expect(r.body.error.message).toMatch(
        /^(cross-site request refused|a change authenticated by the session cookie needs Content-Type: application\/json)/,
      );
    }
    expect(await blocked()).toBe(false);
    // Logging out (or in) by a cross-site request does not work either.
    expect((await raw("/logout", { cookie, "content-type": "text/plain" })).status).toBe(403);
    expect((await fetch(`${api.url}/session`, { headers: { cookie } })).status).toBe(200);
    const login = await raw(
      "/login",
      { origin: "http://evil.example" },
      JSON.stringify({ name: "boss", password: "boss-password", tenant: "acme" }),
    );
    expect(login.status).toBe(403);
  });

  test("the WAT's own requests, JSON clients and bearer tokens pass", async () => {
    const host = new URL(api.url).host;
    for (const [what, headers, body, path] of [
      ["JSON", { "content-type": "application/json" }, "{}", "block"],
      ["same Origin, no body", { origin: `http://${host}` }, undefined, "unblock"],
      [
        "Sec-Fetch-Site same-origin, no body",
        { "sec-fetch-site": "same-origin", origin: `http://${host}` },
        undefined,
        "block",
      ],
    ] as [string, Record<string, string>, string | undefined, string][]) {
      const r = await raw(`/users/${target}/${path}`, { cookie, ...headers }, body);
      expect([what, r.status]).toEqual([what, 200]);
    }
    expect(await blocked()).toBe(true);
    expect((await raw(`/users/${target}/unblock`, { authorization: `Bearer ${sa.token}` })).status).toBe(200);
    expect(await blocked()).toBe(false);
    // Without a session at all it stays a 401.
    expect((await raw(`/users/${target}/block`, {})).status).toBe(401);
  });
});

describe("API limits", () => {
  /** Opens an event stream; resolves once it is `ready` (or with the refusal). */
  async function openStream(c: ApiClient): Promise<{
    status: number;
    body?: any;
    events: string[];
    close: () => void;
    next: (event: string) => Promise<void>;
  }> {
    const abort = new AbortController();
    const res = await c.request("/events", { signal: abort.signal });
    if (res.status !== 200)
      return {
        status: res.status,
        body: { ...((await res.json()) as object), retryAfter: res.headers.get("retry-after") },
        events: [],
        close: () => {},
        next: async () => {},
      };
    const reader = res.body!.getReader();
    const events: string[] = [];
    let buf = "";
    const next = async (event: string) => {
      for (;;) {
        const i = events.indexOf(event);
        if (i >= 0) return void events.splice(0, i + 1);
        const { value, done } = await reader.read();
        if (done) throw new Error(`the stream ended before ${event}`);
        buf += new TextDecoder().decode(value);
        let k: number;
        while ((k = buf.indexOf("\n\n")) >= 0) {
          const m = /event: (\w+)/.exec(buf.slice(0, k));
          if (m) events.push(m[1]!);
          buf = buf.slice(k + 2);
        }
      }
    };
    await next("ready");
    return { status: 200, events, next, close: () => abort.abort() };
  }

  test("an administrator's third event stream is 429, the process's fourth is 503; closing one frees its slot", async () => {
    const a1 = await openStream(sa);
    const a2 = await openStream(sa);
    expect([a1.status, a2.status]).toEqual([200, 200]);
    const a3 = await openStream(sa);
    expect(a3.status).toBe(429);
    expect(a3.body.error.message).toBe(
      "too many event streams: you already have 2 open (close another tab or session)",
    );
    expect(a3.body.retryAfter).toBe("5");
    const b1 = await openStream(boss);
    expect(b1.status).toBe(200);
    const other = await api.login("boss", "boss-password", "acme"); // another session of boss: still boss's quota
    const b2 = await openStream(other);
    expect(b2.status).toBe(503);
    expect(b2.body.error.message).toBe("the API serves as many event streams as it may; try again later");
    a1.close();
    // a1's slot is given back once the server has seen it close.
    const again = await waitFor(
      "a stream once a1 is closed",
      async () => {
        const s = await openStream(sa);
        return s.status === 200 && s;
      },
      5000,
      50,
    );
    expect(again.status).toBe(200);
    for (const s of [a2, b1, again]) s.close();
  });

  test("an administrator's request that takes longer than api.timeout.idle is answered, and the timeout then holds again", async () => {
    const o = (await ok(sa.post("/osfs", { tenant_id: acme, name: "slow-target" }), 201)).id;
    // The handler waits on a table lock held for longer than the idle timeout (Bun counts a
    // handler's time as idle for a request without a body).
    let release!: () => void;
    const held = new Promise<void>((r) => (release = r));
    let locked!: () => void;
    const isLocked = new Promise<void>((r) => (locked = r));
    const tx = sql().begin(async (t) => {
      await t`LOCK TABLE osfs IN ACCESS EXCLUSIVE MODE`;
      locked();
      await held;
    });
    await isLocked;
    const timer = setTimeout(release, (IDLE_S + 2) * 1000);
    // One raw keep-alive connection: the answer comes on it, then it is closed once silent again.
    const { hostname, port, pathname } = new URL(api.url);
    const sock = tcpConnect(Number(port), hostname);
    sock.on("error", () => {});
    let answer = "";
    sock.on("data", (d: Buffer) => (answer += d.toString()));
    const closed = new Promise<void>((r) => sock.once("close", () => r()));
    sock.write(`GET ${pathname}/osfs/${o} HTTP/1.1\r\nHost: ${hostname}\r\nAuthorization: Bearer ${sa.token}\r\n\r\n`);
    await closed; // the test times out when the connection stays open
    clearTimeout(timer);
    release();
    await tx;
    expect(answer).toStartWith("HTTP/1.1 200");
    expect(answer).toContain('"name":"slow-target"');
  }, 30_000);

  test("a silent connection is closed after api.timeout.idle; an event stream lives on through its keep-alives", async () => {
    const { hostname, port } = new URL(api.url);
    const stream = await openStream(sa);
    const silent = tcpConnect(Number(port), hostname);
    silent.on("error", () => {});
    await new Promise<void>((r) => silent.once("connect", () => r()));
    await within(
      new Promise<void>((r) => silent.once("close", () => r())),
      15_000,
      "close of the silent connection (api.timeout.idle is 4 s)",
    );
    // The stream was open all along, longer than the idle timeout, and still gets keep-alives (every 2 s here).
    await within(
      (async () => {
        for (let i = 0; i < 3; i++) await stream.next("ping");
      })(),
      10_000,
      "three keep-alives on the event stream",
    );
    stream.close();
  }, 30_000);
});

describe("the database hop", () => {
  test("a database on another host needs TLS in its URL; sockets and loopback do not", () => {
    expect(() => checkDatabaseTls("postgres://qvd:pw@db.example/qvd")).toThrow(
      /database on db\.example is reached over the network: add \?sslmode=verify-full/,
    );
    expect(() => checkDatabaseTls("postgres://qvd:pw@10.1.2.3:5432/qvd?sslmode=prefer")).toThrow(
      /sslmode=prefer is not enough/,
    );
    expect(() => checkDatabaseTls("postgres://qvd:pw@db.example/qvd")).not.toThrow(/pw/);
    for (const ok of [
      "postgres://qvd@db.example/qvd?sslmode=verify-full",
      "postgres://qvd@db.example/qvd?sslmode=require",
      "postgres://qvd@db.example/qvd?sslmode=disable",
      "postgres://qvd@127.0.0.1:5432/qvd",
      "postgres://qvd@localhost/qvd",
      "postgres://qvd@[::1]:5432/qvd",
      "postgres://postgres@/qvd?host=/run/postgresql",
    ])
      expect(() => checkDatabaseTls(ok)).not.toThrow();
  });
});
