// The detail screen of any object: its fields, actions (Edit, Delete and the spec's), custom
// properties, panels owned by other screens, related objects and its audit trail. Follows
// the object live: a VM going from starting to running changes here without a reload.
import { useState } from "preact/hooks";
import { api } from "../api.ts";
import { useChanges } from "../events.ts";
import { useLoad } from "../load.ts";
import { navigate } from "../router.ts";
import { useSession } from "../session.ts";
import { Button, ErrorLine, Link, Loading, notify } from "../ui.tsx";
import { SingleActions } from "./actions.tsx";
import { ObjectForm } from "./form.tsx";
import { PropertyValues } from "./properties.tsx";
import { RelatedList } from "./related.tsx";
import { auditSpec } from "./specs/audit.tsx";
import type { ObjectSpec, RelatedSpec, Row } from "./types.ts";

const auditTrail = (kind: string): RelatedSpec => ({
  title: "Audit trail",
  spec: () => auditSpec,
  filter: (r) => ({ object_type: kind, object_id: String(r.id) }),
  sort: "-at",
  columns: ["at", "administrator_name", "action", "ok", "arguments"],
  listQuery: (r) => ({ object_type: kind, object_id: String(r.id) }),
});

export function DetailPage(props: { spec: ObjectSpec; id: string }) {
  const { spec, id } = props;
  const s = useSession();
  const [editing, setEditing] = useState(false);
  const loaded = useLoad((signal) => api.get<Row>(`/${spec.path}/${encodeURIComponent(id)}`, signal), [spec.path, id]);
  const { data: row, error } = loaded;
  const gone = loaded.status === 404;
  const reload = () => void loaded.reload();

  useChanges([spec.kind], (c) => {
    if (c.all || c.ids.has(Number(id))) reload();
  });

  if (gone)
    return (
      <section>
        <h1>{row ? spec.name(row) : `No such ${spec.singular}`}</h1>
        <p>
          This {spec.singular} does not exist (any more), or is not yours to see.{" "}
          <Link to={`/${spec.path}`}>Back to the {spec.title.toLowerCase()}</Link>.
        </p>
      </section>
    );
  if (!row) return error ? <ErrorLine error={error} /> : <Loading what={spec.singular} />;

  const canEdit = spec.fields.length > 0 && s.can(`${spec.acl}.update`) && (!spec.editable || spec.editable(row));
  const details = spec.details.filter(
    (d) => (!d.acl || s.can(d.acl)) && (!d.allTenants || (s.multitenant && s.administrator.superadmin)),
  );
  const specWithDelete = spec.deletable
    ? { ...spec, actions: spec.actions.filter((a) => !("delete" in a.run) || spec.deletable!(row)) }
    : spec;
  return (
    <article aria-labelledby="detail-title">
      <nav class="crumbs" aria-label="Breadcrumb">
        <Link to={`/${spec.path}`}>{spec.title}</Link> ›
      </nav>
      <header class="page-head">
        <h1 id="detail-title">{spec.name(row)}</h1>
        <span class="muted">
          {spec.singular} {row.id}
        </span>
      </header>
      <div class="toolbar" role="toolbar" aria-label={`Actions on ${spec.name(row)}`}>
        {canEdit && <Button onClick={() => setEditing(true)}>Edit</Button>}
        <SingleActions
          spec={specWithDelete}
          row={row}
          onDone={(a) => ("delete" in a.run ? navigate(`/${spec.path}`) : reload())}
        />
      </div>
      <ErrorLine error={error} />
      <section class="panel" aria-labelledby="details-title">
        <h2 id="details-title" class="sr-only">
          Details
        </h2>
        <dl class="details">
          {details.map((d) => (
            <div key={d.label}>
              <dt>{d.label}</dt>
              <dd>{d.render(row)}</dd>
            </div>
          ))}
        </dl>
      </section>
      {(spec.panels ?? [])
        .filter((p) => !p.acl || s.can(p.acl))
        .map((p) => (
          <section key={p.title} class="panel" aria-label={p.title}>
            <h2>{p.title}</h2>
            {p.render(row, reload)}
          </section>
        ))}
      {spec.properties && <PropertyValues spec={spec} row={row} />}
      {(spec.related ?? []).map((rel) => (
        <RelatedList key={rel.title} rel={rel} row={row} />
      ))}
      {s.can("audit.see") && <RelatedList rel={auditTrail(spec.kind)} row={row} refresh={row} />}
      {editing && (
        <ObjectForm
          spec={spec}
          row={row}
          onClose={() => setEditing(false)}
          onSaved={(r) => {
            setEditing(false);
            loaded.set(r);
            notify(`${spec.singular.charAt(0).toUpperCase()}${spec.singular.slice(1)} saved`);
          }}
        />
      )}
    </article>
  );
}
