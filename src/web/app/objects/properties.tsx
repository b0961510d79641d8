// An object's custom properties (key/value pairs whose keys are defined on the Properties
// screen): listed on its detail page, set and removed in place.
import { useEffect, useState } from "preact/hooks";
import { api } from "../api.ts";
import { useSession } from "../session.ts";
import { Button, ErrorLine, Field, notify } from "../ui.tsx";
import type { ObjectSpec, Row } from "./types.ts";

interface PropValue {
  key: string;
  value: string;
}

export function PropertyValues(props: { spec: ObjectSpec; row: Row }) {
  const { spec, row } = props;
  const s = useSession();
  const base = `/${spec.path}/${row.id}/properties`;
  const [items, setItems] = useState<PropValue[]>();
  const [defs, setDefs] = useState<string[]>([]);
  const [error, setError] = useState<string>();
  const [key, setKey] = useState("");
  const [value, setValue] = useState("");
  const [fieldError, setFieldError] = useState<{ key?: string; value?: string }>({});
  const canEdit = s.can(`${spec.acl}.update`);
  // The API answers {key: value}.
  const show = (res: Record<string, string>) => setItems(Object.entries(res).map(([k, v]) => ({ key: k, value: v })));

  useEffect(() => {
    api.get(base).then(show, (e) => setError((e as Error).message));
    if (canEdit && s.can("property.see"))
      api.get(`/properties?applies_to=${spec.kind}&sort=key&limit=1000&fields=key`).then(
        (p) => setDefs(p.items.map((d: Row) => d.key)),
        () => {},
      );
  }, [row.id]);

  const save = async (k: string, v: string) => {
    setFieldError({});
    try {
      show(await api.put(`${base}/${encodeURIComponent(k)}`, { value: v }));
      notify(`Property ${k} set`);
      return true;
    } catch (err) {
      const f = (err as { field?: string }).field;
      setFieldError(f === "key" ? { key: (err as Error).message } : { value: (err as Error).message });
      return false;
    }
  };
  const remove = async (k: string) => {
    try {
      show(await api.del(`${base}/${encodeURIComponent(k)}`));
      notify(`Property ${k} removed`);
    } catch (err) {
      notify((err as Error).message, "error");
    }
  };

  if (!items) return <ErrorLine error={error} />;
  return (
    <section class="panel" aria-labelledby="props-title">
      <header class="panel-head">
        <h2 id="props-title">Properties</h2>
      </header>
      {items.length ? (
        <dl class="props">
          {items.map((p) => (
            <div key={p.key}>
              <dt>{p.key}</dt>
              <dd>
                {p.value}
                {canEdit && (
                  <Button kind="plain" aria-label={`Remove property ${p.key}`} onClick={() => remove(p.key)}>
                    Remove
                  </Button>
                )}
              </dd>
            </div>
          ))}
        </dl>
      ) : (
        <p class="empty">No properties set.</p>
      )}
      {canEdit && (
        <form
          class="inline-form"
          onSubmit={async (e) => {
            e.preventDefault();
            if (await save(key, value)) {
              setKey("");
              setValue("");
            }
          }}
        >
          <Field
            label="Property"
            error={fieldError.key}
            hint={defs.length ? undefined : "Define properties on the Properties screen first"}
          >
            {(a) => (
              <select {...a} value={key} required onChange={(e) => setKey(e.currentTarget.value)}>
                <option value="">choose</option>
                {defs.map((d) => (
                  <option key={d} value={d}>
                    {d}
                  </option>
                ))}
              </select>
            )}
          </Field>
          <Field label="Value" error={fieldError.value}>
            {(a) => <input {...a} value={value} onInput={(e) => setValue(e.currentTarget.value)} />}
          </Field>
          <Button type="submit" disabled={!key}>
            Set property
          </Button>
        </form>
      )}
    </section>
  );
}
