// How the L7R reaches a desktop for a connect: directly when the desktop runs on this node
// (its VMA and nxagent on the node's own bridge), else through the node it runs on, over the
// farm's mutually authenticated TLS (src/l7r/peer.ts). Either way the same two operations.
import type { Sql } from "../db/pool.ts";
import { peerNodeById } from "../db/peer.ts";
import type { SessionVm } from "../db/l7r.ts";
import { vmaCall } from "../hkd/vma-client.ts";
import { ioHandlers, type IoData, type IoSocket } from "../nx/splice.ts";
import type { PeerClient } from "./peer.ts";

export interface DesktopLink {
  /** Where the desktop is reached from here: "local" or the name of its node. */
  via: string;
  /** A VMA call the connect path makes (x_start, x_state); throws VmaError as vmaCall does. */
  vma<T>(method: "x_start" | "x_state", body: unknown, timeoutMs: number): Promise<T>;
  /** A socket to the desktop's nxagent, ready to splice. */
  nx(timeoutMs: number): Promise<IoSocket>;
}

export class LinkError extends Error {}

export function localLink(vm: SessionVm): DesktopLink {
  const target = { address: vm.vm_address!, port: vm.vma_port!, secret: vm.vma_secret! };
  return {
    via: "local",
    vma: (method, body, timeoutMs) => vmaCall(target, method, body, timeoutMs),
    async nx() {
      const s = (await Bun.connect<IoData>({
        hostname: vm.vm_address!,
        port: vm.x_port ?? 4100,
        data: {},
        socket: ioHandlers,
      } as any)) as IoSocket;
      (s as any).setNoDelay?.(true);
      (s as any).setKeepAlive?.(true);
      return s;
    },
  };
}

/**
 * The link to `vm` from node `hereId`'s L7R, within the session `session` it holds. A desktop
 * on another node needs the farm's TLS (`peer`) and that node's address.
 */
export async function desktopLink(
  sql: Sql,
  o: { vm: SessionVm; hereId: number | undefined; session: string; peer?: PeerClient },
): Promise<DesktopLink> {
  const { vm } = o;
  if (vm.host_id === null || vm.host_id === o.hereId) return localLink(vm);
  if (!o.peer) throw new LinkError("it runs on another node and this L7R has no farm certificate (cluster.tls.*)");
  const node = await peerNodeById(sql, vm.host_id);
  if (!node) throw new LinkError("its node is gone");
  const peer = o.peer;
  const to = { name: node.name, address: node.address };
  return {
    via: node.name,
    vma: (method, body, timeoutMs) => peer.vma(to, vm.vm_id, o.session, method, body, timeoutMs),
    nx: (timeoutMs) => peer.nx(to, vm.vm_id, o.session, timeoutMs),
  };
}
