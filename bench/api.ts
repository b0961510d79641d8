// Admin API benchmark: a database with 10,000 users and 10,000 VMs (1,000 of them running),
// the real API server on loopback, and the figures the issue asks for:
//   - a filtered, sorted page of 100 VMs: median and p99 over many requests;
//   - login (argon2id verification included): median;
//   - a mass stop of 1,000 VMs through one request.
// Prints figures; asserts nothing. Run: bun bench/api.ts [--pages 500]
import { createApi } from "../src/api/server.ts";
import { loadConfig } from "../src/config.ts";
import { setLogLevel } from "../src/log.ts";
import { benchFarm } from "./farm.ts";

setLogLevel("warn");
const PAGES = Number(process.argv[process.argv.indexOf("--pages") + 1]) || 500;
const N = 10_000;

const farm = await benchFarm({ n: N, running: 1000 });
try {
  const { sql, url } = farm;
  console.log(`setup: ${N} users, ${N} VMs (1000 running) in ${farm.setupSeconds.toFixed(1)} s`);

  const cfg = loadConfig({
    env: {},
    defaultFileExists: () => false,
    flags: [{ flag: "--db", key: "database.url", value: url }],
  });
  const { app, hub } = createApi({ sql, cfg, databaseUrl: url });
  const server = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: app.fetch });
  const base = `http://127.0.0.1:${server.port}/api/v1`;
  try {
    const login = async () => {
      const r = await fetch(`${base}/login`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ name: "superadmin", password: "bench-admin-pw" }),
      });
      if (r.status !== 200) throw new Error(`login failed: ${r.status}`);
      return ((await r.json()) as { token: string }).token;
    };
    const loginTimes: number[] = [];
    let token = "";
    for (let i = 0; i < 20; i++) {
      const s = performance.now();
      token = await login();
      loginTimes.push(performance.now() - s);
    }
    const auth = { authorization: `Bearer ${token}` };

    const page = `${base}/vms?vm_state=running&name[like]=desktop-user1%25&sort=-name&limit=100&offset=100`;
    const check = (await (await fetch(page, { headers: auth })).json()) as { total: number; items: unknown[] };
    const pageTimes: number[] = [];
    for (let i = 0; i < 20; i++) await (await fetch(page, { headers: auth })).arrayBuffer(); // warm up
    for (let i = 0; i < PAGES; i++) {
      const s = performance.now();
      const r = await fetch(page, { headers: auth });
      await r.arrayBuffer();
      pageTimes.push(performance.now() - s);
    }
    const plain = `${base}/vms?sort=-name&limit=100`;
    const plainTimes: number[] = [];
    for (let i = 0; i < PAGES; i++) {
      const s = performance.now();
      await (await fetch(plain, { headers: auth })).arrayBuffer();
      plainTimes.push(performance.now() - s);
    }

    const tinyTimes: number[] = [];
    for (let i = 0; i < PAGES; i++) {
      const t = performance.now();
      await (await fetch(`${base}/vms?id=1`, { headers: auth })).arrayBuffer();
      tinyTimes.push(performance.now() - t);
    }
    const s = performance.now();
    const stop = await fetch(`${base}/vms/actions/stop?vm_state=running`, {
      method: "POST",
      headers: { ...auth, "content-type": "application/json" },
      body: "{}",
    });
    const stopBody = (await stop.json()) as { total: number; ok: number };
    const stopMs = performance.now() - s;

    // The same page measured from a separate client process (no shared event loop).
    const client = Bun.spawn(
      [
        process.execPath,
        "-e",
        `
      const url = process.env.URL, auth = { authorization: "Bearer " + process.env.TOKEN }, n = Number(process.env.N);
      for (let i = 0; i < 20; i++) await (await fetch(url, { headers: auth })).arrayBuffer();
      const ts = [];
      for (let i = 0; i < n; i++) { const s = performance.now(); await (await fetch(url, { headers: auth })).arrayBuffer(); ts.push(performance.now() - s); }
      console.log(JSON.stringify(ts));`,
      ],
      { env: { ...process.env, URL: plain, TOKEN: token, N: String(PAGES) }, stdout: "pipe" },
    );
    const remoteTimes = JSON.parse(await new Response(client.stdout).text()) as number[];
    const q = (xs: number[], p: number) =>
      [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(p * xs.length))]!;
    console.log(
      `page of 100 VMs, filtered (state + name LIKE, ${check.total} matches) and sorted: median ${q(pageTimes, 0.5).toFixed(2)} ms, p99 ${q(pageTimes, 0.99).toFixed(2)} ms over ${PAGES} requests`,
    );
    console.log(
      `page of 100 VMs of all ${N}, sorted by name:                      median ${q(plainTimes, 0.5).toFixed(2)} ms, p99 ${q(plainTimes, 0.99).toFixed(2)} ms over ${PAGES} requests`,
    );
    console.log(
      `the same, from a separate client process:              median ${q(remoteTimes, 0.5).toFixed(2)} ms, p99 ${q(remoteTimes, 0.99).toFixed(2)} ms over ${PAGES} requests`,
    );
    console.log(
      `request overhead (auth, ACLs, an empty list):          median ${q(tinyTimes, 0.5).toFixed(2)} ms, p99 ${q(tinyTimes, 0.99).toFixed(2)} ms over ${PAGES} requests`,
    );
    console.log(
      `login (argon2id verify, session, ACLs): median ${q(loginTimes, 0.5).toFixed(1)} ms over ${loginTimes.length}`,
    );
    console.log(
      `mass stop: ${stopBody.ok}/${stopBody.total} VMs commanded in ${(stopMs / 1000).toFixed(2)} s (${(stopMs / stopBody.total).toFixed(2)} ms per VM)`,
    );
  } finally {
    await server.stop(true);
    await hub.close();
  }
} finally {
  await farm.stop();
}
