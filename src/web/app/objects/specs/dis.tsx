// Images (disk images, "dis"): the files desktops boot from, versioned and tagged per OSF.
import { ImageTags, NewImageDialog } from "../../screens/images.tsx";
import { Badge, bytes, duration, objLink, STATE_OPTIONS, text, yesNo } from "../format.tsx";
import type { ObjectSpec, Row } from "../types.ts";
import * as C from "./common.tsx";
import { vmsSpec } from "./vms.tsx";

const DI_STATES = ["new", "uploading", "verifying", "ready", "published", "failed", "retired"];

const tags = (r: Row) => (
  <span class="tags">
    {(r.tags as string[])
      .filter((t) => t !== r.version)
      .map((t) => (
        <Badge key={t} value={t} kind={t === "default" || t === "head" ? "ok" : "idle"} />
      ))}
  </span>
);

/** The state, with a progress bar while the file arrives. */
function diState(r: Row) {
  const busy = r.state === "uploading" || r.state === "verifying";
  return (
    <span class="di-state">
      <Badge value={r.state} title={r.state_message || undefined} />
      {busy && (
        <progress max={1} value={r.progress} aria-label={`${r.state}: ${Math.round(r.progress * 100)}%`}>
          {Math.round(r.progress * 100)}%
        </progress>
      )}
    </span>
  );
}

export const disSpec: ObjectSpec = {
  kind: "di",
  path: "dis",
  title: "Images",
  singular: "image",
  plural: "images",
  acl: "di",
  nav: { label: "Images", section: "Platform", order: 50 },
  name: (r) => `${r.osf_name} ${r.version}`,
  search: "version",
  defaultSort: "-created_at",
  columns: [
    { key: "version", label: "Version", sort: "version", link: true },
    { key: "osf_name", label: "OSF", sort: "osf_name", render: objLink("osfs", "osf_id", "osf_name") },
    C.tenantColumn,
    { key: "tags", label: "Tags", render: tags },
    { key: "state", label: "State", sort: "state", render: diState },
    C.blockedColumn,
    { key: "size_bytes", label: "Size", sort: "size_bytes", num: true, render: (r) => bytes(r.size_bytes) },
    { key: "path", label: "File", sort: "path" },
    C.createdColumn,
  ],
  filters: [
    C.tenantFilter,
    { key: "osf", label: "OSF", type: "text", toApi: (v) => ({ "osf_name[like]": `%${v}%` }) },
    { key: "tag", label: "Tag", type: "text", toApi: (v) => ({ tags: v }) },
    { key: "state", label: "State", type: "select", options: STATE_OPTIONS(DI_STATES) },
    C.blockedFilter,
  ],
  passThrough: ["osf_id", "tenant_id"],
  fields: [
    C.descriptionField,
    {
      name: "expire_soft_s",
      label: "Warn running VMs after (seconds)",
      type: "number",
      nullable: true,
      on: "edit",
      hint: "When a tag moves to this image; empty: never",
    },
    {
      name: "expire_hard_s",
      label: "Stop running VMs after (seconds)",
      type: "number",
      nullable: true,
      on: "edit",
      hint: "When a tag moves to this image; empty: never",
    },
    { name: "blocked", label: "Blocked", type: "checkbox", acl: "di.block", on: "edit" },
  ],
  createDialog: (p) => <NewImageDialog onClose={p.onClose} onCreated={p.onCreated} />,
  actions: [...C.blockActions("di.block"), C.deleteAction("di")],
  details: [
    { label: "OS flavour", render: objLink("osfs", "osf_id", "osf_name") },
    C.tenantDetail,
    { label: "Version", render: (r) => r.version },
    { label: "Tags", render: tags },
    {
      label: "State",
      render: (r) => (
        <>
          {diState(r)} {r.state_message && <span class="muted">{r.state_message}</span>}
        </>
      ),
    },
    { label: "Blocked", render: yesNo("blocked") },
    { label: "File", render: (r) => r.path },
    { label: "Size", render: (r) => bytes(r.size_bytes) },
    { label: "SHA-256", render: (r) => (r.sha256 ? <code class="hash">{r.sha256}</code> : text(null)) },
    {
      label: "Running VMs on a tag move",
      render: (r) => `warned after ${duration(r.expire_soft_s)}, stopped after ${duration(r.expire_hard_s)}`,
    },
    { label: "Description", render: (r) => text(r.description) },
    ...C.createdDetails,
  ],
  panels: [{ title: "Tags", acl: "di.tag", render: (r, reload) => <ImageTags di={r} onChange={reload} /> }],
  properties: true,
  related: [
    {
      title: "VMs running this image",
      spec: () => vmsSpec,
      filter: (r) => ({ current_di_id: String(r.id) }),
      columns: ["name", "vm_state", "user_name", "host_name", "expire_hard_at"],
      listQuery: (r) => ({ current_di_id: String(r.id) }),
    },
  ],
};
