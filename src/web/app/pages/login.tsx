// The login form: tenant (in multitenant mode, or as name@tenant), name and password.
import { useState } from "preact/hooks";
import { api, type ApiError } from "../api.ts";
import { Button, ErrorLine, Field } from "../ui.tsx";

export function LoginPage(props: { multitenant: boolean; notice?: string; onLogin: (s: any) => void }) {
  const [tenant, setTenant] = useState("");
  const [name, setName] = useState("");
  const [password, setPassword] = useState("");
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string>();
  const [fieldErrors, setFieldErrors] = useState<Record<string, string>>({});
  const submit = async (e: Event) => {
    e.preventDefault();
    setBusy(true);
    setError(undefined);
    setFieldErrors({});
    try {
      const s = await api.post("/login", { name, password, ...(tenant ? { tenant } : {}) });
      props.onLogin(s);
    } catch (err) {
      const a = err as ApiError;
      if (a.field) setFieldErrors({ [a.field]: a.message });
      else setError(a.message);
      setBusy(false);
    }
  };
  return (
    <main class="login">
      <form onSubmit={submit} aria-labelledby="login-title">
        <h1 id="login-title">QVD administration</h1>
        {props.notice && (
          <p class="notice notice-info" role="status">
            {props.notice}
          </p>
        )}
        {props.multitenant && (
          <Field label="Tenant" hint="Empty for a superadministrator (or write name@tenant)" error={fieldErrors.tenant}>
            {(a) => (
              <input
                {...a}
                name="tenant"
                autoComplete="organization"
                value={tenant}
                onInput={(e) => setTenant(e.currentTarget.value)}
              />
            )}
          </Field>
        )}
        <Field label="Name" error={fieldErrors.name}>
          {(a) => (
            <input
              {...a}
              name="name"
              required
              autoComplete="username"
              autoFocus
              value={name}
              onInput={(e) => setName(e.currentTarget.value)}
            />
          )}
        </Field>
        <Field label="Password" error={fieldErrors.password}>
          {(a) => (
            <input
              {...a}
              name="password"
              type="password"
              required
              autoComplete="current-password"
              value={password}
              onInput={(e) => setPassword(e.currentTarget.value)}
            />
          )}
        </Field>
        <ErrorLine error={error} />
        <Button type="submit" kind="primary" busy={busy}>
          Log in
        </Button>
      </form>
    </main>
  );
}
