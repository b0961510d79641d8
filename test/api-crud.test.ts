// The admin REST API over HTTP: CRUD of every resource, actions, mass changes by filter, list
// queries, login and sessions, throttling, and the OpenAPI document.
import { beforeAll, describe, expect, test } from "bun:test";
import { listen } from "../src/db/listen.ts";
import { ApiClient, useTestApi } from "./support/api.ts";
import { clone, ok } from "./support/assert.ts";
import { TEST_ADMIN, useTestDatabase } from "./support/db.ts";
import { routeTable } from "./support/api-routes.ts";
import { waitFor } from "./support/wait.ts";

const db = useTestDatabase();
const sql = () => db().sql;
const { api, sa } = useTestApi(db);

const builtinRole = async (name: string): Promise<number> =>
  (await ok(sa.get(`/roles?name=${encodeURIComponent(name)}&tenant_id=0`))).items[0].id;

describe("CRUD of every resource", () => {
  test("tenants: create, get, list, update, delete, and errors", async () => {
    const t = await ok(sa.post("/tenants", { name: "acme", description: "Acme Corp" }), 201);
    expect(clone(t)).toMatchObject({ name: "acme", description: "Acme Corp", blocked: false });
    expect(clone(await ok(sa.get(`/tenants/${t.id}`)))).toMatchObject({ id: t.id, name: "acme" });
    const list = await ok(sa.get("/tenants?sort=name"));
    expect(list.items.map((x: any) => x.name)).toEqual(expect.arrayContaining(["*", "default", "acme"]));
    expect((await ok(sa.patch(`/tenants/${t.id}`, { description: "Acme Inc" }))).description).toBe("Acme Inc");
    const dup = await sa.post("/tenants", { name: "acme" });
    expect(dup.status).toBe(409);
    expect(dup.body.error.message).toContain("already exists");
    const bad = await sa.post("/tenants", { name: "a b" });
    expect(bad.status).toBe(422);
    expect(bad.body.error.field).toBe("name");
    expect((await sa.patch("/tenants/0", { description: "x" })).status).toBe(403);
    expect((await ok(sa.del(`/tenants/${t.id}`))).deleted.id).toBe(t.id);
    const gone = await sa.get(`/tenants/${t.id}`);
    expect(gone.status).toBe(404);
    expect(clone(gone.body.error)).toMatchObject({ status: 404 });
    expect((await sa.del(`/tenants/${t.id}`)).status).toBe(404);
  });

  test("administrators: create in the default tenant, roles, effective ACLs, no password in answers", async () => {
    const a = await ok(
      sa.post("/administrators", { name: "opal", password: "opal-password-1", description: "operator" }),
      201,
    );
    expect(clone(a)).toMatchObject({ name: "opal", tenant_id: 1, superadmin: false, roles: [] });
    expect(JSON.stringify(a)).not.toContain("password");
    const operator = await builtinRole("Operator");
    expect((await ok(sa.post(`/administrators/${a.id}/roles`, { role_id: operator }))).roles).toEqual(["Operator"]);
    const acls = (await ok(sa.get(`/administrators/${a.id}/acls`))).items;
    expect(acls).toContain("vm.start");
    expect(acls).not.toContain("vm.create");
    expect((await ok(sa.del(`/administrators/${a.id}/roles/${operator}`))).roles).toEqual([]);
    expect((await sa.del(`/administrators/${a.id}/roles/${operator}`)).status).toBe(404);
    expect((await ok(sa.get(`/administrators/${a.id}/acls`))).items).toEqual([]);
    expect((await ok(sa.patch(`/administrators/${a.id}`, { description: "x", language: "es" }))).language).toBe("es");
    expect((await sa.patch(`/administrators/${a.id}`, { language: "fr" })).body.error.field).toBe("language");
    expect((await sa.post(`/administrators/${a.id}/roles`, { role_id: 99999 })).status).toBe(404);
    await ok(sa.del(`/administrators/${a.id}`));
    expect((await sa.get(`/administrators/${a.id}`)).status).toBe(404);
  });

  test("roles: grants, denials, inheritance and effective ACLs; built-in roles are read-only", async () => {
    const r = await ok(sa.post("/roles", { name: "Helpdesk" }), 201);
    expect(clone(r)).toMatchObject({ tenant_id: 0, builtin: false, grants: [], inherits: [] });
    const operator = await builtinRole("Operator");
    await ok(sa.post(`/roles/${r.id}/inherits`, { role_id: operator }));
    await ok(sa.put(`/roles/${r.id}/acls`, { acl: "user.create" }));
    const denied = await ok(sa.put(`/roles/${r.id}/acls`, { acl: "vm.start", positive: false }));
    expect(clone(denied)).toMatchObject({ inherits: ["Operator"], grants: ["user.create"], denials: ["vm.start"] });
    let eff = (await ok(sa.get(`/roles/${r.id}/acls`))).items as string[];
    expect(eff).toContain("user.create");
    expect(eff).toContain("vm.stop");
    expect(eff).not.toContain("vm.start");
    expect(eff).toEqual([...eff].sort());
    await ok(sa.del(`/roles/${r.id}/acls/vm.start`));
    eff = (await ok(sa.get(`/roles/${r.id}/acls`))).items;
    expect(eff).toContain("vm.start");
    expect((await sa.del(`/roles/${r.id}/acls/vm.start`)).status).toBe(404);
    const unknown = await sa.put(`/roles/${r.id}/acls`, { acl: "vm.fly" });
    expect(unknown.status).toBe(422);
    expect(unknown.body.error.field).toBe("acl");
    // A cycle is refused.
    const child = await ok(sa.post("/roles", { name: "Helpdesk junior" }), 201);
    await ok(sa.post(`/roles/${child.id}/inherits`, { role_id: r.id }));
    expect((await sa.post(`/roles/${r.id}/inherits`, { role_id: child.id })).status).toBe(422);
    // A role that others inherit cannot be deleted.
    const inUse = await sa.del(`/roles/${r.id}`);
    expect(inUse.status).toBe(409);
    expect(inUse.body.error.dependents).toEqual([{ kind: "roles that inherit it", count: 1, ids: [child.id] }]);
    await ok(sa.del(`/roles/${child.id}/inherits/${r.id}`));
    expect((await sa.del(`/roles/${child.id}/inherits/${r.id}`)).status).toBe(404);
    await ok(sa.del(`/roles/${child.id}`));
    await ok(sa.del(`/roles/${r.id}`));
    // Built-in roles.
    expect((await sa.patch(`/roles/${operator}`, { description: "mine" })).status).toBe(403);
    expect((await sa.put(`/roles/${operator}/acls`, { acl: "vm.create" })).status).toBe(403);
    expect((await sa.post(`/roles/${operator}/inherits`, { role_id: await builtinRole("Auditor") })).status).toBe(403);
    expect((await sa.del(`/roles/${operator}`)).status).toBe(403);
    const catalogue = (await ok(sa.get("/acls"))).items.map((a: any) => a.name);
    expect(catalogue).toContain("user.update.password");
  });

  test("users: create with a password, update, block, disconnect, delete", async () => {
    const u = await ok(sa.post("/users", { name: "alice", password: "alice-password", description: "A" }), 201);
    expect(clone(u)).toMatchObject({ name: "alice", tenant_id: 1, has_password: true, blocked: false, vms: 0 });
    expect(JSON.stringify(u)).not.toContain("alice-password");
    expect((await ok(sa.patch(`/users/${u.id}`, { password: null }))).has_password).toBe(false);
    const short = await sa.patch(`/users/${u.id}`, { password: "short" });
    expect(short.status).toBe(422);
    expect(clone(short.body.error)).toMatchObject({ field: "password" });
    expect((await ok(sa.post(`/users/${u.id}/block`))).blocked).toBe(true);
    expect((await ok(sa.get(`/users/${u.id}`))).blocked).toBe(true);
    expect((await ok(sa.post(`/users/${u.id}/unblock`))).blocked).toBe(false);
    expect(clone(await ok(sa.post(`/users/${u.id}/disconnect`)))).toMatchObject({
      disconnected: 0,
      user: { id: u.id },
    });
    await ok(sa.del(`/users/${u.id}`));
    expect((await sa.post(`/users/${u.id}/block`)).status).toBe(404);
  });

  test("osfs and dis: create, tags move between images, protected tags, block", async () => {
    const osf = await ok(sa.post("/osfs", { name: "ubuntu", memory_mb: 512 }), 201);
    expect(clone(osf)).toMatchObject({ memory_mb: 512, dis: 0, vms: 0 });
    expect((await sa.post("/osfs", { name: "bad", memory_mb: 1 })).body.error.field).toBe("memory_mb");
    const d1 = await ok(sa.post("/dis", { osf_id: osf.id, path: "ubuntu-1.img", version: "v1" }), 201);
    expect(d1.tags).toEqual(["default", "head", "v1"]);
    const d2 = await ok(sa.post("/dis", { osf_id: osf.id, path: "ubuntu-2.img", version: "v2" }), 201);
    expect(d2.tags).toEqual(["head", "v2"]);
    expect((await sa.post("/dis", { osf_id: osf.id, path: "../../etc/passwd" })).status).toBe(422);
    expect((await sa.post("/dis", { osf_id: 99999, path: "x.img" })).body.error.field).toBe("osf_id");
    const tagged = await ok(sa.post(`/dis/${d1.id}/tags`, { tag: "stable" }));
    expect(clone(tagged)).toMatchObject({ previous_di_id: null, di: { tags: ["default", "stable", "v1"] } });
    const moved = await ok(sa.post(`/dis/${d2.id}/tags`, { tag: "stable" }));
    expect(moved.previous_di_id).toBe(d1.id);
    expect(moved.di.tags).toContain("stable");
    expect((await ok(sa.get(`/dis/${d1.id}`))).tags).not.toContain("stable");
    expect((await sa.post(`/dis/${d2.id}/tags`, { tag: "v1" })).status).toBe(409); // another image's version
    expect((await sa.post(`/dis/${d2.id}/tags`, { tag: "two words" })).status).toBe(422);
    expect((await ok(sa.del(`/dis/${d2.id}/tags/stable`))).tags).toEqual(["head", "v2"]);
    expect((await sa.del(`/dis/${d2.id}/tags/stable`)).status).toBe(404);
    expect((await sa.del(`/dis/${d2.id}/tags/head`)).status).toBe(422);
    expect((await sa.del(`/dis/${d2.id}/tags/v2`)).status).toBe(422);
    expect((await ok(sa.post(`/dis/${d1.id}/block`))).blocked).toBe(true);
    expect((await ok(sa.post(`/dis/${d1.id}/unblock`))).blocked).toBe(false);
    expect((await ok(sa.patch(`/dis/${d1.id}`, { expire_soft_s: 60 }))).expire_soft_s).toBe(60);
    expect((await sa.patch(`/dis/${d1.id}`, { path: "other.img" })).status).toBe(422); // not changeable
    expect((await ok(sa.get(`/osfs/${osf.id}`))).dis).toBe(2);
    expect((await sa.del(`/osfs/${osf.id}`)).status).toBe(409);
    await ok(sa.del(`/dis/${d2.id}`));
    await ok(sa.del(`/dis/${d1.id}`));
    await ok(sa.del(`/osfs/${osf.id}`));
  });

  test("hosts: create, update, block, stop_vms, delete", async () => {
    const h = await ok(sa.post("/hosts", { name: "node9", address: "10.9.0.9" }), 201);
    expect(clone(h)).toMatchObject({ name: "node9", state: "stopped", blocked: false, vms_running: 0 });
    expect((await sa.post("/hosts", { name: "node 9", address: "x" })).body.error.field).toBe("name");
    expect((await sa.post("/hosts", { name: "node10", address: "10.9.0.9" })).status).toBe(409);
    expect((await ok(sa.patch(`/hosts/${h.id}`, { backend: false }))).backend).toBe(false);
    expect((await ok(sa.post(`/hosts/${h.id}/block`))).blocked).toBe(true);
    expect((await ok(sa.post(`/hosts/${h.id}/unblock`))).blocked).toBe(false);
    expect(clone(await ok(sa.post(`/hosts/${h.id}/stop_vms`)))).toMatchObject({ stopping: 0, host: { id: h.id } });
    await ok(sa.del(`/hosts/${h.id}`));
    expect((await sa.get(`/hosts/${h.id}`)).status).toBe(404);
  });

  test("properties: definitions and values on every kind of object", async () => {
    const p = await ok(sa.post("/properties", { key: "owner", applies_to: ["user", "host"] }), 201);
    expect(clone(p)).toMatchObject({ key: "owner", tenant_id: 0, applies_to: ["user", "host"] });
    expect((await sa.post("/properties", { key: "bad key" })).body.error.field).toBe("key");
    expect((await ok(sa.patch(`/properties/${p.id}`, { description: "who owns it" }))).description).toBe("who owns it");
    const u = await ok(sa.post("/users", { name: "propuser" }), 201);
    expect(await ok(sa.put(`/users/${u.id}/properties/owner`, { value: "finance" }))).toEqual({ owner: "finance" });
    expect(await ok(sa.get(`/users/${u.id}/properties`))).toEqual({ owner: "finance" });
    const h = await ok(sa.post("/hosts", { name: "prophost", address: "10.9.0.10" }), 201);
    await ok(sa.put(`/hosts/${h.id}/properties/owner`, { value: "ops" }));
    expect(await ok(sa.get(`/hosts/${h.id}/properties`))).toEqual({ owner: "ops" });
    const osf = await ok(sa.post("/osfs", { name: "propsf" }), 201);
    expect((await sa.put(`/osfs/${osf.id}/properties/owner`, { value: "x" })).status).toBe(422); // does not apply to OSFs
    expect((await sa.put(`/users/${u.id}/properties/nokey`, { value: "x" })).body.error.field).toBe("key");
    expect((await sa.put(`/users/${u.id}/properties/owner`, { value: 5 })).body.error.field).toBe("value");
    expect(await ok(sa.del(`/users/${u.id}/properties/owner`))).toEqual({});
    expect((await sa.del(`/users/${u.id}/properties/owner`)).status).toBe(404);
    await ok(sa.del(`/properties/${p.id}`));
    expect(await ok(sa.get(`/hosts/${h.id}/properties`))).toEqual({});
    await ok(sa.del(`/hosts/${h.id}`));
  });

  test("configs: set, list with sources, per-tenant overrides, delete, validation", async () => {
    const before = await ok(sa.get("/configs"));
    const item = (b: any, k: string) => b.items.find((i: any) => i.key === k);
    expect(clone(item(before, "vm.network.range"))).toMatchObject({ value: "198.18.0.0/16", source: "default" });
    expect(before.items.every((i: any) => i.key !== "l7r.listen")).toBe(true); // node settings are not here
    await ok(sa.put("/configs/vm.network.range", { value: "10.20.0.0/16" }));
    expect(clone(item(await ok(sa.get("/configs")), "vm.network.range"))).toMatchObject({
      value: "10.20.0.0/16",
      source: "global",
    });
    // The VM network is farm-wide; the default OSF memory is a tenant's business.
    expect((await sa.put("/configs/vm.network.range", { value: "10.30.0.0/16", tenant_id: 1 })).status).toBe(403);
    await ok(sa.put("/configs/osf.default.memory", { value: "768" }));
    await ok(sa.put("/configs/osf.default.memory", { value: "512", tenant_id: 1 }));
    expect(clone(item(await ok(sa.get("/configs?tenant_id=1")), "osf.default.memory"))).toMatchObject({
      value: "512",
      source: "tenant",
      tenant: true,
    });
    expect(clone(item(await ok(sa.get("/configs?tenant_id=1")), "vm.network.range"))).toMatchObject({
      value: "10.20.0.0/16",
      source: "global",
      tenant: false,
    });
    expect(item(await ok(sa.get("/configs")), "osf.default.memory").value).toBe("768");
    const bad = await sa.put("/configs/vm.network.range", { value: "not a network" });
    expect(bad.status).toBe(422);
    expect(bad.body.error.field).toBe("value");
    expect((await sa.put("/configs/no.such.key", { value: "1" })).status).toBe(404);
    expect((await sa.put("/configs/l7r.listen", { value: ":1" })).status).toBe(404);
    expect((await sa.put("/configs/vm.network.range", { value: 5 })).body.error.field).toBe("value");
    expect((await sa.get("/configs?tenant_id=x")).status).toBe(422);
    await ok(sa.del("/configs/osf.default.memory?tenant_id=1"));
    await ok(sa.del("/configs/osf.default.memory"));
    await ok(sa.del("/configs/vm.network.range"));
    expect((await sa.del("/configs/vm.network.range")).status).toBe(404);
    expect(item(await ok(sa.get("/configs")), "vm.network.range").source).toBe("default");
  });

  test("audit: list and get; it cannot be written through the API", async () => {
    const rows = await ok(sa.get("/audit?action=tenant.create&ok=true&sort=-id"));
    expect(rows.total).toBeGreaterThan(0);
    const one = await ok(sa.get(`/audit/${rows.items[0].id}`));
    expect(clone(one)).toMatchObject({
      action: "tenant.create",
      administrator_name: TEST_ADMIN.name,
      ok: true,
      source: "api",
    });
    expect((await sa.post("/audit", { action: "forged" })).status).toBe(404);
    expect((await sa.del(`/audit/${one.id}`)).status).toBe(404);
    expect((await sa.patch(`/audit/${one.id}`, { ok: false })).status).toBe(404);
  });

  test("stats", async () => {
    const s = await ok(sa.get("/stats"));
    expect(clone(s)).toMatchObject({
      users: { total: expect.any(Number) },
      vms: { running: expect.any(Number) },
      hosts: {},
      osfs: {},
      dis: {},
    });
  });
});

describe("VM lifecycle and actions", () => {
  let user: any, osf: any, vm: any, host: any;

  beforeAll(async () => {
    user = await ok(sa.post("/users", { name: "vmowner" }), 201);
    osf = await ok(sa.post("/osfs", { name: "desk", memory_mb: 1024 }), 201);
    await ok(sa.post("/dis", { osf_id: osf.id, path: "desk.img" }), 201);
    vm = await ok(sa.post("/vms", { user_id: user.id, osf_id: osf.id, name: "desk1" }), 201);
  });

  test("a new VM gets the first free address and is stopped", async () => {
    expect(clone(vm)).toMatchObject({
      user_id: user.id,
      osf_id: osf.id,
      tenant_id: 1,
      vm_state: "stopped",
      di_tag: "default",
      host_id: null,
    });
    expect(vm.ip).toBe("198.18.0.2");
    const vm2 = await ok(sa.post("/vms", { user_id: user.id, osf_id: osf.id, name: "desk2" }), 201);
    expect(vm2.ip).toBe("198.18.0.3");
    expect((await sa.post("/vms", { user_id: user.id, osf_id: osf.id, name: "desk2" })).status).toBe(409);
    expect((await sa.post("/vms", { user_id: user.id, osf_id: 99999, name: "x" })).body.error.field).toBe("osf_id");
    expect((await sa.post("/vms", { user_id: 99999, osf_id: osf.id, name: "x" })).body.error.field).toBe("user_id");
    expect((await sa.patch(`/vms/${vm2.id}`, { user_id: 1 })).status).toBe(422);
    expect((await ok(sa.patch(`/vms/${vm2.id}`, { di_tag: "head" }))).di_tag).toBe("head");
    await ok(sa.del(`/vms/${vm2.id}`));
  });

  test("start without a node is a conflict; actions take no unknown fields", async () => {
    const extra = await sa.post(`/vms/${vm.id}/start`, { force: true });
    expect(extra.status).toBe(422);
    expect(extra.body.error.field).toBe("force");
    expect((await sa.call("POST", `/vms/${vm.id}/start?force=1`, {})).body.error.field).toBe("force");
    const r = await sa.post(`/vms/${vm.id}/start`);
    expect(r.status).toBe(409);
    expect(r.body.error.message).toContain("no node");
    expect((await ok(sa.get(`/vms/${vm.id}`))).vm_cmd).toBeNull();
  });

  test("start picks a running node, sets the command and notifies the node", async () => {
    host = await ok(sa.post("/hosts", { name: "node1", address: "10.0.0.1" }), 201);
    // The node reports itself: running, with a fresh heartbeat and free memory.
    await sql()`UPDATE host_runtimes SET state = 'running', ok_ts = now(), usable_ram_mb = 4096, usable_cpu = 4 WHERE host_id = ${host.id}`;
    const got: { channel: string; payload: string }[] = [];
    const l = await listen(db().url, [`qvd_host_${host.id}`], {
      onNotify: (channel, payload) => got.push({ channel, payload }),
    });
    try {
      const r = await ok(sa.post(`/vms/${vm.id}/start`));
      expect(clone(r)).toMatchObject({ host_id: host.id, vm: { id: vm.id, vm_cmd: "start", host_id: host.id } });
      const n = await waitFor("the node's notification", () => got[0], 5000, 10);
      expect(n.channel).toBe(`qvd_host_${host.id}`);
      expect(JSON.parse(n.payload)).toEqual({ vm_id: vm.id, cmd: "start" });
    } finally {
      await l.close();
    }
    const again = await sa.post(`/vms/${vm.id}/start`);
    expect(again.status).toBe(409);
    expect(again.body.error.message).toContain("pending start");
    // The user's home is claimed by that start: a second desktop of theirs cannot start (409 naming the first).
    const vm2 = await ok(sa.post("/vms", { user_id: user.id, osf_id: osf.id, name: "desk2" }), 201);
    const second = await sa.post(`/vms/${vm2.id}/start`);
    expect([second.status, second.body.error.message]).toEqual([
      409,
      'the home of user "vmowner" is in use by their desktop "desk1"; stop it first',
    ]);
    expect((await ok(sa.get(`/vms/${vm2.id}`))).host_id).toBeNull();
    await ok(sa.del(`/vms/${vm2.id}`));
    // Deleting a node with VMs assigned is refused.
    const del = await sa.del(`/hosts/${host.id}`);
    expect(del.status).toBe(409);
  });

  test("stop, disconnect, block and unblock", async () => {
    // Not running yet: cannot stop.
    await sql()`UPDATE vm_runtimes SET vm_cmd = NULL WHERE vm_id = ${vm.id}`;
    expect((await sa.post(`/vms/${vm.id}/stop`)).status).toBe(409);
    // The node reports the VM running.
    await sql()`UPDATE vm_runtimes SET vm_state = 'running' WHERE vm_id = ${vm.id}`;
    expect((await sa.del(`/vms/${vm.id}`)).status).toBe(409); // running VMs cannot be deleted
    expect((await ok(sa.post(`/vms/${vm.id}/stop`))).vm_cmd).toBe("stop");
    // Nobody connected.
    const dis = await sa.post(`/vms/${vm.id}/disconnect`);
    expect(dis.status).toBe(409);
    expect(dis.body.error.message).toContain("nobody is connected");
    await sql()`UPDATE vm_runtimes SET user_state = 'connected' WHERE vm_id = ${vm.id}`;
    expect((await ok(sa.post(`/vms/${vm.id}/disconnect`))).user_cmd).toBe("abort");
    expect((await ok(sa.post(`/users/${user.id}/disconnect`))).disconnected).toBe(1);
    // Host stop_vms: stop commands for the node's running VMs.
    await sql()`UPDATE vm_runtimes SET vm_cmd = NULL WHERE vm_id = ${vm.id}`;
    expect((await ok(sa.post(`/hosts/${host.id}/stop_vms`))).stopping).toBe(1);
    // Block with a reason; a blocked VM cannot start.
    const b = await ok(sa.post(`/vms/${vm.id}/block`, { reason: "maintenance" }));
    expect(clone(b)).toMatchObject({ blocked: true, blocked_reason: "maintenance" });
    expect((await sa.post(`/vms/${vm.id}/block`, { reason: 5 })).body.error.field).toBe("reason");
    await sql()`UPDATE vm_runtimes SET vm_state = 'stopped', vm_cmd = NULL, user_state = 'disconnected', user_cmd = NULL WHERE vm_id = ${vm.id}`;
    const blocked = await sa.post(`/vms/${vm.id}/start`);
    expect(blocked.status).toBe(409);
    expect(blocked.body.error.message).toContain("maintenance");
    expect(clone(await ok(sa.post(`/vms/${vm.id}/unblock`)))).toMatchObject({ blocked: false, blocked_reason: "" });
  });

  test("expire: a running VM's warning and stop times; null clears; a stopped VM or a warning after the stop is refused", async () => {
    expect((await sa.post(`/vms/${vm.id}/expire`, { hard_at: "2099-01-01T00:00:00Z" })).status).toBe(409); // stopped
    const [before] = await sql()`SELECT host_id FROM vm_runtimes WHERE vm_id = ${vm.id}`;
    await sql()`UPDATE vm_runtimes SET vm_state = 'running', host_id = ${host.id} WHERE vm_id = ${vm.id}`;
    try {
      const set = await ok(
        sa.post(`/vms/${vm.id}/expire`, { soft_at: "2099-01-01T00:00:00Z", hard_at: "2099-01-02T00:00:00Z" }),
      );
      expect([new Date(set.expire_soft_at).toISOString(), new Date(set.expire_hard_at).toISOString()]).toEqual([
        "2099-01-01T00:00:00.000Z",
        "2099-01-02T00:00:00.000Z",
      ]);
      // A warning after the stop is refused and changes nothing.
      const late = await sa.post(`/vms/${vm.id}/expire`, { soft_at: "2099-01-03T00:00:00Z" });
      expect([late.status, late.body.error.field]).toEqual([422, "soft_at"]);
      expect((await sa.post(`/vms/${vm.id}/expire`, { hard_at: "tomorrow-ish" })).body.error.field).toBe("hard_at");
      // Only the soft time cleared; the hard one stays.
      const cleared = await ok(sa.post(`/vms/${vm.id}/expire`, { soft_at: null }));
      expect(cleared.expire_soft_at).toBeNull();
      expect(new Date(cleared.expire_hard_at).toISOString()).toBe("2099-01-02T00:00:00.000Z");
      // Many at once, by filter.
      const many = await ok(sa.post(`/vms/actions/expire?id=${vm.id}`, { hard_at: null }));
      expect(clone(many)).toMatchObject({ total: 1, ok: 1 });
      expect((await ok(sa.get(`/vms/${vm.id}`))).expire_hard_at).toBeNull();
    } finally {
      await sql()`UPDATE vm_runtimes SET vm_state = 'stopped', host_id = ${before!.host_id}, expire_soft_at = NULL, expire_hard_at = NULL WHERE vm_id = ${vm.id}`;
    }
  });

  test("deleting an OSF with VMs is a 409 that names them", async () => {
    const r = await sa.del(`/osfs/${osf.id}`);
    expect(r.status).toBe(409);
    expect(r.body.error.dependents).toEqual(expect.arrayContaining([{ kind: "VMs", count: 1, ids: [vm.id] }]));
    expect((await ok(sa.get(`/osfs/${osf.id}`))).vms).toBe(1);
  });

  test("VM properties and delete", async () => {
    await ok(sa.post("/properties", { key: "cost_center" }), 201);
    expect(await ok(sa.put(`/vms/${vm.id}/properties/cost_center`, { value: "42" }))).toEqual({ cost_center: "42" });
    await sql()`UPDATE vm_runtimes SET host_id = NULL WHERE vm_id = ${vm.id}`;
    await ok(sa.del(`/vms/${vm.id}`));
    expect((await sa.get(`/vms/${vm.id}/properties`)).status).toBe(404);
  });
});

describe("mass changes by filter", () => {
  let ids: number[];
  beforeAll(async () => {
    ids = [];
    for (const n of ["mass1", "mass2", "mass3"]) ids.push((await ok(sa.post("/users", { name: n }), 201)).id);
  });

  test("without a filter they are refused", async () => {
    for (const [m, p] of [
      ["PATCH", "/users"],
      ["DELETE", "/users"],
      ["POST", "/users/actions/block"],
    ] as const) {
      const r = await sa.call(m, p, m === "PATCH" ? { description: "all" } : {});
      expect(r.status).toBe(422);
      expect(r.body.error.field).toBe("filter");
    }
    expect((await ok(sa.get("/users?description=all"))).total).toBe(0);
  });

  test("update, action and delete answer one result per object", async () => {
    const upd = await ok(sa.patch("/users?name[like]=mass%25", { description: "mass" }));
    expect(clone(upd)).toMatchObject({ total: 3, ok: 3, failed: 0 });
    expect(upd.results.map((r: any) => r.id)).toEqual(ids);
    expect((await ok(sa.get("/users?description=mass"))).total).toBe(3);
    const bad = await sa.patch("/users?name[like]=mass%25", { description: 5 });
    expect(bad.status).toBe(422);
    const blk = await ok(sa.post(`/users/actions/block?id[in]=${ids[0]},${ids[1]}`));
    expect(clone(blk)).toMatchObject({ total: 2, ok: 2 });
    expect((await ok(sa.get("/users?name[like]=mass%25&blocked=true"))).items.map((u: any) => u.id)).toEqual([
      ids[0],
      ids[1],
    ]);
    // One of them has a VM: its delete fails, the others go.
    const osf = await ok(sa.post("/osfs", { name: "massosf" }), 201);
    await ok(sa.post("/vms", { user_id: ids[2], osf_id: osf.id, name: "massvm" }), 201);
    const del = await ok(sa.del("/users?name[like]=mass%25"));
    expect(clone(del)).toMatchObject({ total: 3, ok: 2, failed: 1 });
    const failed = del.results.find((r: any) => !r.ok);
    expect(clone(failed)).toMatchObject({ id: ids[2], status: 409 });
    expect(failed.error).toContain("VMs");
    expect((await ok(sa.get("/users?name[like]=mass%25"))).items.map((u: any) => u.id)).toEqual([ids[2]]);
    // The mass change is audited once, with the filter and the count…
    const [a] = await sql()`SELECT arguments FROM audit_log WHERE action = 'user.delete_many' ORDER BY id DESC LIMIT 1`;
    expect(clone(a!.arguments)).toMatchObject({ filter: { "name[like]": "mass%" }, matched: 3, ok: 2 });
    // …and in each object's own trail, with its outcome.
    const each =
      await sql()`SELECT object_id, ok, error FROM audit_log WHERE action = 'user.delete' AND object_id = ANY(${ids}::int[]) AND arguments->>'many' = 'true' ORDER BY object_id`;
    expect(each.map((r) => [r.object_id, r.ok])).toEqual([
      [ids[0], true],
      [ids[1], true],
      [ids[2], false],
    ]);
    expect(each[2]!.error).toContain("VMs");
  });
});

describe("list queries over HTTP", () => {
  beforeAll(async () => {
    for (const [n, blocked] of [
      ["la", false],
      ["lb", true],
      ["lc", false],
      ["ld", true],
    ] as const)
      await ok(sa.post("/users", { name: n, blocked, description: `list ${n}` }), 201);
  });
  const names = (b: any) => b.items.map((u: any) => u.name);

  test("filters, operators, sort, paging and fields", async () => {
    expect(names(await ok(sa.get("/users?description[like]=list%25&sort=-name")))).toEqual(["ld", "lc", "lb", "la"]);
    expect(names(await ok(sa.get("/users?description[like]=list%25&blocked=true&sort=name")))).toEqual(["lb", "ld"]);
    expect(names(await ok(sa.get("/users?name[in]=la,lc,zz&sort=name")))).toEqual(["la", "lc"]);
    expect(names(await ok(sa.get("/users?description[like]=list%25&name[ne]=la&sort=name")))).toEqual([
      "lb",
      "lc",
      "ld",
    ]);
    expect(names(await ok(sa.get("/users?description[like]=list%25&name[gt]=lb&sort=name")))).toEqual(["lc", "ld"]);
    const page = await ok(sa.get("/users?description[like]=list%25&sort=name&limit=2&offset=1"));
    expect(clone(page)).toMatchObject({ total: 4, limit: 2, offset: 1 });
    expect(names(page)).toEqual(["lb", "lc"]);
    const past = await ok(sa.get("/users?description[like]=list%25&offset=10"));
    expect(clone(past)).toMatchObject({ total: 4, items: [] });
    const slim = await ok(sa.get("/users?description[like]=list%25&fields=name&limit=1&sort=name"));
    expect(slim.items).toEqual([{ id: expect.any(Number), name: "la" }]);
  });

  test("host_id[null] and host_id[notnull]: the VMs on no node and those on one", async () => {
    const osf = await ok(sa.post("/osfs", { name: "nullhost-osf" }), 201);
    const user = await ok(sa.post("/users", { name: "nullhost-user" }), 201);
    const vm = (name: string) => ok(sa.post("/vms", { user_id: user.id, osf_id: osf.id, name }), 201);
    const [off, on] = [await vm("nullhost-off"), await vm("nullhost-on")];
    const h = await ok(sa.post("/hosts", { name: "nullhost-node", address: "198.18.9.9" }), 201);
    await sql()`UPDATE vm_runtimes SET host_id = ${h.id} WHERE vm_id = ${on.id}`;
    try {
      const mine = "&name[like]=nullhost%25&sort=name";
      expect(clone(await ok(sa.get(`/vms?host_id[null]${mine}`)))).toMatchObject({
        total: 1,
        items: [{ id: off.id, name: "nullhost-off" }],
      });
      expect(clone(await ok(sa.get(`/vms?host_id[notnull]${mine}`)))).toMatchObject({
        total: 1,
        items: [{ id: on.id, name: "nullhost-on" }],
      });
      // Over every VM of the file's tests: as many as the database has on no node.
      const [{ n }] = (await sql()`SELECT count(*)::int AS n FROM vm_runtimes WHERE host_id IS NULL`) as unknown as [
        { n: number },
      ];
      expect(n).toBeGreaterThan(0);
      expect((await ok(sa.get("/vms?host_id[null]"))).total).toBe(n);
    } finally {
      await sql()`UPDATE vm_runtimes SET host_id = NULL WHERE vm_id = ${on.id}`;
      for (const v of [off, on]) await ok(sa.del(`/vms/${v.id}`));
      await ok(sa.del(`/hosts/${h.id}`));
      await ok(sa.del(`/users/${user.id}`));
      await ok(sa.del(`/osfs/${osf.id}`));
    }
  });

  test("bad queries are 422 naming the parameter", async () => {
    const cases: [string, string][] = [
      ["/users?nosuch=1", "filter"],
      ["/users?sort=nosuch", "sort"],
      ["/users?fields=password_hash", "fields"],
      ["/users?name[bogus]=x", "name[bogus]"],
      ["/users?limit=abc", "limit"],
      ["/users?limit=-1", "limit"],
      ["/users?limit=100000", "limit"],
      ["/users?offset=1.5", "offset"],
      ["/users?blocked=maybe", "blocked"],
      ["/users?created_at[gt]=yesterday", "created_at"],
      ["/users?id=abc", "id"],
      ["/users?Name=x", "Name"],
    ];
    for (const [path, field] of cases) {
      const r = await sa.get(path);
      expect([path, r.status]).toEqual([path, 422]);
      expect([path, r.body.error.field]).toEqual([path, field]);
      expect(r.body.error.message).toBeString();
    }
  });
});

describe("login and sessions", () => {
  let opal: { id: number; name: string };
  const OPAL_PW = "opal-password-2";

  beforeAll(async () => {
    opal = await ok(sa.post("/administrators", { name: "opal2", password: OPAL_PW }), 201);
    await ok(sa.post(`/administrators/${opal.id}/roles`, { role_id: await builtinRole("Operator") }));
  });

  test("login answers a token, the ACLs, and sets an HttpOnly cookie", async () => {
    const r = await api.anonymous.post("/login", { name: "opal2", password: OPAL_PW });
    expect(r.status).toBe(200);
    expect(clone(r.body)).toMatchObject({
      token: expect.any(String),
      administrator: { id: opal.id, tenant_name: "default" },
      multitenant: false,
    });
    expect(r.body.acls).toContain("vm.start");
    const cookie = r.headers.get("set-cookie")!;
    expect(cookie).toContain("qvd_session=" + r.body.token);
    expect(cookie).toContain("HttpOnly");
    expect(cookie).toContain("SameSite=Strict");
    // The cookie alone is a session.
    const viaCookie = await api.anonymous.call("GET", "/session", undefined, { cookie: `qvd_session=${r.body.token}` });
    expect(viaCookie.status).toBe(200);
    expect(viaCookie.body.administrator.name).toBe("opal2");
    // GET /login (public): the tenancy mode, and with a live session the session itself.
    const before = await api.anonymous.get("/login");
    expect(clone(before.body)).toEqual({ multitenant: false, logged_in: false });
    const after = await api.anonymous.call("GET", "/login", undefined, { cookie: `qvd_session=${r.body.token}` });
    expect(clone(after.body)).toMatchObject({
      multitenant: false,
      logged_in: true,
      session: { administrator: { name: "opal2" }, acls: viaCookie.body.acls },
    });
    // name@tenant.
    expect((await api.anonymous.post("/login", { name: "opal2@default", password: OPAL_PW })).status).toBe(200);
    expect((await api.anonymous.post("/login", { name: "opal2", tenant: "default", password: OPAL_PW })).status).toBe(
      200,
    );
    expect((await api.anonymous.post("/login", { name: "OPAL2", password: OPAL_PW })).status).toBe(200); // names are case-insensitive by default
  });

  test("wrong password 401, blocked administrator 403, no session without a login", async () => {
    const wrong = await api.anonymous.post("/login", { name: "opal2", password: "nope-nope" });
    expect(wrong.status).toBe(401);
    expect(wrong.body.error.message).toContain("wrong");
    expect((await api.anonymous.post("/login", { name: "opal2@nosuchtenant", password: OPAL_PW })).status).toBe(401);
    expect((await api.anonymous.get("/session")).status).toBe(401);
    expect((await new ApiClient(api.url, "x".repeat(43)).get("/session")).status).toBe(401);
    const blockedAdmin = await ok(
      sa.post("/administrators", { name: "blocky", password: "blocky-password", blocked: true }),
      201,
    );
    const b = await api.anonymous.post("/login", { name: "blocky", password: "blocky-password" });
    expect(b.status).toBe(403);
    expect(b.body.error.message).toContain("blocked");
    await ok(sa.del(`/administrators/${blockedAdmin.id}`));
  });

  test("blocking an administrator ends their sessions' use", async () => {
    const c = await api.login("opal2", OPAL_PW);
    expect((await c.get("/session")).status).toBe(200);
    await ok(sa.patch(`/administrators/${opal.id}`, { blocked: true }));
    expect((await c.get("/session")).status).toBe(401);
    await ok(sa.patch(`/administrators/${opal.id}`, { blocked: false }));
  });

  test("GET /session, logout", async () => {
    const c = await api.login("opal2", OPAL_PW);
    const s = await ok(c.get("/session"));
    expect(clone(s)).toMatchObject({ administrator: { id: opal.id, name: "opal2" }, multitenant: false });
    expect(s.acls).toEqual([...s.acls].sort());
    const out = await c.post("/logout");
    expect(out.status).toBe(200);
    expect(out.headers.get("set-cookie")).toContain("Max-Age=0");
    expect((await c.get("/session")).status).toBe(401);
    expect((await c.post("/logout")).status).toBe(401);
  });

  test("sliding expiry: use extends a session; an expired one is refused", async () => {
    const c = await api.login("opal2", OPAL_PW);
    const hashOf = (t: string) => new Bun.CryptoHasher("sha256").update(t).digest("hex");
    await sql()`UPDATE admin_sessions SET last_seen_at = now() - interval '1 minute', expires_at = now() + interval '30 seconds'
                 WHERE token_hash = ${hashOf(c.token!)}`;
    expect((await c.get("/session")).status).toBe(200);
    const [row] =
      await sql()`SELECT expires_at > now() + interval '3000 seconds' AS extended FROM admin_sessions WHERE token_hash = ${hashOf(c.token!)}`;
    expect(row!.extended).toBe(true);
    await sql()`UPDATE admin_sessions SET expires_at = now() - interval '1 second' WHERE token_hash = ${hashOf(c.token!)}`;
    const r = await c.get("/session");
    expect(r.status).toBe(401);
    expect(r.body.error.message).toContain("expired");
  });

  test("PUT /session/password needs the current password", async () => {
    const c = await api.login("opal2", OPAL_PW);
    const wrong = await c.put("/session/password", { current_password: "not-it-at-all", password: "brand-new-pw" });
    expect(wrong.status).toBe(422);
    expect(wrong.body.error.field).toBe("current_password");
    expect((await c.put("/session/password", { current_password: OPAL_PW, password: "short" })).body.error.field).toBe(
      "password",
    );
    expect(
      (await c.put("/session/password", { current_password: OPAL_PW, password: "brand-new-pw", extra: 1 })).body.error
        .field,
    ).toBe("extra");
    await ok(c.put("/session/password", { current_password: OPAL_PW, password: "brand-new-pw" }));
    await api.login("opal2", "brand-new-pw");
    await ok(c.put("/session/password", { current_password: "brand-new-pw", password: OPAL_PW }));
  });

  test("a superadmin lists sessions and ends one; the ended session is refused", async () => {
    const c = await api.login("opal2", OPAL_PW);
    const list = await ok(sa.get("/sessions"));
    const mine = list.items.filter((s: any) => s.administrator_id === opal.id);
    expect(mine.length).toBeGreaterThan(0);
    expect(clone(list.items[0])).toMatchObject({
      id: expect.stringMatching(/^[0-9a-f]{12}$/),
      administrator_name: expect.any(String),
      source: "api",
    });
    expect(JSON.stringify(list)).not.toContain(c.token!);
    expect((await c.get("/sessions")).status).toBe(403); // an operator may not
    for (const s of mine) await ok(sa.del(`/sessions/${s.id}`));
    expect((await c.get("/session")).status).toBe(401);
    expect((await sa.del(`/sessions/${mine[0].id}`)).status).toBe(404);
    expect((await sa.del("/sessions/nothex")).status).toBe(404);
  });

  test("five failures for one account are throttled with Retry-After, and audited", async () => {
    await ok(sa.post("/administrators", { name: "victim", password: "victim-password" }), 201);
    for (let i = 0; i < 5; i++)
      expect((await api.anonymous.post("/login", { name: "victim", password: `guess-${i}-xx` })).status).toBe(401);
    const t = await api.anonymous.post("/login", { name: "victim", password: "victim-password" });
    expect(t.status).toBe(429);
    expect(Number(t.headers.get("retry-after"))).toBeGreaterThan(0);
    expect(t.body.error.status).toBe(429);
    const rows =
      await sql()`SELECT ok, error, address, object_name, arguments FROM audit_log WHERE action = 'login' AND object_name LIKE '%/victim' ORDER BY id`;
    expect(rows.length).toBe(6);
    expect(rows.every((r) => r.ok === false && r.address === "127.0.0.1")).toBe(true);
    expect(rows[5]!.error).toContain("too many");
    expect(JSON.stringify(rows)).not.toContain("guess-");
    // Other accounts are not throttled.
    expect((await api.anonymous.post("/login", { name: "opal2", password: OPAL_PW })).status).toBe(200);
    // A successful login is audited too.
    const [good] =
      await sql()`SELECT ok, administrator_name FROM audit_log WHERE action = 'login' AND ok ORDER BY id DESC LIMIT 1`;
    expect(clone(good)).toMatchObject({ ok: true, administrator_name: "opal2" });
  });
});

test("the OpenAPI document lists every route", async () => {
  const r = await api.anonymous.get("/openapi.json");
  expect(r.status).toBe(200);
  expect(r.body.openapi).toStartWith("3.");
  const routes = routeTable();
  expect(routes.length).toBeGreaterThan(50);
  for (const route of routes) {
    const p = "/api/v1" + route.path.replace(/:(\w+)/g, "{$1}");
    expect([route.method, route.path, !!r.body.paths[p]?.[route.method.toLowerCase()]]).toEqual([
      route.method,
      route.path,
      true,
    ]);
  }
  expect(
    r.body.paths["/api/v1/users"].post.requestBody.content["application/json"].schema.properties.name,
  ).toBeDefined();
});

test("an unknown route is a JSON 404", async () => {
  const r = await sa.get("/nosuch");
  expect(r.status).toBe(404);
  expect(clone(r.body.error)).toMatchObject({ status: 404, message: expect.any(String) });
});
