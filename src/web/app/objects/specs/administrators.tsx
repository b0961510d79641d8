// Administrators: who uses the WAT and the API, with their roles.
import { AdminRoles } from "../../screens/admin-roles.tsx";
import { Badge, text, yesNo } from "../format.tsx";
import type { ObjectSpec, Row } from "../types.ts";
import * as C from "./common.tsx";

const roleList = (r: Row) => (
  <span class="tags">
    {r.superadmin && <Badge value="superadmin" kind="busy" />}
    {(r.roles as string[]).map((n) => (
      <Badge key={n} value={n} />
    ))}
  </span>
);

export const administratorsSpec: ObjectSpec = {
  kind: "administrator",
  path: "administrators",
  title: "Administrators",
  singular: "administrator",
  plural: "administrators",
  acl: "administrator",
  nav: { label: "Administrators", section: "Administration", order: 10 },
  name: (r) => r.name,
  search: "name",
  columns: [
    C.nameColumn(),
    C.tenantColumn,
    { key: "roles", label: "Roles", render: roleList },
    C.blockedColumn,
    { key: "language", label: "Language", sort: "language" },
    C.descriptionColumn,
    C.createdColumn,
  ],
  filters: [
    C.tenantFilter,
    { key: "role", label: "Role", type: "text", toApi: (v) => ({ "roles[like]": `%${v}%` }) },
    C.blockedFilter,
  ],
  passThrough: ["tenant_id", "roles"],
  fields: [
    C.tenantField(true),
    { name: "name", label: "Name", type: "text", required: true },
    {
      name: "password",
      label: "Password",
      type: "password",
      acl: "administrator.update.password",
      hint: "At least 8 characters",
    },
    C.descriptionField,
    C.languageField,
    { name: "blocked", label: "Blocked", type: "checkbox" },
  ],
  actions: [
    ...C.blockActions("administrator.update", "patch").map((a) => ({
      ...a,
      when: (r: Row, me: number) => a.when!(r, me) && r.id !== me,
    })),
    C.deleteAction("administrator", { when: (r, me) => r.id !== me }),
  ],
  details: [
    C.tenantDetail,
    { label: "Roles", render: roleList },
    { label: "Blocked", render: yesNo("blocked") },
    { label: "Language", render: (r) => r.language },
    { label: "Description", render: (r) => text(r.description) },
    ...C.createdDetails,
  ],
  panels: [
    {
      title: "Roles and permissions",
      render: (r, reload) => <AdminRoles administrator={r as Row & { name: string }} onChange={reload} />,
    },
  ],
};
