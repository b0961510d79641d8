// `qvd admin …`: the command-line client of the admin REST API (it never touches the
// database). `qvd admin login` stores a session token; then `qvd admin <object> <verb>` for
// every object (list/get/new/set/del and the actions), tables for people, --json for scripts.
// Exit codes: 0 ok, 1 refused or partly failed, 2 usage, 3 not logged in, 4 forbidden,
// 5 not found, 6 conflict, 7 API unreachable.
// The commands live in src/admin/cli/ (framework.ts: leaves, groups and the run's context).
import type { CommandDef } from "citty";
import { OBJECTS, type ObjectInfo } from "../admin/objects.ts";
import { ACTIONS, actionCmd } from "../admin/cli/actions.ts";
import { configCommand } from "../admin/cli/config.ts";
import { delCmd, getCmd, listCmd, newCmd, setCmd } from "../admin/cli/crud.ts";
import { adminCmds, diCmds, roleCmds } from "../admin/cli/di-role-admin.ts";
import { group, rootGroup, type Command } from "../admin/cli/framework.ts";
import { PROPERTY_OBJECTS, propCmds } from "../admin/cli/properties.ts";
import { sessionCommand } from "../admin/cli/sessions.ts";
import { aclsCmd, login, logout, stats, whoami } from "../admin/cli/toplevel.ts";

// --- objects -----------------------------------------------------------------------------------

function objectCommand(o: ObjectInfo): Command {
  const subs: Record<string, Command> = { list: listCmd(o), get: getCmd(o) };
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
  const label =
    o.name === "audit"
      ? "The audit log"
      : o.name === "admin"
        ? "Administrators"
        : o.name === "di"
          ? "Disk images"
          : o.name === "osf"
            ? "OS flavours"
            : o.name === "vm"
              ? "Virtual machines (desktops)"
              : o.name === "host"
                ? "Nodes"
                : o.name === "property"
                  ? "Custom property definitions"
                  : `${o.label[0]!.toUpperCase()}${o.label.slice(1)}s`;
  return group(o.name, `${label}: ${Object.keys(subs).join(", ")}`, subs);
}

// --- the tree ----------------------------------------------------------------------------------

const objectCommands: Record<string, Command> = {
  ...Object.fromEntries(OBJECTS.map((o) => [o.name, objectCommand(o)])),
  config: configCommand,
  session: sessionCommand,
};
const objectAliases: Record<string, string> = {
  ...Object.fromEntries(OBJECTS.flatMap((o) => o.aliases.map((a) => [a, o.name]))),
  configs: "config",
  sessions: "session",
};

/** `qvd admin`, with the context of one run: build it for every run (src/main.ts does). */
export function createAdminCli(): CommandDef<any> {
  return rootGroup(
    "Administer QVD through the admin API: login, then `qvd admin <object> <verb>`. Exit codes: 0 ok, 1 refused or partly failed, 2 usage, 3 not logged in, 4 forbidden, 5 not found, 6 conflict, 7 API unreachable",
    { login, logout, whoami, stats, acls: aclsCmd, ...objectCommands },
    objectAliases,
  );
}
