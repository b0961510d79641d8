// The file a node hands a desktop's VMA (/run/qvd/vma.json, read by src/roles/vma.ts), for tests
// that run `qvd vma` on this machine.
import { writeFileSync } from "node:fs";

/** Writes `file` as the node writes it (readable by its owner only): the VMA's secret, its node, its settings. */
export function writeVmaConfig(
  file: string,
  o: { secret: string; settings: Record<string, string | number | boolean>; vmId?: number; nodeAddress?: string },
): void {
  const config = {
    vm_id: o.vmId ?? 7,
    secret: o.secret,
    node_address: o.nodeAddress ?? "127.0.0.1",
    port: 3030,
    settings: o.settings,
  };
  writeFileSync(file, JSON.stringify(config), { mode: 0o400 });
}
