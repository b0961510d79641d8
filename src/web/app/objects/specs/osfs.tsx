// OS flavours: a kind of desktop (hypervisor, memory, CPUs, storage, overlay) with its images.
import { NewImageDialog } from "../../screens/images.tsx";
import { text, yesNo } from "../format.tsx";
import type { ObjectSpec, Row } from "../types.ts";
import * as C from "./common.tsx";
import { disSpec } from "./dis.tsx";
import { vmsSpec } from "./vms.tsx";

const HYPERVISOR_OPTIONS: [string, string][] = [
  ["lxc", "LXC (container)"],
  ["kvm", "KVM (virtual machine)"],
];
const hypervisorName = (r: Row) => (r.hypervisor === "kvm" ? "KVM" : "LXC");
/** What an administrator needs to know about user_storage_mb (src/db/osfs.ts says the same). */
const HOME_DISK_HINT =
  "KVM only: size of the user's home disk in MB, 0 = none (the home is on the desktop's disk). LXC homes are directories, without a size";

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
    { key: "hypervisor", label: "Hypervisor", sort: "hypervisor", render: hypervisorName },
    { key: "memory_mb", label: "Memory (MB)", sort: "memory_mb", num: true },
    {
      key: "vcpus",
      label: "vCPUs (KVM)",
      sort: "vcpus",
      num: true,
      render: (r) => (r.hypervisor === "kvm" ? r.vcpus : "—"),
    },
    {
      key: "user_storage_mb",
      label: "Home disk (MB, KVM)",
      sort: "user_storage_mb",
      num: true,
      render: (r) => (r.hypervisor === "kvm" ? r.user_storage_mb || "none" : "—"),
    },
    { key: "use_overlay", label: "Overlay", sort: "use_overlay", render: yesNo("use_overlay") },
    { key: "dis", label: "Images", sort: "dis", num: true },
    { key: "vms", label: "VMs", sort: "vms", num: true },
    C.descriptionColumn,
    C.createdColumn,
  ],
  filters: [C.tenantFilter, { key: "hypervisor", label: "Hypervisor", type: "select", options: HYPERVISOR_OPTIONS }],
  passThrough: ["tenant_id"],
  fields: [
    C.tenantField(),
    { name: "name", label: "Name", type: "text", required: true },
    {
      name: "hypervisor",
      label: "Hypervisor",
      type: "select",
      options: HYPERVISOR_OPTIONS,
      hint: "Default LXC. Its images are of its kind (LXC: a root filesystem tarball, KVM: a qcow2 disk): it changes only while the OS flavour has no images",
    },
    { name: "memory_mb", label: "Memory (MB)", type: "number", hint: "Default 256" },
    {
      name: "vcpus",
      label: "vCPUs (KVM only)",
      type: "number",
      mass: true,
      hint: "KVM only: virtual CPUs of each desktop, 1 to 64 (default 1). LXC desktops share the node's CPUs by their CPU shares",
    },
    { name: "cpu_shares", label: "CPU shares", type: "number", hint: "Relative weight among desktops (default 1024)" },
    { name: "user_storage_mb", label: "Home disk (MB, KVM only)", type: "number", hint: HOME_DISK_HINT },
    { name: "use_overlay", label: "Overlay (changes to the image are kept apart)", type: "checkbox" },
    { name: "persistent", label: "Persistent (the overlay survives a stop)", type: "checkbox" },
    C.descriptionField,
  ],
  actions: [C.deleteAction("osf")],
  details: [
    C.tenantDetail,
    {
      label: "Hypervisor",
      render: (r) =>
        `${hypervisorName(r)}${r.hypervisor === "kvm" ? ": virtual machines, qcow2 images" : ": containers, root filesystem tarballs"}`,
    },
    { label: "Memory", render: (r) => `${r.memory_mb} MB` },
    { label: "vCPUs", render: (r) => (r.hypervisor === "kvm" ? r.vcpus : `${r.vcpus} (used by KVM only)`) },
    { label: "CPU shares", render: (r) => r.cpu_shares },
    {
      label: "Home disk",
      render: (r) =>
        r.hypervisor === "kvm"
          ? r.user_storage_mb
            ? `${r.user_storage_mb} MB`
            : "none (the home is on the desktop's disk)"
          : "a directory (LXC; the size applies to KVM only)",
    },
    { label: "Overlay", render: yesNo("use_overlay") },
    { label: "Persistent", render: yesNo("persistent") },
    { label: "Images / VMs", render: (r) => `${r.dis} / ${r.vms}` },
    { label: "Description", render: (r) => text(r.description) },
    ...C.createdDetails,
  ],
  properties: true,
  alsoChangedBy: ["vm", "di"],
  related: [
    {
      title: "Images",
      spec: () => disSpec,
      filter: (r) => ({ osf_id: String(r.id) }),
      columns: ["version", "tags", "state", "blocked", "created_at"],
      sort: "-created_at",
      listQuery: (r) => ({ osf_id: String(r.id) }),
      create: NewImageOfOsf,
    },
    {
      title: "Virtual machines",
      spec: () => vmsSpec,
      filter: (r) => ({ osf_id: String(r.id) }),
      columns: ["name", "vm_state", "user_name", "di_tag", "host_name"],
      listQuery: (r) => ({ osf_id: String(r.id) }),
    },
  ],
};
