// Tenants. Tenant 0 ('*') is the global scope and cannot be changed or deleted.
import { z } from "zod";
import type { Db } from "./pool.ts";
import { description, directoryName, language, timestamp, type ObjectDef } from "./objects.ts";

export const TenantRow = z.object({
  id: z.number().int(),
  name: z.string(),
  description: z.string(),
  blocked: z.boolean(),
  language,
  created_at: timestamp,
  updated_at: timestamp,
});
export type TenantRow = z.infer<typeof TenantRow>;

const tenantName = directoryName(
  z
    .string()
    .min(1)
    .max(80)
    .regex(/^[^@#\s/]+$/, "must not contain spaces, @, # or /"),
);

export const TenantCreate = z.object({
  name: tenantName,
  description: description.optional(),
  language: language.optional(),
  blocked: z.boolean().optional(),
});
export const TenantUpdate = TenantCreate.partial();

export const tenants: ObjectDef<TenantRow> = {
  kind: "tenant",
  table: "tenants",
  view: "tenants",
  row: TenantRow,
  create: TenantCreate,
  update: TenantUpdate,
  tenancy: "self",
  readOnly: (row) => (row.id === 0 ? "the global scope (tenant *) cannot be changed or deleted" : undefined),
  dependents: [
    { label: "users", table: "users", column: "tenant_id" },
    { label: "administrators", table: "administrators", column: "tenant_id" },
    { label: "OSFs", table: "osfs", column: "tenant_id" },
    { label: "roles", table: "roles", column: "tenant_id" },
    { label: "properties", table: "properties", column: "tenant_id" },
  ],
};

/** The tenants of these names (the global scope `*` included), for an administrator's login. */
export async function tenantsByName(
  db: Db,
  names: string[],
): Promise<{ id: number; name: string; blocked: boolean }[]> {
  return (await db`SELECT id, name, blocked FROM tenants WHERE name = ANY(${names}::text[])`) as unknown as {
    id: number;
    name: string;
    blocked: boolean;
  }[];
}
