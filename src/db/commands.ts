// Commands to the nodes: start/stop VMs (with placement), disconnect users, block objects.
// Each command is one atomic UPDATE that checks the state it needs in its WHERE clause
// (never read-then-write); the database notifies the owning node's channel on commit.
import { ConflictError, ValidationError } from "./errors.ts";
import { setOf, transition, whereOf, type Actor } from "./lifecycle.ts";
import { checkWritable, get, type Scope } from "./objects.ts";
import { requestStart } from "./lifecycle.ts";
import { hypervisorShortfall, placeVm } from "./placement.ts";
import { transaction, type Db } from "./pool.ts";
import { hosts } from "./hosts.ts";
import { users } from "./users.ts";
import { vms } from "./vms.ts";

/** The advisory lock key of placement (one placement at a time, farm-wide). */
const PLACEMENT_LOCK = 0x71766470; // "qvdp"

export interface StartResult {
  host_id: number;
}

/** A second desktop of the same home would corrupt it: one home, one running desktop. */
export class HomeInUseError extends ConflictError {
  constructor(user: string, otherVm: string) {
    super(
      `the home of user ${JSON.stringify(user)} is in use by their desktop ${JSON.stringify(otherVm)}; stop it first`,
    );
    this.name = "HomeInUseError";
  }
}

/** No node can take the desktop now (the message says why, when one reason stands out). */
export class NoNodeAvailableError extends ConflictError {
  constructor(why?: string) {
    super(
      why
        ? `no node is available to run this VM: ${why}`
        : "no node is available to run this VM (none running, unblocked, not draining, alive and with enough free memory)",
    );
    this.name = "NoNodeAvailableError";
  }
}

/** An administrator blocked the desktop. */
export class VmBlockedError extends ConflictError {
  constructor(vm: { name: string; blocked_reason?: string | null }) {
    super(
      `vm ${JSON.stringify(vm.name)} is blocked${vm.blocked_reason ? `: ${vm.blocked_reason}` : ""}; unblock it first`,
    );
    this.name = "VmBlockedError";
  }
}

/** The home a desktop uses (per user, src/roles/hkd.ts homeOf): at most one placed or running desktop holds it. */
export const homeKey = (vm: { tenant_id: number; user_id: number }) => `${vm.tenant_id}/${vm.user_id}`;

/**
 * Places a stopped VM on a node (src/db/placement.ts) and commands its start there, claiming its
 * user's home. Placements are serialised farm-wide (a transaction-scoped advisory lock, held for
 * one placement query), so concurrent starts each see the memory the others took.
 */
export async function startVm(
  db: Db,
  scope: Scope,
  vmId: number,
  opts: { aliveWithinS: number; by?: "api" | "l7r" },
): Promise<StartResult> {
  const vm = await get(db, vms, scope, vmId);
  if (vm.blocked) throw new VmBlockedError(vm);
  if (vm.vm_state !== "stopped")
    throw new ConflictError(`vm ${JSON.stringify(vm.name)} is ${vm.vm_state}, not stopped`);
  if (vm.vm_cmd) throw new ConflictError(`vm ${JSON.stringify(vm.name)} already has a pending ${vm.vm_cmd} command`);
  const home = homeKey(vm);
  const [osf] = await db`SELECT memory_mb, hypervisor FROM osfs WHERE id = ${vm.osf_id}`;
  try {
    return await transaction(db, async (tx) => {
      await tx`SELECT pg_advisory_xact_lock(${PLACEMENT_LOCK})`;
      const hostId = await placeVm(tx, osf!.memory_mb, opts.aliveWithinS, osf!.hypervisor);
      if (hostId === undefined) {
        // Which kinds a node runs is its HKD's finding (host_runtimes.hypervisors): a distinct cause.
        const why = await hypervisorShortfall(tx, osf!.hypervisor, opts.aliveWithinS);
        throw new NoNodeAvailableError(why);
      }
      if (!(await requestStart(tx, vmId, hostId, { by: opts.by ?? "api", homeKey: home })))
        throw new ConflictError(`vm ${JSON.stringify(vm.name)} changed state meanwhile; try again`);
      // The OSF it starts with (as the node records it): placement reads pending memory from it.
      await tx`UPDATE vm_runtimes SET current_osf_id = ${vm.osf_id} WHERE vm_id = ${vmId}`;
      return { host_id: hostId };
    });
  } catch (err) {
    if (
      (err as { code?: string }).code !== "23505" ||
      (err as { constraint_name?: string }).constraint_name !== "vm_runtimes_home"
    )
      throw err;
    const [other] =
      await db`SELECT v.name FROM vm_runtimes r JOIN vms v ON v.id = r.vm_id WHERE r.home_key = ${home} AND r.vm_id <> ${vmId}`;
    throw new HomeInUseError(vm.user_name, other?.name ?? "another desktop");
  }
}

/**
 * Commands a stop on the VM's node (a zombie's node retries its teardown at once); a start the
 * node has not claimed yet is withdrawn instead.
 */
export async function stopVm(db: Db, scope: Scope, vmId: number, by: Actor = "api"): Promise<void> {
  const vm = await get(db, vms, scope, vmId);
  if (await transition(db, "stop_requested", by, vmId)) return;
  if (await transition(db, "start_cancelled", by, vmId)) return;
  throw new ConflictError(
    `vm ${JSON.stringify(vm.name)} is ${vm.vm_state}; only a starting, running or zombie VM can be stopped`,
  );
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
export async function setVmExpiry(
  db: Db,
  scope: Scope,
  vmId: number,
  e: { soft_at?: Date | null; hard_at?: Date | null },
): Promise<void> {
  const vm = await get(db, vms, scope, vmId);
  const [r] = await db`UPDATE vm_runtimes r SET expire_soft_at = n.soft, expire_hard_at = n.hard
     FROM (SELECT CASE WHEN ${e.soft_at === undefined} THEN expire_soft_at ELSE ${e.soft_at ?? null}::timestamptz END AS soft,
                  CASE WHEN ${e.hard_at === undefined} THEN expire_hard_at ELSE ${e.hard_at ?? null}::timestamptz END AS hard
             FROM vm_runtimes WHERE vm_id = ${vmId}) n
     WHERE r.vm_id = ${vmId} AND r.vm_state <> 'stopped' AND (n.soft IS NULL OR n.hard IS NULL OR n.soft <= n.hard)
     RETURNING r.vm_id`;
  if (r) return;
  const [now] = await db`SELECT vm_state FROM vm_runtimes WHERE vm_id = ${vmId}`;
  if (now?.vm_state === "stopped")
    throw new ConflictError(
      `vm ${JSON.stringify(vm.name)} is stopped; an expiry applies to a running desktop (a stop clears it)`,
    );
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

/** Commands a stop of every running (or zombie) VM of a node; returns how many were told. */
export async function stopHostVms(db: Db, scope: Scope, hostId: number): Promise<number> {
  // A node runs every tenant's desktops: only a superadministrator may stop them all.
  checkWritable(hosts, scope, await get(db, hosts, scope, hostId), "update");
  const rows = await db`UPDATE vm_runtimes SET ${setOf(db, "stop_requested")}
     WHERE host_id = ${hostId} AND ${whereOf(db, "stop_requested")} RETURNING vm_id`;
  return rows.length;
}
