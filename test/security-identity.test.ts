// Identity and the control plane: identity properties (qvd.vm.user.*) are the product's
// (ACL of their own, ranges, allow-list; checked by the API, at LDAP login, by the L7R and by the
// VMA), user and tenant names are single directory names, escalation is checked for every
// administrator who does not hold every ACL, a password change ends the other sessions and the
// user's L7R tokens, tokens cannot mint tokens, and administrators revoke a user's tokens.
// Real API, L7R (TLS), PostgreSQL, slapd and `qvd vma` processes; nothing mocked.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { authenticateUser } from "../src/auth/chain.ts";
import type { AuthResult } from "../src/auth/user-auth.ts";
import { Config } from "../src/config.ts";
import * as D from "../src/db/index.ts";
import { startL7r, type L7r } from "../src/l7r/server.ts";
import { useTestApi, type ApiClient } from "./support/api.ts";
import { TEST_ADMIN, useTestDatabase } from "./support/db.ts";
import { LDAP_SUFFIX, LdapServer } from "./support/ldap.ts";
import { cleanEnv, desktopImage, TestNode } from "./support/node.ts";
import { basic, WireClient } from "./support/qvd-wire.ts";
import { poll, until } from "./support/wait.ts";
import { selfSignedCert } from "./support/tls.ts";
import { capture, stopAll } from "./support/spawn.ts";
import { freePort } from "./support/free.ts";
import { writeVmaConfig } from "./support/vma-config.ts";

const db = useTestDatabase();
const sql = () => db().sql;
const ALL = D.ALL_TENANTS;
const repo = join(import.meta.dir, "..");
const work = mkdtempSync(join(tmpdir(), "qvd-sec-id-"));
chmodSync(work, 0o755);

const live = useTestApi(db, { "wat.multitenant": "1" }, { tenant: "*" });
const { api, sa } = live;
let boss: ApiClient; // acme's Tenant administrator
const t: Record<string, number> = {};
const u: Record<string, number> = {};
const role: Record<string, number> = {};
let acmeOsf: number;

const HOME = "qvd.vm.user.home";
const UID = "qvd.vm.user.uid";
const GID = "qvd.vm.user.gid";
const GROUPS = "qvd.vm.user.groups";

beforeAll(async () => {
  for (const n of ["acme", "beta"]) t[n] = (await sa.post("/tenants", { name: n })).body.id;
  for (const n of ["Superadmin", "Tenant administrator", "Operator"])
    role[n] = (await sa.get(`/roles?name=${encodeURIComponent(n)}`)).body.items[0].id;
  for (const key of [HOME, UID, GID, GROUPS, "site.note"])
    expect((await sa.post("/properties", { tenant_id: 0, key, applies_to: ["user", "vm", "osf", "di"] })).status).toBe(
      201,
    );
  u.alice = (await sa.post("/users", { tenant_id: t.acme, name: "alice", password: "alice-pw-1" })).body.id;
  u.bob = (await sa.post("/users", { tenant_id: t.beta, name: "bob", password: "bob-pw-1" })).body.id;
  acmeOsf = (await sa.post("/osfs", { tenant_id: t.acme, name: "desk", memory_mb: 256 })).body.id;
  boss = (await live.admin("boss", { tenantId: t.acme!, tenant: "acme", roles: [role["Tenant administrator"]!] }))
    .client;
});

afterAll(() => {
  rmSync(work, { recursive: true, force: true });
});

describe("identity properties", () => {
  const BAD: [string, string][] = [
    [HOME, "/etc"],
    [UID, "0"],
    [GID, "42"],
    [GROUPS, "shadow,sudo"],
  ];

  test("the built-in Tenant administrator cannot set or remove them (403 naming property.identity); other properties yes", async () => {
    const acls = (await sa.get(`/roles/${role["Tenant administrator"]}/acls`)).body.items as string[];
    expect(acls).not.toContain("property.identity");
    expect((await sa.get(`/roles/${role.Superadmin}/acls`)).body.items).toContain("property.identity");
    for (const [key, value] of BAD) {
      for (const path of [`/users/${u.alice}`, `/osfs/${acmeOsf}`]) {
        const r = await boss.put(`${path}/properties/${key}`, { value });
        expect(r.status, `${path} ${key}=${value}`).toBe(403);
        expect(r.body.error.message).toContain("property.identity");
      }
    }
    // A value within the rules is refused too: who may set them at all is the point.
    expect((await boss.put(`/users/${u.alice}/properties/${HOME}`, { value: "/home/alice" })).status).toBe(403);
    expect((await boss.put(`/users/${u.alice}/properties/site.note`, { value: "hello" })).status).toBe(200);
    expect((await sa.put(`/users/${u.alice}/properties/${UID}`, { value: "20001" })).status).toBe(200);
    expect((await boss.del(`/users/${u.alice}/properties/${UID}`)).status).toBe(403); // removing changes the identity too
    expect(await (await boss.get(`/users/${u.alice}/properties`)).body).toEqual({
      "site.note": "hello",
      [UID]: "20001",
    });
  });

  test("with property.identity (granted by a superadmin): bad values 422 naming the value, good ones 200", async () => {
    const r = await sa.post("/roles", { tenant_id: t.acme, name: "identity editors" });
    expect((await sa.put(`/roles/${r.body.id}/acls`, { acl: "property.identity" })).status).toBe(200);
    const editor = await live.admin("editor", {
      tenantId: t.acme!,
      tenant: "acme",
      roles: [role["Tenant administrator"]!, r.body.id],
    });
    const bad: [string, string, string][] = [
      ...BAD.map(([k, v]): [string, string, string] => [
        k,
        v,
        k === GROUPS ? "not allowed" : k === HOME ? "not a plain directory below /home" : "outside the allowed range",
      ]),
      [HOME, "/home/../etc", "not a plain directory"],
      [HOME, "/home/alice/../../etc", "not a plain directory"],
      [HOME, "/home", "not a plain directory"],
      [HOME, "/home/", "not a plain directory"],
      [HOME, "/home//x", "not a plain directory"],
      [HOME, "/homex/alice", "not a plain directory"],
      [HOME, "home/alice", "not a plain directory"],
      [UID, "999", "outside the allowed range 10000-60000"],
      [UID, "60001", "outside"],
      [UID, "-1", "expected a number"],
      [UID, "1e5", "expected a number"],
      [GID, "4294967295", "outside"],
      [GROUPS, "audio,root", "group root not allowed"],
      [GROUPS, "adm", "group adm not allowed"],
      [GROUPS, "audio;rm", "expected group names"],
    ];
    for (const [key, value, message] of bad) {
      const res = await editor.client.put(`/users/${u.alice}/properties/${key}`, { value });
      expect(res.status, `${key}=${value}`).toBe(422);
      expect(res.body.error.field).toBe("value");
      expect(res.body.error.message).toContain(`value: ${key}: `);
      expect(res.body.error.message).toContain(message);
    }
    for (const [key, value] of [
      [HOME, "/home/acme/alice"],
      [UID, "20001"],
      [GID, "20001"],
      [GROUPS, "audio, video"],
    ] as const)
      expect(
        (await editor.client.put(`/users/${u.alice}/properties/${key}`, { value })).status,
        `${key}=${value}`,
      ).toBe(200);
    // Another tenant's object stays invisible: 404, not a range error.
    expect((await editor.client.put(`/users/${u.bob}/properties/${UID}`, { value: "1" })).status).toBe(404);
  });

  test("a superadmin is held to the ranges too; they are global settings a tenant cannot widen", async () => {
    expect((await sa.put(`/users/${u.alice}/properties/${UID}`, { value: "70000" })).status).toBe(422);
    expect((await sa.put(`/users/${u.alice}/properties/${HOME}`, { value: "/root" })).status).toBe(422);
    // Never a system id, never a privileged group, whatever the configuration says.
    expect((await sa.put("/configs/identity.uid.min", { value: "500" })).status).toBe(422);
    expect((await sa.put("/configs/identity.gid.min", { value: "0" })).status).toBe(422);
    expect((await sa.put("/configs/identity.groups.allowed", { value: "audio,sudo" })).status).toBe(422);
    expect((await sa.put("/configs/identity.home.base", { value: "/" })).status).toBe(422);
    // The global range is read when the value is written (no restart).
    expect((await sa.put("/configs/identity.uid.max", { value: "70000" })).status).toBe(200);
    try {
      expect((await sa.put(`/users/${u.alice}/properties/${UID}`, { value: "70000" })).status).toBe(200);
      // A tenant's own value, however it got there, is not used.
      const own = await sa.put("/configs/identity.uid.max", { value: "99999", tenant_id: t.acme });
      expect([own.status, own.body.error?.field]).toEqual([403, "key"]);
      expect(own.body.error.message).toContain("farm-wide setting");
      await sql()`INSERT INTO configs (tenant_id, key, value) VALUES (${t.acme!}, 'identity.uid.max', '99999')`;
      expect((await sa.put(`/users/${u.alice}/properties/${UID}`, { value: "80000" })).status).toBe(422);
    } finally {
      await sql()`DELETE FROM configs WHERE key = 'identity.uid.max'`;
    }
    expect((await sa.put(`/users/${u.alice}/properties/${UID}`, { value: "70000" })).status).toBe(422);
    expect((await sa.put(`/users/${u.alice}/properties/${UID}`, { value: "20001" })).status).toBe(200);
  });
});

describe("names", () => {
  test("user and tenant names . and .. (and other non-directory names) are refused with a 422 naming the field", async () => {
    for (const name of [".", "..", "a\\b", "tab\there", "nul\u0000"]) {
      for (const [c, who] of [
        [sa, "superadmin"],
        [boss, "tenant administrator"],
      ] as const) {
        const r = await c.post("/users", { tenant_id: t.acme, name, password: "a-password-1" });
        expect(r.status, `${who} ${JSON.stringify(name)}`).toBe(422);
        expect(r.body.error.field).toBe("name");
      }
      const rn = await sa.patch(`/users/${u.alice}`, { name });
      expect([rn.status, rn.body.error?.field]).toEqual([422, "name"]);
      const tn = await sa.post("/tenants", { name });
      expect([tn.status, tn.body.error?.field]).toEqual([422, "name"]);
    }
    expect((await sa.get(`/users?tenant_id=${t.acme}&name[like]=%25.%25`)).body.total).toBe(0);
    expect((await sa.post("/users", { tenant_id: t.acme, name: "a.b", password: "a-password-1" })).status).toBe(201); // a dot inside is a name
  });
});

describe("escalation", () => {
  test("a tenant-* administrator whose only role assigns roles cannot give themselves (or their role) more", async () => {
    const r = await sa.post("/roles", { tenant_id: 0, name: "assigners" });
    role.assigners = r.body.id;
    for (const acl of ["administrator.assign_role", "role.assign_acl", "role.assign_role"])
      expect((await sa.put(`/roles/${r.body.id}/acls`, { acl })).status).toBe(200);
    const deputy = await live.admin("deputy", { tenantId: 0, tenant: "*", roles: [r.body.id] });
    expect((await deputy.client.get("/session")).body.administrator.superadmin).toBe(true); // tenant *: the case noEscalation skipped
    const self = await deputy.client.post(`/administrators/${deputy.id}/roles`, { role_id: role.Superadmin });
    expect(self.status).toBe(403);
    expect(self.body.error.message).toContain("you can only give permissions you hold yourself");
    expect((await deputy.client.put(`/roles/${r.body.id}/acls`, { acl: "tenant.create" })).status).toBe(403);
    expect(
      (await deputy.client.post(`/roles/${r.body.id}/inherits`, { role_id: role["Tenant administrator"] })).status,
    ).toBe(403);
    expect(
      (await deputy.client.put(`/roles/${r.body.id}/acls`, { acl: "tenant.create", positive: false })).status,
    ).toBe(200); // denying is fine
    expect((await deputy.client.del(`/roles/${r.body.id}/acls/tenant.create`)).status).toBe(403); // lifting a denial gives it
    expect((await sa.get(`/administrators/${deputy.id}`)).body.roles).toEqual(["assigners"]);
    expect([...(await D.administratorEffectiveAcls(sql(), deputy.id))].sort()).toEqual([
      "administrator.assign_role",
      "role.assign_acl",
      "role.assign_role",
    ]);
    // A role within their own rights is fine (Superadmin itself may do all of it).
    const mine = await sa.post("/roles", { tenant_id: 0, name: "only assign" });
    expect((await sa.put(`/roles/${mine.body.id}/acls`, { acl: "administrator.assign_role" })).status).toBe(200);
    expect((await deputy.client.post(`/administrators/${deputy.id}/roles`, { role_id: mine.body.id })).status).toBe(
      200,
    );
  });

  test("password resets of administrators who hold more than the caller: 403, single and mass; of weaker ones: 200", async () => {
    const r = await sa.post("/roles", { tenant_id: 0, name: "password desk" });
    for (const acl of ["administrator.see", "administrator.update.password"])
      expect((await sa.put(`/roles/${r.body.id}/acls`, { acl })).status).toBe(200);
    const desk = await live.admin("desk", { tenantId: 0, tenant: "*", roles: [r.body.id] });
    const saId = (await sa.get("/session")).body.administrator.id;
    const weak = (await sa.post("/administrators", { tenant_id: t.acme, name: "weak", password: "weak-password" })).body
      .id;
    const reset = await desk.client.patch(`/administrators/${saId}`, { password: "taken-over-1" });
    expect(reset.status).toBe(403);
    expect(reset.body.error.message).toContain(
      "you can only set the password of administrators whose permissions you hold yourself",
    );
    const many = await desk.client.patch(`/administrators?name=superadmin`, { password: "taken-over-1" });
    expect(many.body).toMatchObject({ total: 1, ok: 0, failed: 1, results: [{ id: saId, ok: false, status: 403 }] });
    await api.login(TEST_ADMIN.name, TEST_ADMIN.password, "*"); // still the old password
    expect((await desk.client.patch(`/administrators/${weak}`, { password: "weak-password-2" })).status).toBe(200);
    // A tenant administrator cannot reset an administrator of their tenant who holds Superadmin.
    const strong = await live.admin("strong", { tenantId: t.acme!, tenant: "acme", roles: [role.Superadmin!] });
    expect((await boss.patch(`/administrators/${strong.id}`, { password: "taken-over-1" })).status).toBe(403);
    await api.login("strong", "strong-password", "acme");
  });

  test("blocking, renaming, deleting or demoting an administrator (or a role) that holds more than the caller: 403; weaker ones: 200", async () => {
    const r = await sa.post("/roles", { tenant_id: 0, name: "keeper" });
    for (const acl of [
      "administrator.see",
      "administrator.update",
      "administrator.delete",
      "administrator.assign_role",
      "role.see",
      "role.update",
      "role.delete",
      "role.assign_acl",
      "role.assign_role",
    ])
      expect((await sa.put(`/roles/${r.body.id}/acls`, { acl })).status).toBe(200);
    const keeper = await live.admin("keeper", { tenantId: 0, tenant: "*", roles: [r.body.id] });
    const saId = (await sa.get("/session")).body.administrator.id;
    const sup = role.Superadmin!;
    const refused = [
      await keeper.client.patch(`/administrators/${saId}`, { blocked: true }),
      await keeper.client.patch(`/administrators/${saId}`, { name: "gone" }),
      await keeper.client.del(`/administrators/${saId}`),
      await keeper.client.del(`/administrators/${saId}/roles/${sup}`),
      await keeper.client.put(`/roles/${sup}/acls`, { acl: "administrator.see", positive: false }),
      await keeper.client.patch(`/roles/${sup}`, { name: "Nobody" }),
      await keeper.client.del(`/roles/${sup}`),
    ];
    expect(refused.map((x) => x.status)).toEqual([403, 403, 403, 403, 403, 403, 403]);
    expect(refused[0]!.body.error.message).toContain(
      "you can only change administrators whose permissions you hold yourself",
    );
    const many = await keeper.client.patch(`/administrators?name=superadmin`, { blocked: true });
    expect(many.body).toMatchObject({ total: 1, ok: 0, failed: 1, results: [{ id: saId, ok: false, status: 403 }] });
    expect((await keeper.client.del(`/administrators?name=superadmin`)).body).toMatchObject({ ok: 0, failed: 1 });
    // Nothing changed: the superadministrator still logs in with every ACL.
    const again = await api.login(TEST_ADMIN.name, TEST_ADMIN.password, "*");
    expect((await again.get(`/administrators/${saId}/acls`)).body.items).toContain("administrator.see");
    // Administrators and roles within the keeper's own rights are theirs to manage.
    const weak = (await sa.post("/administrators", { tenant_id: 0, name: "weakling", password: "weakling-password" }))
      .body.id;
    expect((await keeper.client.patch(`/administrators/${weak}`, { blocked: true })).status).toBe(200);
    expect((await keeper.client.del(`/administrators/${weak}`)).status).toBe(200);
    const small = (await sa.post("/roles", { tenant_id: 0, name: "small" })).body.id;
    expect((await sa.put(`/roles/${small}/acls`, { acl: "role.see" })).status).toBe(200);
    expect((await keeper.client.put(`/roles/${small}/acls`, { acl: "role.see", positive: false })).status).toBe(200);
    expect((await keeper.client.del(`/roles/${small}`)).status).toBe(200);
  });
});

describe("sessions and tokens", () => {
  test("an own password change ends the account's other sessions and keeps this one; a reset by another ends all", async () => {
    const carol = await live.admin("carol", { tenantId: t.acme!, tenant: "acme", roles: [] });
    const other = await api.login("carol", "carol-password", "acme");
    expect((await other.get("/session")).status).toBe(200);
    const ch = await carol.client.put("/session/password", {
      current_password: "carol-password",
      password: "carol-password-2",
    });
    expect(ch.status).toBe(200);
    expect((await carol.client.get("/session")).status).toBe(200);
    expect((await other.get("/session")).status).toBe(401);
    const third = await api.login("carol", "carol-password-2", "acme");
    expect((await sa.patch(`/administrators/${carol.id}`, { password: "carol-password-3" })).status).toBe(200);
    expect((await carol.client.get("/session")).status).toBe(401);
    expect((await third.get("/session")).status).toBe(401);
    // Through PATCH on oneself: the session that made the change stays.
    const root = await live.admin("root3", { tenantId: 0, tenant: "*", roles: [role.Superadmin!] });
    const root2 = await api.login("root3", "root3-password", "*");
    expect((await root.client.patch(`/administrators/${root.id}`, { password: "root3-password-2" })).status).toBe(200);
    expect((await root.client.get("/session")).status).toBe(200);
    expect((await root2.get("/session")).status).toBe(401);
  });

  describe("L7R bearer tokens", () => {
    let l7r: L7r;
    const ALICE = () => basic("alice@acme", "alice-pw-1");

    async function request(path: string, auth: string) {
      const c = await WireClient.connect(l7r.port);
      c.send(`GET ${path} HTTP/1.1\r\nAuthorization: ${auth}\r\n\r\n`);
      const r = await c.response();
      c.end();
      return r;
    }
    async function token(auth: string): Promise<string> {
      const r = await request("/qvd/create_auth_token", auth);
      expect(r.status).toBe(200);
      return JSON.parse(r.body).auth_token.trim();
    }
    const bearer = (tok: string) => `Bearer ${tok}`;

    beforeAll(async () => {
      await selfSignedCert(work);
      const host = await D.create(sql(), D.hosts, ALL, { name: "sec-node", address: "127.0.0.1" });
      await sql()`UPDATE host_runtimes SET state = 'running' WHERE host_id = ${host.id}`;
      l7r = await startL7r({
        sql: sql(),
        databaseUrl: db().url,
        nodename: "sec-node",
        hostname: "127.0.0.1",
        port: 0,
        tls: { cert: join(work, "cert.pem"), key: join(work, "key.pem") },
      });
    });
    afterAll(async () => {
      await l7r?.stop();
    });

    test("a token cannot create another token (403), and is not spent by trying", async () => {
      const tok = await token(ALICE());
      const r = await request("/qvd/create_auth_token", bearer(tok));
      expect(r.status).toBe(403);
      expect(r.body).toContain("A token cannot create another token; log in with your password");
      expect((await request("/qvd/list_of_vm", bearer(tok))).status).toBe(200);
    });

    test("a user's password change through the API ends their tokens", async () => {
      const tok = await token(ALICE());
      expect((await request("/qvd/list_of_vm", bearer(tok))).status).toBe(200);
      expect((await boss.patch(`/users/${u.alice}`, { password: "alice-pw-2" })).status).toBe(200);
      expect((await request("/qvd/list_of_vm", bearer(tok))).status).toBe(401);
      expect((await boss.patch(`/users/${u.alice}`, { password: "alice-pw-1" })).status).toBe(200);
    });

    test("an administrator revokes a user's tokens (audited, CLI too); another tenant's user is a 404", async () => {
      const [t1, t2] = [await token(ALICE()), await token(ALICE())];
      const bobs = await token(basic("bob@beta", "bob-pw-1"));
      const r = await boss.post(`/users/${u.alice}/revoke_tokens`);
      expect(r.status).toBe(200);
      expect(r.body).toMatchObject({ revoked: 2, user: { id: u.alice, name: "alice" } });
      for (const tok of [t1, t2]) expect((await request("/qvd/list_of_vm", bearer(tok))).status).toBe(401);
      const audit = (await sa.get(`/audit?action=user.revoke_tokens&object_id=${u.alice}`)).body.items;
      expect(audit).toHaveLength(1);
      expect(audit[0]).toMatchObject({ ok: true, administrator_name: "boss", tenant_id: t.acme });
      // Tenant-scoped: acme's administrator does not see beta's bob.
      expect((await boss.post(`/users/${u.bob}/revoke_tokens`)).status).toBe(404);
      expect((await request("/qvd/list_of_vm", bearer(bobs))).status).toBe(200);
      // An Operator does not hold user.update.tokens.
      const op = await live.admin("op", { tenantId: t.acme!, tenant: "acme", roles: [role.Operator!] });
      expect((await op.client.post(`/users/${u.alice}/revoke_tokens`)).status).toBe(403);
      // The CLI verb.
      const t3 = await token(ALICE());
      const env = Object.assign(cleanEnv(), {
        HOME: work,
        XDG_CONFIG_HOME: join(work, ".config"),
        QVD_ADMIN_URL: api.url.replace(/\/api\/v1$/, ""),
        QVD_ADMIN_TOKEN: boss.token!,
      });
      const cli = await capture([process.execPath, "src/main.ts", "admin", "user", "revoke-tokens", "alice@acme"], {
        cwd: repo,
        env,
      });
      expect(cli.code, cli.stdout + cli.stderr).toBe(0);
      expect((await request("/qvd/list_of_vm", bearer(t3))).status).toBe(401);
    }, 30_000);
  });
});

describe("LDAP attributes", () => {
  const ldap = new LdapServer();
  const PEOPLE = `ou=people,${LDAP_SUFFIX}`;
  let tenant: number;
  const person = (uid: string, uidNumber: number, gidNumber: number, home: string) => `dn: uid=${uid},${PEOPLE}
objectClass: inetOrgPerson
objectClass: posixAccount
uid: ${uid}
cn: ${uid}
sn: ${uid}
uidNumber: ${uidNumber}
gidNumber: ${gidNumber}
homeDirectory: ${home}
userPassword: ${uid}-ldap-pw
`;

  beforeAll(async () => {
    const { ensureDeps } = await import("../scripts/deps.ts");
    await ensureDeps(["slapd", "ldap-utils", "openssl"], () => {});
    await ldap.start(
      [
        `dn: ${LDAP_SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n`,
        `dn: ${PEOPLE}\nobjectClass: organizationalUnit\nou: people\n`,
        person("rootish", 0, 0, "/root"),
        person("shadowy", 20010, 42, "/home/shadowy"),
        person("etcowner", 20011, 20011, "/etc"),
        person("sysid", 999, 20012, "/home/sysid"),
        person("fine", 20013, 20013, "/home/people/fine"),
        person("..", 20014, 20014, "/home/dotdot"),
      ].join("\n"),
    );
    tenant = (await D.create(sql(), D.tenants, ALL, { name: "ldapco" })).id;
    const settings = {
      "l7r.auth.plugins": "ldap",
      "auth.ldap.url": ldap.url,
      "auth.ldap.bind_dn_template": `uid=%u,${PEOPLE}`,
      "auth.autoprovision.enable": "1",
    };
    for (const [k, v] of Object.entries(settings)) await D.setConfig(sql(), tenant, k, v);
  }, 120_000);
  afterAll(async () => {
    await ldap.stop();
  });

  const login = (name: string): Promise<AuthResult> =>
    authenticateUser(sql(), new Config(), {
      tenantId: tenant,
      tenantName: "ldapco",
      login: name,
      password: `${name}-ldap-pw`,
    });

  test("an entry whose uid, gid or home breaks the rules is refused at login, before auto-provisioning", async () => {
    for (const [name, why] of [
      ["rootish", "uid 0 is outside"],
      ["shadowy", "gid 42 is outside"],
      ["etcowner", 'home "/etc" is not a plain directory below /home'],
      ["sysid", "uid 999 is outside"],
    ]) {
      const r = await login(name!);
      expect(r.ok, name).toBe(false);
      expect((r as { reason: string }).reason).toContain(`LDAP entry's identity refused: ${why}`);
    }
    expect((await sql()`SELECT name FROM users WHERE tenant_id = ${tenant}`).map((r) => r.name)).toEqual([]);
    const ok = await login("fine");
    expect(ok).toMatchObject({ ok: true, user: { login: "fine", uid: 20013, gid: 20013, home: "/home/people/fine" } });
  });

  test("auto-provisioning refuses a login that cannot be a user name (..)", async () => {
    const r = await login("..");
    expect(r.ok).toBe(false);
    expect((r as { reason: string }).reason).toContain("the login cannot be a user name: must not be . or ..");
    expect((await sql()`SELECT name FROM users WHERE tenant_id = ${tenant}`).map((r) => r.name)).toEqual(["fine"]);
  });
});

describe("the VMA checks the identity again", () => {
  const SECRET = "identity-test-secret-0123456789";
  const COOKIE = "0123456789abcdef0123456789abcdef";
  const procs: ReturnType<typeof Bun.spawn>[] = [];
  afterAll(async () => {
    await stopAll(procs);
  });

  async function startVma(name: string, settings: Record<string, string | boolean>) {
    const dir = join(work, `vma-${name}`);
    mkdirSync(dir, { recursive: true });
    const file = join(dir, "vma.json");
    writeVmaConfig(file, { secret: SECRET, settings: { "path.run": join(dir, "run"), ...settings } });
    const port = freePort();
    const env = cleanEnv();
    const p = Bun.spawn([process.execPath, "src/main.ts", "vma", "--config", file, "--listen", `127.0.0.1:${port}`], {
      cwd: repo,
      env,
      stdout: "pipe",
      stderr: "pipe",
    });
    procs.push(p);
    const reader = p.stdout.getReader();
    let out = "";
    while (!out.includes("listening")) {
      const { done, value } = await reader.read();
      if (done) throw new Error(`vma exited: ${await new Response(p.stderr).text()}`);
      out += new TextDecoder().decode(value);
    }
    const call = async (method: string, path: string, body?: unknown) => {
      const r = await fetch(`http://127.0.0.1:${port}${path}`, {
        method,
        headers: { "x-qvd-vma-secret": SECRET, "content-type": "application/json" },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      return { status: r.status, body: (await r.json()) as any };
    };
    return call;
  }

  /** A guest root with the image's accounts (root, daemon) and groups, as useradd --root sees it. */
  function guestRoot(name: string): string {
    const root = join(work, `root-${name}`);
    mkdirSync(join(root, "etc/skel"), { recursive: true });
    writeFileSync(
      join(root, "etc/passwd"),
      "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n",
    );
    writeFileSync(join(root, "etc/group"), "root:x:0:\ndaemon:x:1:\naudio:x:0:\nvideo:x:44:\n");
    writeFileSync(join(root, "etc/shadow"), "root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n", {
      mode: 0o640,
    });
    writeFileSync(join(root, "etc/gshadow"), "root:*::\ndaemon:*::\naudio:*::\nvideo:*::\n", { mode: 0o640 });
    return root;
  }

  test("x_start with an identity the rules refuse: 422 naming the field, even though an L7R sent it", async () => {
    const call = await startVma("x", { "vma.session.as_current_user": true, "vma.session.command": "/bin/sleep 1000" });
    const ok = { user: "alice", uid: 20001, gid: 20001, cookie: COOKIE };
    const cases: [Record<string, unknown>, string, string][] = [
      [{ ...ok, home: "/etc" }, "home", 'home "/etc" is not a plain directory below /home'],
      [{ ...ok, uid: 500 }, "uid", "uid 500 is outside the allowed range 10000-60000"],
      [{ ...ok, gid: 42 }, "gid", "gid 42 is outside"],
      [
        { ...ok, properties: { [GROUPS]: "shadow,sudo" } },
        "properties.qvd.vm.user.groups",
        "groups shadow, sudo not allowed",
      ],
      [{ ...ok, uid: 0 }, "uid", "root is never a session user"],
    ];
    for (const [body, field, message] of cases) {
      const r = await call("POST", "/vma/x_start", body);
      expect(r.status, JSON.stringify(body)).toBe(422);
      expect(r.body.field).toBe(field);
      expect(r.body.error).toContain(message);
    }
    expect((await call("GET", "/vma/x_state")).body.state).toBe("stopped");
  });

  test("the node's settings in vma.json are the rules the VMA applies", async () => {
    const call = await startVma("narrow", {
      "vma.session.as_current_user": true,
      "identity.uid.max": "30000",
      "identity.home.base": "/srv/homes",
    });
    const r = await call("POST", "/vma/x_start", { user: "alice", uid: 40000, gid: 20001, cookie: COOKIE });
    expect([r.status, r.body.field]).toEqual([422, "uid"]);
    expect(r.body.error).toContain("uid 40000 is outside the allowed range 10000-30000");
    const h = await call("POST", "/vma/x_start", {
      user: "alice",
      uid: 20001,
      gid: 20001,
      home: "/home/alice",
      cookie: COOKIE,
    });
    expect([h.status, h.body.field]).toEqual([422, "home"]);
  });

  test("the image's own account, a group with gid 0, or a home through a symbolic link: refused before anything is provisioned", async () => {
    const root = guestRoot("image");
    // The image's /home leads to its root: /home/etc would be /etc.
    symlinkSync(".", join(root, "home"));
    const call = await startVma("image", { "vma.provision.root": root, "vma.session.command": "/bin/sleep 1000" });
    const passwd = readFileSync(join(root, "etc/passwd"), "utf8");
    const start = async (body: Record<string, unknown>, error: string) => {
      expect((await call("POST", "/vma/x_start", { uid: 20001, gid: 20001, cookie: COOKIE, ...body })).status).toBe(
        200,
      );
      let s: any;
      await poll(
        async () => {
          s = (await call("GET", "/vma/x_state")).body;
          return s.state === "stopped" && Boolean(s.error);
        },
        5000,
        50,
      );
      expect(s.error).toContain(error);
    };
    // A login "daemon" is the image's system account (uid 1): never a session user.
    await start({ user: "daemon" }, "identity refused for daemon: uid 1 is outside the allowed range");
    await start({ user: "etc" }, "home /home/etc: /home is a symbolic link");
    rmSync(join(root, "home"));
    await start(
      { user: "alice", properties: { [GROUPS]: "audio" } },
      "group audio has the gid of root or a privileged group in the image",
    );
    // The image's shadow group with the gid the user is given: refused too.
    writeFileSync(join(root, "etc/group"), readFileSync(join(root, "etc/group"), "utf8") + "shadow:x:20001:\n");
    await start({ user: "alice" }, "gid 20001 is a privileged group's in the image");
    expect(readFileSync(join(root, "etc/passwd"), "utf8")).toBe(passwd);
    expect(readFileSync(join(root, "etc/group"), "utf8")).not.toContain("alice");
  });
});

describe.skipIf(process.getuid?.() !== 0)("a real LXC desktop: no identity makes the desktop user root", () => {
  const node = new TestNode(db, "idnode");
  const COOKIE = "0123456789abcdef0123456789abcdef";
  let vmId = 0;
  let vmaUrl = "";
  let secret = "";

  beforeAll(async () => {
    const image = await desktopImage();
    await node.setup();
    vmId = (await node.addDesktop(image, { user: "mallory" })).vm.id;
    await node.start({ "hkd.timeout.vma_start": "60" });
    await D.startVm(sql(), ALL, vmId, { aliveWithinS: 60 });
    await until(
      async () => (await D.get(sql(), D.vms, ALL, vmId)).vm_state === "running",
      "the desktop to run",
      300_000,
    );
    const [r] = await sql()`SELECT vm_address, vma_port, vma_secret FROM vm_runtimes WHERE vm_id = ${vmId}`;
    [vmaUrl, secret] = [`http://${r!.vm_address}:${r!.vma_port}`, r!.vma_secret];
  }, 30 * 60_000);
  afterAll(async () => {
    await node.stop();
  }, 120_000);

  /** The VMA's API from the node (as an L7R calls it). */
  const vma = (method: string, path: string, body?: unknown) => node.vma(vmaUrl, secret, path, body, method);
  const inside = async (script: string) => (await node.attach(vmId, script)).stdout.trim();

  test("x_start with /etc, uid 0 or 500, gid 42 (shadow), groups shadow/sudo, or the login root: refused; /etc stays root's", async () => {
    const passwd = await inside("cat /etc/passwd");
    const base = { user: "mallory", uid: 20001, gid: 20001, cookie: COOKIE };
    for (const [body, field] of [
      [{ ...base, home: "/etc" }, "home"],
      [{ ...base, uid: 0 }, "uid"],
      [{ ...base, uid: 500 }, "uid"],
      [{ ...base, gid: 42 }, "gid"],
      [{ ...base, properties: { [GROUPS]: "shadow,sudo" } }, "properties.qvd.vm.user.groups"],
    ] as const) {
      const r = await vma("POST", "/vma/x_start", body);
      expect([r.status, r.json.field], JSON.stringify(body)).toEqual([422, field]);
    }
    // The login "root" is the image's root account: accepted as a request, refused before provisioning.
    expect((await vma("POST", "/vma/x_start", { ...base, user: "root" })).status).toBe(200);
    await until(async () => Boolean((await vma("GET", "/vma/x_state")).json.error), "the refusal", 20_000);
    expect((await vma("GET", "/vma/x_state")).json).toMatchObject({
      state: "stopped",
      error: expect.stringContaining("identity refused for root: uid 0"),
    });
    expect(await inside("stat -c '%u:%g %a' /etc /etc/shadow /root")).toBe("0:0 755\n0:42 640\n0:0 700");
    expect(await inside("cat /etc/passwd")).toBe(passwd);
  }, 120_000);

  test("an allowed identity: the session runs as that uid, without root's or shadow's groups", async () => {
    const r = await vma("POST", "/vma/x_start", {
      user: "mallory",
      uid: 20001,
      gid: 20001,
      cookie: COOKIE,
      properties: { [GROUPS]: "audio" },
    });
    expect(r.status).toBe(200);
    await until(
      async () => ["listening", "stopped"].includes((await vma("GET", "/vma/x_state")).json.state),
      "nxagent to listen",
      60_000,
    );
    expect((await vma("GET", "/vma/x_state")).json.state).toBe("listening");
    expect(await inside("id mallory")).toMatch(
      /^uid=20001\(mallory\) gid=20001\(mallory\) groups=20001\(mallory\),29\(audio\)$/,
    );
    // nxagent, the session's X server, runs as the user: real, effective and supplementary ids.
    const status = await inside("cat /proc/$(pgrep -x nxagent | head -1)/status");
    expect(status).toMatch(/^Uid:\s+20001\s+20001\s+20001\s+20001$/m);
    expect(status).toMatch(/^Groups:\s+29\s*$/m);
    expect(await inside("stat -c '%U' /home/mallory")).toBe("mallory");
    expect(await inside("stat -c '%u:%g' /etc")).toBe("0:0");
  }, 120_000);
});
