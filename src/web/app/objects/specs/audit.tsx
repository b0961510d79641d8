// The audit log: every change, by whom, from where; read-only.
import { Link } from "../../ui.tsx";
import { Badge, text, when, YES_NO } from "../format.tsx";
import type { ObjectSpec, Row } from "../types.ts";

const DETAIL_PATHS: Record<string, string> = {
  user: "users",
  vm: "vms",
  host: "hosts",
  osf: "osfs",
  di: "dis",
  administrator: "administrators",
  role: "roles",
  tenant: "tenants",
};
const OBJECT_TYPES: [string, string][] = [
  ["user", "user"],
  ["vm", "virtual machine"],
  ["host", "node"],
  ["osf", "OS flavour"],
  ["di", "image"],
  ["administrator", "administrator"],
  ["role", "role"],
  ["tenant", "tenant"],
  ["property", "property"],
  ["config", "configuration"],
  ["session", "session"],
  ["acl", "ACL"],
];
const SOURCES = ["api", "cli", "wat", "l7r", "hkd", "system"];

function objectCell(r: Row) {
  if (!r.object_type) return <span class="muted">—</span>;
  const label = `${r.object_type} ${r.object_name ?? r.object_id ?? ""}`.trim();
  const path = DETAIL_PATHS[r.object_type];
  return path && r.object_id !== null ? <Link to={`/${path}/${r.object_id}`}>{label}</Link> : label;
}

function argumentsCell(r: Row) {
  const args = r.arguments && Object.keys(r.arguments).length ? JSON.stringify(r.arguments, null, 1) : "";
  if (!args && !r.error) return <span class="muted">—</span>;
  return (
    <details>
      <summary>{r.error ? "Error" : "Arguments"}</summary>
      {r.error && <p class="error">{r.error}</p>}
      {args && <pre>{args}</pre>}
    </details>
  );
}

/** datetime-local gives local time without a zone: send it as an instant. */
const instant = (v: string) => {
  const d = new Date(v);
  return Number.isNaN(d.getTime()) ? v : d.toISOString();
};

export const auditSpec: ObjectSpec = {
  kind: "audit",
  path: "audit",
  title: "Audit log",
  singular: "audit entry",
  plural: "audit entries",
  acl: "audit",
  nav: { label: "Audit log", section: "Administration", order: 60 },
  name: (r) => `${r.action} ${r.object_name ?? ""}`.trim(),
  noDetail: true,
  defaultSort: "-at",
  columns: [
    { key: "at", label: "When", sort: "at", render: when("at") },
    {
      key: "administrator_name",
      label: "Administrator",
      sort: "administrator_name",
      render: (r) =>
        r.administrator_id ? (
          <Link to={`/administrators/${r.administrator_id}`}>{r.administrator_name}</Link>
        ) : (
          text(r.administrator_name)
        ),
    },
    { key: "tenant_name", label: "Tenant", sort: "tenant_name", allTenants: true },
    { key: "action", label: "Action", sort: "action" },
    { key: "object", label: "Object", sort: "object_name", render: objectCell },
    {
      key: "ok",
      label: "Result",
      sort: "ok",
      render: (r) =>
        r.ok ? <Badge value="ok" kind="ok" /> : <Badge value="failed" kind="bad" title={r.error ?? undefined} />,
    },
    { key: "source", label: "Source", sort: "source" },
    { key: "address", label: "Address" },
    { key: "arguments", label: "Details", render: argumentsCell },
  ],
  filters: [
    { key: "object_type", label: "Object type", type: "select", options: OBJECT_TYPES },
    { key: "action", label: "Action", type: "text", toApi: (v) => ({ "action[like]": `%${v}%` }) },
    {
      key: "administrator",
      label: "Administrator",
      type: "text",
      toApi: (v) => ({ "administrator_name[like]": `%${v}%` }),
    },
    { key: "ok", label: "Succeeded", type: "select", options: YES_NO },
    { key: "source", label: "Source", type: "select", options: SOURCES.map((s) => [s, s]) },
    { key: "from", label: "From", type: "datetime", toApi: (v) => ({ "at[ge]": instant(v) }) },
    { key: "to", label: "Until", type: "datetime", toApi: (v) => ({ "at[le]": instant(v) }) },
  ],
  passThrough: ["object_id", "administrator_id"],
  fields: [],
  actions: [],
  details: [],
};
