// Tenants (multitenant farms only): separate organisations sharing the nodes.
import { text, yesNo } from "../format.tsx";
import type { ObjectSpec, Row } from "../types.ts";
import { administratorsSpec } from "./administrators.tsx";
import * as C from "./common.tsx";
import { usersSpec } from "./users.tsx";
import { vmsSpec } from "./vms.tsx";

const ofTenant = (r: { id: number }) => ({ tenant_id: String(r.id) });

export const tenantsSpec: ObjectSpec = {
  kind: "tenant",
  path: "tenants",
  title: "Tenants",
  singular: "tenant",
  plural: "tenants",
  acl: "tenant",
  nav: { label: "Tenants", section: "Administration", order: 30 },
  multitenantOnly: true,
  name: (r) => (r.id === 0 ? "* (global)" : r.name),
  search: "name",
  columns: [
    C.nameColumn(),
    C.blockedColumn,
    { key: "language", label: "Language", sort: "language" },
    C.descriptionColumn,
    C.createdColumn,
  ],
  filters: [C.blockedFilter],
  fields: [
    { name: "name", label: "Name", type: "text", required: true },
    C.descriptionField,
    C.languageField,
    { name: "blocked", label: "Blocked", type: "checkbox", acl: "tenant.block" },
  ],
  editable: (r) => r.id !== 0,
  deletable: (r) => r.id !== 0,
  actions: [
    ...C.blockActions("tenant.block", "patch").map((a) => ({
      ...a,
      when: (r: Row, me: number) => r.id !== 0 && a.when!(r, me),
    })),
    C.deleteAction("tenant", { when: (r) => r.id !== 0 }),
  ],
  details: [
    { label: "Blocked", render: yesNo("blocked") },
    { label: "Language", render: (r) => r.language },
    { label: "Description", render: (r) => text(r.description) },
    ...C.createdDetails,
  ],
  related: [
    {
      title: "Users",
      spec: () => usersSpec,
      filter: ofTenant,
      columns: ["name", "blocked", "vms", "vms_connected"],
      listQuery: ofTenant,
    },
    {
      title: "Virtual machines",
      spec: () => vmsSpec,
      filter: ofTenant,
      columns: ["name", "vm_state", "user_name", "host_name"],
      listQuery: ofTenant,
    },
    {
      title: "Administrators",
      spec: () => administratorsSpec,
      filter: ofTenant,
      columns: ["name", "roles", "blocked"],
      listQuery: ofTenant,
    },
  ],
};
