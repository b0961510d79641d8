// WAT benchmark in real Chromium, against the real API over a farm of 10,000 users and VMs:
//   - bytes over the wire (compressed, headers included) for the first load of /wat/ to the
//     login form, and on to the dashboard after logging in; a second visit with a warm cache;
//   - time from navigation to the VM list showing its first rows (median of several loads),
//     also when reached from the dashboard through the menu, and the API's time for that page.
// Prints figures; asserts nothing. Run: bun bench/wat.ts [--loads 7]
import type { CDPSession, Page } from "playwright-core";
import { createApi } from "../src/api/server.ts";
import { loadConfig } from "../src/config.ts";
import { setLogLevel } from "../src/log.ts";
import { watAssetList } from "../src/web/assets.ts";
import { launchChromium, openWatPage } from "../test/support/browser.ts";
import { benchFarm } from "./farm.ts";

setLogLevel("warn");
const LOADS = Number(process.argv[process.argv.indexOf("--loads") + 1]) || 7;
const N = 10_000;
const BUDGET = 300 * 1024;

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.floor((s.length - 1) / 2)]! : NaN;
};
const kb = (n: number) => `${(n / 1024).toFixed(1)} KB`;

/** Counts what a page receives, per request, as the network layer sees it (compressed, with headers). */
async function wireCounter(cdp: CDPSession) {
  const reqs = new Map<string, { url: string; type: string; bytes: number; finished: boolean }>();
  await cdp.send("Network.enable");
  cdp.on("Network.requestWillBeSent", (e) =>
    reqs.set(e.requestId, { url: e.request.url, type: e.type ?? "", bytes: 0, finished: false }),
  );
  cdp.on("Network.dataReceived", (e) => {
    const r = reqs.get(e.requestId);
    if (r && !r.finished) r.bytes += e.encodedDataLength;
  });
  cdp.on("Network.loadingFinished", (e) => {
    const r = reqs.get(e.requestId);
    // The total of a finished request, headers included, replaces the running sum.
    if (r) Object.assign(r, { bytes: e.encodedDataLength, finished: true });
  });
  return {
    reset: () => reqs.clear(),
    list: () => [...reqs.values()],
    total: () => [...reqs.values()].reduce((a, r) => a + r.bytes, 0),
  };
}

/** Resolves with performance.now() (ms since the navigation began) when the VM list shows rows. */
async function vmRowsShown(page: Page): Promise<number> {
  const h = await page.waitForFunction(
    () => {
      const rows = document.querySelectorAll("main table tbody tr");
      return rows.length > 0 && Array.from(rows).some((r) => r.textContent?.includes("desktop-"))
        ? performance.now()
        : false;
    },
    undefined,
    { polling: "raf", timeout: 30_000 },
  );
  return (await h.jsonValue()) as number;
}

async function vmPageApiTimes(page: Page): Promise<{ url: string; ms: number }[]> {
  return page.evaluate(() =>
    (performance.getEntriesByType("resource") as PerformanceResourceTiming[])
      .filter((e) => /\/api\/v1\/vms(\?|$)/.test(e.name))
      .map((e) => ({ url: e.name, ms: e.responseEnd - e.startTime })),
  );
}

const farm = await benchFarm({ n: N, running: 1000 });
try {
  console.log(`setup: ${N} users, ${N} VMs (1000 running) in ${farm.setupSeconds.toFixed(1)} s`);
  const cfg = loadConfig({
    env: {},
    defaultFileExists: () => false,
    flags: [{ flag: "--db", key: "database.url", value: farm.url }],
  });
  const { fetch: handler, hub } = createApi({ sql: farm.sql, cfg, databaseUrl: farm.url });
  const server = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: handler, idleTimeout: 0 });
  const origin = `http://127.0.0.1:${server.port}`;
  const browser = await launchChromium();
  try {
    console.log("\nassets in the binary:");
    for (const a of watAssetList())
      console.log(`  ${a.name.padEnd(28)} ${kb(a.size).padStart(10)} raw ${kb(a.gzipped).padStart(10)} gzipped`);

    // First load, empty cache.
    const w = await openWatPage(browser, origin);
    const wire = await wireCounter(await w.context.newCDPSession(w.page));
    await w.goto();
    await w.page.getByRole("button", { name: "Log in" }).waitFor();
    await w.page.waitForLoadState("networkidle");
    const toLogin = wire.total();
    const loginRequests = wire.list();
    await w.login("superadmin", farm.adminPassword);
    await w.page.getByRole("heading", { level: 1, name: "Dashboard" }).waitFor();
    // The dashboard's counts arrive after the heading; the event stream stays open.
    await w.page.waitForTimeout(1500);
    const toDashboard = wire.total();
    const dashboardRequests = wire.list().slice(loginRequests.length);

    // Second visit: the hashed assets come from the cache, index.html is revalidated.
    wire.reset();
    await w.page.reload();
    await w.page.getByRole("heading", { level: 1, name: "Dashboard" }).waitFor();
    await w.page.waitForTimeout(1500);
    const warm = wire.total();

    console.log("\nfirst load, requests:");
    for (const r of [...loginRequests, ...dashboardRequests])
      console.log(
        `  ${r.type.padEnd(12)} ${kb(r.bytes).padStart(10)}  ${new URL(r.url).pathname}${r.finished ? "" : " (open)"}`,
      );

    // The VM list: a full load of /wat/vms (logged in), several times.
    const loads: number[] = [];
    const apiMs: number[] = [];
    let shown = true;
    let total = "";
    try {
      for (let i = 0; i < LOADS; i++) {
        await w.goto("/vms");
        loads.push(await vmRowsShown(w.page));
        apiMs.push(...(await vmPageApiTimes(w.page)).map((e) => e.ms));
      }
      total =
        (await w.page.locator("main").textContent())?.match(
          /[\d,]+ (?:matching|VMs|virtual machines|results?)/i,
        )?.[0] ?? "";
    } catch (err) {
      shown = false;
      console.log(`\nthe VM list did not show rows: ${(err as Error).message.split("\n")[0]}`);
    }

    // The same from the dashboard through the menu (the app already loaded).
    const viaMenu: number[] = [];
    const menuRequestAt: number[] = [];
    if (shown)
      for (let i = 0; i < LOADS; i++) {
        await w.goto("/");
        await w.page.getByRole("heading", { level: 1, name: "Dashboard" }).waitFor();
        const t0 = await w.page.evaluate(() => performance.now());
        await w.page.getByRole("navigation", { name: "Main" }).getByRole("link", { name: "Virtual machines" }).click();
        viaMenu.push((await vmRowsShown(w.page)) - t0);
        const req = (
          await w.page.evaluate(() =>
            performance.getEntriesByType("resource").map((e) => ({ name: e.name, start: e.startTime })),
          )
        )
          .filter((e) => /\/api\/v1\/vms\?/.test(e.name))
          .at(-1);
        if (req) menuRequestAt.push(req.start - t0);
      }

    // The API alone for the page the list asks for, from this process with the browser's session.
    const direct: number[] = [];
    const listUrl = (await vmPageApiTimes(w.page)).at(-1)?.url;
    const cookie = (await w.context.cookies()).find((c) => c.name === "qvd_session");
    if (listUrl && cookie) {
      for (let i = 0; i < 30; i++) {
        const s = performance.now();
        await (
          await fetch(listUrl, { headers: { cookie: `qvd_session=${cookie.value}`, "accept-encoding": "gzip" } })
        ).arrayBuffer();
        direct.push(performance.now() - s);
      }
    }
    // Every API request of one full load of the list, to see where the time goes.
    let listRequests: { url: string; ms: number; start: number }[] = [];
    if (shown) {
      await w.goto("/vms");
      await vmRowsShown(w.page);
      listRequests = await w.page.evaluate(() =>
        (performance.getEntriesByType("resource") as PerformanceResourceTiming[])
          .filter((e) => e.name.includes("/api/v1/"))
          .map((e) => ({ url: e.name, ms: e.responseEnd - e.startTime, start: e.startTime })),
      );
    }
    const errors = w.errors.slice();
    await w.context.close();

    if (listRequests.length) {
      console.log("\nAPI requests of one load of /wat/vms (start after navigation, duration):");
      for (const r of listRequests)
        console.log(
          `  ${r.start.toFixed(0).padStart(6)} ms ${r.ms.toFixed(1).padStart(7)} ms  ${new URL(r.url).pathname}${new URL(r.url).search}`,
        );
    }
    console.log(`\n| ${"figure".padEnd(66)} | value |`);
    console.log(`|${"-".repeat(68)}|-------|`);
    const row = (k: string, v: string) => console.log(`| ${k.padEnd(66)} | ${v} |`);
    row(
      "first load to the login form (compressed, headers incl.)",
      `${kb(toLogin)} (${toLogin <= BUDGET ? "within" : "OVER"} the 300 KB aim)`,
    );
    row(
      "first load through login to the dashboard",
      `${kb(toDashboard)} (${toDashboard <= BUDGET ? "within" : "OVER"} the 300 KB aim)`,
    );
    row("second visit to the dashboard (warm cache)", kb(warm));
    if (shown) {
      row(
        `VM list of ${N} VMs, load of /wat/vms to first rows (median of ${LOADS})`,
        `${median(loads).toFixed(0)} ms (min ${Math.min(...loads).toFixed(0)}, max ${Math.max(...loads).toFixed(0)})`,
      );
      row(
        `VM list from the dashboard via the menu (median of ${LOADS})`,
        `${median(viaMenu).toFixed(0)} ms (its request starts after ${median(menuRequestAt).toFixed(0)} ms)`,
      );
      row("API time of the list's requests, seen by the browser", `${median(apiMs).toFixed(1)} ms median`);
      if (direct.length)
        row("API time of the same page from Bun (30 requests)", `${median(direct).toFixed(1)} ms median`);
      if (total) row("list says", total);
      if (listUrl) row("the list's request", new URL(listUrl).pathname + new URL(listUrl).search);
    }
    if (errors.length) console.log(`\nbrowser errors:\n  ${errors.join("\n  ")}`);
  } finally {
    await browser.close();
    await server.stop(true);
    await hub.close();
  }
} finally {
  await farm.stop();
}
