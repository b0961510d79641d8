// The configuration page: cluster settings with their effective value, default and where the
// value comes from (default, global, tenant); edit, reset; per tenant for superadministrators.
import { useState } from "preact/hooks";
import { api, type ApiError, qs } from "../api.ts";
import { navigate } from "../router.ts";
import { useSession } from "../session.ts";
import { Button, Confirm, ErrorLine, Field, Loading, Modal, notify } from "../ui.tsx";
import { Badge } from "./acl-tree.tsx";
import { fieldMessage, useLoad } from "../load.ts";

interface Setting {
  key: string;
  doc: string;
  default: string | null;
  value: string | null;
  source: "default" | "global" | "tenant";
  /** Can be set but never read back. */
  secret?: boolean;
  /** A tenant may override it (otherwise only the global scope sets it). */
  tenant?: boolean;
}

/** `code` spans of the docs as <code>. */
export function Doc(props: { text: string }) {
  return <>{props.text.split(/`([^`]+)`/).map((part, i) => (i % 2 ? <code key={i}>{part}</code> : part))}</>;
}

const section = (key: string) => key.split(".")[0]!;

export function ConfigPage(props: { query: URLSearchParams }) {
  const session = useSession();
  const q = props.query;
  const search = q.get("q") ?? "";
  const prefix = q.get("section") ?? "";
  const chooseTenant = session.multitenant && session.administrator.superadmin && session.can("tenant.see");
  const tenant = chooseTenant ? Number(q.get("tenant") ?? 0) : undefined;
  const setQuery = (changes: Record<string, string>) => {
    const next = new URLSearchParams(q);
    for (const [k, v] of Object.entries(changes)) v ? next.set(k, v) : next.delete(k);
    const s = next.toString();
    navigate(`/config${s ? `?${s}` : ""}`, { replace: true });
  };

  const settings = useLoad(
    (s) => api.get<{ tenant_id: number; items: Setting[] }>(`/configs${qs({ tenant_id: tenant || undefined })}`, s),
    [tenant],
  );
  const tenants = useLoad(
    async (s) =>
      chooseTenant
        ? (
            await api.get<{ items: { id: number; name: string }[] }>(
              `/tenants${qs({ sort: "name", limit: 1000, fields: "id,name" })}`,
              s,
            )
          ).items
        : [],
    [chooseTenant],
  );
  const [editing, setEditing] = useState<Setting>();
  const [resetting, setResetting] = useState<Setting>();
  const canEdit = session.can("config.update");

  const scopeTenant = settings.data?.tenant_id ?? 0;
  const here: Setting["source"] = scopeTenant === 0 ? "global" : "tenant";
  const items = settings.data?.items ?? [];
  const sections = [...new Set(items.map((s) => section(s.key)))].sort();
  const needle = search.trim().toLowerCase();
  const shown = items.filter(
    (s) =>
      (!prefix || s.key.startsWith(`${prefix}.`) || s.key === prefix) &&
      (!needle || s.key.toLowerCase().includes(needle) || s.doc.toLowerCase().includes(needle)),
  );
  const tenantName = tenants.data?.find((t) => t.id === scopeTenant)?.name ?? session.administrator.tenant_name;

  return (
    <section>
      <h1>Configuration</h1>
      <p class="muted">
        {scopeTenant === 0
          ? "Cluster settings for every node and tenant. A tenant can override a setting for itself."
          : `Settings of tenant ${tenantName}: its own values override the global ones.`}{" "}
        Node settings live in each node's configuration file and are not listed here.
      </p>
      <div class="st-filters">
        <Field label="Search">
          {(a) => (
            <input
              {...a}
              type="search"
              value={search}
              placeholder="key or description"
              onInput={(e) => setQuery({ q: e.currentTarget.value })}
            />
          )}
        </Field>
        <Field label="Section">
          {(a) => (
            <select {...a} value={prefix} onChange={(e) => setQuery({ section: e.currentTarget.value })}>
              <option value="">All sections</option>
              {(prefix && !sections.includes(prefix) ? [prefix, ...sections] : sections).map((s) => (
                <option key={s} value={s}>
                  {s}
                </option>
              ))}
            </select>
          )}
        </Field>
        {chooseTenant && (
          <Field label="Tenant">
            {(a) => (
              <select
                {...a}
                value={String(tenant ?? 0)}
                onChange={(e) => setQuery({ tenant: e.currentTarget.value === "0" ? "" : e.currentTarget.value })}
              >
                <option value="0">Global (every tenant)</option>
                {(tenant && !tenants.data
                  ? [{ id: tenant, name: `tenant ${tenant}` }]
                  : (tenants.data ?? []).filter((t) => t.id !== 0)
                ).map((t) => (
                  <option key={t.id} value={String(t.id)}>
                    {t.name}
                  </option>
                ))}
              </select>
            )}
          </Field>
        )}
      </div>
      <ErrorLine error={tenants.error && `Cannot list the tenants: ${tenants.error}`} />
      {settings.error && <ErrorLine error={`Cannot load the settings: ${settings.error}`} />}
      {!settings.data && !settings.error && <Loading what="settings" />}
      {settings.data && (
        <div class="st-scroll">
          <table class="config-table">
            <caption class="sr-only">
              Settings ({shown.length} of {items.length})
            </caption>
            <thead>
              <tr>
                <th scope="col">Setting</th>
                <th scope="col">Value</th>
                <th scope="col">Default</th>
                <th scope="col">Source</th>
                {canEdit && (
                  <th scope="col">
                    <span class="sr-only">Actions</span>
                  </th>
                )}
              </tr>
            </thead>
            <tbody>
              {shown.map((s) => (
                <tr key={s.key}>
                  <td>
                    <code class="config-key">{s.key}</code>
                    <div class="muted config-doc">
                      <Doc text={s.doc} />
                    </div>
                  </td>
                  <td class="config-value" data-label="Value">
                    {s.value === null || s.value === "" ? <span class="muted">(empty)</span> : <code>{s.value}</code>}
                  </td>
                  <td class="config-value" data-label="Default">
                    {s.default === null || s.default === "" ? (
                      <span class="muted">(empty)</span>
                    ) : (
                      <code>{s.default}</code>
                    )}
                  </td>
                  <td data-label="Source">
                    <Badge kind={s.source === "default" ? "none" : s.source === "global" ? "info" : "ok"}>
                      {s.source}
                    </Badge>
                  </td>
                  {canEdit && (
                    <td class="st-row-actions">
                      {here === "global" || s.tenant ? (
                        <Button aria-label={`Edit ${s.key}`} onClick={() => setEditing(s)}>
                          Edit
                        </Button>
                      ) : (
                        <span class="muted">farm-wide</span>
                      )}
                      {s.source === here && (
                        <Button aria-label={`Reset ${s.key}`} onClick={() => setResetting(s)}>
                          Reset
                        </Button>
                      )}
                    </td>
                  )}
                </tr>
              ))}
              {shown.length === 0 && (
                <tr>
                  <td colSpan={canEdit ? 5 : 4} class="muted">
                    No setting matches.
                  </td>
                </tr>
              )}
            </tbody>
          </table>
        </div>
      )}
      {editing && (
        <EditSetting
          setting={editing}
          tenant={tenant}
          onClose={() => setEditing(undefined)}
          onSaved={() => void settings.reload()}
        />
      )}
      {resetting && (
        <Confirm
          title={`Reset ${resetting.key}`}
          message={
            scopeTenant === 0
              ? `Remove the global value of ${resetting.key}? Every tenant without its own value gets the default (${resetting.default || "empty"}).`
              : `Remove tenant ${tenantName}'s own value of ${resetting.key}? It gets the global value again.`
          }
          action="Reset"
          onClose={() => setResetting(undefined)}
          onConfirm={async () => {
            await api.del(`/configs/${encodeURIComponent(resetting.key)}${qs({ tenant_id: tenant || undefined })}`);
            notify(`${resetting.key} reset`);
            await settings.reload();
          }}
        />
      )}
    </section>
  );
}

function EditSetting(props: { setting: Setting; tenant?: number; onClose: () => void; onSaved: () => void }) {
  const s = props.setting;
  const secret = !!s.secret;
  const [value, setValue] = useState(secret ? "" : (s.value ?? ""));
  const [busy, setBusy] = useState(false);
  const [fieldError, setFieldError] = useState<string>();
  const [error, setError] = useState<string>();
  const save = async (e: Event) => {
    e.preventDefault();
    setBusy(true);
    setFieldError(undefined);
    setError(undefined);
    try {
      await api.put(`/configs/${encodeURIComponent(s.key)}`, {
        value,
        ...(props.tenant ? { tenant_id: props.tenant } : {}),
      });
      notify(`${s.key} saved`);
      props.onSaved();
      props.onClose();
    } catch (err) {
      const a = err as ApiError;
      if (a.field === "value" || a.field === "key") setFieldError(fieldMessage(a.message, a.field, s.key));
      else setError(a.message);
      setBusy(false);
    }
  };
  return (
    <Modal title={`Edit ${s.key}`} onClose={props.onClose}>
      <form onSubmit={save}>
        <p class="muted">
          <Doc text={s.doc} />
        </p>
        <Field
          label="Value"
          error={fieldError}
          hint={
            secret
              ? "A secret: its value is not shown; write the new one"
              : `Default: ${s.default === null || s.default === "" ? "(empty)" : s.default}`
          }
        >
          {(a) => (
            <input
              {...a}
              name="value"
              type={secret ? "password" : "text"}
              autoComplete="off"
              autoFocus
              value={value}
              onInput={(e) => setValue(e.currentTarget.value)}
            />
          )}
        </Field>
        <ErrorLine error={error} />
        <div class="actions">
          <Button onClick={props.onClose}>Cancel</Button>
          <Button type="submit" kind="primary" busy={busy}>
            Save
          </Button>
        </div>
      </form>
    </Modal>
  );
}
