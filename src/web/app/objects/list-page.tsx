// The list screen of any object kind: filters, sortable table, paging, selection (this page,
// or every object matching the filter), mass actions and the "New …" button, each shown only
// when the administrator's ACLs allow it. Rows update live from the event stream.
import { useEffect, useState } from "preact/hooks";
import { navigate } from "../router.ts";
import { useSession } from "../session.ts";
import { Button, ErrorLine, Loading, notify } from "../ui.tsx";
import { allowedActions, MassActions, massEditable } from "./actions.tsx";
import { FilterBar } from "./filters.tsx";
import { ObjectForm } from "./form.tsx";
import { Pager } from "./pager.tsx";
import { listParams, type Selection } from "./query.ts";
import { ObjectTable, visibleColumns } from "./table.tsx";
import type { ObjectSpec } from "./types.ts";
import { useObjectList } from "./use-list.ts";

/** Changes the list's URL query (filters reset the page). */
function setQuery(spec: ObjectSpec, query: URLSearchParams, changes: Record<string, string>, push = false): void {
  const q = new URLSearchParams(query);
  for (const [k, v] of Object.entries(changes)) v ? q.set(k, v) : q.delete(k);
  if (!("page" in changes)) q.delete("page");
  navigate(`/${spec.path}${q.size ? `?${q}` : ""}`, { replace: !push });
}

export function ListPage(props: { spec: ObjectSpec; query: URLSearchParams }) {
  const { spec, query } = props;
  const s = useSession();
  const p = listParams(spec, query);
  const list = useObjectList(spec, p);
  const [selected, setSelected] = useState<Set<number>>(new Set());
  const [allMatching, setAllMatching] = useState(false);
  const [creating, setCreating] = useState(false);
  const filterKey = JSON.stringify(p.filter);
  // A different filter is a different set of objects: forget the selection.
  useEffect(() => {
    setSelected(new Set());
    setAllMatching(false);
  }, [filterKey]);

  const columns = visibleColumns(spec, s);
  const canMass = allowedActions(spec, s.can).some((a) => a.mass ?? !("custom" in a.run)) || massEditable(spec, s.can);
  const canCreate =
    spec.creatable !== false && (spec.fields.length > 0 || spec.createDialog) && s.can(`${spec.acl}.create`);
  const page = list.page;
  const total = page?.total ?? 0;
  const allOnPage = !!page && page.items.length > 0 && page.items.every((r) => selected.has(r.id));
  const selection: Selection = allMatching
    ? { allMatching: true, filter: p.filter, total }
    : { allMatching: false, ids: selected };

  const onSelect = (ids: number[], on: boolean) => {
    setAllMatching(false);
    setSelected((cur) => {
      const next = new Set(cur);
      for (const id of ids) on ? next.add(id) : next.delete(id);
      return next;
    });
  };
  const created = (id: number) => {
    setCreating(false);
    notify(`${spec.singular.charAt(0).toUpperCase()}${spec.singular.slice(1)} created`);
    if (spec.noDetail) list.reload();
    else navigate(`/${spec.path}/${id}`);
  };

  return (
    <section aria-labelledby="list-title">
      <header class="page-head">
        <h1 id="list-title">{spec.title}</h1>
        {page && <span class="muted count">{total === 1 ? `1 ${spec.singular}` : `${total} ${spec.plural}`}</span>}
        <span class="spacer" />
        {canCreate && (
          <Button kind="primary" onClick={() => setCreating(true)}>
            New {spec.singular}
          </Button>
        )}
      </header>
      <FilterBar spec={spec} query={query} onChange={(c) => setQuery(spec, query, c)} />
      {canMass && (
        <div class="selection-bar">
          <MassActions
            spec={spec}
            selection={selection}
            onDone={() => {
              setSelected(new Set());
              setAllMatching(false);
              list.reload();
            }}
          />
          {allOnPage && total > page!.items.length && !allMatching && (
            <Button onClick={() => setAllMatching(true)}>Select all {total} matching</Button>
          )}
          {allMatching && (
            <span class="muted" role="status">
              All {total} matching {spec.plural} are selected.{" "}
              <Button
                kind="plain"
                onClick={() => {
                  setAllMatching(false);
                  setSelected(new Set());
                }}
              >
                Clear selection
              </Button>
            </span>
          )}
        </div>
      )}
      <ErrorLine error={list.error} />
      {!page && list.loading && <Loading what={spec.plural} />}
      {page && (
        <>
          {page.items.length ? (
            <ObjectTable
              spec={spec}
              rows={page.items}
              columns={columns}
              sort={p.sort}
              onSort={(sort) => setQuery(spec, query, { sort, page: query.get("page") ?? "" })}
              selected={canMass ? (allMatching ? new Set(page.items.map((r) => r.id)) : selected) : undefined}
              onSelect={onSelect}
              caption={spec.title}
              busy={list.loading}
            />
          ) : (
            <p class="empty">
              No {spec.plural} {Object.keys(p.filter).length ? "match these filters" : "yet"}.
            </p>
          )}
          <Pager
            total={total}
            limit={p.limit}
            offset={p.offset}
            onPage={(n) => setQuery(spec, query, { page: n > 1 ? String(n) : "" }, true)}
            onLimit={(l) => setQuery(spec, query, { limit: String(l) })}
          />
        </>
      )}
      {creating &&
        (spec.createDialog ? (
          <spec.createDialog onClose={() => setCreating(false)} onCreated={created} />
        ) : (
          <ObjectForm spec={spec} onClose={() => setCreating(false)} onSaved={(r) => created(r.id)} />
        ))}
    </section>
  );
}
