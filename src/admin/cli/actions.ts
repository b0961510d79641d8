// The actions of VMs, users, nodes and images (start, block, drain…): on one object, or on
// every object matching --filter / --all.
import { usageError } from "../client.ts";
import { cell, describe, printJson } from "../format.ts";
import type { ObjectInfo } from "../objects.ts";
import { leaf, type Command } from "./framework.ts";
import { massArgs, massOutcome, resolveId, target, type MassResult } from "./targets.ts";

interface ActionInfo {
  verb: string;
  /** API action name (POST /<objects>/:id/<api>). */
  api: string;
  what: string;
  /** Flags whose values go into the body; "none" sends null (clears). */
  fields?: { flag: string; key: string; description: string; valueHint: string; required?: boolean }[];
}

export const ACTIONS: Record<string, ActionInfo[]> = {
  vm: [
    { verb: "start", api: "start", what: "Start (a node is chosen if the VM has none)" },
    { verb: "stop", api: "stop", what: "Stop" },
    { verb: "disconnect", api: "disconnect", what: "Disconnect the user of" },
    {
      verb: "block",
      api: "block",
      what: "Block (cannot be started or connected to)",
      fields: [{ flag: "reason", key: "reason", description: "Why (shown with the VM)", valueHint: "TEXT" }],
    },
    { verb: "unblock", api: "unblock", what: "Unblock" },
    { verb: "clear-zombie", api: "clear_zombie", what: "Mark stopped a zombie whose node is lost, stopped or gone:" },
    {
      verb: "expire",
      api: "expire",
      what: "Set when the user is warned and the desktop stopped, for",
      fields: [
        {
          flag: "warn-at",
          key: "soft_at",
          description: "When the user is warned (local time, e.g. 2026-12-01T18:00, or ISO with a zone; none clears)",
          valueHint: "TIME",
        },
        {
          flag: "stop-at",
          key: "hard_at",
          description: "When the desktop is stopped (as --warn-at; none clears)",
          valueHint: "TIME",
        },
      ],
    },
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
    {
      verb: "declare-lost",
      api: "declare_lost",
      what: "Declare lost (its VMs are released to start elsewhere; a live node kills its desktops and rejoins)",
      fields: [
        {
          flag: "reason",
          key: "reason",
          description: "Why (required; kept with the node)",
          valueHint: "TEXT",
          required: true,
        },
      ],
    },
  ],
  di: [
    { verb: "block", api: "block", what: "Block (VMs will not start from)" },
    { verb: "unblock", api: "unblock", what: "Unblock" },
  ],
};

export function actionCmd(o: ObjectInfo, a: ActionInfo): Command {
  return leaf(
    a.verb,
    `${a.what} one ${o.label}, or every ${o.label} matching --filter (or --all). Example: qvd admin ${o.name} ${a.verb} 42; qvd admin ${o.name} ${a.verb} --filter ${o.name === "vm" ? "user=alice" : o.name === "host" ? "name~node%" : "tenant=acme"}`,
    {
      ref: { type: "positional", description: "ID or NAME (not with --filter/--all)", required: false },
      ...massArgs,
      ...Object.fromEntries(
        (a.fields ?? []).map((f) => [f.flag, { type: "string", description: f.description, valueHint: f.valueHint }]),
      ),
    },
    async (l) => {
      const body: Record<string, unknown> = {};
      for (const f of a.fields ?? []) {
        const v = l.args[f.flag] as string | undefined;
        if (f.required && !v?.trim()) throw usageError(`${o.name} ${a.verb} needs --${f.flag} ${f.valueHint}`);
        if (v !== undefined)
          body[f.key] =
            v === "none"
              ? null
              : /^\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d)?$/.test(v) && f.valueHint === "TIME"
                ? new Date(v).toISOString()
                : v;
      }
      const t = target(l, o, a.verb);
      if (t.mass) {
        const res = (await l.client().call<MassResult>("POST", `/${o.path}/actions/${a.api}`, { query: t.mass, body }))
          .body;
        return massOutcome(o, a.verb, res, l.json);
      }
      const id = await resolveId(l, o, t.ref!);
      const res = (await l.client().call<Record<string, unknown>>("POST", `/${o.path}/${id}/${a.api}`, { body })).body;
      if (l.json) return printJson(res);
      const row = (res[o.name === "admin" ? "administrator" : o.name] as Record<string, unknown> | undefined) ?? res;
      const extra =
        row === res
          ? ""
          : " " +
            Object.entries(res)
              .filter(([k]) => k !== o.name)
              .map(([k, v]) => `${k}=${cell(v)}`)
              .join(" ");
      console.log(`${describe(o.label, row, id)}: ${a.verb} ok${extra}`);
    },
    1,
  );
}
