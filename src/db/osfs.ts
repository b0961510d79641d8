// OS flavours: the template a family of VMs shares (memory, CPU share, overlay, home size).
import { z } from "zod";
import { description, timestamp, type ObjectDef } from "./objects.ts";

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
  user_storage_mb: z.number().int(),
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
  memory_mb: z.number().int().min(16).max(4 * 1024 * 1024).optional(),
  cpu_shares: z.number().int().min(2).max(262144).optional(),
  use_overlay: z.boolean().optional(),
  persistent: z.boolean().optional(),
  user_storage_mb: z.number().int().min(0).optional(),
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
