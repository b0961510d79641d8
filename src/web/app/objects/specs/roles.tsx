// Roles: named sets of ACLs, inheriting other roles; built-in ones are read-only.
import { RoleAclEditor } from "../../screens/role-acls.tsx";
import { Badge, text } from "../format.tsx";
import type { ObjectSpec, Row } from "../types.ts";
import { administratorsSpec } from "./administrators.tsx";
import * as C from "./common.tsx";

const inherits = (r: Row) =>
  r.inherits.length ? (
    <span class="tags">
      {(r.inherits as string[]).map((n) => (
        <Badge key={n} value={n} />
      ))}
    </span>
  ) : (
    <span class="muted">—</span>
  );

export const rolesSpec: ObjectSpec = {
  kind: "role",
  path: "roles",
  title: "Roles",
  singular: "role",
  plural: "roles",
  acl: "role",
  nav: { label: "Roles", section: "Administration", order: 20 },
  name: (r) => r.name,
  search: "name",
  columns: [
    C.nameColumn(),
    C.tenantColumn,
    {
      key: "builtin",
      label: "Built in",
      sort: "builtin",
      render: (r) => (r.builtin ? "yes" : <span class="muted">no</span>),
    },
    { key: "inherits", label: "Inherits", render: inherits },
    { key: "grants", label: "Own grants", num: true, render: (r) => r.grants.length },
    { key: "denials", label: "Own denials", num: true, render: (r) => r.denials.length },
    C.descriptionColumn,
  ],
  filters: [
    C.tenantFilter,
    {
      key: "builtin",
      label: "Built in",
      type: "select",
      options: [
        ["true", "yes"],
        ["false", "no"],
      ],
    },
  ],
  passThrough: ["tenant_id"],
  fields: [C.tenantField(true), { name: "name", label: "Name", type: "text", required: true }, C.descriptionField],
  editable: (r) => !r.builtin,
  deletable: (r) => !r.builtin,
  actions: [C.deleteAction("role", { when: (r) => !r.builtin })],
  details: [
    C.tenantDetail,
    { label: "Built in", render: (r) => (r.builtin ? "yes (read-only; make a role that inherits it)" : "no") },
    { label: "Inherits", render: inherits },
    { label: "Description", render: (r) => text(r.description) },
    ...C.createdDetails,
  ],
  panels: [
    {
      title: "Permissions",
      render: (r, reload) => <RoleAclEditor role={r as Row & { name: string }} onChange={reload} />,
    },
  ],
  related: [
    {
      title: "Administrators with this role",
      spec: () => administratorsSpec,
      filter: (r) => ({ roles: r.name }),
      columns: ["name", "tenant_name", "roles"],
      listQuery: (r) => ({ roles: r.name }),
    },
  ],
};
