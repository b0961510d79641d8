// `qvd admin config`: the cluster settings stored in the database, globally or per tenant.
import type { ArgsDef } from "citty";
import { UserError } from "../../errors.ts";
import { EXIT, usageError } from "../client.ts";
import { printJson, table } from "../format.ts";
import { objectByName } from "../objects.ts";
import { group, leaf, type Leaf } from "./framework.ts";
import { resolveId } from "./targets.ts";

const TENANTS = objectByName("tenant")!;
const tenantArg = {
  tenant: {
    type: "string",
    description: "A tenant's view or override (ID or NAME; superadministrators only, else your own)",
    valueHint: "TENANT",
  },
} as const satisfies ArgsDef;
const tenantIdOf = async (l: Leaf) =>
  l.args.tenant === undefined ? undefined : await resolveId(l, TENANTS, l.args.tenant);

interface ConfigItem {
  key: string;
  doc: string;
  default: string | null;
  value: string | null;
  source: string;
}

/** The settings as the API resolves them, for --tenant's view when given. */
async function configItems(l: Leaf) {
  const tid = await tenantIdOf(l);
  return l
    .client()
    .get<{ tenant_id: number; items: ConfigItem[] }>(
      "/configs",
      tid === undefined ? undefined : { tenant_id: String(tid) },
    );
}

export const configCommand = group(
  "config",
  "Cluster settings stored in the database: list, get, set, unset",
  {
    list: leaf(
      "list",
      "Every cluster setting: effective value, source (default, global, tenant) and default. Example: qvd admin config list --tenant acme",
      { ...tenantArg, doc: { type: "boolean", description: "Add each setting's documentation" } },
      async (l) => {
        const res = await configItems(l);
        if (l.json) return printJson(res);
        console.log(
          table(res.items as unknown as Record<string, unknown>[], [
            "key",
            "value",
            "source",
            "default",
            ...(l.args.doc ? ["doc"] : []),
          ]),
        );
      },
      0,
    ),
    get: leaf(
      "get",
      "One cluster setting's effective value. Example: qvd admin config get vm.network.range",
      { key: { type: "positional", description: "Setting", required: false }, ...tenantArg },
      async (l) => {
        if (!l.pos[0]) throw usageError("give the setting's key");
        const res = await configItems(l);
        const item = res.items.find((i) => i.key === l.pos[0]);
        if (!item)
          throw new UserError(
            `no cluster setting ${JSON.stringify(l.pos[0])} (see qvd admin config list)`,
            EXIT.notFound,
          );
        if (l.json) printJson(item);
        else console.log(item.value ?? "");
      },
      1,
    ),
    set: leaf(
      "set",
      "Set a cluster setting globally, or for one tenant with --tenant. Example: qvd admin config set vm.network.range 10.3.0.0/16",
      {
        key: { type: "positional", description: "Setting", required: false },
        value: { type: "positional", description: "Value", required: false },
        ...tenantArg,
      },
      async (l) => {
        const [key, value] = l.pos;
        if (!key || value === undefined)
          throw usageError("give the setting's key and value: qvd admin config set KEY VALUE");
        const tid = await tenantIdOf(l);
        const res = (
          await l.client().call("PUT", `/configs/${encodeURIComponent(key)}`, {
            body: { value, ...(tid !== undefined ? { tenant_id: tid } : {}) },
          })
        ).body;
        if (l.json) return printJson(res);
        console.log(`set ${key} = ${value}${tid !== undefined ? ` for tenant ${tid}` : ""}`);
      },
      2,
    ),
    unset: leaf(
      "unset",
      "Remove an override (global, or a tenant's with --tenant): the setting falls back. Example: qvd admin config unset vm.network.range",
      { key: { type: "positional", description: "Setting", required: false }, ...tenantArg },
      async (l) => {
        if (!l.pos[0]) throw usageError("give the setting's key");
        const tid = await tenantIdOf(l);
        const res = (
          await l.client().call("DELETE", `/configs/${encodeURIComponent(l.pos[0])}`, {
            query: tid === undefined ? {} : { tenant_id: String(tid) },
          })
        ).body;
        if (l.json) return printJson(res);
        console.log(`unset ${l.pos[0]}${tid !== undefined ? ` for tenant ${tid}` : ""}`);
      },
      1,
    ),
  },
  { ls: "list", show: "get", del: "unset" },
);
