// The generic REST resources: list/get/create/update/delete and mass update/delete by filter
// for every object of the data layer, with ACLs per verb and per field.
import { z } from "zod";
import { ACLS } from "../auth/acls.ts";
import { DataError, ValidationError } from "../db/errors.ts";
import * as D from "../db/index.ts";
import type { AuditEntry } from "../db/audit.ts";
import type { ObjectDef } from "../db/objects.ts";
import { logger } from "../log.ts";
import type { Ctx, Route } from "./context.ts";
import { listQueryFrom } from "./http.ts";

const log = logger("api");

export interface ResourceSpec {
  /** Path segment: /api/v1/<path>. */
  path: string;
  def: ObjectDef<any>;
  /** ACL prefix, e.g. "user" for user.see, user.create… */
  acl: string;
  /** Fields whose change needs its own ACL instead of <acl>.update. */
  fieldAcls?: Record<string, string>;
  /** Replaces the generic create (e.g. VMs allocate an address). */
  create?: (ctx: Ctx, body: Record<string, unknown>) => Promise<Record<string, unknown>>;
  /** Checks a change of one object before it is made (single and mass changes alike). */
  beforeUpdate?: (ctx: Ctx, objId: number, changes: Record<string, unknown>) => Promise<void>;
  /** Consequences of a change once made (e.g. a new password ends sessions). */
  afterUpdate?: (ctx: Ctx, objId: number, changes: Record<string, unknown>) => Promise<void>;
  /** Checks the deletion of one object before it is made (single and mass deletions alike). */
  beforeDelete?: (ctx: Ctx, objId: number) => Promise<void>;
  deletable?: boolean;
}

const id = (ctx: Ctx, param = "id") => {
  const s = ctx.params[param] ?? "";
  if (!/^\d{1,9}$/.test(s)) throw new DataError(`no such object ${JSON.stringify(s)}`, 404);
  return Number(s);
};

const asObject = (body: unknown): Record<string, unknown> => {
  if (!body || typeof body !== "object" || Array.isArray(body))
    throw new ValidationError(undefined, "the body must be a JSON object");
  return body as Record<string, unknown>;
};

/**
 * No administrator can hand out rights they do not hold: granting an ACL, inheriting a role,
 * assigning one or setting the password of an administrator who holds more needs every ACL it
 * would give. This holds in every tenant, tenant * included: only who holds every ACL is exempt,
 * by holding them.
 */
export function noEscalation(
  ctx: Ctx,
  acls: Iterable<string>,
  what = "you can only give permissions you hold yourself",
): void {
  const missing = [...acls].filter((a) => Object.hasOwn(ACLS, a) && !ctx.admin.acls.has(a)).sort();
  if (missing.length)
    throw new DataError(`${what}; missing: ${missing.slice(0, 10).join(", ")}${missing.length > 10 ? ", …" : ""}`, 403);
}

/**
 * Changing, blocking, deleting or taking a role from an administrator who holds more than the
 * caller (or changing a role that grants more) would let a lesser administrator lock out or
 * demote a stronger one: it needs every ACL the target holds. 404 first for another tenant's.
 */
export async function noPowerOverAdministrator(ctx: Ctx, adminId: number, what: string): Promise<void> {
  await D.get(ctx.sql, D.administrators, ctx.scope, adminId);
  noEscalation(
    ctx,
    await D.administratorEffectiveAcls(ctx.sql, adminId),
    `you can only ${what} administrators whose permissions you hold yourself`,
  );
}

export async function noPowerOverRole(ctx: Ctx, roleId: number, what: string): Promise<void> {
  await D.get(ctx.sql, D.roles, ctx.scope, roleId);
  noEscalation(
    ctx,
    await D.roleEffectiveAcls(ctx.sql, roleId),
    `you can only ${what} roles whose permissions you hold yourself`,
  );
}

/** ACLs needed to change these fields. */
function updateAcls(spec: ResourceSpec, body: unknown): string[] {
  if (!body || typeof body !== "object") return [`${spec.acl}.update`];
  const acls = new Set<string>();
  // Own properties only: a field named "__proto__" or "constructor" is not a field ACL.
  for (const f of Object.keys(body))
    acls.add(spec.fieldAcls && Object.hasOwn(spec.fieldAcls, f) ? spec.fieldAcls[f]! : `${spec.acl}.update`);
  if (acls.size === 0) acls.add(`${spec.acl}.update`);
  return [...acls];
}

/**
 * Fills in the tenant of a new object when a superadmin gives none: in monotenant mode the
 * default tenant (or the global scope for shared objects); in multitenant mode it is required.
 */
function withTenant(ctx: Ctx, spec: ResourceSpec, body: Record<string, unknown>): Record<string, unknown> {
  const t = spec.def.tenancy;
  if (
    ctx.scope.tenantId !== null ||
    spec.def.tenantFrom ||
    (t !== "own" && t !== "shared") ||
    body.tenant_id !== undefined
  )
    return body;
  if (ctx.cfg.get("wat.multitenant")) return body; // the data layer says tenant_id is required
  return { ...body, tenant_id: t === "shared" ? 0 : 1 };
}

function audit(ctx: Ctx, row: Record<string, unknown> | undefined, args?: unknown): void {
  if (row) {
    ctx.audited.object_id = row.id as number;
    ctx.audited.object_name = (row.name ?? row.key ?? row.version) as string | undefined;
    if (typeof row.tenant_id === "number") {
      ctx.audited.tenant_id = row.tenant_id;
      ctx.audited.tenant_name = (row.tenant_name as string | undefined) ?? undefined;
    }
  }
  if (args !== undefined) ctx.audited.arguments = args as Record<string, unknown>;
}

/**
 * Runs `fn` on every object matching the request's filter; one result per object. Besides the
 * request's own entry, each object gets an audit entry under `action` (as if changed alone), so
 * that the object's audit trail shows mass changes too.
 */
export async function forEachMatching(
  ctx: Ctx,
  def: ObjectDef<any>,
  action: string,
  fn: (objId: number) => Promise<unknown>,
): Promise<{
  total: number;
  ok: number;
  failed: number;
  results: { id: number; ok: boolean; status: number; error?: string; result?: unknown }[];
}> {
  const q = listQueryFrom(ctx.url.searchParams);
  if ((q.filters ?? []).length === 0 && !q.all)
    throw new ValidationError("filter", "a change of many objects needs a filter, or all=true to change every one");
  // Only what the per-object audit entries name (not whole rows of up to MAX_LIMIT objects).
  const named = ["name", "key", "version", "tenant_id", "tenant_name"].filter((f) => f in def.row.shape);
  const matching = await D.list(ctx.sql, def, ctx.scope, {
    filters: q.filters,
    sort: [{ field: "id" }],
    limit: D.MAX_LIMIT,
    fields: ["id", ...named],
  });
  const changes = ctx.body && typeof ctx.body === "object" && Object.keys(ctx.body).length ? { changes: ctx.body } : {};
  const results = [];
  const entries: AuditEntry[] = [];
  for (const row of matching.rows) {
    let failure: DataError | undefined;
    try {
      const result = await fn(row.id as number);
      results.push({ id: row.id as number, ok: true, status: 200, ...(result === undefined ? {} : { result }) });
    } catch (err) {
      if (!(err instanceof DataError)) throw err;
      failure = err;
      results.push({ id: row.id as number, ok: false, status: err.status, error: err.message });
    }
    entries.push({
      action,
      object_type: def.kind as AuditEntry["object_type"],
      object_id: row.id as number,
      object_name: (row.name ?? row.key ?? row.version ?? null) as string | null,
      tenant_id: typeof row.tenant_id === "number" ? row.tenant_id : ctx.admin.tenant_id,
      tenant_name:
        typeof row.tenant_id === "number" ? ((row.tenant_name as string | undefined) ?? null) : ctx.admin.tenant_name,
      administrator_id: ctx.admin.id,
      administrator_name: ctx.admin.name,
      superadmin: ctx.admin.superadmin,
      arguments: { many: true, ...changes },
      ok: !failure,
      error: failure?.message ?? null,
      source: ctx.source,
      address: ctx.address ?? null,
    });
  }
  await D.auditMany(ctx.sql, entries).catch((err) =>
    log.error("could not write the audit log", { action, error: (err as Error).message }),
  );
  const ok = results.filter((r) => r.ok).length;
  ctx.audited.arguments = { filter: Object.fromEntries(ctx.url.searchParams), ...changes, matched: results.length, ok };
  return { total: results.length, ok, failed: results.length - ok, results };
}

export function resourceRoutes(spec: ResourceSpec): Route[] {
  const { def, acl, path } = spec;
  const tag = path;
  const kind = def.kind;
  const routes: Route[] = [
    {
      method: "GET",
      path: `/${path}`,
      tag,
      acl: [`${acl}.see`],
      query: "list",
      response: z.object({
        total: z.number().int(),
        limit: z.number().int(),
        offset: z.number().int(),
        items: z.array(def.row),
      }),
      summary: `List ${path}: filter with ?field=value or ?field[op]=value (eq ne lt le gt ge in like null notnull), sort=-field, limit, offset, fields`,
      handler: async (ctx) => {
        const q = listQueryFrom(ctx.url.searchParams);
        const res = await D.list(ctx.sql, def, ctx.scope, q);
        return { total: res.total, limit: q.limit ?? 1000, offset: q.offset ?? 0, items: res.rows };
      },
    },
    {
      method: "GET",
      path: `/${path}/:id`,
      tag,
      acl: [`${acl}.see`],
      summary: `Get one ${kind}`,
      response: def.row,
      handler: (ctx) => D.get(ctx.sql, def, ctx.scope, id(ctx)),
    },
  ];
  if (def.create)
    routes.push({
      method: "POST",
      path: `/${path}`,
      tag,
      acl: [`${acl}.create`],
      body: def.create,
      summary: `Create a ${kind}`,
      response: def.row,
      audit: { action: `${kind}.create`, object: kind },
      handler: async (ctx) => {
        const body = withTenant(ctx, spec, asObject(ctx.body));
        audit(ctx, undefined, body);
        const row = spec.create ? await spec.create(ctx, body) : await D.create(ctx.sql, def, ctx.scope, body);
        audit(ctx, row);
        ctx.set.status = 201;
        return row;
      },
    });
  if (def.update) {
    routes.push({
      method: "PATCH",
      path: `/${path}/:id`,
      tag,
      acl: (ctx) => updateAcls(spec, ctx.body),
      body: def.update.partial(),
      summary: `Change a ${kind}`,
      response: def.row,
      audit: { action: `${kind}.update`, object: kind },
      handler: async (ctx) => {
        audit(ctx, { id: id(ctx) }, ctx.body);
        const changes = asObject(ctx.body);
        await spec.beforeUpdate?.(ctx, id(ctx), changes);
        const row = await D.update(ctx.sql, def, ctx.scope, id(ctx), changes);
        await spec.afterUpdate?.(ctx, id(ctx), changes);
        audit(ctx, row);
        return row;
      },
    });
    routes.push({
      method: "PATCH",
      path: `/${path}`,
      tag,
      acl: (ctx) => updateAcls(spec, ctx.body),
      body: def.update.partial(),
      query: "list",
      summary: `Change every ${kind} matching the filter (query as for the list; all=true for every one); a result per object`,
      audit: { action: `${kind}.update_many`, object: kind },
      handler: async (ctx) => {
        const changes = asObject(ctx.body);
        D.validate(def.update!, changes); // bad changes are one 422, not one per object
        return forEachMatching(ctx, def, `${kind}.update`, async (objId) => {
          await spec.beforeUpdate?.(ctx, objId, changes);
          await D.update(ctx.sql, def, ctx.scope, objId, changes);
          await spec.afterUpdate?.(ctx, objId, changes);
        });
      },
    });
  }
  if (spec.deletable !== false && def.create) {
    routes.push({
      method: "DELETE",
      path: `/${path}/:id`,
      tag,
      acl: [`${acl}.delete`],
      summary: `Delete a ${kind} (409 and what depends on it when something does)`,
      response: z.object({ deleted: def.row }),
      audit: { action: `${kind}.delete`, object: kind },
      handler: async (ctx) => {
        audit(ctx, { id: id(ctx) });
        await spec.beforeDelete?.(ctx, id(ctx));
        const row = await D.remove(ctx.sql, def, ctx.scope, id(ctx));
        audit(ctx, row);
        return { deleted: row };
      },
    });
    routes.push({
      method: "DELETE",
      path: `/${path}`,
      tag,
      acl: [`${acl}.delete`],
      query: "list",
      summary: `Delete every ${kind} matching the filter; a result per object`,
      audit: { action: `${kind}.delete_many`, object: kind },
      handler: (ctx) =>
        forEachMatching(ctx, def, `${kind}.delete`, async (objId) => {
          await spec.beforeDelete?.(ctx, objId);
          await D.remove(ctx.sql, def, ctx.scope, objId);
        }),
    });
  }
  return routes;
}

export const RESOURCES: ResourceSpec[] = [
  { path: "tenants", def: D.tenants, acl: "tenant", fieldAcls: { blocked: "tenant.block" } },
  {
    path: "administrators",
    def: D.administrators,
    acl: "administrator",
    fieldAcls: { password: "administrator.update.password" },
    // Whoever sets a password can log in as that administrator; whoever blocks or deletes one
    // can lock them out: only within the caller's own rights (your own account included).
    beforeUpdate: (ctx, adminId, changes) =>
      noPowerOverAdministrator(ctx, adminId, "password" in changes ? "set the password of" : "change"),
    beforeDelete: (ctx, adminId) => noPowerOverAdministrator(ctx, adminId, "delete"),
    // A new password ends the account's other sessions (an own change keeps the one that made it).
    afterUpdate: async (ctx, adminId, changes) => {
      if ("password" in changes)
        await D.endSessionsOf(ctx.sql, adminId, adminId === ctx.admin.id ? ctx.admin.token : undefined);
    },
  },
  {
    path: "roles",
    def: D.roles,
    acl: "role",
    beforeUpdate: (ctx, roleId) => noPowerOverRole(ctx, roleId, "change"),
    beforeDelete: (ctx, roleId) => noPowerOverRole(ctx, roleId, "delete"),
  },
  {
    path: "users",
    def: D.users,
    acl: "user",
    fieldAcls: { password: "user.update.password", blocked: "user.block" },
    // A new password ends the user's L7R bearer tokens.
    afterUpdate: async (ctx, userId, changes) =>
      void ("password" in changes && (await D.deleteUserTokens(ctx.sql, userId))),
  },
  { path: "osfs", def: D.osfs, acl: "osf" },
  { path: "dis", def: D.dis, acl: "di", fieldAcls: { blocked: "di.block" } },
  {
    path: "vms",
    def: D.vms,
    acl: "vm",
    fieldAcls: { di_tag: "vm.update.di_tag" },
    create: (ctx, body) => {
      const gw = ctx.cfg.get("vm.network.gateway");
      return D.createVm(ctx.sql, ctx.scope, body, { range: ctx.cfg.get("vm.network.range"), gateway: gw || undefined });
    },
  },
  { path: "hosts", def: D.hosts, acl: "host" },
  { path: "properties", def: D.properties, acl: "property" },
  { path: "audit", def: D.auditLog, acl: "audit" },
];

export const idParam = id;
export const objectBody = asObject;
