// The WAT's object screens in real Chromium against a live API and PostgreSQL: creating an OSF,
// an image by upload, a user and a VM through the forms; a VM's start seen live on screen;
// mass-blocking every user matching a filter; server validation errors beside their fields;
// keyboard-only navigation to a list; screenshots of the main screens.
import { afterAll, beforeAll, expect, test } from "bun:test";
import { createHash } from "node:crypto";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { Page } from "playwright-core";
import { ALL_TENANTS } from "../src/db/index.ts";
import { createUserToken } from "../src/db/tokens.ts";
import { run } from "../src/run.ts";
import { useTestApi } from "./support/api.ts";
import { h1, loaded, useBrowser, type WatPage } from "./support/browser.ts";
import { TEST_ADMIN, useTestDatabase } from "./support/db.ts";
import { poll } from "./support/wait.ts";

const db = useTestDatabase();
const browser = useBrowser();
const dir = mkdtempSync("/tmp/qvd-wat-objects-");
const images = join(dir, "images");
const tarball = join(dir, "desk-image.tar.gz");

beforeAll(async () => {
  mkdirSync(images);
  // A small root file system, as an administrator would upload one.
  const root = join(dir, "rootfs");
  mkdirSync(join(root, "etc"), { recursive: true });
  writeFileSync(join(root, "etc", "hostname"), "desk\n");
  writeFileSync(join(root, "etc", "filler"), Buffer.alloc(256 * 1024, 7));
  await run(["tar", "-C", root, "-czf", tarball, "."]);
});
const { api, sa } = useTestApi(db, { "path.storage.images": images });
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

const nav = (page: Page, label: string) =>
  page.getByRole("navigation", { name: "Main" }).getByRole("link", { name: label, exact: true });
/** The create button of a list's header ("New user"…). */
const newButton = (page: Page) => page.locator("main header").getByRole("button", { name: /^New / });
const dialog = (page: Page, title: string) => page.getByRole("dialog", { name: title });

async function loggedIn(path = "/"): Promise<WatPage> {
  const w = await browser().open(api);
  await w.goto(path);
  await w.login(TEST_ADMIN.name, TEST_ADMIN.password);
  return w;
}

/** A node that is up, so the API can place a VM on it. */
let nodes = 0;
async function liveNode(name: string): Promise<number> {
  const [h] = await db().sql`INSERT INTO hosts (name, address) VALUES (${name}, ${`198.18.1.${++nodes}`}) RETURNING id`;
  await db()
    .sql`UPDATE host_runtimes SET state = 'running', ok_ts = now() + interval '1 hour', usable_ram_mb = 65536, usable_cpu = 16
                  WHERE host_id = ${h!.id}`;
  return h!.id;
}

test("an OSF, an image by upload, a user and a VM, all created through the WAT's forms", async () => {
  const w = await loggedIn();

  await nav(w.page, "OS flavours").click();
  await h1(w.page, "OS flavours").waitFor();
  await newButton(w.page).click();
  const osfForm = dialog(w.page, "New OS flavour");
  await osfForm.getByLabel("Name", { exact: true }).fill("desk-osf");
  await osfForm.getByRole("button", { name: "Create" }).click();
  await h1(w.page, "desk-osf").waitFor();
  const [osf] = await db().sql`SELECT id FROM osfs WHERE name = 'desk-osf'`;
  expect(osf).toBeDefined();

  await nav(w.page, "Images").click();
  await h1(w.page, "Images").waitFor();
  await newButton(w.page).click();
  const up = dialog(w.page, "New image");
  await up.getByLabel("OS flavour").selectOption({ label: "desk-osf" });
  await up.getByLabel("Image file").setInputFiles(tarball);
  expect(await up.getByLabel("File name on the server").inputValue()).toBe("desk-image.tar.gz");
  await w.screenshot("image-upload-dialog");
  await up.getByRole("button", { name: "Upload" }).click();
  // Done: the new image's page, ready, with the file's bytes on the server.
  await w.page.waitForURL(/\/wat\/dis\/\d+$/);
  const [di] = await db().sql`SELECT id, state, path FROM dis WHERE osf_id = ${osf!.id}`;
  expect(di!.state).toBe("ready");
  expect(new URL(w.page.url()).pathname).toBe(`/wat/dis/${di!.id}`);
  const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");
  expect(sha(readFileSync(join(images, di!.path)))).toBe(sha(readFileSync(tarball)));
  await w.page.locator("main").getByText("ready", { exact: true }).first().waitFor();

  await nav(w.page, "Users").click();
  await h1(w.page, "Users").waitFor();
  await newButton(w.page).click();
  const userForm = dialog(w.page, "New user");
  await userForm.getByLabel("Name", { exact: true }).fill("alice");
  await userForm.getByLabel("Password", { exact: true }).fill("alice-password");
  await userForm.getByRole("button", { name: "Create" }).click();
  await h1(w.page, "alice").waitFor();

  await nav(w.page, "Virtual machines").click();
  await h1(w.page, "Virtual machines").waitFor();
  await newButton(w.page).click();
  const vmForm = dialog(w.page, "New virtual machine");
  // The user and the OSF are picked from suggestions as one types.
  await vmForm.getByLabel("User", { exact: true }).fill("alice");
  await vmForm.locator('datalist option[value="alice"]').waitFor({ state: "attached" });
  await vmForm.getByLabel("OS flavour", { exact: true }).fill("desk-osf");
  await vmForm.locator('datalist option[value="desk-osf"]').waitFor({ state: "attached" });
  await vmForm.getByLabel("Name", { exact: true }).fill("alice-desk");
  await vmForm.getByRole("button", { name: "Create" }).click();
  await h1(w.page, "alice-desk").waitFor();
  const [vm] = await db().sql`SELECT v.name, u.name AS user_name, o.name AS osf_name FROM vms v
                                JOIN users u ON u.id = v.user_id JOIN osfs o ON o.id = v.osf_id WHERE v.name = 'alice-desk'`;
  expect(vm).toEqual({ name: "alice-desk", user_name: "alice", osf_name: "desk-osf" } as any);
  await w.screenshot("vm-detail");
  w.assertNoErrors();
});

test("starting a VM: its state changes on screen as the node reports it, without a reload", async () => {
  const node = await liveNode("node-live");
  const user = (await sa.post("/users", { name: "bob" })).body;
  const osf = (await sa.post("/osfs", { name: "live-osf" })).body;
  const vm = (await sa.post("/vms", { user_id: user.id, osf_id: osf.id, name: "bob-desk" })).body;
  expect(vm.id).toBeNumber();

  const w = await loggedIn(`/vms/${vm.id}`);
  await h1(w.page, "bob-desk").waitFor();
  const main = w.page.locator("main");
  await main.getByText("stopped", { exact: true }).first().waitFor();
  // Anything kept in the page survives only if it is not reloaded.
  await w.page.evaluate(() => ((window as any).__notReloaded = true));

  await main.getByRole("button", { name: "Start", exact: true }).click();
  // The API commands the start on the node it chose.
  await poll(
    async () => (await db().sql`SELECT vm_cmd FROM vm_runtimes WHERE vm_id = ${vm.id}`)[0]!.vm_cmd === "start",
    15_000,
  );
  const [cmd] = await db().sql`SELECT vm_cmd, host_id FROM vm_runtimes WHERE vm_id = ${vm.id}`;
  expect(cmd).toEqual({ vm_cmd: "start", host_id: node } as any);
  // The node takes the command: starting, then running.
  await db().sql`UPDATE vm_runtimes SET vm_state = 'starting', vm_cmd = NULL WHERE vm_id = ${vm.id}`;
  await main.getByText("starting", { exact: true }).first().waitFor();
  await db().sql`UPDATE vm_runtimes SET vm_state = 'running' WHERE vm_id = ${vm.id}`;
  await main.getByText("running", { exact: true }).first().waitFor();
  await main.getByRole("button", { name: "Stop", exact: true }).waitFor();
  expect(await main.getByRole("button", { name: "Start", exact: true }).count()).toBe(0);

  // The list shows it too, and follows the next change live.
  await nav(w.page, "Virtual machines").click();
  const row = w.page.getByRole("row").filter({ has: w.page.getByRole("checkbox", { name: "Select bob-desk" }) });
  await row.getByText("running", { exact: true }).waitFor();
  await db().sql`UPDATE vm_runtimes SET vm_state = 'stopping' WHERE vm_id = ${vm.id}`;
  await row.getByText("stopping", { exact: true }).waitFor();
  expect(await w.page.evaluate(() => (window as any).__notReloaded)).toBe(true);
  w.assertNoErrors();
});

test("the dashboard: the counts of the database, updated live as objects change", async () => {
  const w = await loggedIn();
  await h1(w.page, "Dashboard").waitFor();
  const card = (title: string) => w.page.getByRole("region", { name: title, exact: true });
  const total = async (title: string) => Number(await card(title).locator(".card-total").textContent());
  const count = async (table: string) =>
    Number((await db().sql`SELECT count(*)::int AS n FROM ${db().sql(table)}`)[0]!.n);
  await card("Users").waitFor();
  expect(await total("Users")).toBe(await count("users"));
  expect(await total("Virtual machines")).toBe(await count("vms"));
  expect(await total("Nodes")).toBe(await count("hosts"));
  expect(await total("OS flavours")).toBe(await count("osfs"));
  expect(await total("Images")).toBe(await count("dis"));

  const before = await total("Users");
  expect((await sa.post("/users", { name: "dash-new" })).status).toBe(201);
  await w.page.waitForFunction(
    (n) => document.querySelector('[aria-label="Users"] .card-total')?.textContent === String(n),
    before + 1,
  );
  w.assertNoErrors();
});

test("image tags: making a new image the default sets the chosen stop time on VMs still running the old one; custom tags come and go", async () => {
  const node = await liveNode("node-tags");
  const osf = (await sa.post("/osfs", { name: "tag-osf" })).body;
  const old = (await sa.post("/dis", { osf_id: osf.id, path: "tag-old.tar.gz" })).body;
  const user = (await sa.post("/users", { name: "carol" })).body;
  const vm = (await sa.post("/vms", { user_id: user.id, osf_id: osf.id, name: "carol-desk" })).body;
  await db()
    .sql`UPDATE vm_runtimes SET vm_state = 'running', host_id = ${node}, current_di_id = ${old.id} WHERE vm_id = ${vm.id}`;
  const fresh = (await sa.post("/dis", { osf_id: osf.id, path: "tag-new.tar.gz", version: "fresh" })).body;

  const w = await loggedIn(`/dis/${fresh.id}`);
  await h1(w.page, "tag-osf fresh").waitFor();
  const chips = w.page.getByRole("list", { name: "Tags of this image" });
  await chips.getByText("head", { exact: true }).waitFor();
  expect(await chips.getByText("default", { exact: true }).count()).toBe(0);

  // Running VMs still on the old image: stopped two days from now.
  const at = new Date(Date.now() + 2 * 86400_000);
  at.setSeconds(0, 0);
  const pad = (n: number) => String(n).padStart(2, "0");
  const local = `${at.getFullYear()}-${pad(at.getMonth() + 1)}-${pad(at.getDate())}T${pad(at.getHours())}:${pad(at.getMinutes())}`;
  await w.page.getByLabel("Will be stopped at", { exact: true }).selectOption("at");
  await w.page.getByLabel(/^Will be stopped at\W+date and time/).fill(local);
  await w.page.getByRole("button", { name: "Make default" }).click();
  await chips.getByText("default", { exact: true }).waitFor();
  const [r] = await db().sql`SELECT expire_hard_at, expire_soft_at FROM vm_runtimes WHERE vm_id = ${vm.id}`;
  expect(Math.abs(new Date(r!.expire_hard_at).getTime() - at.getTime())).toBeLessThan(5 * 60_000);
  expect(r!.expire_soft_at).toBeNull();
  const [tag] = await db().sql`SELECT di_id FROM di_tags WHERE osf_id = ${osf.id} AND tag = 'default'`;
  expect(tag!.di_id).toBe(fresh.id);
  await w.screenshot("image-tags");

  await w.page.getByLabel("Add a tag", { exact: true }).fill("testing");
  await w.page.getByRole("button", { name: "Add tag" }).click();
  await chips.getByText("testing", { exact: true }).waitFor();
  await w.page.getByRole("button", { name: "Remove tag testing" }).click();
  await chips.getByText("testing", { exact: true }).waitFor({ state: "detached" });
  expect((await db().sql`SELECT count(*)::int AS n FROM di_tags WHERE tag = 'testing'`)[0]!.n).toBe(0);

  // The dashboard lists the VM among those closest to expiry.
  await nav(w.page, "Dashboard").click();
  await w.page.getByRole("region", { name: "VMs closest to expiry" }).getByText("carol-desk").waitFor();
  w.assertNoErrors();
});

test("mass block: select every user matching the filter (more than a page) and block them", async () => {
  for (let i = 1; i <= 25; i++)
    expect((await sa.post("/users", { name: `mass-${String(i).padStart(2, "0")}` })).status).toBe(201);
  expect((await sa.post("/users", { name: "bystander" })).status).toBe(201);

  const w = await loggedIn("/users?limit=10");
  await h1(w.page, "Users").waitFor();
  await w.page.getByLabel("Search").fill("mass-");
  // The filter is in the URL, so the list can be bookmarked.
  await w.page.waitForURL(/[?&]\w+=mass-/);
  // The filtered page replaces the unfiltered one (which also holds mass-01).
  await w.page.getByRole("checkbox", { name: "Select bystander" }).waitFor({ state: "detached" });
  await w.page.getByRole("checkbox", { name: "Select mass-01" }).waitFor();

  await w.page.getByRole("checkbox", { name: "Select all on this page" }).check();
  await w.page.getByRole("button", { name: "Select all 25 matching" }).click();
  await w.page.getByText("All 25 matching users are selected.").waitFor();
  await w.page.getByRole("toolbar").getByRole("button", { name: "Block", exact: true }).click();
  const confirm = w.page.getByRole("dialog");
  if (await confirm.count()) await confirm.getByRole("button", { name: "Block", exact: true }).click();

  // The rows show it without a reload; the server has all 25 blocked, and nobody else.
  const row1 = w.page.getByRole("row").filter({ has: w.page.getByRole("checkbox", { name: "Select mass-01" }) });
  await row1.getByText("blocked", { exact: true }).waitFor();
  const [n] = await db()
    .sql`SELECT count(*) FILTER (WHERE blocked)::int AS blocked, count(*) FILTER (WHERE blocked AND name NOT LIKE 'mass-%')::int AS others FROM users`;
  expect(n).toEqual({ blocked: 25, others: 0 } as any);
  await w.screenshot("users-mass-blocked");
  w.assertNoErrors();
});

test("a user's page revokes their L7R tokens after a confirmation", async () => {
  const id = (await sa.post("/users", { name: "token-holder", password: "token-holder-pw" })).body.id;
  for (let i = 0; i < 2; i++)
    await createUserToken(db().sql, ALL_TENANTS, { userId: id, ttlSeconds: 3600, multiUse: true });
  const tokens = async () => (await db().sql`SELECT count(*)::int AS n FROM user_tokens WHERE user_id = ${id}`)[0]!.n;
  expect(await tokens()).toBe(2);
  const w = await loggedIn(`/users/${id}`);
  await h1(w.page, "token-holder").waitFor();
  await w.page.locator("main").getByRole("button", { name: "Revoke tokens", exact: true }).click();
  const ask = w.page.getByRole("dialog");
  await ask.getByText("Their clients must log in with the password again.").waitFor();
  await ask.getByRole("button", { name: "Revoke tokens", exact: true }).click();
  await w.page.getByText("has no tokens any more").waitFor();
  expect(await tokens()).toBe(0);
  w.assertNoErrors();
});

test("a node's page drains it, then declares it lost with a reason, after confirmations", async () => {
  const id = await liveNode("wat-farm-node");
  const w = await loggedIn(`/hosts/${id}`);
  const main = w.page.locator("main");
  await h1(w.page, "wat-farm-node").waitFor();
  await main.getByRole("button", { name: "Drain", exact: true }).click();
  await w.page.getByRole("dialog").getByRole("button", { name: "Drain", exact: true }).click();
  await main.getByText("draining", { exact: true }).first().waitFor();
  expect((await sa.get(`/hosts/${id}`)).body.drain).toBe(true);
  await main.getByRole("button", { name: "Declare lost", exact: true }).click();
  const ask = w.page.getByRole("dialog");
  await ask.getByRole("button", { name: "Declare lost", exact: true }).click();
  await ask.getByText("Reason: required").waitFor(); // nothing is sent without a reason
  expect((await sa.get(`/hosts/${id}`)).body.state).toBe("running");
  await ask.getByLabel("Reason").fill("rack 4 lost power");
  await ask.getByRole("button", { name: "Declare lost", exact: true }).click();
  await main.getByText(/: rack 4 lost power$/).waitFor();
  expect((await sa.get(`/hosts/${id}`)).body).toMatchObject({
    state: "lost",
    lost_reason: "rack 4 lost power",
    drain: true,
  });
  w.assertNoErrors();
});

test("a KVM OS flavour through the form (hypervisor, vCPUs, a home disk said to be KVM only); its hypervisor stays while it has images; a node shows what it runs", async () => {
  const w = await loggedIn("/osfs");
  await h1(w.page, "OS flavours").waitFor();
  await newButton(w.page).click();
  const form = dialog(w.page, "New OS flavour");
  await form.getByLabel("Name", { exact: true }).fill("kvm-osf");
  await form.getByLabel("Hypervisor", { exact: true }).selectOption("kvm");
  await form.getByLabel("vCPUs (KVM only)").fill("2");
  const home = form.getByLabel("Home disk (MB, KVM only)");
  await home.fill("4096");
  // The hint beside the home disk says whom it concerns.
  expect(
    await form.locator(".field").filter({ hasText: "Home disk (MB, KVM only)" }).locator(".field-hint").textContent(),
  ).toContain("KVM only: size of the user's home disk in MB, 0 = none");
  await form.getByRole("button", { name: "Create" }).click();
  await h1(w.page, "kvm-osf").waitFor();
  const [osf] = await db().sql`SELECT id, hypervisor, vcpus, user_storage_mb FROM osfs WHERE name = 'kvm-osf'`;
  expect(osf).toMatchObject({ hypervisor: "kvm", vcpus: 2, user_storage_mb: 4096 });
  const main = w.page.locator("main");
  await main.getByText("KVM: virtual machines, qcow2 images").waitFor();

  // With an image, a change of the hypervisor is refused with the reason; the OSF stays KVM.
  expect((await sa.post("/dis", { osf_id: osf!.id, path: "kvm-osf.qcow2" })).status).toBe(201);
  await w.page.reload();
  await h1(w.page, "kvm-osf").waitFor();
  await main.getByRole("button", { name: "Edit", exact: true }).click();
  const edit = dialog(w.page, "Edit OS flavour");
  await edit.getByLabel("Hypervisor", { exact: true }).selectOption("lxc");
  await edit.getByRole("button", { name: "Save" }).click();
  await edit
    .getByText('OSF "kvm-osf" has disk images: the hypervisor decides their kind; delete them or make a new OSF')
    .waitFor();
  expect((await db().sql`SELECT hypervisor FROM osfs WHERE id = ${osf!.id}`)[0]!.hypervisor).toBe("kvm");
  await edit.getByRole("button", { name: "Cancel" }).click();

  // The list filters by hypervisor.
  expect((await sa.post("/osfs", { name: "lxc-osf-w" })).status).toBe(201);
  await w.goto("/osfs?hypervisor=kvm");
  await h1(w.page, "OS flavours").waitFor();
  await loaded(w.page);
  await main.getByRole("link", { name: "kvm-osf", exact: true }).waitFor();
  expect(await main.getByRole("link", { name: "lxc-osf-w", exact: true }).count()).toBe(0);

  // A node's page: the kinds of desktop it runs, with its probes' notes.
  const node = await liveNode("wat-kvm-node");
  await db()
    .sql`UPDATE host_runtimes SET hypervisors = '{kvm,lxc}', hypervisor_notes = 'kvm: tcg: /dev/kvm missing' WHERE host_id = ${node}`;
  await w.goto(`/hosts/${node}`);
  await h1(w.page, "wat-kvm-node").waitFor();
  await main.getByText(/^KVM, LXC \(kvm: tcg: \/dev\/kvm missing\)$/).waitFor();
  w.assertNoErrors([/status of 409\b/]);
});

test("server validation errors appear beside their fields", async () => {
  expect((await sa.post("/users", { name: "taken" })).status).toBe(201);
  const w = await loggedIn("/users");
  await h1(w.page, "Users").waitFor();
  await newButton(w.page).click();
  const form = dialog(w.page, "New user");
  await form.getByLabel("Name", { exact: true }).fill("taken");
  await form.getByRole("button", { name: "Create" }).click();
  const name = form.getByLabel("Name", { exact: true });
  await form.locator(".field-invalid").waitFor();
  expect(await name.getAttribute("aria-invalid")).toBe("true");
  const err = await w.page.locator(`[id="${await name.getAttribute("aria-describedby")}"]`).textContent();
  expect(err).toMatch(/exists|taken|unique/i);
  await w.screenshot("form-error");
  // Nothing was created.
  const [n] = await db().sql`SELECT count(*)::int AS n FROM users WHERE name = 'taken'`;
  expect(n!.n).toBe(1);
  await form.getByRole("button", { name: "Cancel" }).click();

  // A VM without its user: the error is the User field's.
  await nav(w.page, "Virtual machines").click();
  await h1(w.page, "Virtual machines").waitFor();
  await newButton(w.page).click();
  const vmForm = dialog(w.page, "New virtual machine");
  await vmForm.getByLabel("Name", { exact: true }).fill("orphan");
  await vmForm.getByRole("button", { name: "Create" }).click();
  const user = vmForm.getByLabel("User", { exact: true });
  await vmForm.locator(".field-invalid").first().waitFor();
  expect(await user.getAttribute("aria-invalid")).toBe("true");
  expect(await vmForm.getByLabel("Name", { exact: true }).getAttribute("aria-invalid")).toBeNull();
  w.assertNoErrors([/status of 4(00|09|22)\b/]);
});

test("keyboard only: from the login to a list and into a detail page", async () => {
  expect((await sa.post("/users", { name: "keyboard-kate" })).status).toBe(201);
  const w = await browser().open(api);
  await w.goto();
  await w.page.getByRole("button", { name: "Log in" }).waitFor();
  await w.page.keyboard.type(TEST_ADMIN.name);
  await w.page.keyboard.press("Tab");
  await w.page.keyboard.type(TEST_ADMIN.password);
  await w.page.keyboard.press("Enter");
  await h1(w.page, "Dashboard").waitFor();
  // Tab until the Users link has the focus (bounded), then Enter.
  const focused = () => w.page.evaluate(() => document.activeElement?.textContent?.trim() ?? "");
  for (let i = 0; i < 30 && (await focused()) !== "Users"; i++) await w.page.keyboard.press("Tab");
  expect(await focused()).toBe("Users");
  await w.page.keyboard.press("Enter");
  await h1(w.page, "Users").waitFor();
  for (let i = 0; i < 60 && (await focused()) !== "keyboard-kate"; i++) await w.page.keyboard.press("Tab");
  expect(await focused()).toBe("keyboard-kate");
  await w.page.keyboard.press("Enter");
  await h1(w.page, "keyboard-kate").waitFor();
  w.assertNoErrors();
});

test("screenshots of the main screens at 1280×800, each without errors", async () => {
  const w = await loggedIn();
  const screens: [file: string, nav: string, title: string][] = [
    ["dashboard", "Dashboard", "Dashboard"],
    ["users", "Users", "Users"],
    ["vms", "Virtual machines", "Virtual machines"],
    ["nodes", "Nodes", "Nodes"],
    ["osfs", "OS flavours", "OS flavours"],
    ["images", "Images", "Images"],
    ["administrators", "Administrators", "Administrators"],
    ["roles", "Roles", "Roles"],
    ["properties", "Properties", "Properties"],
    ["config", "Configuration", "Configuration"],
    ["audit", "Audit log", "Audit log"],
  ];
  for (const [file, label, title] of screens) {
    await nav(w.page, label).click();
    await h1(w.page, title).waitFor();
    await loaded(w.page);
    await w.screenshot(file);
  }
  const [alice] = await db().sql`SELECT id FROM users WHERE name = 'alice'`;
  await w.goto(`/users/${alice!.id}`);
  await h1(w.page, "alice").waitFor();
  await loaded(w.page);
  await w.screenshot("user-detail");
  w.assertNoErrors();
});
