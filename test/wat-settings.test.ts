// The WAT's settings screens and special editors, in real Chromium against a live API
// (multitenant): the configuration page per tenant, the image tag editor setting the expiry of
// running VMs on the old image, cancelling an upload, the no-escalation refusal shown beside its
// field, and live administrator sessions.
import { afterAll, beforeAll, expect, test } from "bun:test";
import { existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { useTestApi } from "./support/api.ts";
import { HTTP_STATUS, useBrowser } from "./support/browser.ts";
import { TEST_ADMIN, useTestDatabase } from "./support/db.ts";
import { poll } from "./support/wait.ts";

const db = useTestDatabase();
const browser = useBrowser();
const images = mkdtempSync("/tmp/qvd-wat-images-");
const bigFile = join(images, "..", `${images.split("/").pop()}-upload.tar.gz`);
const live = useTestApi(db, { "wat.multitenant": "1", "path.storage.images": images });
const { api, sa } = live;
let acme: number;

beforeAll(async () => {
  acme = (await sa.post("/tenants", { name: "acme" })).body.id;
  writeFileSync(bigFile, Buffer.alloc(24 * 1024 * 1024, 1));
});
afterAll(() => {
  rmSync(images, { recursive: true, force: true });
  rmSync(bigFile, { force: true });
});

const setting = async (key: string, tenant?: number) =>
  (await sa.get(`/configs${tenant ? `?tenant_id=${tenant}` : ""}`)).body.items.find((i: any) => i.key === key);

test("configuration: a bad value is refused beside the field; a tenant's own value, then reset to the global one", async () => {
  const w = await browser().open(api);
  await w.goto("/config?q=ldap.timeout");
  await w.login(TEST_ADMIN.name, TEST_ADMIN.password);
  await w.page.getByRole("heading", { name: "Configuration" }).waitFor();
  // The filter came from the URL.
  expect(await w.page.getByRole("searchbox", { name: "Search" }).inputValue()).toBe("ldap.timeout");
  await w.page.getByRole("button", { name: "Edit auth.ldap.timeout" }).waitFor();
  expect(await w.page.locator("tbody tr").count()).toBe(1);

  await w.page.getByRole("button", { name: "Edit auth.ldap.timeout" }).click();
  await w.page.getByLabel("Value").fill("soon");
  await w.page.getByRole("button", { name: "Save" }).click();
  const err = w.page.locator(".field-invalid .field-error");
  await err.waitFor();
  expect(await err.textContent()).toContain("expected an integer");
  await w.page.getByLabel("Value").fill("20");
  await w.page.getByRole("button", { name: "Save" }).click();
  await w.page.getByRole("button", { name: "Reset auth.ldap.timeout" }).waitFor();
  expect(await setting("auth.ldap.timeout")).toMatchObject({ value: "20", source: "global" });

  // Tenant acme gets its own value; the global one stays.
  await w.page.getByLabel("Tenant", { exact: true }).selectOption({ label: "acme" });
  await w.page.waitForURL(/tenant=\d+/);
  await w.page.getByRole("button", { name: "Edit auth.ldap.timeout" }).click();
  await w.page.getByLabel("Value").fill("45");
  await w.page.getByRole("button", { name: "Save" }).click();
  await w.page
    .getByRole("row", { name: /auth\.ldap\.timeout/ })
    .getByText("tenant")
    .waitFor();
  await w.screenshot("config-tenant");
  expect(await setting("auth.ldap.timeout", acme)).toMatchObject({ value: "45", source: "tenant" });
  expect(await setting("auth.ldap.timeout")).toMatchObject({ value: "20" });

  await w.page.getByRole("button", { name: "Reset auth.ldap.timeout" }).click();
  await w.page.getByRole("dialog").getByRole("button", { name: "Reset" }).click();
  await w.page
    .getByRole("row", { name: /auth\.ldap\.timeout/ })
    .getByText("global")
    .waitFor();
  expect(await setting("auth.ldap.timeout", acme)).toMatchObject({ value: "20", source: "global" });
  w.assertNoErrors([HTTP_STATUS(422)]);
});

test("configuration: a secret is masked and written through a password field", async () => {
  expect((await sa.put("/configs/auth.ldap.bind_password", { value: "first-secret" })).status).toBe(200);
  const w = await browser().open(api);
  await w.goto("/config?section=auth");
  await w.login(TEST_ADMIN.name, TEST_ADMIN.password);
  const row = w.page.getByRole("row", { name: /auth\.ldap\.bind_password/ });
  await row.getByText("********").waitFor();
  expect(await w.page.content()).not.toContain("first-secret");
  await w.page.getByRole("button", { name: "Edit auth.ldap.bind_password" }).click();
  const input = w.page.getByLabel("Value");
  expect(await input.getAttribute("type")).toBe("password");
  expect(await input.inputValue()).toBe("");
  await input.fill("second-secret");
  await w.page.getByRole("button", { name: "Save" }).click();
  await w.page.getByRole("dialog").waitFor({ state: "detached" });
  const [r] = await db().sql`SELECT value FROM configs WHERE tenant_id = 0 AND key = 'auth.ldap.bind_password'`;
  expect(r!.value).toBe("second-secret");
  w.assertNoErrors();
});

test("image tags: moving a tag sets the stop time of running VMs still on the old image", async () => {
  const osf = (await sa.post("/osfs", { name: "tagged", tenant_id: acme })).body.id;
  const oldDi = (await sa.post("/dis", { osf_id: osf, path: "tagged-old.tar.gz" })).body.id;
  const newDi = (await sa.post("/dis", { osf_id: osf, path: "tagged-new.tar.gz" })).body.id;
  expect((await sa.post(`/dis/${oldDi}/tags`, { tag: "stable" })).status).toBe(200);
  const user = (await sa.post("/users", { tenant_id: acme, name: "tagger", password: "tagger-password" })).body.id;
  const vm = (await sa.post("/vms", { user_id: user, osf_id: osf, name: "on-stable", di_tag: "stable" })).body.id;
  // As a node would report it: running the old image.
  const host = (await sa.post("/hosts", { name: "node-t", address: "198.18.0.10" })).body.id;
  await db()
    .sql`UPDATE vm_runtimes SET vm_state = 'running', host_id = ${host}, current_di_id = ${oldDi} WHERE vm_id = ${vm}`;

  const w = await browser().open(api);
  await w.goto(`/dis/${newDi}`);
  await w.login(TEST_ADMIN.name, TEST_ADMIN.password);
  await w.page.getByLabel("Add a tag").fill("stable");
  await w.page.getByLabel("Will be stopped at", { exact: true }).selectOption("at");
  const at = new Date(Date.now() + 2 * 3600_000);
  const local = new Date(at.getTime() - at.getTimezoneOffset() * 60_000).toISOString().slice(0, 16);
  await w.page.getByLabel("Will be stopped at (date and time)").fill(local);
  await w.page.getByRole("button", { name: "Add tag" }).click();
  await w.page.getByRole("button", { name: "Remove tag stable" }).waitFor();
  const oldVersion = (await sa.get(`/dis/${oldDi}`)).body.version;
  await w.page.getByText(`Tag stable moved here from version ${oldVersion}`).waitFor();
  await w.screenshot("image-tags");

  const [rt] = await db().sql`SELECT expire_soft_at, expire_hard_at FROM vm_runtimes WHERE vm_id = ${vm}`;
  expect(rt!.expire_soft_at).toBeNull(); // the image's own setting: none
  expect(Math.abs(new Date(rt!.expire_hard_at).getTime() - at.getTime())).toBeLessThan(120_000);
  expect((await sa.get(`/dis/${oldDi}`)).body.tags).not.toContain("stable");

  // A tag the API refuses: the reason beside the field.
  await w.page.getByLabel("Add a tag").fill("two words");
  await w.page.getByLabel("Will be stopped at", { exact: true }).selectOption("image");
  await w.page.getByRole("button", { name: "Add tag" }).click();
  await w.page.locator(".field-invalid .field-error").getByText("no spaces").waitFor();
  w.assertNoErrors([HTTP_STATUS(422)]);
});

test("cancelling an upload deletes the new image and leaves no file; Escape does not end it", async () => {
  const osf = (await sa.post("/osfs", { name: "uploads", tenant_id: acme })).body.id;
  const w = await browser().open(api);
  await w.goto(`/osfs/${osf}`);
  await w.login(TEST_ADMIN.name, TEST_ADMIN.password);
  // A slow link, so the upload is still running when it is cancelled.
  const cdp = await w.context.newCDPSession(w.page);
  await cdp.send("Network.enable");
  await cdp.send("Network.emulateNetworkConditions", {
    offline: false,
    latency: 0,
    downloadThroughput: -1,
    uploadThroughput: 2 * 1024 * 1024,
  });
  await w.page.getByRole("button", { name: "New image" }).click();
  const dialog = w.page.getByRole("dialog", { name: "New image" });
  await dialog.getByLabel("Image file").setInputFiles(bigFile);
  await dialog.getByLabel("File name on the server").fill("cancelled.tar.gz");
  await dialog.getByRole("button", { name: "Upload" }).click();
  await w.page.waitForFunction(
    () => Number((document.getElementById("upload-bar") as HTMLProgressElement | null)?.value) >= 10,
  );
  const during = (await sa.get("/dis?path=cancelled.tar.gz")).body.items[0];
  expect(during.state).toBe("uploading");
  await w.screenshot("image-upload-progress");

  await w.page.keyboard.press("Escape");
  await dialog.getByText("The upload is still running").waitFor();
  expect(await dialog.isVisible()).toBe(true);
  await dialog.getByRole("button", { name: "Cancel upload" }).click();
  await w.page.getByText("Upload cancelled; the new image was deleted.").waitFor();
  expect((await sa.get("/dis?path=cancelled.tar.gz")).body.total).toBe(0);
  // The server removes its partial file when it notices the broken upload.
  await poll(() => readdirSync(images).length === 0, 5000);
  expect(readdirSync(images)).toEqual([]);
  expect(existsSync(join(images, "cancelled.tar.gz"))).toBe(false);
  w.assertNoErrors();
});

test("no escalation: a tenant administrator's attempt to inherit Superadmin is refused beside the field", async () => {
  const { client: boss } = await live.admin("boss", {
    tenantId: acme,
    tenant: "acme",
    roles: ["Tenant administrator"],
  });
  const w = await browser().open(api);
  await w.goto("/");
  await w.login("boss", "boss-password", "acme");
  const mine = (await boss.post("/roles", { name: "helpers" })).body.id;
  await w.goto(`/roles/${mine}`);
  await w.page.getByLabel("Inherit another role").selectOption({ label: "Superadmin (global)" });
  await w.page.getByRole("button", { name: "Add", exact: true }).click();
  await w.page
    .locator(".field-invalid .field-error")
    .getByText("you can only give permissions you hold yourself")
    .waitFor();
  expect((await sa.get(`/roles/${mine}`)).body.inherits).toEqual([]);
  // ACLs the administrator lacks offer no Grant.
  await w.page.getByRole("searchbox", { name: "Filter ACLs" }).fill("tenant.create");
  await w.page.locator('tr[id="acl-tenant.create"]').getByText("not yours to grant").waitFor();
  expect(await w.page.getByRole("button", { name: "Grant tenant.create" }).count()).toBe(0);
  await w.screenshot("role-escalation");
  w.assertNoErrors([HTTP_STATUS(403)]);
});

test("sessions: the list shows who is logged in; ending one logs that client out", async () => {
  await sa.post("/administrators", { tenant_id: 0, name: "watcher", password: "watcher-password" });
  const other = await api.login("watcher", "watcher-password");
  expect((await other.get("/session")).status).toBe(200);
  const w = await browser().open(api);
  await w.goto("/sessions");
  await w.login(TEST_ADMIN.name, TEST_ADMIN.password);
  await w.page.getByRole("heading", { name: "Sessions" }).waitFor();
  const row = w.page.getByRole("row", { name: /^watcher API/ });
  await row.waitFor();
  expect(await w.page.getByRole("row", { name: /^superadmin \(you\) WAT/ }).count()).toBeGreaterThan(0);
  await row.getByRole("button", { name: /^End session of watcher/ }).click();
  await w.page.getByRole("dialog").getByRole("button", { name: "End session" }).click();
  await w.page.getByText("Session of watcher ended").waitFor();
  await row.waitFor({ state: "detached" });
  expect((await other.get("/session")).status).toBe(401);
  w.assertNoErrors();
});
