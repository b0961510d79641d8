// The filters above a list: a Search box and the spec's filters, kept in the URL query so a
// filtered list can be bookmarked and reloaded. Typing waits a moment before it asks again.
import { useEffect, useRef, useState } from "preact/hooks";
import { useSession } from "../session.ts";
import { Button } from "../ui.tsx";
import type { FilterSpec, ObjectSpec } from "./types.ts";

function TextFilter(props: { id: string; label: string; value: string; type?: string; onChange: (v: string) => void }) {
  const [v, setV] = useState(props.value);
  const timer = useRef<ReturnType<typeof setTimeout>>();
  useEffect(() => setV(props.value), [props.value]);
  useEffect(() => () => clearTimeout(timer.current), []);
  return (
    <div class="filter">
      <label for={props.id}>{props.label}</label>
      <input
        id={props.id}
        type={props.type ?? "search"}
        value={v}
        onInput={(e) => {
          const nv = e.currentTarget.value;
          setV(nv);
          clearTimeout(timer.current);
          timer.current = setTimeout(() => props.onChange(nv), props.type === "datetime-local" ? 0 : 300);
        }}
        onKeyDown={(e) => {
          if (e.key !== "Enter") return;
          clearTimeout(timer.current);
          props.onChange(v);
        }}
      />
    </div>
  );
}

function SelectFilter(props: { id: string; f: FilterSpec; value: string; onChange: (v: string) => void }) {
  return (
    <div class="filter">
      <label for={props.id}>{props.f.label}</label>
      <select id={props.id} value={props.value} onChange={(e) => props.onChange(e.currentTarget.value)}>
        <option value="">any</option>
        {props.f.options!.map(([v, l]) => (
          <option key={v} value={v}>
            {l}
          </option>
        ))}
      </select>
    </div>
  );
}

export function FilterBar(props: {
  spec: ObjectSpec;
  query: URLSearchParams;
  onChange: (changes: Record<string, string>) => void;
}) {
  const s = useSession();
  const { spec, query } = props;
  const filters = spec.filters.filter((f) => !f.allTenants || (s.multitenant && s.administrator.superadmin));
  const fixed = (spec.passThrough ?? []).filter((k) => query.get(k));
  const set = (k: string) => (v: string) => props.onChange({ [k]: v });
  const id = (k: string) => `filter-${spec.path}-${k}`;
  return (
    // biome-ignore lint/a11y/useSemanticElements: <search> is too new for the browsers administrators may use
    <div class="filters" role="search" aria-label={`Filter ${spec.plural}`}>
      {spec.search && <TextFilter id={id("q")} label="Search" value={query.get("q") ?? ""} onChange={set("q")} />}
      {filters.map((f) =>
        f.type === "select" ? (
          <SelectFilter key={f.key} id={id(f.key)} f={f} value={query.get(f.key) ?? ""} onChange={set(f.key)} />
        ) : (
          <TextFilter
            key={f.key}
            id={id(f.key)}
            label={f.label}
            type={f.type === "datetime" ? "datetime-local" : "search"}
            value={query.get(f.key) ?? ""}
            onChange={set(f.key)}
          />
        ),
      )}
      {fixed.map((k) => (
        <Button
          key={k}
          class="chip"
          aria-label={`Remove the filter ${k.replace(/_id$/, "")} ${query.get(k)}`}
          onClick={() => props.onChange({ [k]: "" })}
        >
          {k.replace(/_id$/, "")} #{query.get(k)} ×
        </Button>
      ))}
    </div>
  );
}
