// OS flavours: the template a family of VMs shares (hypervisor, memory, CPUs, overlay, home size).
import { z } from "zod";
import { HYPERVISORS } from "../virt/backend.ts";
import { description, timestamp, type ObjectDef } from "./objects.ts";

/** The backend an OSF's desktops run on; its images are of that kind. */
export const hypervisorSchema = z.enum(HYPERVISORS);

const HYPERVISOR_DOC =
  "lxc (a container; images are root filesystem tarballs) or kvm (a virtual machine; images are qcow2 disks). Changes only while the OSF has no disk images";
const VCPUS_DOC = "KVM only: virtual CPUs of each desktop, 1 to 64 (LXC desktops share the node's CPUs by cpu_shares)";
const USER_STORAGE_DOC =
  "KVM only: size of the user's home disk in MB, 0 = none (the home is on the desktop's root disk). LXC homes are directories: unused";

export const OsfRow = z.object({
  id: z.number().int(),
  tenant_id: z.number().int(),
  tenant_name: z.string(),
  name: z.string(),
  description: z.string(),
  memory_mb: z.number().int(),
  cpu_shares: z.number().int(),
  use_overlay: z.boolean(),
  persistent: z.boolean(),
  user_storage_mb: z.number().int().describe(USER_STORAGE_DOC),
  hypervisor: hypervisorSchema.describe(HYPERVISOR_DOC),
  vcpus: z.number().int().describe(VCPUS_DOC),
  vms: z.number().int(),
  dis: z.number().int(),
  created_at: timestamp,
  updated_at: timestamp,
});
export type OsfRow = z.infer<typeof OsfRow>;

export const OsfCreate = z.object({
  tenant_id: z.number().int().positive().optional(),
  name: z.string().min(1).max(64),
  description: description.optional(),
  memory_mb: z
    .number()
    .int()
    .min(16)
    .max(4 * 1024 * 1024)
    .optional(),
  cpu_shares: z.number().int().min(2).max(262144).optional(),
  use_overlay: z.boolean().optional(),
  persistent: z.boolean().optional(),
  user_storage_mb: z.number().int().min(0).optional().describe(USER_STORAGE_DOC),
  hypervisor: hypervisorSchema.optional().describe(HYPERVISOR_DOC + " (default lxc)"),
  vcpus: z
    .number()
    .int()
    .min(1)
    .max(64)
    .optional()
    .describe(VCPUS_DOC + " (default 1)"),
});
export const OsfUpdate = OsfCreate.omit({ tenant_id: true }).partial();

export const osfs: ObjectDef<OsfRow> = {
  kind: "osf",
  table: "osfs",
  view: "osf_view",
  row: OsfRow,
  create: OsfCreate,
  update: OsfUpdate,
  tenancy: "own",
  dependents: [
    { label: "VMs", table: "vms", column: "osf_id" },
    { label: "disk images", table: "dis", column: "osf_id" },
  ],
};
