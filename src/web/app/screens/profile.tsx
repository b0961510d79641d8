// The administrator's own profile: who they are, their roles and ACLs, and the password form.
import { useState } from "preact/hooks";
import { api, type ApiError } from "../api.ts";
import { useSession } from "../session.ts";
import { Button, ErrorLine, Field, Loading, notify } from "../ui.tsx";
import { EffectiveAcls } from "./admin-roles.tsx";
import { aclCatalogue } from "./acls.ts";
import { fieldMessage, useLoad } from "../load.ts";

const LANGUAGES: Record<string, string> = { auto: "the browser's", en: "English", es: "Spanish" };

export function Profile() {
  const s = useSession();
  const me = useLoad(
    async (sig) => (await api.get<{ administrator: Record<string, any> }>("/session", sig)).administrator,
    [],
  );
  const [showAcls, setShowAcls] = useState(false);
  const a = { ...s.administrator, ...(me.data ?? {}) };
  const roles = Array.isArray(a.roles) ? (a.roles as string[]) : undefined;
  return (
    <section>
      <h1>Your profile</h1>
      <ErrorLine error={me.error && `Cannot load your profile: ${me.error}`} />
      <div class="st-panel">
        <dl class="st-facts">
          <dt>Name</dt>
          <dd>{a.name}</dd>
          <dt>Tenant</dt>
          <dd>{a.superadmin ? "* (the global scope: every tenant, as far as your ACLs go)" : a.tenant_name}</dd>
          <dt>Roles</dt>
          <dd>{roles ? roles.length ? roles.join(", ") : <span class="muted">none</span> : <Loading />}</dd>
          {typeof a.language === "string" && (
            <>
              <dt>Language</dt>
              <dd>{LANGUAGES[a.language] ?? a.language}</dd>
            </>
          )}
          <dt>ACLs</dt>
          <dd>
            {s.acls.size}{" "}
            <Button kind="plain" aria-expanded={showAcls} onClick={() => setShowAcls(!showAcls)}>
              {showAcls ? "Hide your ACLs" : "Show your ACLs"}
            </Button>
          </dd>
        </dl>
      </div>
      {showAcls && <OwnAcls />}
      <PasswordForm />
    </section>
  );
}

function OwnAcls() {
  const s = useSession();
  // With administrator.see the roles each ACL comes from are shown too.
  const loaded = useLoad(
    async (sig) => {
      const catalogue = await aclCatalogue();
      const roles = s.can("administrator.see")
        ? (await api.get(`/administrators/${s.administrator.id}/acls`, sig)).roles
        : undefined;
      return { catalogue, roles };
    },
    [s.administrator.id],
  );
  if (!loaded.data)
    return loaded.error ? <ErrorLine error={`Cannot load the ACLs: ${loaded.error}`} /> : <Loading what="ACLs" />;
  return (
    <div class="st-panel">
      <EffectiveAcls title="Your ACLs" catalogue={loaded.data.catalogue} effective={s.acls} roles={loaded.data.roles} />
    </div>
  );
}

function PasswordForm() {
  const [current, setCurrent] = useState("");
  const [password, setPassword] = useState("");
  const [confirm, setConfirm] = useState("");
  const [errors, setErrors] = useState<Record<string, string>>({});
  const [error, setError] = useState<string>();
  const [busy, setBusy] = useState(false);
  const submit = async (e: Event) => {
    e.preventDefault();
    setError(undefined);
    const errs: Record<string, string> = {};
    if (!current) errs.current_password = "write your current password";
    if (password.length < 8) errs.password = "must have at least 8 characters";
    else if (password === current) errs.password = "must differ from the current password";
    if (confirm !== password) errs.confirm = "differs from the new password";
    setErrors(errs);
    if (Object.keys(errs).length) return;
    setBusy(true);
    try {
      await api.put("/session/password", { current_password: current, password });
      setCurrent("");
      setPassword("");
      setConfirm("");
      notify("Your password was changed");
    } catch (err) {
      const a = err as ApiError;
      if (a.field) setErrors({ [a.field]: fieldMessage(a.message, a.field) });
      else setError(a.message);
    }
    setBusy(false);
  };
  return (
    <form class="st-panel password-form" onSubmit={submit} aria-labelledby="pw-title" noValidate>
      <h2 id="pw-title">Change your password</h2>
      <Field label="Current password" error={errors.current_password}>
        {(a) => (
          <input
            {...a}
            type="password"
            autoComplete="current-password"
            value={current}
            onInput={(e) => setCurrent(e.currentTarget.value)}
          />
        )}
      </Field>
      <Field label="New password" hint="At least 8 characters" error={errors.password}>
        {(a) => (
          <input
            {...a}
            type="password"
            autoComplete="new-password"
            value={password}
            onInput={(e) => setPassword(e.currentTarget.value)}
          />
        )}
      </Field>
      <Field label="Repeat the new one" error={errors.confirm}>
        {(a) => (
          <input
            {...a}
            type="password"
            autoComplete="new-password"
            value={confirm}
            onInput={(e) => setConfirm(e.currentTarget.value)}
          />
        )}
      </Field>
      <ErrorLine error={error} />
      <div class="actions">
        <Button type="submit" kind="primary" busy={busy}>
          Change password
        </Button>
      </div>
    </form>
  );
}
