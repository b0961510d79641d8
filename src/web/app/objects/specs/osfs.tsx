// OS flavours: a kind of desktop (memory, storage, overlay) with its images.
import { NewImageDialog } from "../../screens/images.tsx";
import { text, yesNo } from "../format.tsx";
import type { ObjectSpec, Row } from "../types.ts";
import * as C from "./common.tsx";
import { disSpec } from "./dis.tsx";
import { vmsSpec } from "./vms.tsx";

function NewImageOfOsf(props: { row: Row; onClose: () => void; onCreated: () => void }) {
  return <NewImageDialog osfId={props.row.id} onClose={props.onClose} onCreated={() => props.onCreated()} />;
}

export const osfsSpec: ObjectSpec = {
  kind: "osf",
  path: "osfs",
  title: "OS flavours",
  singular: "OS flavour",
  plural: "OS flavours",
  acl: "osf",
  nav: { label: "OS flavours", section: "Platform", order: 40 },
  name: (r) => r.name,
  search: "name",
  columns: [
    C.nameColumn(),
    C.tenantColumn,
    { key: "memory_mb", label: "Memory (MB)", sort: "memory_mb", num: true },
    { key: "user_storage_mb", label: "User storage (MB)", sort: "user_storage_mb", num: true },
    { key: "use_overlay", label: "Overlay", sort: "use_overlay", render: yesNo("use_overlay") },
    { key: "dis", label: "Images", sort: "dis", num: true },
    { key: "vms", label: "VMs", sort: "vms", num: true },
    C.descriptionColumn,
    C.createdColumn,
  ],
  filters: [C.tenantFilter],
  passThrough: ["tenant_id"],
  fields: [
    C.tenantField(),
    { name: "name", label: "Name", type: "text", required: true },
    { name: "memory_mb", label: "Memory (MB)", type: "number", hint: "Default 256" },
    { name: "cpu_shares", label: "CPU shares", type: "number", hint: "Relative weight among desktops (default 1024)" },
    { name: "user_storage_mb", label: "User storage (MB)", type: "number", hint: "0: no separate home volume" },
    { name: "use_overlay", label: "Overlay (changes to the image are kept apart)", type: "checkbox" },
    { name: "persistent", label: "Persistent (the overlay survives a stop)", type: "checkbox" },
    C.descriptionField,
  ],
  actions: [C.deleteAction("osf")],
  details: [
    C.tenantDetail,
    { label: "Memory", render: (r) => `${r.memory_mb} MB` },
    { label: "CPU shares", render: (r) => r.cpu_shares },
    { label: "User storage", render: (r) => (r.user_storage_mb ? `${r.user_storage_mb} MB` : "none") },
    { label: "Overlay", render: yesNo("use_overlay") },
    { label: "Persistent", render: yesNo("persistent") },
    { label: "Images / VMs", render: (r) => `${r.dis} / ${r.vms}` },
    { label: "Description", render: (r) => text(r.description) },
    ...C.createdDetails,
  ],
  properties: true,
  alsoChangedBy: ["vm", "di"],
  related: [
    { title: "Images", spec: () => disSpec, filter: (r) => ({ osf_id: String(r.id) }), columns: ["version", "tags", "state", "blocked", "created_at"], sort: "-created_at", listQuery: (r) => ({ osf_id: String(r.id) }), create: NewImageOfOsf },
    { title: "Virtual machines", spec: () => vmsSpec, filter: (r) => ({ osf_id: String(r.id) }), columns: ["name", "vm_state", "user_name", "di_tag", "host_name"], listQuery: (r) => ({ osf_id: String(r.id) }) },
  ],
};
