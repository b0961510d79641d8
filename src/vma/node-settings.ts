// Which VMA settings only the node decides. A tenant's image carries /etc/qvd/vma.conf, and with
// vm.lxc.vma_init off its own init chooses the VMA's flags and environment: none of those may
// change how the agent (container root) provisions users, which programs it runs, or where.
// The HKD writes the node's value of every such key into vma.json `settings`; the VMA ignores
// them in the image's vma.conf (with a log line) and applies vma.json's values above its flags.
import { type Config, type ConfigKey, KEYS } from "../config.ts";

/** Keys an image may not set, and the prefixes of whole families of them. */
export const NODE_ONLY_KEYS: readonly string[] = [
  "path.run",
  "vma.display",
  "vma.provision.root",
  "vma.session.as_current_user",
  "vma.user.home.path",
  "vma.user.groups",
  "vma.poweroff.command",
  // The node's administrator decides which side channels its desktops open (an image may not add one).
  "vma.printing.enable",
  "vma.audio.enable",
  "vma.slave.enable",
];
export const NODE_ONLY_PREFIXES: readonly string[] = ["vma.command.", "vma.nxagent.", "vma.on_action.", "identity."];

export const isNodeOnlyVmaKey = (k: string): boolean =>
  NODE_ONLY_KEYS.includes(k) || NODE_ONLY_PREFIXES.some((p) => k.startsWith(p));

/** The node's values of the node-only VMA keys, as vma.json `settings` strings. */
export function nodeVmaSettings(cfg: Pick<Config, "get">): Record<string, string> {
  const out: Record<string, string> = {};
  for (const k of Object.keys(KEYS) as ConfigKey[]) {
    // path.run is the node's own run directory; the guest keeps its default (/run/qvd).
    if (!isNodeOnlyVmaKey(k) || k === "path.run") continue;
    const v = cfg.get(k);
    if (v !== undefined) out[k] = typeof v === "boolean" ? (v ? "1" : "0") : String(v);
  }
  return out;
}
