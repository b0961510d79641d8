// End users of desktops. A user with VMs cannot be deleted (delete the VMs first).
import { z } from "zod";
import { checkPassword, passwordColumns } from "./schema.ts";
import { description, language, loginName, password, timestamp, type ObjectDef } from "./objects.ts";
import type { Db } from "./pool.ts";

export const UserRow = z.object({
  id: z.number().int(),
  tenant_id: z.number().int(),
  tenant_name: z.string(),
  name: z.string(),
  description: z.string(),
  blocked: z.boolean(),
  language,
  has_password: z.boolean(),
  has_totp: z.boolean(),
  vms: z.number().int(),
  vms_connected: z.number().int(),
  created_at: timestamp,
  updated_at: timestamp,
});
export type UserRow = z.infer<typeof UserRow>;

export const UserCreate = z.object({
  tenant_id: z.number().int().positive().optional(),
  name: loginName,
  /** Absent or null: the user can only log in through an external plugin (LDAP…). */
  password: password.nullable().optional(),
  description: description.optional(),
  language: language.optional(),
  blocked: z.boolean().optional(),
});
export const UserUpdate = UserCreate.omit({ tenant_id: true }).partial();

export const users: ObjectDef<UserRow> = {
  kind: "user",
  table: "users",
  view: "user_view",
  row: UserRow,
  create: UserCreate,
  update: UserUpdate,
  tenancy: "own",
  toColumns: passwordColumns,
  dependents: [{ label: "VMs", table: "vms", column: "user_id" }],
};

/** Local password check for the L7R's local auth plugin. Unknown users cost the same time. */
export async function verifyUserPassword(
  db: Db,
  tenantId: number,
  name: string,
  plain: string,
): Promise<UserRow | undefined> {
  const [r] = await db`SELECT id, password_hash FROM users WHERE tenant_id = ${tenantId} AND name = ${name}`;
  if (!(await checkPassword(plain, r?.password_hash))) return undefined;
  const [row] = await db`SELECT * FROM user_view WHERE id = ${r!.id}`;
  return UserRow.parse(row);
}
