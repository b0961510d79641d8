// Picking a role to give (to an administrator) or to inherit (for a role): the roles allowed
// for the tenant, minus those already there.
import { useState } from "preact/hooks";
import { api } from "../api.ts";
import { useSession } from "../session.ts";
import { Button, Field } from "../ui.tsx";
import { useLoad } from "../load.ts";

export interface RoleOption {
  id: number;
  name: string;
  tenant_id: number;
  tenant_name: string;
}

/** Roles a role (or an administrator) of `tenantId` may take: global ones and the tenant's own. */
export function useRoleOptions(tenantId: number, enabled: boolean) {
  return useLoad<RoleOption[]>(
    async (s) => {
      if (!enabled) return [];
      const r = await api.get<{ items: RoleOption[] }>(
        `/roles?sort=name&limit=1000&fields=id,name,tenant_id,tenant_name`,
        s,
      );
      return r.items.filter((x) => x.tenant_id === 0 || x.tenant_id === tenantId);
    },
    [tenantId, enabled],
  );
}

export const roleLabel = (r: { name: string; tenant_id: number; tenant_name: string }, multitenant: boolean) =>
  multitenant ? `${r.name} (${r.tenant_id === 0 ? "global" : r.tenant_name})` : r.name;

/** A role select with its submit button; the choice is cleared when `onPick` succeeds. */
export function RolePicker(props: {
  label: string;
  action: string;
  candidates: RoleOption[];
  busy: boolean;
  error?: string;
  onPick: (r: RoleOption) => Promise<boolean>;
}) {
  const session = useSession();
  const [pick, setPick] = useState("");
  return (
    <form
      class="st-inline"
      onSubmit={async (e) => {
        e.preventDefault();
        const r = props.candidates.find((c) => String(c.id) === pick);
        if (r && (await props.onPick(r))) setPick("");
      }}
    >
      <Field label={props.label} error={props.error}>
        {(a) => (
          <select {...a} value={pick} onChange={(e) => setPick(e.currentTarget.value)} disabled={props.busy}>
            <option value="">Choose a role…</option>
            {props.candidates.map((c) => (
              <option key={c.id} value={String(c.id)}>
                {roleLabel(c, session.multitenant)}
              </option>
            ))}
          </select>
        )}
      </Field>
      <Button type="submit" kind="primary" busy={props.busy} disabled={!pick}>
        {props.action}
      </Button>
    </form>
  );
}
