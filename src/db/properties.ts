// Custom properties: definitions (per tenant, or global in tenant 0) and their values on
// users, VMs, hosts, OSFs and images. The database checks that a definition applies to the
// kind of object and belongs to its tenant.
import { z } from "zod";
import { NotFoundError, translatePgError, ValidationError } from "./errors.ts";
import { checkWritable, description, get, timestamp, type ObjectDef, type Scope } from "./objects.ts";
import type { Db } from "./pool.ts";
import { dis } from "./dis.ts";
import { hosts } from "./hosts.ts";
import { osfs } from "./osfs.ts";
import { users } from "./users.ts";
import { vms } from "./vms.ts";

export const PROPERTY_TARGETS = ["user", "vm", "host", "osf", "di"] as const;
export type PropertyTarget = (typeof PROPERTY_TARGETS)[number];

export const PropertyRow = z.object({
  id: z.number().int(),
  tenant_id: z.number().int(),
  tenant_name: z.string(),
  key: z.string(),
  description: z.string(),
  applies_to: z.array(z.enum(PROPERTY_TARGETS)),
  created_at: timestamp,
});
export type PropertyRow = z.infer<typeof PropertyRow>;

export const PropertyCreate = z.object({
  tenant_id: z.number().int().min(0).optional(),
  key: z.string().regex(/^[A-Za-z0-9_.:-]{1,128}$/, "1 to 128 letters, digits, or _ . : -"),
  description: description.optional(),
  applies_to: z.array(z.enum(PROPERTY_TARGETS)).min(1).optional(),
});
export const PropertyUpdate = PropertyCreate.omit({ tenant_id: true }).partial();

export const properties: ObjectDef<PropertyRow> = {
  kind: "property",
  table: "properties",
  view: "property_view",
  row: PropertyRow,
  create: PropertyCreate,
  update: PropertyUpdate,
  tenancy: "shared",
  label: (row) => JSON.stringify(row.key),
};

const TARGETS: Record<PropertyTarget, { def: ObjectDef<any>; table: string; column: string }> = {
  user: { def: users, table: "user_properties", column: "user_id" },
  vm: { def: vms, table: "vm_properties", column: "vm_id" },
  host: { def: hosts, table: "host_properties", column: "host_id" },
  osf: { def: osfs, table: "osf_properties", column: "osf_id" },
  di: { def: dis, table: "di_properties", column: "di_id" },
};

/** Finds a definition by key visible to an object's tenant (its own first, then global). */
async function definition(db: Db, key: string, tenantId: number): Promise<{ id: number }> {
  const [p] = await db`SELECT id FROM properties WHERE key = ${key} AND tenant_id IN (${tenantId}, 0)
                        ORDER BY tenant_id DESC LIMIT 1`;
  if (!p) throw new ValidationError("key", `no property "${key}" is defined`);
  return p as { id: number };
}

/** Sets a property value on an object the caller can see. */
export async function setPropertyValue(
  db: Db,
  scope: Scope,
  target: PropertyTarget,
  objectId: number,
  key: string,
  value: string,
): Promise<void> {
  const t = TARGETS[target];
  const obj = await get(db, t.def, scope, objectId);
  checkWritable(t.def, scope, obj, "update"); // a node's values are global: superadministrators only
  const p = await definition(db, key, (obj.tenant_id as number | undefined) ?? 0);
  try {
    await db`INSERT INTO ${db(t.table)} ${db({ [t.column]: objectId, property_id: p.id, value })}
             ON CONFLICT (${db(t.column)}, property_id) DO UPDATE SET value = EXCLUDED.value`;
  } catch (err) {
    throw translatePgError(err, "property");
  }
}

export async function deletePropertyValue(
  db: Db,
  scope: Scope,
  target: PropertyTarget,
  objectId: number,
  key: string,
): Promise<void> {
  const t = TARGETS[target];
  const obj = await get(db, t.def, scope, objectId);
  checkWritable(t.def, scope, obj, "update"); // a node's values are global: superadministrators only
  const p = await definition(db, key, (obj.tenant_id as number | undefined) ?? 0);
  const rows =
    await db`DELETE FROM ${db(t.table)} WHERE ${db(t.column)} = ${objectId} AND property_id = ${p.id} RETURNING value`;
  if (rows.length === 0) throw new NotFoundError(`property value`, key);
}

/** All property values of one object, by key. */
export async function propertyValues(
  db: Db,
  scope: Scope,
  target: PropertyTarget,
  objectId: number,
): Promise<Record<string, string>> {
  const t = TARGETS[target];
  await get(db, t.def, scope, objectId);
  const rows = await db`SELECT p.key, v.value FROM ${db(t.table)} v JOIN properties p ON p.id = v.property_id
                         WHERE v.${db(t.column)} = ${objectId} ORDER BY p.key`;
  return Object.fromEntries(rows.map((r) => [r.key, r.value]));
}
