// Commands to the nodes: start/stop VMs (with placement), disconnect users, block objects.
// Each command is one atomic UPDATE that checks the state it needs in its WHERE clause
// (never read-then-write); the database notifies the owning node's channel on commit.
import { ConflictError, ValidationError } from "./errors.ts";
import { checkWritable, get, type Scope } from "./objects.ts";
import type { Db } from "./pool.ts";
import { hosts } from "./hosts.ts";
import { users } from "./users.ts";
import { vms } from "./vms.ts";

/** Weights of the placement score; the random term spreads simultaneous starts. */
const W_RAM = 0.6;
const W_CPU = 0.3;
const W_RANDOM = 0.1;

/**
 * Picks the node for a VM: running, unblocked backends with a recent heartbeat, scored by free
 * RAM and CPU (relative to the best node) plus a random term. Undefined when none qualifies.
 */
export async function placeVm(db: Db, memoryMb: number, heartbeatWithinS: number): Promise<number | undefined> {
  const candidates = await db`SELECT h.id, coalesce(r.usable_ram_mb, 0)::float8 AS ram, coalesce(r.usable_cpu, 0)::float8 AS cpu
    FROM hosts h JOIN host_runtimes r ON r.host_id = h.id
   WHERE h.backend AND r.state = 'running' AND NOT r.blocked
     AND r.ok_ts > now() - make_interval(secs => ${heartbeatWithinS})
     AND coalesce(r.usable_ram_mb, 0) >= ${memoryMb}`;
  if (candidates.length === 0) return undefined;
  const maxRam = Math.max(...candidates.map((c) => c.ram), 1);
  const maxCpu = Math.max(...candidates.map((c) => c.cpu), 1);
  let best: { id: number; score: number } | undefined;
  for (const c of candidates) {
    const score = W_RAM * (c.ram / maxRam) + W_CPU * (c.cpu / maxCpu) + W_RANDOM * Math.random();
    if (!best || score > best.score) best = { id: c.id, score };
  }
  return best!.id;
}

export interface StartResult {
  host_id: number;
}

/** Places a stopped VM (unless it already has a node) and commands its start. */
export async function startVm(db: Db, scope: Scope, vmId: number, opts: { heartbeatWithinS: number }): Promise<StartResult> {
  const vm = await get(db, vms, scope, vmId);
  if (vm.blocked) throw new ConflictError(`vm ${JSON.stringify(vm.name)} is blocked${vm.blocked_reason ? `: ${vm.blocked_reason}` : ""}; unblock it first`);
  if (vm.vm_state !== "stopped") throw new ConflictError(`vm ${JSON.stringify(vm.name)} is ${vm.vm_state}, not stopped`);
  if (vm.vm_cmd) throw new ConflictError(`vm ${JSON.stringify(vm.name)} already has a pending ${vm.vm_cmd} command`);
  const [osf] = await db`SELECT memory_mb FROM osfs WHERE id = ${vm.osf_id}`;
  const hostId = vm.host_id ?? (await placeVm(db, osf!.memory_mb, opts.heartbeatWithinS));
  if (hostId === undefined) throw new ConflictError("no node is available to run this VM (none running, unblocked and with enough free memory)");
  const [r] = await db`UPDATE vm_runtimes SET host_id = ${hostId}, vm_cmd = 'start'
     WHERE vm_id = ${vmId} AND vm_state = 'stopped' AND vm_cmd IS NULL AND NOT blocked RETURNING host_id`;
  if (!r) throw new ConflictError(`vm ${JSON.stringify(vm.name)} changed state meanwhile; try again`);
  return { host_id: r.host_id };
}

/** Commands a stop on the VM's node. */
export async function stopVm(db: Db, scope: Scope, vmId: number): Promise<void> {
  const vm = await get(db, vms, scope, vmId);
  const [r] = await db`UPDATE vm_runtimes SET vm_cmd = 'stop'
     WHERE vm_id = ${vmId} AND vm_state IN ('starting', 'running', 'debugging') AND host_id IS NOT NULL
       AND (vm_cmd IS NULL OR vm_cmd = 'start') RETURNING vm_id`;
  if (!r) throw new ConflictError(`vm ${JSON.stringify(vm.name)} is ${vm.vm_state}; only a starting or running VM can be stopped`);
}

/** Asks the L7R serving the VM's user to close the session. */
export async function disconnectVmUser(db: Db, scope: Scope, vmId: number): Promise<void> {
  const vm = await get(db, vms, scope, vmId);
  const [r] = await db`UPDATE vm_runtimes SET user_cmd = 'abort'
     WHERE vm_id = ${vmId} AND user_state IN ('connecting', 'connected') RETURNING vm_id`;
  if (!r) throw new ConflictError(`nobody is connected to vm ${JSON.stringify(vm.name)}`);
}

/**
 * Sets when a running VM's user is warned (soft) and when the VM is stopped (hard); undefined
 * leaves a time as it is, null clears it. Expiry belongs to the running desktop: a stop clears it.
 */
export async function setVmExpiry(db: Db, scope: Scope, vmId: number, e: { soft_at?: Date | null; hard_at?: Date | null }): Promise<void> {
  const vm = await get(db, vms, scope, vmId);
  const [r] = await db`UPDATE vm_runtimes r SET expire_soft_at = n.soft, expire_hard_at = n.hard
     FROM (SELECT CASE WHEN ${e.soft_at === undefined} THEN expire_soft_at ELSE ${e.soft_at ?? null}::timestamptz END AS soft,
                  CASE WHEN ${e.hard_at === undefined} THEN expire_hard_at ELSE ${e.hard_at ?? null}::timestamptz END AS hard
             FROM vm_runtimes WHERE vm_id = ${vmId}) n
     WHERE r.vm_id = ${vmId} AND r.vm_state <> 'stopped' AND (n.soft IS NULL OR n.hard IS NULL OR n.soft <= n.hard)
     RETURNING r.vm_id`;
  if (r) return;
  const [now] = await db`SELECT vm_state FROM vm_runtimes WHERE vm_id = ${vmId}`;
  if (now?.vm_state === "stopped") throw new ConflictError(`vm ${JSON.stringify(vm.name)} is stopped; an expiry applies to a running desktop (a stop clears it)`);
  throw new ValidationError("soft_at", "the warning must not come after the stop (soft_at ≤ hard_at)");
}

export async function setVmBlocked(db: Db, scope: Scope, vmId: number, blocked: boolean, reason = ""): Promise<void> {
  await get(db, vms, scope, vmId);
  await db`UPDATE vm_runtimes SET blocked = ${blocked}, blocked_reason = ${blocked ? reason : ""} WHERE vm_id = ${vmId}`;
}

export async function setUserBlocked(db: Db, scope: Scope, userId: number, blocked: boolean): Promise<void> {
  await get(db, users, scope, userId);
  await db`UPDATE users SET blocked = ${blocked} WHERE id = ${userId}`;
}

/** Disconnects every session of a user; returns how many VMs were told. */
export async function disconnectUser(db: Db, scope: Scope, userId: number): Promise<number> {
  await get(db, users, scope, userId);
  const rows = await db`UPDATE vm_runtimes r SET user_cmd = 'abort' FROM vms v
     WHERE v.id = r.vm_id AND v.user_id = ${userId} AND r.user_state IN ('connecting', 'connected') RETURNING r.vm_id`;
  return rows.length;
}

export async function setHostBlocked(db: Db, scope: Scope, hostId: number, blocked: boolean): Promise<void> {
  checkWritable(hosts, scope, await get(db, hosts, scope, hostId), "update");
  await db`UPDATE host_runtimes SET blocked = ${blocked} WHERE host_id = ${hostId}`;
}

/** Commands a stop of every running VM of a node; returns how many were told. */
export async function stopHostVms(db: Db, scope: Scope, hostId: number): Promise<number> {
  // A node runs every tenant's desktops: only a superadministrator may stop them all.
  checkWritable(hosts, scope, await get(db, hosts, scope, hostId), "update");
  const rows = await db`UPDATE vm_runtimes SET vm_cmd = 'stop'
     WHERE host_id = ${hostId} AND vm_state IN ('starting', 'running', 'debugging') AND (vm_cmd IS NULL OR vm_cmd = 'start')
     RETURNING vm_id`;
  return rows.length;
}
