// A compact list of the objects related to the one on a detail page (a user's VMs, an
// image's VMs, the object's audit trail): a few columns, its own paging, live.
import { useState } from "preact/hooks";
import { useSession } from "../session.ts";
import { Button, ErrorLine, Link, Loading } from "../ui.tsx";
import { Pager } from "./pager.tsx";
import { toQuery } from "./query.ts";
import { ObjectTable, visibleColumns } from "./table.tsx";
import type { ObjectSpec, RelatedSpec, Row } from "./types.ts";
import { useObjectList } from "./use-list.ts";

const LIMIT = 10;

export function RelatedList(props: { rel: RelatedSpec; row: Row; refresh?: unknown }) {
  const { rel, row } = props;
  const spec: ObjectSpec = rel.spec();
  const s = useSession();
  const [offset, setOffset] = useState(0);
  const [creating, setCreating] = useState(false);
  const sort = rel.sort ?? spec.defaultSort ?? "name";
  const list = useObjectList(spec, { filter: rel.filter(row), sort, limit: LIMIT, offset }, props.refresh);
  if (!s.can(`${spec.acl}.see`)) return null;
  const columns = visibleColumns(spec, s, rel.columns ?? spec.columns.slice(0, 5).map((c) => c.key));
  const id = `rel-${spec.path}-${rel.title.replace(/\W+/g, "-").toLowerCase()}`;
  const Create = rel.create;
  return (
    <section class="panel" aria-labelledby={id}>
      <header class="panel-head">
        <h2 id={id}>{rel.title}</h2>
        {list.page && <span class="muted count">{list.page.total}</span>}
        <span class="spacer" />
        {Create && s.can(`${spec.acl}.create`) && (
          <Button onClick={() => setCreating(true)}>New {spec.singular}</Button>
        )}
        {rel.listQuery && !!list.page?.total && (
          <Link to={`/${spec.path}${toQuery(rel.listQuery(row))}`}>Show all</Link>
        )}
      </header>
      <ErrorLine error={list.error} />
      {!list.page && list.loading && <Loading />}
      {list.page &&
        (list.page.items.length ? (
          <ObjectTable spec={spec} rows={list.page.items} columns={columns} caption={rel.title} busy={list.loading} />
        ) : (
          <p class="empty">None.</p>
        ))}
      {list.page && list.page.total > LIMIT && (
        <Pager total={list.page.total} limit={LIMIT} offset={offset} onPage={(n) => setOffset((n - 1) * LIMIT)} />
      )}
      {creating && Create && (
        <Create
          row={row}
          onClose={() => setCreating(false)}
          onCreated={() => {
            setCreating(false);
            list.reload();
          }}
        />
      )}
    </section>
  );
}
