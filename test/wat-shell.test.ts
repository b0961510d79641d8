// The WAT's shell in real Chromium against a live API and PostgreSQL: login (a wrong password
// answered on the form, the right one opening the dashboard), logout, a deep URL that survives
// a reload and a login, the session ended elsewhere, the own password change, the menu button
// on a narrow screen, and keyboard-only use.
import { expect, test } from "bun:test";
import { createHash } from "node:crypto";
import { useTestApi } from "./support/api.ts";
import { HTTP_STATUS, useBrowser } from "./support/browser.ts";
import { TEST_ADMIN, useTestDatabase } from "./support/db.ts";

const db = useTestDatabase();
const browser = useBrowser();
const { api, sa } = useTestApi(db);

test("a wrong password is answered on the login form; the right one opens the dashboard", async () => {
  const w = await browser().open(api);
  await w.goto();
  await w.page.getByRole("heading", { name: "QVD administration" }).waitFor();
  await w.page.getByLabel("Name", { exact: true }).fill(TEST_ADMIN.name);
  await w.page.getByLabel("Password", { exact: true }).fill("not-the-password");
  await w.page.getByRole("button", { name: "Log in" }).click();
  const alert = w.page.getByRole("alert");
  await alert.waitFor();
  expect(await alert.textContent()).toContain("wrong tenant, name or password");
  expect(await w.page.getByRole("button", { name: "Log out" }).count()).toBe(0);

  await w.page.getByLabel("Password", { exact: true }).fill(TEST_ADMIN.password);
  await w.page.getByRole("button", { name: "Log in" }).click();
  await w.page.getByRole("heading", { level: 1, name: "Dashboard" }).waitFor();
  expect(await w.page.getByRole("navigation", { name: "Main" }).getByRole("link", { name: "Dashboard" }).count()).toBe(
    1,
  );
  expect(await w.page.getByRole("link", { name: TEST_ADMIN.name }).count()).toBe(1);
  await w.screenshot("login-dashboard");
  // The refused login is a 401 the browser logs; nothing else.
  w.assertNoErrors([HTTP_STATUS(401)]);
});

test("logout returns to the login; the session is gone on the server and after a reload", async () => {
  const w = await browser().open(api);
  await w.login(TEST_ADMIN.name, TEST_ADMIN.password);
  const before = (await w.context.cookies()).find((c) => c.name === "qvd_session");
  expect(before?.httpOnly).toBe(true);
  await w.page.getByRole("button", { name: "Log out" }).click();
  await w.page.getByRole("button", { name: "Log in" }).waitFor();
  // The old cookie no longer opens a session.
  const probe = await fetch(`${api.url}/session`, { headers: { cookie: `qvd_session=${before!.value}` } });
  expect(probe.status).toBe(401);
  await w.page.reload();
  await w.page.getByRole("button", { name: "Log in" }).waitFor();
  expect(await w.page.getByRole("button", { name: "Log out" }).count()).toBe(0);
  w.assertNoErrors();
});

test("a deep URL is kept through a reload and a login", async () => {
  const w = await browser().open(api);
  await w.goto("/vms?name=desk");
  await w.page.getByRole("button", { name: "Log in" }).waitFor();
  expect(new URL(w.page.url()).pathname).toBe("/wat/vms");
  await w.login(TEST_ADMIN.name, TEST_ADMIN.password);
  const url = new URL(w.page.url());
  expect(url.pathname).toBe("/wat/vms");
  expect(url.searchParams.get("name")).toBe("desk");
  // Logged in, a reload stays there without asking again.
  await w.page.reload();
  await w.page.getByRole("button", { name: "Log out" }).waitFor();
  expect(new URL(w.page.url()).pathname).toBe("/wat/vms");
  w.assertNoErrors();
});

test("a narrow screen folds the navigation behind a Menu button", async () => {
  const w = await browser().open(api, { viewport: { width: 400, height: 800 } });
  await w.login(TEST_ADMIN.name, TEST_ADMIN.password);
  const menu = w.page.getByRole("button", { name: "Menu" });
  const dashboardLink = w.page.getByRole("navigation", { name: "Main" }).getByRole("link", { name: "Dashboard" });
  expect(await menu.isVisible()).toBe(true);
  expect(await menu.getAttribute("aria-expanded")).toBe("false");
  expect(await dashboardLink.isVisible()).toBe(false);
  await menu.click();
  expect(await menu.getAttribute("aria-expanded")).toBe("true");
  await dashboardLink.waitFor({ state: "visible" });
  await w.screenshot("narrow-menu");
  // Nothing wider than the screen: no horizontal scrolling.
  expect(await w.page.evaluate(() => document.documentElement.scrollWidth)).toBeLessThanOrEqual(400);
  // A list too: the page itself does not scroll sideways.
  const user = (await sa.post("/users", { name: "narrow-user" })).body;
  const osf = (await sa.post("/osfs", { name: "narrow-osf" })).body;
  expect((await sa.post("/vms", { user_id: user.id, osf_id: osf.id, name: "a-rather-long-desktop-name" })).status).toBe(
    201,
  );
  await dashboardLink.click();
  await w.goto("/vms");
  await w.page.getByRole("heading", { level: 1, name: "Virtual machines" }).waitFor();
  await w.page.getByRole("checkbox", { name: "Select a-rather-long-desktop-name" }).waitFor();
  expect(await w.page.evaluate(() => document.documentElement.scrollWidth)).toBeLessThanOrEqual(400);
  await w.screenshot("narrow-vms");
  w.assertNoErrors();

  const wide = await browser().open(api);
  await wide.login(TEST_ADMIN.name, TEST_ADMIN.password);
  expect(await wide.page.getByRole("button", { name: "Menu" }).isVisible()).toBe(false);
  wide.assertNoErrors();
});

test("keyboard only: log in with Tab and Enter", async () => {
  const w = await browser().open(api);
  await w.goto();
  await w.page.getByRole("button", { name: "Log in" }).waitFor();
  // The name field has the focus on arrival.
  expect(await w.page.evaluate(() => (document.activeElement as HTMLInputElement | null)?.name)).toBe("name");
  await w.page.keyboard.type(TEST_ADMIN.name);
  await w.page.keyboard.press("Tab");
  await w.page.keyboard.type(TEST_ADMIN.password);
  await w.page.keyboard.press("Enter");
  await w.page.getByRole("heading", { level: 1, name: "Dashboard" }).waitFor();
  w.assertNoErrors();
});

test("a session ended elsewhere: the next action shows the login with the notice, and logging in again goes on there", async () => {
  const w = await browser().open(api);
  await w.goto("/profile");
  await w.login(TEST_ADMIN.name, TEST_ADMIN.password);
  await w.page.getByRole("heading", { level: 1, name: "Your profile" }).waitFor();
  // GET /sessions names a session by the start of its token's SHA-256.
  const cookie = (await w.context.cookies()).find((c) => c.name === "qvd_session")!;
  const sid = createHash("sha256").update(cookie.value).digest("hex").slice(0, 12);
  const sessions = (await sa.get("/sessions")).body.items as {
    id: string;
    source: string;
    administrator_name: string;
  }[];
  expect(sessions.find((s) => s.id === sid)).toMatchObject({ source: "wat", administrator_name: TEST_ADMIN.name });
  expect((await sa.del(`/sessions/${sid}`)).status).toBe(200);

  await w.page.getByRole("navigation", { name: "Main" }).getByRole("link", { name: "Configuration" }).click();
  await w.page.getByRole("button", { name: "Log in" }).waitFor();
  expect(await w.page.getByRole("status").filter({ hasText: "Your session ended" }).count()).toBe(1);
  expect(await w.page.getByRole("button", { name: "Log out" }).count()).toBe(0);
  await w.login(TEST_ADMIN.name, TEST_ADMIN.password);
  await w.page.getByRole("heading", { level: 1, name: "Configuration" }).waitFor();
  expect(new URL(w.page.url()).pathname).toBe("/wat/config");
  // The refused request is the only error.
  w.assertNoErrors([HTTP_STATUS(401)]);
});

test("the profile changes the own password: a wrong current one is refused beside its field", async () => {
  const a = await sa.post("/administrators", { tenant_id: 0, name: "changer", password: "changer-old-pw" });
  expect(a.status).toBe(201);
  const w = await browser().open(api);
  await w.login("changer", "changer-old-pw");
  await w.page.getByRole("link", { name: "changer" }).click();
  await w.page.getByRole("heading", { level: 1, name: "Your profile" }).waitFor();
  const form = w.page.getByRole("form", { name: "Change your password" });
  await form.getByLabel("Current password", { exact: true }).fill("not-my-password");
  await form.getByLabel("New password", { exact: true }).fill("changer-new-pw");
  await form.getByLabel(/^(confirm|repeat)/i).fill("changer-new-pw");
  await form.getByRole("button", { name: "Change password" }).click();
  const current = form.getByLabel("Current password", { exact: true });
  await form.locator(".field-invalid").getByRole("alert").waitFor();
  // The error is the current password's, announced by it.
  expect(await current.getAttribute("aria-invalid")).toBe("true");
  const errId = await current.getAttribute("aria-describedby");
  expect(await w.page.locator(`[id="${errId}"]`).textContent()).toContain("wrong password");
  await w.screenshot("profile-password-error");

  await current.fill("changer-old-pw");
  await form.getByRole("button", { name: "Change password" }).click();
  await w.page.getByText("Your password was changed").waitFor();
  expect(await current.getAttribute("aria-invalid")).toBeNull();
  expect((await api.anonymous.post("/login", { name: "changer", password: "changer-new-pw" })).status).toBe(200);
  expect((await api.anonymous.post("/login", { name: "changer", password: "changer-old-pw" })).status).toBe(401);
  w.assertNoErrors([HTTP_STATUS(422)]);
});

test("a session ended while a live screen is open: the login appears by itself, from the event stream", async () => {
  const w = await browser().open(api);
  await w.login(TEST_ADMIN.name, TEST_ADMIN.password);
  // The dashboard listens to the event stream.
  await w.page.getByRole("region", { name: "Users" }).waitFor();
  const cookie = (await w.context.cookies()).find((c) => c.name === "qvd_session")!;
  const sid = createHash("sha256").update(cookie.value).digest("hex").slice(0, 12);
  expect((await sa.del(`/sessions/${sid}`)).status).toBe(200);
  await w.page.getByRole("button", { name: "Log in" }).waitFor({ timeout: 60_000 });
  expect(await w.page.getByRole("status").filter({ hasText: "Your session ended" }).count()).toBe(1);
  w.assertNoErrors([HTTP_STATUS(401)]);
});
