// The farm's view of its nodes: which ones stopped heartbeating (for the cluster monitor,
// src/hkd/monitor.ts), and the administrator's node controls (declare lost, drain). Releasing
// a lost node's VMs is the lifecycle's (src/db/lifecycle.ts).
import { declareNodeLost, setOf, whereOf } from "./lifecycle.ts";
import { ConflictError } from "./errors.ts";
import { hosts } from "./hosts.ts";
import { checkWritable, get, type Scope } from "./objects.ts";
import type { Db } from "./pool.ts";

export interface StaleHost {
  id: number;
  name: string;
  /** Seconds since its last heartbeat (or since it changed state, when it never beat). */
  silent_s: number;
}

/** Nodes other than `exceptHostId` that should be alive and have not heartbeat for `lostAfterS`. */
export async function staleHosts(db: Db, lostAfterS: number, exceptHostId: number): Promise<StaleHost[]> {
  return (await db`SELECT h.id, h.name, extract(epoch FROM now() - coalesce(r.ok_ts, r.state_ts))::float8 AS silent_s
    FROM hosts h JOIN host_runtimes r ON r.host_id = h.id
   WHERE r.state NOT IN ('stopped', 'lost') AND h.id <> ${exceptHostId}
     AND coalesce(r.ok_ts, r.state_ts) < now() - make_interval(secs => ${lostAfterS})
   ORDER BY h.id`) as unknown as StaleHost[];
}

/**
 * An administrator declares a node lost (it is dead, or must be treated so): its VMs are
 * released to start elsewhere. If the node is in fact alive, its next heartbeat tells it, and
 * it kills its desktops and rejoins. Whole nodes: superadministrators only.
 */
export async function declareHostLost(
  db: Db,
  scope: Scope,
  hostId: number,
  reason: string,
): Promise<{ vms: number[] }> {
  const host = await get(db, hosts, scope, hostId);
  checkWritable(hosts, scope, host, "update");
  const res = await declareNodeLost(db, hostId, reason, { by: "admin" });
  if (!res.declared) {
    const now = await get(db, hosts, scope, hostId);
    throw new ConflictError(
      `host ${JSON.stringify(host.name)} is ${now.state}; only a node that is starting, running or stopping can be declared lost`,
    );
  }
  return { vms: res.vms };
}

/** Drain on: no new placements on the node, and its users move at their next connect. */
export async function setHostDrain(db: Db, scope: Scope, hostId: number, drain: boolean): Promise<void> {
  checkWritable(hosts, scope, await get(db, hosts, scope, hostId), "update");
  await db`UPDATE host_runtimes SET drain = ${drain} WHERE host_id = ${hostId}`;
}

/**
 * The drain decision at a user's connect, taken while `session` holds the VM's session (so no
 * other session does): a desktop on a draining node is told to stop, so that it starts
 * elsewhere. True while the VM is still on a draining node (the caller waits for it to stop);
 * false once it is not (stopped and released, or never there).
 */
export async function leaveDrainingNode(db: Db, vmId: number, session: string): Promise<boolean> {
  const onDraining = db`EXISTS (SELECT 1 FROM host_runtimes h WHERE h.host_id = vm_runtimes.host_id AND h.drain)
    AND vm_runtimes.l7r_session = ${session}::uuid AND vm_runtimes.vm_state <> 'stopped'`;
  await db`UPDATE vm_runtimes SET ${setOf(db, "stop_requested")} WHERE vm_id = ${vmId} AND ${whereOf(db, "stop_requested")} AND ${onDraining}`;
  const [r] = await db`SELECT 1 FROM vm_runtimes WHERE vm_id = ${vmId} AND ${onDraining}`;
  return r !== undefined;
}
