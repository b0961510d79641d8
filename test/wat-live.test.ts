// The WAT's object framework in real Chromium against a live API and PostgreSQL, for what the
// screen tests do not cover: the dashboard following the event stream, a VM restart (stop,
// then start once the node reports it stopped), a time filter that must not refetch in a
// loop, properties and edits on a detail page with the audit trail growing, an operator's
// and a tenant administrator's view, and a session ended elsewhere reported by the stream.
import { afterAll, beforeAll, expect, test } from "bun:test";
import { setKeepAlive } from "../src/api/events.ts";
import { createAdmin, useTestApi } from "./support/api.ts";
import { ok } from "./support/assert.ts";
import { h1, useBrowser } from "./support/browser.ts";
import { TEST_ADMIN, useTestDatabase } from "./support/db.ts";

const db = useTestDatabase();
const browser = useBrowser();
beforeAll(() => setKeepAlive(500));
const { api, sa } = useTestApi(db, { "wat.multitenant": "1" });
const ids: Record<string, number> = {};

beforeAll(async () => {
  const post = (path: string, body: unknown) => ok(sa.post(path, body), "2xx", path);
  ids.acme = (await post("/tenants", { name: "acme" })).id;
  ids.other = (await post("/tenants", { name: "other" })).id;
  const [h] = await db().sql`INSERT INTO hosts (name, address) VALUES ('node-1', '198.18.0.9') RETURNING id`;
  ids.host = h!.id;
  await db()
    .sql`UPDATE host_runtimes SET state = 'running', ok_ts = now() + interval '1 hour', usable_ram_mb = 65536, usable_cpu = 16 WHERE host_id = ${ids.host!}`;
  const osf = await post("/osfs", { tenant_id: ids.acme, name: "acme-osf" });
  for (let i = 0; i < 4; i++) {
    const u = await post("/users", { tenant_id: ids.acme, name: `u${i}` });
    ids[`vm${i}`] = (await post("/vms", { user_id: u.id, osf_id: osf.id, name: `desk-${i}` })).id;
  }
  const osf2 = await post("/osfs", { tenant_id: ids.other, name: "other-osf" });
  const stranger = await post("/users", { tenant_id: ids.other, name: "stranger" });
  await post("/vms", { user_id: stranger.id, osf_id: osf2.id, name: "stranger-desk" });
  await post("/properties", { tenant_id: 0, key: "floor", applies_to: ["user", "vm"] });
  for (const [name, role] of [
    ["tadmin", "Tenant administrator"],
    ["op", "Operator"],
  ] as const)
    await createAdmin(sa, name, { tenantId: ids.acme!, roles: [role] });
});
afterAll(() => setKeepAlive(15_000));

test("the dashboard's counts follow the event stream", async () => {
  const w = await browser().open(api);
  await w.login(TEST_ADMIN.name, TEST_ADMIN.password, "");
  await h1(w.page, "Dashboard").waitFor();
  const vms = w.page.getByRole("region", { name: "Virtual machines" });
  await vms.getByText("0 running of 5").waitFor();
  await db()
    .sql`UPDATE vm_runtimes SET vm_state = 'running', host_id = ${ids.host!}, expire_hard_at = now() + interval '2 hours' WHERE vm_id = ${ids.vm0!}`;
  await vms.getByText("1 running of 5").waitFor();
  // The node now has a VM, and the VM an expiry.
  await w.page.getByRole("region", { name: "Nodes with most VMs" }).getByRole("link", { name: "node-1" }).waitFor();
  await w.page.getByRole("region", { name: "VMs closest to expiry" }).getByRole("link", { name: "desk-0" }).waitFor();
  // Figures link to the filtered list.
  await vms.getByRole("link", { name: /running of 5/ }).click();
  await h1(w.page, "Virtual machines").waitFor();
  expect(new URL(w.page.url()).search).toBe("?vm_state=running");
  await w.page.getByRole("checkbox", { name: "Select desk-0", exact: true }).waitFor();
  expect(await w.page.getByRole("checkbox", { name: "Select desk-1", exact: true }).count()).toBe(0);
  w.assertNoErrors();
});

test("a VM's Restart stops it, then starts it when the node reports it stopped", async () => {
  const vm = ids.vm0!;
  const w = await browser().open(api);
  await w.login(TEST_ADMIN.name, TEST_ADMIN.password, "");
  await w.goto(`/vms/${vm}`);
  await h1(w.page, "desk-0").waitFor();
  const cmd = (c: string) =>
    w.page.waitForFunction(async ([id, c]) => (await (await fetch(`/api/v1/vms/${id}`)).json()).vm_cmd === c, [
      vm,
      c,
    ] as const);
  await w.page.getByRole("button", { name: "Restart" }).click();
  await cmd("stop");
  await db().sql`UPDATE vm_runtimes SET vm_state = 'stopping', vm_cmd = NULL WHERE vm_id = ${vm}`;
  await w.page.locator("main").getByText("stopping", { exact: true }).first().waitFor();
  // Not started again before it is stopped.
  await w.page.waitForTimeout(500);
  expect((await sa.get(`/vms/${vm}`)).body.vm_cmd).toBeNull();
  await db().sql`UPDATE vm_runtimes SET vm_state = 'stopped', host_id = NULL WHERE vm_id = ${vm}`;
  await cmd("start");
  w.assertNoErrors();
});

test("a running VM's expiry: set the stop time; a warning after it is refused beside its field; cleared", async () => {
  const vm = ids.vm3!;
  await db().sql`UPDATE vm_runtimes SET vm_state = 'running', host_id = ${ids.host!} WHERE vm_id = ${vm}`;
  try {
    const w = await browser().open(api);
    await w.login(TEST_ADMIN.name, TEST_ADMIN.password, "");
    await w.goto(`/vms/${vm}`);
    await h1(w.page, "desk-3").waitFor();
    const panel = w.page.getByRole("region", { name: "Expiry" });
    await panel.getByLabel("Stop the desktop at").fill("2099-03-01T12:00");
    await panel.getByRole("button", { name: "Save expiry" }).click();
    await w.page.waitForFunction(
      async (id) => (await (await fetch(`/api/v1/vms/${id}`)).json()).expire_hard_at !== null,
      vm,
    );
    expect(new Date((await sa.get(`/vms/${vm}`)).body.expire_hard_at).getTime()).toBe(
      new Date(2099, 2, 1, 12, 0).getTime(),
    );
    await panel.getByLabel("Warn the user at").fill("2099-03-02T12:00");
    await panel.getByRole("button", { name: "Save expiry" }).click();
    await panel.getByRole("alert").filter({ hasText: "must not come after the stop" }).waitFor();
    expect((await sa.get(`/vms/${vm}`)).body.expire_soft_at).toBeNull();
    await panel.getByRole("button", { name: "Clear expiry" }).click();
    await w.page.waitForFunction(
      async (id) => (await (await fetch(`/api/v1/vms/${id}`)).json()).expire_hard_at === null,
      vm,
    );
    // The refused save answered 422: the only console error expected.
    w.assertNoErrors([/422/]);
  } finally {
    await db()
      .sql`UPDATE vm_runtimes SET vm_state = 'stopped', host_id = NULL, expire_soft_at = NULL, expire_hard_at = NULL WHERE vm_id = ${vm}`;
  }
});

test("'expires within' filters by time without asking the API again and again", async () => {
  await db().sql`UPDATE vm_runtimes SET expire_hard_at = now() + interval '30 minutes' WHERE vm_id = ${ids.vm1!}`;
  await db().sql`UPDATE vm_runtimes SET expire_hard_at = now() + interval '3 days' WHERE vm_id = ${ids.vm2!}`;
  const w = await browser().open(api);
  await w.login(TEST_ADMIN.name, TEST_ADMIN.password, "");
  await w.goto("/vms?expires=24");
  await w.page.getByRole("checkbox", { name: "Select desk-1", exact: true }).waitFor();
  expect(await w.page.getByRole("checkbox", { name: "Select desk-2", exact: true }).count()).toBe(0);
  await w.page.waitForTimeout(1500);
  const requests = await w.page.evaluate(
    () => performance.getEntriesByType("resource").filter((e) => /\/api\/v1\/vms\?/.test(e.name)).length,
  );
  expect(requests).toBeLessThanOrEqual(2);
  w.assertNoErrors();
});

test("a detail page: set a property, edit a field, see both in the audit trail", async () => {
  const w = await browser().open(api);
  await w.login(TEST_ADMIN.name, TEST_ADMIN.password, "");
  await w.goto("/users?q=u1");
  await w.page.getByRole("link", { name: "u1", exact: true }).click();
  await h1(w.page, "u1").waitFor();
  const props = w.page.getByRole("region", { name: "Properties" });
  await props.getByLabel("Property").selectOption("floor");
  await props.getByLabel("Value").fill("3");
  await props.getByRole("button", { name: "Set property" }).click();
  await props.getByRole("button", { name: "Remove property floor" }).waitFor();
  await w.page.getByRole("button", { name: "Edit", exact: true }).click();
  const form = w.page.getByRole("dialog", { name: "Edit user" });
  await form.getByLabel("Description").fill("first floor");
  await form.getByRole("button", { name: "Save" }).click();
  await form.waitFor({ state: "detached" });
  const trail = w.page.getByRole("region", { name: "Audit trail" });
  await trail.getByText("user.update", { exact: true }).waitFor();
  await trail.getByText("user.set_property", { exact: true }).waitFor();
  expect((await sa.get("/users?name=u1")).body.items[0].description).toBe("first floor");
  w.assertNoErrors();
});

test("a tenant administrator sees only the tenant's VMs; an operator no Delete, Edit or New", async () => {
  const t = await browser().open(api, { viewport: { width: 400, height: 800 } });
  await t.login("tadmin", "tadmin-password", "acme");
  await t.goto("/vms");
  await t.page.getByRole("checkbox", { name: "Select desk-1", exact: true }).waitFor();
  expect(await t.page.getByRole("checkbox", { name: "Select stranger-desk" }).count()).toBe(0);
  expect(await t.page.getByText("4 VMs").count()).toBe(1);
  t.assertNoErrors();

  const o = await browser().open(api);
  await o.login("op", "op-password", "acme");
  await o.goto("/vms");
  await o.page.getByRole("checkbox", { name: "Select desk-2", exact: true }).waitFor();
  expect(await o.page.getByRole("toolbar").getByRole("button", { name: "Stop" }).count()).toBe(1);
  expect(await o.page.getByRole("button", { name: "Delete" }).count()).toBe(0);
  expect(await o.page.getByRole("button", { name: /^New / }).count()).toBe(0);
  await o.goto(`/vms/${ids.vm2}`);
  await h1(o.page, "desk-2").waitFor();
  await o.page.getByRole("button", { name: "Start" }).waitFor();
  expect(await o.page.getByRole("button", { name: "Delete" }).count()).toBe(0);
  expect(await o.page.getByRole("button", { name: "Edit" }).count()).toBe(0);
  o.assertNoErrors();
});

test("editing a selection: the description of two users at once", async () => {
  const w = await browser().open(api);
  await w.login(TEST_ADMIN.name, TEST_ADMIN.password, "");
  await w.goto("/users?tenant=acme");
  await w.page.getByRole("checkbox", { name: "Select u2", exact: true }).check();
  await w.page.getByRole("checkbox", { name: "Select u3", exact: true }).check();
  await w.page.getByRole("toolbar").getByRole("button", { name: "Edit", exact: true }).click();
  const form = w.page.getByRole("dialog", { name: "Edit 2 users" });
  expect(await form.getByLabel("Name", { exact: true }).count()).toBe(0);
  await form.getByLabel("Description").fill("second floor");
  await form.getByRole("button", { name: "Save" }).click();
  await w.page.getByRole("status").getByText("Edit: 2 done").waitFor();
  const rows = (await sa.get("/users?description=second%20floor")).body.items
    .map((u: { name: string }) => u.name)
    .sort();
  expect(rows).toEqual(["u2", "u3"]);
  w.assertNoErrors();
});

test("a session ended elsewhere: the event stream brings the login with its notice", async () => {
  const w = await browser().open(api);
  await w.login("tadmin", "tadmin-password", "acme");
  await w.goto("/vms");
  await w.page.getByRole("checkbox", { name: "Select desk-1", exact: true }).waitFor();
  await db()
    .sql`DELETE FROM admin_sessions WHERE administrator_id = (SELECT id FROM administrators WHERE name = 'tadmin')`;
  // No click: the stream's keep-alive finds the session gone.
  await w.page.getByRole("button", { name: "Log in" }).waitFor();
  expect(await w.page.getByRole("status").filter({ hasText: "Your session ended" }).count()).toBe(1);
  w.assertNoErrors([/status of 401\b/]);
});
