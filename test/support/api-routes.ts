// Helpers for the admin API tests that walk the route table: objects to aim routes at, a valid
// sample request for every route, and a fingerprint of the database to prove that a refused
// request changed nothing.
import type { Route } from "../../src/api/context.ts";
import { apiRoutes } from "../../src/api/server.ts";
import { EventHub } from "../../src/api/events.ts";
import * as D from "../../src/db/index.ts";
import type { Sql } from "../../src/db/pool.ts";

/** The route table the server is built from (no server or LISTEN connection is started). */
export function routeTable(): Route[] {
  return apiRoutes(new EventHub("postgres://unused"));
}

/** `GET /users/:id` */
export const routeName = (r: Route) => `${r.method} ${r.path}`;

/** The ACLs a route needs for a given body (field ACLs of PATCH routes depend on it). */
export function aclsOf(r: Route, body: unknown): string[] {
  if (typeof r.acl === "function") return r.acl({ body } as never);
  return r.acl ?? [];
}

/** The property every fixture object carries a value of, and the setting fixtures override. */
export const FIXTURE_PROPERTY = "fxprop";
export const FIXTURE_TAG = "extra";
export const FIXTURE_CONFIG = "osf.default.memory";

let fixtureHash: Promise<string> | undefined;
export const FIXTURE_PASSWORD = "fixture-password";

/** Objects a sample request is aimed at. */
export interface Targets {
  /** Tenant of the objects (and of configuration overrides; 0 for the global scope). */
  tenantId: number;
  tenant(): Promise<number>;
  administrator(): Promise<number>;
  role(): Promise<number>;
  user(): Promise<number>;
  osf(): Promise<number>;
  di(): Promise<number>;
  vm(): Promise<number>;
  host(): Promise<number>;
  property(): Promise<number>;
  audit(): Promise<number>;
  session(): Promise<string>;
  /** Ids of the built-in roles by name. */
  builtin(name: string): Promise<number>;
}

/**
 * Creates objects directly in the database, fast (administrators get a precomputed hash).
 * Every object carries what the sub-routes need: a role grants vm.see and inherits Auditor,
 * an administrator has the Auditor role, an image has the tag `extra`, objects of kinds that
 * take properties have a value of `fxprop`.
 */
export class Fixtures implements Targets {
  private n = 0;
  constructor(
    readonly sql: Sql,
    readonly tenantId: number,
    readonly prefix = "fx",
  ) {}

  name(what: string): string {
    return `${this.prefix}-${what}-${++this.n}-${Math.random().toString(36).slice(2, 7)}`;
  }

  async builtin(name: string): Promise<number> {
    const [r] = await this.sql`SELECT id FROM roles WHERE tenant_id = 0 AND name = ${name}`;
    return r!.id;
  }

  /** The global property definition `fxprop`, created once. */
  async propertyDefinition(): Promise<number> {
    await this.sql`INSERT INTO properties (tenant_id, key) VALUES (0, ${FIXTURE_PROPERTY}) ON CONFLICT DO NOTHING`;
    const [r] = await this.sql`SELECT id FROM properties WHERE tenant_id = 0 AND key = ${FIXTURE_PROPERTY}`;
    return r!.id;
  }

  private async withValue(table: string, column: string, id: number): Promise<number> {
    const pid = await this.propertyDefinition();
    await this.sql`INSERT INTO ${this.sql(table)} ${this.sql({ [column]: id, property_id: pid, value: "fixture" })}`;
    return id;
  }

  async tenant(): Promise<number> {
    return (await D.create(this.sql, D.tenants, D.ALL_TENANTS, { name: this.name("tenant") })).id;
  }

  async administrator(): Promise<number> {
    const hash = await (fixtureHash ??= Bun.password.hash(FIXTURE_PASSWORD, { algorithm: "argon2id" }));
    const [r] = await this.sql`INSERT INTO administrators (tenant_id, name, password_hash)
      VALUES (${this.tenantId}, ${this.name("admin")}, ${hash}) RETURNING id`;
    await this
      .sql`INSERT INTO administrator_roles (administrator_id, role_id) VALUES (${r!.id}, ${await this.builtin("Auditor")})`;
    return r!.id;
  }

  async role(): Promise<number> {
    const r = await D.create(this.sql, D.roles, D.ALL_TENANTS, { tenant_id: this.tenantId, name: this.name("role") });
    await D.setRoleAcl(this.sql, D.ALL_TENANTS, r.id, "vm.see", true);
    await D.addInheritance(this.sql, D.ALL_TENANTS, r.id, await this.builtin("Auditor"));
    return r.id;
  }

  async user(): Promise<number> {
    const u = await D.create(this.sql, D.users, D.ALL_TENANTS, { tenant_id: this.tenantId, name: this.name("user") });
    return this.withValue("user_properties", "user_id", u.id);
  }

  async osf(): Promise<number> {
    const o = await D.create(this.sql, D.osfs, D.ALL_TENANTS, {
      tenant_id: this.tenantId,
      name: this.name("osf"),
      memory_mb: 256,
    });
    return this.withValue("osf_properties", "osf_id", o.id);
  }

  async di(): Promise<number> {
    const osf = await this.osf();
    const d = await D.create(this.sql, D.dis, D.ALL_TENANTS, { osf_id: osf, path: `${this.name("di")}.img` });
    await D.tagDi(this.sql, D.ALL_TENANTS, d.id, FIXTURE_TAG);
    return this.withValue("di_properties", "di_id", d.id);
  }

  async vm(): Promise<number> {
    const v = await D.create(this.sql, D.vms, D.ALL_TENANTS, {
      user_id: await this.user(),
      osf_id: await this.osf(),
      name: this.name("vm"),
    });
    return this.withValue("vm_properties", "vm_id", v.id);
  }

  async host(): Promise<number> {
    const name = this.name("host");
    const h = await D.create(this.sql, D.hosts, D.ALL_TENANTS, { name, address: `${name}.example` });
    return this.withValue("host_properties", "host_id", h.id);
  }

  async property(): Promise<number> {
    return (await D.create(this.sql, D.properties, D.ALL_TENANTS, { tenant_id: this.tenantId, key: this.name("prop") }))
      .id;
  }

  async audit(): Promise<number> {
    return D.audit(this.sql, { action: "fixture", tenant_id: this.tenantId, ok: true, source: "system" });
  }

  /** A live session of a new administrator of the tenant; its id as GET /sessions names it. */
  async session(): Promise<string> {
    const admin = await this.administrator();
    await D.createSession(this.sql, { administratorId: admin, ttlSeconds: 3600, source: "api" });
    const [r] = await this.sql`SELECT left(token_hash, 12) AS id FROM admin_sessions WHERE administrator_id = ${admin}`;
    return r!.id;
  }

  /** Makes sure the tenant has an override of FIXTURE_CONFIG (for DELETE /configs/:key). */
  async configOverride(): Promise<void> {
    await D.setConfig(this.sql, this.tenantId, FIXTURE_CONFIG, "2048");
  }
}

/** Fixed objects: every call answers the same id (for requests that must fail). */
export async function fixedTargets(fx: Fixtures): Promise<Targets & Record<string, unknown>> {
  const ids = {
    tenant: fx.tenantId,
    administrator: await fx.administrator(),
    role: await fx.role(),
    user: await fx.user(),
    osf: await fx.osf(),
    di: await fx.di(),
    vm: await fx.vm(),
    host: await fx.host(),
    property: await fx.property(),
    audit: await fx.audit(),
    session: await fx.session(),
  };
  await fx.configOverride();
  return {
    ids,
    tenantId: fx.tenantId,
    tenant: async () => ids.tenant,
    administrator: async () => ids.administrator,
    role: async () => ids.role,
    user: async () => ids.user,
    osf: async () => ids.osf,
    di: async () => ids.di,
    vm: async () => ids.vm,
    host: async () => ids.host,
    property: async () => ids.property,
    audit: async () => ids.audit,
    session: async () => ids.session,
    builtin: (n: string) => fx.builtin(n),
  };
}

export interface Sample {
  method: string;
  /** Path below /api/v1 with its query string. */
  path: string;
  /** A JSON body, or the raw body of an upload. */
  body?: Record<string, unknown> | string;
  /** The object the request is about, when it names one. */
  objectId?: number | string;
}

const KIND_OF_PATH: Record<string, keyof Targets> = {
  tenants: "tenant",
  administrators: "administrator",
  roles: "role",
  users: "user",
  osfs: "osf",
  dis: "di",
  vms: "vm",
  hosts: "host",
  properties: "property",
  audit: "audit",
};

let uniq = 0;
const fresh = (what: string) => `s-${what}-${++uniq}-${Math.random().toString(36).slice(2, 7)}`;

/** Whether a route changes many objects at once by a filter in the query. */
export const isMassRoute = (r: Route) =>
  r.method !== "GET" &&
  !r.path.includes(":") &&
  (r.path.includes("/actions/") || r.method === "PATCH" || r.method === "DELETE");

/** A valid request for a route, aimed at objects of `t` (created as needed). */
export async function sampleRequest(r: Route, t: Targets, opts: { multitenant?: boolean } = {}): Promise<Sample> {
  const seg = r.path.split("/")[1]!;
  const kind = KIND_OF_PATH[seg];
  const withTenant = (b: Record<string, unknown>) => (opts.multitenant ? { tenant_id: t.tenantId, ...b } : b);
  let objectId: number | string | undefined;
  let path = r.path;
  if (path.includes(":id")) {
    if (!kind) throw new Error(`no target kind for ${routeName(r)}`);
    objectId = await (t[kind] as () => Promise<number>)();
    path = path.replace(":id", String(objectId));
  }
  path = path
    .replace(":tag", FIXTURE_TAG)
    .replace(":acl", "vm.see")
    .replace(":parent", String(await t.builtin("Auditor")))
    .replace(":role", String(await t.builtin("Auditor")))
    .replace(":key", seg === "configs" ? FIXTURE_CONFIG : FIXTURE_PROPERTY);
  if (path.includes(":sid")) {
    objectId = await t.session();
    path = path.replace(":sid", objectId);
  }
  let body: Record<string, unknown> | string | undefined;
  const key = `${r.method} ${r.path}`;
  if (r.rawBody) body = "not really a disk image";
  else if (r.method === "POST" && !r.path.includes(":") && !r.path.includes("/actions/")) {
    switch (seg) {
      case "tenants":
        body = { name: fresh("tenant") };
        break;
      case "administrators":
        body = withTenant({ name: fresh("admin"), password: "sample-password-1" });
        break;
      case "roles":
        body = withTenant({ name: fresh("role") });
        break;
      case "users":
        body = withTenant({ name: fresh("user") });
        break;
      case "osfs":
        body = withTenant({ name: fresh("osf") });
        break;
      case "dis":
        body = { osf_id: await t.osf(), path: `${fresh("di")}.img` };
        break;
      case "vms":
        body = { user_id: await t.user(), osf_id: await t.osf(), name: fresh("vm") };
        break;
      case "hosts": {
        const n = fresh("host");
        body = { name: n, address: `${n}.example` };
        break;
      }
      case "properties":
        body = withTenant({ key: fresh("prop") });
        break;
      case "login":
        body = { name: "nobody", password: "wrong-password" };
        break;
      case "logout":
        body = {};
        break;
      default:
        throw new Error(`no sample body for ${key}`);
    }
  } else if (r.method === "PATCH") body = { description: "changed by a sample request" };
  else if (key === "POST /dis/:id/tags") body = { tag: fresh("tag") };
  else if (key === "PUT /roles/:id/acls") body = { acl: "vm.start", positive: true };
  else if (key === "POST /hosts/:id/declare_lost" || key === "POST /hosts/actions/declare_lost")
    body = { reason: "a sample request" };
  else if (key === "POST /roles/:id/inherits" || key === "POST /administrators/:id/roles")
    body = { role_id: await t.builtin("Operator") };
  else if (r.path.endsWith("/properties/:key") && r.method === "PUT") body = { value: "sample value" };
  else if (key === "PUT /configs/:key")
    body = t.tenantId === 0 ? { value: "2048" } : { value: "2048", tenant_id: t.tenantId };
  else if (key === "PUT /session/password")
    body = { current_password: "not-the-password", password: "new-password-123" };
  else if (r.method === "POST") body = {};
  let query = "";
  if (isMassRoute(r)) {
    if (!kind) throw new Error(`no target kind for ${routeName(r)}`);
    objectId = await (t[kind] as () => Promise<number>)();
    query = `?id=${objectId}`;
  } else if (key === "DELETE /configs/:key" && t.tenantId !== 0) query = `?tenant_id=${t.tenantId}`;
  return {
    method: r.method,
    path: path + query,
    ...(body ? { body } : {}),
    ...(objectId !== undefined ? { objectId } : {}),
  };
}

const FINGERPRINT_TABLES = [
  "tenants",
  "administrators",
  "roles",
  "role_acls",
  "role_inheritance",
  "administrator_roles",
  "users",
  "osfs",
  "dis",
  "di_tags",
  "hosts",
  "host_runtimes",
  "vms",
  "vm_runtimes",
  "properties",
  "user_properties",
  "vm_properties",
  "host_properties",
  "osf_properties",
  "di_properties",
  "configs",
  "user_tokens",
];

/** A digest per table of everything but the audit log and session activity. */
export async function fingerprint(sql: Sql): Promise<Record<string, string>> {
  const parts = FINGERPRINT_TABLES.map(
    (t) => `SELECT '${t}' AS t, md5(coalesce(string_agg(x::text, '|' ORDER BY x::text), '')) AS h FROM ${t} x`,
  );
  parts.push(
    `SELECT 'admin_sessions', md5(coalesce(string_agg(token_hash, '|' ORDER BY token_hash), '')) FROM admin_sessions`,
  );
  const rows = await sql.unsafe(parts.join(" UNION ALL "));
  return Object.fromEntries(rows.map((r) => [r.t, r.h]));
}
