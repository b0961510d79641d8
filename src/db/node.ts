// What a node (the HKD) reads and writes. Every write about a VM is conditioned on
// `host_id = this node`, so a VM taken away from the node can never be changed by it again;
// claims are single atomic UPDATEs (never read-then-write).
import { z } from "zod";
import { diForTag, type DiRow } from "./dis.ts";
import { ConflictError, NotFoundError } from "./errors.ts";
import { transition } from "./lifecycle.ts";
import type { Db } from "./pool.ts";

export const HostIdentity = z.object({
  id: z.number().int(),
  name: z.string(),
  address: z.string(),
  backend: z.boolean(),
  frontend: z.boolean(),
});
export type HostIdentity = z.infer<typeof HostIdentity>;

export async function findHostByName(db: Db, name: string): Promise<HostIdentity | undefined> {
  const [r] = await db`SELECT id, name, address, backend, frontend FROM hosts WHERE name = ${name}`;
  return r ? HostIdentity.parse(r) : undefined;
}

/** Creates the host row for `qvd node --register` (or returns the existing one). */
export async function registerHost(db: Db, name: string, address: string): Promise<HostIdentity> {
  await db`INSERT INTO hosts (name, address) VALUES (${name}, ${address}) ON CONFLICT (name) DO NOTHING`;
  const h = await findHostByName(db, name);
  if (!h) throw new NotFoundError("host", name);
  return h;
}

/** How many of a node's desktops are in each state (its metrics). */
export async function nodeVmStates(db: Db, hostId: number): Promise<{ state: string; count: number }[]> {
  return (await db`SELECT vm_state AS state, count(*)::integer AS count FROM vm_runtimes WHERE host_id = ${hostId} GROUP BY vm_state ORDER BY vm_state`) as unknown as {
    state: string;
    count: number;
  }[];
}

export async function setHostState(
  db: Db,
  hostId: number,
  state: "starting" | "running" | "stopping" | "stopped",
): Promise<void> {
  await db`UPDATE host_runtimes SET state = ${state}, state_ts = now(), cmd = CASE WHEN ${state} = 'stopped' THEN NULL ELSE cmd END
           WHERE host_id = ${hostId}`;
}

/**
 * The heartbeat: records that the node is alive and what it can take. Answers false when the
 * node was declared lost by others (then it must fence itself: its VMs are no longer its own).
 */
export async function heartbeat(
  db: Db,
  hostId: number,
  r: { pid: number; usableRamMb: number; usableCpu: number; version: string },
): Promise<boolean> {
  const rows = await db`UPDATE host_runtimes SET ok_ts = now(), pid = ${r.pid}, usable_ram_mb = ${r.usableRamMb},
      usable_cpu = ${r.usableCpu}, version = ${r.version}
    WHERE host_id = ${hostId} AND state <> 'lost' RETURNING host_id`;
  return rows.length === 1;
}

/** A pending host command (`stop`), consumed: cleared only if it is still the same. */
export async function takeHostCommand(db: Db, hostId: number): Promise<"stop" | undefined> {
  const [r] =
    await db`UPDATE host_runtimes SET cmd = NULL WHERE host_id = ${hostId} AND cmd IS NOT NULL RETURNING 'stop' AS cmd`;
  return r ? "stop" : undefined;
}

// Claims of start and stop commands are lifecycle events: claimStarts / claimStops in lifecycle.ts.

export interface VmToStart {
  vm_id: number;
  name: string;
  ip: string | null;
  di_tag: string;
  user_id: number;
  user_name: string;
  tenant_id: number;
  tenant_name: string;
  osf_id: number;
  memory_mb: number;
  cpu_shares: number;
  use_overlay: boolean;
  persistent: boolean;
  user_storage_mb: number;
  hypervisor: "lxc" | "kvm";
  vcpus: number;
  di: DiRow | undefined;
}

/** Everything needed to start a VM; `di` is undefined when no usable image has the VM's tag. */
export async function vmToStart(db: Db, vmId: number): Promise<VmToStart> {
  const [r] = await db`SELECT v.id AS vm_id, v.name, host(v.ip) AS ip, v.di_tag, v.user_id, u.name AS user_name,
      v.tenant_id, t.name AS tenant_name, v.osf_id, o.memory_mb, o.cpu_shares, o.use_overlay, o.persistent, o.user_storage_mb, o.hypervisor, o.vcpus
    FROM vms v JOIN users u ON u.id = v.user_id JOIN osfs o ON o.id = v.osf_id JOIN tenants t ON t.id = v.tenant_id
    WHERE v.id = ${vmId}`;
  if (!r) throw new NotFoundError("vm", vmId);
  return { ...(r as Omit<VmToStart, "di">), di: await diForTag(db, r.osf_id, r.di_tag) };
}

/** The pid of a desktop's process on its node (the container's init, or QEMU), for administrators. */
export async function saveVmPid(db: Db, hostId: number, vmId: number, pid: number): Promise<void> {
  await db`UPDATE vm_runtimes SET vm_pid = ${pid} WHERE vm_id = ${vmId} AND host_id = ${hostId}`;
}

/** Runtime fields a node records while starting a VM; only while the VM is this node's. */
export async function saveStartingRuntime(
  db: Db,
  hostId: number,
  vmId: number,
  f: { diId: number; osfId: number; address: string; vmaPort: number; xPort: number; vmaSecret: string },
): Promise<void> {
  const rows =
    await db`UPDATE vm_runtimes SET current_di_id = ${f.diId}, current_osf_id = ${f.osfId}, vm_address = ${f.address},
      vma_port = ${f.vmaPort}, x_port = ${f.xPort}, vma_secret = ${f.vmaSecret}
    WHERE vm_id = ${vmId} AND host_id = ${hostId} AND vm_state = 'starting' RETURNING vm_id`.catch((err) => {
      // vm_runtimes_address: another desktop runs with this address; this one must not start.
      if ((err as { code?: string }).code === "23505")
        throw new ConflictError(`address ${f.address} is in use by another running desktop`, "ip");
      throw err;
    });
  if (rows.length !== 1) throw new ConflictError(`vm ${vmId} is no longer assigned to this node`);
  await db`UPDATE vm_counters SET run_attempts = run_attempts + 1 WHERE vm_id = ${vmId}`;
}

/** The lifecycle events a node causes about its own desktops (lifecycle.ts). */
export type NodeVmEvent = "started" | "stop_begun" | "teardown_failed" | "zombie_retried" | "stopped" | "found_stopped";

/**
 * A node's lifecycle event for one of its VMs; false when the table refuses it (the VM is no
 * longer this node's, or another event came first). `stopped`/`found_stopped` release the VM.
 */
export async function vmEvent(db: Db, hostId: number, vmId: number, event: NodeVmEvent): Promise<boolean> {
  const ok = await transition(db, event, "hkd", vmId, hostId);
  if (ok && event === "started") await db`UPDATE vm_counters SET run_ok = run_ok + 1 WHERE vm_id = ${vmId}`;
  return ok;
}

/** A VM that could not start is blocked, with a reason an administrator can read. */
export async function blockVmWithReason(db: Db, vmId: number, reason: string): Promise<void> {
  await db`UPDATE vm_runtimes SET blocked = true, blocked_reason = ${reason.slice(0, 2000)} WHERE vm_id = ${vmId}`;
}

export interface NodeVmRow {
  vm_id: number;
  vm_state: string;
  vma_secret: string | null;
  vm_address: string | null;
  vma_port: number | null;
  expire_soft_at: Date | null;
  expire_hard_at: Date | null;
}

/** This node's VMs that are not stopped (for reconciliation, monitoring and expiry). */
/** Of these VMs, those the database gives to another node now (their shared storage is that node's). */
export async function vmsOnOtherNodes(db: Db, hostId: number, vmIds: number[]): Promise<Set<number>> {
  if (vmIds.length === 0) return new Set();
  const rows =
    await db`SELECT vm_id FROM vm_runtimes WHERE vm_id = ANY(${vmIds}) AND host_id IS NOT NULL AND host_id <> ${hostId}`;
  return new Set(rows.map((r) => r.vm_id as number));
}

export async function vmsOfHost(db: Db, hostId: number): Promise<NodeVmRow[]> {
  return (await db`SELECT vm_id, vm_state, vma_secret, host(vm_address) AS vm_address, vma_port, expire_soft_at, expire_hard_at
    FROM vm_runtimes WHERE host_id = ${hostId} AND vm_state <> 'stopped' ORDER BY vm_id`) as unknown as NodeVmRow[];
}

/** Sessions this node's L7R held when it died are over. */
export async function clearL7rSessions(db: Db, hostId: number): Promise<number> {
  const rows = await db`UPDATE vm_runtimes SET user_state = 'disconnected', user_state_ts = now(), user_cmd = NULL,
      l7r_host_id = NULL, l7r_pid = NULL, l7r_session = NULL WHERE l7r_host_id = ${hostId} RETURNING vm_id`;
  return rows.length;
}
