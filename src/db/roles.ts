// Roles: named sets of ACL grants and denials that inherit other roles. The effective ACL set
// of a role or an administrator is computed here, in one place:
//   eff(R) = own grants(R) ∪ ⋃ eff(P) for each inherited P − own denials(R)
import { z } from "zod";
import { DataError, ValidationError } from "./errors.ts";
import { description, get, timestamp, type ObjectDef, type Scope } from "./objects.ts";
import type { Db } from "./pool.ts";

export const RoleRow = z.object({
  id: z.number().int(),
  tenant_id: z.number().int(),
  tenant_name: z.string(),
  name: z.string(),
  description: z.string(),
  builtin: z.boolean(),
  inherits: z.array(z.string()),
  grants: z.array(z.string()),
  denials: z.array(z.string()),
  created_at: timestamp,
  updated_at: timestamp,
});
export type RoleRow = z.infer<typeof RoleRow>;

export const RoleCreate = z.object({
  tenant_id: z.number().int().min(0).optional(),
  name: z.string().min(1).max(64),
  description: description.optional(),
});
export const RoleUpdate = RoleCreate.omit({ tenant_id: true }).partial();

export const roles: ObjectDef<RoleRow> = {
  kind: "role",
  table: "roles",
  view: "role_view",
  row: RoleRow,
  create: RoleCreate,
  update: RoleUpdate,
  tenancy: "shared",
  readOnly: (row) =>
    row.builtin
      ? `role ${JSON.stringify(row.name)} is built in and cannot be changed; make a role that inherits it`
      : undefined,
  dependents: [
    { label: "administrators", table: "administrator_roles", column: "role_id", idColumn: "administrator_id" },
    { label: "roles that inherit it", table: "role_inheritance", column: "inherits_id", idColumn: "role_id" },
  ],
};

async function writableRole(db: Db, scope: Scope, roleId: number): Promise<z.infer<typeof RoleRow>> {
  const role = await get(db, roles, scope, roleId);
  // Refused like any other change of a read-only or global object (see checkWritable): 403.
  if (role.builtin) throw new DataError(roles.readOnly!(role, "update")!, 403);
  if (scope.tenantId !== null && role.tenant_id === 0)
    throw new DataError("global roles can only be changed by a superadministrator", 403);
  return role;
}

/** Grants (positive) or denies (negative) one ACL in a role. */
export async function setRoleAcl(db: Db, scope: Scope, roleId: number, acl: string, positive: boolean): Promise<void> {
  await writableRole(db, scope, roleId);
  const [known] = await db`SELECT 1 FROM acls WHERE name = ${acl}`;
  if (!known) throw new ValidationError("acl", `unknown ACL "${acl}"`);
  await db`INSERT INTO role_acls (role_id, acl, positive) VALUES (${roleId}, ${acl}, ${positive})
           ON CONFLICT (role_id, acl) DO UPDATE SET positive = EXCLUDED.positive`;
}

/** Removes a role's own grant or denial of an ACL (it may still be inherited). */
export async function clearRoleAcl(db: Db, scope: Scope, roleId: number, acl: string): Promise<boolean> {
  await writableRole(db, scope, roleId);
  const rows = await db`DELETE FROM role_acls WHERE role_id = ${roleId} AND acl = ${acl} RETURNING acl`;
  return rows.length > 0;
}

/** Makes `roleId` inherit `parentId`. Cycles are refused (also by the database). */
export async function addInheritance(db: Db, scope: Scope, roleId: number, parentId: number): Promise<void> {
  const role = await writableRole(db, scope, roleId);
  const parent = await get(db, roles, scope, parentId);
  if (parent.tenant_id !== 0 && parent.tenant_id !== role.tenant_id)
    throw new ValidationError("inherits", `role ${JSON.stringify(parent.name)} belongs to another tenant`);
  if (roleId === parentId) throw new ValidationError("inherits", "a role cannot inherit itself");
  try {
    await db`INSERT INTO role_inheritance (role_id, inherits_id) VALUES (${roleId}, ${parentId}) ON CONFLICT DO NOTHING`;
  } catch (err) {
    if ((err as { code?: string }).code === "23514")
      throw new ValidationError(
        "inherits",
        `role ${JSON.stringify(role.name)} cannot inherit ${JSON.stringify(parent.name)}: that would make a cycle`,
      );
    throw err;
  }
}

export async function removeInheritance(db: Db, scope: Scope, roleId: number, parentId: number): Promise<boolean> {
  await writableRole(db, scope, roleId);
  const rows =
    await db`DELETE FROM role_inheritance WHERE role_id = ${roleId} AND inherits_id = ${parentId} RETURNING role_id`;
  return rows.length > 0;
}

interface RoleGraph {
  grants: Map<number, Set<string>>;
  denials: Map<number, Set<string>>;
  parents: Map<number, number[]>;
}

/** Loads grants and inheritance of the roles reachable from `roots`. */
async function loadGraph(db: Db, roots: number[]): Promise<RoleGraph> {
  const g: RoleGraph = { grants: new Map(), denials: new Map(), parents: new Map() };
  if (roots.length === 0) return g;
  const reach = await db`WITH RECURSIVE up(id) AS (
      SELECT unnest(${roots}::int[])
      UNION SELECT ri.inherits_id FROM role_inheritance ri JOIN up ON ri.role_id = up.id)
    SELECT id FROM up`;
  const ids = reach.map((r) => r.id as number);
  for (const r of await db`SELECT role_id, acl, positive FROM role_acls WHERE role_id = ANY(${ids}::int[])`) {
    const m = r.positive ? g.grants : g.denials;
    if (!m.has(r.role_id)) m.set(r.role_id, new Set());
    m.get(r.role_id)!.add(r.acl);
  }
  for (const r of await db`SELECT role_id, inherits_id FROM role_inheritance WHERE role_id = ANY(${ids}::int[])`) {
    if (!g.parents.has(r.role_id)) g.parents.set(r.role_id, []);
    g.parents.get(r.role_id)!.push(r.inherits_id);
  }
  return g;
}

function effective(g: RoleGraph, role: number, memo: Map<number, Set<string>>, path = new Set<number>()): Set<string> {
  const known = memo.get(role);
  if (known) return known;
  if (path.has(role)) return new Set(); // cannot happen (the database refuses cycles); be safe anyway
  path.add(role);
  const out = new Set(g.grants.get(role) ?? []);
  for (const p of g.parents.get(role) ?? []) for (const a of effective(g, p, memo, path)) out.add(a);
  for (const d of g.denials.get(role) ?? []) out.delete(d);
  path.delete(role);
  memo.set(role, out);
  return out;
}

/** The effective ACLs of one role. */
export async function roleEffectiveAcls(db: Db, roleId: number): Promise<Set<string>> {
  return effective(await loadGraph(db, [roleId]), roleId, new Map());
}

/** The effective ACLs of an administrator: the union over their roles. */
export async function administratorEffectiveAcls(db: Db, administratorId: number): Promise<Set<string>> {
  const rs = await db`SELECT role_id FROM administrator_roles WHERE administrator_id = ${administratorId}`;
  const roots = rs.map((r) => r.role_id as number);
  const g = await loadGraph(db, roots);
  const memo = new Map<number, Set<string>>();
  const out = new Set<string>();
  for (const r of roots) for (const a of effective(g, r, memo)) out.add(a);
  return out;
}

/** A role with its effective ACLs: tells where an inherited or an administrator's ACL comes from. */
export interface RoleWithAcls {
  id: number;
  name: string;
  tenant_id: number;
  tenant_name: string;
  builtin: boolean;
  acls: string[];
}

/** The roles `roleId` inherits directly, each with its effective ACLs (one graph load for all). */
export async function parentRolesWithAcls(db: Db, roleId: number): Promise<RoleWithAcls[]> {
  const rs = await db`SELECT inherits_id AS id FROM role_inheritance WHERE role_id = ${roleId}`;
  return rolesWithAcls(
    db,
    rs.map((r) => r.id as number),
  );
}

/** An administrator's roles, each with its effective ACLs. */
export async function administratorRolesWithAcls(db: Db, administratorId: number): Promise<RoleWithAcls[]> {
  const rs = await db`SELECT role_id AS id FROM administrator_roles WHERE administrator_id = ${administratorId}`;
  return rolesWithAcls(
    db,
    rs.map((r) => r.id as number),
  );
}

async function rolesWithAcls(db: Db, ids: number[]): Promise<RoleWithAcls[]> {
  if (ids.length === 0) return [];
  const g = await loadGraph(db, ids);
  const memo = new Map<number, Set<string>>();
  const rows =
    await db`SELECT r.id, r.name, r.tenant_id, t.name AS tenant_name, r.builtin FROM roles r JOIN tenants t ON t.id = r.tenant_id
                         WHERE r.id = ANY(${ids}::int[]) ORDER BY lower(r.name), r.id`;
  return rows.map((r) => ({
    id: r.id,
    name: r.name,
    tenant_id: r.tenant_id,
    tenant_name: r.tenant_name,
    builtin: r.builtin,
    acls: [...effective(g, r.id, memo)].sort(),
  }));
}

/** Every ACL with its description (the API's /acls). */
export async function listAcls(db: Db): Promise<{ name: string; description: string }[]> {
  return (await db`SELECT name, description FROM acls ORDER BY name`) as unknown as {
    name: string;
    description: string;
  }[];
}
