// Generic, tenant-scoped CRUD over the objects of the data model. Each object (users.ts,
// vms.ts, …) declares an ObjectDef; list/get/create/update/remove here build the SQL. The
// tenant scope is applied in exactly one place, `scopeCondition`, so no caller can forget it:
// an object of another tenant simply does not exist for a scoped caller.
import type postgres from "postgres";
import { z } from "zod";
import { ConflictError, DataError, InUseError, NotFoundError, translatePgError, ValidationError } from "./errors.ts";
import { transaction, type Db, type Tx } from "./pool.ts";

export type ObjectKind =
  | "tenant"
  | "administrator"
  | "role"
  | "user"
  | "osf"
  | "di"
  | "vm"
  | "host"
  | "property"
  | "audit";

/** Whose objects a caller may see: one tenant, or every tenant (a superadmin). */
export interface Scope {
  tenantId: number | null;
}
export const ALL_TENANTS: Scope = { tenantId: null };
export const tenantScope = (tenantId: number): Scope => ({ tenantId });

/**
 * How an object belongs to tenants:
 *  own    — in one tenant (tenant_id); invisible to other tenants.
 *  shared — in one tenant, or in the global scope (tenant 0) where every tenant can read it
 *           but only superadmins may change it.
 *  global — no tenant (hosts): every administrator reads them, only superadmins change them.
 *  self   — the tenants themselves (a scoped caller sees its own tenant).
 */
export type Tenancy = "own" | "shared" | "global" | "self";

export interface Dependent {
  /** Plural label for messages, e.g. "VMs". */
  label: string;
  table: string;
  column: string;
  /** Column that identifies a dependent row in messages (default `id`). */
  idColumn?: string;
}

export interface ObjectDef<Row extends Record<string, unknown> = Record<string, unknown>> {
  kind: ObjectKind;
  /** Table written by create/update/delete. */
  table: string;
  /** Table or view read by list/get; has `id` and, unless global, `tenant_id`. */
  view: string;
  row: z.ZodType<Row> & z.ZodObject;
  create?: z.ZodObject;
  update?: z.ZodObject;
  tenancy: Tenancy;
  /**
   * For objects whose tenant comes from a parent (vm → user, di → osf): the input field that
   * names the parent, its definition, and whether the table keeps a copy in `tenant_id`.
   */
  tenantFrom?: { field: string; def: ObjectDef<any>; copyTenant: boolean };
  /** Input fields that name other objects, which must exist in the same tenant. */
  refs?: Record<string, ObjectDef<any>>;
  /** What prevents deletion, checked before deleting so the error can say what. */
  dependents?: Dependent[];
  /** Turns validated input into column values (hash passwords, rename fields). */
  toColumns?: (
    input: Record<string, any>,
    op: "create" | "update",
    tx: Db,
  ) => Promise<Record<string, unknown>> | Record<string, unknown>;
  /** Runs in the same transaction after an insert or update. */
  afterWrite?: (tx: Tx, id: number, input: Record<string, any>, op: "create" | "update") => Promise<void>;
  /** A reason why this row may not be changed or deleted, or undefined. */
  readOnly?: (row: Row, op: "update" | "delete") => string | undefined;
  /** Extra condition for delete (e.g. only stopped VMs). Returns a reason to refuse. */
  canDelete?: (row: Row) => string | undefined;
  /** How a row is named in messages. */
  label?: (row: Row) => string;
}

// --- list queries -----------------------------------------------------------------------------

export const FILTER_OPS = ["=", "!=", "<", "<=", ">", ">=", "in", "like", "null", "notnull"] as const;
export type FilterOp = (typeof FILTER_OPS)[number];

export interface Filter {
  field: string;
  op: FilterOp;
  /** Raw value(s) as typed by a person or sent in a query string; converted per field type. */
  value?: unknown;
}

export interface ListQuery {
  filters?: Filter[];
  sort?: { field: string; desc?: boolean }[];
  limit?: number;
  offset?: number;
  /** Only these fields (plus id) are returned. */
  fields?: string[];
}

export interface ListResult<Row> {
  total: number;
  rows: Row[];
}

export const MAX_LIMIT = 10_000;

type FieldKind = "string" | "number" | "boolean" | "date" | "array" | "other";

/** The base kind of a zod field, looking through optional/nullable/default wrappers. */
export function fieldKind(schema: z.ZodType): FieldKind {
  let s = schema as z.ZodType & { _zod: { def: { type: string; innerType?: z.ZodType } } };
  while (s._zod.def.innerType) s = s._zod.def.innerType as typeof s;
  const t = s._zod.def.type;
  if (t === "string" || t === "enum") return "string";
  if (t === "number" || t === "int") return "number";
  if (t === "boolean") return "boolean";
  if (t === "date") return "date";
  if (t === "array") return "array";
  return "other";
}

function convert(field: string, kind: FieldKind, raw: unknown): unknown {
  if (kind === "number") {
    const n = typeof raw === "number" ? raw : Number(String(raw).trim());
    if (!Number.isFinite(n) || String(raw).trim() === "")
      throw new ValidationError(field, `expected a number, got ${JSON.stringify(raw)}`);
    return n;
  }
  if (kind === "boolean") {
    if (typeof raw === "boolean") return raw;
    const s = String(raw).toLowerCase();
    if (["1", "true", "yes", "on"].includes(s)) return true;
    if (["0", "false", "no", "off"].includes(s)) return false;
    throw new ValidationError(field, `expected true or false, got ${JSON.stringify(raw)}`);
  }
  if (kind === "date") {
    const d = raw instanceof Date ? raw : new Date(String(raw));
    if (Number.isNaN(d.getTime())) throw new ValidationError(field, `expected a date/time, got ${JSON.stringify(raw)}`);
    // Years beyond 9999 have a signed ISO form (+065535-…) that PostgreSQL does not read.
    const y = d.getUTCFullYear();
    if (y < 1 || y > 9999)
      throw new ValidationError(field, `expected a date between the years 1 and 9999, got ${JSON.stringify(raw)}`);
    return d;
  }
  if (kind === "array" || kind === "other") return String(raw);
  return typeof raw === "string" ? raw : String(raw);
}

function fieldsOf(def: ObjectDef<any>): Record<string, z.ZodType> {
  return def.row.shape as Record<string, z.ZodType>;
}

function checkField(def: ObjectDef<any>, field: string, what: string): FieldKind {
  // Own fields only: `__proto__` or `constructor` in a query string are not fields.
  const f = Object.hasOwn(fieldsOf(def), field) ? fieldsOf(def)[field] : undefined;
  if (!f)
    throw new ValidationError(
      what,
      `unknown field "${field}" of ${def.kind}; known: ${Object.keys(fieldsOf(def)).join(", ")}`,
    );
  return fieldKind(f);
}

function and(db: Db, conds: postgres.PendingQuery<any>[]): postgres.PendingQuery<any> {
  return conds.reduce((acc, c) => db`${acc} AND ${c}`);
}

/** The tenant condition for reads: the one place where tenancy is enforced. */
function scopeCondition(db: Db, def: ObjectDef<any>, scope: Scope): postgres.PendingQuery<any> {
  if (scope.tenantId === null || def.tenancy === "global") return db`true`;
  switch (def.tenancy) {
    case "own":
      return db`tenant_id = ${scope.tenantId}`;
    case "shared":
      return db`tenant_id IN (${scope.tenantId}, 0)`;
    case "self":
      return db`id = ${scope.tenantId}`;
  }
}

function filterCondition(db: Db, def: ObjectDef<any>, f: Filter): postgres.PendingQuery<any> {
  if (!FILTER_OPS.includes(f.op))
    throw new ValidationError("filter", `unknown operator "${f.op}"; use one of ${FILTER_OPS.join(" ")}`);
  const kind = checkField(def, f.field, "filter");
  const col = db(f.field);
  switch (f.op) {
    case "null":
      return db`${col} IS NULL`;
    case "notnull":
      return db`${col} IS NOT NULL`;
    case "like": {
      if (typeof f.value !== "string") throw new ValidationError(f.field, "LIKE needs a text pattern");
      // Array columns (tags) match when any element matches.
      return kind === "array"
        ? db`EXISTS (SELECT 1 FROM unnest(${col}) e WHERE e ILIKE ${f.value})`
        : db`${col}::text ILIKE ${f.value}`;
    }
    case "in": {
      const vals = (Array.isArray(f.value) ? f.value : String(f.value ?? "").split(",")).map((v) =>
        convert(f.field, kind, v),
      );
      if (vals.length === 0) return db`false`;
      return kind === "array" ? db`${col} && ${vals as string[]}::text[]` : db`${col} IN ${db(vals as any[])}`;
    }
    default: {
      if (f.value === undefined || f.value === null)
        throw new ValidationError(f.field, `operator ${f.op} needs a value`);
      if (kind === "array") {
        const v = String(f.value);
        if (f.op === "=") return db`${v} = ANY(${col})`;
        if (f.op === "!=") return db`NOT (${v} = ANY(${col}))`;
        throw new ValidationError(f.field, `operator ${f.op} does not apply to a list field`);
      }
      const v = convert(f.field, kind, f.value) as any;
      switch (f.op) {
        case "=":
          return db`${col} = ${v}`;
        case "!=":
          return db`${col} IS DISTINCT FROM ${v}`;
        case "<":
          return db`${col} < ${v}`;
        case "<=":
          return db`${col} <= ${v}`;
        case ">":
          return db`${col} > ${v}`;
        case ">=":
          return db`${col} >= ${v}`;
      }
    }
  }
  throw new ValidationError("filter", `unsupported operator ${f.op}`);
}

function parseRow<Row>(def: ObjectDef<any>, r: Record<string, unknown>, fields?: string[]): Row {
  const schema = fields ? def.row.pick(Object.fromEntries(fields.map((f) => [f, true])) as any) : def.row;
  return schema.parse(r) as Row;
}

export async function list<Row extends Record<string, unknown>>(
  db: Db,
  def: ObjectDef<Row>,
  scope: Scope,
  q: ListQuery = {},
): Promise<ListResult<Row>> {
  const conds = [scopeCondition(db, def, scope), ...(q.filters ?? []).map((f) => filterCondition(db, def, f))];
  const limit = q.limit ?? 1000;
  const offset = q.offset ?? 0;
  if (!Number.isInteger(limit) || limit < 0 || limit > MAX_LIMIT)
    throw new ValidationError("limit", `must be an integer from 0 to ${MAX_LIMIT}`);
  if (!Number.isInteger(offset) || offset < 0) throw new ValidationError("offset", "must be a non-negative integer");
  const sorts = (q.sort ?? []).map((s) => {
    checkField(def, s.field, "sort");
    // PostgreSQL's default null order (last ascending, first descending) lets either direction walk an index.
    return s.desc ? db`${db(s.field)} DESC` : db`${db(s.field)} ASC`;
  });
  sorts.push(db`id`);
  const order = sorts.reduce((acc, s) => db`${acc}, ${s}`);
  let fields: string[] | undefined;
  if (q.fields?.length) {
    for (const f of q.fields) checkField(def, f, "fields");
    fields = [...new Set(["id", ...q.fields])];
  }
  const cols = fields ? db(fields) : db`*`;
  try {
    // Page and total as two queries: the page can then walk an index and stop after `limit`
    // rows, and the count can skip the view's joins that it does not need.
    const [rows, [c]] = await Promise.all([
      db`SELECT ${cols} FROM ${db(def.view)} WHERE ${and(db, conds)} ORDER BY ${order} LIMIT ${limit} OFFSET ${offset}`,
      db`SELECT count(*)::int AS n FROM ${db(def.view)} WHERE ${and(db, conds)}`,
    ]);
    return { total: c!.n, rows: rows.map((r) => parseRow<Row>(def, r, fields)) };
  } catch (err) {
    throw translatePgError(err, def.kind);
  }
}

/** How many objects match, within the caller's scope. */
export async function count(db: Db, def: ObjectDef<any>, scope: Scope, filters: Filter[] = []): Promise<number> {
  const conds = [scopeCondition(db, def, scope), ...filters.map((f) => filterCondition(db, def, f))];
  const [c] = await db`SELECT count(*)::int AS n FROM ${db(def.view)} WHERE ${and(db, conds)}`;
  return c!.n;
}

/** The most frequent values of `fields` among the objects in scope matching `filters`, with their counts. */
export async function countBy(
  db: Db,
  def: ObjectDef<any>,
  scope: Scope,
  fields: string[],
  filters: Filter[] = [],
  limit = 10,
): Promise<Record<string, unknown>[]> {
  for (const f of fields) checkField(def, f, "filter");
  const conds = [scopeCondition(db, def, scope), ...filters.map((f) => filterCondition(db, def, f))];
  return await db`SELECT ${db(fields)}, count(*)::int AS n FROM ${db(def.view)} WHERE ${and(db, conds)}
    GROUP BY ${db(fields)} ORDER BY n DESC, ${db(fields[fields.length - 1]!)} LIMIT ${limit}`;
}

/** One object by id, or NotFoundError if it does not exist in the caller's scope. */
export async function get<Row extends Record<string, unknown>>(
  db: Db,
  def: ObjectDef<Row>,
  scope: Scope,
  id: number,
): Promise<Row> {
  const row = await find(db, def, scope, id);
  if (!row) throw new NotFoundError(def.kind, id);
  return row;
}

export async function find<Row extends Record<string, unknown>>(
  db: Db,
  def: ObjectDef<Row>,
  scope: Scope,
  id: number,
): Promise<Row | undefined> {
  // Ids are PostgreSQL integers: anything else names no object (and must not reach the query).
  if (!Number.isInteger(id) || id < -2147483648 || id > 2147483647) return undefined;
  const [r] = await db`SELECT * FROM ${db(def.view)} WHERE id = ${id} AND ${scopeCondition(db, def, scope)}`;
  return r ? parseRow<Row>(def, r) : undefined;
}

/** Validates input against a schema (unknown fields rejected), as a ValidationError naming the field. */
export function validate<T extends z.ZodObject>(schema: T, input: unknown): z.output<T> {
  const res = schema.strict().safeParse(input);
  if (res.success) return res.data as z.output<T>;
  const issue = res.error.issues[0]!;
  const path = issue.path.join(".");
  const msg =
    issue.code === "unrecognized_keys"
      ? `unknown field${issue.keys.length > 1 ? "s" : ""} ${issue.keys.map((k) => `"${k}"`).join(", ")}`
      : issue.message;
  throw new ValidationError(
    issue.code === "unrecognized_keys" ? (issue.keys[0] ?? path) || undefined : path || undefined,
    msg,
  );
}

/** Refuses a change of a global or read-only object by a caller who may not make it (403). */
export function checkWritable(
  def: ObjectDef<any>,
  scope: Scope,
  row: Record<string, unknown>,
  op: "update" | "delete",
): void {
  if (scope.tenantId !== null) {
    if (def.tenancy === "global") throw new DataError(`only a superadministrator can ${op} a ${def.kind}`, 403);
    if (def.tenancy === "shared" && row.tenant_id === 0)
      throw new DataError(`this ${def.kind} is global; only a superadministrator can ${op} it`, 403);
  }
  const why = def.readOnly?.(row, op);
  if (why) throw new DataError(why, 403);
}

/** Checks that referenced objects exist within `scope`. */
async function checkRefs(db: Db, def: ObjectDef<any>, scope: Scope, input: Record<string, unknown>): Promise<void> {
  for (const [field, ref] of Object.entries(def.refs ?? {})) {
    const id = input[field];
    if (id === undefined || id === null) continue;
    if (!(await find(db, ref, scope, id as number)))
      throw new ValidationError(field, `no such ${ref.kind} ${id}${scope.tenantId !== null ? " in this tenant" : ""}`);
  }
}

export async function create<Row extends Record<string, unknown>>(
  db: Db,
  def: ObjectDef<Row>,
  scope: Scope,
  input: unknown,
): Promise<Row> {
  if (!def.create) throw new DataError(`${def.kind} objects cannot be created this way`, 405);
  if (def.tenancy === "global" && scope.tenantId !== null)
    throw new DataError(`only a superadministrator can create a ${def.kind}`, 403);
  const data = validate(def.create, input) as Record<string, any>;
  return transaction(db, async (tx) => {
    // The tenant and the references first: toColumns may query by them (or hash a password).
    let refScope = scope;
    const tenant: Record<string, unknown> = {};
    if (def.tenantFrom) {
      const parentId = data[def.tenantFrom.field];
      const parent = await find(tx, def.tenantFrom.def, scope, parentId);
      if (!parent)
        throw new ValidationError(
          def.tenantFrom.field,
          `no such ${def.tenantFrom.def.kind} ${parentId}${scope.tenantId !== null ? " in this tenant" : ""}`,
        );
      refScope = tenantScope(parent.tenant_id as number);
      if (def.tenantFrom.copyTenant) tenant.tenant_id = parent.tenant_id;
    } else if (def.tenancy === "own" || def.tenancy === "shared") {
      if (scope.tenantId !== null) {
        if (data.tenant_id !== undefined && data.tenant_id !== scope.tenantId)
          throw new ValidationError("tenant_id", "cannot create objects in another tenant");
        tenant.tenant_id = scope.tenantId;
      } else if (data.tenant_id === undefined) throw new ValidationError("tenant_id", "is required");
      refScope = tenantScope((scope.tenantId ?? data.tenant_id) as number);
    }
    await checkRefs(tx, def, refScope, data);
    const cols: Record<string, unknown> = { ...(await (def.toColumns?.(data, "create", tx) ?? data)), ...tenant };
    let id: number;
    try {
      const [r] = await tx`INSERT INTO ${tx(def.table)} ${tx(cols)} RETURNING id`;
      id = r!.id;
      await def.afterWrite?.(tx, id, data, "create");
    } catch (err) {
      throw translatePgError(err, def.kind);
    }
    return get(tx, def, ALL_TENANTS, id);
  });
}

export async function update<Row extends Record<string, unknown>>(
  db: Db,
  def: ObjectDef<Row>,
  scope: Scope,
  id: number,
  patch: unknown,
): Promise<Row> {
  if (!def.update) throw new DataError(`${def.kind} objects cannot be changed this way`, 405);
  const data = validate(def.update, patch) as Record<string, any>;
  return transaction(db, async (tx) => {
    const row = await get(tx, def, scope, id);
    checkWritable(def, scope, row, "update");
    const cols = { ...(await (def.toColumns?.(data, "update", tx) ?? data)) };
    const refScope = row.tenant_id === undefined || row.tenant_id === 0 ? scope : tenantScope(row.tenant_id as number);
    await checkRefs(tx, def, refScope, data);
    try {
      if (Object.keys(cols).length > 0) await tx`UPDATE ${tx(def.table)} SET ${tx(cols)} WHERE id = ${id}`;
      await def.afterWrite?.(tx, id, data, "update");
    } catch (err) {
      throw translatePgError(err, def.kind);
    }
    return get(tx, def, ALL_TENANTS, id);
  });
}

/** What still depends on an object (the reasons a delete would be refused). */
export async function dependentsOf(
  db: Db,
  def: ObjectDef<any>,
  id: number,
): Promise<{ kind: string; count: number; ids: number[] }[]> {
  const out: { kind: string; count: number; ids: number[] }[] = [];
  for (const d of def.dependents ?? []) {
    const idCol = d.idColumn ?? "id";
    const rows =
      await db`SELECT ${db(idCol)} AS id, count(*) OVER ()::int AS n FROM ${db(d.table)} WHERE ${db(d.column)} = ${id} ORDER BY 1 LIMIT 10`;
    if (rows.length) out.push({ kind: d.label, count: rows[0]!.n, ids: rows.map((r) => r.id) });
  }
  return out;
}

export async function remove<Row extends Record<string, unknown>>(
  db: Db,
  def: ObjectDef<Row>,
  scope: Scope,
  id: number,
): Promise<Row> {
  return transaction(db, async (tx) => {
    const row = await get(tx, def, scope, id);
    checkWritable(def, scope, row, "delete");
    const refusal = def.canDelete?.(row);
    if (refusal) throw new ConflictError(refusal);
    const deps = await dependentsOf(tx, def, id);
    if (deps.length) {
      const what = deps
        .map((d) => `${d.count} ${d.kind} (${d.ids.slice(0, 5).join(", ")}${d.count > 5 ? ", …" : ""})`)
        .join(" and ");
      throw new InUseError(`${def.kind} ${labelOf(def, row)} is still used by ${what}`, deps);
    }
    try {
      await tx`DELETE FROM ${tx(def.table)} WHERE id = ${id}`;
    } catch (err) {
      throw translatePgError(err, def.kind);
    }
    return row;
  });
}

export function labelOf(def: ObjectDef<any>, row: Record<string, unknown>): string {
  if (def.label) return def.label(row);
  const name = row.name ?? row.key ?? row.version;
  return name !== undefined ? JSON.stringify(name) : String(row.id);
}

// --- schema helpers shared by the object modules -----------------------------------------------

export const id = z.number().int().positive();
export const timestamp = z.date();
export const description = z.string().max(32768);
export const language = z.enum(["auto", "en", "es"]);
/** Names of people and things: no separators used by logins (`user@tenant`), no blanks. */
/** One safe directory name (homes are homes/<tenant>/<user>), for checks outside the schemas. */
export const isSafePathComponent = (n: string) => n !== "" && n !== "." && n !== ".." && !/[/\\\x00-\x1f\x7f]/.test(n);
/** A name that becomes a directory of the homes (a tenant's, a user's): what isSafePathComponent allows. */
export const directoryName = (s: z.ZodString) =>
  s
    .regex(/^[^\\\x00-\x1f\x7f]+$/, "must not contain \\ or control characters")
    .refine((n) => n !== "." && n !== "..", "must not be . or .. (it names a directory: homes are <tenant>/<user>)");
export const loginName = directoryName(
  z
    .string()
    .min(1, "must not be empty")
    .max(64)
    .regex(/^[^@#\s/:]+$/, "must not contain spaces, @, #, / or :"),
);
export const password = z.string().min(8, "must have at least 8 characters").max(1024);
