// No administrator can give rights they do not hold: not by assigning a role, not by making a
// role inherit one, not by granting an ACL (nor by removing a denial).
import { beforeAll, expect, test } from "bun:test";
import { useTestApi, type ApiClient } from "./support/api.ts";
import { ok } from "./support/assert.ts";
import { useTestDatabase } from "./support/db.ts";

const db = useTestDatabase();
const live = useTestApi(db, { "wat.multitenant": "1" });
const { sa } = live;
let boss: ApiClient;
let bossId: number;
const roleId: Record<string, number> = {};

beforeAll(async () => {
  const t = (await ok(sa.post("/tenants", { name: "acme" }), 201)).id;
  for (const n of ["Superadmin", "Tenant administrator", "Operator"]) roleId[n] = await live.roleId(n);
  ({ id: bossId, client: boss } = await live.admin("boss", {
    tenantId: t,
    tenant: "acme",
    roles: [roleId["Tenant administrator"]!],
  }));
});

test("a tenant administrator cannot give themselves (or anyone) a role with more rights", async () => {
  const r = await boss.post(`/administrators/${bossId}/roles`, { role_id: roleId.Superadmin });
  expect(r.status).toBe(403);
  expect(r.body.error.message).toContain("you can only give permissions you hold yourself");
  expect(r.body.error.message).toContain("tenant.create");
  expect((await sa.get(`/administrators/${bossId}`)).body.roles).toEqual(["Tenant administrator"]);
  // A role within their own rights is fine.
  expect((await boss.post(`/administrators/${bossId}/roles`, { role_id: roleId.Operator })).status).toBe(200);
});

test("nor grant an ACL they lack, inherit a stronger role, or lift a denial of an ACL they lack", async () => {
  const mine = (await boss.post("/roles", { name: "helpers" })).body.id;
  expect((await boss.put(`/roles/${mine}/acls`, { acl: "host.create" })).status).toBe(403);
  expect((await boss.put(`/roles/${mine}/acls`, { acl: "vm.start" })).status).toBe(200);
  expect((await boss.put(`/roles/${mine}/acls`, { acl: "host.create", positive: false })).status).toBe(200); // denying is always fine
  expect((await boss.del(`/roles/${mine}/acls/host.create`)).status).toBe(403);
  expect((await boss.post(`/roles/${mine}/inherits`, { role_id: roleId.Superadmin })).status).toBe(403);
  expect((await boss.post(`/roles/${mine}/inherits`, { role_id: roleId.Operator })).status).toBe(200);
  const role = (await sa.get(`/roles/${mine}`)).body;
  expect([role.grants, role.denials, role.inherits]).toEqual([["vm.start"], ["host.create"], ["Operator"]]);
  // A superadmin may do all of it.
  expect((await sa.del(`/roles/${mine}/acls/host.create`)).status).toBe(200);
});
