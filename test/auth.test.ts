// User authentication chain (src/auth/): local passwords, LDAP against a real slapd (direct
// bind, search then bind, group filter, attributes, StartTLS), auto-provisioning and TOTP.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { authenticateLogin, authenticateUser, resolveLogin, splitLogin } from "../src/auth/chain.ts";
import { escapeDnValue, escapeFilterValue } from "../src/auth/ldap.ts";
import { base32Decode, base32Encode, hotp, otpauthUri, totpCode, verifyTotp } from "../src/auth/totp.ts";
import type { AuthResult } from "../src/auth/user-auth.ts";
import { Config } from "../src/config.ts";
import * as D from "../src/db/index.ts";
import { startTestApi } from "./support/api.ts";
import { TEST_ADMIN, useTestDatabase } from "./support/db.ts";
import { LDAP_SUFFIX, LdapServer } from "./support/ldap.ts";

const ALL = D.ALL_TENANTS;
const cfg = new Config();
const db = useTestDatabase();
const sql = () => db().sql;

const PEOPLE = `ou=people,${LDAP_SUFFIX}`;
const READER = `cn=reader,${LDAP_SUFFIX}`;

function person(uid: string, pw: string, n: number): string {
  return `dn: uid=${uid},${PEOPLE}
objectClass: inetOrgPerson
objectClass: posixAccount
uid: ${uid}
cn: ${uid}
sn: ${uid}
uidNumber: ${20000 + n}
gidNumber: ${30000 + n}
homeDirectory: /home/ldap/${uid}
userPassword: ${pw}
`;
}

const LDIF = [
  `dn: ${LDAP_SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n`,
  `dn: ${PEOPLE}\nobjectClass: organizationalUnit\nou: people\n`,
  `dn: ou=groups,${LDAP_SUFFIX}\nobjectClass: organizationalUnit\nou: groups\n`,
  `dn: ${READER}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\ncn: reader\nuserPassword: reader-pw\n`,
  person("alice", "alice-ldap-pw", 1),
  person("bob", "bob-ldap-pw", 2),
  person("carol", "carol-ldap-pw", 3),
  person("erin", "erin-ldap-pw", 5),
  person("frank", "frank-ldap-pw", 6),
  `dn: cn=vdi,ou=groups,${LDAP_SUFFIX}\nobjectClass: groupOfNames\ncn: vdi\nmember: uid=alice,${PEOPLE}\nmember: uid=carol,${PEOPLE}\nmember: uid=erin,${PEOPLE}\nmember: uid=frank,${PEOPLE}\n`,
  `dn: cn=staff,ou=groups,${LDAP_SUFFIX}\nobjectClass: groupOfNames\ncn: staff\nmember: uid=alice,${PEOPLE}\nmember: uid=carol,${PEOPLE}\n`,
].join("\n");

const ldap = new LdapServer();
const tenants: Record<string, number> = {};

async function tenant(name: string, settings: Record<string, string> = {}): Promise<number> {
  const t = await D.create(sql(), D.tenants, ALL, { name });
  for (const [k, v] of Object.entries(settings)) await D.setConfig(sql(), t.id, k, v);
  tenants[name] = t.id;
  return t.id;
}

const login = (tenantName: string, user: string, password: string, now?: number): Promise<AuthResult> =>
  authenticateUser(sql(), cfg, { tenantId: tenants[tenantName]!, tenantName, login: user, password }, { now });

function expectOk(r: AuthResult): Extract<AuthResult, { ok: true }>["user"] {
  if (r.ok !== true) throw new Error(`expected success, got ${JSON.stringify(r)}`);
  return r.user;
}
function expectRefused(r: AuthResult, reason: RegExp): void {
  expect(r.ok).toBe(false);
  expect((r as { reason: string }).reason).toMatch(reason);
}

beforeAll(async () => {
  const { ensureDeps } = await import("../scripts/deps.ts");
  await ensureDeps(["slapd", "ldap-utils", "openssl"], () => {});
  await ldap.start(LDIF);
  tenants.default = 1;
}, 120_000);

afterAll(async () => {
  await ldap.stop();
});

describe("local", () => {
  let alice: D.UserRow;
  let mallory: D.UserRow;
  beforeAll(async () => {
    alice = await D.create(sql(), D.users, ALL, { tenant_id: 1, name: "alice", password: "alice-local-pw" });
    mallory = await D.create(sql(), D.users, ALL, { tenant_id: 1, name: "mallory", password: "mallory-local-pw" });
  });

  test("right password: the user; wrong password, unknown user, empty password: refused", async () => {
    const u = expectOk(await login("default", "alice", "alice-local-pw"));
    expect(u).toMatchObject({ userId: alice.id, tenantId: 1, login: "alice" });
    expect(u.uid).toBeUndefined();
    expectRefused(await login("default", "alice", "alice-local-pw-"), /wrong password/);
    expectRefused(await login("default", "alice", "mallory-local-pw"), /wrong password/);
    expectRefused(await login("default", "nobody", "alice-local-pw"), /unknown user/);
    expectRefused(await login("default", "alice", ""), /empty password/);
  });

  test("a blocked user and a blocked tenant are refused, with the reason", async () => {
    const id = mallory.id;
    expectOk(await login("default", "mallory", "mallory-local-pw"));
    await D.setUserBlocked(sql(), ALL, id, true);
    expectRefused(await login("default", "mallory", "mallory-local-pw"), /user "mallory" is blocked/);
    await D.setUserBlocked(sql(), ALL, id, false);
    expectOk(await login("default", "mallory", "mallory-local-pw"));

    const t = await tenant("frozen");
    await D.create(sql(), D.users, ALL, { tenant_id: t, name: "ice", password: "ice-local-pw" });
    expectOk(await login("frozen", "ice", "ice-local-pw"));
    await D.update(sql(), D.tenants, ALL, t, { blocked: true });
    expectRefused(await login("frozen", "ice", "ice-local-pw"), /tenant "frozen" is blocked/);
  });
});

describe("user@tenant", () => {
  test("splitLogin splits at the first separator", () => {
    expect(splitLogin("alice@acme")).toEqual(["alice", "acme"]);
    expect(splitLogin("alice#acme")).toEqual(["alice", "acme"]);
    expect(splitLogin("alice@example.com@acme")).toEqual(["alice", "example.com@acme"]);
    expect(splitLogin("alice")).toEqual(["alice", undefined]);
    expect(splitLogin("alice%acme", "%")).toEqual(["alice", "acme"]);
  });

  test("resolveLogin: the named tenant, the default one, unknown tenants, whatever the mode", async () => {
    const acme = await tenant("acme");
    expect(await resolveLogin(sql(), "alice@acme")).toEqual({
      ok: true,
      tenantId: acme,
      tenantName: "acme",
      tenantBlocked: false,
      login: "alice",
    });
    expect(await resolveLogin(sql(), "alice#acme")).toMatchObject({ ok: true, tenantId: acme, login: "alice" });
    expect(await resolveLogin(sql(), "alice")).toMatchObject({
      ok: true,
      tenantId: 1,
      tenantName: "default",
      login: "alice",
    });
    expect(await resolveLogin(sql(), "alice", { defaultTenant: "acme" })).toMatchObject({ ok: true, tenantId: acme });
    expect(await resolveLogin(sql(), "alice@nope")).toMatchObject({
      ok: false,
      reason: expect.stringMatching(/no such tenant "nope"/),
    });
    expect(await resolveLogin(sql(), "alice@*")).toMatchObject({ ok: false }); // never the global scope
    expect(await resolveLogin(sql(), "@acme")).toMatchObject({ ok: false, reason: "empty login" });
    expect(await resolveLogin(sql(), "alice@default")).toMatchObject({ ok: true, tenantId: 1, login: "alice" });
    expect(await resolveLogin(sql(), " alice @ acme ")).toMatchObject({ ok: true, tenantId: acme, login: "alice" });
  });

  test("authenticateLogin: the same name in two tenants, chosen by the login", async () => {
    const acme = tenants.acme!;
    const a2 = await D.create(sql(), D.users, ALL, { tenant_id: acme, name: "alice", password: "alice-acme-pw" });
    await D.setConfig(sql(), 0, "wat.multitenant", "1");
    try {
      const u = expectOk(await authenticateLogin(sql(), cfg, { login: "alice@acme", password: "alice-acme-pw" }));
      expect(u).toMatchObject({ userId: a2.id, tenantId: acme });
      expectRefused(
        await authenticateLogin(sql(), cfg, { login: "alice@acme", password: "alice-local-pw" }),
        /wrong password/,
      );
      expect(
        expectOk(await authenticateLogin(sql(), cfg, { login: "alice", password: "alice-local-pw" })).tenantId,
      ).toBe(1);
      expectRefused(await authenticateLogin(sql(), cfg, { login: "alice@frozen", password: "x-x-x-x-x" }), /blocked/);
    } finally {
      await D.deleteConfig(sql(), 0, "wat.multitenant");
    }
    // The mode does not change how a login names its tenant.
    expect(expectOk(await authenticateLogin(sql(), cfg, { login: "alice", password: "alice-local-pw" })).tenantId).toBe(
      1,
    );
    expect(
      expectOk(await authenticateLogin(sql(), cfg, { login: "alice@acme", password: "alice-acme-pw" })).tenantId,
    ).toBe(acme);
  });
});

describe("ldap", () => {
  const direct = () => ({
    "l7r.auth.plugins": "ldap",
    "auth.ldap.url": ldap.url,
    "auth.ldap.bind_dn_template": `uid=%u,${PEOPLE}`,
  });
  const search = () => ({
    "l7r.auth.plugins": "ldap,local",
    "auth.ldap.url": ldap.url,
    "auth.ldap.search_base": PEOPLE,
    "auth.ldap.bind_dn": READER,
    "auth.ldap.bind_password": "reader-pw",
  });

  test("direct bind: right password with uid, gid and home from the entry; wrong password refused", async () => {
    const t = await tenant("ldap-direct", direct());
    const alice = await D.create(sql(), D.users, ALL, { tenant_id: t, name: "alice" }); // no local password
    const u = expectOk(await login("ldap-direct", "alice", "alice-ldap-pw"));
    expect(u).toEqual({
      userId: alice.id,
      tenantId: t,
      login: "alice",
      uid: 20001,
      gid: 30001,
      home: "/home/ldap/alice",
    });
    expectRefused(await login("ldap-direct", "alice", "alice-ldap-pw!"), /wrong login or password/);
    expectRefused(await login("ldap-direct", "nobody", "whatever-pw"), /wrong login or password/);
    // In the directory but not in QVD, without auto-provisioning.
    expectRefused(await login("ldap-direct", "bob", "bob-ldap-pw"), /not a QVD user/);
    // A login that tries to inject into the DN does not bind as someone else.
    expectRefused(await login("ldap-direct", `alice,${PEOPLE}`, "alice-ldap-pw"), /wrong login or password|LDAP error/);
    // Attributes can be turned off.
    await D.setConfig(sql(), t, "auth.ldap.attr.home", "");
    expect(expectOk(await login("ldap-direct", "alice", "alice-ldap-pw")).home).toBeUndefined();
  });

  test("search then bind with a service account; unknown users fall through to local", async () => {
    const t = await tenant("ldap-search", search());
    const alice = await D.create(sql(), D.users, ALL, { tenant_id: t, name: "alice" });
    await D.create(sql(), D.users, ALL, { tenant_id: t, name: "localonly", password: "local-only-pw" });
    expect(expectOk(await login("ldap-search", "alice", "alice-ldap-pw"))).toMatchObject({
      userId: alice.id,
      uid: 20001,
      gid: 30001,
    });
    expectRefused(await login("ldap-search", "alice", "bob-ldap-pw"), /wrong password \(LDAP\)/);
    // Not in the directory: the local plugin decides.
    expectOk(await login("ldap-search", "localonly", "local-only-pw"));
    expectRefused(await login("ldap-search", "localonly", "local-only-pw?"), /wrong password \(local\)/);
    // Filter metacharacters in the login match nothing rather than everyone.
    expectRefused(await login("ldap-search", "*", "alice-ldap-pw"), /unknown user/);
    // A filter that matches several entries is refused rather than binding as any of them.
    await D.setConfig(sql(), t, "auth.ldap.search_filter", "(|(uid=%u)(objectClass=posixAccount))");
    expectRefused(await login("ldap-search", "alice", "alice-ldap-pw"), /several entries/);
    await D.deleteConfig(sql(), t, "auth.ldap.search_filter");
    // A wrong service password is a configuration error, reported as such.
    await D.setConfig(sql(), t, "auth.ldap.bind_password", "not-the-reader-pw");
    expectRefused(await login("ldap-search", "alice", "alice-ldap-pw"), /service account/);
  });

  test("group filter: a user outside the group is refused, members get in", async () => {
    const t = await tenant("ldap-group", {
      ...search(),
      "auth.ldap.group_filter": "(&(objectClass=groupOfNames)(cn=vdi)(member=%d))",
    });
    await D.create(sql(), D.users, ALL, { tenant_id: t, name: "alice" });
    await D.create(sql(), D.users, ALL, { tenant_id: t, name: "bob" });
    expectOk(await login("ldap-group", "alice", "alice-ldap-pw"));
    expectRefused(await login("ldap-group", "bob", "bob-ldap-pw"), /not a member of the required LDAP group/);
    // With direct bind too (group base derived from the DN).
    const t2 = await tenant("ldap-group-direct", { ...direct(), "auth.ldap.group_filter": "(&(cn=vdi)(member=%d))" });
    await D.create(sql(), D.users, ALL, { tenant_id: t2, name: "alice" });
    await D.create(sql(), D.users, ALL, { tenant_id: t2, name: "bob" });
    expectOk(await login("ldap-group-direct", "alice", "alice-ldap-pw"));
    expectRefused(await login("ldap-group-direct", "bob", "bob-ldap-pw"), /not a member/);
    // A filter that matches several groups (alice is in vdi and staff) still lets a member in.
    await D.setConfig(sql(), t2, "auth.ldap.group_filter", "(member=%d)");
    expectOk(await login("ldap-group-direct", "alice", "alice-ldap-pw"));
    expectRefused(await login("ldap-group-direct", "bob", "bob-ldap-pw"), /not a member/);
  });

  test("StartTLS: verified against a tenant's auth.ldap.ca; an unknown CA is refused", async () => {
    const t = await tenant("ldap-tls", {
      ...direct(),
      "auth.ldap.starttls": "1",
      "auth.ldap.ca": readFileSync(ldap.caFile, "utf8"),
    });
    await D.create(sql(), D.users, ALL, { tenant_id: t, name: "alice" });
    expect(expectOk(await login("ldap-tls", "alice", "alice-ldap-pw")).uid).toBe(20001);
    await D.setConfig(sql(), t, "auth.ldap.ca", "");
    expectRefused(await login("ldap-tls", "alice", "alice-ldap-pw"), /LDAP error: .*certificate/);
  });

  test("LDAPS: verified against a tenant's auth.ldap.ca (its \\n form too); an unknown CA is refused", async () => {
    const t = await tenant("ldap-ldaps", {
      ...direct(),
      "auth.ldap.url": ldap.ldapsUrl,
      "auth.ldap.ca": readFileSync(ldap.caFile, "utf8").replace(/\n/g, "\\n"),
    });
    await D.create(sql(), D.users, ALL, { tenant_id: t, name: "alice" });
    expect(expectOk(await login("ldap-ldaps", "alice", "alice-ldap-pw")).gid).toBe(30001);
    expectRefused(await login("ldap-ldaps", "alice", "alice-ldap-pw?"), /wrong login or password/);
    await D.setConfig(sql(), t, "auth.ldap.ca", "");
    expectRefused(await login("ldap-ldaps", "alice", "alice-ldap-pw"), /LDAP error: .*certificate/);
  });

  test("an unreachable directory is a refusal with a reason", async () => {
    await tenant("ldap-down", { ...direct(), "auth.ldap.url": "ldap://127.0.0.1:1", "auth.ldap.timeout": "2" });
    expectRefused(await login("ldap-down", "alice", "alice-ldap-pw"), /LDAP error/);
  });

  test("escaping of logins in filters and DNs", () => {
    expect(escapeFilterValue("a*b(c)\\d")).toBe("a\\2ab\\28c\\29\\5cd");
    expect(escapeDnValue("a,b=c+d")).toBe("a\\,b\\=c\\+d");
    expect(escapeDnValue(" x ")).toBe("\\ x\\ ");
  });
});

describe("auto-provisioning", () => {
  test("the first LDAP login creates the user and a VM from the OSF; the second creates nothing", async () => {
    const t = await tenant("auto", {
      ...{ "l7r.auth.plugins": "ldap", "auth.ldap.url": ldap.url, "auth.ldap.bind_dn_template": `uid=%u,${PEOPLE}` },
      "auth.autoprovision.enable": "1",
      "auth.autoprovision.osf": "desk",
      "auth.autoprovision.vm_name": "%u-desktop",
      "auth.ldap.group_filter": "(&(cn=vdi)(member=%d))",
    });
    const osf = await D.create(sql(), D.osfs, ALL, { tenant_id: t, name: "desk" });
    const vmsOf = async (userId: number) =>
      (await sql()`SELECT name, osf_id, host(ip) AS ip, di_tag FROM vms WHERE user_id = ${userId}`) as unknown as {
        name: string;
        osf_id: number;
        ip: string;
        di_tag: string;
      }[];

    expect(await D.findLoginUser(sql(), t, "carol")).toBeUndefined();
    const u1 = expectOk(await login("auto", "carol", "carol-ldap-pw"));
    expect(u1).toMatchObject({ tenantId: t, login: "carol", uid: 20003 });
    const row = await D.get(sql(), D.users, ALL, u1.userId);
    expect(row).toMatchObject({ name: "carol", tenant_id: t, has_password: false, blocked: false });
    const v1 = await vmsOf(u1.userId);
    expect(v1).toHaveLength(1);
    expect(v1[0]).toMatchObject({ name: "carol-desktop", osf_id: osf.id, di_tag: "default" });
    expect(v1[0]!.ip).toMatch(/^198\.18\./);

    const u2 = expectOk(await login("auto", "carol", "carol-ldap-pw"));
    expect(u2.userId).toBe(u1.userId);
    expect(await vmsOf(u1.userId)).toHaveLength(1);

    // A failed login (wrong password, outside the group) provisions nothing.
    expectRefused(await login("auto", "bob", "bob-ldap-pw"), /not a member/);
    expectRefused(await login("auto", "frank", "wrong-pw"), /wrong login or password/);
    expect(await D.findLoginUser(sql(), t, "bob")).toBeUndefined();
    expect(await D.findLoginUser(sql(), t, "frank")).toBeUndefined();

    // Concurrent first logins: one user, one VM, both logins succeed.
    const [a, b] = await Promise.all([login("auto", "erin", "erin-ldap-pw"), login("auto", "erin", "erin-ldap-pw")]);
    expect(expectOk(a).userId).toBe(expectOk(b).userId);
    expect(await vmsOf(expectOk(a).userId)).toHaveLength(1);
    expect((await sql()`SELECT count(*)::int AS n FROM users WHERE tenant_id = ${t} AND name = 'erin'`)[0]!.n).toBe(1);
  });

  test("a missing OSF fails the login and leaves no half-created user", async () => {
    const t = await tenant("auto-broken", {
      "l7r.auth.plugins": "ldap",
      "auth.ldap.url": ldap.url,
      "auth.ldap.bind_dn_template": `uid=%u,${PEOPLE}`,
      "auth.autoprovision.enable": "1",
      "auth.autoprovision.osf": "no-such-osf",
    });
    expectRefused(await login("auto-broken", "frank", "frank-ldap-pw"), /auto-provisioning failed.*no-such-osf/);
    expect(await D.findLoginUser(sql(), t, "frank")).toBeUndefined();
    // Without an OSF: only the user.
    await D.setConfig(sql(), t, "auth.autoprovision.osf", "");
    const u = expectOk(await login("auto-broken", "frank", "frank-ldap-pw"));
    expect((await sql()`SELECT count(*)::int AS n FROM vms WHERE user_id = ${u.userId}`)[0]!.n).toBe(0);
  });
});

describe("totp", () => {
  test("RFC 6238 / RFC 4226 test vectors and base32", () => {
    const key = Buffer.from("12345678901234567890");
    expect(base32Decode(base32Encode(key)).equals(key)).toBe(true);
    expect(base32Encode(Buffer.from("foobar"))).toBe("MZXW6YTBOI");
    expect(hotp(key, 0)).toBe("755224");
    expect(hotp(key, 9)).toBe("520489");
    const secret = base32Encode(key);
    expect(totpCode(secret, 59_000)).toBe("287082");
    expect(totpCode(secret, 1111111109_000)).toBe("081804");
    expect(totpCode(secret, 2000000000_000)).toBe("279037");
    expect(otpauthUri(secret, "alice@acme", "QVD")).toBe(
      `otpauth://totp/QVD:alice%40acme?secret=${secret}&issuer=QVD&algorithm=SHA1&digits=6&period=30`,
    );
  });

  test("code appended to the password: current, previous and next steps accepted; older, newer and wrong refused", async () => {
    const u = await D.create(sql(), D.users, ALL, { tenant_id: 1, name: "tom", password: "tom-local-pw" });
    const { secret, uri } = await D.enrolUserTotp(sql(), ALL, u.id, "QVD");
    expect(secret).toMatch(/^[A-Z2-7]{32}$/);
    expect(uri).toStartWith("otpauth://totp/QVD:tom%40default?secret=" + secret);
    expect((await D.get(sql(), D.users, ALL, u.id)).has_totp).toBe(true);

    const now = 1_800_000_015_000; // 15 s into a step
    const code = (dSteps: number) => totpCode(secret, now + dSteps * 30_000);
    expect(verifyTotp(secret, code(0), now)).toBe(true);
    expectOk(await login("default", "tom", "tom-local-pw" + code(0), now));
    expectOk(await login("default", "tom", "tom-local-pw" + code(-1), now));
    expectOk(await login("default", "tom", "tom-local-pw" + code(1), now));
    for (const d of [-2, 2, -10]) {
      if ([code(-1), code(0), code(1)].includes(code(d))) continue; // a collision is not a failure
      expectRefused(await login("default", "tom", "tom-local-pw" + code(d), now), /wrong one-time code/);
    }
    const wrong = String((Number(code(0)) + 1) % 1_000_000).padStart(6, "0");
    if (![code(-1), code(1)].includes(wrong))
      expectRefused(await login("default", "tom", "tom-local-pw" + wrong, now), /wrong one-time code/);
    // The password alone is not enough, nor is a right code after a wrong password.
    expectRefused(await login("default", "tom", "tom-local-pw", now), /wrong password|one-time code/);
    expectRefused(await login("default", "tom", "tom-local-px" + code(0), now), /wrong password/);
    expectRefused(await login("default", "tom", code(0), now), /one-time code missing/);

    // Removing the secret: the password alone works again.
    expect(await D.removeUserTotp(sql(), ALL, u.id)).toBe(true);
    expect(await D.removeUserTotp(sql(), ALL, u.id)).toBe(false);
    expectOk(await login("default", "tom", "tom-local-pw", now));
    expectRefused(await login("default", "tom", "tom-local-pw" + code(0), now), /wrong password/);
  });

  test("TOTP works with LDAP users too", async () => {
    const t = tenants["ldap-search"]!;
    await D.setConfig(sql(), t, "auth.ldap.bind_password", "reader-pw");
    const u = (await D.findLoginUser(sql(), t, "alice"))!;
    const { secret } = await D.enrolUserTotp(sql(), ALL, u.id);
    const now = Date.now();
    expectOk(await login("ldap-search", "alice", "alice-ldap-pw" + totpCode(secret, now), now));
    expectRefused(await login("ldap-search", "alice", "alice-ldap-pw", now), /wrong password|one-time code/);
  });

  test("API: POST /users/:id/totp enrols (secret and otpauth URI), DELETE removes", async () => {
    const api = await startTestApi(db());
    try {
      const admin = await api.login(TEST_ADMIN.name, TEST_ADMIN.password);
      const u = await D.create(sql(), D.users, ALL, { tenant_id: 1, name: "uma", password: "uma-local-pw" });
      const r = await admin.post(`/users/${u.id}/totp`);
      expect(r.status).toBe(200);
      expect(r.body.secret).toMatch(/^[A-Z2-7]{32}$/);
      expect(r.body.uri).toStartWith("otpauth://totp/QVD:uma%40default?secret=" + r.body.secret);
      expect(r.body.user).toMatchObject({ id: u.id, has_totp: true });
      const now = Date.now();
      expectOk(await login("default", "uma", "uma-local-pw" + totpCode(r.body.secret, now), now));
      expectRefused(await login("default", "uma", "uma-local-pw", now), /wrong password|one-time code/);
      const d = await admin.del(`/users/${u.id}/totp`);
      expect(d.status).toBe(200);
      expect(d.body).toMatchObject({ removed: true, user: { has_totp: false } });
      expectOk(await login("default", "uma", "uma-local-pw", now));
      expect((await admin.post("/users/999999/totp")).status).toBe(404);
      expect((await api.anonymous.post(`/users/${u.id}/totp`)).status).toBe(401);
      // The LDAP service password is write-only through the API.
      const c = await admin.get("/configs?tenant_id=" + tenants["ldap-search"]);
      expect(c.body.items.find((i: { key: string }) => i.key === "auth.ldap.bind_password").value).toBe("********");
      expect(JSON.stringify(c.body)).not.toContain("reader-pw");
    } finally {
      await api.stop();
    }
  });
});
