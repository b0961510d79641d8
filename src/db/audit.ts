// The audit log: every change and every login attempt. Arguments are redacted here, so no
// caller can write a secret by mistake.
import { z } from "zod";
import { timestamp, type ObjectDef } from "./objects.ts";
import type { Db } from "./pool.ts";

export const AUDIT_SOURCES = ["api", "cli", "wat", "l7r", "hkd", "system"] as const;
export const AUDIT_OBJECTS = [
  "tenant",
  "administrator",
  "role",
  "user",
  "vm",
  "osf",
  "di",
  "host",
  "property",
  "config",
  "session",
  "acl",
] as const;

export const AuditRow = z.object({
  id: z.coerce.number().int(),
  at: timestamp,
  administrator_id: z.number().int().nullable(),
  administrator_name: z.string().nullable(),
  superadmin: z.boolean(),
  tenant_id: z.number().int().nullable(),
  tenant_name: z.string().nullable(),
  action: z.string(),
  object_type: z.enum(AUDIT_OBJECTS).nullable(),
  object_id: z.number().int().nullable(),
  object_name: z.string().nullable(),
  arguments: z.record(z.string(), z.unknown()),
  ok: z.boolean(),
  error: z.string().nullable(),
  source: z.enum(AUDIT_SOURCES),
  address: z.string().nullable(),
});
export type AuditRow = z.infer<typeof AuditRow>;

/** Read-only: entries are appended with `audit()`, never edited. */
export const auditLog: ObjectDef<AuditRow> = {
  kind: "audit",
  table: "audit_log",
  view: "audit_log",
  row: AuditRow,
  tenancy: "own",
};

/** What a caller may leave out of an entry (written as null, superadmin as false). */
type OptionalAuditField =
  | "superadmin"
  | "administrator_id"
  | "administrator_name"
  | "tenant_id"
  | "tenant_name"
  | "object_type"
  | "object_id"
  | "object_name"
  | "error"
  | "address";

export type AuditEntry = Omit<AuditRow, "id" | "at" | "arguments" | OptionalAuditField> &
  Partial<Pick<AuditRow, OptionalAuditField>> & {
    arguments?: Record<string, unknown>;
  };

const SECRET_KEY = /pass(word)?|secret|token|key$|totp|credential/i;

/** Replaces the values of secret-looking keys, at any depth (and NULs, which jsonb cannot hold). */
export function redact(v: unknown): unknown {
  if (typeof v === "string") return clean(v);
  if (Array.isArray(v)) return v.map(redact);
  if (v && typeof v === "object" && !(v instanceof Date))
    return Object.fromEntries(
      Object.entries(v).map(([k, x]) => [
        clean(k),
        SECRET_KEY.test(k) && x !== null && x !== undefined ? "********" : redact(x),
      ]),
    );
  return v;
}

/** Text as PostgreSQL (and jsonb) can store it: NULs and lone surrogates become U+FFFD. */
const clean = <T extends string | null | undefined>(s: T): T =>
  (typeof s === "string" ? s.toWellFormed().replace(/\0/g, "\uFFFD") : s) as T;

const auditRow = (e: AuditEntry) => ({
  administrator_id: e.administrator_id ?? null,
  administrator_name: clean(e.administrator_name) ?? null,
  superadmin: e.superadmin ?? false,
  tenant_id: e.tenant_id ?? null,
  tenant_name: e.tenant_name ?? null,
  action: e.action,
  object_type: e.object_type ?? null,
  object_id: e.object_id ?? null,
  object_name: clean(e.object_name) ?? null,
  arguments: redact(e.arguments ?? {}) as Record<string, unknown>,
  ok: e.ok,
  error: clean(e.error) ?? null,
  source: e.source,
  address: e.address ?? null,
});

export async function audit(db: Db, e: AuditEntry): Promise<number> {
  const [r] = await db`INSERT INTO audit_log ${db(auditRow(e) as Record<string, any>)} RETURNING id::int`;
  return r!.id;
}

/** Several entries in one statement (a mass action's entry per object). */
export async function auditMany(db: Db, entries: AuditEntry[]): Promise<void> {
  for (let i = 0; i < entries.length; i += 1000)
    await db`INSERT INTO audit_log ${db(entries.slice(i, i + 1000).map(auditRow) as Record<string, any>[])}`;
}
