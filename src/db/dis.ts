// Disk images (DIs) and their tags. A tag names one image within an OSF: tagging moves it.
// Every image has a fixed tag equal to its version; `head` follows the newest image; the
// first image of an OSF also gets `default`, the tag new VMs use.
import { z } from "zod";
import { ConflictError, translatePgError, ValidationError } from "./errors.ts";
import { description, get, timestamp, type ObjectDef, type Scope } from "./objects.ts";
import { osfs } from "./osfs.ts";
import { transaction, type Db } from "./pool.ts";

export const DI_STATES = ["new", "uploading", "verifying", "ready", "published", "failed", "retired"] as const;
export const PROTECTED_TAGS = ["head", "default"] as const;

const tag = z.string().regex(/^[^\s,]{1,128}$/, "1 to 128 characters, no spaces or commas");

export const DiRow = z.object({
  id: z.number().int(),
  tenant_id: z.number().int(),
  tenant_name: z.string(),
  osf_id: z.number().int(),
  osf_name: z.string(),
  version: z.string(),
  path: z.string(),
  description: z.string(),
  blocked: z.boolean(),
  state: z.enum(DI_STATES),
  state_message: z.string(),
  progress: z.number(),
  size_bytes: z.coerce.number().nullable(),
  sha256: z.string().nullable(),
  expire_soft_s: z.number().int().nullable(),
  expire_hard_s: z.number().int().nullable(),
  tags: z.array(z.string()),
  created_at: timestamp,
  updated_at: timestamp,
});
export type DiRow = z.infer<typeof DiRow>;

export const DiCreate = z.object({
  osf_id: z.number().int().positive(),
  version: tag.max(64).optional(),
  /** File name under path.storage.images. */
  path: z
    .string()
    .min(1)
    .max(255)
    .regex(/^[^/\0]+$/, "a file name, without directories")
    .refine((p) => p !== "." && p !== "..", "not a file name"),
  description: description.optional(),
  blocked: z.boolean().optional(),
  expire_soft_s: z.number().int().min(0).nullable().optional(),
  expire_hard_s: z.number().int().min(0).nullable().optional(),
});
export const DiUpdate = DiCreate.pick({
  description: true,
  blocked: true,
  expire_soft_s: true,
  expire_hard_s: true,
}).partial();

/** The first free `YYYY-MM-DD-NNN` version of an OSF for today. */
async function nextVersion(db: Db, osfId: number): Promise<string> {
  const today = new Date().toISOString().slice(0, 10);
  const used = new Set(
    (await db`SELECT version FROM dis WHERE osf_id = ${osfId} AND version LIKE ${today + "-%"}`).map((r) => r.version),
  );
  for (let n = 0; n < 1000; n++) {
    const v = `${today}-${String(n).padStart(3, "0")}`;
    if (!used.has(v)) return v;
  }
  throw new ConflictError("no free version number left for today; give a version");
}

export const dis: ObjectDef<DiRow> = {
  kind: "di",
  table: "dis",
  view: "di_view",
  row: DiRow,
  create: DiCreate,
  update: DiUpdate,
  tenancy: "own",
  tenantFrom: { field: "osf_id", def: osfs, copyTenant: false },
  label: (row) => `${JSON.stringify(row.version)} (${row.id})`,
  async toColumns(input, op, tx) {
    if (op === "create" && input.version === undefined)
      return { ...input, version: await nextVersion(tx, input.osf_id) };
    return input;
  },
  async afterWrite(tx, id, _input, op) {
    if (op !== "create") return;
    const [di] = await tx`SELECT osf_id, version FROM dis WHERE id = ${id}`;
    await tx`INSERT INTO di_tags (di_id, osf_id, tag, fixed) VALUES (${id}, ${di!.osf_id}, ${di!.version}, true)`;
    await moveTag(tx, id, di!.osf_id, "head");
    const [hasDefault] = await tx`SELECT 1 FROM di_tags WHERE osf_id = ${di!.osf_id} AND tag = 'default'`;
    if (!hasDefault) await moveTag(tx, id, di!.osf_id, "default");
  },
  dependents: [{ label: "VMs running it", table: "vm_runtimes", column: "current_di_id", idColumn: "vm_id" }],
};

export interface Expiry {
  /** Seconds until running VMs on an older image are warned; null: never. Default: the image's own. */
  soft_s?: number | null;
  /** Seconds until they are stopped; null: never. Default: the image's own. */
  hard_s?: number | null;
}

/**
 * Puts `tag` on image `diId`, taking it from the OSF's other image if one has it. Running VMs
 * that use the tag but still run another image get expiry times, so they move to the new image
 * at their next start (soft: the user is warned; hard: the node stops the VM).
 */
async function moveTag(
  db: Db,
  diId: number,
  osfId: number,
  t: string,
  expiry: Expiry = {},
): Promise<number | undefined> {
  const [prev] = await db`SELECT di_id, fixed FROM di_tags WHERE osf_id = ${osfId} AND tag = ${t}`;
  if (prev?.di_id === diId) return undefined;
  if (prev?.fixed)
    throw new ConflictError(`tag ${JSON.stringify(t)} is the version of image ${prev.di_id} and cannot move`, "tag");
  if (prev) await db`DELETE FROM di_tags WHERE osf_id = ${osfId} AND tag = ${t}`;
  await db`INSERT INTO di_tags (di_id, osf_id, tag, fixed) VALUES (${diId}, ${osfId}, ${t}, false)`;
  const [own] = await db`SELECT expire_soft_s, expire_hard_s FROM dis WHERE id = ${diId}`;
  const soft = expiry.soft_s !== undefined ? expiry.soft_s : own!.expire_soft_s;
  const hard = expiry.hard_s !== undefined ? expiry.hard_s : own!.expire_hard_s;
  if (soft !== null || hard !== null)
    await db`UPDATE vm_runtimes r SET
        expire_soft_at = CASE WHEN ${soft}::int IS NULL THEN r.expire_soft_at ELSE now() + make_interval(secs => ${soft}::int) END,
        expire_hard_at = CASE WHEN ${hard}::int IS NULL THEN r.expire_hard_at ELSE now() + make_interval(secs => ${hard}::int) END
      FROM vms v
     WHERE v.id = r.vm_id AND v.osf_id = ${osfId} AND v.di_tag = ${t}
       AND r.vm_state IN ('starting', 'running') AND r.current_di_id IS DISTINCT FROM ${diId}`;
  return prev?.di_id;
}

/** Tags an image; returns the image that had the tag before, if any. */
export async function tagDi(
  db: Db,
  scope: Scope,
  diId: number,
  t: string,
  expiry: Expiry = {},
): Promise<number | undefined> {
  const parsed = tag.safeParse(t);
  if (!parsed.success) throw new ValidationError("tag", parsed.error.issues[0]!.message);
  const di = await get(db, dis, scope, diId);
  try {
    // One transaction, so that a tag is never lost between its removal and its insertion.
    return await transaction(db, (tx) => moveTag(tx, diId, di.osf_id, t, expiry));
  } catch (err) {
    throw translatePgError(err, "di"); // another request moved the same tag at the same moment: 409
  }
}

/** Removes a tag from an image. `head`, `default` and version tags stay. */
export async function untagDi(db: Db, scope: Scope, diId: number, t: string): Promise<boolean> {
  const di = await get(db, dis, scope, diId);
  if ((PROTECTED_TAGS as readonly string[]).includes(t))
    throw new ValidationError("tag", `tag "${t}" cannot be removed; put it on another image instead`);
  if (t === di.version) throw new ValidationError("tag", `"${t}" is the image's version tag and cannot be removed`);
  const rows = await db`DELETE FROM di_tags WHERE di_id = ${diId} AND tag = ${t} AND NOT fixed RETURNING tag`;
  return rows.length > 0;
}

/** The image a VM of `osfId` with tag `t` starts from (blocked or incomplete images are not used). */
export async function diForTag(db: Db, osfId: number, t: string): Promise<DiRow | undefined> {
  const [r] = await db`SELECT d.* FROM di_view d JOIN di_tags t ON t.di_id = d.id
                        WHERE t.osf_id = ${osfId} AND t.tag = ${t} AND NOT d.blocked AND d.state IN ('ready', 'published')`;
  return r ? DiRow.parse(r) : undefined;
}

// --- uploads ------------------------------------------------------------------------------------

/** Marks an image as receiving its file; only one upload at a time, and never over a good file. */
export async function claimDiUpload(db: Db, scope: Scope, diId: number, expectedBytes: number | null): Promise<DiRow> {
  const di = await get(db, dis, scope, diId);
  const [r] = await db`UPDATE dis SET state = 'uploading', progress = 0, size_bytes = ${expectedBytes}, sha256 = NULL,
       state_message = 'upload started'
     WHERE id = ${diId} AND state IN ('new', 'failed') RETURNING id`;
  if (!r) throw new ConflictError(`image ${di.version} is ${di.state}; only a new or failed image can receive a file`);
  return di;
}

export async function setDiProgress(db: Db, diId: number, progress: number, message: string): Promise<void> {
  await db`UPDATE dis SET progress = ${Math.min(1, Math.max(0, progress))}, state_message = ${message} WHERE id = ${diId} AND state = 'uploading'`;
}

export async function finishDiUpload(db: Db, diId: number, sizeBytes: number, sha256: string): Promise<void> {
  await db`UPDATE dis SET state = 'ready', progress = 1, size_bytes = ${sizeBytes}, sha256 = ${sha256},
       state_message = 'uploaded' WHERE id = ${diId}`;
}

export async function failDiUpload(db: Db, diId: number, message: string): Promise<void> {
  await db`UPDATE dis SET state = 'failed', state_message = ${message.slice(0, 1000)} WHERE id = ${diId}`;
}
