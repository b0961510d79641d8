// What the WAT shows is what the administrator may do, in real Chromium against a live API:
// an Operator sees no Delete (nor New, nor Edit) buttons in lists and detail pages, only the
// screens of their ACLs; in a multitenant farm a tenant administrator sees only their own
// tenant's objects, a superadministrator every tenant's.
import { beforeAll, describe, expect, test } from "bun:test";
import type { Page } from "playwright-core";
import { createAdmin, useTestApi } from "./support/api.ts";
import { ok } from "./support/assert.ts";
import { h1, HTTP_STATUS, loaded, useBrowser } from "./support/browser.ts";
import { TEST_ADMIN, useTestDatabase } from "./support/db.ts";

const browser = useBrowser();
const navLinks = async (page: Page) =>
  (await page.getByRole("navigation", { name: "Main" }).getByRole("link").allTextContents()).map((t) => t.trim());

describe("an Operator", () => {
  const db = useTestDatabase();
  const { api, sa } = useTestApi(db);
  const ids: Record<string, number> = {};

  beforeAll(async () => {
    await createAdmin(sa, "op", { tenantId: 1, password: "operator-password", roles: ["Operator"] });
    ids.user = (await ok(sa.post("/users", { name: "op-user" }), 201)).id;
    ids.osf = (await ok(sa.post("/osfs", { name: "op-osf" }), 201)).id;
    ids.vm = (await ok(sa.post("/vms", { user_id: ids.user, osf_id: ids.osf, name: "op-desk" }), 201)).id;
    ids.di = (await ok(sa.post("/dis", { osf_id: ids.osf, path: "op-image.tar.gz" }), 201)).id;
    ids.host = (await ok(sa.post("/hosts", { name: "op-node", address: "198.18.0.20" }), 201)).id;
  });

  test("sees no Delete, New or Edit buttons in lists and detail pages, and only the screens of their ACLs", async () => {
    const w = await browser().open(api);
    await w.login("op", "operator-password");
    const nav = await navLinks(w.page);
    expect(nav).toEqual(
      expect.arrayContaining(["Dashboard", "Users", "Virtual machines", "Nodes", "OS flavours", "Images"]),
    );
    for (const hidden of ["Administrators", "Roles", "Properties", "Configuration", "Audit log", "Sessions"])
      expect(nav).not.toContain(hidden);

    const forbidden = (page: Page) => page.locator("main").getByRole("button", { name: /^(Delete|Edit|New .*)$/ });
    const lists: [string, string, string][] = [
      ["Users", "users", "op-user"],
      ["Virtual machines", "vms", "op-desk"],
      ["Nodes", "hosts", "op-node"],
      ["OS flavours", "osfs", "op-osf"],
      ["Images", "dis", "op-image.tar.gz"],
    ];
    for (const [title, path, name] of lists) {
      await w.goto(`/${path}`);
      await h1(w.page, title).waitFor();
      await w.page.locator("main table").getByText(name, { exact: false }).first().waitFor();
      expect({ title, forbidden: await forbidden(w.page).allTextContents() }).toEqual({ title, forbidden: [] });
    }
    // What an Operator may do is there: block users, start VMs.
    await w.goto("/users");
    await w.page.getByRole("checkbox", { name: "Select op-user" }).check();
    await w.page.getByRole("toolbar").getByRole("button", { name: "Block", exact: true }).waitFor();

    const details: [string, number][] = [
      ["users", ids.user!],
      ["vms", ids.vm!],
      ["hosts", ids.host!],
      ["osfs", ids.osf!],
      ["dis", ids.di!],
    ];
    for (const [path, id] of details) {
      await w.goto(`/${path}/${id}`);
      await w.page.locator("main h1").waitFor();
      await loaded(w.page);
      expect({ path, forbidden: await forbidden(w.page).allTextContents() }).toEqual({ path, forbidden: [] });
    }
    await w.goto(`/vms/${ids.vm}`);
    await h1(w.page, "op-desk").waitFor();
    await w.page.locator("main").getByRole("button", { name: "Start", exact: true }).waitFor();
    await w.screenshot("operator-vm-detail");
    w.assertNoErrors();
  });
});

describe("multitenant", () => {
  const db = useTestDatabase();
  const live = useTestApi(db, { "wat.multitenant": "true" });
  const { api, sa } = live;
  const ids: Record<string, number> = {};

  beforeAll(async () => {
    const tenantAdmin = await live.roleId("Tenant administrator");
    for (const t of ["acme", "globex"]) {
      const tenant = await ok(sa.post("/tenants", { name: t }), 201);
      await createAdmin(sa, "boss", { tenantId: tenant.id, password: `${t}-boss-password`, roles: [tenantAdmin] });
      ids[`${t}-user`] = (await ok(sa.post("/users", { tenant_id: tenant.id, name: `${t}-user` }), 201)).id;
      ids[`${t}-osf`] = (await ok(sa.post("/osfs", { tenant_id: tenant.id, name: `${t}-osf` }), 201)).id;
      await ok(sa.post("/vms", { user_id: ids[`${t}-user`], osf_id: ids[`${t}-osf`], name: `${t}-desk` }), 201);
    }
  });

  const rowNames = (page: Page) =>
    page.locator("main table tbody tr").evaluateAll((rows) => rows.map((r) => r.textContent ?? ""));

  test("a tenant administrator sees only their tenant's objects", async () => {
    const w = await browser().open(api);
    await w.goto();
    await w.login("boss", "acme-boss-password", "acme");
    expect(await w.page.locator("header").getByText("@ acme").count()).toBe(1);
    expect(await navLinks(w.page)).not.toContain("Tenants");
    for (const [path, title, mine, theirs] of [
      ["users", "Users", "acme-user", "globex-user"],
      ["vms", "Virtual machines", "acme-desk", "globex-desk"],
      ["osfs", "OS flavours", "acme-osf", "globex-osf"],
    ] as const) {
      await w.goto(`/${path}`);
      await h1(w.page, title).waitFor();
      await w.page.locator("main table").getByText(mine, { exact: true }).first().waitFor();
      const rows = (await rowNames(w.page)).join("\n");
      expect(rows).toContain(mine);
      expect(rows).not.toContain(theirs);
      expect(rows).not.toContain("globex");
    }
    await w.screenshot("tenant-admin-vms");
    // The other tenant's user, by its URL: not shown.
    await w.goto(`/users/${ids["globex-user"]}`);
    await h1(w.page, "No such user").waitFor();
    expect(await w.page.locator("main").textContent()).not.toContain("globex-user");
    w.assertNoErrors([HTTP_STATUS(404)]);
  });

  test("a superadministrator sees every tenant's objects, with their tenant, and the Tenants screen", async () => {
    const w = await browser().open(api);
    await w.goto();
    await w.login(TEST_ADMIN.name, TEST_ADMIN.password);
    expect(await navLinks(w.page)).toContain("Tenants");
    await w.goto("/users");
    await h1(w.page, "Users").waitFor();
    await w.page.locator("main table").getByText("globex-user", { exact: true }).waitFor();
    const rows = (await rowNames(w.page)).join("\n");
    expect(rows).toContain("acme-user");
    expect(rows).toMatch(/acme-user.*acme/);
    expect(await w.page.locator("main table thead").getByText("Tenant", { exact: true }).count()).toBe(1);
    await w.goto("/tenants");
    await h1(w.page, "Tenants").waitFor();
    await w.page.locator("main table").getByText("globex", { exact: true }).waitFor();
    await w.screenshot("tenants");
    w.assertNoErrors();
  });
});
