// Cluster-wide settings (`configs`): tenant 0 is the global scope; a tenant's rows override
// it for that tenant. Values are validated against the one config schema before they are
// stored, so a node never reads a value it cannot parse.
import { z } from "zod";
import { Config, isConfigKey, KEY_RELATIONS, KEYS, parseValue, relationProblem, type ConfigKey } from "../config.ts";
import { DataError, translatePgError, ValidationError } from "./errors.ts";
import { transaction, type Db } from "./pool.ts";

/** Serialises changes of related keys, so two requests cannot together break a relation. */
const RELATIONS_LOCK = 0x71766401;

/**
 * Refuses a change of the global scope that breaks a relation between keys (hkd.fence_after <
 * cluster.lost_after): 422 naming both keys. `after` is the global rows as they would be.
 */
async function checkRelations(tx: Db, key: string, after: (rows: ConfigRow[]) => ConfigRow[]): Promise<void> {
  if (!KEY_RELATIONS.some((r) => r.less === key || r.than === key)) return;
  await tx`SELECT pg_advisory_xact_lock(${RELATIONS_LOCK})`;
  const rows = after((await listConfigRows(tx)).filter((r) => r.tenant_id === 0));
  const usable = rows.filter(
    (r) => isConfigKey(r.key) && KEYS[r.key].scope === "cluster" && KEYS[r.key].type.safeParse(r.value).success,
  );
  const cfg = new Config().withDatabase(
    usable.map((r) => ({ tenantId: 0, key: r.key, value: r.value })),
    () => {},
    { checkRelations: false },
  );
  const problem = relationProblem(cfg);
  if (problem)
    throw new ValidationError(
      "value",
      problem.replace(/database \(global\)/g, "global").replace(/, default\)/g, ", the default)"),
    );
}

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

function checkClusterKey(key: string, value: string, tenantId: number): void {
  if (!isConfigKey(key)) throw new ValidationError("key", `unknown configuration key "${key}"`);
  if (KEYS[key].scope !== "cluster")
    throw new ValidationError("key", `${key} is a node setting: set it in node.conf on each node`);
  if (tenantId !== 0 && !KEYS[key].tenant)
    throw new DataError(`${key} is a farm-wide setting: a tenant cannot override it`, 403, "key");
  try {
    parseValue(key, value, "value");
  } catch (err) {
    throw new ValidationError("value", (err as Error).message.replace(/^value: /, ""));
  }
}

export async function setConfig(db: Db, tenantId: number, key: string, value: string): Promise<ConfigRow> {
  checkClusterKey(key, value, tenantId);
  return transaction(db, async (tx) => {
    if (tenantId === 0)
      await checkRelations(tx, key, (rows) => [
        ...rows.filter((r) => r.key !== key),
        { tenant_id: 0, key, value, updated_at: new Date() },
      ]);
    try {
      const [r] = await tx`INSERT INTO configs (tenant_id, key, value) VALUES (${tenantId}, ${key}, ${value})
        ON CONFLICT (tenant_id, key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()
        RETURNING tenant_id, key, value, updated_at`;
      return ConfigRow.parse(r);
    } catch (err) {
      throw translatePgError(err, "config"); // e.g. no such tenant
    }
  });
}

/** Removes an override; returns whether there was one. */
export async function deleteConfig(db: Db, tenantId: number, key: string): Promise<boolean> {
  return transaction(db, async (tx) => {
    if (tenantId === 0) await checkRelations(tx, key, (rows) => rows.filter((r) => r.key !== key));
    const rows = await tx`DELETE FROM configs WHERE tenant_id = ${tenantId} AND key = ${key} RETURNING key`;
    return rows.length > 0;
  });
}

export interface EffectiveConfig {
  key: ConfigKey;
  /** The effective value as a string, secrets masked; null when unset. */
  value: string | null;
  default: string | null;
  source: "tenant" | "global" | "default";
}

const masked = (k: ConfigKey, v: string | null) => (KEYS[k].secret && v ? "********" : v);

/** A row as an API answer shows it: a secret's value is never read back. */
export const maskedConfigRow = (r: ConfigRow): ConfigRow => ({
  ...r,
  value: isConfigKey(r.key) ? masked(r.key, r.value)! : r.value,
});

/**
 * Every cluster key as `tenantId` gets it from the database (the same resolution the nodes
 * use: tenant rows only for keys a tenant may override, credentials from their URL's scope).
 * A stored value that no longer parses is left out (the nodes warn about it).
 */
export function effectiveConfigs(rows: ConfigRow[], tenantId: number): EffectiveConfig[] {
  const usable = rows.filter(
    (r) =>
      (r.tenant_id === 0 || r.tenant_id === tenantId) &&
      isConfigKey(r.key) &&
      KEYS[r.key].type.safeParse(r.value).success,
  );
  // Shown as stored, even when a pair of them breaks a relation: that is how it gets fixed.
  const cfg = new Config().withDatabase(
    usable.map((r) => ({ tenantId: r.tenant_id, key: r.key, value: r.value })),
    () => {},
    { checkRelations: false },
  );
  const raw = (v: unknown) => (v === undefined ? null : typeof v === "boolean" ? (v ? "1" : "0") : String(v));
  return (Object.keys(KEYS) as ConfigKey[])
    .filter((k) => KEYS[k].scope === "cluster")
    .map((k) => {
      const src = cfg.source(k);
      const value = src.kind === "default" ? raw(KEYS[k].default) : cfg.rawOf(k);
      return {
        key: k,
        value: masked(k, value),
        default: raw(KEYS[k].default),
        source: src.kind !== "db" ? "default" : src.tenantId === 0 ? "global" : "tenant",
      };
    });
}
