// Pieces most object specs share: the name, tenant and created columns, the tenant and
// description fields, the block/unblock pair.
import { blocked, text, when, YES_NO } from "../format.tsx";
import type { ActionSpec, Column, FilterSpec, FormField } from "../types.ts";
export { deleteAction } from "../actions.tsx";

export const nameColumn = (label = "Name", key = "name"): Column => ({ key, label, sort: key, link: true });
export const tenantColumn: Column = { key: "tenant_name", label: "Tenant", sort: "tenant_name", allTenants: true };
export const createdColumn: Column = {
  key: "created_at",
  label: "Created",
  sort: "created_at",
  render: when("created_at"),
};
export const blockedColumn: Column = { key: "blocked", label: "Blocked", sort: "blocked", render: blocked };
export const descriptionColumn: Column = {
  key: "description",
  label: "Description",
  render: (r) => text(r.description),
};

export const tenantFilter: FilterSpec = {
  key: "tenant",
  label: "Tenant",
  type: "text",
  allTenants: true,
  toApi: (v) => ({ "tenant_name[like]": `%${v}%` }),
};
export const blockedFilter: FilterSpec = { key: "blocked", label: "Blocked", type: "select", options: YES_NO };

export const tenantField = (globalTenant = false): FormField => ({
  name: "tenant_id",
  label: "Tenant",
  type: "tenant",
  on: "create",
  globalTenant,
});
export const descriptionField: FormField = { name: "description", label: "Description", type: "textarea", mass: true };
export const languageField: FormField = {
  name: "language",
  label: "Language",
  type: "select",
  mass: true,
  options: [
    ["auto", "automatic"],
    ["en", "English"],
    ["es", "Spanish"],
  ],
};

/** Block and Unblock through the API's actions (or a change of `blocked` where there is none). */
export function blockActions(acl: string, how: "action" | "patch" = "action"): ActionSpec[] {
  const run = (on: boolean) => (how === "action" ? { action: on ? "block" : "unblock" } : { patch: { blocked: on } });
  return [
    { label: "Block", acl, run: run(true), when: (r) => !r.blocked, done: "blocked" },
    { label: "Unblock", acl, run: run(false), when: (r) => r.blocked, done: "unblocked" },
  ];
}

export const tenantDetail = {
  label: "Tenant",
  render: (r: Record<string, any>) => text(r.tenant_name),
  allTenants: true,
};
export const createdDetails = [
  { label: "Created", render: (r: Record<string, any>) => when("created_at")(r as any) },
  { label: "Changed", render: (r: Record<string, any>) => when("updated_at")(r as any) },
];
