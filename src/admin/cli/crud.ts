// The verbs every object has: list and get, and (but for the audit log) new, set and del.
import type { ArgsDef } from "citty";
import { usageError } from "../client.ts";
import { cell, describe, keyValues, printJson, table } from "../format.ts";
import { fieldsParam, listQuery, type ObjectInfo } from "../objects.ts";
import { leaf, type Command } from "./framework.ts";
import { changesOf, listArgs, massArgs, massOutcome, plural, resolveId, target, type MassResult } from "./targets.ts";

export function listCmd(o: ObjectInfo): Command {
  const ex =
    o.name === "vm"
      ? "--filter state=running --filter user=alice"
      : o.name === "audit"
        ? "--filter action~vm.% --limit 20"
        : "--filter name~a% --sort -id";
  const aliases = Object.keys(o.fieldAliases).length
    ? `. Field aliases: ${Object.entries(o.fieldAliases)
        .map(([a, f]) => `${a}=${f}`)
        .join(", ")}`
    : "";
  return leaf(
    "list",
    `List ${plural(o, 2)}. Example: qvd admin ${o.name} list ${ex}`,
    {
      filter: { ...listArgs.filter, description: listArgs.filter.description + aliases },
      sort: {
        type: "string",
        description: `Sort by fields, - for descending, e.g. -id,name${o.defaultSort ? ` (default ${o.defaultSort})` : ""}`,
        valueHint: "FIELDS",
      },
      limit: {
        type: "string",
        description: `At most N objects (API default 1000${o.defaultLimit ? `; here ${o.defaultLimit}` : ""})`,
        valueHint: "N",
      },
      offset: { type: "string", description: "Skip the first N objects", valueHint: "N" },
      fields: {
        type: "string",
        description: `Columns (and fields fetched), e.g. ${o.columns.slice(1, 4).join(",")}`,
        valueHint: "A,B",
      },
    },
    async (l) => {
      const q = listQuery(o, {
        filters: l.filters,
        sort: l.args.sort,
        limit: l.args.limit,
        offset: l.args.offset,
        fields: l.args.fields,
      });
      const res = await l
        .client()
        .get<{ total: number; limit: number; offset: number; items: Record<string, unknown>[] }>(`/${o.path}`, q);
      if (l.json) return printJson(res);
      if (res.items.length === 0) {
        console.error(
          res.total > 0
            ? `no ${plural(o, 2)} at offset ${res.offset} (${res.total} in all)`
            : `no ${plural(o, 2)} found`,
        );
        return;
      }
      const cols = l.args.fields ? [...new Set(["id", ...fieldsParam(o, l.args.fields)])] : o.columns;
      console.log(table(res.items, cols));
      if (res.offset > 0 || res.offset + res.items.length < res.total)
        console.error(
          `showing ${res.offset + 1}–${res.offset + res.items.length} of ${res.total} (use --limit and --offset for more)`,
        );
    },
    0,
  );
}

export function getCmd(o: ObjectInfo): Command {
  const nameHint = o.nameField ? `ID or ${o.nameField.toUpperCase()}` : "ID";
  return leaf(
    "get",
    `Show one ${o.label}, field by field. Example: qvd admin ${o.name} get ${o.nameField ? (o.name === "vm" ? "desk-alice" : "42") : "42"}`,
    {
      ref: {
        type: "positional",
        description: `The ${o.label}: ${nameHint}${o.tenantScoped && o.nameField ? " (or NAME@TENANT)" : ""}`,
        required: false,
        valueHint: "",
      },
    },
    async (l) => {
      if (!l.pos[0]) throw usageError(`give the ${o.label}'s ${nameHint}`);
      const row = await l.client().get(`/${o.path}/${await resolveId(l, o, l.pos[0])}`);
      if (l.json) printJson(row);
      else console.log(keyValues(row));
    },
    1,
  );
}

const VALUE_RULES =
  "Values are text, except: integers for *_id, *_mb, *_s, cpu_shares and vcpus (empty = null); true/false for blocked, use_overlay, persistent, frontend, backend; KEY:=JSON sends JSON as is";

/** The fields of objects whose meaning is not in their name. */
const FIELD_NOTES: Record<string, string> = {
  osf: " Fields: name, description, memory_mb, cpu_shares, use_overlay, persistent; hypervisor=lxc|kvm (default lxc; changes only while the OSF has no images, which are of its kind: tarballs for lxc, qcow2 for kvm); KVM only: vcpus (1 to 64, default 1) and user_storage_mb (size of the user's home disk in MB, 0 = none).",
};

const passwordArgs = (o: ObjectInfo): ArgsDef =>
  o.name === "user" || o.name === "admin"
    ? {
        "password-file": {
          type: "string",
          description: "Set the password to this file's first line (password=- prompts instead)",
          valueHint: "FILE",
        },
      }
    : {};

export function newCmd(o: ObjectInfo): Command {
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
  const refs = o.refs
    ? ` KEY=NAME for ${Object.keys(o.refs).join(", ")} looks up the id (or give ${Object.keys(o.refs)
        .map((k) => `${k}_id`)
        .join(", ")}).`
    : "";
  return leaf(
    "new",
    `Create a ${o.label}. Example: qvd admin ${o.name} new ${examples[o.name] ?? "name=x"}`,
    {
      changes: {
        type: "positional",
        description: `KEY=VALUE … ${VALUE_RULES}.${refs}${FIELD_NOTES[o.name] ?? ""}`,
        required: false,
      },
      ...passwordArgs(o),
    },
    async (l) => {
      const body = await changesOf(l, o, l.pos);
      const row = (await l.client().call("POST", `/${o.path}`, { body })).body;
      if (l.json) printJson(row);
      else console.log(`created ${describe(o.label, row)}`);
    },
  );
}

export function setCmd(o: ObjectInfo): Command {
  const refs = o.refs ? ` KEY=NAME for ${Object.keys(o.refs).join(", ")} looks up the id.` : "";
  return leaf(
    "set",
    `Change one ${o.label}, or every ${o.label} matching --filter (or --all). Example: qvd admin ${o.name} set ${o.name === "vm" ? "desk-alice di_tag=testing" : o.name === "osf" ? "desktop memory_mb=4096" : "42 description='…'"}; qvd admin ${o.name} set --filter ${o.name === "host" ? "name~node%" : "tenant=acme"} blocked=true`,
    {
      ref: { type: "positional", description: `ID or NAME (omit with --filter/--all)`, required: false },
      changes: {
        type: "positional",
        description: `KEY=VALUE … ${VALUE_RULES}.${refs}${FIELD_NOTES[o.name] ?? ""}`,
        required: false,
      },
      ...massArgs,
      ...passwordArgs(o),
    },
    async (l) => {
      const t = target(l, o, "set");
      if (t.mass) {
        const body = await changesOf(l, o, l.pos);
        const res = (await l.client().call<MassResult>("PATCH", `/${o.path}`, { query: t.mass, body })).body;
        return massOutcome(o, "set", res, l.json);
      }
      const body = await changesOf(l, o, l.pos.slice(1));
      const id = await resolveId(l, o, t.ref!);
      const row = (await l.client().call("PATCH", `/${o.path}/${id}`, { body })).body;
      if (l.json) printJson(row);
      else
        console.log(
          `changed ${describe(o.label, row)}: ${Object.keys(body)
            .map((k) => (k === "password" ? "password" : `${k}=${cell(body[k])}`))
            .join(" ")}`,
        );
    },
  );
}

export function delCmd(o: ObjectInfo): Command {
  return leaf(
    "del",
    `Delete one ${o.label} (ID or NAME), or every ${o.label} matching --filter (or --all). Example: qvd admin ${o.name} del 42; qvd admin ${o.name} del --filter ${o.name === "vm" ? "user=alice" : "name~test%"}`,
    { ref: { type: "positional", description: "ID or NAME (not with --filter/--all)", required: false }, ...massArgs },
    async (l) => {
      const t = target(l, o, "del");
      if (t.mass) {
        const res = (await l.client().call<MassResult>("DELETE", `/${o.path}`, { query: t.mass })).body;
        return massOutcome(o, "del", res, l.json);
      }
      const id = await resolveId(l, o, t.ref!);
      const res = (await l.client().call<{ deleted: Record<string, unknown> }>("DELETE", `/${o.path}/${id}`)).body;
      if (l.json) printJson(res);
      else console.log(`deleted ${describe(o.label, res.deleted, id)}`);
    },
    1,
  );
}
