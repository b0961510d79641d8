// What an object screen is made of, declared once per object kind (specs/*.tsx) and turned
// into list, detail and form screens by the generic components of this folder.
import type { ComponentChildren, ComponentType } from "preact";

export type Row = Record<string, any> & { id: number };

export interface Column {
  key: string;
  label: string;
  /** The API field to sort by when the header is clicked (none: not sortable). */
  sort?: string;
  /** Default: the row's field `key` as text. */
  render?: (row: Row) => ComponentChildren;
  acl?: string;
  /** Only for a superadministrator of a multitenant farm (the tenant column). */
  allTenants?: boolean;
  /** Right-aligned numbers. */
  num?: boolean;
  /** The cell links to the object's detail page. */
  link?: boolean;
}

export interface FilterSpec {
  /** The URL query key. */
  key: string;
  label: string;
  type: "text" | "select" | "datetime";
  options?: [value: string, label: string][];
  /** The API query parameters for a value (default `{[key]: value}`). */
  toApi?: (v: string) => Record<string, string>;
  allTenants?: boolean;
}

/** Another object chosen in a form (a VM's user): suggestions are fetched as one types. */
export interface RefSpec {
  path: string;
  /** The field shown and matched (default "name"). */
  label?: string;
  /** Extra filter on the candidates (an OSF's images…). */
  filter?: (values: Record<string, unknown>) => Record<string, string>;
}

export interface FormField {
  name: string;
  label: string;
  /** "tenant": the tenants (for a superadministrator of a multitenant farm). */
  type: "text" | "password" | "number" | "textarea" | "checkbox" | "select" | "ref" | "checkboxes" | "tenant";
  options?: [value: string, label: string][];
  ref?: RefSpec;
  /** Only when creating, or only when editing (default both). */
  on?: "create" | "edit";
  /** Needed to set this field when editing (e.g. user.update.password). */
  acl?: string;
  required?: boolean;
  hint?: string;
  /** An emptied field is sent as null (otherwise left out). */
  nullable?: boolean;
  /** Offered when editing a selection of many objects at once. */
  mass?: boolean;
  /** Includes the global scope (tenant 0) among the tenants offered. */
  globalTenant?: boolean;
}

export type ActionRun =
  | { action: string; body?: Record<string, unknown> }
  | { patch: Record<string, unknown> }
  | { delete: true }
  /** Single objects only (a VM's restart). */
  | { custom: (row: Row) => Promise<string | undefined> };

export interface ActionSpec {
  /** The button's text ("Start", "Block"…). */
  label: string;
  /** Needed to see the button (all of them when several). */
  acl: string | string[];
  run: ActionRun;
  /** A single object's button is shown only when this holds (`me`: the logged-in administrator's id). */
  when?: (row: Row, me: number) => boolean;
  /** Also offered for a selection (default true, except custom actions). */
  mass?: boolean;
  single?: boolean;
  /** Asks first: the question, given what it applies to ("VM desk-1", "3 VMs"). */
  confirm?: (what: string) => string;
  /** The confirmation also asks for a reason (this label), required and sent as body.reason. */
  reason?: string;
  danger?: boolean;
  /** Past participle for notices: "started". */
  done: string;
}

export interface RelatedSpec {
  title: string;
  spec: () => ObjectSpec;
  /** API filter of the related objects. */
  filter: (row: Row) => Record<string, string>;
  /** Column keys to show (default the spec's first five). */
  columns?: string[];
  sort?: string;
  /** Where "show all" goes: the related list page with this URL query. */
  listQuery?: (row: Row) => Record<string, string>;
  /** A "New …" dialog for this relation (an OSF's new image). */
  create?: ComponentType<{ row: Row; onClose: () => void; onCreated: () => void }>;
}

export interface ObjectSpec {
  /** The object kind of the API's events and the audit log ("vm"). */
  kind: string;
  /** API path and app path segment ("vms"). */
  path: string;
  /** The list's h1 ("Virtual machines"). */
  title: string;
  /** "virtual machine": for "New …", "Edit …", notices. */
  singular: string;
  /** Short plural for counts ("VMs"). */
  plural: string;
  /** ACL prefix: <acl>.see, .create, .update, .delete. */
  acl: string;
  nav: { label: string; section: "Platform" | "Administration" | "Settings"; order: number };
  multitenantOnly?: boolean;
  name: (row: Row) => string;
  columns: Column[];
  filters: FilterSpec[];
  /** The field the Search box matches (none: no Search box). */
  search?: string;
  /** URL keys passed to the API as they are (id filters from links: ?host_id=3). */
  passThrough?: string[];
  defaultSort?: string;
  /** Create and edit fields (none: no forms). */
  fields: FormField[];
  creatable?: boolean;
  editable?: (row: Row) => boolean;
  deletable?: (row: Row) => boolean;
  actions: ActionSpec[];
  /** Fields shown on the detail page. */
  details: { label: string; render: (row: Row) => ComponentChildren; acl?: string; allTenants?: boolean }[];
  related?: RelatedSpec[];
  /** Custom properties (GET/PUT/DELETE /<path>/:id/properties). */
  properties?: boolean;
  /** Parts of the detail page owned by other screens (a role's ACL editor…). */
  panels?: { title: string; acl?: string; render: (row: Row, reload: () => void) => ComponentChildren }[];
  /** Replaces the generic create form (the image upload dialog). */
  createDialog?: ComponentType<{ onClose: () => void; onCreated: (id: number) => void }>;
  /** Other kinds whose changes alter this list's rows (a user's connected VMs). */
  alsoChangedBy?: string[];
  /** No detail page: rows are not links. */
  noDetail?: boolean;
}
