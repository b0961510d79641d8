// The command framework of `qvd admin` over citty: the options every command takes, leaves that
// reject unknown options and stray arguments (citty accepts anything), groups that reject
// unknown commands, and the context of one run that every leaf receives. Commands are built
// per run (a Command is a function of that run's context), so nothing is kept between runs.
import { defineCommand, type ArgsDef, type CommandDef } from "citty";
import { AdminClient, connection, usageError, type ConnectionFlags } from "../client.ts";

export const connArgs = {
  url: {
    type: "string",
    description: "API URL, e.g. https://api.example.com:8443 (else QVD_ADMIN_URL, else the stored login)",
    valueHint: "URL",
  },
  token: {
    type: "string",
    description: "Session token (else QVD_ADMIN_TOKEN, else the stored login)",
    valueHint: "TOKEN",
  },
  ca: {
    type: "string",
    description: "Trust this CA or certificate (PEM) for the API's TLS (else QVD_ADMIN_CA)",
    valueHint: "FILE",
  },
  insecure: { type: "boolean", description: "Do not verify the API's certificate (a warning is printed)" },
  json: { type: "boolean", description: "Print the API's JSON as is, for scripts" },
} as const satisfies ArgsDef;

const VALUE_FLAGS = new Set(["url", "token", "ca"]);

/** Connection options and --json, which may stand anywhere after `qvd admin`. */
export type GlobalFlags = ConnectionFlags & { json: boolean };

function parseGlobals(rawArgs: string[]): GlobalFlags {
  const g: GlobalFlags = { json: false };
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

/**
 * One run of `qvd admin …`: the global flags, read by the root group's setup (citty calls it
 * with every argument before it runs the subcommand), and the API client, built on first use
 * so that usage errors come before "not logged in".
 */
class Context {
  #flags: GlobalFlags | undefined;
  #client: AdminClient | undefined;

  start(rawArgs: string[]): void {
    this.#flags = parseGlobals(rawArgs);
    this.#client = undefined;
  }

  get flags(): GlobalFlags {
    if (!this.#flags) throw new Error("qvd admin: a command ran before the root group's setup");
    return this.#flags;
  }

  client(): AdminClient {
    return (this.#client ??= new AdminClient(connection(this.flags)));
  }
}

/** A command of the tree, built around the context of a run. */
export type Command = (ctx: Context) => CommandDef<any>;

/** What a leaf's run receives. */
export interface Leaf {
  args: Record<string, any>;
  /** Positional arguments, in order. */
  pos: string[];
  /** Every --filter / -f, in order. */
  filters: string[];
  json: boolean;
  /** The global flags as given (login and logout build their own connection). */
  flags: GlobalFlags;
  /** The run's API client. */
  client(): AdminClient;
}

const kebab = (s: string) => s.replace(/[A-Z]/g, (c) => "-" + c.toLowerCase());

/**
 * A leaf command. Unknown options and stray arguments are usage errors (exit 2); citty itself
 * accepts anything.
 */
export function leaf(
  name: string,
  description: string,
  args: ArgsDef,
  run: (l: Leaf) => Promise<void>,
  maxPos = Infinity,
): Command {
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
  return (ctx) =>
    defineCommand({
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
          if (!known.has(bare))
            throw usageError(
              `unknown option ${a.split("=")[0]}${/^-\d/.test(a) ? " (put -- before arguments that start with -)" : ""}; see --help`,
            );
          if (valueFlags.has(bare) && m[2] === undefined) {
            if (rawArgs[i + 1] === undefined) throw usageError(`${a} needs a value`);
            if (bare === "filter" || bare === "f") filters.push(rawArgs[i + 1]!);
            i++;
          } else if ((bare === "filter" || bare === "f") && m[2] !== undefined) filters.push(m[2].slice(1));
        }
        const pos = (args._ as string[]).map(String);
        if (pos.length > maxPos) throw usageError(`unexpected argument ${JSON.stringify(pos[maxPos])}; see --help`);
        const flags = ctx.flags;
        await run({ args, pos, filters, json: flags.json || Boolean(args.json), flags, client: () => ctx.client() });
      },
    });
}

/** A group of subcommands; an unknown or missing subcommand is a usage error (exit 2). */
export function group(
  name: string,
  description: string,
  subs: Record<string, Command>,
  aliases: Record<string, string> = {},
): Command {
  return (ctx) => groupDef(ctx, name, description, subs, aliases, false);
}

/**
 * The root group, `qvd admin`, with a new context: its setup reads the global flags. Build it
 * once per run.
 */
export function rootGroup(
  description: string,
  subs: Record<string, Command>,
  aliases: Record<string, string>,
): CommandDef<any> {
  return groupDef(new Context(), "admin", description, subs, aliases, true);
}

function groupDef(
  ctx: Context,
  name: string,
  description: string,
  subs: Record<string, Command>,
  aliases: Record<string, string>,
  root: boolean,
): CommandDef<any> {
  const built = Object.fromEntries(Object.entries(subs).map(([k, sub]) => [k, sub(ctx)]));
  const table: Record<string, CommandDef<any>> = { ...built };
  // Aliases resolve (also for --help) but are not listed twice.
  for (const [alias, target] of Object.entries(aliases)) {
    const def = built[target]!;
    table[alias] = { ...def, meta: { ...(def.meta as object), hidden: true } } as CommandDef<any>;
  }
  return defineCommand({
    meta: { name, description },
    args: connArgs,
    subCommands: table,
    setup({ rawArgs }) {
      const where = root ? "qvd admin" : `qvd admin ${name}`;
      if (root) ctx.start(rawArgs);
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
      if (!(sub in table))
        throw usageError(`unknown command ${JSON.stringify(sub)}; ${where} takes: ${choices} (see ${where} --help)`);
    },
  });
}
