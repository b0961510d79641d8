// A live admin API for tests: the real server (Elysia on Bun.serve, plain HTTP on loopback)
// over a test database, and a small client that logs in and calls it.
import { loadConfig } from "../../src/config.ts";
import { createApi } from "../../src/api/server.ts";
import type { TestDatabase } from "./db.ts";

export interface ApiResponse<T = any> {
  status: number;
  body: T;
  headers: Headers;
}

export class ApiClient {
  constructor(readonly base: string, public token?: string) {}

  async call<T = any>(method: string, path: string, body?: unknown, headers: Record<string, string> = {}): Promise<ApiResponse<T>> {
    const res = await fetch(this.base + path, {
      method,
      headers: {
        ...(body !== undefined ? { "content-type": "application/json" } : {}),
        ...(this.token ? { authorization: `Bearer ${this.token}` } : {}),
        ...headers,
      },
      body: body === undefined ? undefined : typeof body === "string" ? body : JSON.stringify(body),
    });
    const text = await res.text();
    let parsed: unknown = text;
    try {
      parsed = JSON.parse(text);
    } catch {}
    return { status: res.status, body: parsed as T, headers: res.headers };
  }

  get = <T = any>(p: string) => this.call<T>("GET", p);
  post = <T = any>(p: string, b?: unknown) => this.call<T>("POST", p, b ?? {});
  patch = <T = any>(p: string, b: unknown) => this.call<T>("PATCH", p, b);
  put = <T = any>(p: string, b: unknown) => this.call<T>("PUT", p, b);
  del = <T = any>(p: string) => this.call<T>("DELETE", p);
}

export interface TestApi {
  url: string;
  anonymous: ApiClient;
  /** Logs in and returns a client holding the session token (throws when login fails). */
  login(name: string, password: string, tenant?: string): Promise<ApiClient>;
  stop(): Promise<void>;
}

export async function startTestApi(db: TestDatabase, settings: Record<string, string> = {}): Promise<TestApi> {
  const cfg = loadConfig({
    env: {},
    defaultFileExists: () => false,
    flags: [{ flag: "--db", key: "database.url", value: db.url }, ...Object.entries(settings).map(([key, value]) => ({ flag: `--set ${key}`, key, value }))],
  });
  const { fetch, hub, idleTimeout } = createApi({ sql: db.sql, cfg, databaseUrl: db.url });
  const server = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch, idleTimeout });
  const url = `http://127.0.0.1:${server.port}/api/v1`;
  return {
    url,
    anonymous: new ApiClient(url),
    async login(name, password, tenant) {
      const c = new ApiClient(url);
      const r = await c.post("/login", { name, password, ...(tenant !== undefined ? { tenant } : {}) });
      if (r.status !== 200) throw new Error(`login of ${name} failed: ${r.status} ${JSON.stringify(r.body)}`);
      c.token = r.body.token;
      return c;
    },
    async stop() {
      await server.stop(true);
      await hub.close();
    },
  };
}
