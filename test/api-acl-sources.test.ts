// Where ACLs come from: a role's inherited roles and an administrator's roles, each answered
// with its effective ACLs (the WAT shows "inherited from …" and the origin of an admin's ACLs).
import { expect, test } from "bun:test";
import { useTestApi } from "./support/api.ts";
import { useTestDatabase } from "./support/db.ts";

const db = useTestDatabase();
const { sa } = useTestApi(db);

test("a role's acls name the roles it inherits, each with its effective ACLs (denials applied)", async () => {
  const operator = (await sa.get("/roles?name=Operator")).body.items[0];
  const base = (await sa.post("/roles", { name: "base" })).body.id;
  await sa.put(`/roles/${base}/acls`, { acl: "config.see" });
  const mid = (await sa.post("/roles", { name: "mid" })).body.id;
  expect((await sa.post(`/roles/${mid}/inherits`, { role_id: base })).status).toBe(200);
  await sa.put(`/roles/${mid}/acls`, { acl: "audit.see" });
  const top = (await sa.post("/roles", { name: "top" })).body.id;
  for (const p of [mid, operator.id])
    expect((await sa.post(`/roles/${top}/inherits`, { role_id: p })).status).toBe(200);
  await sa.put(`/roles/${top}/acls`, { acl: "vm.stop", positive: false });

  const r = (await sa.get(`/roles/${top}/acls`)).body;
  expect(r.items).toContain("config.see");
  expect(r.items).not.toContain("vm.stop");
  expect(r.inherits.map((p: any) => [p.name, p.builtin])).toEqual([
    ["mid", false],
    ["Operator", true],
  ]);
  expect(r.inherits[0]).toMatchObject({ id: mid, tenant_id: expect.any(Number), acls: ["audit.see", "config.see"] });
  expect(r.inherits[1].acls).toContain("vm.stop"); // the parent still has it; the child denies it
  expect((await sa.get(`/roles/${base}/acls`)).body.inherits).toEqual([]);
});

test("an administrator's acls name their roles, each with its effective ACLs", async () => {
  const auditor = (await sa.get("/roles?name=Auditor")).body.items[0];
  const mid = (await sa.get("/roles?name=mid")).body.items[0];
  const a = (await sa.post("/administrators", { tenant_id: 1, name: "watcher", password: "watcher-password" })).body.id;
  expect((await sa.get(`/administrators/${a}/acls`)).body).toEqual({ items: [], roles: [] });
  for (const role of [auditor.id, mid.id])
    expect((await sa.post(`/administrators/${a}/roles`, { role_id: role })).status).toBe(200);
  const r = (await sa.get(`/administrators/${a}/acls`)).body;
  expect(r.roles.map((x: any) => [x.id, x.name])).toEqual([
    [auditor.id, "Auditor"],
    [mid.id, "mid"],
  ]);
  expect(r.roles[1].acls).toEqual(["audit.see", "config.see"]);
  expect(r.items).toEqual([...new Set(r.roles.flatMap((x: any) => x.acls))].sort());
});

test("settings say which are secrets; a secret's value is masked", async () => {
  expect((await sa.put("/configs/auth.ldap.bind_password", { value: "s3cret-pw" })).status).toBe(200);
  const items = (await sa.get("/configs")).body.items;
  const pw = items.find((i: any) => i.key === "auth.ldap.bind_password");
  expect(pw).toMatchObject({ secret: true, value: "********", source: "global" });
  expect(items.find((i: any) => i.key === "auth.totp.issuer").secret).toBe(false);
});
