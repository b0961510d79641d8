// Tenant isolation in multitenant mode, generated from the route table: an administrator of
// tenant A aims every route at the objects of tenant B and always gets a 404 (a 403 where A's
// role lacks the route's ACL altogether), and nothing of B changes. Lists, mass changes,
// creation, references across tenants, global objects, and what a superadmin sees.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import type { Route } from "../src/api/context.ts";
import { createAdmin, useTestApi, type ApiClient } from "./support/api.ts";
import { ok } from "./support/assert.ts";
import { useTestDatabase } from "./support/db.ts";
import {
  aclsOf,
  FIXTURE_PROPERTY,
  Fixtures,
  fingerprint,
  fixedTargets,
  isMassRoute,
  routeName,
  routeTable,
  sampleRequest,
  type Targets,
} from "./support/api-routes.ts";

const db = useTestDatabase();
const sql = () => db().sql;

const storage = mkdtempSync(join(tmpdir(), "qvd-tenancy-test-"));
const live = useTestApi(db, { "wat.multitenant": "1", "path.storage.root": storage });
const { api, sa } = live;
let a: ApiClient; // administrator of tenant A
let tA: { id: number; name: string };
let tB: { id: number; name: string };
let adminA: number;
let aAcls: Set<string>;
let bTargets: Targets & { ids?: Record<string, number | string> };
let bIds: Record<string, number | string>;
let fxA: Fixtures;

beforeAll(async () => {
  tA = await ok(sa.post("/tenants", { name: "alpha" }), 201);
  tB = await ok(sa.post("/tenants", { name: "bravo" }), 201);
  const roles = [await live.roleId("Tenant administrator")];
  adminA = await createAdmin(sa, "boss", { tenantId: tA.id, roles });
  await createAdmin(sa, "boss", { tenantId: tB.id, roles }); // the same name in another tenant
  a = await api.login("boss", "boss-password", "alpha");
  aAcls = new Set((await ok(a.get("/session"))).acls);
  // Objects of every kind in B, made by the superadmin and directly in the database.
  await ok(sa.post("/users", { tenant_id: tB.id, name: "bob" }), 201);
  await ok(sa.put("/configs/osf.default.memory", { value: "512", tenant_id: tB.id }));
  bTargets = await fixedTargets(new Fixtures(sql(), tB.id, "b"));
  bIds = bTargets.ids as Record<string, number | string>;
  fxA = new Fixtures(sql(), tA.id, "a");
});
afterAll(() => {
  rmSync(storage, { recursive: true, force: true });
});

/** Routes about global objects (hosts) are not tenant matters. */
const aboutGlobal = (r: Route) => r.path.startsWith("/hosts");
const expectedFor = (r: Route, body: unknown) => (aclsOf(r, body).every((x) => aAcls.has(x)) ? 404 : 403);

describe("A's administrator aims every route at B's objects", () => {
  const table = routeTable();
  const targeted = table.filter((r) => r.path.includes("/:") && !aboutGlobal(r));

  test("the matrix covers the routes", () => {
    expect(targeted.length).toBeGreaterThan(50);
    // The tenant administrator has most ACLs: most answers below are 404s, not 403s.
    expect(targeted.filter((r) => expectedFor(r, { description: "x" }) === 404).length).toBeGreaterThan(40);
  });

  for (const route of targeted) {
    test(routeName(route), async () => {
      const sample = await sampleRequest(route, bTargets, { multitenant: true });
      const before = await fingerprint(sql());
      const r = await a.call(sample.method, sample.path, sample.body);
      const want = expectedFor(route, sample.body);
      expect([routeName(route), sample.path, r.status]).toEqual([routeName(route), sample.path, want]);
      expect(r.body.error.status).toBe(want);
      // A 404 says nothing about B's object.
      if (want === 404) for (const name of ["bob", "bravo", "b-"]) expect(r.body.error.message).not.toContain(name);
      expect(await fingerprint(sql())).toEqual(before);
    });
  }

  test("mass routes filtered on B's ids match nothing", async () => {
    for (const route of table.filter((r) => isMassRoute(r) && !aboutGlobal(r))) {
      const sample = await sampleRequest(route, bTargets, { multitenant: true });
      const before = await fingerprint(sql());
      const r = await a.call(sample.method, sample.path, sample.body);
      const want = expectedFor(route, sample.body) === 404 ? 200 : 403;
      expect([routeName(route), r.status]).toEqual([routeName(route), want]);
      if (want === 200) expect([routeName(route), r.body.total]).toEqual([routeName(route), 0]);
      expect(await fingerprint(sql())).toEqual(before);
    }
  });

  test("lists show none of B's objects, also when filtered on B's tenant", async () => {
    for (const route of table.filter((r) => r.method === "GET" && r.query === "list")) {
      const seg = route.path.slice(1);
      const kind = seg === "properties" ? "property" : seg === "audit" ? "audit" : seg.replace(/s$/, "");
      const all = await a.get(route.path);
      if (seg === "tenants") {
        expect(all.status).toBe(403);
        continue;
      }
      expect([route.path, all.status]).toEqual([route.path, 200]);
      for (const item of all.body.items) {
        expect([route.path, item.tenant_id === tB.id]).toEqual([route.path, false]);
        if (seg !== "hosts" && seg !== "roles" && seg !== "properties")
          expect([route.path, item.tenant_id]).toEqual([route.path, tA.id]);
        if (seg !== "hosts") expect([route.path, item.id === bIds[kind]]).toEqual([route.path, false]);
      }
      const filtered = await a.get(`${route.path}?tenant_id=${tB.id}`);
      if (seg === "hosts")
        expect(filtered.status).toBe(422); // hosts have no tenant
      else expect([route.path, filtered.status, filtered.body.total]).toEqual([route.path, 200, 0]);
      const byId = await a.get(`${route.path}?id=${bIds[kind]}`);
      if (seg !== "hosts") expect([route.path, byId.body.total]).toEqual([route.path, 0]);
    }
    expect((await a.get("/users?name=bob")).body.total).toBe(0);
    expect((await a.get(`/configs?tenant_id=${tB.id}`)).status).toBe(404);
    expect((await a.get("/sessions")).status).toBe(403);
    const stats = await ok(a.get("/stats"));
    expect(stats.users.total).toBe(
      (await sql()`SELECT count(*)::int AS n FROM users WHERE tenant_id = ${tA.id}`)[0]!.n,
    );
  });

  test("the dashboard's nodes with most VMs count only A's VMs for A", async () => {
    await sql()`UPDATE vm_runtimes SET vm_state = 'running', host_id = ${bIds.host as number} WHERE vm_id = ${bIds.vm as number}`;
    try {
      const mine = (await ok(a.get("/stats"))).top_hosts;
      expect(mine.find((h: any) => h.id === bIds.host)).toBeUndefined();
      const all = (await ok(sa.get("/stats"))).top_hosts;
      expect(all.find((h: any) => h.id === bIds.host)?.vms_running).toBeGreaterThanOrEqual(1);
    } finally {
      await sql()`UPDATE vm_runtimes SET vm_state = 'stopped', host_id = NULL WHERE vm_id = ${bIds.vm as number}`;
    }
  });

  test("B's objects are all still there, as they were", async () => {
    const ids = bIds;
    expect((await ok(sa.get(`/users/${ids.user}`))).description).toBe("");
    expect((await ok(sa.get(`/vms/${ids.vm}`))).vm_cmd).toBeNull();
    expect((await ok(sa.get(`/dis/${ids.di}`))).tags).toContain("extra");
    expect((await ok(sa.get(`/dis/${ids.di}`))).state).toBe("new");
    expect((await ok(sa.get(`/roles/${ids.role}`))).grants).toEqual(["vm.see"]);
    expect((await ok(sa.get(`/administrators/${ids.administrator}`))).roles).toEqual(["Auditor"]);
    expect(await ok(sa.get(`/users/${ids.user}/properties`))).toEqual({ [FIXTURE_PROPERTY]: "fixture" });
    expect((await ok(sa.get("/sessions"))).items.map((s: any) => s.id)).toContain(ids.session);
    const cfg = await ok(sa.get(`/configs?tenant_id=${tB.id}`));
    expect(cfg.items.find((i: any) => i.key === "osf.default.memory")).toMatchObject({ source: "tenant" });
  });
});

describe("creation and references across tenants", () => {
  test("A cannot create objects in B", async () => {
    for (const [path, body] of [
      ["/users", { name: "intruder" }],
      ["/osfs", { name: "intruder" }],
      ["/roles", { name: "intruder" }],
      ["/properties", { key: "intruder" }],
      ["/administrators", { name: "intruder", password: "intruder-password" }],
    ] as const) {
      const r = await a.post(path, { ...body, tenant_id: tB.id });
      expect([path, r.status]).toEqual([path, 422]);
      expect(r.body.error.field).toBe("tenant_id");
    }
    expect((await sql()`SELECT count(*)::int AS n FROM users WHERE name = 'intruder'`)[0]!.n).toBe(0);
    // Without a tenant, A's administrator creates in A.
    expect((await ok(a.post("/users", { name: "own-user" }), 201)).tenant_id).toBe(tA.id);
    // A superadmin must say which tenant in multitenant mode.
    expect((await sa.post("/users", { name: "where" })).body.error.field).toBe("tenant_id");
  });

  test("A cannot use B's objects in its own", async () => {
    const aUser = await fxA.user();
    const aOsf = await fxA.osf();
    const viaOsf = await a.post("/vms", { user_id: aUser, osf_id: bIds.osf, name: "mixed" });
    expect(viaOsf.status).toBe(422);
    expect(viaOsf.body.error.field).toBe("osf_id");
    const viaUser = await a.post("/vms", { user_id: bIds.user, osf_id: aOsf, name: "mixed" });
    expect(viaUser.status).toBe(422);
    expect(viaUser.body.error.field).toBe("user_id");
    expect((await a.post("/dis", { osf_id: bIds.osf, path: "mixed.img" })).body.error.field).toBe("osf_id");
    // Even a superadmin cannot mix tenants in one VM.
    expect((await sa.post("/vms", { user_id: aUser, osf_id: bIds.osf, name: "mixed" })).status).toBe(422);
    const aRole = await ok(a.post("/roles", { name: "A role" }), 201);
    expect((await a.post(`/roles/${aRole.id}/inherits`, { role_id: bIds.role })).status).toBe(404);
    expect((await a.post(`/administrators/${adminA}/roles`, { role_id: bIds.role })).status).toBe(404);
    const bProp = await ok(sa.get(`/properties/${bIds.property}`));
    expect((await a.put(`/users/${aUser}/properties/${bProp.key}`, { value: "x" })).status).toBe(422);
    expect((await a.put(`/configs/osf.default.memory`, { value: "256", tenant_id: tB.id })).status).toBe(404);
    expect((await sql()`SELECT count(*)::int AS n FROM vms WHERE name = 'mixed'`)[0]!.n).toBe(0);
  });

  test("B's audit rows are invisible to A; A's own are visible", async () => {
    const own = await ok(a.get("/audit?action=user.create"));
    expect(own.total).toBeGreaterThan(0);
    expect(own.items.every((r: any) => r.tenant_id === tA.id)).toBe(true);
    expect((await ok(a.get("/audit?limit=10000"))).items.every((r: any) => r.tenant_id === tA.id)).toBe(true);
    expect((await ok(sa.get(`/audit?tenant_id=${tB.id}`))).total).toBeGreaterThan(0);
  });
});

describe("global objects", () => {
  test("A reads global roles, properties and hosts but cannot change them", async () => {
    const roles = await ok(a.get("/roles?tenant_id=0"));
    expect(roles.items.map((r: any) => r.name)).toEqual(expect.arrayContaining(["Operator", "Tenant administrator"]));
    const operator = roles.items.find((r: any) => r.name === "Operator").id;
    const globalRole = await ok(sa.post("/roles", { tenant_id: 0, name: "Global custom" }), 201);
    expect((await ok(a.get(`/roles/${globalRole.id}`))).name).toBe("Global custom");
    const before = await fingerprint(sql());
    for (const id of [operator, globalRole.id]) {
      expect((await a.patch(`/roles/${id}`, { description: "mine" })).status).toBe(403);
      expect((await a.put(`/roles/${id}/acls`, { acl: "vm.see" })).status).toBe(403);
      expect((await a.del(`/roles/${id}/acls/vm.see`)).status).toBe(403);
      expect(
        (await a.post(`/roles/${id}/inherits`, { role_id: operator === id ? globalRole.id : operator })).status,
      ).toBe(403);
      expect((await a.del(`/roles/${id}`)).status).toBe(403);
    }
    const prop = (await ok(a.get(`/properties?key=${FIXTURE_PROPERTY}`))).items[0];
    expect(prop.tenant_id).toBe(0);
    expect((await a.patch(`/properties/${prop.id}`, { description: "mine" })).status).toBe(403);
    expect((await a.del(`/properties/${prop.id}`)).status).toBe(403);
    const host = bIds.host;
    expect((await ok(a.get(`/hosts/${host}`))).id).toBe(host);
    expect((await ok(a.get("/hosts"))).total).toBeGreaterThan(0);
    expect((await ok(a.get(`/hosts/${host}/properties`)))[FIXTURE_PROPERTY]).toBe("fixture");
    expect((await a.patch(`/hosts/${host}`, { description: "mine" })).status).toBe(403);
    expect((await a.post("/hosts", { name: "mine", address: "10.1.1.1" })).status).toBe(403);
    expect((await a.post(`/hosts/${host}/block`)).status).toBe(403);
    expect((await a.post(`/hosts/${host}/stop_vms`)).status).toBe(403);
    expect((await a.del(`/hosts/${host}`)).status).toBe(403);
    expect((await a.put(`/hosts/${host}/properties/${FIXTURE_PROPERTY}`, { value: "mine" })).status).toBe(403);
    expect((await a.put("/configs/osf.default.memory", { value: "256", tenant_id: 0 })).status).toBe(404);
    expect(await fingerprint(sql())).toEqual(before);
  });

  test("even with every ACL (the Superadmin role), a tenant's administrator stays in its tenant", async () => {
    // A superadmin gave it by mistake (a tenant's administrator cannot take it: no escalation).
    const superRole = (await ok(a.get("/roles?name=Superadmin"))).items[0].id;
    expect((await a.post(`/administrators/${adminA}/roles`, { role_id: superRole })).status).toBe(403);
    await ok(sa.post(`/administrators/${adminA}/roles`, { role_id: superRole }));
    try {
      expect((await ok(a.get("/session"))).acls).toContain("host.create");
      const before = await fingerprint(sql());
      const host = bIds.host;
      expect((await a.post("/hosts", { name: "mine", address: "10.1.1.1" })).status).toBe(403);
      expect((await a.patch(`/hosts/${host}`, { description: "mine" })).status).toBe(403);
      expect((await a.post(`/hosts/${host}/block`)).status).toBe(403);
      expect((await a.post(`/hosts/${host}/stop_vms`)).status).toBe(403);
      expect((await a.post(`/hosts/actions/block?id=${host}`)).body.failed).toBe(1);
      expect((await a.put(`/hosts/${host}/properties/${FIXTURE_PROPERTY}`, { value: "mine" })).status).toBe(403);
      expect((await a.del(`/hosts/${host}`)).status).toBe(403);
      expect((await a.patch(`/tenants/${tB.id}`, { description: "mine" })).status).toBe(404);
      expect((await a.get(`/sessions`)).body.items.every((s: any) => s.tenant_id === tA.id)).toBe(true);
      expect((await a.del(`/sessions/${bIds.session}`)).status).toBe(404);
      expect((await a.get(`/users/${bIds.user}`)).status).toBe(404);
      expect(await fingerprint(sql())).toEqual(before);
    } finally {
      await ok(sa.del(`/administrators/${adminA}/roles/${superRole}`));
    }
  });
});

describe("superadmins", () => {
  test("see every tenant and filter by tenant", async () => {
    const all = await ok(sa.get("/users?limit=10000"));
    const tenants = new Set(all.items.map((u: any) => u.tenant_id));
    expect(tenants.has(tA.id) && tenants.has(tB.id)).toBe(true);
    const onlyB = await ok(sa.get(`/users?tenant_id=${tB.id}`));
    expect(onlyB.total).toBeGreaterThan(0);
    expect(onlyB.items.every((u: any) => u.tenant_id === tB.id)).toBe(true);
    expect((await ok(sa.get(`/tenants?name=bravo`))).items[0].id).toBe(tB.id);
  });

  test("login names the tenant: boss@bravo is B's administrator", async () => {
    const r = await api.anonymous.post("/login", { name: "boss@bravo", password: "boss-password" });
    expect(r.status).toBe(200);
    expect(r.body.administrator.tenant_id).toBe(tB.id);
    expect(r.body.multitenant).toBe(true);
    // Without a tenant only the global scope is tried in multitenant mode.
    expect((await api.anonymous.post("/login", { name: "boss", password: "boss-password" })).status).toBe(401);
  });

  test("a blocked tenant's administrators cannot log in and lose their sessions", async () => {
    const c = await api.login("boss", "boss-password", "bravo");
    await ok(sa.patch(`/tenants/${tB.id}`, { blocked: true }));
    try {
      expect((await c.get("/session")).status).toBe(401);
      const r = await api.anonymous.post("/login", { name: "boss", tenant: "bravo", password: "boss-password" });
      expect(r.status).toBe(403);
    } finally {
      await ok(sa.patch(`/tenants/${tB.id}`, { blocked: false }));
    }
  });
});
