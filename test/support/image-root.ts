// A minimal image root for tests of the VMA's user provisioning: /etc/passwd, group, shadow and
// gshadow with this machine's system accounts only, and an /etc/skel.
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";

/** Lines of `file` (passwd-style) whose first field is one of `names`. */
const pick = (file: string, names: string[]) =>
  readFileSync(file, "utf8")
    .split("\n")
    .filter((l) => names.includes(l.split(":")[0]!))
    .join("\n") + "\n";

/** Makes `${dir}/root` with the system accounts and `skel` (file name → text) in /etc/skel; its path. */
export function minimalRoot(dir: string, skel: Record<string, string> = {}): string {
  const root = join(dir, "root");
  mkdirSync(join(root, "etc/skel"), { recursive: true });
  writeFileSync(join(root, "etc/passwd"), pick("/etc/passwd", ["root", "daemon", "nobody"]));
  writeFileSync(join(root, "etc/group"), pick("/etc/group", ["root", "daemon", "nogroup"]));
  writeFileSync(join(root, "etc/shadow"), pick("/etc/shadow", ["root", "daemon", "nobody"]), { mode: 0o640 });
  writeFileSync(join(root, "etc/gshadow"), pick("/etc/gshadow", ["root", "daemon", "nogroup"]), { mode: 0o640 });
  for (const [name, text] of Object.entries(skel)) writeFileSync(join(root, "etc/skel", name), text);
  return root;
}
