// Placement: which node runs a desktop about to start, and where a queued start stands.
//
// A node is a candidate when it is a backend, running, not blocked, not draining, runs the
// desktop's hypervisor (host_runtimes.hypervisors, written by its HKD at start-up), and its
// heartbeat is within `cluster.alive_within` (the one liveness window every caller uses). Its
// free memory is what it reported at its last heartbeat minus the memory of the desktops it
// has taken on since, which that report cannot show yet: those placed on it (start command
// pending), starting, or running since a state change newer than the heartbeat. A node
// without room after that is no candidate; the others are scored by free memory and CPU
// (relative to the best node) plus a random term, so a burst spreads over the farm.
import type { Config } from "../config.ts";
import type { Hypervisor } from "../virt/backend.ts";
import { transition } from "./lifecycle.ts";
import { transaction, type Db } from "./pool.ts";

/** Weights of the placement score; the random term spreads starts between similar nodes. */
const W_RAM = 0.6;
const W_CPU = 0.3;
const W_RANDOM = 0.1;

/** The liveness window: seconds since a node's heartbeat within which it is given desktops. */
export const aliveWithinS = (cfg: Pick<Config, "get">): number => cfg.get("cluster.alive_within");

export interface Candidate {
  id: number;
  name: string;
  /** Reported free memory minus the memory of desktops taken on since the report (MiB). */
  free_mb: number;
  /** Of which pending (MiB). */
  pending_mb: number;
  cpu: number;
}

/**
 * The candidates for a `hypervisor` desktop of `memoryMb`, as a subquery. The pending sum finds its rows
 * through indexes only (vm_runtimes_pending, vm_runtimes_state, vm_runtimes_state_ts): the
 * first OR keeps the scan to commands, starts and recent changes farm-wide. Their memory comes
 * from current_osf_id (set by the start command, then by the node), so no VM row is read.
 */
const candidates = (db: Db, memoryMb: number, aliveS: number, hypervisor: Hypervisor) => db`
  WITH alive AS (
    SELECT h.id, h.name, r.ok_ts, coalesce(r.usable_ram_mb, 0)::float8 AS ram, coalesce(r.usable_cpu, 0)::float8 AS cpu
      FROM hosts h JOIN host_runtimes r ON r.host_id = h.id
     WHERE h.backend AND r.state = 'running' AND NOT r.blocked AND NOT r.drain
       AND r.ok_ts > now() - make_interval(secs => ${aliveS}) AND ${hypervisor}::text = ANY(r.hypervisors)
  ), pending AS (
    SELECT vr.host_id, sum(o.memory_mb)::float8 AS mb
      FROM vm_runtimes vr JOIN alive a ON a.id = vr.host_id JOIN osfs o ON o.id = coalesce(vr.current_osf_id, (SELECT v.osf_id FROM vms v WHERE v.id = vr.vm_id))
     WHERE (vr.vm_cmd = 'start' OR vr.vm_state = 'starting' OR vr.vm_state_ts > now() - make_interval(secs => ${aliveS}))
       AND (vr.vm_cmd = 'start' OR vr.vm_state = 'starting' OR (vr.vm_state = 'running' AND vr.vm_state_ts >= a.ok_ts))
     GROUP BY vr.host_id
  )
  SELECT a.id, a.name, a.ram - coalesce(p.mb, 0) AS free_mb, coalesce(p.mb, 0) AS pending_mb, a.cpu
    FROM alive a LEFT JOIN pending p ON p.host_id = a.id
   WHERE a.ram - coalesce(p.mb, 0) >= ${memoryMb}`;

/** Every node that could take a `hypervisor` desktop of `memoryMb` now, with what placement weighs. */
export async function placementCandidates(
  db: Db,
  memoryMb: number,
  aliveS: number,
  hypervisor: Hypervisor = "lxc",
): Promise<Candidate[]> {
  return (await db`SELECT * FROM (${candidates(db, memoryMb, aliveS, hypervisor)}) c ORDER BY id`) as unknown as Candidate[];
}

const pick = (
  db: Db,
  memoryMb: number,
  aliveS: number,
  hypervisor: Hypervisor,
) => db`SELECT id FROM (${candidates(db, memoryMb, aliveS, hypervisor)}) c
    ORDER BY ${W_RAM} * free_mb / greatest(max(free_mb) OVER (), 1) + ${W_CPU} * cpu / greatest(max(cpu) OVER (), 1) + ${W_RANDOM} * random() DESC
    LIMIT 1`;

/** Picks the node for a `hypervisor` desktop of `memoryMb` (one query); undefined when none qualifies. */
export async function placeVm(
  db: Db,
  memoryMb: number,
  aliveS: number,
  hypervisor: Hypervisor = "lxc",
): Promise<number | undefined> {
  const [r] = await pick(db, memoryMb, aliveS, hypervisor);
  return r?.id;
}

/**
 * Why no node takes a `hypervisor` desktop, when the cause is that no running backend node runs
 * that kind (blocked, draining or full ones included) while some run others; undefined otherwise.
 */
export async function hypervisorShortfall(db: Db, hypervisor: Hypervisor, aliveS: number): Promise<string | undefined> {
  const [r] = await db`SELECT count(*) FILTER (WHERE ${hypervisor}::text = ANY(r.hypervisors))::int AS runs,
         array(SELECT DISTINCT k FROM hosts h2 JOIN host_runtimes r2 ON r2.host_id = h2.id, unnest(r2.hypervisors) k
                WHERE h2.backend AND r2.state = 'running' AND r2.ok_ts > now() - make_interval(secs => ${aliveS}) ORDER BY k) AS kinds
       FROM hosts h JOIN host_runtimes r ON r.host_id = h.id
      WHERE h.backend AND r.state = 'running' AND r.ok_ts > now() - make_interval(secs => ${aliveS})`;
  if (!r || r.runs > 0 || r.kinds.length === 0) return undefined;
  return `no running node runs ${hypervisor} desktops (they run ${r.kinds.join(", ")})`;
}

/** The plan of placeVm's query (bench/farm.ts checks which tables it reads in full). */
export async function placementPlan(
  db: Db,
  memoryMb: number,
  aliveS: number,
  hypervisor: Hypervisor = "lxc",
): Promise<string[]> {
  return (await db`EXPLAIN ${pick(db, memoryMb, aliveS, hypervisor)}`).map((r) => r["QUERY PLAN"] as string);
}

export interface QueuePlace {
  host_id: number;
  host_name: string;
  /** Queued starts on that node given before this one (they are claimed first). */
  ahead: number;
  /** Desktops starting on that node now. */
  starting: number;
}

/**
 * Where a VM's start command stands in its node's queue (the HKD claims at most
 * `hkd.max_starting` at once, oldest command first: vm_cmd_ts, then vm_id); undefined when the
 * VM has no start command waiting.
 */
export async function startQueuePlace(db: Db, vmId: number): Promise<QueuePlace | undefined> {
  const [r] = await db`SELECT me.host_id, h.name AS host_name,
      (SELECT count(*) FROM vm_runtimes q WHERE q.host_id = me.host_id AND q.vm_cmd = 'start' AND q.vm_state = 'stopped'
          AND (coalesce(q.vm_cmd_ts, '-infinity'), q.vm_id) < (coalesce(me.vm_cmd_ts, '-infinity'), me.vm_id))::integer AS ahead,
      (SELECT count(*) FROM vm_runtimes s WHERE s.host_id = me.host_id AND s.vm_state = 'starting')::integer AS starting
    FROM vm_runtimes me JOIN hosts h ON h.id = me.host_id
    WHERE me.vm_id = ${vmId} AND me.vm_cmd = 'start' AND me.vm_state = 'stopped'`;
  return r as QueuePlace | undefined;
}

/**
 * Withdraws a start its node has not claimed when that node is no longer alive (no heartbeat
 * within `aliveS`, stopped, lost, blocked or draining), so the VM can be placed again at once
 * instead of waiting for the node to be declared lost. The VM's row is locked while the node is
 * judged: a node claiming meanwhile either claims first (then nothing is withdrawn) or finds
 * the command gone. True when it was withdrawn.
 */
export async function withdrawStaleStart(db: Db, vmId: number, aliveS: number): Promise<boolean> {
  return transaction(db, async (tx) => {
    const [r] = await tx`SELECT vr.vm_id FROM vm_runtimes vr JOIN host_runtimes h ON h.host_id = vr.host_id
      WHERE vr.vm_id = ${vmId} AND vr.vm_state = 'stopped' AND vr.vm_cmd = 'start'
        AND NOT (h.state = 'running' AND NOT h.blocked AND NOT h.drain AND h.ok_ts > now() - make_interval(secs => ${aliveS}))
      FOR UPDATE OF vr`;
    return r ? transition(tx, "start_cancelled", "l7r", vmId) : false;
  });
}
