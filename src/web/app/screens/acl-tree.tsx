// The ACL tree shared by the role editor, an administrator's effective ACLs and the profile:
// ACLs grouped by object, each group folding open and shut, a filter box, and the rows'
// status and buttons given by the caller.
import type { ComponentChildren } from "preact";
import { useState } from "preact/hooks";
import { Field } from "../ui.tsx";
import { actionOf, groupAcls, type Acl, type AclGroup } from "./acls.ts";

export function AclTree(props: {
  catalogue: Acl[];
  /** Which ACLs to list at all (e.g. only effective ones). */
  include?: (acl: string) => boolean;
  /** Counted as "N of M" in each group's heading. */
  counted?: (acl: string) => boolean;
  /** The status cell of a row. */
  status: (acl: string) => ComponentChildren;
  /** The buttons of a row, if any. */
  actions?: (acl: string) => ComponentChildren;
  /** Buttons acting on a whole group. */
  groupActions?: (g: AclGroup, visible: Acl[]) => ComponentChildren;
  /** Extra controls next to the filter box. */
  toolbar?: ComponentChildren;
  label: string;
}) {
  const [filter, setFilter] = useState("");
  const [open, setOpen] = useState<Set<string>>(() => new Set());
  const f = filter.trim().toLowerCase();
  const shown = props.catalogue.filter(
    (a) =>
      (!props.include || props.include(a.name)) &&
      (!f || a.name.toLowerCase().includes(f) || a.description.toLowerCase().includes(f)),
  );
  const groups = groupAcls(shown);
  const all = groupAcls(props.catalogue);
  const toggle = (o: string) => {
    const n = new Set(open);
    if (n.has(o)) n.delete(o);
    else n.add(o);
    setOpen(n);
  };
  return (
    <div class="acl-tree">
      <div class="acl-toolbar">
        <Field label="Filter ACLs">
          {(a) => (
            <input
              {...a}
              type="search"
              value={filter}
              placeholder="e.g. vm.start or password"
              onInput={(e) => setFilter(e.currentTarget.value)}
            />
          )}
        </Field>
        {props.toolbar}
        <span class="spacer" />
        <button type="button" class="btn btn-plain" onClick={() => setOpen(new Set(all.map((g) => g.object)))}>
          Expand all
        </button>
        <button type="button" class="btn btn-plain" onClick={() => setOpen(new Set())}>
          Collapse all
        </button>
      </div>
      {groups.length === 0 && <p class="muted">No ACL matches.</p>}
      {groups.map((g) => {
        const whole = all.find((x) => x.object === g.object)!;
        const isOpen = open.has(g.object) || f !== "";
        const counted = props.counted ? whole.acls.filter((a) => props.counted!(a.name)).length : undefined;
        const bodyId = `acl-group-${g.object}`;
        return (
          <section class="acl-group" key={g.object} aria-label={`${props.label}: ${g.label}`}>
            <div class="acl-group-head">
              <button
                type="button"
                class="btn btn-plain acl-toggle"
                aria-expanded={isOpen}
                aria-controls={bodyId}
                onClick={() => toggle(g.object)}
              >
                <span aria-hidden="true" class="acl-caret">
                  {isOpen ? "▾" : "▸"}
                </span>{" "}
                {g.label}
                <span class="muted"> ({g.object})</span>
              </button>
              {counted !== undefined && (
                <span class="acl-count">
                  {counted} of {whole.acls.length}
                </span>
              )}
              <span class="spacer" />
              {props.groupActions?.(whole, g.acls)}
            </div>
            {isOpen && (
              <table class="acl-table" id={bodyId}>
                <thead>
                  <tr>
                    <th scope="col">ACL</th>
                    <th scope="col">Status</th>
                    {props.actions && (
                      <th scope="col">
                        <span class="sr-only">Actions</span>
                      </th>
                    )}
                  </tr>
                </thead>
                <tbody>
                  {g.acls.map((a) => (
                    <tr key={a.name} id={`acl-${a.name}`}>
                      <td>
                        <code title={a.name}>{actionOf(a.name)}</code>
                        <div class="muted acl-desc">{a.description}</div>
                      </td>
                      <td>{props.status(a.name)}</td>
                      {props.actions && <td class="acl-actions">{props.actions(a.name)}</td>}
                    </tr>
                  ))}
                </tbody>
              </table>
            )}
          </section>
        );
      })}
    </div>
  );
}

/** A small coloured label for a status. */
export function Badge(props: { kind: "ok" | "danger" | "info" | "none"; children: ComponentChildren }) {
  return <span class={`st-badge st-badge-${props.kind}`}>{props.children}</span>;
}
