// What the admin CLI knows about the API's objects: paths, names, default table columns,
// friendly field aliases, and how `--filter` expressions and `key=value` arguments become
// query strings and JSON bodies. No schema is imported from the server: the API validates.
import { usageError } from "./client.ts";

export interface ObjectInfo {
  /** CLI name: `qvd admin <name> …`. */
  name: string;
  aliases: string[];
  /** Path below /api/v1. */
  path: string;
  /** Singular label for messages. */
  label: string;
  /** Field that names an object (NAME lookups); undefined: by id only. */
  nameField?: string;
  /** Default table columns. */
  columns: string[];
  /** Friendly field names for --filter, --sort and --fields. */
  fieldAliases: Record<string, string>;
  /** Whether objects have a tenant (NAME@TENANT lookups). */
  tenantScoped: boolean;
  /** Fields sent as lists (`a,b,c`). */
  listFields?: string[];
  /** `key=VALUE` where key names another object: looked up by name and sent as `<key>_id`. */
  refs?: Record<string, string>;
  /** Default sort of `list` (newest first for the audit log). */
  defaultSort?: string;
  defaultLimit?: number;
}

const tenantAlias = { tenant: "tenant_name" };

export const OBJECTS: ObjectInfo[] = [
  {
    name: "tenant",
    aliases: ["tenants"],
    path: "tenants",
    label: "tenant",
    nameField: "name",
    tenantScoped: false,
    columns: ["id", "name", "blocked", "language", "description"],
    fieldAliases: {},
  },
  {
    name: "admin",
    aliases: ["admins", "administrator", "administrators"],
    path: "administrators",
    label: "administrator",
    nameField: "name",
    tenantScoped: true,
    columns: ["id", "tenant_name", "name", "blocked", "superadmin", "roles", "language"],
    fieldAliases: { ...tenantAlias },
    refs: { tenant: "tenants" },
  },
  {
    name: "role",
    aliases: ["roles"],
    path: "roles",
    label: "role",
    nameField: "name",
    tenantScoped: true,
    columns: ["id", "tenant_name", "name", "builtin", "inherits", "description"],
    fieldAliases: { ...tenantAlias },
    refs: { tenant: "tenants" },
  },
  {
    name: "user",
    aliases: ["users"],
    path: "users",
    label: "user",
    nameField: "name",
    tenantScoped: true,
    columns: ["id", "tenant_name", "name", "blocked", "vms", "vms_connected", "description"],
    fieldAliases: { ...tenantAlias },
    refs: { tenant: "tenants" },
  },
  {
    name: "vm",
    aliases: ["vms"],
    path: "vms",
    label: "vm",
    nameField: "name",
    tenantScoped: true,
    columns: ["id", "name", "user_name", "osf_name", "vm_state", "user_state", "host_name", "ip", "blocked"],
    fieldAliases: { ...tenantAlias, state: "vm_state", user: "user_name", osf: "osf_name", host: "host_name" },
    refs: { user: "users", osf: "osfs" },
  },
  {
    name: "osf",
    aliases: ["osfs"],
    path: "osfs",
    label: "osf",
    nameField: "name",
    tenantScoped: true,
    columns: [
      "id",
      "tenant_name",
      "name",
      "hypervisor",
      "memory_mb",
      "vcpus",
      "cpu_shares",
      "persistent",
      "vms",
      "dis",
    ],
    fieldAliases: { ...tenantAlias },
    refs: { tenant: "tenants" },
  },
  {
    name: "di",
    aliases: ["dis", "image", "images"],
    path: "dis",
    label: "di",
    nameField: "version",
    tenantScoped: true,
    columns: ["id", "osf_name", "version", "state", "tags", "blocked", "path"],
    fieldAliases: { ...tenantAlias, osf: "osf_name" },
    refs: { osf: "osfs" },
  },
  {
    name: "host",
    aliases: ["hosts", "node", "nodes"],
    path: "hosts",
    label: "host",
    nameField: "name",
    tenantScoped: false,
    columns: [
      "id",
      "name",
      "address",
      "state",
      "drain",
      "blocked",
      "vms_running",
      "hypervisors",
      "frontend",
      "backend",
    ],
    fieldAliases: {},
  },
  {
    name: "property",
    aliases: ["properties"],
    path: "properties",
    label: "property",
    nameField: "key",
    tenantScoped: true,
    columns: ["id", "tenant_name", "key", "applies_to", "description"],
    fieldAliases: { ...tenantAlias },
    listFields: ["applies_to"],
    refs: { tenant: "tenants" },
  },
  {
    name: "audit",
    aliases: ["log"],
    path: "audit",
    label: "audit entry",
    tenantScoped: true,
    columns: ["id", "at", "administrator_name", "tenant_name", "action", "object_type", "object_name", "ok", "error"],
    fieldAliases: { ...tenantAlias, admin: "administrator_name", object: "object_type" },
    defaultSort: "-id",
    defaultLimit: 50,
  },
];

export const objectByName = (name: string): ObjectInfo | undefined =>
  OBJECTS.find((o) => o.name === name || o.aliases.includes(name));

const field = (o: ObjectInfo, f: string) => o.fieldAliases[f] ?? f;

/** `--sort -state,name` → `-vm_state,name`. */
export function sortParam(o: ObjectInfo, sort: string): string {
  return sort
    .split(",")
    .filter(Boolean)
    .map((s) => (s.startsWith("-") ? "-" + field(o, s.slice(1)) : field(o, s)))
    .join(",");
}

export const fieldsParam = (o: ObjectInfo, fields: string): string[] =>
  fields
    .split(",")
    .map((f) => f.trim())
    .filter(Boolean)
    .map((f) => field(o, f));

// Longest operators first, so that `<=` is not read as `<`.
const OPS: [string, string | undefined][] = [
  ["!=", "ne"],
  ["<=", "le"],
  [">=", "ge"],
  ["@=", "in"],
  ["~", "like"],
  ["<", "lt"],
  [">", "gt"],
  ["=", undefined],
];

/**
 * One `--filter` expression as a query parameter: `field=value`, `field!=value`, `field<value`,
 * `field<=value`, `field>value`, `field>=value`, `field~pattern` (LIKE, `%` wildcard),
 * `field@=a,b,c` (one of), `field=` (is null), `field!=` (is not null).
 */
export function filterParam(o: ObjectInfo, expr: string): [string, string] {
  const m = /^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(!=|<=|>=|@=|~|<|>|=)(.*)$/s.exec(expr);
  if (!m) throw usageError(`--filter ${expr}: expected FIELD=VALUE (or != < <= > >= ~ @=)`);
  const [, name, op, value] = m as unknown as [string, string, string, string];
  const f = field(o, name.toLowerCase());
  if (value === "" && op === "=") return [`${f}[null]`, ""];
  if (value === "" && op === "!=") return [`${f}[notnull]`, ""];
  if (value === "") throw usageError(`--filter ${expr}: ${op} needs a value`);
  const api = OPS.find(([s]) => s === op)![1];
  return [api ? `${f}[${api}]` : f, value];
}

/** The list query of a command: filters, sort, limit, offset, fields. */
export function listQuery(
  o: ObjectInfo,
  a: { filters: string[]; sort?: string; limit?: string; offset?: string; fields?: string },
): URLSearchParams {
  const q = new URLSearchParams();
  for (const f of a.filters) q.append(...filterParam(o, f));
  const sort = a.sort ?? o.defaultSort;
  if (sort) q.set("sort", sortParam(o, sort));
  for (const [k, v] of [
    ["limit", a.limit ?? (o.defaultLimit !== undefined ? String(o.defaultLimit) : undefined)],
    ["offset", a.offset],
  ] as const) {
    if (v === undefined) continue;
    if (!/^\d+$/.test(v)) throw usageError(`--${k} ${v}: expected a whole number`);
    q.set(k, v);
  }
  if (a.fields) q.set("fields", fieldsParam(o, a.fields).join(","));
  return q;
}

/** Filters only (mass changes and actions). */
export function filterQuery(o: ObjectInfo, filters: string[], all: boolean): URLSearchParams {
  const q = new URLSearchParams();
  for (const f of filters) q.append(...filterParam(o, f));
  if (all && filters.length === 0) q.set("all", "true");
  return q;
}

const INTEGER_FIELD = /(_id|_mb|_s)$|^(cpu_shares|vcpus)$/;
const BOOLEAN_FIELDS = new Set(["blocked", "use_overlay", "persistent", "frontend", "backend"]);

/**
 * `key=value` arguments as a JSON body. Values are strings, except:
 *  - fields ending in _id, _mb or _s, cpu_shares and vcpus: integers become JSON numbers, and an
 *    empty value is null (`expire_soft_s=` clears it);
 *  - blocked, use_overlay, persistent, frontend, backend: true/false (also yes/no, 1/0);
 *  - list fields (a property's applies_to): comma-separated;
 *  - `key:=JSON` sends any JSON value as is (`description:='"true"'`, `expire_hard_s:=null`).
 * Reference keys (`user=alice`, `osf=desktop`, `tenant=acme`) are collected apart so the caller
 * can look them up and send `user_id`, `osf_id`, `tenant_id`.
 */
export function parseAssignments(
  o: ObjectInfo,
  args: string[],
): { body: Record<string, unknown>; refs: Record<string, string> } {
  const body: Record<string, unknown> = {};
  const refs: Record<string, string> = {};
  for (const a of args) {
    const m = /^([A-Za-z_][A-Za-z0-9_]*)(:?=)(.*)$/s.exec(a);
    if (!m) throw usageError(`${JSON.stringify(a)}: expected KEY=VALUE (or KEY:=JSON)`);
    const [, key, op, raw] = m as unknown as [string, string, string, string];
    if (key in body || key in refs) throw usageError(`${key} is given twice`);
    if (op === ":=") {
      try {
        body[key] = JSON.parse(raw);
      } catch {
        throw usageError(`${key}:=${raw}: not valid JSON (strings need quotes: ${key}:='"text"')`);
      }
      continue;
    }
    if (o.refs?.[key] && !(`${key}_id` in body)) {
      refs[key] = raw;
      continue;
    }
    body[key] = convertValue(o, key, raw);
  }
  return { body, refs };
}

export function convertValue(o: ObjectInfo, key: string, raw: string): unknown {
  if (INTEGER_FIELD.test(key)) {
    if (raw === "") return null;
    if (/^-?\d+$/.test(raw)) return Number(raw);
    return raw; // the API answers with a message naming the field
  }
  if (BOOLEAN_FIELDS.has(key)) {
    const s = raw.toLowerCase();
    if (["true", "yes", "1", "on"].includes(s)) return true;
    if (["false", "no", "0", "off"].includes(s)) return false;
    throw usageError(`${key}=${raw}: expected true or false`);
  }
  if (o.listFields?.includes(key))
    return raw
      .split(",")
      .map((s) => s.trim())
      .filter(Boolean);
  return raw;
}
