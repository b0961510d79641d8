// Prometheus metrics (src/metrics.ts): the exposition format, the endpoint's rules, and the
// API's counters through the real `qvd api` binary. The L7R's and the HKD's are scraped in
// test/browser-desktop.test.ts, after a real login, start and connect.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { Registry, serveMetrics } from "../src/metrics.ts";
import { TEST_ADMIN, useTestDatabase } from "./support/db.ts";
import { qvdBinary } from "./support/node.ts";
import { sample } from "./support/prometheus.ts";
import { freePortIn } from "./support/services.ts";
import { waitFor } from "./support/wait.ts";
import { selfSignedCert } from "./support/tls.ts";

describe("the exposition format", () => {
  test("HELP and TYPE once per metric; labels escaped; histograms cumulative with +Inf, sum and count", async () => {
    const r = new Registry();
    const c = r.counter("t_requests_total", "Requests.\nTwo lines.");
    c.inc({ method: "GET", status: "200" });
    c.inc({ method: "GET", status: "200" }, 2);
    c.inc({ path: 'a"b\\c\nd' });
    const h = r.histogram("t_seconds", "Waits.", [0.1, 1]);
    for (const v of [0.05, 0.5, 0.5, 3]) h.observe({ kind: "x" }, v);
    r.gauge("t_open", "Open things.", () => [{ labels: { node: "a" }, value: 3 }]);
    r.gauge("t_broken", "A collection that fails.", () => {
      throw new Error("no database");
    });
    const text = await r.render();
    expect(text).toContain("# HELP t_requests_total Requests.\\nTwo lines.\n# TYPE t_requests_total counter\n");
    expect(sample(text, 't_requests_total{method="GET",status="200"}')).toBe(3);
    expect(sample(text, 't_requests_total{path="a\\"b\\\\c\\nd"}')).toBe(1);
    expect(sample(text, 't_seconds_bucket{kind="x",le="0.1"}')).toBe(1);
    expect(sample(text, 't_seconds_bucket{kind="x",le="1"}')).toBe(3);
    expect(sample(text, 't_seconds_bucket{kind="x",le="+Inf"}')).toBe(4);
    expect(sample(text, 't_seconds_sum{kind="x"}')).toBe(4.05);
    expect(sample(text, 't_seconds_count{kind="x"}')).toBe(4);
    expect(sample(text, 't_open{node="a"}')).toBe(3);
    // A metric that cannot be collected is left out, not the page.
    expect(text).not.toContain("t_broken");
    expect(text.match(/^# TYPE /gm)).toHaveLength(3);
    expect(() => r.counter("t_requests_total", "again")).toThrow(/duplicate/);
    expect(() => r.counter("bad name", "x")).toThrow(/bad/);
  });
});

test("the Grafana dashboard and docs/METRICS.md name only metrics the roles register, and the docs name them all", () => {
  const root = join(import.meta.dir, "..");
  const src = ["src/metrics.ts", "src/l7r/context.ts", "src/hkd/hkd.ts", "src/api/server.ts"]
    .map((f) => readFileSync(join(root, f), "utf8"))
    .join("\n");
  const registered = new Set(
    [...src.matchAll(/\.(?:counter|gauge|histogram|counterFrom)\(\s*"(qvd_[a-z0-9_]+)"/g)].map((m) => m[1]!),
  );
  const base = (n: string) => n.replace(/_(bucket|sum|count)$/, "");
  const dashboard = JSON.parse(readFileSync(join(root, "deploy", "grafana-qvd.json"), "utf8"));
  const used = new Set(
    dashboard.panels.flatMap((p: { targets: { expr: string }[] }) =>
      p.targets.flatMap((t) => [...t.expr.matchAll(/qvd_[a-z0-9_]+/g)].map((m) => base(m[0]))),
    ),
  );
  expect(used.size).toBeGreaterThanOrEqual(10);
  for (const n of used) expect(registered.has(n as string), `${n} in the dashboard`).toBe(true);
  const documented = new Set(
    [...readFileSync(join(root, "docs", "METRICS.md"), "utf8").matchAll(/`(qvd_[a-z0-9_]+)`/g)].map((m) => m[1]!),
  );
  expect([...registered].filter((n) => !documented.has(n))).toEqual([]);
  expect([...documented].filter((n) => !registered.has(n))).toEqual([]);
});

describe("the endpoint", () => {
  let dir = "";
  beforeAll(() => {
    dir = mkdtempSync("/tmp/qvd-metrics-test-");
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  test("off the loopback only with TLS; HTTPS when given a certificate; only GET /metrics", async () => {
    const r = new Registry();
    r.counter("t_hits_total", "Hits.").inc();
    expect(() => serveMetrics(r, "0.0.0.0:0")).toThrow(/need TLS/);
    expect(() => serveMetrics(r, "198.18.0.1:0")).toThrow(/need TLS/);
    expect(() => serveMetrics(r, "nonsense")).toThrow(/host:port/);
    const { cert, key } = await selfSignedCert(dir, { cn: "127.0.0.1", days: 1, names: ["c.pem", "k.pem"] });
    const s = serveMetrics(r, "127.0.0.1:0", { cert, key });
    try {
      const ok = await fetch(`https://127.0.0.1:${s.port}/metrics`, {
        tls: { rejectUnauthorized: false },
      } as RequestInit);
      expect(ok.status).toBe(200);
      expect(ok.headers.get("content-type")).toStartWith("text/plain; version=0.0.4");
      expect(sample(await ok.text(), "t_hits_total")).toBe(1);
      expect(
        (await fetch(`https://127.0.0.1:${s.port}/`, { tls: { rejectUnauthorized: false } } as RequestInit)).status,
      ).toBe(404);
      expect(
        (
          await fetch(`https://127.0.0.1:${s.port}/metrics`, {
            method: "POST",
            tls: { rejectUnauthorized: false },
          } as RequestInit)
        ).status,
      ).toBe(404);
    } finally {
      s.stop();
    }
  });
});

describe("the API's metrics, from the real binary", () => {
  const db = useTestDatabase();
  let proc: Bun.Subprocess | undefined;
  afterAll(() => proc?.kill("SIGKILL"));

  test("a failed and a good administrator login, and requests by status, move the counters; the pools are shown", async () => {
    const [apiPort, metricsPort] = [await freePortIn(), await freePortIn()];
    proc = Bun.spawn(
      [
        await qvdBinary(),
        "api",
        "--db",
        db().url,
        "--insecure-http",
        "--listen",
        `127.0.0.1:${apiPort}`,
        "--set",
        `api.metrics.listen=127.0.0.1:${metricsPort}`,
      ],
      { stdout: "pipe", stderr: "pipe" },
    );
    const metrics = () => fetch(`http://127.0.0.1:${metricsPort}/metrics`).then((r) => r.text());
    await waitFor("the API's metrics", () => metrics().catch(() => undefined), 30_000);
    const api = (path: string, body?: unknown) =>
      fetch(
        `http://127.0.0.1:${apiPort}/api/v1${path}`,
        body === undefined
          ? {}
          : { method: "POST", body: JSON.stringify(body), headers: { "content-type": "application/json" } },
      );
    expect((await api("/login", { name: TEST_ADMIN.name, password: "wrong" })).status).toBe(401);
    expect((await api("/login", { name: TEST_ADMIN.name, password: TEST_ADMIN.password })).status).toBe(200);
    expect((await api("/vms")).status).toBe(401);
    const text = await metrics();
    expect(sample(text, 'qvd_api_logins_total{result="failed"}')).toBe(1);
    expect(sample(text, 'qvd_api_logins_total{result="ok"}')).toBe(1);
    expect(sample(text, 'qvd_api_requests_total{method="POST",status="401"}')).toBe(1);
    expect(sample(text, 'qvd_api_requests_total{method="GET",status="401"}')).toBe(1);
    expect(sample(text, 'qvd_api_request_seconds_count{method="POST"}')).toBe(2);
    expect(sample(text, "qvd_db_pool_max")).toBeGreaterThan(0);
    expect(sample(text, "qvd_db_pool_connections")).toBeGreaterThan(0);
    expect(sample(text, "qvd_db_queries_total")).toBeGreaterThan(0);
    expect(sample(text, "qvd_process_resident_memory_bytes")).toBeGreaterThan(10_000_000);
  }, 120_000);
});
