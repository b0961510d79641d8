// The table of a list: sortable column headers (buttons in <th aria-sort>), a checkbox per
// row when the administrator may act on a selection, the name linking to the detail page.
import type { Session } from "../session.ts";
import { Link } from "../ui.tsx";
import { text } from "./format.tsx";
import type { Column, ObjectSpec, Row } from "./types.ts";

export function visibleColumns(spec: ObjectSpec, s: Session, keys?: string[]): Column[] {
  const all = spec.columns.filter(
    (c) => (!c.acl || s.can(c.acl)) && (!c.allTenants || (s.multitenant && s.administrator.superadmin)),
  );
  return keys ? keys.map((k) => all.find((c) => c.key === k)).filter((c): c is Column => !!c) : all;
}

export function cell(spec: ObjectSpec, c: Column, r: Row) {
  const v = c.render ? c.render(r) : text(r[c.key]);
  return c.link && !spec.noDetail ? <Link to={`/${spec.path}/${r.id}`}>{v}</Link> : v;
}

export function ObjectTable(props: {
  spec: ObjectSpec;
  rows: Row[];
  columns: Column[];
  sort?: string;
  onSort?: (sort: string) => void;
  selected?: Set<number>;
  onSelect?: (ids: number[], on: boolean) => void;
  caption?: string;
  busy?: boolean;
}) {
  const { spec, rows, columns, sort, selected } = props;
  const allOnPage = rows.length > 0 && rows.every((r) => selected?.has(r.id));
  return (
    <div class="table-wrap">
      <table class="objects" aria-busy={props.busy || undefined}>
        {props.caption && <caption class="sr-only">{props.caption}</caption>}
        <thead>
          <tr>
            {selected && (
              <th class="check">
                <input
                  type="checkbox"
                  aria-label="Select all on this page"
                  checked={allOnPage}
                  onChange={(e) =>
                    props.onSelect!(
                      rows.map((r) => r.id),
                      e.currentTarget.checked,
                    )
                  }
                />
              </th>
            )}
            {columns.map((c) => {
              const dir =
                c.sort && sort === c.sort ? "ascending" : c.sort && sort === `-${c.sort}` ? "descending" : undefined;
              return (
                <th key={c.key} aria-sort={c.sort ? (dir ?? "none") : undefined} class={c.num ? "num" : undefined}>
                  {c.sort && props.onSort ? (
                    <button
                      type="button"
                      class="sort"
                      onClick={() => props.onSort!(dir === "ascending" ? `-${c.sort}` : c.sort!)}
                    >
                      {c.label}
                      <span class="sort-mark" aria-hidden="true">
                        {dir === "ascending" ? " ▲" : dir === "descending" ? " ▼" : ""}
                      </span>
                    </button>
                  ) : (
                    c.label
                  )}
                </th>
              );
            })}
          </tr>
        </thead>
        <tbody>
          {rows.map((r) => (
            <tr key={r.id} class={selected?.has(r.id) ? "selected" : undefined}>
              {selected && (
                <td class="check">
                  <input
                    type="checkbox"
                    aria-label={`Select ${spec.name(r)}`}
                    checked={selected.has(r.id)}
                    onChange={(e) => props.onSelect!([r.id], e.currentTarget.checked)}
                  />
                </td>
              )}
              {columns.map((c) => (
                <td key={c.key} class={c.num ? "num" : c.link ? "name" : undefined}>
                  {cell(spec, c, r)}
                </td>
              ))}
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}
