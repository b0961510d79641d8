// The commented configuration file `qvd install` writes once (/etc/qvd/<role>.conf), generated
// from the one schema (src/config.ts): the node keys the role reads, commented out with their
// default and description, and the few a role cannot run without, uncommented, to be filled in.
import { type ConfigKey, KEYS } from "../config.ts";
import { VERSION } from "../version.ts";
import { isNodeOnlyVmaKey } from "../vma/node-settings.ts";
import { configPath, type Role } from "./units.ts";

/** The keys the API and the L7R read from their files, by prefix (cluster keys come from the database). */
const PREFIXES: Record<Exclude<Role, "node">, string[]> = {
  api: ["log.", "metrics.", "database.", "path.storage.root", "path.storage.images", "api."],
  l7r: ["nodename", "log.", "metrics.", "database.", "path.run", "l7r.", "cluster."],
};
/** A node reads every node key but the other roles' (the API's, `qvd di build`'s, the VMA's own in images). */
const NODE_EXCLUDES = ["api.", "di.", "vma."];

/** What a node (both halves) or an L7R cannot run without. */
const NODE_REQUIRED: [ConfigKey, string][] = [
  ["nodename", ""],
  ["database.url", ""],
  ["l7r.tls.cert", "/etc/qvd/l7r.crt"],
  ["l7r.tls.key", "/etc/qvd/l7r.key"],
  ["cluster.tls.ca", "/etc/qvd/farm/ca.crt"],
  ["cluster.tls.cert", "/etc/qvd/farm/node.crt"],
  ["cluster.tls.key", "/etc/qvd/farm/node.key"],
];

/** Keys a role cannot run without, with the value written (empty: the role refuses it, naming the line). */
export const REQUIRED: Record<Role, [ConfigKey, string][]> = {
  api: [
    ["database.url", ""],
    ["api.tls.cert", "/etc/qvd/api.crt"],
    ["api.tls.key", "/etc/qvd/api.key"],
  ],
  l7r: NODE_REQUIRED,
  node: NODE_REQUIRED,
};

const REQUIRED_NOTES: Partial<Record<ConfigKey, string>> = {
  nodename: "Must be set: the name of this node's hosts row (and its farm certificate's CN).",
  "database.url": "Must be set, e.g. postgres://qvd:PASSWORD@db1:5432/qvd?sslmode=verify-full",
  "api.tls.key": "Readable by the user qvd, which the API runs as (root:qvd 0640).",
};

/** The node keys of `role`'s file, grouped by their first word, otherwise in schema order. */
export function roleKeys(role: Role): ConfigKey[] {
  const keys = (Object.keys(KEYS) as ConfigKey[]).filter((k) => {
    if (KEYS[k].scope !== "node") return false;
    if (role !== "node") return PREFIXES[role].some((p) => (p.endsWith(".") ? k.startsWith(p) : k === p));
    // The VMA settings only the node decides go to every desktop it starts.
    return !NODE_EXCLUDES.some((p) => k.startsWith(p)) || (k.startsWith("vma.") && isNodeOnlyVmaKey(k));
  });
  const first = (k: string) => k.split(".")[0]!;
  const order = [...new Set(keys.map(first))];
  return keys.sort((a, b) => order.indexOf(first(a)) - order.indexOf(first(b)));
}

/** A section heading, 100 characters wide. */
const rule = (title: string) => `# --- ${title} `.padEnd(100, "-");

/** `key = value`, without a trailing blank when the value is empty. */
const line = (k: string, v: string) => (v === "" ? `${k} =` : `${k} = ${v}`);

function defaultText(k: ConfigKey): string {
  const d: unknown = KEYS[k].default;
  if (d === undefined) return "";
  return typeof d === "boolean" ? (d ? "1" : "0") : String(d);
}

/** `text` as `# ` comment lines of at most `width` characters. */
function comment(text: string, width = 100): string[] {
  const out: string[] = [];
  let cur = "#";
  for (const word of text.split(/\s+/).filter(Boolean)) {
    if (cur.length > 1 && cur.length + 1 + word.length > width) {
      out.push(cur);
      cur = "#";
    }
    cur += " " + word;
  }
  if (cur.length > 1) out.push(cur);
  return out;
}

const ROLE_TITLE: Record<Role, string> = {
  node: "`qvd node` (the HKD and the L7R of this node)",
  api: "`qvd api` (the admin API and the WAT)",
  l7r: "`qvd l7r` (the user broker)",
};

export function configText(role: Role): string {
  const required = new Map(REQUIRED[role]);
  const L: string[] = [
    `# ${configPath(role)}: configuration of ${ROLE_TITLE[role]}.`,
    `# Written once by \`qvd install ${role}\` (qvd ${VERSION}), which never changes it again.`,
    "# `key = value` lines; `#` starts a comment. It holds the database password: keep it mode 0640,",
    `# owner root${role === "api" ? ", group qvd (the API's user)" : ""}.`,
    "# The keys below are this machine's. Farm-wide keys (timeouts, authentication, the desktops'",
    "# network…) are set through the API (`qvd admin config`) and read from the database; one set",
    "# here counts only where the database has none. Every key: `qvd config show --doc`.",
    "",
    rule("to fill in"),
  ];
  for (const [k, v] of required) {
    L.push("", ...comment(KEYS[k].doc));
    const note = REQUIRED_NOTES[k];
    if (note) L.push(...comment(note));
    L.push(line(k, v));
  }
  let section = "";
  for (const k of roleKeys(role)) {
    if (required.has(k)) continue;
    const s = k.split(".")[0]!;
    if (s !== section) {
      section = s;
      L.push("", rule(s));
    }
    L.push("", ...comment(KEYS[k].doc), "#" + line(k, defaultText(k)));
  }
  L.push("");
  return L.join("\n");
}
