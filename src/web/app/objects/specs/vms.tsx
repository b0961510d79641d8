// Virtual machines: a user's desktop on an OS flavour, started on a node.
import { api } from "../../api.ts";
import { subscribe } from "../../events.ts";
import { notify } from "../../ui.tsx";
import { Badge, objLink, state, STATE_OPTIONS, text, when } from "../format.tsx";
import type { ObjectSpec, Row } from "../types.ts";
import * as C from "./common.tsx";
import { VmExpiry } from "./vm-expiry.tsx";

const VM_STATES = ["stopped", "starting", "running", "stopping", "zombie", "debugging"];
const USER_STATES = ["disconnected", "connecting", "connected"];
const RESTART_TIMEOUT_MS = 10 * 60_000;

/** Stops the VM, then starts it once the event stream reports it stopped (the API has no restart). */
async function restart(vm: Row): Promise<string> {
  await api.post(`/vms/${vm.id}/stop`);
  let unsub = () => {};
  const check = async () => {
    const now = await api.get<Row>(`/vms/${vm.id}`);
    if (now.vm_state !== "stopped") return false;
    unsub();
    clearTimeout(timer);
    await api.post(`/vms/${vm.id}/start`);
    notify(`Virtual machine ${vm.name} stopped; starting it again`);
    return true;
  };
  const timer = setTimeout(() => {
    unsub();
    notify(
      `Virtual machine ${vm.name} did not stop within ${RESTART_TIMEOUT_MS / 60_000} minutes; not started again`,
      "error",
    );
  }, RESTART_TIMEOUT_MS);
  unsub = subscribe(["vm"], (e) => {
    if (e === "resync" || e.id === vm.id)
      check().catch((err) => notify(`Restart of ${vm.name}: ${(err as Error).message}`, "error"));
  });
  if (await check()) return `Virtual machine ${vm.name} restarted`;
  return `Virtual machine ${vm.name} is stopping; it starts again when stopped`;
}

/**
 * "Expires within" as an absolute bound. Whole minutes: the list query must stay the same from
 * one render to the next (it is the key of the fetch), and moves on once a minute.
 */
const within = (hours: string) => {
  const now = Math.floor(Date.now() / 60_000) * 60_000;
  return { "expire_hard_at[le]": new Date(now + Number(hours) * 3600_000).toISOString() };
};

const expiry = (r: Row) =>
  r.expire_hard_at || r.expire_soft_at ? (
    <span>
      {r.expire_soft_at && <>warn {when("expire_soft_at")(r)}</>}
      {r.expire_soft_at && r.expire_hard_at && ", "}
      {r.expire_hard_at && <>stop {when("expire_hard_at")(r)}</>}
    </span>
  ) : (
    <span class="muted">—</span>
  );

export const vmsSpec: ObjectSpec = {
  kind: "vm",
  path: "vms",
  title: "Virtual machines",
  singular: "virtual machine",
  plural: "VMs",
  acl: "vm",
  nav: { label: "Virtual machines", section: "Platform", order: 20 },
  name: (r) => r.name,
  search: "name",
  panels: [
    {
      title: "Expiry",
      acl: "vm.update.expiration",
      render: (r, reload) => (
        <VmExpiry key={`${r.id}-${r.vm_state}-${r.expire_soft_at}-${r.expire_hard_at}`} vm={r} onChange={reload} />
      ),
    },
  ],
  columns: [
    C.nameColumn(),
    { key: "vm_state", label: "State", sort: "vm_state", render: state("vm_state") },
    { key: "user_name", label: "User", sort: "user_name", render: objLink("users", "user_id", "user_name") },
    C.tenantColumn,
    { key: "osf_name", label: "OSF", sort: "osf_name", render: objLink("osfs", "osf_id", "osf_name") },
    { key: "di_tag", label: "Image tag", sort: "di_tag" },
    { key: "host_name", label: "Node", sort: "host_name", render: objLink("hosts", "host_id", "host_name") },
    { key: "ip", label: "IP", sort: "ip" },
    { key: "user_state", label: "User state", sort: "user_state", render: state("user_state") },
    C.blockedColumn,
    { key: "expire_hard_at", label: "Expiry", sort: "expire_hard_at", render: expiry },
  ],
  filters: [
    C.tenantFilter,
    { key: "vm_state", label: "State", type: "select", options: STATE_OPTIONS(VM_STATES) },
    { key: "user_state", label: "User state", type: "select", options: STATE_OPTIONS(USER_STATES) },
    { key: "user", label: "User", type: "text", toApi: (v) => ({ "user_name[like]": `%${v}%` }) },
    { key: "osf", label: "OSF", type: "text", toApi: (v) => ({ "osf_name[like]": `%${v}%` }) },
    { key: "node", label: "Node", type: "text", toApi: (v) => ({ "host_name[like]": `%${v}%` }) },
    C.blockedFilter,
    {
      key: "expires",
      label: "Expires within",
      type: "select",
      options: [
        ["1", "1 hour"],
        ["24", "1 day"],
        ["168", "1 week"],
      ],
      toApi: within,
    },
  ],
  passThrough: ["user_id", "osf_id", "host_id", "current_di_id", "tenant_id"],
  fields: [
    { name: "user_id", label: "User", type: "ref", ref: { path: "users" }, on: "create", required: true },
    { name: "osf_id", label: "OS flavour", type: "ref", ref: { path: "osfs" }, on: "create", required: true },
    { name: "name", label: "Name", type: "text", required: true },
    {
      name: "di_tag",
      label: "Image tag",
      type: "text",
      acl: "vm.update.di_tag",
      mass: true,
      hint: "Which image of the OSF it runs: default, head, a version or a custom tag (empty: default)",
    },
    {
      name: "ip",
      label: "IP address",
      type: "text",
      nullable: true,
      hint: "Empty: the next free address of the VM network",
    },
    C.descriptionField,
  ],
  actions: [
    {
      label: "Start",
      acl: "vm.start",
      run: { action: "start" },
      when: (r) => r.vm_state === "stopped",
      done: "starting",
    },
    {
      label: "Stop",
      acl: "vm.stop",
      run: { action: "stop" },
      when: (r) => r.vm_state === "running" || r.vm_state === "starting",
      done: "stopping",
    },
    {
      label: "Restart",
      acl: ["vm.stop", "vm.start"],
      run: { custom: restart },
      when: (r) => r.vm_state === "running",
      done: "restarting",
    },
    {
      label: "Clear zombie",
      acl: "vm.stop",
      run: { action: "clear_zombie" },
      when: (r) => r.vm_state === "zombie",
      danger: true,
      done: "cleared",
      confirm: (what) =>
        `Mark ${what} stopped? Only when its node is lost or stopped: a live node still owns it (stop it instead, the node retries).`,
    },
    {
      label: "Disconnect user",
      acl: "vm.disconnect",
      run: { action: "disconnect" },
      when: (r) => r.user_state !== "disconnected",
      done: "disconnected",
    },
    ...C.blockActions("vm.block"),
    C.deleteAction("vm", { when: (r) => r.vm_state === "stopped" }),
  ],
  deletable: (r) => r.vm_state === "stopped",
  details: [
    { label: "State", render: state("vm_state") },
    { label: "User", render: objLink("users", "user_id", "user_name") },
    {
      label: "User state",
      render: (r) => (
        <>
          {state("user_state")(r)} {r.user_ip && <span class="muted">from {r.user_ip}</span>}
        </>
      ),
    },
    C.tenantDetail,
    { label: "OS flavour", render: objLink("osfs", "osf_id", "osf_name") },
    { label: "Image tag", render: (r) => r.di_tag },
    {
      label: "Image running",
      render: (r) => (r.current_di_id ? objLink("dis", "current_di_id", "current_di_id")(r) : text(null)),
    },
    { label: "Node", render: objLink("hosts", "host_id", "host_name") },
    { label: "IP address", render: (r) => text(r.ip) },
    {
      label: "Blocked",
      render: (r) => (r.blocked ? <Badge value="blocked" kind="bad" title={r.blocked_reason} /> : "no"),
    },
    { label: "Expiry", render: expiry },
    { label: "Ports", render: (r) => (r.vma_port ? `VMA ${r.vma_port}, X ${r.x_port ?? "—"}` : text(null)) },
    { label: "Description", render: (r) => text(r.description) },
    ...C.createdDetails,
  ],
  properties: true,
};
