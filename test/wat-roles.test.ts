// Roles and administrators in the WAT, in real Chromium against a live API: the role's ACL tree
// shows inherited, granted and denied ACLs and edits them; the inheritance editor; an
// administrator's role assignment and effective ACLs.
import { expect, test } from "bun:test";
import type { Page } from "playwright-core";
import { useTestApi } from "./support/api.ts";
import { ok } from "./support/assert.ts";
import { useBrowser } from "./support/browser.ts";
import { TEST_ADMIN, useTestDatabase } from "./support/db.ts";

const db = useTestDatabase();
const browser = useBrowser();
const { api, sa } = useTestApi(db);

/** The status cell of an ACL's row in the tree (the groups are opened by filtering). */
async function aclStatus(page: Page, acl: string): Promise<string> {
  const row = page.locator(`tr[id="acl-${acl}"]`);
  await row.waitFor();
  return ((await row.locator("td").nth(1).textContent()) ?? "").trim();
}

async function filterAcls(page: Page, text: string) {
  await page.getByRole("searchbox", { name: "Filter ACLs" }).first().fill(text);
}

test("a role's ACL tree: inherit Operator, deny one inherited ACL, grant another; the API agrees", async () => {
  const role = await ok(sa.post("/roles", { name: "Desk operator" }), 201);
  const w = await browser().open(api);
  await w.goto(`/roles/${role.id}`);
  await w.login(TEST_ADMIN.name, TEST_ADMIN.password);
  await w.page.getByRole("heading", { level: 1, name: "Desk operator" }).waitFor();
  await w.page.getByText("This role inherits no other role.").waitFor();

  // Inheritance: pick Operator.
  await w.page.getByLabel("Inherit another role").selectOption({ label: "Operator" });
  await w.page.getByRole("button", { name: "Add", exact: true }).click();
  await w.page.getByRole("link", { name: "Operator" }).waitFor();

  await filterAcls(w.page, "vm.");
  await w.page.waitForFunction(() =>
    document.getElementById("acl-vm.start")?.textContent?.includes("Inherited from Operator"),
  );
  expect(await aclStatus(w.page, "vm.start")).toBe("Inherited from Operator");
  expect(await aclStatus(w.page, "vm.delete")).toBe("Not granted");

  // Deny an inherited ACL: it says so, and where it would come from.
  await w.page.getByRole("button", { name: "Deny vm.start" }).click();
  await w.page.waitForFunction(() => document.getElementById("acl-vm.start")?.textContent?.includes("Denied here"));
  expect(await aclStatus(w.page, "vm.start")).toContain("would be inherited from Operator");
  // Grant one Operator lacks.
  await w.page.getByRole("button", { name: "Grant vm.delete" }).click();
  await w.page.waitForFunction(() => document.getElementById("acl-vm.delete")?.textContent?.includes("Granted here"));
  await w.screenshot("role-acl-editor");

  const acls = (await sa.get(`/roles/${role.id}/acls`)).body.items as string[];
  expect(acls).toContain("vm.delete");
  expect(acls).toContain("vm.stop");
  expect(acls).not.toContain("vm.start");
  const r = (await sa.get(`/roles/${role.id}`)).body;
  expect(r.denials).toEqual(["vm.start"]);
  expect(r.grants).toEqual(["vm.delete"]);

  // Lifting the denial gives the inherited ACL back.
  await w.page.getByRole("button", { name: "Remove the denial of vm.start" }).click();
  await w.page.waitForFunction(() =>
    document.getElementById("acl-vm.start")?.textContent?.includes("Inherited from Operator"),
  );
  expect((await sa.get(`/roles/${role.id}/acls`)).body.items).toContain("vm.start");
  w.assertNoErrors();
});

test("a built-in role is shown read-only: no Grant, Deny or inheritance controls", async () => {
  const [op] = await db().sql`SELECT id FROM roles WHERE tenant_id = 0 AND name = 'Operator'`;
  const w = await browser().open(api);
  await w.goto(`/roles/${op!.id}`);
  await w.login(TEST_ADMIN.name, TEST_ADMIN.password);
  await w.page.getByRole("heading", { level: 1, name: "Operator" }).waitFor();
  await w.page.getByRole("note").filter({ hasText: "built in" }).waitFor();
  await filterAcls(w.page, "vm.");
  expect(await aclStatus(w.page, "vm.start")).toBe("Granted here");
  expect(await w.page.getByRole("button", { name: /^(Grant|Deny) / }).count()).toBe(0);
  expect(await w.page.getByLabel("Inherit another role").count()).toBe(0);
  w.assertNoErrors();
});

test("an administrator's roles: assigning one shows its ACLs as effective, with where they come from", async () => {
  const admin = await ok(
    sa.post("/administrators", { tenant_id: 0, name: "newcomer", password: "newcomer-password" }),
    201,
  );
  const w = await browser().open(api);
  await w.goto(`/administrators/${admin.id}`);
  await w.login(TEST_ADMIN.name, TEST_ADMIN.password);
  await w.page.getByRole("heading", { level: 1, name: "newcomer" }).waitFor();
  await w.page.getByText("newcomer has no role").waitFor();

  await w.page.getByLabel("Assign a role").selectOption({ label: "Auditor" });
  await w.page.getByRole("button", { name: "Assign", exact: true }).click();
  await w.page.getByRole("button", { name: "Take role Auditor from newcomer" }).waitFor();
  const effective = w.page.getByRole("region", { name: "Effective ACLs" });
  await effective.getByRole("searchbox", { name: "Filter ACLs" }).fill("vm.see");
  await effective.locator('tr[id="acl-vm.see"]').getByText("From Auditor").waitFor();
  await w.screenshot("administrator-roles");
  expect((await sa.get(`/administrators/${admin.id}/acls`)).body.items).toContain("vm.see");

  // Their own login now holds the Auditor's ACLs.
  const theirs = await api.login("newcomer", "newcomer-password");
  expect((await theirs.get("/session")).body.acls).toContain("audit.see");
  w.assertNoErrors();
});
