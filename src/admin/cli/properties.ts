// Custom property values of an object: `prop` shows or sets them, `unprop` removes one.
import { UserError } from "../../errors.ts";
import { EXIT, usageError } from "../client.ts";
import { keyValues, printJson } from "../format.ts";
import type { ObjectInfo } from "../objects.ts";
import { leaf, type Command } from "./framework.ts";
import { resolveId } from "./targets.ts";

export const PROPERTY_OBJECTS = new Set(["user", "vm", "host", "osf", "di"]);

export function propCmds(o: ObjectInfo): Record<string, Command> {
  return {
    prop: leaf(
      "prop",
      `Show a ${o.label}'s custom property values, one value, or set one. Example: qvd admin ${o.name} prop 42; qvd admin ${o.name} prop 42 department sales`,
      {
        ref: { type: "positional", description: "ID or NAME", required: false },
        key: { type: "positional", description: "Property key (defined with qvd admin property new)", required: false },
        value: { type: "positional", description: "New value", required: false },
      },
      async (l) => {
        const [ref, key, value] = l.pos;
        if (!ref) throw usageError(`give the ${o.label}'s ID or NAME`);
        const id = await resolveId(l, o, ref);
        if (value !== undefined) {
          const res = (
            await l.client().call("PUT", `/${o.path}/${id}/properties/${encodeURIComponent(key!)}`, { body: { value } })
          ).body;
          if (l.json) return printJson(res);
          return console.log(`${o.label} ${id}: ${key} = ${value}`);
        }
        const values = await l.client().get<Record<string, string>>(`/${o.path}/${id}/properties`);
        if (key !== undefined) {
          if (!(key in values))
            throw new UserError(`${o.label} ${id} has no value for property ${JSON.stringify(key)}`, EXIT.notFound);
          return l.json ? printJson({ [key]: values[key] }) : console.log(values[key]);
        }
        if (l.json) printJson(values);
        else if (Object.keys(values).length) console.log(keyValues(values));
        else console.error(`${o.label} ${id} has no property values`);
      },
      3,
    ),
    unprop: leaf(
      "unprop",
      `Remove a custom property value from a ${o.label}. Example: qvd admin ${o.name} unprop 42 department`,
      {
        ref: { type: "positional", description: "ID or NAME", required: false },
        key: { type: "positional", description: "Property key", required: false },
      },
      async (l) => {
        const [ref, key] = l.pos;
        if (!ref || !key) throw usageError(`give the ${o.label}'s ID or NAME and the property key`);
        const id = await resolveId(l, o, ref);
        const res = (await l.client().call("DELETE", `/${o.path}/${id}/properties/${encodeURIComponent(key)}`)).body;
        if (l.json) printJson(res);
        else console.log(`${o.label} ${id}: removed ${key}`);
      },
      2,
    ),
  };
}
