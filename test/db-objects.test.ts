// CRUD through the data layer for every object, the schema's constraints, and tenant scoping,
// against a real PostgreSQL database.
import { beforeAll, describe, expect, test } from "bun:test";
import * as D from "../src/db/index.ts";
import { useTestDatabase } from "./support/db.ts";

const db = useTestDatabase();
const ALL = D.ALL_TENANTS;
const sql = () => db().sql;

let acme: D.TenantRow;
let beta: D.TenantRow;

beforeAll(async () => {
  acme = await D.create(sql(), D.tenants, ALL, { name: "acme", description: "Acme Corp" });
  beta = await D.create(sql(), D.tenants, ALL, { name: "beta" });
});

async function rejects(p: Promise<unknown>): Promise<D.DataError> {
  try {
    await p;
  } catch (err) {
    if (err instanceof D.DataError) return err;
    throw err;
  }
  throw new Error("expected a DataError, but the call succeeded");
}

describe("tenants", () => {
  test("create, get, list, update, and the global scope is read-only", async () => {
    expect(acme.id).toBeGreaterThan(1);
    expect((await D.get(sql(), D.tenants, ALL, acme.id)).description).toBe("Acme Corp");
    const names = (await D.list(sql(), D.tenants, ALL)).rows.map((t) => t.name);
    expect(names).toEqual(expect.arrayContaining(["*", "default", "acme", "beta"]));
    const u = await D.update(sql(), D.tenants, ALL, beta.id, { description: "Beta Ltd" });
    expect(u.description).toBe("Beta Ltd");
    expect(u.updated_at.getTime()).toBeGreaterThanOrEqual(beta.updated_at.getTime());
    const e = await rejects(D.update(sql(), D.tenants, ALL, 0, { name: "x" }));
    expect(e.status).toBe(403);
    expect((await rejects(D.create(sql(), D.tenants, ALL, { name: "acme" }))).status).toBe(409);
    expect((await rejects(D.create(sql(), D.tenants, ALL, { name: "a b" }))).field).toBe("name");
  });

  test("a scoped caller sees only its own tenant", async () => {
    const seen = await D.list(sql(), D.tenants, D.tenantScope(acme.id));
    expect(seen.rows.map((t) => t.name)).toEqual(["acme"]);
    expect((await rejects(D.get(sql(), D.tenants, D.tenantScope(acme.id), beta.id))).status).toBe(404);
  });

  test("a tenant that still has users cannot be deleted; an empty one can", async () => {
    const t = await D.create(sql(), D.tenants, ALL, { name: "doomed" });
    const u = await D.create(sql(), D.users, ALL, { tenant_id: t.id, name: "alice" });
    const e = await rejects(D.remove(sql(), D.tenants, ALL, t.id));
    expect(e).toBeInstanceOf(D.InUseError);
    expect(e.message).toContain("1 users");
    await D.remove(sql(), D.users, ALL, u.id);
    await D.remove(sql(), D.tenants, ALL, t.id);
    expect(await D.find(sql(), D.tenants, ALL, t.id)).toBeUndefined();
  });
});

describe("users", () => {
  test("duplicate name in one tenant is rejected; the same name in two tenants is allowed", async () => {
    const a = await D.create(sql(), D.users, ALL, { tenant_id: acme.id, name: "bob", password: "bob-secret-1" });
    const b = await D.create(sql(), D.users, ALL, { tenant_id: beta.id, name: "bob" });
    expect(a.id).not.toBe(b.id);
    const e = await rejects(D.create(sql(), D.users, ALL, { tenant_id: acme.id, name: "bob" }));
    expect(e).toBeInstanceOf(D.ConflictError);
    expect(e.status).toBe(409);
    expect(e.message).toContain('"bob" already exists in this tenant');
  });

  test("CRUD, password hashing with argon2id, and verification", async () => {
    const u = await D.create(sql(), D.users, D.tenantScope(acme.id), {
      name: "carol",
      password: "carol-pass-1",
      description: "C",
    });
    expect(u.tenant_id).toBe(acme.id);
    expect(u.has_password).toBe(true);
    expect(u).not.toHaveProperty("password_hash");
    const [raw] = await sql()`SELECT password_hash FROM users WHERE id = ${u.id}`;
    expect(raw!.password_hash).toStartWith("$argon2id$");
    expect((await D.verifyUserPassword(sql(), acme.id, "carol", "carol-pass-1"))?.id).toBe(u.id);
    expect(await D.verifyUserPassword(sql(), acme.id, "carol", "wrong-password")).toBeUndefined();
    expect(await D.verifyUserPassword(sql(), acme.id, "nobody", "carol-pass-1")).toBeUndefined();

    const changed = await D.update(sql(), D.users, ALL, u.id, { blocked: true, password: null });
    expect(changed.blocked).toBe(true);
    expect(changed.has_password).toBe(false);
    expect(await D.verifyUserPassword(sql(), acme.id, "carol", "carol-pass-1")).toBeUndefined();

    await D.remove(sql(), D.users, ALL, u.id);
    expect((await rejects(D.get(sql(), D.users, ALL, u.id))).status).toBe(404);
  });

  test("input is validated: unknown fields, bad types, short passwords, another tenant", async () => {
    let e = await rejects(D.create(sql(), D.users, ALL, { tenant_id: acme.id, name: "dave", admin: true }));
    expect(e.status).toBe(422);
    expect(e.message).toContain('unknown field "admin"');
    e = await rejects(D.create(sql(), D.users, ALL, { tenant_id: acme.id, name: "dave", password: "short" }));
    expect(e.field).toBe("password");
    e = await rejects(D.create(sql(), D.users, ALL, { tenant_id: acme.id, name: "da ve" }));
    expect(e.field).toBe("name");
    e = await rejects(D.create(sql(), D.users, ALL, { name: "dave" }));
    expect(e.field).toBe("tenant_id");
    e = await rejects(D.create(sql(), D.users, D.tenantScope(acme.id), { tenant_id: beta.id, name: "dave" }));
    expect(e.field).toBe("tenant_id");
  });

  test("another tenant's user does not exist for a scoped caller, on every operation", async () => {
    const u = await D.create(sql(), D.users, ALL, { tenant_id: beta.id, name: "erin" });
    const acmeScope = D.tenantScope(acme.id);
    expect((await rejects(D.get(sql(), D.users, acmeScope, u.id))).status).toBe(404);
    expect((await rejects(D.update(sql(), D.users, acmeScope, u.id, { blocked: true }))).status).toBe(404);
    expect((await rejects(D.remove(sql(), D.users, acmeScope, u.id))).status).toBe(404);
    expect((await D.list(sql(), D.users, acmeScope)).rows.every((r) => r.tenant_id === acme.id)).toBe(true);
    expect((await D.get(sql(), D.users, ALL, u.id)).blocked).toBe(false);
  });
});

describe("OSFs, images and VMs", () => {
  let osf: D.OsfRow;
  let owner: D.UserRow;

  beforeAll(async () => {
    osf = await D.create(sql(), D.osfs, ALL, { tenant_id: acme.id, name: "desktop", memory_mb: 512 });
    owner = await D.create(sql(), D.users, ALL, { tenant_id: acme.id, name: "vmowner" });
  });

  test("OSF CRUD and name uniqueness per tenant", async () => {
    expect(osf.memory_mb).toBe(512);
    expect(osf.use_overlay).toBe(true);
    expect((await D.update(sql(), D.osfs, ALL, osf.id, { cpu_shares: 512 })).cpu_shares).toBe(512);
    expect((await rejects(D.create(sql(), D.osfs, ALL, { tenant_id: acme.id, name: "desktop" }))).status).toBe(409);
    const other = await D.create(sql(), D.osfs, ALL, { tenant_id: beta.id, name: "desktop" });
    expect((await rejects(D.update(sql(), D.osfs, ALL, other.id, { memory_mb: 1 }))).field).toBe("memory_mb");
    await D.remove(sql(), D.osfs, ALL, other.id);
  });

  test("images: versions, fixed version tags, head and default", async () => {
    const d1 = await D.create(sql(), D.dis, ALL, { osf_id: osf.id, path: "img-1.tar" });
    expect(d1.version).toMatch(/^\d{4}-\d{2}-\d{2}-000$/);
    expect(d1.tenant_id).toBe(acme.id);
    expect(d1.tags.sort()).toEqual(["default", "head", d1.version].sort());
    const d2 = await D.create(sql(), D.dis, ALL, { osf_id: osf.id, path: "img-2.tar", version: "v2" });
    expect(d2.tags.sort()).toEqual(["head", "v2"]);
    expect((await D.get(sql(), D.dis, ALL, d1.id)).tags.sort()).toEqual(["default", d1.version].sort());

    // Tags move between images of one OSF; version tags do not.
    expect(await D.tagDi(sql(), ALL, d2.id, "default")).toBe(d1.id);
    // An image whose file has not arrived is never started from.
    expect(await D.diForTag(sql(), osf.id, "default")).toBeUndefined();
    await D.finishDiUpload(sql(), d2.id, 10, "a".repeat(64));
    expect((await D.diForTag(sql(), osf.id, "default"))?.id).toBe(d2.id);
    expect((await rejects(D.tagDi(sql(), ALL, d1.id, "v2"))).status).toBe(409);
    await D.tagDi(sql(), ALL, d1.id, "stable");
    expect(await D.untagDi(sql(), ALL, d1.id, "stable")).toBe(true);
    expect((await rejects(D.untagDi(sql(), ALL, d2.id, "head"))).status).toBe(422);
    expect((await rejects(D.untagDi(sql(), ALL, d2.id, "v2"))).status).toBe(422);
    expect((await rejects(D.create(sql(), D.dis, ALL, { osf_id: osf.id, path: "x.tar", version: "v2" }))).status).toBe(
      409,
    );
    expect((await rejects(D.create(sql(), D.dis, ALL, { osf_id: osf.id, path: "../etc/passwd" }))).field).toBe("path");
    // Images are listed through their OSF's tenant.
    expect((await D.list(sql(), D.dis, D.tenantScope(beta.id))).rows).toHaveLength(0);
    expect(
      (
        await D.list(sql(), D.dis, D.tenantScope(acme.id), { filters: [{ field: "tags", op: "=", value: "v2" }] })
      ).rows.map((r) => r.id),
    ).toEqual([d2.id]);

    const blocked = await D.update(sql(), D.dis, ALL, d2.id, { blocked: true });
    expect(blocked.blocked).toBe(true);
    expect(await D.diForTag(sql(), osf.id, "default")).toBeUndefined();
  });

  test("moving a tag sets expiry times on running VMs still on the old image", async () => {
    const o = await D.create(sql(), D.osfs, ALL, { tenant_id: acme.id, name: "expiring" });
    const old = await D.create(sql(), D.dis, ALL, { osf_id: o.id, path: "exp-1.tar", version: "e1" });
    const fresh = await D.create(sql(), D.dis, ALL, {
      osf_id: o.id,
      path: "exp-2.tar",
      version: "e2",
      expire_soft_s: 60,
      expire_hard_s: 3600,
    });
    const host = await D.create(sql(), D.hosts, ALL, { name: "exp-node", address: "198.18.7.7" });
    const onOld = await D.create(sql(), D.vms, ALL, { user_id: owner.id, osf_id: o.id, name: "exp-old" });
    const onNew = await D.create(sql(), D.vms, ALL, { user_id: owner.id, osf_id: o.id, name: "exp-new" });
    const stopped = await D.create(sql(), D.vms, ALL, { user_id: owner.id, osf_id: o.id, name: "exp-stopped" });
    await sql()`UPDATE vm_runtimes SET vm_state = 'running', host_id = ${host.id}, current_di_id = ${old.id} WHERE vm_id = ${onOld.id}`;
    await sql()`UPDATE vm_runtimes SET vm_state = 'running', host_id = ${host.id}, current_di_id = ${fresh.id} WHERE vm_id = ${onNew.id}`;

    await D.tagDi(sql(), ALL, fresh.id, "default");
    const after = await D.get(sql(), D.vms, ALL, onOld.id);
    const soft = after.expire_soft_at!.getTime() - Date.now();
    const hard = after.expire_hard_at!.getTime() - Date.now();
    expect(soft > 50_000 && soft <= 60_000).toBe(true);
    expect(hard > 3_590_000 && hard <= 3_600_000).toBe(true);
    expect((await D.get(sql(), D.vms, ALL, onNew.id)).expire_hard_at).toBeNull();
    expect((await D.get(sql(), D.vms, ALL, stopped.id)).expire_hard_at).toBeNull();

    // Explicit expiry on tagging overrides the image's; null keeps what a VM had.
    await D.tagDi(sql(), ALL, old.id, "default", { soft_s: null, hard_s: 10 });
    const back = await D.get(sql(), D.vms, ALL, onNew.id);
    expect(back.expire_soft_at).toBeNull();
    expect(back.expire_hard_at!.getTime() - Date.now()).toBeLessThanOrEqual(10_000);
    for (const v of [onOld, onNew])
      await sql()`UPDATE vm_runtimes SET vm_state = 'stopped', host_id = NULL, current_di_id = NULL WHERE vm_id = ${v.id}`;
    for (const v of [onOld, onNew, stopped]) await D.remove(sql(), D.vms, ALL, v.id);
    await D.remove(sql(), D.hosts, ALL, host.id);
  });

  test("VM CRUD with address allocation from the VM network", async () => {
    const net = { range: "198.18.4.0/29" }; // usable: .2–.6 (.1 is the gateway)
    const v1 = await D.createVm(sql(), ALL, { user_id: owner.id, osf_id: osf.id, name: "desk1" }, net);
    const v2 = await D.createVm(sql(), ALL, { user_id: owner.id, osf_id: osf.id, name: "desk2" }, net);
    expect([v1.ip, v2.ip]).toEqual(["198.18.4.2", "198.18.4.3"]);
    expect(v1.tenant_id).toBe(acme.id);
    expect(v1.vm_state).toBe("stopped");
    expect(v1.user_state).toBe("disconnected");
    expect(v1.di_tag).toBe("default");
    const [counters] = await sql()`SELECT run_attempts::int FROM vm_counters WHERE vm_id = ${v1.id}`;
    expect(counters!.run_attempts).toBe(0);

    // The same name for the same user is refused; an explicit address may not be reused.
    expect(
      (await rejects(D.createVm(sql(), ALL, { user_id: owner.id, osf_id: osf.id, name: "desk1" }, net))).status,
    ).toBe(409);
    expect(
      (await rejects(D.create(sql(), D.vms, ALL, { user_id: owner.id, osf_id: osf.id, name: "d3", ip: v1.ip }))).field,
    ).toBe("ip");

    // Concurrent creations get distinct addresses.
    const more = await Promise.all(
      [3, 4, 5].map((n) => D.createVm(sql(), ALL, { user_id: owner.id, osf_id: osf.id, name: `par${n}` }, net)),
    );
    expect(new Set(more.map((v) => v.ip)).size).toBe(3);
    expect(
      (await rejects(D.createVm(sql(), ALL, { user_id: owner.id, osf_id: osf.id, name: "full" }, net))).message,
    ).toContain("no free address");
    for (const v of more) await D.remove(sql(), D.vms, ALL, v.id);

    const renamed = await D.update(sql(), D.vms, ALL, v2.id, { name: "desk2b", di_tag: "head" });
    expect([renamed.name, renamed.di_tag]).toEqual(["desk2b", "head"]);
    await D.remove(sql(), D.vms, ALL, v2.id);
  });

  test("a VM's OSF must be in its owner's tenant", async () => {
    const betaOsf = await D.create(sql(), D.osfs, ALL, { tenant_id: beta.id, name: "beta-osf" });
    const e = await rejects(D.create(sql(), D.vms, ALL, { user_id: owner.id, osf_id: betaOsf.id, name: "cross" }));
    expect(e.field).toBe("osf_id");
    // Also enforced by the database itself (composite foreign key).
    await expect(
      sql()`INSERT INTO vms (tenant_id, user_id, osf_id, name) VALUES (${acme.id}, ${owner.id}, ${betaOsf.id}, 'raw')`,
    ).rejects.toThrow();
    await D.remove(sql(), D.osfs, ALL, betaOsf.id);
  });

  test("deleting an OSF that still has VMs is refused and says which", async () => {
    const e = await rejects(D.remove(sql(), D.osfs, ALL, osf.id));
    expect(e).toBeInstanceOf(D.InUseError);
    expect(e.status).toBe(409);
    expect(e.message).toMatch(/still used by \d+ VMs \(\d+/);
    expect((e as D.InUseError).dependents.map((d) => d.kind)).toEqual(["VMs", "disk images"]);
    // The database refuses too, even without the data layer's check.
    await expect(sql()`DELETE FROM osfs WHERE id = ${osf.id}`).rejects.toThrow(/violates foreign key/);
    expect(await D.find(sql(), D.osfs, ALL, osf.id)).toBeDefined();
  });

  test("a user with VMs cannot be deleted; a running VM cannot be deleted", async () => {
    const e = await rejects(D.remove(sql(), D.users, ALL, owner.id));
    expect(e).toBeInstanceOf(D.InUseError);
    const host = await D.create(sql(), D.hosts, ALL, { name: "node-del", address: "198.18.9.9" });
    const v = await D.create(sql(), D.vms, ALL, { user_id: owner.id, osf_id: osf.id, name: "busy" });
    await sql()`UPDATE vm_runtimes SET vm_state = 'running', host_id = ${host.id} WHERE vm_id = ${v.id}`;
    expect((await rejects(D.remove(sql(), D.vms, ALL, v.id))).message).toContain("is running");
    expect((await rejects(D.remove(sql(), D.hosts, ALL, host.id))).message).toContain("VMs assigned to it");
    await sql()`UPDATE vm_runtimes SET vm_state = 'stopped', host_id = NULL WHERE vm_id = ${v.id}`;
    await D.remove(sql(), D.vms, ALL, v.id);
    await D.remove(sql(), D.hosts, ALL, host.id);
  });

  test("list: filters, sort, paging, total and field selection", async () => {
    const u = await D.create(sql(), D.users, ALL, { tenant_id: acme.id, name: "lister" });
    for (const n of ["alpha", "bravo", "charlie", "delta"])
      await D.create(sql(), D.vms, ALL, {
        user_id: u.id,
        osf_id: osf.id,
        name: n,
        description: n === "bravo" ? "special" : "",
      });
    const mine = { field: "user_id", op: "=" as const, value: String(u.id) };
    const q = (extra: D.ListQuery) =>
      D.list(sql(), D.vms, ALL, { ...extra, filters: [mine, ...(extra.filters ?? [])] });

    let r = await q({ sort: [{ field: "name", desc: true }], limit: 2 });
    expect(r.total).toBe(4);
    expect(r.rows.map((v) => v.name)).toEqual(["delta", "charlie"]);
    r = await q({ sort: [{ field: "name" }], limit: 2, offset: 2 });
    expect(r.rows.map((v) => v.name)).toEqual(["charlie", "delta"]);
    r = await q({ offset: 10 });
    expect([r.total, r.rows.length]).toEqual([4, 0]);
    r = await q({ filters: [{ field: "name", op: "like", value: "%r%" }] });
    expect(r.rows.map((v) => v.name).sort()).toEqual(["bravo", "charlie"]);
    r = await q({ filters: [{ field: "name", op: "in", value: "alpha,delta" }] });
    expect(r.rows.map((v) => v.name).sort()).toEqual(["alpha", "delta"]);
    r = await q({ filters: [{ field: "description", op: "!=", value: "special" }] });
    expect(r.total).toBe(3);
    const ids = (await q({ sort: [{ field: "id" }] })).rows.map((v) => v.id);
    r = await q({ filters: [{ field: "id", op: ">", value: String(ids[1]) }] });
    expect(r.rows.map((v) => v.id)).toEqual(ids.slice(2));
    r = await q({ filters: [{ field: "id", op: "<", value: ids[1] }] });
    expect(r.rows.map((v) => v.id)).toEqual(ids.slice(0, 1));
    r = await q({ filters: [{ field: "vm_state", op: "=", value: "running" }] });
    expect(r.total).toBe(0);
    r = await q({ filters: [{ field: "host_id", op: "null" }], fields: ["name"], sort: [{ field: "name" }] });
    expect(r.rows[0] as object).toEqual({ id: ids[0]!, name: "alpha" });

    expect((await rejects(q({ filters: [{ field: "password", op: "=", value: "x" }] }))).status).toBe(422);
    expect((await rejects(q({ filters: [{ field: "id", op: "=", value: "abc" }] }))).field).toBe("id");
    expect((await rejects(q({ sort: [{ field: "nope" }] }))).status).toBe(422);
    expect((await rejects(q({ limit: -1 }))).field).toBe("limit");
    // Injection attempts are just values.
    r = await q({ filters: [{ field: "name", op: "=", value: "x' OR '1'='1" }] });
    expect(r.total).toBe(0);
  });
});

describe("administrators and roles", () => {
  test("administrator CRUD, password verification, tenant scoping", async () => {
    const a = await D.create(sql(), D.administrators, ALL, {
      tenant_id: acme.id,
      name: "acme-admin",
      password: "acme-admin-pw",
    });
    expect(a.superadmin).toBe(false);
    expect((await D.verifyAdministrator(sql(), acme.id, "acme-admin", "acme-admin-pw"))?.id).toBe(a.id);
    expect(await D.verifyAdministrator(sql(), acme.id, "acme-admin", "nope-nope")).toBeUndefined();
    expect((await D.verifyAdministrator(sql(), 0, "superadmin", "test-superadmin-pw"))?.superadmin).toBe(true);
    const list = await D.list(sql(), D.administrators, D.tenantScope(acme.id));
    expect(list.rows.map((r) => r.name)).toEqual(["acme-admin"]);
    const updated = await D.update(sql(), D.administrators, ALL, a.id, { password: "another-password" });
    expect(updated.id).toBe(a.id);
    expect(await D.verifyAdministrator(sql(), acme.id, "acme-admin", "another-password")).toBeDefined();
    await D.remove(sql(), D.administrators, ALL, a.id);
  });

  test("roles grant, deny and inherit; effective ACLs; cycles refused; built-ins read-only", async () => {
    const acmeScope = D.tenantScope(acme.id);
    const base = await D.create(sql(), D.roles, acmeScope, { name: "base" });
    const child = await D.create(sql(), D.roles, acmeScope, { name: "child" });
    await D.setRoleAcl(sql(), acmeScope, base.id, "vm.see", true);
    await D.setRoleAcl(sql(), acmeScope, base.id, "vm.start", true);
    await D.setRoleAcl(sql(), acmeScope, base.id, "user.see", true);
    await D.addInheritance(sql(), acmeScope, child.id, base.id);
    await D.setRoleAcl(sql(), acmeScope, child.id, "vm.start", false);
    await D.setRoleAcl(sql(), acmeScope, child.id, "vm.stop", true);
    expect([...(await D.roleEffectiveAcls(sql(), child.id))].sort()).toEqual(["user.see", "vm.see", "vm.stop"]);
    expect([...(await D.roleEffectiveAcls(sql(), base.id))].sort()).toEqual(["user.see", "vm.see", "vm.start"]);

    const got = await D.get(sql(), D.roles, acmeScope, child.id);
    expect([got.inherits, got.grants, got.denials]).toEqual([["base"], ["vm.stop"], ["vm.start"]]);

    expect((await rejects(D.addInheritance(sql(), acmeScope, base.id, child.id))).message).toContain("cycle");
    expect((await rejects(D.setRoleAcl(sql(), acmeScope, base.id, "vm.fly", true))).field).toBe("acl");

    // An administrator's effective ACLs: union over roles, with inherited roles' grants.
    const admin = await D.create(sql(), D.administrators, acmeScope, { name: "op", password: "operator-pw" });
    await D.assignRole(sql(), acmeScope, admin.id, child.id);
    const op = (await D.list(sql(), D.roles, acmeScope, { filters: [{ field: "name", op: "=", value: "Operator" }] }))
      .rows[0]!;
    await D.assignRole(sql(), acmeScope, admin.id, op.id);
    const eff = await D.administratorEffectiveAcls(sql(), admin.id);
    expect(eff.has("vm.stop") && eff.has("vm.start") && eff.has("user.block")).toBe(true);
    expect(eff.has("vm.delete")).toBe(false);
    expect((await D.get(sql(), D.administrators, acmeScope, admin.id)).roles).toEqual(["Operator", "child"]);

    // Built-in and global roles: visible to the tenant, not changeable by it.
    expect(op.builtin).toBe(true);
    expect((await rejects(D.update(sql(), D.roles, ALL, op.id, { description: "x" }))).status).toBe(403);
    expect((await rejects(D.remove(sql(), D.roles, acmeScope, op.id))).status).toBe(403);
    // A role that others inherit or that administrators hold cannot be deleted.
    expect((await rejects(D.remove(sql(), D.roles, acmeScope, base.id))).message).toContain("roles that inherit it");
    expect((await rejects(D.remove(sql(), D.roles, acmeScope, child.id))).message).toContain("administrators");
    // Another tenant cannot see or use acme's roles.
    expect((await rejects(D.get(sql(), D.roles, D.tenantScope(beta.id), base.id))).status).toBe(404);
  });

  test("the superadmin created by db init holds every ACL", async () => {
    const [admin] = await sql()`SELECT id FROM administrators WHERE tenant_id = 0 AND name = 'superadmin'`;
    const eff = await D.administratorEffectiveAcls(sql(), admin!.id);
    const [{ n }] = (await sql()`SELECT count(*)::int AS n FROM acls`) as unknown as [{ n: number }];
    expect(eff.size).toBe(n);
    expect(n).toBeGreaterThan(40);
  });
});

describe("hosts, properties, configs, audit, tokens", () => {
  test("host CRUD creates runtime and counter rows; global objects are read-only for tenants", async () => {
    const h = await D.create(sql(), D.hosts, ALL, { name: "node1", address: "198.18.0.10" });
    expect([h.state, h.blocked, h.vms_running]).toEqual(["stopped", false, 0]);
    await D.incrementHostCounter(sql(), h.id, "auth_ok", 2);
    expect((await D.hostCounters(sql(), h.id)).auth_ok).toBe(2);
    expect((await D.list(sql(), D.hosts, D.tenantScope(acme.id))).rows.map((r) => r.name)).toContain("node1");
    expect((await rejects(D.update(sql(), D.hosts, D.tenantScope(acme.id), h.id, { description: "x" }))).status).toBe(
      403,
    );
    expect((await rejects(D.create(sql(), D.hosts, ALL, { name: "node2", address: "198.18.0.10" }))).field).toBe(
      "address",
    );
    expect((await D.update(sql(), D.hosts, ALL, h.id, { frontend: false })).frontend).toBe(false);
    await D.remove(sql(), D.hosts, ALL, h.id);
    const [rt] = await sql()`SELECT count(*)::int AS n FROM host_runtimes WHERE host_id = ${h.id}`;
    expect(rt!.n).toBe(0);
  });

  test("properties: definitions per tenant and global, values on objects", async () => {
    const u = await D.create(sql(), D.users, ALL, { tenant_id: acme.id, name: "propuser" });
    const p = await D.create(sql(), D.properties, D.tenantScope(acme.id), { key: "cost_center", applies_to: ["user"] });
    await D.create(sql(), D.properties, ALL, { tenant_id: 0, key: "rack", applies_to: ["host"] });
    await D.setPropertyValue(sql(), D.tenantScope(acme.id), "user", u.id, "cost_center", "CC-42");
    await D.setPropertyValue(sql(), D.tenantScope(acme.id), "user", u.id, "cost_center", "CC-43");
    expect(await D.propertyValues(sql(), ALL, "user", u.id)).toEqual({ cost_center: "CC-43" });
    // A property applies only to the kinds of object it was defined for.
    expect((await rejects(D.setPropertyValue(sql(), ALL, "user", u.id, "rack", "r1"))).status).toBe(422);
    // Another tenant does not see acme's definition.
    const bu = await D.create(sql(), D.users, ALL, { tenant_id: beta.id, name: "propuser" });
    expect((await rejects(D.setPropertyValue(sql(), ALL, "user", bu.id, "cost_center", "x"))).field).toBe("key");
    await D.deletePropertyValue(sql(), ALL, "user", u.id, "cost_center");
    expect(await D.propertyValues(sql(), ALL, "user", u.id)).toEqual({});
    await D.remove(sql(), D.properties, ALL, p.id);
  });

  test("configs: validated cluster keys per tenant over the global scope", async () => {
    await D.setConfig(sql(), 0, "auth.ldap.timeout", "90");
    await D.setConfig(sql(), acme.id, "auth.ldap.timeout", "45");
    const rows = await D.listConfigRows(sql(), acme.id);
    expect(rows.map((r) => [r.tenant_id, r.key, r.value])).toEqual([
      [0, "auth.ldap.timeout", "90"],
      [acme.id, "auth.ldap.timeout", "45"],
    ]);
    expect((await rejects(D.setConfig(sql(), acme.id, "hkd.fence_after", "45"))).status).toBe(403);
    expect((await rejects(D.setConfig(sql(), 0, "hkd.fence_after", "soon"))).field).toBe("value");
    expect((await rejects(D.setConfig(sql(), 0, "no.such.key", "1"))).field).toBe("key");
    expect((await rejects(D.setConfig(sql(), 0, "nodename", "x"))).message).toContain("node setting");
    expect(await D.deleteConfig(sql(), acme.id, "auth.ldap.timeout")).toBe(true);
    expect(await D.deleteConfig(sql(), acme.id, "auth.ldap.timeout")).toBe(false);
  });

  test("audit entries redact secrets and are listed by tenant", async () => {
    await D.audit(sql(), {
      action: "user.create",
      object_type: "user",
      object_id: 1,
      object_name: "x",
      ok: true,
      source: "api",
      tenant_id: acme.id,
      tenant_name: "acme",
      arguments: { name: "x", password: "hunter2", nested: { api_token: "t" } },
    });
    await D.audit(sql(), {
      action: "login",
      ok: false,
      source: "wat",
      tenant_id: beta.id,
      error: "wrong password",
      address: "127.0.0.1",
    });
    const mine = await D.list(sql(), D.auditLog, D.tenantScope(acme.id), { sort: [{ field: "id", desc: true }] });
    expect(mine.rows.every((r) => r.tenant_id === acme.id)).toBe(true);
    expect(mine.rows[0]!.arguments).toEqual({ name: "x", password: "********", nested: { api_token: "********" } });
    const [raw] = await sql()`SELECT arguments::text AS a FROM audit_log WHERE action = 'user.create'`;
    expect(raw!.a).not.toContain("hunter2");
    expect(D.auditLog.create).toBeUndefined();
  });

  test("user tokens: single use is consumed, multi use is not, expired ones are refused", async () => {
    const u = await D.create(sql(), D.users, ALL, { tenant_id: acme.id, name: "tokenuser" });
    const once = await D.createUserToken(sql(), ALL, { userId: u.id, ttlSeconds: 60 });
    expect((await D.useUserToken(sql(), once.token))?.user_id).toBe(u.id);
    expect(await D.useUserToken(sql(), once.token)).toBeUndefined();
    const many = await D.createUserToken(sql(), ALL, { userId: u.id, ttlSeconds: 60, multiUse: true });
    expect(await D.useUserToken(sql(), many.token)).toBeDefined();
    expect(await D.useUserToken(sql(), many.token)).toBeDefined();
    const [stored] = await sql()`SELECT token_hash FROM user_tokens LIMIT 1`;
    expect(stored!.token_hash).not.toBe(many.token);
    const old = await D.createUserToken(sql(), ALL, { userId: u.id, ttlSeconds: 0 });
    expect(await D.useUserToken(sql(), old.token)).toBeUndefined();
    expect(await D.deleteExpiredUserTokens(sql())).toBeGreaterThanOrEqual(1);
    // Deleting the user removes its tokens.
    await D.remove(sql(), D.users, ALL, u.id);
    expect(await D.useUserToken(sql(), many.token)).toBeUndefined();
  });
});

test("state columns only accept their states", async () => {
  const [h] = await sql()`INSERT INTO hosts (name, address) VALUES ('chk', '198.18.1.1') RETURNING id`;
  await expect(sql()`UPDATE host_runtimes SET state = 'flying' WHERE host_id = ${h!.id}`).rejects.toThrow(
    /check constraint/,
  );
  await expect(sql()`UPDATE host_runtimes SET cmd = 'explode' WHERE host_id = ${h!.id}`).rejects.toThrow(
    /check constraint/,
  );
  await expect(sql()`UPDATE vm_runtimes SET vm_state = 'dancing'`).rejects.toThrow(/check constraint/);
  await expect(sql()`UPDATE dis SET state = 'melted'`).rejects.toThrow(/check constraint/);
});
