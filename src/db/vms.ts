// Virtual machines (desktops) and their runtime rows. A VM belongs to its owner's tenant; its
// OSF must be of the same tenant (enforced by composite foreign keys). Runtime rows and
// counters are created by the database with the VM.
import { z } from "zod";
import { ConflictError, DataError, ValidationError } from "./errors.ts";
import { create, description, timestamp, type ObjectDef, type Scope } from "./objects.ts";
import { osfs } from "./osfs.ts";
import type { Db } from "./pool.ts";
import { users } from "./users.ts";

export const VM_STATES = ["stopped", "starting", "running", "stopping", "zombie", "debugging"] as const;
export const USER_STATES = ["disconnected", "connecting", "connected"] as const;

const ipv4 = z
  .string()
  .regex(/^((25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(25[0-5]|2[0-4]\d|1?\d?\d)$/, "expected an IPv4 address");

export const VmRow = z.object({
  id: z.number().int(),
  tenant_id: z.number().int(),
  tenant_name: z.string(),
  user_id: z.number().int(),
  user_name: z.string(),
  osf_id: z.number().int(),
  osf_name: z.string(),
  name: z.string(),
  description: z.string(),
  di_tag: z.string(),
  ip: z.string().nullable(),
  storage: z.string(),
  host_id: z.number().int().nullable(),
  host_name: z.string().nullable(),
  vm_state: z.enum(VM_STATES),
  vm_state_ts: timestamp,
  vm_cmd: z.enum(["start", "stop", "busy"]).nullable(),
  blocked: z.boolean(),
  blocked_reason: z.string(),
  user_state: z.enum(USER_STATES),
  user_state_ts: timestamp,
  user_cmd: z.enum(["abort"]).nullable(),
  user_ip: z.string().nullable(),
  l7r_host_id: z.number().int().nullable(),
  current_di_id: z.number().int().nullable(),
  vm_address: z.string().nullable(),
  vma_port: z.number().int().nullable(),
  x_port: z.number().int().nullable(),
  expire_soft_at: timestamp.nullable(),
  expire_hard_at: timestamp.nullable(),
  created_at: timestamp,
  updated_at: timestamp,
});
export type VmRow = z.infer<typeof VmRow>;

export const VmCreate = z.object({
  user_id: z.number().int().positive(),
  osf_id: z.number().int().positive(),
  name: z.string().min(1).max(64),
  description: description.optional(),
  di_tag: z
    .string()
    .regex(/^[^\s,]{1,128}$/, "1 to 128 characters, no spaces or commas")
    .optional(),
  ip: ipv4.nullable().optional(),
  storage: z.string().max(4096).optional(),
});
export const VmUpdate = VmCreate.omit({ user_id: true, osf_id: true }).partial();

export const vms: ObjectDef<VmRow> = {
  kind: "vm",
  table: "vms",
  view: "vm_view",
  row: VmRow,
  create: VmCreate,
  update: VmUpdate,
  tenancy: "own",
  tenantFrom: { field: "user_id", def: users, copyTenant: true },
  refs: { osf_id: osfs },
  canDelete: (row) =>
    row.vm_state !== "stopped"
      ? `vm ${JSON.stringify(row.name)} is ${row.vm_state}; stop it before deleting it`
      : undefined,
};

// --- address allocation ------------------------------------------------------------------------

const ipToInt = (ip: string) => ip.split(".").reduce((n, o) => n * 256 + Number(o), 0);
const intToIp = (n: number) => [24, 16, 8, 0].map((s) => Math.floor(n / 2 ** s) % 256).join(".");

/** Addresses of a network that VMs may get: all but network, broadcast and the gateway. */
export function vmAddressRange(cidr: string, gateway?: string): { first: number; last: number; gateway: number } {
  const [base, bits] = cidr.split("/");
  const size = 2 ** (32 - Number(bits));
  if (size < 4) throw new ValidationError("vm.network.range", "the VM network must have at least 4 addresses");
  const network = Math.floor(ipToInt(base!) / size) * size;
  const gw = gateway ? ipToInt(gateway) : network + 1;
  return { first: network + 1, last: network + size - 2, gateway: gw };
}

/**
 * The lowest free address of the VM network: neither a VM's nor one a desktop still runs with
 * (the unique indexes settle races).
 */
export async function freeVmAddress(db: Db, cidr: string, gateway?: string): Promise<string> {
  const r = vmAddressRange(cidr, gateway);
  const used = new Set(
    (
      await db`SELECT host(ip) AS ip FROM vms WHERE ip << ${cidr}::inet
      UNION SELECT host(vm_address) FROM vm_runtimes WHERE vm_address << ${cidr}::inet`
    ).map((row) => ipToInt(row.ip)),
  );
  for (let n = r.first; n <= r.last; n++) if (n !== r.gateway && !used.has(n)) return intToIp(n);
  throw new ConflictError(`no free address left in the VM network ${cidr}`, "ip");
}

/**
 * Creates a VM; without an explicit `ip`, allocates the lowest free address of `network`
 * (retrying when another creation took the same address at the same moment).
 */
export async function createVm(
  db: Db,
  scope: Scope,
  input: Record<string, unknown>,
  network?: { range: string; gateway?: string },
): Promise<VmRow> {
  if (input.ip !== undefined || !network) return create(db, vms, scope, input);
  for (let attempt = 0; ; attempt++) {
    const ip = await freeVmAddress(db, network.range, network.gateway);
    try {
      return await create(db, vms, scope, { ...input, ip });
    } catch (err) {
      if (!(err instanceof DataError && err.status === 409 && err.field === "ip") || attempt >= 20) throw err;
    }
  }
}

export async function incrementVmCounter(db: Db, vmId: number, counter: "run_attempts" | "run_ok"): Promise<void> {
  await db`UPDATE vm_counters SET ${db(counter)} = ${db(counter)} + 1 WHERE vm_id = ${vmId}`;
}
