// A running VM's expiry (its detail page): when its user is warned and when it is stopped.
import { useState } from "preact/hooks";
import { api, type ApiError } from "../../api.ts";
import { Button, ErrorLine, Field, notify } from "../../ui.tsx";
import type { Row } from "../types.ts";

/** An instant as the value of a datetime-local input (local time, minutes). */
const local = (v: unknown) => {
  if (!v) return "";
  const d = new Date(String(v));
  return new Date(d.getTime() - d.getTimezoneOffset() * 60_000).toISOString().slice(0, 16);
};
const instant = (v: string) => (v ? new Date(v).toISOString() : null);

export function VmExpiry(props: { vm: Row; onChange: () => void }) {
  const { vm } = props;
  const [soft, setSoft] = useState(local(vm.expire_soft_at));
  const [hard, setHard] = useState(local(vm.expire_hard_at));
  const [errors, setErrors] = useState<Record<string, string>>({});
  const [error, setError] = useState<string>();
  const [busy, setBusy] = useState(false);
  if (vm.vm_state === "stopped")
    return <p class="muted">Stopped: an expiry applies to a running desktop (a stop clears it).</p>;
  const save = async (body: { soft_at: string | null; hard_at: string | null }) => {
    setBusy(true);
    setErrors({});
    setError(undefined);
    try {
      await api.post(`/vms/${vm.id}/expire`, body);
      notify(body.soft_at || body.hard_at ? `Expiry of ${vm.name} set` : `Expiry of ${vm.name} cleared`);
      props.onChange();
    } catch (err) {
      const e = err as ApiError;
      if (e.field === "soft_at" || e.field === "hard_at") setErrors({ [e.field]: e.message.replace(/^\w+: /, "") });
      else setError(e.message);
    } finally {
      setBusy(false);
    }
  };
  return (
    <form
      class="st-inline"
      onSubmit={(e) => {
        e.preventDefault();
        void save({ soft_at: instant(soft), hard_at: instant(hard) });
      }}
    >
      <Field label="Warn the user at" error={errors.soft_at}>
        {(a) => <input {...a} type="datetime-local" value={soft} onInput={(e) => setSoft(e.currentTarget.value)} />}
      </Field>
      <Field label="Stop the desktop at" error={errors.hard_at}>
        {(a) => <input {...a} type="datetime-local" value={hard} onInput={(e) => setHard(e.currentTarget.value)} />}
      </Field>
      <Button type="submit" kind="primary" busy={busy}>
        Save expiry
      </Button>
      {(vm.expire_soft_at || vm.expire_hard_at) && (
        <Button
          busy={busy}
          onClick={() => {
            setSoft("");
            setHard("");
            void save({ soft_at: null, hard_at: null });
          }}
        >
          Clear expiry
        </Button>
      )}
      <ErrorLine error={error} />
    </form>
  );
}
