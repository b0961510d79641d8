// ACL enforcement on every route of the admin API, generated from the route table: a role that
// lacks exactly the route's ACL gets 403 and changes nothing; a role that inherits it gets
// through; a role that inherits it but denies it gets 403. Field ACLs, and the audit entry of
// every write (who, tenant, action, object, outcome, source, address; secrets redacted).
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import type { Route } from "../src/api/context.ts";
import { useTestApi, type ApiClient } from "./support/api.ts";
import { clone, ok } from "./support/assert.ts";
import { TEST_ADMIN, useTestDatabase } from "./support/db.ts";
import {
  aclsOf,
  fingerprint,
  Fixtures,
  routeName,
  routeTable,
  sampleRequest,
  type Sample,
} from "./support/api-routes.ts";

const db = useTestDatabase();
const sql = () => db().sql;
const storage = mkdtempSync(join(tmpdir(), "qvd-acl-test-"));
const live = useTestApi(db, { "path.storage.root": storage });
const { api, sa } = live;
/** Own grants of every ACL but the one under test. */
let lacker: ApiClient;
/** Inherits a role that grants every ACL. */
let inheritor: ApiClient;
/** Inherits every ACL but denies the one under test. */
let denier: ApiClient;
let roles: { all: number; lacks: number; inherits: number; denies: number };
let catalogue: string[];
let fx: Fixtures;

const send = (c: ApiClient, s: Sample, headers: Record<string, string> = {}) =>
  c.call(s.method, s.path, s.body, headers);
const lastAuditId = async () => Number((await sql()`SELECT coalesce(max(id), 0)::int AS id FROM audit_log`)[0]!.id);
const auditSince = (id: number) => sql()`SELECT * FROM audit_log WHERE id > ${id} ORDER BY id`;

beforeAll(async () => {
  fx = new Fixtures(sql(), 1, "acl");
  catalogue = (await ok(sa.get("/acls"))).items.map((a: { name: string }) => a.name);
  const role = async (name: string) => (await ok(sa.post("/roles", { name }), 201)).id as number;
  roles = {
    all: await role("Everything"),
    lacks: await role("Lacks one"),
    inherits: await role("Inherits all"),
    denies: await role("Denies one"),
  };
  for (const acl of catalogue) {
    await ok(sa.put(`/roles/${roles.all}/acls`, { acl }));
    await ok(sa.put(`/roles/${roles.lacks}/acls`, { acl }));
  }
  await ok(sa.post(`/roles/${roles.inherits}/inherits`, { role_id: roles.all }));
  await ok(sa.post(`/roles/${roles.denies}/inherits`, { role_id: roles.all }));
  // Administrators of the global scope: their tenant scope is everything, so only ACLs limit them.
  const admin = async (name: string, roleId: number) =>
    (await live.admin(name, { tenantId: 0, roles: [roleId] })).client;
  lacker = await admin("lacker", roles.lacks);
  inheritor = await admin("inheritor", roles.inherits);
  denier = await admin("denier", roles.denies);
});
afterAll(() => {
  rmSync(storage, { recursive: true, force: true });
});

const guarded = (r: Route) => !r.public && r.path !== "/events";

/** Routes whose sample request, though allowed, meets a state that refuses it. */
const CONFLICT_OK = new Set([
  "POST /vms/:id/start",
  "POST /vms/:id/stop",
  "POST /vms/:id/disconnect",
  "POST /vms/:id/expire",
  "POST /vms/:id/clear_zombie",
  "POST /hosts/:id/declare_lost",
]);

describe("every route with ACLs", () => {
  const routes = routeTable().filter((r) => guarded(r) && (typeof r.acl === "function" || (r.acl ?? []).length > 0));

  test("the table has the routes this test expects", () => {
    expect(routes.length).toBeGreaterThan(80);
    expect(routes.map(routeName)).toEqual(
      expect.arrayContaining(["POST /vms/:id/start", "PUT /roles/:id/acls", "DELETE /sessions/:sid", "PATCH /users"]),
    );
  });

  for (const route of routes) {
    test(routeName(route), async () => {
      const sample = await sampleRequest(route, fx);
      if (route.path.startsWith("/configs/")) await fx.configOverride(); // something for DELETE to remove
      const needed = aclsOf(route, sample.body);
      expect(needed.length).toBeGreaterThan(0);
      for (const acl of needed) {
        await ok(sa.del(`/roles/${roles.lacks}/acls/${acl}`));
        await ok(sa.put(`/roles/${roles.denies}/acls`, { acl, positive: false }));
        try {
          const mark = await lastAuditId();
          const before = await fingerprint(sql());
          const lacked = await send(lacker, sample);
          expect([routeName(route), "lacks", lacked.status]).toEqual([routeName(route), "lacks", 403]);
          expect(lacked.body.error.message).toContain(acl);
          const denied = await send(denier, sample);
          expect([routeName(route), "denies", denied.status]).toEqual([routeName(route), "denies", 403]);
          expect(await fingerprint(sql())).toEqual(before);
          const refusals = await auditSince(mark);
          if (route.audit) {
            expect(refusals.map((a) => [a.action, a.administrator_name, a.ok])).toEqual([
              [route.audit.action, "lacker", false],
              [route.audit.action, "denier", false],
            ]);
            expect(refusals[0]!.error).toContain("missing permission");
          } else expect(refusals.length).toBe(0);
        } finally {
          // Grant it back before the next route, whatever happened.
          await ok(sa.put(`/roles/${roles.lacks}/acls`, { acl }));
          await ok(sa.del(`/roles/${roles.denies}/acls/${acl}`));
        }
      }
      const mark = await lastAuditId();
      const through = await send(inheritor, sample, { "x-qvd-source": "cli" });
      const expected = CONFLICT_OK.has(routeName(route))
        ? [409]
        : route.method === "POST" && !route.path.includes(":") && !route.path.includes("/actions/")
          ? [201]
          : [200];
      expect([routeName(route), through.status, through.status < 300 ? "" : through.body]).toEqual([
        routeName(route),
        expected[0]!,
        expected[0]! < 300 ? "" : through.body,
      ]);
      if (!route.audit) return;
      const all = await auditSince(mark);
      // A mass change also writes an entry per object (for the objects' own trails), before its own.
      const perObject = all.filter((r) => (r.arguments as Record<string, unknown>).many === true);
      for (const r of perObject) expect([r.administrator_name, r.source]).toEqual(["inheritor", "cli"]);
      const rows = all.filter((r) => !perObject.includes(r));
      expect(rows.length).toBe(1);
      const a = rows[0]!;
      expect(clone(a)).toMatchObject({
        action: route.audit.action,
        object_type: route.audit.object ?? null,
        administrator_name: "inheritor",
        superadmin: true,
        ok: through.status < 300,
        source: "cli",
        address: "127.0.0.1",
      });
      expect(a.error === null).toBe(through.status < 300);
      if (route.path.includes(":id") && typeof sample.objectId === "number") expect(a.object_id).toBe(sample.objectId);
      // Objects of a tenant are audited in that tenant.
      if (route.path.includes(":id") && ["/users", "/osfs", "/dis", "/vms"].some((p) => route.path.startsWith(p)))
        expect(a.tenant_id).toBe(1);
      expect(a.arguments).toBeObject();
    });
  }
});

describe("field ACLs", () => {
  test("user.update without user.update.password: the description changes, the password does not", async () => {
    const u = await ok(sa.post("/users", { name: "fielded", password: "first-password" }), 201);
    const [before] = await sql()`SELECT password_hash FROM users WHERE id = ${u.id}`;
    await ok(sa.del(`/roles/${roles.lacks}/acls/user.update.password`));
    try {
      const pw = await lacker.patch(`/users/${u.id}`, { password: "second-password" });
      expect(pw.status).toBe(403);
      expect(pw.body.error.message).toContain("user.update.password");
      const both = await lacker.patch(`/users/${u.id}`, { password: "second-password", description: "both" });
      expect(both.status).toBe(403);
      expect((await ok(lacker.patch(`/users/${u.id}`, { description: "changed" }))).description).toBe("changed");
      const [after] = await sql()`SELECT password_hash, description FROM users WHERE id = ${u.id}`;
      expect(after).toEqual({ password_hash: before!.password_hash, description: "changed" });
      // Mass updates obey the same rule.
      expect((await lacker.patch(`/users?id=${u.id}`, { password: "second-password" })).status).toBe(403);
    } finally {
      await ok(sa.put(`/roles/${roles.lacks}/acls`, { acl: "user.update.password" }));
    }
    expect((await ok(lacker.patch(`/users/${u.id}`, { password: "second-password" }))).has_password).toBe(true);
  });

  test("user.block and vm.update.di_tag are their own rights", async () => {
    const u = await ok(sa.post("/users", { name: "blockfield" }), 201);
    await ok(sa.put(`/roles/${roles.denies}/acls`, { acl: "user.block", positive: false }));
    try {
      expect((await denier.patch(`/users/${u.id}`, { blocked: true })).status).toBe(403);
      expect((await denier.post(`/users/${u.id}/block`)).status).toBe(403);
      expect((await ok(sa.get(`/users/${u.id}`))).blocked).toBe(false);
    } finally {
      await ok(sa.del(`/roles/${roles.denies}/acls/user.block`));
    }
    expect((await ok(denier.patch(`/users/${u.id}`, { blocked: true }))).blocked).toBe(true);
    const vm = await fx.vm();
    await ok(sa.del(`/roles/${roles.lacks}/acls/vm.update.di_tag`));
    try {
      expect((await lacker.patch(`/vms/${vm}`, { di_tag: "head" })).status).toBe(403);
      expect((await ok(lacker.patch(`/vms/${vm}`, { description: "fine" }))).di_tag).toBe("default");
    } finally {
      await ok(sa.put(`/roles/${roles.lacks}/acls`, { acl: "vm.update.di_tag" }));
    }
  });

  test("a denial masks what a role inherits, for the roles that inherit it in turn; an own grant restores it", async () => {
    const masked = await ok(sa.post("/roles", { name: "Masked" }), 201);
    await ok(sa.post(`/roles/${masked.id}/inherits`, { role_id: roles.all }));
    await ok(sa.put(`/roles/${masked.id}/acls`, { acl: "vm.see", positive: false }));
    const child = await ok(sa.post("/roles", { name: "Child of masked" }), 201);
    await ok(sa.post(`/roles/${child.id}/inherits`, { role_id: masked.id }));
    expect((await ok(sa.get(`/roles/${child.id}/acls`))).items).not.toContain("vm.see");
    expect((await ok(sa.get(`/roles/${child.id}/acls`))).items).toContain("vm.start");
    // The child re-granting it wins over the parent's denial.
    await ok(sa.put(`/roles/${child.id}/acls`, { acl: "vm.see" }));
    expect((await ok(sa.get(`/roles/${child.id}/acls`))).items).toContain("vm.see");
  });
});

describe("audit", () => {
  test("passwords never reach the audit log", async () => {
    const secrets = [
      "admin-secret-111",
      "user-secret-2222",
      "user-secret-3333",
      "login-secret-444",
      "own-new-secret-55",
    ];
    const mark = await lastAuditId();
    const a = await ok(sa.post("/administrators", { name: "secretive", password: secrets[0] }), 201);
    const u = await ok(sa.post("/users", { name: "secretuser", password: secrets[1] }), 201);
    await ok(sa.patch(`/users/${u.id}`, { password: secrets[2] }));
    await ok(sa.patch(`/users?id=${u.id}`, { password: secrets[2] }));
    expect((await api.anonymous.post("/login", { name: "secretive", password: secrets[3] })).status).toBe(401);
    const c = await api.login("secretive", secrets[0]!);
    await ok(c.put("/session/password", { current_password: secrets[0], password: secrets[4] }));
    expect((await sa.patch(`/users/${u.id}`, { password: "short" })).status).toBe(422); // failures are audited too
    const rows = await auditSince(mark);
    expect(rows.map((r) => r.action)).toEqual([
      "administrator.create",
      "user.create",
      "user.update",
      "user.update",
      "user.update_many",
      "login",
      "login",
      "administrator.update_own_password",
      "user.update",
    ]);
    const [{ text }] =
      (await sql()`SELECT string_agg(a::text, E'\\n') AS text FROM audit_log a WHERE id > ${mark}`) as unknown as [
        { text: string },
      ];
    for (const s of [...secrets, "short"]) expect(text).not.toContain(s);
    expect(rows[0]!.arguments).toEqual({ name: "secretive", password: "********", tenant_id: 1 });
    expect(rows[2]!.arguments).toEqual({ password: "********" });
    // The mass change: an entry for the object (in its audit trail), then the request's.
    expect(clone(rows[3]!)).toMatchObject({
      object_id: u.id,
      object_name: "secretuser",
      arguments: { many: true, changes: { password: "********" } },
    });
    expect(rows[4]!.arguments.changes).toEqual({ password: "********" });
    expect(rows[7]!.arguments).toEqual({ current_password: "********", password: "********" });
    expect(clone(rows[8]!)).toMatchObject({
      ok: false,
      error: expect.stringContaining("password"),
      arguments: { password: "********" },
    });
    expect(clone(rows[0]!)).toMatchObject({
      administrator_name: TEST_ADMIN.name,
      superadmin: true,
      tenant_id: 1,
      tenant_name: "default",
      object_type: "administrator",
      object_id: a.id,
      object_name: "secretive",
      source: "api",
      address: "127.0.0.1",
    });
  });

  test("the source header is recorded; reads are not audited", async () => {
    const mark = await lastAuditId();
    await ok(sa.get("/users"));
    await ok(sa.get("/audit"));
    expect((await auditSince(mark)).length).toBe(0);
    const u = await ok(sa.call("POST", "/users", { name: "fromwat" }, { "x-qvd-source": "WAT" }), 201);
    await ok(sa.call("DELETE", `/users/${u.id}`, undefined, { "x-qvd-source": "bogus" }));
    expect((await auditSince(mark)).map((r) => [r.action, r.source, r.object_id])).toEqual([
      ["user.create", "wat", u.id],
      ["user.delete", "api", u.id],
    ]);
  });

  test("an unauthenticated request to a protected route is not audited", async () => {
    const mark = await lastAuditId();
    expect((await api.anonymous.post("/users", { name: "anon" })).status).toBe(401);
    expect((await auditSince(mark)).length).toBe(0);
  });
});
