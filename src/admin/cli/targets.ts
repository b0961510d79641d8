// What the per-object commands share: which objects a command is about (an ID, a NAME, or
// --filter / --all), the body of new/set, and the report of a mass change.
import type { ArgsDef } from "citty";
import { UserError } from "../../errors.ts";
import { EXIT, usageError } from "../client.ts";
import { cell, printJson } from "../format.ts";
import { filterQuery, OBJECTS, parseAssignments, type ObjectInfo } from "../objects.ts";
import { passwordFromFile, readPassword } from "../prompt.ts";
import type { Leaf } from "./framework.ts";

export const listArgs = {
  filter: {
    type: "string",
    alias: "f",
    description:
      "FIELD=VALUE, FIELD!=V, <, <=, >, >=, FIELD~PATTERN (% wildcard), FIELD@=A,B (one of), FIELD= (empty); repeatable",
    valueHint: "EXPR",
  },
} as const satisfies ArgsDef;

export const massArgs = {
  ...listArgs,
  all: { type: "boolean", description: "Apply to every object you can see (needed when there is no filter)" },
} as const satisfies ArgsDef;

const objectOf = (path: string): ObjectInfo => OBJECTS.find((o) => o.path === path)!;
export const plural = (o: ObjectInfo, n: number) =>
  n === 1
    ? o.label
    : o.label === "audit entry"
      ? "audit entries"
      : o.label === "property"
        ? "properties"
        : `${o.label}s`;

/** An object's id from `ID`, `NAME` or `NAME@TENANT` (0 or several matches: an error). */
export async function resolveId(l: Leaf, o: ObjectInfo, ref: string): Promise<number> {
  if (/^\d+$/.test(ref)) return Number(ref);
  if (!o.nameField) throw usageError(`${plural(o, 2)} are named by id; ${JSON.stringify(ref)} is not one`);
  const fields = ["id", o.nameField, ...(o.tenantScoped ? ["tenant_name"] : [])].join(",");
  const find = async (q: Record<string, string>) =>
    (await l.client().get<{ items: Record<string, unknown>[] }>(`/${o.path}`, { ...q, fields, limit: "20" })).items;
  let rows = await find({ [o.nameField]: ref });
  const at = ref.lastIndexOf("@");
  if (rows.length === 0 && o.tenantScoped && at > 0)
    rows = await find({ [o.nameField]: ref.slice(0, at), tenant_name: ref.slice(at + 1) });
  if (rows.length === 1) return rows[0]!.id as number;
  if (rows.length === 0)
    throw new UserError(
      `no ${o.label} ${o.nameField === "name" ? "named" : `with ${o.nameField}`} ${JSON.stringify(ref)}`,
      EXIT.notFound,
    );
  const which = rows.map((r) => `${r.id}${o.tenantScoped ? ` in tenant ${r.tenant_name}` : ""}`).join(", ");
  throw usageError(
    `${rows.length} ${plural(o, 2)} match ${JSON.stringify(ref)} (${which}); give the id${o.tenantScoped ? " or NAME@TENANT" : ""}`,
  );
}

/** The body of new/set: `key=value` arguments, references looked up, passwords read safely. */
export async function changesOf(l: Leaf, o: ObjectInfo, pos: string[]): Promise<Record<string, unknown>> {
  const { body, refs } = parseAssignments(o, pos);
  for (const [k, v] of Object.entries(refs))
    body[`${k}_id`] = /^\d+$/.test(v) ? Number(v) : await resolveId(l, objectOf(o.refs![k]!), v);
  if (l.args["password-file"]) {
    if ("password" in body)
      throw usageError("give the password either as password=… or with --password-file, not both");
    body.password = passwordFromFile(l.args["password-file"]);
  } else if (body.password === "-") body.password = await readPassword(undefined, "New password: ");
  if (Object.keys(body).length === 0) throw usageError("nothing to change: give KEY=VALUE arguments");
  return body;
}

export interface MassResult {
  total: number;
  ok: number;
  failed: number;
  results: { id: number; ok: boolean; status: number; error?: string; result?: unknown }[];
}

/** Prints a mass change's results (one line per object and a summary); exit 1 unless all succeeded. */
export function massOutcome(o: ObjectInfo, verb: string, res: MassResult, json: boolean): void {
  if (json) printJson(res);
  else {
    for (const r of res.results) {
      const extra =
        r.result && typeof r.result === "object"
          ? " " +
            Object.entries(r.result)
              .map(([k, v]) => `${k}=${cell(v)}`)
              .join(" ")
          : "";
      console.log(r.ok ? `${o.label} ${r.id}: ok${extra}` : `${o.label} ${r.id}: failed (${r.status}): ${r.error}`);
    }
    console.log(`${verb}: ${res.total} ${plural(o, res.total)} matched, ${res.ok} ok, ${res.failed} failed`);
  }
  if (res.failed > 0)
    throw new UserError(`${verb}: ${res.failed} of ${res.total} ${plural(o, res.total)} failed`, EXIT.refused);
}

const ASSIGNMENT = /^[A-Za-z_][A-Za-z0-9_]*:?=/;

/**
 * Which objects a verb is about: one (ID or NAME, the first argument) or every object matching
 * --filter / --all. Without either, a mass change is refused (exit 2).
 */
export function target(l: Leaf, o: ObjectInfo, verb: string): { ref?: string; mass?: URLSearchParams } {
  const all = Boolean(l.args.all);
  const first = l.pos[0];
  if (l.filters.length > 0 || all) {
    if (first !== undefined && (verb !== "set" || !ASSIGNMENT.test(first)))
      throw usageError(`give an ID or NAME, or --filter/--all, not both (${JSON.stringify(first)})`);
    return { mass: filterQuery(o, l.filters, all) };
  }
  if (first === undefined || (verb === "set" && ASSIGNMENT.test(first)))
    throw usageError(
      `${verb} of every ${o.label} needs --all; or give an ID, a NAME or --filter (see qvd admin ${o.name} ${verb} --help)`,
    );
  return { ref: first };
}
