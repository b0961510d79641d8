// Cluster-wide settings (`configs`): tenant 0 is the global scope; a tenant's rows override
// it for that tenant. Values are validated against the one config schema before they are
// stored, so a node never reads a value it cannot parse.
import { z } from "zod";
import { isConfigKey, KEYS, parseValue } from "../config.ts";
import { translatePgError, ValidationError } from "./errors.ts";
import type { Db } from "./pool.ts";

export const ConfigRow = z.object({
  tenant_id: z.number().int(),
  key: z.string(),
  value: z.string(),
  updated_at: z.date(),
});
export type ConfigRow = z.infer<typeof ConfigRow>;

/** Rows of the global scope and, when given, of one tenant. */
export async function listConfigRows(db: Db, tenantId?: number): Promise<ConfigRow[]> {
  const rows = await db`SELECT tenant_id, key, value, updated_at FROM configs
    WHERE tenant_id = 0 OR tenant_id = ${tenantId ?? 0} ORDER BY tenant_id, key`;
  return rows.map((r) => ConfigRow.parse(r));
}

function checkClusterKey(key: string, value: string): void {
  if (!isConfigKey(key)) throw new ValidationError("key", `unknown configuration key "${key}"`);
  if (KEYS[key].scope !== "cluster") throw new ValidationError("key", `${key} is a node setting: set it in node.conf on each node`);
  try {
    parseValue(key, value, "value");
  } catch (err) {
    throw new ValidationError("value", (err as Error).message.replace(/^value: /, ""));
  }
}

export async function setConfig(db: Db, tenantId: number, key: string, value: string): Promise<ConfigRow> {
  checkClusterKey(key, value);
  try {
    const [r] = await db`INSERT INTO configs (tenant_id, key, value) VALUES (${tenantId}, ${key}, ${value})
      ON CONFLICT (tenant_id, key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()
      RETURNING tenant_id, key, value, updated_at`;
    return ConfigRow.parse(r);
  } catch (err) {
    throw translatePgError(err, "config"); // e.g. no such tenant
  }
}

/** Removes an override; returns whether there was one. */
export async function deleteConfig(db: Db, tenantId: number, key: string): Promise<boolean> {
  const rows = await db`DELETE FROM configs WHERE tenant_id = ${tenantId} AND key = ${key} RETURNING key`;
  return rows.length > 0;
}
