// Nodes (hosts): the machines that run desktops and the L7R.
import { Badge, STATE_OPTIONS, text, when, yesNo } from "../format.tsx";
import type { ObjectSpec, Row } from "../types.ts";
import * as C from "./common.tsx";
import { vmsSpec } from "./vms.tsx";

const HOST_STATES = ["stopped", "starting", "running", "stopping", "lost"];

/** The state, with the drain mark, and why a lost node was declared so. */
const hostState = (r: Row) => (
  <>
    <Badge value={r.state} title={r.state === "lost" && r.lost_reason ? r.lost_reason : undefined} />
    {r.drain && (
      <>
        {" "}
        <Badge value="draining" kind="busy" title="No new desktops; its users move at their next connect" />
      </>
    )}
  </>
);

/** The kinds of desktop a node runs, as its HKD found them at start-up. */
const hypervisors = (r: Row) =>
  Array.isArray(r.hypervisors) && r.hypervisors.length
    ? r.hypervisors.map((h: string) => h.toUpperCase()).join(", ")
    : "none";

export const hostsSpec: ObjectSpec = {
  kind: "host",
  path: "hosts",
  title: "Nodes",
  singular: "node",
  plural: "nodes",
  acl: "host",
  nav: { label: "Nodes", section: "Platform", order: 30 },
  name: (r) => r.name,
  search: "name",
  columns: [
    C.nameColumn(),
    { key: "state", label: "State", sort: "state", render: hostState },
    { key: "address", label: "Address", sort: "address" },
    C.blockedColumn,
    { key: "vms_running", label: "VMs running", sort: "vms_running", num: true },
    { key: "hypervisors", label: "Runs", render: hypervisors },
    { key: "ok_ts", label: "Last heartbeat", sort: "ok_ts", render: when("ok_ts") },
    { key: "version", label: "Version", sort: "version" },
    C.descriptionColumn,
  ],
  filters: [
    { key: "state", label: "State", type: "select", options: STATE_OPTIONS(HOST_STATES) },
    {
      key: "drain",
      label: "Draining",
      type: "select",
      options: [
        ["true", "Draining"],
        ["false", "Not draining"],
      ],
    },
    C.blockedFilter,
    {
      key: "hypervisors",
      label: "Runs",
      type: "select",
      options: [
        ["lxc", "LXC desktops"],
        ["kvm", "KVM desktops"],
      ],
    },
  ],
  fields: [
    { name: "name", label: "Name", type: "text", required: true },
    {
      name: "address",
      label: "Address",
      type: "text",
      required: true,
      hint: "Where the other nodes and the L7R reach it",
    },
    C.descriptionField,
    { name: "frontend", label: "Runs the L7R (frontend)", type: "checkbox" },
    { name: "backend", label: "Runs desktops (backend)", type: "checkbox" },
  ],
  actions: [
    ...C.blockActions("host.block"),
    {
      label: "Drain",
      acl: "host.block",
      run: { action: "drain" },
      when: (r) => !r.drain,
      done: "is draining",
      confirm: (what) =>
        `Drain ${what}? No new desktops start there, and its users move to other nodes at their next connect.`,
    },
    {
      label: "Undrain",
      acl: "host.block",
      run: { action: "undrain" },
      when: (r) => r.drain,
      done: "is no longer draining",
    },
    {
      label: "Declare lost",
      acl: "host.stop_vms",
      run: { action: "declare_lost" },
      when: (r) => r.state !== "lost" && r.state !== "stopped",
      danger: true,
      done: "was declared lost",
      reason: "Reason",
      mass: false,
      confirm: (what) =>
        `Declare ${what} lost? Its desktops are released and start on other nodes at their users' next connect. Do it only when the node is dead or cut off: if it is still running, it kills its desktops and rejoins.`,
    },
    {
      label: "Stop all VMs",
      acl: "host.stop_vms",
      run: { action: "stop_vms" },
      when: (r) => r.vms_running > 0,
      danger: true,
      done: "is stopping its VMs",
      confirm: (what) => `Stop every VM running on ${what}? Their users are disconnected.`,
    },
    C.deleteAction("host", { when: (r) => r.state !== "running" && r.state !== "starting" }),
  ],
  details: [
    { label: "State", render: hostState },
    { label: "Draining", render: yesNo("drain") },
    {
      label: "Last declared lost",
      render: (r) =>
        r.lost_ts ? (
          <>
            {when("lost_ts")(r)}
            {r.lost_reason && <>: {r.lost_reason}</>}
          </>
        ) : (
          text(null)
        ),
    },
    { label: "Address", render: (r) => r.address },
    { label: "Blocked", render: yesNo("blocked") },
    {
      label: "Roles",
      render: (r) =>
        [r.frontend && "L7R (frontend)", r.backend && "desktops (backend)"].filter(Boolean).join(", ") || "none",
    },
    { label: "VMs running", render: (r) => r.vms_running },
    {
      label: "Desktops it runs",
      render: (r) => (
        <>
          {hypervisors(r)}
          {r.hypervisor_notes && <span class="muted"> ({r.hypervisor_notes})</span>}
        </>
      ),
    },
    {
      label: "Resources",
      render: (r) =>
        r.usable_ram_mb !== null ? `${r.usable_ram_mb} MB RAM, ${r.usable_cpu ?? "?"} CPUs usable` : text(null),
    },
    { label: "Last heartbeat", render: when("ok_ts") },
    { label: "Version", render: (r) => text(r.version) },
    { label: "Description", render: (r) => text(r.description) },
    ...C.createdDetails,
  ],
  properties: true,
  alsoChangedBy: ["vm"],
  related: [
    {
      title: "Virtual machines",
      spec: () => vmsSpec,
      filter: (r) => ({ host_id: String(r.id) }),
      columns: ["name", "vm_state", "user_name", "user_state", "ip"],
      listQuery: (r) => ({ host_id: String(r.id) }),
    },
  ],
};
