// Administrators of the admin plane. Those of tenant 0 are superadministrators.
import { z } from "zod";
import { checkPassword, passwordColumns } from "./schema.ts";
import { ValidationError } from "./errors.ts";
import { description, get, language, loginName, password, timestamp, type ObjectDef, type Scope } from "./objects.ts";
import { roles } from "./roles.ts";
import type { Db } from "./pool.ts";

export const AdministratorRow = z.object({
  id: z.number().int(),
  tenant_id: z.number().int(),
  tenant_name: z.string(),
  name: z.string(),
  description: z.string(),
  blocked: z.boolean(),
  language,
  superadmin: z.boolean(),
  roles: z.array(z.string()),
  created_at: timestamp,
  updated_at: timestamp,
});
export type AdministratorRow = z.infer<typeof AdministratorRow>;

export const AdministratorCreate = z.object({
  tenant_id: z.number().int().min(0).optional(),
  name: loginName,
  password,
  description: description.optional(),
  language: language.optional(),
  blocked: z.boolean().optional(),
});
export const AdministratorUpdate = AdministratorCreate.omit({ tenant_id: true }).partial();

export const administrators: ObjectDef<AdministratorRow> = {
  kind: "administrator",
  table: "administrators",
  view: "administrator_view",
  row: AdministratorRow,
  create: AdministratorCreate,
  update: AdministratorUpdate,
  tenancy: "own",
  toColumns: passwordColumns,
};

/** Checks an administrator's password; returns the administrator or undefined. */
export async function verifyAdministrator(
  db: Db,
  tenantId: number,
  name: string,
  plain: string,
): Promise<AdministratorRow | undefined> {
  const [r] = await db`SELECT id, password_hash FROM administrators WHERE tenant_id = ${tenantId} AND name = ${name}`;
  if (!(await checkPassword(plain, r?.password_hash))) return undefined;
  const [row] = await db`SELECT * FROM administrator_view WHERE id = ${r!.id}`;
  return AdministratorRow.parse(row);
}

/** Gives an administrator a role of their tenant or of the global scope. */
export async function assignRole(db: Db, scope: Scope, administratorId: number, roleId: number): Promise<void> {
  const admin = await get(db, administrators, scope, administratorId);
  const role = await get(db, roles, scope, roleId);
  if (role.tenant_id !== 0 && role.tenant_id !== admin.tenant_id)
    throw new ValidationError("role_id", `role ${JSON.stringify(role.name)} belongs to another tenant`);
  await db`INSERT INTO administrator_roles (administrator_id, role_id) VALUES (${administratorId}, ${roleId}) ON CONFLICT DO NOTHING`;
}

export async function unassignRole(db: Db, scope: Scope, administratorId: number, roleId: number): Promise<boolean> {
  await get(db, administrators, scope, administratorId);
  const rows =
    await db`DELETE FROM administrator_roles WHERE administrator_id = ${administratorId} AND role_id = ${roleId} RETURNING role_id`;
  return rows.length > 0;
}
