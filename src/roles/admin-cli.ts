// `qvd admin …`: the command-line client of the admin REST API (it never touches the
// database). `qvd admin login` stores a session token; then `qvd admin <object> <verb>` for
// every object (list/get/new/set/del and the actions), tables for people, --json for scripts.
// Exit codes: 0 ok, 1 refused or partly failed, 2 usage, 3 not logged in, 4 forbidden,
// 5 not found, 6 conflict, 7 API unreachable.
import { defineCommand, type ArgsDef, type CommandDef } from "citty";
import { UserError } from "../errors.ts";
import {
  AdminClient, apiBase, connection, credentialsFile, deleteCredentials, EXIT, loadCredentials, saveCredentials, usageError,
  type ConnectionFlags,
} from "../admin/client.ts";
import { cell, describe, keyValues, printJson, table } from "../admin/format.ts";
import {
  fieldsParam, filterQuery, listQuery, objectByName, OBJECTS, parseAssignments, type ObjectInfo,
} from "../admin/objects.ts";
import { passwordFromFile, readPassword } from "../admin/prompt.ts";

// --- options every command takes ---------------------------------------------------------------

const connArgs = {
  url: { type: "string", description: "API URL, e.g. https://api.example.com:8443 (else QVD_ADMIN_URL, else the stored login)", valueHint: "URL" },
  token: { type: "string", description: "Session token (else QVD_ADMIN_TOKEN, else the stored login)", valueHint: "TOKEN" },
  ca: { type: "string", description: "Trust this CA or certificate (PEM) for the API's TLS (else QVD_ADMIN_CA)", valueHint: "FILE" },
  insecure: { type: "boolean", description: "Do not verify the API's certificate (a warning is printed)" },
  json: { type: "boolean", description: "Print the API's JSON as is, for scripts" },
} as const satisfies ArgsDef;

const VALUE_FLAGS = new Set(["url", "token", "ca"]);

/** Connection options and --json, read once from everything after `qvd admin` (any position). */
let globals: ConnectionFlags & { json: boolean } = { json: false };

function parseGlobals(rawArgs: string[]): typeof globals {
  const g: typeof globals = { json: false };
  for (let i = 0; i < rawArgs.length; i++) {
    const a = rawArgs[i]!;
    if (a === "--") break;
    const m = /^--([a-z-]+)(?:=(.*))?$/s.exec(a);
    if (!m) continue;
    const [, name, inline] = m as unknown as [string, string, string | undefined];
    if (VALUE_FLAGS.has(name)) {
      const v = inline ?? rawArgs[++i];
      if (v === undefined || v === "") throw usageError(`--${name} needs a value`);
      (g as unknown as Record<string, unknown>)[name] = v;
    } else if (name === "insecure") g.insecure = inline === undefined || inline !== "false";
    else if (name === "json") g.json = inline === undefined || inline !== "false";
  }
  return g;
}

let clientCache: AdminClient | undefined;
const client = (): AdminClient => (clientCache ??= new AdminClient(connection(globals)));

// --- command building --------------------------------------------------------------------------

interface Leaf {
  args: Record<string, any>;
  /** Positional arguments, in order. */
  pos: string[];
  /** Every --filter / -f, in order. */
  filters: string[];
  json: boolean;
}

const kebab = (s: string) => s.replace(/[A-Z]/g, (c) => "-" + c.toLowerCase());

/**
 * A leaf command. Unknown options and stray arguments are usage errors (exit 2); citty itself
 * accepts anything.
 */
function leaf(name: string, description: string, args: ArgsDef, run: (l: Leaf) => Promise<void>, maxPos = Infinity): CommandDef<any> {
  const all = { ...args, ...connArgs } as ArgsDef;
  const valueFlags = new Set<string>();
  const known = new Set<string>();
  for (const [k, d] of Object.entries(all)) {
    const def = d as { type?: string; alias?: string | string[] };
    if (def.type === "positional") continue;
    const names = [kebab(k), ...(Array.isArray(def.alias) ? def.alias : def.alias ? [def.alias] : [])];
    for (const n of names) {
      known.add(n);
      if (def.type === "string") valueFlags.add(n);
    }
  }
  return defineCommand({
    meta: { name, description },
    args: all,
    async run({ args, rawArgs }) {
      const filters: string[] = [];
      for (let i = 0; i < rawArgs.length; i++) {
        const a = rawArgs[i]!;
        if (a === "--") break;
        if (!a.startsWith("-") || a === "-") continue;
        const m = /^--?([^=]+)(=.*)?$/s.exec(a)!;
        const flag = m[1]!;
        const bare = flag.startsWith("no-") && known.has(flag.slice(3)) ? flag.slice(3) : flag;
        if (!known.has(bare)) throw usageError(`unknown option ${a.split("=")[0]}${/^-\d/.test(a) ? " (put -- before arguments that start with -)" : ""}; see --help`);
        if (valueFlags.has(bare) && m[2] === undefined) {
          if (rawArgs[i + 1] === undefined) throw usageError(`${a} needs a value`);
          if (bare === "filter" || bare === "f") filters.push(rawArgs[i + 1]!);
          i++;
        } else if ((bare === "filter" || bare === "f") && m[2] !== undefined) filters.push(m[2].slice(1));
      }
      const pos = (args._ as string[]).map(String);
      if (pos.length > maxPos) throw usageError(`unexpected argument ${JSON.stringify(pos[maxPos])}; see --help`);
      await run({ args, pos, filters, json: globals.json || Boolean(args.json) });
    },
  });
}

/** A group of subcommands; an unknown or missing subcommand is a usage error (exit 2). */
function group(name: string, description: string, subs: Record<string, CommandDef<any>>, aliases: Record<string, string> = {}, root = false): CommandDef<any> {
  const table: Record<string, CommandDef<any>> = { ...subs };
  // Aliases resolve (also for --help) but are not listed twice.
  for (const [alias, target] of Object.entries(aliases)) {
    const def = subs[target]!;
    table[alias] = { ...def, meta: { ...(def.meta as object), hidden: true } } as CommandDef<any>;
  }
  return defineCommand({
    meta: { name, description },
    args: connArgs,
    subCommands: table,
    setup({ rawArgs }) {
      const where = root ? "qvd admin" : `qvd admin ${name}`;
      if (root) {
        globals = parseGlobals(rawArgs);
        clientCache = undefined;
      }
      let i = 0;
      for (; i < rawArgs.length; i++) {
        const a = rawArgs[i]!;
        if (!a.startsWith("-")) break;
        const flag = a.replace(/^--?/, "");
        if (VALUE_FLAGS.has(flag)) i++;
      }
      const sub = rawArgs[i];
      const choices = Object.keys(subs).join(", ");
      if (sub === undefined) throw usageError(`${where} needs a command: ${choices} (see ${where} --help)`);
      if (!(sub in table)) throw usageError(`unknown command ${JSON.stringify(sub)}; ${where} takes: ${choices} (see ${where} --help)`);
    },
  });
}

const listArgs = {
  filter: { type: "string", alias: "f", description: "FIELD=VALUE, FIELD!=V, <, <=, >, >=, FIELD~PATTERN (% wildcard), FIELD@=A,B (one of), FIELD= (empty); repeatable", valueHint: "EXPR" },
} as const satisfies ArgsDef;

// --- helpers -----------------------------------------------------------------------------------

const objectOf = (path: string): ObjectInfo => OBJECTS.find((o) => o.path === path)!;
const plural = (o: ObjectInfo, n: number) => (n === 1 ? o.label : o.label === "audit entry" ? "audit entries" : o.label === "property" ? "properties" : `${o.label}s`);

/** An object's id from `ID`, `NAME` or `NAME@TENANT` (0 or several matches: an error). */
async function resolveId(o: ObjectInfo, ref: string): Promise<number> {
  if (/^\d+$/.test(ref)) return Number(ref);
  if (!o.nameField) throw usageError(`${plural(o, 2)} are named by id; ${JSON.stringify(ref)} is not one`);
  const fields = ["id", o.nameField, ...(o.tenantScoped ? ["tenant_name"] : [])].join(",");
  const find = async (q: Record<string, string>) =>
    (await client().get<{ items: Record<string, unknown>[] }>(`/${o.path}`, { ...q, fields, limit: "20" })).items;
  let rows = await find({ [o.nameField]: ref });
  const at = ref.lastIndexOf("@");
  if (rows.length === 0 && o.tenantScoped && at > 0) rows = await find({ [o.nameField]: ref.slice(0, at), tenant_name: ref.slice(at + 1) });
  if (rows.length === 1) return rows[0]!.id as number;
  if (rows.length === 0) throw new UserError(`no ${o.label} ${o.nameField === "name" ? "named" : `with ${o.nameField}`} ${JSON.stringify(ref)}`, EXIT.notFound);
  const which = rows.map((r) => `${r.id}${o.tenantScoped ? ` in tenant ${r.tenant_name}` : ""}`).join(", ");
  throw usageError(`${rows.length} ${plural(o, 2)} match ${JSON.stringify(ref)} (${which}); give the id${o.tenantScoped ? " or NAME@TENANT" : ""}`);
}

/** The body of new/set: `key=value` arguments, references looked up, passwords read safely. */
async function changesOf(o: ObjectInfo, pos: string[], args: Record<string, any>): Promise<Record<string, unknown>> {
  const { body, refs } = parseAssignments(o, pos);
  for (const [k, v] of Object.entries(refs)) body[`${k}_id`] = /^\d+$/.test(v) ? Number(v) : await resolveId(objectOf(o.refs![k]!), v);
  if (args["password-file"]) {
    if ("password" in body) throw usageError("give the password either as password=… or with --password-file, not both");
    body.password = passwordFromFile(args["password-file"]);
  } else if (body.password === "-") body.password = await readPassword(undefined, "New password: ");
  if (Object.keys(body).length === 0) throw usageError("nothing to change: give KEY=VALUE arguments");
  return body;
}

interface MassResult {
  total: number;
  ok: number;
  failed: number;
  results: { id: number; ok: boolean; status: number; error?: string; result?: unknown }[];
}

/** Prints a mass change's results (one line per object and a summary); exit 1 unless all succeeded. */
function massOutcome(o: ObjectInfo, verb: string, res: MassResult, json: boolean): void {
  if (json) printJson(res);
  else {
    for (const r of res.results) {
      const extra = r.result && typeof r.result === "object" ? " " + Object.entries(r.result).map(([k, v]) => `${k}=${cell(v)}`).join(" ") : "";
      console.log(r.ok ? `${o.label} ${r.id}: ok${extra}` : `${o.label} ${r.id}: failed (${r.status}): ${r.error}`);
    }
    console.log(`${verb}: ${res.total} ${plural(o, res.total)} matched, ${res.ok} ok, ${res.failed} failed`);
  }
  if (res.failed > 0) throw new UserError(`${verb}: ${res.failed} of ${res.total} ${plural(o, res.total)} failed`, EXIT.refused);
}

const ASSIGNMENT = /^[A-Za-z_][A-Za-z0-9_]*:?=/;

/**
 * Which objects a verb is about: one (ID or NAME, the first argument) or every object matching
 * --filter / --all. Without either, a mass change is refused (exit 2).
 */
function target(l: Leaf, o: ObjectInfo, verb: string): { ref?: string; mass?: URLSearchParams } {
  const all = Boolean(l.args.all);
  const first = l.pos[0];
  if (l.filters.length > 0 || all) {
    if (first !== undefined && (verb !== "set" || !ASSIGNMENT.test(first)))
      throw usageError(`give an ID or NAME, or --filter/--all, not both (${JSON.stringify(first)})`);
    return { mass: filterQuery(o, l.filters, all) };
  }
  if (first === undefined || (verb === "set" && ASSIGNMENT.test(first)))
    throw usageError(`${verb} of every ${o.label} needs --all; or give an ID, a NAME or --filter (see qvd admin ${o.name} ${verb} --help)`);
  return { ref: first };
}

const massArgs = {
  ...listArgs,
  all: { type: "boolean", description: "Apply to every object you can see (needed when there is no filter)" },
} as const satisfies ArgsDef;

// --- generic verbs -----------------------------------------------------------------------------

function listCmd(o: ObjectInfo): CommandDef<any> {
  const ex = o.name === "vm" ? "--filter state=running --filter user=alice" : o.name === "audit" ? "--filter action~vm.% --limit 20" : "--filter name~a% --sort -id";
  const aliases = Object.keys(o.fieldAliases).length ? `. Field aliases: ${Object.entries(o.fieldAliases).map(([a, f]) => `${a}=${f}`).join(", ")}` : "";
  return leaf("list", `List ${plural(o, 2)}. Example: qvd admin ${o.name} list ${ex}`,
    {
      filter: { ...listArgs.filter, description: listArgs.filter.description + aliases },
      sort: { type: "string", description: `Sort by fields, - for descending, e.g. -id,name${o.defaultSort ? ` (default ${o.defaultSort})` : ""}`, valueHint: "FIELDS" },
      limit: { type: "string", description: `At most N objects (API default 1000${o.defaultLimit ? `; here ${o.defaultLimit}` : ""})`, valueHint: "N" },
      offset: { type: "string", description: "Skip the first N objects", valueHint: "N" },
      fields: { type: "string", description: `Columns (and fields fetched), e.g. ${o.columns.slice(1, 4).join(",")}`, valueHint: "A,B" },
    },
    async (l) => {
      const q = listQuery(o, { filters: l.filters, sort: l.args.sort, limit: l.args.limit, offset: l.args.offset, fields: l.args.fields });
      const res = await client().get<{ total: number; limit: number; offset: number; items: Record<string, unknown>[] }>(`/${o.path}`, q);
      if (l.json) return printJson(res);
      if (res.items.length === 0) {
        console.error(res.total > 0 ? `no ${plural(o, 2)} at offset ${res.offset} (${res.total} in all)` : `no ${plural(o, 2)} found`);
        return;
      }
      const cols = l.args.fields ? [...new Set(["id", ...fieldsParam(o, l.args.fields)])] : o.columns;
      console.log(table(res.items, cols));
      if (res.offset > 0 || res.offset + res.items.length < res.total)
        console.error(`showing ${res.offset + 1}–${res.offset + res.items.length} of ${res.total} (use --limit and --offset for more)`);
    }, 0);
}

function getCmd(o: ObjectInfo): CommandDef<any> {
  const nameHint = o.nameField ? `ID or ${o.nameField.toUpperCase()}` : "ID";
  return leaf("get", `Show one ${o.label}, field by field. Example: qvd admin ${o.name} get ${o.nameField ? (o.name === "vm" ? "desk-alice" : "42") : "42"}`,
    { ref: { type: "positional", description: `The ${o.label}: ${nameHint}${o.tenantScoped && o.nameField ? " (or NAME@TENANT)" : ""}`, required: false, valueHint: "" } },
    async (l) => {
      if (!l.pos[0]) throw usageError(`give the ${o.label}'s ${nameHint}`);
      const row = await client().get(`/${o.path}/${await resolveId(o, l.pos[0])}`);
      if (l.json) printJson(row);
      else console.log(keyValues(row));
    }, 1);
}

const VALUE_RULES = "Values are text, except: integers for *_id, *_mb, *_s, cpu_shares and vcpus (empty = null); true/false for blocked, use_overlay, persistent, frontend, backend; KEY:=JSON sends JSON as is";

/** The fields of objects whose meaning is not in their name. */
const FIELD_NOTES: Record<string, string> = {
  osf: " Fields: name, description, memory_mb, cpu_shares, use_overlay, persistent; hypervisor=lxc|kvm (default lxc; changes only while the OSF has no images, which are of its kind: tarballs for lxc, qcow2 for kvm); KVM only: vcpus (1 to 64, default 1) and user_storage_mb (size of the user's home disk in MB, 0 = none).",
};

const passwordArgs = (o: ObjectInfo): ArgsDef =>
  o.name === "user" || o.name === "admin"
    ? { "password-file": { type: "string", description: "Set the password to this file's first line (password=- prompts instead)", valueHint: "FILE" } }
    : {};

function newCmd(o: ObjectInfo): CommandDef<any> {
  const examples: Record<string, string> = {
    tenant: "name=acme description='ACME Corp'",
    admin: "name=bob tenant=acme --password-file bob.pw",
    role: "name=helpdesk tenant=acme",
    user: "name=alice tenant=default password=-",
    vm: "name=desk-alice user=alice osf=desktop",
    osf: "name=desktop memory_mb=2048 tenant=default (a KVM one: name=vm hypervisor=kvm vcpus=2 user_storage_mb=4096)",
    di: "osf=desktop path=ubuntu-24.04.tar.gz",
    host: "name=node1 address=10.0.0.11",
    property: "key=department applies_to=user,vm tenant=default",
  };
  const refs = o.refs ? ` KEY=NAME for ${Object.keys(o.refs).join(", ")} looks up the id (or give ${Object.keys(o.refs).map((k) => `${k}_id`).join(", ")}).` : "";
  return leaf("new", `Create a ${o.label}. Example: qvd admin ${o.name} new ${examples[o.name] ?? "name=x"}`,
    { changes: { type: "positional", description: `KEY=VALUE … ${VALUE_RULES}.${refs}${FIELD_NOTES[o.name] ?? ""}`, required: false }, ...passwordArgs(o) },
    async (l) => {
      const body = await changesOf(o, l.pos, l.args);
      const row = (await client().call("POST", `/${o.path}`, { body })).body;
      if (l.json) printJson(row);
      else console.log(`created ${describe(o.label, row)}`);
    });
}

function setCmd(o: ObjectInfo): CommandDef<any> {
  const refs = o.refs ? ` KEY=NAME for ${Object.keys(o.refs).join(", ")} looks up the id.` : "";
  return leaf("set", `Change one ${o.label}, or every ${o.label} matching --filter (or --all). Example: qvd admin ${o.name} set ${o.name === "vm" ? "desk-alice di_tag=testing" : o.name === "osf" ? "desktop memory_mb=4096" : "42 description='…'"}; qvd admin ${o.name} set --filter ${o.name === "host" ? "name~node%" : "tenant=acme"} blocked=true`,
    {
      ref: { type: "positional", description: `ID or NAME (omit with --filter/--all)`, required: false },
      changes: { type: "positional", description: `KEY=VALUE … ${VALUE_RULES}.${refs}${FIELD_NOTES[o.name] ?? ""}`, required: false },
      ...massArgs, ...passwordArgs(o),
    },
    async (l) => {
      const t = target(l, o, "set");
      if (t.mass) {
        const body = await changesOf(o, l.pos, l.args);
        const res = (await client().call<MassResult>("PATCH", `/${o.path}`, { query: t.mass, body })).body;
        return massOutcome(o, "set", res, l.json);
      }
      const body = await changesOf(o, l.pos.slice(1), l.args);
      const id = await resolveId(o, t.ref!);
      const row = (await client().call("PATCH", `/${o.path}/${id}`, { body })).body;
      if (l.json) printJson(row);
      else console.log(`changed ${describe(o.label, row)}: ${Object.keys(body).map((k) => (k === "password" ? "password" : `${k}=${cell(body[k])}`)).join(" ")}`);
    });
}

function delCmd(o: ObjectInfo): CommandDef<any> {
  return leaf("del", `Delete one ${o.label} (ID or NAME), or every ${o.label} matching --filter (or --all). Example: qvd admin ${o.name} del 42; qvd admin ${o.name} del --filter ${o.name === "vm" ? "user=alice" : "name~test%"}`,
    { ref: { type: "positional", description: "ID or NAME (not with --filter/--all)", required: false }, ...massArgs },
    async (l) => {
      const t = target(l, o, "del");
      if (t.mass) {
        const res = (await client().call<MassResult>("DELETE", `/${o.path}`, { query: t.mass })).body;
        return massOutcome(o, "del", res, l.json);
      }
      const id = await resolveId(o, t.ref!);
      const res = (await client().call<{ deleted: Record<string, unknown> }>("DELETE", `/${o.path}/${id}`)).body;
      if (l.json) printJson(res);
      else console.log(`deleted ${describe(o.label, res.deleted, id)}`);
    }, 1);
}

// --- actions -----------------------------------------------------------------------------------

interface ActionInfo {
  verb: string;
  /** API action name (POST /<objects>/:id/<api>). */
  api: string;
  what: string;
  /** Flags whose values go into the body; "none" sends null (clears). */
  fields?: { flag: string; key: string; description: string; valueHint: string; required?: boolean }[];
}

const ACTIONS: Record<string, ActionInfo[]> = {
  vm: [
    { verb: "start", api: "start", what: "Start (a node is chosen if the VM has none)" },
    { verb: "stop", api: "stop", what: "Stop" },
    { verb: "disconnect", api: "disconnect", what: "Disconnect the user of" },
    { verb: "block", api: "block", what: "Block (cannot be started or connected to)",
      fields: [{ flag: "reason", key: "reason", description: "Why (shown with the VM)", valueHint: "TEXT" }] },
    { verb: "unblock", api: "unblock", what: "Unblock" },
    { verb: "clear-zombie", api: "clear_zombie", what: "Mark stopped a zombie whose node is lost, stopped or gone:" },
    { verb: "expire", api: "expire", what: "Set when the user is warned and the desktop stopped, for",
      fields: [
        { flag: "warn-at", key: "soft_at", description: "When the user is warned (local time, e.g. 2026-12-01T18:00, or ISO with a zone; none clears)", valueHint: "TIME" },
        { flag: "stop-at", key: "hard_at", description: "When the desktop is stopped (as --warn-at; none clears)", valueHint: "TIME" },
      ] },
  ],
  user: [
    { verb: "block", api: "block", what: "Block (cannot log in)" },
    { verb: "unblock", api: "unblock", what: "Unblock" },
    { verb: "disconnect", api: "disconnect", what: "Disconnect every session of" },
    { verb: "revoke-tokens", api: "revoke_tokens", what: "Revoke the L7R bearer tokens (qvd client --print-token) of" },
  ],
  host: [
    { verb: "block", api: "block", what: "Block (no new desktops on)" },
    { verb: "unblock", api: "unblock", what: "Unblock" },
    { verb: "stop-vms", api: "stop_vms", what: "Stop every VM of" },
    { verb: "drain", api: "drain", what: "Drain (no new desktops; its users move at their next connect)" },
    { verb: "undrain", api: "undrain", what: "End the drain of" },
    { verb: "declare-lost", api: "declare_lost", what: "Declare lost (its VMs are released to start elsewhere; a live node kills its desktops and rejoins)",
      fields: [{ flag: "reason", key: "reason", description: "Why (required; kept with the node)", valueHint: "TEXT", required: true }] },
  ],
  di: [
    { verb: "block", api: "block", what: "Block (VMs will not start from)" },
    { verb: "unblock", api: "unblock", what: "Unblock" },
  ],
};

function actionCmd(o: ObjectInfo, a: ActionInfo): CommandDef<any> {
  return leaf(a.verb, `${a.what} one ${o.label}, or every ${o.label} matching --filter (or --all). Example: qvd admin ${o.name} ${a.verb} 42; qvd admin ${o.name} ${a.verb} --filter ${o.name === "vm" ? "user=alice" : o.name === "host" ? "name~node%" : "tenant=acme"}`,
    {
      ref: { type: "positional", description: "ID or NAME (not with --filter/--all)", required: false },
      ...massArgs,
      ...Object.fromEntries((a.fields ?? []).map((f) => [f.flag, { type: "string", description: f.description, valueHint: f.valueHint }])),
    },
    async (l) => {
      const body: Record<string, unknown> = {};
      for (const f of a.fields ?? []) {
        const v = l.args[f.flag] as string | undefined;
        if (f.required && !v?.trim()) throw usageError(`${o.name} ${a.verb} needs --${f.flag} ${f.valueHint}`);
        if (v !== undefined) body[f.key] = v === "none" ? null : /^\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d)?$/.test(v) && f.valueHint === "TIME" ? new Date(v).toISOString() : v;
      }
      const t = target(l, o, a.verb);
      if (t.mass) {
        const res = (await client().call<MassResult>("POST", `/${o.path}/actions/${a.api}`, { query: t.mass, body })).body;
        return massOutcome(o, a.verb, res, l.json);
      }
      const id = await resolveId(o, t.ref!);
      const res = (await client().call<Record<string, unknown>>("POST", `/${o.path}/${id}/${a.api}`, { body })).body;
      if (l.json) return printJson(res);
      const row = (res[o.name === "admin" ? "administrator" : o.name] as Record<string, unknown> | undefined) ?? res;
      const extra = row === res ? "" : " " + Object.entries(res).filter(([k]) => k !== o.name).map(([k, v]) => `${k}=${cell(v)}`).join(" ");
      console.log(`${describe(o.label, row, id)}: ${a.verb} ok${extra}`);
    }, 1);
}

// --- properties --------------------------------------------------------------------------------

const PROPERTY_OBJECTS = new Set(["user", "vm", "host", "osf", "di"]);

function propCmds(o: ObjectInfo): Record<string, CommandDef<any>> {
  return {
    prop: leaf("prop", `Show a ${o.label}'s custom property values, one value, or set one. Example: qvd admin ${o.name} prop 42; qvd admin ${o.name} prop 42 department sales`,
      {
        ref: { type: "positional", description: "ID or NAME", required: false },
        key: { type: "positional", description: "Property key (defined with qvd admin property new)", required: false },
        value: { type: "positional", description: "New value", required: false },
      },
      async (l) => {
        const [ref, key, value] = l.pos;
        if (!ref) throw usageError(`give the ${o.label}'s ID or NAME`);
        const id = await resolveId(o, ref);
        if (value !== undefined) {
          const res = (await client().call("PUT", `/${o.path}/${id}/properties/${encodeURIComponent(key!)}`, { body: { value } })).body;
          if (l.json) return printJson(res);
          return console.log(`${o.label} ${id}: ${key} = ${value}`);
        }
        const values = await client().get<Record<string, string>>(`/${o.path}/${id}/properties`);
        if (key !== undefined) {
          if (!(key in values)) throw new UserError(`${o.label} ${id} has no value for property ${JSON.stringify(key)}`, EXIT.notFound);
          return l.json ? printJson({ [key]: values[key] }) : console.log(values[key]);
        }
        if (l.json) printJson(values);
        else if (Object.keys(values).length) console.log(keyValues(values));
        else console.error(`${o.label} ${id} has no property values`);
      }, 3),
    unprop: leaf("unprop", `Remove a custom property value from a ${o.label}. Example: qvd admin ${o.name} unprop 42 department`,
      { ref: { type: "positional", description: "ID or NAME", required: false }, key: { type: "positional", description: "Property key", required: false } },
      async (l) => {
        const [ref, key] = l.pos;
        if (!ref || !key) throw usageError(`give the ${o.label}'s ID or NAME and the property key`);
        const id = await resolveId(o, ref);
        const res = (await client().call("DELETE", `/${o.path}/${id}/properties/${encodeURIComponent(key)}`)).body;
        if (l.json) printJson(res);
        else console.log(`${o.label} ${id}: removed ${key}`);
      }, 2),
  };
}

// --- object-specific verbs ---------------------------------------------------------------------

const DI = objectByName("di")!;
const ROLE = objectByName("role")!;
const ADMIN = objectByName("admin")!;

function diCmds(): Record<string, CommandDef<any>> {
  const two = (verb: string, description: string, run: (id: number, tag: string, l: Leaf) => Promise<void>) =>
    leaf(verb, description,
      { di: { type: "positional", description: "Image: ID or VERSION", required: false }, tag: { type: "positional", description: "Tag", required: false } },
      async (l) => {
        const [ref, tag] = l.pos;
        if (!ref || !tag) throw usageError(`give the image (ID or VERSION) and the tag: qvd admin di ${verb} 7 default`);
        await run(await resolveId(DI, ref), tag, l);
      }, 2);
  return {
    tag: two("tag", "Put a tag on an image; it moves from the OSF's image that had it. Example: qvd admin di tag 7 default", async (id, tag, l) => {
      const res = (await client().call<{ di: Record<string, unknown>; previous_di_id: number | null }>("POST", `/dis/${id}/tags`, { body: { tag } })).body;
      if (l.json) return printJson(res);
      console.log(`${describe("di", res.di)}: tagged ${tag}${res.previous_di_id !== null ? ` (moved from di ${res.previous_di_id})` : ""}; tags: ${cell(res.di.tags)}`);
    }),
    untag: two("untag", "Remove a tag from an image (not head, default or its version). Example: qvd admin di untag 7 testing", async (id, tag, l) => {
      const row = (await client().call<Record<string, unknown>>("DELETE", `/dis/${id}/tags/${encodeURIComponent(tag)}`)).body;
      if (l.json) return printJson(row);
      console.log(`${describe("di", row)}: untagged ${tag}; tags: ${cell(row.tags)}`);
    }),
  };
}

function roleCmds(): Record<string, CommandDef<any>> {
  const acl = (verb: string, description: string, call: (id: number, acl: string) => Promise<Record<string, unknown>>, done: string) =>
    leaf(verb, description,
      { role: { type: "positional", description: "Role: ID or NAME", required: false }, acl: { type: "positional", description: "ACL name(s), e.g. vm.start (see qvd admin acls)", required: false } },
      async (l) => {
        const [ref, ...acls] = l.pos;
        if (!ref || acls.length === 0) throw usageError(`give the role and at least one ACL: qvd admin role ${verb} helpdesk vm.start`);
        const id = await resolveId(ROLE, ref);
        let row: Record<string, unknown> = {};
        for (const a of acls) {
          row = await call(id, a);
          if (!l.json) console.log(`${describe("role", row)}: ${done} ${a}`);
        }
        if (l.json) printJson(row);
      });
  const parent = (verb: string, description: string, method: "POST" | "DELETE", done: string) =>
    leaf(verb, description,
      { role: { type: "positional", description: "Role: ID or NAME", required: false }, parent: { type: "positional", description: "The inherited role: ID or NAME", required: false } },
      async (l) => {
        const [ref, p] = l.pos;
        if (!ref || !p) throw usageError(`give the role and the role it inherits: qvd admin role ${verb} helpdesk Operator`);
        const id = await resolveId(ROLE, ref);
        const pid = await resolveId(ROLE, p);
        const row = (method === "POST"
          ? await client().call("POST", `/roles/${id}/inherits`, { body: { role_id: pid } })
          : await client().call("DELETE", `/roles/${id}/inherits/${pid}`)).body;
        if (l.json) return printJson(row);
        console.log(`${describe("role", row)}: ${done} ${p}; inherits: ${cell(row.inherits)}`);
      }, 2);
  return {
    grant: acl("grant", "Grant ACLs in a role. Example: qvd admin role grant helpdesk vm.start vm.stop",
      async (id, a) => (await client().call("PUT", `/roles/${id}/acls`, { body: { acl: a, positive: true } })).body, "granted"),
    deny: acl("deny", "Deny ACLs in a role (even when an inherited role grants them). Example: qvd admin role deny helpdesk vm.delete",
      async (id, a) => (await client().call("PUT", `/roles/${id}/acls`, { body: { acl: a, positive: false } })).body, "denied"),
    ungrant: acl("ungrant", "Remove a role's own grant or denial of ACLs (inherited ones stay). Example: qvd admin role ungrant helpdesk vm.stop",
      async (id, a) => (await client().call("DELETE", `/roles/${id}/acls/${encodeURIComponent(a)}`)).body, "removed"),
    inherit: parent("inherit", "Make a role inherit another. Example: qvd admin role inherit helpdesk Operator", "POST", "now inherits"),
    uninherit: parent("uninherit", "Stop a role inheriting another. Example: qvd admin role uninherit helpdesk Operator", "DELETE", "no longer inherits"),
    acls: leaf("acls", "A role's effective ACLs (own grants, inherited, minus denials). Example: qvd admin role acls helpdesk",
      { role: { type: "positional", description: "Role: ID or NAME", required: false } },
      async (l) => {
        if (!l.pos[0]) throw usageError("give the role: ID or NAME");
        const res = await client().get<{ items: string[] }>(`/roles/${await resolveId(ROLE, l.pos[0])}/acls`);
        if (l.json) printJson(res);
        else for (const a of res.items) console.log(a);
      }, 1),
  };
}

/** `%` any run of characters and `_` any one character, as in SQL LIKE. */
export function likePattern(pattern: string): RegExp {
  const re = pattern.replace(/[.*+?^${}()|[\]\\]/g, "\\$&").replace(/%/g, ".*").replace(/_/g, ".");
  return new RegExp(`^${re}$`);
}

function adminCmds(): Record<string, CommandDef<any>> {
  const roleOp = (verb: string, description: string, run: (id: number, rid: number) => Promise<Record<string, unknown>>, done: string) =>
    leaf(verb, description,
      { admin: { type: "positional", description: "Administrator: ID or NAME", required: false }, role: { type: "positional", description: "Role: ID or NAME", required: false } },
      async (l) => {
        const [ref, r] = l.pos;
        if (!ref || !r) throw usageError(`give the administrator and the role: qvd admin admin ${verb} bob Operator`);
        const row = await run(await resolveId(ADMIN, ref), await resolveId(ROLE, r));
        if (l.json) return printJson(row);
        console.log(`${describe("administrator", row)}: ${done} ${r}; roles: ${cell(row.roles)}`);
      }, 2);
  const acls = async (ref: string) => (await client().get<{ items: string[] }>(`/administrators/${await resolveId(ADMIN, ref)}/acls`)).items;
  return {
    assign: roleOp("assign", "Give an administrator a role. Example: qvd admin admin assign bob Operator",
      async (id, rid) => (await client().call("POST", `/administrators/${id}/roles`, { body: { role_id: rid } })).body, "assigned"),
    unassign: roleOp("unassign", "Take a role from an administrator. Example: qvd admin admin unassign bob Operator",
      async (id, rid) => (await client().call("DELETE", `/administrators/${id}/roles/${rid}`)).body, "unassigned"),
    acls: leaf("acls", "An administrator's effective ACLs. Example: qvd admin admin acls bob",
      { admin: { type: "positional", description: "Administrator: ID or NAME", required: false } },
      async (l) => {
        if (!l.pos[0]) throw usageError("give the administrator: ID or NAME");
        const items = await acls(l.pos[0]);
        if (l.json) printJson({ items });
        else for (const a of items) console.log(a);
      }, 1),
    can: leaf("can", "The administrator's effective ACLs matching a pattern (% any text, _ one character); exit 0 when at least one matches, 1 when none. Example: qvd admin admin can bob vm.%",
      {
        admin: { type: "positional", description: "Administrator: ID or NAME", required: false },
        pattern: { type: "positional", description: "ACL pattern, e.g. vm.% or user.block", required: false },
      },
      async (l) => {
        const [ref, pattern] = l.pos;
        if (!ref || !pattern) throw usageError("give the administrator and an ACL pattern: qvd admin admin can bob vm.%");
        const re = likePattern(pattern);
        const matching = (await acls(ref)).filter((a) => re.test(a));
        if (l.json) printJson({ pattern, items: matching });
        else for (const a of matching) console.log(a);
        if (matching.length === 0) throw new UserError(`${ref} has no ACL matching ${JSON.stringify(pattern)}`, EXIT.refused);
      }, 2),
  };
}

// --- objects -----------------------------------------------------------------------------------

function objectCommand(o: ObjectInfo): CommandDef<any> {
  const subs: Record<string, CommandDef<any>> = { list: listCmd(o), get: getCmd(o) };
  const aliases: Record<string, string> = { ls: "list", show: "get" };
  if (o.name !== "audit") {
    subs.new = newCmd(o);
    subs.set = setCmd(o);
    subs.del = delCmd(o);
    Object.assign(aliases, { create: "new", add: "new", update: "set", delete: "del", rm: "del" });
  }
  for (const a of ACTIONS[o.name] ?? []) subs[a.verb] = actionCmd(o, a);
  if (o.name === "host") aliases.stop_vms = "stop-vms";
  if (o.name === "di") Object.assign(subs, diCmds());
  if (o.name === "role") Object.assign(subs, roleCmds());
  if (o.name === "admin") Object.assign(subs, adminCmds());
  if (PROPERTY_OBJECTS.has(o.name)) Object.assign(subs, propCmds(o));
  const label = o.name === "audit" ? "The audit log" : o.name === "admin" ? "Administrators" : o.name === "di" ? "Disk images" : o.name === "osf" ? "OS flavours" : o.name === "vm" ? "Virtual machines (desktops)" : o.name === "host" ? "Nodes" : o.name === "property" ? "Custom property definitions" : `${o.label[0]!.toUpperCase()}${o.label.slice(1)}s`;
  return group(o.name, `${label}: ${Object.keys(subs).join(", ")}`, subs);
}

// --- configuration, sessions -------------------------------------------------------------------

const TENANTS = objectByName("tenant")!;
const tenantArg = { tenant: { type: "string", description: "A tenant's view or override (ID or NAME; superadministrators only, else your own)", valueHint: "TENANT" } } as const satisfies ArgsDef;
const tenantIdOf = async (t: string | undefined) => (t === undefined ? undefined : await resolveId(TENANTS, t));

interface ConfigItem { key: string; doc: string; default: string | null; value: string | null; source: string }

const configCommand = group("config", "Cluster settings stored in the database: list, get, set, unset", {
  list: leaf("list", "Every cluster setting: effective value, source (default, global, tenant) and default. Example: qvd admin config list --tenant acme",
    { ...tenantArg, doc: { type: "boolean", description: "Add each setting's documentation" } },
    async (l) => {
      const tid = await tenantIdOf(l.args.tenant);
      const res = await client().get<{ tenant_id: number; items: ConfigItem[] }>("/configs", tid === undefined ? undefined : { tenant_id: String(tid) });
      if (l.json) return printJson(res);
      console.log(table(res.items as unknown as Record<string, unknown>[], ["key", "value", "source", "default", ...(l.args.doc ? ["doc"] : [])]));
    }, 0),
  get: leaf("get", "One cluster setting's effective value. Example: qvd admin config get vm.network.range",
    { key: { type: "positional", description: "Setting", required: false }, ...tenantArg },
    async (l) => {
      if (!l.pos[0]) throw usageError("give the setting's key");
      const tid = await tenantIdOf(l.args.tenant);
      const res = await client().get<{ tenant_id: number; items: ConfigItem[] }>("/configs", tid === undefined ? undefined : { tenant_id: String(tid) });
      const item = res.items.find((i) => i.key === l.pos[0]);
      if (!item) throw new UserError(`no cluster setting ${JSON.stringify(l.pos[0])} (see qvd admin config list)`, EXIT.notFound);
      if (l.json) printJson(item);
      else console.log(item.value ?? "");
    }, 1),
  set: leaf("set", "Set a cluster setting globally, or for one tenant with --tenant. Example: qvd admin config set vm.network.range 10.3.0.0/16",
    { key: { type: "positional", description: "Setting", required: false }, value: { type: "positional", description: "Value", required: false }, ...tenantArg },
    async (l) => {
      const [key, value] = l.pos;
      if (!key || value === undefined) throw usageError("give the setting's key and value: qvd admin config set KEY VALUE");
      const tid = await tenantIdOf(l.args.tenant);
      const res = (await client().call("PUT", `/configs/${encodeURIComponent(key)}`, { body: { value, ...(tid !== undefined ? { tenant_id: tid } : {}) } })).body;
      if (l.json) return printJson(res);
      console.log(`set ${key} = ${value}${tid !== undefined ? ` for tenant ${tid}` : ""}`);
    }, 2),
  unset: leaf("unset", "Remove an override (global, or a tenant's with --tenant): the setting falls back. Example: qvd admin config unset vm.network.range",
    { key: { type: "positional", description: "Setting", required: false }, ...tenantArg },
    async (l) => {
      if (!l.pos[0]) throw usageError("give the setting's key");
      const tid = await tenantIdOf(l.args.tenant);
      const res = (await client().call("DELETE", `/configs/${encodeURIComponent(l.pos[0])}`, { query: tid === undefined ? {} : { tenant_id: String(tid) } })).body;
      if (l.json) return printJson(res);
      console.log(`unset ${l.pos[0]}${tid !== undefined ? ` for tenant ${tid}` : ""}`);
    }, 1),
}, { ls: "list", show: "get", del: "unset" });

const sessionCommand = group("session", "Administrator sessions: list, end", {
  list: leaf("list", "Live administrator sessions. Example: qvd admin session list", {},
    async (l) => {
      const res = await client().get<{ items: Record<string, unknown>[] }>("/sessions");
      if (l.json) return printJson(res);
      if (res.items.length === 0) return console.error("no sessions");
      console.log(table(res.items, ["id", "administrator_name", "tenant_id", "source", "address", "last_seen_at", "expires_at"]));
    }, 0),
  end: leaf("end", "End an administrator's session (its id from session list). Example: qvd admin session end 3f2a9c0b7d1e",
    { sid: { type: "positional", description: "Session id", required: false } },
    async (l) => {
      if (!l.pos[0]) throw usageError("give the session id (see qvd admin session list)");
      const res = (await client().call("DELETE", `/sessions/${encodeURIComponent(l.pos[0])}`)).body;
      if (l.json) return printJson(res);
      console.log(`ended session ${l.pos[0]}`);
    }, 1),
}, { ls: "list", del: "end" });

// --- login, logout, whoami, stats, acls --------------------------------------------------------

const login = leaf("login",
  "Log in and store the session token (mode 0600, in $XDG_CONFIG_HOME/qvd/admin.json). Example: qvd admin login --url https://api.example.com:8443 --name superadmin",
  {
    name: { type: "string", description: "Administrator name (NAME@TENANT names the tenant too)", valueHint: "NAME" },
    tenant: { type: "string", description: "Tenant of the administrator (default: the global scope, then default)", valueHint: "TENANT" },
    "password-file": { type: "string", description: "Read the password from this file's first line (else a prompt on the terminal, else the first line of standard input)", valueHint: "FILE" },
  },
  async (l) => {
    const stored = loadCredentials();
    const url = globals.url || process.env.QVD_ADMIN_URL || stored?.url;
    if (!url) throw usageError("give the API's address: qvd admin login --url https://HOST:PORT --name NAME");
    const sameApi = stored && apiBase(stored.url) === apiBase(url);
    const name: string | undefined = l.args.name || (sameApi ? stored!.name : undefined);
    if (!name) throw usageError("give your administrator name: --name NAME");
    const tenant: string | undefined = l.args.tenant ?? (sameApi && !l.args.name ? stored!.tenant : undefined);
    const conn = connection({ ...globals, url, token: undefined }, { needToken: false });
    const c = new AdminClient({ ...conn, token: undefined });
    const password = await readPassword(l.args["password-file"], `Password for ${name}${tenant ? `@${tenant}` : ""} at ${conn.base}: `);
    const res = (await c.call<{ token: string; expires_at: string; administrator: { name: string; tenant_name: string } }>("POST", "/login", {
      body: { name, password, ...(tenant !== undefined && !name.includes("@") ? { tenant } : {}) },
      token: false,
    })).body;
    saveCredentials({
      url: conn.base, token: res.token, name: res.administrator.name, tenant: res.administrator.tenant_name,
      ...(conn.ca ? { ca: conn.ca } : {}), ...(conn.insecure ? { insecure: true } : {}),
    });
    if (l.json) return printJson({ url: conn.base, administrator: res.administrator, expires_at: res.expires_at, credentials: credentialsFile() });
    console.log(`logged in to ${conn.base} as ${res.administrator.name} (tenant ${res.administrator.tenant_name}); credentials in ${credentialsFile()}`);
  }, 0);

const logout = leaf("logout", "End the session on the API and delete the stored credentials. Example: qvd admin logout", {},
  async () => {
    let conn;
    try {
      conn = connection(globals);
    } catch (err) {
      if (err instanceof UserError && err.exitCode === EXIT.unauthenticated) {
        deleteCredentials();
        return console.error("not logged in");
      }
      throw err;
    }
    try {
      await new AdminClient(conn).call("POST", "/logout");
    } catch (err) {
      if (!(err instanceof UserError && err.exitCode === EXIT.unauthenticated)) {
        deleteCredentials();
        console.error(`qvd: warning: the session could not be ended on the API (${err instanceof Error ? err.message : String(err)}); the stored credentials are deleted anyway`);
        return;
      }
    }
    deleteCredentials();
    console.log(`logged out of ${conn.base}`);
  }, 0);

const whoami = leaf("whoami", "Who you are logged in as, where, and with how many ACLs. Example: qvd admin whoami", {},
  async (l) => {
    const res = await client().get<{ administrator: Record<string, unknown>; acls: string[]; multitenant: boolean }>("/session");
    if (l.json) return printJson(res);
    const a = res.administrator;
    console.log(keyValues({
      api: client().conn.base, name: a.name, id: a.id, tenant: a.tenant_name, superadmin: a.superadmin, roles: a.roles,
      acls: res.acls.length, multitenant: res.multitenant,
    }));
  }, 0);

const stats = leaf("stats", "Dashboard counts: users, VMs, nodes, OSFs, images. Example: qvd admin stats", {},
  async (l) => {
    const res = await client().get<Record<string, unknown>>("/stats");
    if (l.json) printJson(res);
    else console.log(keyValues(res));
  }, 0);

const aclsCmd = leaf("acls", "The ACL catalogue, optionally matching a pattern (% wildcard). Example: qvd admin acls vm.%",
  { pattern: { type: "positional", description: "ACL pattern", required: false } },
  async (l) => {
    const res = await client().get<{ items: { name: string; description: string }[] }>("/acls");
    const items = l.pos[0] ? res.items.filter((i) => likePattern(l.pos[0]!).test(i.name)) : res.items;
    if (l.json) return printJson({ items });
    console.log(table(items, ["name", "description"]));
  }, 1);

// --- the tree ----------------------------------------------------------------------------------

const objectCommands: Record<string, CommandDef<any>> = {};
const objectAliases: Record<string, string> = {};
for (const o of OBJECTS) {
  objectCommands[o.name] = objectCommand(o);
  for (const a of o.aliases) objectAliases[a] = o.name;
}
objectCommands.config = configCommand;
objectAliases.configs = "config";
objectCommands.session = sessionCommand;
objectAliases.sessions = "session";

export default group(
  "admin",
  "Administer QVD through the admin API: login, then `qvd admin <object> <verb>`. Exit codes: 0 ok, 1 refused or partly failed, 2 usage, 3 not logged in, 4 forbidden, 5 not found, 6 conflict, 7 API unreachable",
  { login, logout, whoami, stats, acls: aclsCmd, ...objectCommands },
  objectAliases,
  true,
);
