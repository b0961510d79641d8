// Prometheus metrics: a small registry of counters, gauges and histograms with labels, written
// in the text exposition format (version 0.0.4), and the endpoint that serves them on an
// address of the role's own (`<role>.metrics.listen`, off by default). docs/METRICS.md lists
// every metric; deploy/grafana-qvd.json is a dashboard over them.
import { isIP } from "node:net";
import type { Config } from "./config.ts";
import { poolStats } from "./db/pool.ts";
import { UserError } from "./errors.ts";
import { logger } from "./log.ts";

const log = logger("metrics");

type Labels = Record<string, string>;

/** A label value as the format writes it: backslash, quote and newline escaped. */
const escapeLabel = (v: string) => v.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");
const labelText = (l: Labels) => {
  const e = Object.entries(l);
  return e.length ? `{${e.map(([k, v]) => `${k}="${escapeLabel(v)}"`).join(",")}}` : "";
};
const key = (l: Labels) => JSON.stringify(Object.entries(l).sort());
const num = (n: number) => (Number.isFinite(n) ? String(n) : n > 0 ? "+Inf" : n < 0 ? "-Inf" : "NaN");

interface Metric {
  name: string;
  help: string;
  type: "counter" | "gauge" | "histogram";
  /** The metric's lines (without HELP/TYPE); may query something first. */
  lines(): Promise<string[]> | string[];
}

export class Counter {
  private readonly values = new Map<string, { labels: Labels; value: number }>();
  constructor(readonly name: string) {}
  inc(labels: Labels = {}, by = 1): void {
    const k = key(labels);
    const v = this.values.get(k);
    if (v) v.value += by;
    else this.values.set(k, { labels, value: by });
  }
  get(labels: Labels = {}): number {
    return this.values.get(key(labels))?.value ?? 0;
  }
  lines(): string[] {
    return [...this.values.values()].map((v) => `${this.name}${labelText(v.labels)} ${num(v.value)}`);
  }
}

export class Gauge {
  private readonly values = new Map<string, { labels: Labels; value: number }>();
  constructor(
    readonly name: string,
    private readonly collect?: () => Promise<{ labels: Labels; value: number }[]> | { labels: Labels; value: number }[],
  ) {}
  set(labels: Labels, value: number): void {
    this.values.set(key(labels), { labels, value });
  }
  inc(labels: Labels = {}, by = 1): void {
    const v = this.values.get(key(labels));
    this.set(labels, (v?.value ?? 0) + by);
  }
  dec(labels: Labels = {}, by = 1): void {
    this.inc(labels, -by);
  }
  async lines(): Promise<string[]> {
    const vs = this.collect ? await this.collect() : [...this.values.values()];
    return vs.map((v) => `${this.name}${labelText(v.labels)} ${num(v.value)}`);
  }
}

export class Histogram {
  private readonly values = new Map<string, { labels: Labels; counts: number[]; sum: number; count: number }>();
  constructor(
    readonly name: string,
    readonly buckets: number[],
  ) {}
  observe(labels: Labels, value: number): void {
    const k = key(labels);
    let v = this.values.get(k);
    if (!v) this.values.set(k, (v = { labels, counts: this.buckets.map(() => 0), sum: 0, count: 0 }));
    for (let i = 0; i < this.buckets.length; i++) if (value <= this.buckets[i]!) v.counts[i]!++;
    v.sum += value;
    v.count++;
  }
  lines(): string[] {
    const out: string[] = [];
    for (const v of this.values.values()) {
      for (const [i, b] of this.buckets.entries())
        out.push(`${this.name}_bucket${labelText({ ...v.labels, le: num(b) })} ${v.counts[i]}`);
      out.push(`${this.name}_bucket${labelText({ ...v.labels, le: "+Inf" })} ${v.count}`);
      out.push(
        `${this.name}_sum${labelText(v.labels)} ${num(v.sum)}`,
        `${this.name}_count${labelText(v.labels)} ${v.count}`,
      );
    }
    return out;
  }
}

/** Seconds buckets for waits from tens of milliseconds to minutes (a connect, a cold start). */
export const SECONDS_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300];

export class Registry {
  private readonly metrics: Metric[] = [];

  private add<T extends { lines(): Promise<string[]> | string[] }>(
    name: string,
    help: string,
    type: Metric["type"],
    m: T,
  ): T {
    if (!/^[a-zA-Z_:][a-zA-Z0-9_:]*$/.test(name) || this.metrics.some((x) => x.name === name))
      throw new Error(`bad or duplicate metric name ${name}`);
    this.metrics.push({ name, help, type, lines: () => m.lines() });
    return m;
  }
  counter(name: string, help: string): Counter {
    return this.add(name, help, "counter", new Counter(name));
  }
  gauge(name: string, help: string, collect?: ConstructorParameters<typeof Gauge>[1]): Gauge {
    return this.add(name, help, "gauge", new Gauge(name, collect));
  }
  histogram(name: string, help: string, buckets = SECONDS_BUCKETS): Histogram {
    return this.add(name, help, "histogram", new Histogram(name, buckets));
  }
  /** A counter kept elsewhere (a total some other module counts), read at each scrape. */
  counterFrom(name: string, help: string, collect: () => number): void {
    this.add(name, help, "counter", { lines: () => [`${name} ${num(collect())}`] });
  }

  /** The exposition text. A metric whose collection fails is left out (and logged), not the whole page. */
  async render(): Promise<string> {
    const parts: string[] = [];
    for (const m of this.metrics) {
      let lines: string[];
      try {
        lines = await m.lines();
      } catch (err) {
        log.warn("a metric could not be collected", { metric: m.name, error: (err as Error).message });
        continue;
      }
      parts.push(
        `# HELP ${m.name} ${m.help.replace(/\\/g, "\\\\").replace(/\n/g, "\\n")}`,
        `# TYPE ${m.name} ${m.type}`,
        ...lines,
      );
    }
    return parts.join("\n") + "\n";
  }
}

/** The process's own figures, in every role's registry. */
export function processMetrics(r: Registry): void {
  r.gauge("qvd_process_resident_memory_bytes", "Resident memory of this process.", () => [
    { labels: {}, value: process.memoryUsage.rss() },
  ]);
  const started = Date.now() / 1000;
  r.gauge("qvd_process_start_time_seconds", "Start time of this process (Unix seconds).", () => [
    { labels: {}, value: started },
  ]);
}

/** This process's database pools (src/db/pool.ts poolStats). */
export function databaseMetrics(r: Registry): void {
  r.gauge("qvd_db_pool_connections", "Database connections open in this process's pools.", () => [
    { labels: {}, value: poolStats.open },
  ]);
  r.gauge("qvd_db_pool_max", "Most connections this process's pools may open.", () => [
    { labels: {}, value: poolStats.max },
  ]);
  r.counterFrom("qvd_db_queries_total", "Queries this process sent to the database.", () => poolStats.queries);
}

export interface MetricsServer {
  port: number;
  stop(): void;
}

const isLoopback = (h: string) => h === "localhost" || h === "::1" || (isIP(h) === 4 && h.startsWith("127."));

/**
 * Serves GET /metrics on `listen` (host:port). Off the loopback it must be HTTPS (`tls`): every
 * network hop is TLS, and the figures say who works when.
 */
export function serveMetrics(r: Registry, listen: string, tls?: { cert: string; key: string }): MetricsServer {
  const m = /^(.*):(\d{1,5})$/.exec(listen);
  if (!m) throw new UserError(`metrics listen address ${JSON.stringify(listen)}: expected host:port`);
  const hostname = m[1]!.replace(/^\[(.*)\]$/, "$1") || "0.0.0.0";
  if (!tls && !isLoopback(hostname))
    throw new UserError(
      `metrics on ${listen}: off the loopback the metrics need TLS (set the role's metrics.tls.cert and metrics.tls.key)`,
    );
  const server = Bun.serve({
    hostname,
    port: Number(m[2]),
    ...(tls ? { tls: { cert: Bun.file(tls.cert), key: Bun.file(tls.key) } } : {}),
    async fetch(req) {
      const url = new URL(req.url);
      if (req.method !== "GET" || url.pathname !== "/metrics") return new Response("not found\n", { status: 404 });
      return new Response(await r.render(), {
        headers: { "content-type": "text/plain; version=0.0.4; charset=utf-8" },
      });
    },
    error: () => new Response("internal error\n", { status: 500 }),
  });
  log.info("metrics listening", { address: `${hostname}:${server.port}`, tls: Boolean(tls) });
  return { port: server.port!, stop: () => server.stop(true) };
}

/** A role's registry: its own metrics go on it, with the process's and the database pools'. */
export function roleRegistry(): Registry {
  const r = new Registry();
  processMetrics(r);
  databaseMetrics(r);
  return r;
}

/** Serves a role's registry on its `<role>.metrics.listen` (nothing when empty). */
export function serveRoleMetrics(
  cfg: Config,
  listenKey: "l7r.metrics.listen" | "hkd.metrics.listen" | "api.metrics.listen",
  r: Registry,
): MetricsServer | undefined {
  const listen = cfg.get(listenKey);
  if (!listen) return undefined;
  const cert = cfg.get("metrics.tls.cert");
  const key = cfg.get("metrics.tls.key");
  if (Boolean(cert) !== Boolean(key)) throw new UserError("metrics.tls.cert and metrics.tls.key go together");
  try {
    return serveMetrics(r, listen, cert ? { cert, key } : undefined);
  } catch (err) {
    if (err instanceof UserError) throw new UserError(`${listenKey}: ${err.message}`);
    throw new UserError(`${listenKey}: cannot listen on ${listen}: ${(err as Error).message}`);
  }
}
