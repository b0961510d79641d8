// Hosts: the server nodes (HKD + L7R). Global: no tenant.
import { z } from "zod";
import { HYPERVISORS, type Hypervisor } from "../virt/backend.ts";
import { description, timestamp, type ObjectDef } from "./objects.ts";
import type { Db } from "./pool.ts";

export const HOST_STATES = ["stopped", "starting", "running", "stopping", "lost"] as const;

export const HostRow = z.object({
  id: z.number().int(),
  name: z.string(),
  address: z.string(),
  description: z.string(),
  frontend: z.boolean(),
  backend: z.boolean(),
  state: z.enum(HOST_STATES),
  state_ts: timestamp,
  blocked: z.boolean(),
  cmd: z.enum(["stop"]).nullable(),
  ok_ts: timestamp.nullable(),
  usable_ram_mb: z.number().nullable(),
  usable_cpu: z.number().nullable(),
  version: z.string().nullable(),
  vms_running: z.number().int(),
  /** No new placements; its users move at their next connect. */
  drain: z.boolean(),
  /** When and why the node was last declared lost (kept after it rejoins). */
  lost_ts: timestamp.nullable(),
  lost_reason: z.string(),
  /** The kinds of desktop the node runs now (its HKD writes them at start-up, after probing). */
  hypervisors: z
    .array(z.enum(HYPERVISORS))
    .describe("The kinds of desktop the node runs now (lxc, kvm), as its HKD found them at start-up"),
  /** What the probes found, e.g. KVM's accelerator and why. */
  hypervisor_notes: z
    .string()
    .describe("What the node's backend probes found at start-up (e.g. KVM's accelerator and why)"),
  created_at: timestamp,
  updated_at: timestamp,
});
export type HostRow = z.infer<typeof HostRow>;

export const HostCreate = z.object({
  name: z
    .string()
    .min(1)
    .max(127)
    .regex(/^[\w.-]+$/, "letters, digits, dots, dashes and underscores only"),
  address: z.string().min(1).max(127),
  description: description.optional(),
  frontend: z.boolean().optional(),
  backend: z.boolean().optional(),
});
export const HostUpdate = HostCreate.partial();

export const hosts: ObjectDef<HostRow> = {
  kind: "host",
  table: "hosts",
  view: "host_view",
  row: HostRow,
  create: HostCreate,
  update: HostUpdate,
  tenancy: "global",
  dependents: [{ label: "VMs assigned to it", table: "vm_runtimes", column: "host_id", idColumn: "vm_id" }],
  canDelete: (row) =>
    row.state === "running" || row.state === "starting"
      ? `host ${JSON.stringify(row.name)} is ${row.state}; stop its node first`
      : undefined,
};

/**
 * Records the backends a node runs and what their probes found (its HKD, at start-up): placement
 * gives it only desktops of these kinds. Unknown kinds are a programming error, not input.
 */
export async function setHostHypervisors(db: Db, hostId: number, kinds: Hypervisor[], notes: string): Promise<void> {
  const bad = kinds.filter((k) => !(HYPERVISORS as readonly string[]).includes(k));
  if (bad.length) throw new Error(`unknown hypervisor ${bad.join(", ")}`);
  const unique = [...new Set(kinds)].sort();
  await db`UPDATE host_runtimes SET hypervisors = ${unique}::text[], hypervisor_notes = ${notes.slice(0, 2000)} WHERE host_id = ${hostId}`;
}

export const HOST_COUNTERS = [
  "http_requests",
  "auth_attempts",
  "auth_ok",
  "nx_attempts",
  "nx_ok",
  "short_sessions",
] as const;

export async function incrementHostCounter(
  db: Db,
  hostId: number,
  counter: (typeof HOST_COUNTERS)[number],
  by = 1,
): Promise<void> {
  if (!HOST_COUNTERS.includes(counter)) throw new Error(`unknown host counter ${counter}`);
  await db`UPDATE host_counters SET ${db(counter)} = ${db(counter)} + ${by} WHERE host_id = ${hostId}`;
}

export async function hostCounters(db: Db, hostId: number): Promise<Record<(typeof HOST_COUNTERS)[number], number>> {
  const [r] =
    await db`SELECT http_requests::float8, auth_attempts::float8, auth_ok::float8, nx_attempts::float8, nx_ok::float8, short_sessions::float8
                         FROM host_counters WHERE host_id = ${hostId}`;
  return r as Record<(typeof HOST_COUNTERS)[number], number>;
}
