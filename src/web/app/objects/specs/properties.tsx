// Property definitions: the custom keys administrators may set on users, VMs, nodes, OSFs
// and images.
import { Badge, text } from "../format.tsx";
import type { ObjectSpec, Row } from "../types.ts";
import * as C from "./common.tsx";

const TARGETS: [string, string][] = [
  ["user", "users"],
  ["vm", "VMs"],
  ["host", "nodes"],
  ["osf", "OS flavours"],
  ["di", "images"],
];
const appliesTo = (r: Row) => (
  <span class="tags">
    {(r.applies_to as string[]).map((t) => (
      <Badge key={t} value={TARGETS.find(([k]) => k === t)?.[1] ?? t} />
    ))}
  </span>
);

export const propertiesSpec: ObjectSpec = {
  kind: "property",
  path: "properties",
  title: "Properties",
  singular: "property",
  plural: "properties",
  acl: "property",
  nav: { label: "Properties", section: "Administration", order: 40 },
  name: (r) => r.key,
  search: "key",
  defaultSort: "key",
  columns: [
    C.nameColumn("Key", "key"),
    C.tenantColumn,
    { key: "applies_to", label: "Applies to", render: appliesTo },
    C.descriptionColumn,
  ],
  filters: [C.tenantFilter, { key: "applies_to", label: "Applies to", type: "select", options: TARGETS }],
  passThrough: ["tenant_id"],
  fields: [
    C.tenantField(true),
    { name: "key", label: "Key", type: "text", required: true },
    C.descriptionField,
    { name: "applies_to", label: "Applies to", type: "checkboxes", options: TARGETS },
  ],
  actions: [C.deleteAction("property")],
  details: [
    C.tenantDetail,
    { label: "Applies to", render: appliesTo },
    { label: "Description", render: (r) => text(r.description) },
    { label: "Created", render: (r) => new Date(r.created_at).toLocaleString() },
  ],
};
