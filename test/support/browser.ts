// Real Chromium for the WAT tests (playwright-core, the system's /usr/bin/chromium). One browser
// per test file, a fresh context (own cookies and storage) per test. Every page collects console
// errors and uncaught exceptions so a test can assert there were none; screenshots go to
// .test-output/wat/<name>.png.
//   const browser = useBrowser();
//   test("…", async () => {
//     const w = await browser().open(api);          // a new context and page on the WAT
//     await w.login(TEST_ADMIN.name, TEST_ADMIN.password);
//     …
//     w.assertNoErrors();
//   });
import { afterAll, afterEach, beforeAll } from "bun:test";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium, type Browser, type BrowserContext, type Page } from "playwright-core";
import type { TestApi } from "./api.ts";

export const CHROMIUM = "/usr/bin/chromium";
// No internet here: without these Chromium stalls on updates, sync and QUIC probes.
export const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

export const SCREENSHOTS = join(import.meta.dir, "..", "..", ".test-output", "wat");

/**
 * Chromium with a fresh temporary profile (playwright creates it and removes it on close).
 * `netns`: run it in that network namespace (a test's own), where its 127.0.0.1 is the namespace's.
 */
export function launchChromium(o: { netns?: string; args?: string[] } = {}): Promise<Browser> {
  let executablePath = CHROMIUM;
  let wrapper: string | undefined;
  if (o.netns) {
    if (!/^[\w.-]+$/.test(o.netns)) throw new Error(`bad namespace name ${o.netns}`);
    wrapper = mkdtempSync(join(tmpdir(), "qvd-chromium-"));
    executablePath = join(wrapper, "chromium");
    writeFileSync(executablePath, `#!/bin/sh\nexec nsenter --net=/run/netns/${o.netns} -- ${CHROMIUM} "$@"\n`, {
      mode: 0o755,
    });
  }
  const launched = chromium.launch({ executablePath, args: [...CHROMIUM_ARGS, ...(o.args ?? [])] });
  if (wrapper) {
    const dir = wrapper;
    void launched.then(
      (b) => b.on("disconnected", () => rmSync(dir, { recursive: true, force: true })),
      () => rmSync(dir, { recursive: true, force: true }),
    );
  }
  return launched;
}

/** The origin a TestApi serves (its url ends in /api/v1). */
export const originOf = (api: TestApi | string) => new URL(typeof api === "string" ? api : api.url).origin;

export interface WatPage {
  page: Page;
  context: BrowserContext;
  origin: string;
  /** Console errors and page errors seen so far (texts). */
  errors: string[];
  /** Loads /wat<path> (default the dashboard). */
  goto(path?: string): Promise<void>;
  /** Fills the login form and waits for the app shell (the "Log out" button). */
  login(name: string, password: string, tenant?: string): Promise<void>;
  /** Saves .test-output/wat/<name>.png of the viewport. */
  screenshot(name: string): Promise<string>;
  /** Fails when a console error or page error was seen, except those matching `expected`. */
  assertNoErrors(expected?: RegExp[]): void;
}

export interface BrowserHarness {
  browser: Browser;
  open(api: TestApi | string, opts?: { viewport?: { width: number; height: number } }): Promise<WatPage>;
}

/** A new context and page on the WAT of `api` (useBrowser's `open`, for scripts without bun:test). */
export async function openWatPage(
  browser: Browser,
  api: TestApi | string,
  opts: { viewport?: { width: number; height: number } } = {},
): Promise<WatPage> {
  const origin = originOf(api);
  const context = await browser.newContext({
    viewport: opts.viewport ?? { width: 1280, height: 800 },
    baseURL: origin,
  });
  // Fail in seconds rather than at the test's timeout, so the failing step is the one reported.
  context.setDefaultTimeout(15_000);
  const page = await context.newPage();
  const errors: string[] = [];
  page.on("console", (m) => {
    if (m.type() === "error") errors.push(`console: ${m.text()}${m.location().url ? ` (${m.location().url})` : ""}`);
  });
  page.on("pageerror", (e) => errors.push(`page error: ${e.message}`));
  const w: WatPage = {
    page,
    context,
    origin,
    errors,
    async goto(path = "/") {
      await page.goto(`${origin}/wat${path}`);
    },
    async login(name, password, tenant) {
      if (!page.url().startsWith(`${origin}/wat`)) await w.goto();
      if (tenant !== undefined) await page.getByLabel("Tenant").fill(tenant);
      await page.getByLabel("Name", { exact: true }).fill(name);
      await page.getByLabel("Password", { exact: true }).fill(password);
      await page.getByRole("button", { name: "Log in" }).click();
      await page.getByRole("button", { name: "Log out" }).waitFor();
    },
    async screenshot(name) {
      mkdirSync(SCREENSHOTS, { recursive: true });
      const path = join(SCREENSHOTS, `${name}.png`);
      await page.screenshot({ path });
      return path;
    },
    assertNoErrors(expected = []) {
      const unexpected = errors.filter((e) => !expected.some((r) => r.test(e)));
      if (unexpected.length) throw new Error(`errors in the browser:\n${unexpected.join("\n")}`);
    },
  };
  return w;
}

/** A browser for this test file: launched before the first test, contexts closed after each. */
export function useBrowser(): () => BrowserHarness {
  let browser: Browser | undefined;
  const contexts: BrowserContext[] = [];
  beforeAll(async () => {
    browser = await launchChromium();
  });
  afterEach(async () => {
    for (const c of contexts.splice(0)) await c.close().catch(() => {});
  });
  afterAll(async () => {
    await browser?.close();
  });
  return () => {
    if (!browser) throw new Error("browser not ready (use it inside a test)");
    const b = browser;
    return {
      browser: b,
      async open(api, opts) {
        const w = await openWatPage(b, api, opts);
        contexts.push(w.context);
        return w;
      },
    };
  };
}

/** Chromium logs a failed request ("… status of 401 …") as a console error; a test expecting one says so. */
export const HTTP_STATUS = (status: number) =>
  new RegExp(`Failed to load resource: the server responded with a status of ${status}\\b`);

/** The page's level-1 heading named exactly `name`. */
export const h1 = (page: Page, name: string) => page.getByRole("heading", { level: 1, name, exact: true });

/** Resolves once the page shows no loading indicator. */
export const loaded = (page: Page) => page.waitForFunction(() => !document.querySelector(".loading"));
