// What the node-to-node endpoint (src/l7r/peer.ts) reads: which node a peer certificate names,
// where another node is reached, and a desktop of this node that the calling node's L7R holds
// the session of (the only desktops a peer may reach, and only their VMA and nxagent).
import type { Db } from "./pool.ts";

export interface PeerNode {
  id: number;
  name: string;
  address: string;
  state: string;
}

/** The node a peer certificate's CN names (hosts.name), with its state. */
export async function peerNodeByName(db: Db, name: string): Promise<PeerNode | undefined> {
  const [r] = await db`SELECT h.id, h.name, h.address, coalesce(r.state, 'stopped') AS state
    FROM hosts h LEFT JOIN host_runtimes r ON r.host_id = h.id WHERE h.name = ${name}`;
  return r as PeerNode | undefined;
}

export async function peerNodeById(db: Db, id: number): Promise<PeerNode | undefined> {
  const [r] = await db`SELECT h.id, h.name, h.address, coalesce(r.state, 'stopped') AS state
    FROM hosts h LEFT JOIN host_runtimes r ON r.host_id = h.id WHERE h.id = ${id}`;
  return r as PeerNode | undefined;
}

export interface PeerDesktop {
  vm_address: string;
  vma_port: number;
  x_port: number | null;
  vma_secret: string;
}

/**
 * VM `vmId` when it runs on node `hostId` and its session is `session`, held by node
 * `callerId`'s L7R (connecting or connected); else undefined.
 */
export async function peerDesktop(
  db: Db,
  o: { vmId: number; hostId: number; callerId: number; session: string },
): Promise<PeerDesktop | undefined> {
  const [r] = await db`SELECT host(vm_address) AS vm_address, vma_port, x_port, vma_secret FROM vm_runtimes
    WHERE vm_id = ${o.vmId} AND host_id = ${o.hostId} AND vm_state = 'running'
      AND vm_address IS NOT NULL AND vma_port IS NOT NULL AND vma_secret IS NOT NULL
      AND l7r_host_id = ${o.callerId} AND l7r_session = ${o.session}::uuid AND user_state IN ('connecting', 'connected')`;
  return r as PeerDesktop | undefined;
}
