#!/usr/bin/env bun
// `qvd`: one binary, the subcommand picks the role (docs/ARCHITECTURE.md, "Roles").
import { defineCommand, renderUsage, runCommand, type CommandDef } from "citty";
import { describeError, exitCodeOf } from "./errors.ts";
import { VERSION } from "./version.ts";

export const main = defineCommand({
  meta: { name: "qvd", version: VERSION, description: "QVD virtual desktop infrastructure" },
  subCommands: {
    admin: () => import("./roles/admin-cli.ts").then((m) => m.createAdminCli()), // a tree per run: it holds the run's context
    api: () => import("./roles/api.ts").then((m) => m.default),
    client: () => import("./roles/client.ts").then((m) => m.default),
    config: () => import("./roles/config.ts").then((m) => m.default),
    db: () => import("./roles/db.ts").then((m) => m.default),
    farm: () => import("./roles/farm.ts").then((m) => m.default),
    hkd: () => import("./roles/hkd.ts").then((m) => m.default),
    install: () => import("./roles/install.ts").then((m) => m.default),
    l7r: () => import("./roles/l7r.ts").then((m) => m.default),
    node: () => import("./roles/node.ts").then((m) => m.default),
    demo: () => import("./roles/demo.ts").then((m) => m.default),
    di: () => import("./roles/di.ts").then((m) => m.default),
    vma: () => import("./roles/vma.ts").then((m) => m.default),
    "vma-slave": () => import("./roles/vma-slave.ts").then((m) => m.default),
  },
});

/** Walks the raw arguments down the subcommand tree, for --help of the right command. */
async function resolve(cmd: CommandDef<any>, args: string[]): Promise<[CommandDef<any>, CommandDef<any> | undefined]> {
  const subs = typeof cmd.subCommands === "function" ? await cmd.subCommands() : await cmd.subCommands;
  // The first word that names a subcommand (flags and their values may come before it).
  const name = subs ? args.find((a) => !a.startsWith("-") && a in subs) : undefined;
  if (subs && name && name in subs) {
    const sub = subs[name]!;
    const def = (
      typeof sub === "function" ? await (sub as () => Promise<CommandDef<any>>)() : await sub
    ) as CommandDef<any>;
    const [leaf, parent] = await resolve(def, args.slice(args.indexOf(name) + 1));
    return [leaf, parent ?? cmd];
  }
  return [cmd, undefined];
}

export async function runQvd(rawArgs: string[]): Promise<number> {
  if (rawArgs.length === 1 && (rawArgs[0] === "--version" || rawArgs[0] === "-v")) {
    console.log(VERSION);
    return 0;
  }
  if (rawArgs.length === 0 || rawArgs.includes("--help") || rawArgs.includes("-h")) {
    const [leaf, parent] = await resolve(main, rawArgs);
    console.log((await renderUsage(leaf, parent)) + "\n");
    return 0;
  }
  try {
    await runCommand(main, { rawArgs });
    return typeof process.exitCode === "number" ? process.exitCode : 0;
  } catch (err) {
    // citty's own errors (unknown command, missing or bad argument) carry codes like E_* or EARG.
    const usage = (err as Error)?.name === "CLIError" || /^E(_|ARG)/.test((err as { code?: string }).code ?? "");
    if (usage) {
      console.error(`qvd: ${(err as Error).message} (see qvd --help)`);
      return 2; // usage error, as the admin CLI reports its own
    }
    console.error(`qvd: ${describeError(err)}`);
    return exitCodeOf(err);
  }
}

if (import.meta.main) process.exit(await runQvd(process.argv.slice(2)));
