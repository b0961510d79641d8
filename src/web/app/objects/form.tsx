// The create and edit dialog of any object, from its spec's fields. Sends only what changed
// when editing; the server's validation error appears beside the field it names.
import { useEffect, useRef, useState } from "preact/hooks";
import { api, ApiError, type Page } from "../api.ts";
import { useSession, type Session } from "../session.ts";
import { Button, ErrorLine, Field, Modal } from "../ui.tsx";
import type { MassResult } from "./actions.tsx";
import { likeAny, selectionQuery, selectionSize, toQuery, type Selection } from "./query.ts";
import type { FormField, ObjectSpec, RefSpec, Row } from "./types.ts";

type Values = Record<string, any>;

export function formFields(spec: ObjectSpec, s: Session, editing: boolean): FormField[] {
  return spec.fields.filter((f) => {
    if (f.on && f.on !== (editing ? "edit" : "create")) return false;
    if (f.type === "tenant") return !editing && s.multitenant && s.administrator.superadmin;
    return !editing || s.can(f.acl ?? `${spec.acl}.update`);
  });
}

function initial(f: FormField, row?: Row): unknown {
  const v = row?.[f.name];
  switch (f.type) {
    case "checkbox":
      return !!v;
    case "checkboxes":
      return Array.isArray(v) ? v : [];
    case "ref":
      return { text: row?.[f.name.replace(/_id$/, "_name")] ?? "", id: v ?? null };
    case "password":
      return "";
    default:
      return v === null || v === undefined ? "" : String(v);
  }
}

class FieldError extends Error {
  constructor(
    readonly field: string,
    message: string,
  ) {
    super(message);
  }
}

/** The id of a reference typed in full without picking a suggestion (typed fast, or pasted). */
async function resolveRef(f: FormField, text: string, values: Values): Promise<number> {
  const spec = f.ref!;
  const label = spec.label ?? "name";
  const [name, tenant] = text.split(" @ ");
  const q = toQuery({
    ...(spec.filter?.(values) ?? {}),
    [label]: name!.trim(),
    ...(tenant ? { tenant_name: tenant.trim() } : {}),
    limit: 2,
  });
  const page = await api.get<Page<Row>>(`/${spec.path}${q}`);
  if (page.items.length === 1) return page.items[0]!.id as number;
  throw new FieldError(
    f.name,
    page.items.length ? "several match: choose one of the suggestions" : "no such one: choose one of the suggestions",
  );
}

/** A field's form value as the API wants it; undefined: leave out. */
async function toApi(f: FormField, v: any, values: Values): Promise<unknown> {
  switch (f.type) {
    case "checkbox":
    case "checkboxes":
      return v;
    case "ref":
      if (!v.text) return f.nullable ? null : undefined;
      return v.id ?? (await resolveRef(f, v.text, values));
    case "number":
    case "tenant": {
      if (v === "") return f.nullable ? null : undefined;
      const n = Number(v);
      if (!Number.isFinite(n)) throw new FieldError(f.name, "must be a number");
      return n;
    }
    default:
      return v === "" ? (f.nullable ? null : undefined) : v;
  }
}

/** A text box with suggestions from the API (a VM's user, an image's OSF). */
function RefInput(props: {
  attrs: Record<string, unknown>;
  spec: RefSpec;
  values: Values;
  value: { text: string; id: number | null };
  onChange: (v: { text: string; id: number | null }) => void;
}) {
  const s = useSession();
  const label = props.spec.label ?? "name";
  const [options, setOptions] = useState<Row[]>([]);
  const timer = useRef<ReturnType<typeof setTimeout>>();
  const showTenant = s.multitenant && s.administrator.superadmin;
  const text = (r: Row) => (showTenant && r.tenant_name ? `${r[label]} @ ${r.tenant_name}` : String(r[label]));
  const listId = `${props.attrs.id}-list`;
  const load = (v: string) => {
    clearTimeout(timer.current);
    timer.current = setTimeout(async () => {
      try {
        const extra = props.spec.filter?.(props.values) ?? {};
        const q = toQuery({ ...extra, [`${label}[like]`]: likeAny(v.replace(/ @ .*$/, "")), sort: label, limit: 20 });
        const page = await api.get<Page<Row>>(`/${props.spec.path}${q}`);
        setOptions(page.items);
        const hit = page.items.find((r) => text(r) === v);
        if (hit) props.onChange({ text: v, id: hit.id });
      } catch {
        setOptions([]);
      }
    }, 150);
  };
  useEffect(() => () => clearTimeout(timer.current), []);
  return (
    <>
      <input
        {...props.attrs}
        list={listId}
        autoComplete="off"
        value={props.value.text}
        onFocus={() => load(props.value.text)}
        onInput={(e) => {
          const v = e.currentTarget.value;
          const hit = options.find((r) => text(r) === v);
          props.onChange({ text: v, id: hit ? hit.id : null });
          load(v);
        }}
      />
      <datalist id={listId}>
        {options.map((r) => (
          <option key={r.id} value={text(r)} />
        ))}
      </datalist>
    </>
  );
}

function TenantSelect(props: {
  attrs: Record<string, unknown>;
  global?: boolean;
  value: string;
  onChange: (v: string) => void;
}) {
  const [tenants, setTenants] = useState<Row[]>([]);
  useEffect(() => {
    api.get<Page<Row>>("/tenants?sort=name&limit=1000&fields=name").then(
      (p) => setTenants(p.items),
      () => setTenants([]),
    );
  }, []);
  return (
    <select {...props.attrs} value={props.value} onChange={(e) => props.onChange(e.currentTarget.value)}>
      <option value="">choose a tenant</option>
      {tenants
        .filter((t) => props.global || t.id !== 0)
        .map((t) => (
          <option key={t.id} value={String(t.id)}>
            {t.id === 0 ? "global (every tenant)" : t.name}
          </option>
        ))}
    </select>
  );
}

function Input(props: {
  f: FormField;
  attrs: Record<string, unknown>;
  value: any;
  values: Values;
  mass?: boolean;
  set: (v: any) => void;
}) {
  const { f, attrs, value, set } = props;
  switch (f.type) {
    case "textarea":
      return <textarea {...attrs} rows={3} value={value} onInput={(e) => set(e.currentTarget.value)} />;
    case "checkbox":
      return <input {...attrs} type="checkbox" checked={value} onChange={(e) => set(e.currentTarget.checked)} />;
    case "select":
      return (
        <select {...attrs} value={value} onChange={(e) => set(e.currentTarget.value)}>
          {(!f.required || props.mass) && <option value="">{props.mass ? "unchanged" : "—"}</option>}
          {f.options!.map(([v, l]) => (
            <option key={v} value={v}>
              {l}
            </option>
          ))}
        </select>
      );
    case "checkboxes":
      return (
        // biome-ignore lint/a11y/useSemanticElements: the form's own label names the group; a fieldset would add a second one
        <div {...attrs} role="group" class="checks">
          {f.options!.map(([v, l]) => (
            <label key={v}>
              <input
                type="checkbox"
                checked={value.includes(v)}
                onChange={(e) => set(e.currentTarget.checked ? [...value, v] : value.filter((x: string) => x !== v))}
              />{" "}
              {l}
            </label>
          ))}
        </div>
      );
    case "ref":
      return <RefInput attrs={attrs} spec={f.ref!} values={props.values} value={value} onChange={set} />;
    case "tenant":
      return <TenantSelect attrs={attrs} global={f.globalTenant} value={value} onChange={set} />;
    default:
      return (
        <input
          {...attrs}
          type={f.type}
          required={f.required}
          autoComplete={f.type === "password" ? "new-password" : "off"}
          value={value}
          onInput={(e) => set(e.currentTarget.value)}
        />
      );
  }
}

/**
 * The form. With `row`: edits it. With `selection`: edits every selected object (only the
 * spec's `mass` fields; what is left empty stays as it is), answering with the per-object result.
 */
export function ObjectForm(props: {
  spec: ObjectSpec;
  row?: Row;
  selection?: Selection;
  preset?: Values;
  onClose: () => void;
  onSaved: (row: Row) => void;
  onMassSaved?: (result: MassResult) => void;
}) {
  const s = useSession();
  const { spec, row, selection } = props;
  const editing = !!row || !!selection;
  const fields = formFields(spec, s, editing).filter((f) => !selection || f.mass);
  const [values, setValues] = useState<Values>(() => ({
    ...Object.fromEntries(fields.map((f) => [f.name, initial(f, row)])),
    ...props.preset,
  }));
  const [errors, setErrors] = useState<Record<string, string>>({});
  const [error, setError] = useState<string>();
  const [busy, setBusy] = useState(false);
  const start = useRef(values).current;

  const submit = async (e: Event) => {
    e.preventDefault();
    setErrors({});
    setError(undefined);
    try {
      const body: Values = {};
      for (const f of fields) {
        if (editing && JSON.stringify(values[f.name]) === JSON.stringify(start[f.name])) continue;
        const v = await toApi(f, values[f.name], values);
        if (v !== undefined) body[f.name] = v;
      }
      if (editing && !Object.keys(body).length) return props.onClose();
      setBusy(true);
      if (selection)
        return props.onMassSaved?.(await api.patch<MassResult>(`/${spec.path}${selectionQuery(selection)}`, body));
      const saved = row
        ? await api.patch<Row>(`/${spec.path}/${row.id}`, body)
        : await api.post<Row>(`/${spec.path}`, body);
      props.onSaved(saved);
    } catch (err) {
      setBusy(false);
      const field = err instanceof FieldError || err instanceof ApiError ? err.field?.split(".")[0] : undefined;
      const msg = (err as Error).message;
      // Beside the field, "name: must not be empty" needs no "name: ".
      if (field && fields.some((f) => f.name === field))
        setErrors({
          [field]: msg.startsWith(`${(err as ApiError).field}: `)
            ? msg.slice((err as ApiError).field!.length + 2)
            : msg,
        });
      else setError(msg);
    }
  };

  return (
    <Modal
      title={
        selection ? `Edit ${selectionSize(selection)} ${spec.plural}` : `${editing ? "Edit" : "New"} ${spec.singular}`
      }
      onClose={props.onClose}
    >
      {selection && <p class="muted">Fields left empty stay as they are.</p>}
      <form onSubmit={submit} noValidate>
        {fields.map((f) => (
          <Field key={f.name} label={f.label} error={errors[f.name]} hint={f.hint}>
            {(attrs) => (
              <Input
                f={f}
                attrs={{ ...attrs, name: f.name }}
                value={values[f.name]}
                values={values}
                mass={!!selection}
                set={(v) => setValues((x) => ({ ...x, [f.name]: v }))}
              />
            )}
          </Field>
        ))}
        <ErrorLine error={error} />
        <div class="actions">
          <Button onClick={props.onClose}>Cancel</Button>
          <Button type="submit" kind="primary" busy={busy}>
            {editing ? "Save" : "Create"}
          </Button>
        </div>
      </form>
    </Modal>
  );
}
