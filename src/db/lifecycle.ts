// The one VM lifecycle: every change of a VM's state, pending command or node goes through the
// table below. Each event is ONE conditional UPDATE whose WHERE clause is built from its row
// (states it may come from, the command it needs, whose node it must be on), so two writers
// racing can never both win, and nothing reads a row to decide what to write. Events about a
// node's own desktops are conditioned on `host_id = that node`: a VM taken away from a node
// (declared lost, cleared) can never be changed by it again.
import type postgres from "postgres";
import { ConflictError } from "./errors.ts";
import { get, type Scope } from "./objects.ts";
import { transaction, type Db } from "./pool.ts";
import { vms, VM_STATES } from "./vms.ts";

export type VmState = (typeof VM_STATES)[number];
export type VmCmd = "start" | "stop";

/** Who causes events: the admin API (and the WAT through it), the L7R on a user's behalf, a
 * node's HKD about its own desktops, a node's cluster monitor about another node, and an
 * administrator's explicit farm actions (declare lost, clear zombie). */
export const ACTORS = ["api", "l7r", "hkd", "monitor", "admin"] as const;
export type Actor = (typeof ACTORS)[number];

/**
 * Which node the VM must be on:
 * - `this`: the node the event is about (the acting HKD's node, or the node declared lost);
 * - `placing`: no node yet, or the node it is being placed on;
 * - `assigned`: any node;
 * - `dead`: no node, or one that is lost or stopped (nobody there can tear it down any more);
 * - `any`: no condition.
 */
export type NodeRule = "this" | "placing" | "assigned" | "dead" | "any";

export interface VmTransition {
  /** States the VM may be in. */
  from: readonly VmState[];
  /** The pending command it must have (null: none); undefined: any. */
  cmd?: readonly (VmCmd | null)[];
  node: NodeRule;
  /** Only an unblocked VM. */
  unblocked?: boolean;
  /** The state after the event; undefined: unchanged. */
  to?: VmState;
  /** The pending command after the event; undefined: unchanged. */
  cmdAfter?: VmCmd | null;
  /** host_id := the node given (placement). */
  assign?: boolean;
  /** No node any more, and every runtime field of the last run forgotten (address, secret,
   * ports, image, expiry, home). */
  release?: boolean;
  actors: readonly Actor[];
  /** One line for the documentation. */
  doc: string;
}

const LIVE: VmState[] = ["starting", "running", "debugging"];

export const VM_TRANSITIONS = {
  start_requested: {
    from: ["stopped"],
    cmd: [null],
    node: "placing",
    unblocked: true,
    cmdAfter: "start",
    assign: true,
    actors: ["api", "l7r"],
    doc: "placed on a node, which is told to start it",
  },
  start_cancelled: {
    from: ["stopped"],
    cmd: ["start"],
    node: "any",
    cmdAfter: null,
    release: true,
    actors: ["api", "l7r"],
    doc: "a start not yet claimed by its node is withdrawn",
  },
  start_claimed: {
    from: ["stopped"],
    cmd: ["start"],
    node: "this",
    to: "starting",
    cmdAfter: null,
    actors: ["hkd"],
    doc: "the node takes the start (at most hkd.max_starting at once, oldest first)",
  },
  started: {
    from: ["starting"],
    node: "this",
    to: "running",
    actors: ["hkd"],
    doc: "the desktop's VMA answers",
  },
  stop_begun: {
    from: [...LIVE, "stopping"],
    node: "this",
    to: "stopping",
    actors: ["hkd"],
    doc: "the node tears the desktop down (stop command, failed start, expiry, dead VMA, shutdown)",
  },
  stopped: {
    from: ["stopping"],
    node: "this",
    to: "stopped",
    cmdAfter: null,
    release: true,
    actors: ["hkd"],
    doc: "torn down and cleaned up: no node, runtime cleared",
  },
  teardown_failed: {
    from: ["stopping"],
    node: "this",
    to: "zombie",
    actors: ["hkd"],
    doc: "the teardown failed; the node retries it with backoff (hkd.zombie_retry)",
  },
  zombie_retried: {
    from: ["zombie"],
    node: "this",
    to: "stopping",
    actors: ["hkd"],
    doc: "the node tries the teardown again",
  },
  found_stopped: {
    from: [...LIVE, "stopping", "zombie"],
    node: "this",
    to: "stopped",
    cmdAfter: null,
    release: true,
    actors: ["hkd"],
    doc: "at start-up the node finds the desktop no longer runs, and cleans up after it",
  },
  stop_requested: {
    from: [...LIVE, "zombie"],
    cmd: [null, "start"],
    node: "assigned",
    cmdAfter: "stop",
    actors: ["api", "l7r"],
    doc: "the VM's node is told to stop it (a zombie's node retries its teardown at once)",
  },
  stop_claimed: {
    from: [...LIVE, "stopping", "zombie"],
    cmd: ["stop"],
    node: "this",
    cmdAfter: null,
    actors: ["hkd"],
    doc: "the node takes the stop command",
  },
  node_lost: {
    from: VM_STATES,
    node: "this",
    to: "stopped",
    cmdAfter: null,
    release: true,
    actors: ["monitor", "admin"],
    doc: "its node is declared lost: the VM is released and can start elsewhere",
  },
  zombie_cleared: {
    from: ["zombie"],
    node: "dead",
    to: "stopped",
    cmdAfter: null,
    release: true,
    actors: ["admin"],
    doc: "an administrator clears a zombie whose node is lost, stopped or gone",
  },
} as const satisfies Record<string, VmTransition>;

export type VmEvent = keyof typeof VM_TRANSITIONS;
export const VM_EVENTS = Object.keys(VM_TRANSITIONS) as VmEvent[];

type Frag = postgres.PendingQuery<postgres.Row[]>;

function and(db: Db, parts: Frag[]) {
  return parts.reduce((a, b) => db`${a} AND ${b}`);
}
function comma(db: Db, parts: Frag[]) {
  return parts.reduce((a, b) => db`${a}, ${b}`);
}

/** The WHERE clause of an event, from its row of the table. */
export function whereOf(db: Db, event: VmEvent, hostId?: number) {
  const t: VmTransition = VM_TRANSITIONS[event];
  const parts: Frag[] = [db`vm_runtimes.vm_state IN ${db(t.from as string[])}`];
  if (t.cmd) {
    const cmds = t.cmd.filter((c): c is VmCmd => c !== null);
    const none = t.cmd.includes(null);
    if (cmds.length && none) parts.push(db`(vm_runtimes.vm_cmd IS NULL OR vm_runtimes.vm_cmd IN ${db(cmds)})`);
    else if (cmds.length) parts.push(db`vm_runtimes.vm_cmd IN ${db(cmds)}`);
    else parts.push(db`vm_runtimes.vm_cmd IS NULL`);
  }
  if (t.unblocked) parts.push(db`NOT vm_runtimes.blocked`);
  const node = needNode(event, t, hostId);
  switch (t.node) {
    case "this":
      parts.push(db`vm_runtimes.host_id = ${node!}`);
      break;
    case "placing":
      parts.push(db`(vm_runtimes.host_id IS NULL OR vm_runtimes.host_id = ${node!})`);
      break;
    case "assigned":
      parts.push(db`vm_runtimes.host_id IS NOT NULL`);
      break;
    case "dead":
      parts.push(
        db`NOT EXISTS (SELECT 1 FROM host_runtimes h WHERE h.host_id = vm_runtimes.host_id AND h.state NOT IN ('lost', 'stopped'))`,
      );
      break;
    case "any":
      break;
  }
  return and(db, parts);
}

/** The SET clause of an event, from its row of the table. */
export function setOf(db: Db, event: VmEvent, hostId?: number) {
  const t: VmTransition = VM_TRANSITIONS[event];
  const parts: Frag[] = [];
  if (t.to) {
    parts.push(db`vm_state = ${t.to}, vm_state_ts = now()`);
    if (t.to === "running") parts.push(db`vma_ok_ts = now()`);
  }
  if (t.cmdAfter !== undefined)
    parts.push(db`vm_cmd = ${t.cmdAfter}, vm_cmd_ts = ${t.cmdAfter === null ? null : db`now()`}`);
  if (t.assign) parts.push(db`host_id = ${needNode(event, t, hostId)!}`);
  if (t.release) {
    parts.push(db`host_id = NULL, vm_pid = NULL, current_di_id = NULL, current_osf_id = NULL, vm_address = NULL, vma_port = NULL,
      x_port = NULL, vma_secret = NULL, vma_ok_ts = NULL, expire_soft_at = NULL, expire_hard_at = NULL, home_key = NULL`);
  }
  return comma(db, parts);
}

function needNode(event: VmEvent, t: VmTransition, hostId: number | undefined): number | undefined {
  if ((t.node === "this" || t.node === "placing" || t.assign) && hostId === undefined)
    throw new Error(`lifecycle: event ${event} needs a node`);
  return hostId;
}

function allowed(event: VmEvent, by: Actor): void {
  if (!(VM_TRANSITIONS[event].actors as readonly Actor[]).includes(by))
    throw new Error(`lifecycle: ${by} may not cause ${event}`);
}

/**
 * Applies one event to one VM. `hostId`: the acting node (HKD events), the node placed on
 * (start_requested) or the node declared lost. False when the VM is not in a state the table
 * allows for the event (someone else changed it first): nothing was written.
 */
export async function transition(db: Db, event: VmEvent, by: Actor, vmId: number, hostId?: number): Promise<boolean> {
  allowed(event, by);
  const rows = await db`UPDATE vm_runtimes SET ${setOf(db, event, hostId)}
    WHERE vm_runtimes.vm_id = ${vmId} AND ${whereOf(db, event, hostId)} RETURNING vm_id`;
  return rows.length === 1;
}

/** Applies one event to every VM it allows (of one node); returns their ids. */
export async function transitionAll(db: Db, event: VmEvent, by: Actor, hostId?: number): Promise<number[]> {
  allowed(event, by);
  const rows =
    await db`UPDATE vm_runtimes SET ${setOf(db, event, hostId)} WHERE ${whereOf(db, event, hostId)} RETURNING vm_id`;
  return rows.map((r) => r.vm_id as number);
}

// --- the events, by name -------------------------------------------------------------------------

/**
 * A stopped VM with no pending command is placed on `hostId` and that node told to start it
 * (the queue orders by vm_cmd_ts). `homeKey`: the home the desktop will use (unique while
 * placed or running). False when the VM changed meanwhile or is blocked.
 */
export async function requestStart(
  db: Db,
  vmId: number,
  hostId: number,
  opts: { by?: Actor; homeKey?: string } = {},
): Promise<boolean> {
  allowed("start_requested", opts.by ?? "api");
  const home = opts.homeKey === undefined ? db`` : db`, home_key = ${opts.homeKey}`;
  const rows = await db`UPDATE vm_runtimes SET ${setOf(db, "start_requested", hostId)} ${home}
    WHERE vm_id = ${vmId} AND ${whereOf(db, "start_requested", hostId)} RETURNING vm_id`;
  return rows.length === 1;
}

/**
 * The node takes at most `max` of its pending starts, oldest command first: stopped → starting.
 * `lagS`: seconds from the start command to this claim (the NOTIFY's delivery and the node's
 * reaction to it; its metric).
 */
export async function claimStarts(
  db: Db,
  hostId: number,
  max: number,
): Promise<{ vmId: number; lagS: number | null }[]> {
  if (max <= 0) return [];
  const where = whereOf(db, "start_claimed", hostId);
  const rows = await db`UPDATE vm_runtimes SET ${setOf(db, "start_claimed", hostId)}
    FROM (SELECT vm_id AS q_id, vm_cmd_ts AS q_ts FROM vm_runtimes WHERE ${where} ORDER BY vm_cmd_ts NULLS FIRST, vm_id LIMIT ${max}) q
    WHERE vm_id = q.q_id AND ${where}
    RETURNING vm_id, extract(epoch FROM clock_timestamp() - q.q_ts)::float8 AS lag`;
  return rows.map((r) => ({ vmId: r.vm_id as number, lagS: r.lag === null ? null : Number(r.lag) }));
}

/** The node takes the stop commands for its VMs. */
export function claimStops(db: Db, hostId: number): Promise<number[]> {
  return transitionAll(db, "stop_claimed", "hkd", hostId);
}

/**
 * A node is declared lost, in one transaction: the host → lost (only when not already lost or
 * stopped and, with `staleForS`, only when its last heartbeat is older than that), each of its
 * VMs → stopped and released, sessions its L7R held → disconnected, and sessions other L7Rs
 * hold to the released VMs told to end. Returns the released VMs.
 */
export async function declareNodeLost(
  db: Db,
  hostId: number,
  reason: string,
  opts: { staleForS?: number; by?: Actor } = {},
): Promise<{ declared: boolean; vms: number[] }> {
  const by = opts.by ?? "monitor";
  allowed("node_lost", by);
  return transaction(db, async (tx) => {
    const stale =
      opts.staleForS === undefined
        ? tx`true`
        : tx`coalesce(ok_ts, state_ts) < now() - make_interval(secs => ${opts.staleForS})`;
    const [h] =
      await tx`UPDATE host_runtimes SET state = 'lost', state_ts = now(), lost_ts = now(), lost_reason = ${reason.slice(0, 2000)}, cmd = NULL
      WHERE host_id = ${hostId} AND state NOT IN ('lost', 'stopped') AND ${stale} RETURNING host_id`;
    if (!h) return { declared: false, vms: [] };
    const released = await tx`UPDATE vm_runtimes SET ${setOf(tx, "node_lost", hostId)},
        user_cmd = CASE WHEN user_state <> 'disconnected' AND l7r_host_id IS DISTINCT FROM ${hostId} THEN 'abort' ELSE user_cmd END
      WHERE ${whereOf(tx, "node_lost", hostId)} RETURNING vm_id`;
    await tx`UPDATE vm_runtimes SET user_state = 'disconnected', user_state_ts = now(), user_cmd = NULL,
        l7r_host_id = NULL, l7r_pid = NULL, l7r_session = NULL WHERE l7r_host_id = ${hostId}`;
    return { declared: true, vms: released.map((r) => r.vm_id as number).sort((a, b) => a - b) };
  });
}

/** A lost node that has killed everything it ran rejoins: lost → starting (lost_ts kept). */
export async function rejoinHost(db: Db, hostId: number): Promise<boolean> {
  // Rejoining is a heartbeat: with the old ok_ts the other nodes' monitors declare it lost again.
  const rows =
    await db`UPDATE host_runtimes SET state = 'starting', state_ts = now(), ok_ts = now() WHERE host_id = ${hostId} AND state = 'lost' RETURNING host_id`;
  return rows.length === 1;
}

/**
 * An administrator clears a zombie whose node is lost, stopped or gone: stopped, runtime
 * cleared. On a live node the node itself must tear it down: ConflictError saying to stop it.
 */
export async function clearZombie(db: Db, scope: Scope, vmId: number): Promise<void> {
  const vm = await get(db, vms, scope, vmId);
  if (await transition(db, "zombie_cleared", "admin", vmId)) return;
  const now = await get(db, vms, scope, vmId);
  if (now.vm_state !== "zombie")
    throw new ConflictError(`vm ${JSON.stringify(vm.name)} is ${now.vm_state}, not a zombie`);
  throw new ConflictError(
    `vm ${JSON.stringify(vm.name)} is a zombie on node ${JSON.stringify(now.host_name ?? String(now.host_id))}, which is alive: stop the VM instead (its node retries the teardown)`,
  );
}

/** The lifecycle table in Markdown, for the documentation (src/db/README.md). */
export function lifecycleMarkdown(): string {
  const lines = ["| event | from | needs | to | command after | who | what |", "|---|---|---|---|---|---|---|"];
  for (const e of VM_EVENTS) {
    const t: VmTransition = VM_TRANSITIONS[e];
    const needs = [
      t.cmd ? `cmd ${t.cmd.map((c) => c ?? "none").join("/")}` : "",
      {
        this: "on that node",
        placing: "no node or the chosen one",
        assigned: "has a node",
        dead: "node lost, stopped or gone",
        any: "",
      }[t.node],
      t.unblocked ? "unblocked" : "",
    ]
      .filter(Boolean)
      .join(", ");
    const to = t.release ? `${t.to ?? "same"}, released` : (t.to ?? "same");
    const cmd = t.cmdAfter === undefined ? "same" : (t.cmdAfter ?? "none");
    lines.push(
      `| \`${e}\` | ${t.from.join(", ")} | ${needs} | ${to}${t.assign ? ", placed" : ""} | ${cmd} | ${t.actors.join(", ")} | ${t.doc} |`,
    );
  }
  return lines.join("\n");
}
