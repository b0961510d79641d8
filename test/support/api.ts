// A live admin API for tests: the real server (Elysia on Bun.serve, plain HTTP on loopback)
// over a test database, and a small client that logs in and calls it.
//   const db = useTestDatabase();
//   const { api, sa, admin } = useTestApi(db, { "wat.multitenant": "1" }); // started before the first test, stopped after the last
//   test("…", async () => {
//     const u = await ok(sa.post("/users", { name: "bob" }), 201);          // sa: the superadmin, logged in
//     const boss = (await admin("boss", { tenantId: 1, roles: ["Operator"] })).client;
//   });
// `startTestApi` is the same server for a test that starts its own.
import { afterAll, beforeAll } from "bun:test";
import { loadConfig } from "../../src/config.ts";
import { createApi } from "../../src/api/server.ts";
import { ok } from "./assert.ts";
import { TEST_ADMIN, type TestDatabase } from "./db.ts";

export interface ApiResponse<T = any> {
  status: number;
  body: T;
  headers: Headers;
}

export class ApiClient {
  /** `base`: the API's URL (…/api/v1); empty for a client bound later (useTestApi's superadmin). */
  constructor(
    public base: string,
    public token?: string,
  ) {}

  async call<T = any>(
    method: string,
    path: string,
    body?: unknown,
    headers: Record<string, string> = {},
  ): Promise<ApiResponse<T>> {
    if (!this.base) throw new Error("the test API is not started yet (use the client inside a test or a hook)");
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

  /** A request as it is (a raw or streamed body, a signal) with the session's token; fetch's Response. */
  request(path: string, init: RequestInit & { headers?: Record<string, string> } = {}): Promise<Response> {
    if (!this.base) throw new Error("the test API is not started yet (use the client inside a test or a hook)");
    return fetch(this.base + path, {
      ...init,
      headers: { ...(this.token ? { authorization: `Bearer ${this.token}` } : {}), ...init.headers },
    });
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
    flags: [
      { flag: "--db", key: "database.url", value: db.url },
      ...Object.entries(settings).map(([key, value]) => ({ flag: `--set ${key}`, key, value })),
    ],
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

/** The id of the role named `name` as `client` sees it (the first match; a built-in one or one a test made). */
export async function roleId(client: ApiClient, name: string): Promise<number> {
  const items = (await ok(client.get(`/roles?name=${encodeURIComponent(name)}`))).items;
  if (!items.length) throw new Error(`no role named ${name}`);
  return items[0].id;
}

export interface NewAdmin {
  /** Its tenant (0: the global scope; none: the API's default, the default tenant). */
  tenantId?: number;
  /** Roles to give it: ids, or names of roles. */
  roles?: (number | string)[];
  /** Default `${name}-password`. */
  password?: string;
}

/** Makes an administrator through `by` (normally the superadmin) and gives it its roles; its id. */
export async function createAdmin(by: ApiClient, name: string, o: NewAdmin): Promise<number> {
  const a = await ok(
    by.post("/administrators", { tenant_id: o.tenantId, name, password: o.password ?? `${name}-password` }),
    201,
  );
  for (const r of o.roles ?? [])
    await ok(by.post(`/administrators/${a.id}/roles`, { role_id: typeof r === "number" ? r : await roleId(by, r) }));
  return a.id;
}

export interface LiveApi {
  /** The server: its url, an anonymous client, login and stop (stopped for you after the last test). */
  api: TestApi;
  /** The superadmin, logged in before the first test. */
  sa: ApiClient;
  /** The id of the role named `name`, as the superadmin sees it. */
  roleId(name: string): Promise<number>;
  /** An administrator made by the superadmin (see createAdmin), logged in to the tenant named `tenant` (none: the default). */
  admin(name: string, o: NewAdmin & { tenant?: string }): Promise<{ id: number; client: ApiClient }>;
}

/**
 * A live API for this test file (or describe block) on `db`, with `settings` (or a function
 * giving them, called when it starts): started and the superadmin logged in (to `o.tenant`, when
 * given) before the first test, stopped after the last. `api` and `sa` may be taken at once;
 * they work from the first hook on.
 */
export function useTestApi(
  db: () => TestDatabase,
  settings: Record<string, string> | (() => Record<string, string>) = {},
  o: { tenant?: string } = {},
): LiveApi {
  let live: TestApi | undefined;
  const need = (): TestApi => {
    if (!live) throw new Error("the test API is not started yet (use it inside a test or a hook)");
    return live;
  };
  const sa = new ApiClient("");
  const api: TestApi = {
    get url() {
      return need().url;
    },
    get anonymous() {
      return need().anonymous;
    },
    login: (name, password, tenant) => need().login(name, password, tenant),
    async stop() {
      const l = live;
      live = undefined;
      sa.base = "";
      await l?.stop();
    },
  };
  beforeAll(async () => {
    live = await startTestApi(db(), typeof settings === "function" ? settings() : settings);
    const c = await live.login(TEST_ADMIN.name, TEST_ADMIN.password, o.tenant);
    sa.base = c.base;
    sa.token = c.token;
  });
  afterAll(() => api.stop());
  return {
    api,
    sa,
    roleId: (name) => roleId(sa, name),
    async admin(name, a) {
      const id = await createAdmin(sa, name, a);
      return { id, client: await api.login(name, a.password ?? `${name}-password`, a.tenant) };
    },
  };
}
