// Users: the people who log in to desktops.
import { blocked, text } from "../format.tsx";
import type { ObjectSpec } from "../types.ts";
import * as C from "./common.tsx";
import { vmsSpec } from "./vms.tsx";

export const usersSpec: ObjectSpec = {
  kind: "user",
  path: "users",
  title: "Users",
  singular: "user",
  plural: "users",
  acl: "user",
  nav: { label: "Users", section: "Platform", order: 10 },
  name: (r) => r.name,
  search: "name",
  columns: [
    C.nameColumn(),
    C.tenantColumn,
    C.blockedColumn,
    { key: "vms", label: "VMs", sort: "vms", num: true },
    { key: "vms_connected", label: "Connected", sort: "vms_connected", num: true },
    C.descriptionColumn,
    C.createdColumn,
  ],
  filters: [
    C.tenantFilter,
    C.blockedFilter,
    {
      key: "connected",
      label: "Connected",
      type: "select",
      options: [
        ["true", "yes"],
        ["false", "no"],
      ],
      toApi: (v): Record<string, string> => (v === "true" ? { "vms_connected[gt]": "0" } : { vms_connected: "0" }),
    },
  ],
  passThrough: ["tenant_id"],
  fields: [
    C.tenantField(),
    { name: "name", label: "Name", type: "text", required: true },
    {
      name: "password",
      label: "Password",
      type: "password",
      acl: "user.update.password",
      hint: "Empty: the user logs in through an external directory (LDAP) only",
    },
    C.descriptionField,
    C.languageField,
    { name: "blocked", label: "Blocked", type: "checkbox", acl: "user.block" },
  ],
  actions: [
    ...C.blockActions("user.block"),
    {
      label: "Disconnect",
      acl: "user.disconnect",
      run: { action: "disconnect" },
      when: (r) => r.vms_connected > 0,
      done: "disconnected",
      confirm: (what) => `Disconnect every session of ${what}?`,
    },
    {
      label: "Revoke tokens",
      acl: "user.update.tokens",
      run: { action: "revoke_tokens" },
      done: "has no tokens any more",
      confirm: (what) => `Revoke every login token of ${what}? Their clients must log in with the password again.`,
    },
    C.deleteAction("user"),
  ],
  details: [
    C.tenantDetail,
    { label: "Blocked", render: blocked },
    { label: "Description", render: (r) => text(r.description) },
    { label: "Language", render: (r) => r.language },
    { label: "Password", render: (r) => (r.has_password ? "set" : "none (external authentication)") },
    { label: "Second factor", render: (r) => (r.has_totp ? "TOTP enrolled" : "none") },
    { label: "VMs", render: (r) => `${r.vms} (${r.vms_connected} connected)` },
    ...C.createdDetails,
  ],
  properties: true,
  alsoChangedBy: ["vm"],
  related: [
    {
      title: "Virtual machines",
      spec: () => vmsSpec,
      filter: (r) => ({ user_id: String(r.id) }),
      columns: ["name", "vm_state", "user_state", "host_name", "di_tag"],
      listQuery: (r) => ({ user_id: String(r.id) }),
    },
  ],
};
