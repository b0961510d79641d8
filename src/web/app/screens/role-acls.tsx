// The ACL editor of a role (shown on the role's detail page): the ACL tree by object and
// action with own, inherited and denied grants, and the inheritance editor.
import { useEffect, useState } from "preact/hooks";
import { api, type ApiError } from "../api.ts";
import { useSession } from "../session.ts";
import { Button, ErrorLine, Field, Link, Loading, notify } from "../ui.tsx";
import { AclTree, Badge } from "./acl-tree.tsx";
import { aclCatalogue, type Acl } from "./acls.ts";
import type { RoleWithAcls } from "../../../db/roles.ts";
import { fieldMessage, useAction, useLoad } from "../load.ts";
import { roleLabel, RolePicker, useRoleOptions } from "./role-picker.tsx";

interface RoleRow {
  id: number;
  name: string;
  tenant_id: number;
  builtin: boolean;
  grants: string[];
  denials: string[];
  inherits: string[];
  [k: string]: unknown;
}
interface RoleAcls {
  role: RoleRow;
  effective: Set<string>;
  parents: RoleWithAcls[];
  catalogue: Acl[];
}

async function loadRoleAcls(id: number, signal: AbortSignal): Promise<RoleAcls> {
  const [role, acls, catalogue] = await Promise.all([
    api.get<RoleRow>(`/roles/${id}`, signal),
    api.get<{ items: string[]; inherits: RoleWithAcls[] }>(`/roles/${id}/acls`, signal),
    aclCatalogue(),
  ]);
  return { role, effective: new Set(acls.items), parents: acls.inherits, catalogue };
}

/** Why the role cannot be changed here, if it cannot. */
function readOnlyReason(role: RoleRow, superadmin: boolean): string | undefined {
  if (role.builtin)
    return "This role is built in and cannot be changed; to adapt it, make a new role that inherits it.";
  if (role.tenant_id === 0 && !superadmin) return "This is a global role: only a superadministrator can change it.";
  return undefined;
}

export function RoleAclEditor(props: {
  role: { id: number; name: string; [k: string]: unknown };
  onChange?: () => void;
}) {
  const session = useSession();
  // Reloads when the page's row changes too (another administrator changed the role).
  const r = props.role;
  const loaded = useLoad((s) => loadRoleAcls(r.id, s), [r.id, JSON.stringify([r.grants, r.denials, r.inherits])]);
  if (!loaded.data)
    return loaded.error ? (
      <ErrorLine error={`Cannot load the role's ACLs: ${loaded.error}`} />
    ) : (
      <Loading what="ACLs" />
    );
  const d = loaded.data;
  const reason = readOnlyReason(d.role, session.administrator.superadmin);
  const changed = async () => {
    await loaded.reload();
    props.onChange?.();
  };
  return (
    <div class="role-editor">
      {loaded.error && <ErrorLine error={`Cannot refresh: ${loaded.error}`} />}
      {reason && (
        <p class="st-note" role="note">
          {reason}
        </p>
      )}
      <RoleInheritance data={d} editable={!reason && session.can("role.assign_role")} onChanged={changed} />
      <RoleAclTree data={d} editable={!reason && session.can("role.assign_acl")} onChanged={changed} />
    </div>
  );
}

// --- the ACL tree ----------------------------------------------------------------------------

type Show = "all" | "effective" | "here";

function RoleAclTree(props: { data: RoleAcls; editable: boolean; onChanged: () => Promise<void> }) {
  const session = useSession();
  const { role, effective, parents, catalogue } = props.data;
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string>();
  const [show, setShow] = useState<Show>("all");
  // Keyboard focus after a row's change: its counterpart button (Grant → "Remove the grant").
  const [focusAfter, setFocusAfter] = useState<{ acl: string; label: string }>();
  const grants = new Set(role.grants);
  const denials = new Set(role.denials);
  const from = (acl: string) => parents.filter((p) => p.acls.includes(acl)).map((p) => p.name);
  // No one hands out rights they do not hold (the API refuses it); superadmins hold them all.
  const mayGive = (acl: string) => session.administrator.superadmin || session.can(acl);

  // Keeps keyboard focus in the row that changed (its buttons are replaced).
  useEffect(() => {
    if (!focusAfter || busy) return;
    const row = document.getElementById(`acl-${focusAfter.acl}`);
    const want =
      row?.querySelector(`button[aria-label="${CSS.escape(focusAfter.label)}"]`) ?? row?.querySelector("button");
    (want as HTMLButtonElement | null)?.focus();
    setFocusAfter(undefined);
  }, [props.data, busy]);

  const run = async (what: () => Promise<unknown>, focus?: { acl: string; label: string }) => {
    setBusy(true);
    setError(undefined);
    try {
      await what();
    } catch (err) {
      setError((err as ApiError).message);
    }
    setFocusAfter(focus);
    await props.onChanged();
    setBusy(false);
  };
  const grant = (acl: string) => api.put(`/roles/${role.id}/acls`, { acl, positive: true });
  const deny = (acl: string) => api.put(`/roles/${role.id}/acls`, { acl, positive: false });
  const clear = (acl: string) => api.del(`/roles/${role.id}/acls/${encodeURIComponent(acl)}`);

  const status = (acl: string) => {
    const inh = from(acl);
    if (denials.has(acl))
      return (
        <>
          <Badge kind="danger">Denied here</Badge>
          {inh.length > 0 && <div class="muted acl-note">would be inherited from {inh.join(", ")}</div>}
        </>
      );
    if (grants.has(acl))
      return (
        <>
          <Badge kind="ok">Granted here</Badge>
          {inh.length > 0 && <div class="muted acl-note">also inherited from {inh.join(", ")}</div>}
        </>
      );
    if (effective.has(acl)) return <Badge kind="info">Inherited from {inh.join(", ") || "another role"}</Badge>;
    return <Badge kind="none">Not granted</Badge>;
  };

  const actions = props.editable
    ? (acl: string) => {
        const own = grants.has(acl) ? "grant" : denials.has(acl) ? "denial" : undefined;
        const canGive = mayGive(acl);
        return (
          <>
            {!grants.has(acl) && canGive && (
              <Button
                disabled={busy}
                aria-label={`Grant ${acl}`}
                onClick={() => run(() => grant(acl), { acl, label: `Remove the grant of ${acl}` })}
              >
                Grant
              </Button>
            )}
            {!denials.has(acl) && (
              <Button
                disabled={busy}
                aria-label={`Deny ${acl}`}
                onClick={() => run(() => deny(acl), { acl, label: `Remove the denial of ${acl}` })}
              >
                Deny
              </Button>
            )}
            {/* Lifting a denial can give the ACL back, so it needs the ACL too. */}
            {own && (own === "grant" || canGive) && (
              <Button
                disabled={busy}
                aria-label={`Remove the ${own} of ${acl}`}
                onClick={() => run(() => clear(acl), { acl, label: own === "grant" ? `Grant ${acl}` : `Deny ${acl}` })}
              >
                Remove {own}
              </Button>
            )}
            {!canGive && (
              <span class="muted acl-note" title="You can only grant ACLs you hold yourself">
                not yours to grant
              </span>
            )}
          </>
        );
      }
    : undefined;

  const grantAll = (acls: Acl[], label: string) =>
    run(async () => {
      const todo = acls.filter((a) => !grants.has(a.name) && (!denials.has(a.name) || mayGive(a.name)));
      const giveable = todo.filter((a) => mayGive(a.name));
      for (const a of giveable) await grant(a.name);
      const skipped = todo.length - giveable.length;
      notify(
        `${label}: ${giveable.length} ACL${giveable.length === 1 ? "" : "s"} granted${skipped ? `; ${skipped} skipped (you do not hold them)` : ""}`,
      );
    });
  const removeAll = (acls: Acl[], label: string) =>
    run(async () => {
      const own = acls.filter((a) => grants.has(a.name) || (denials.has(a.name) && mayGive(a.name)));
      for (const a of own) await clear(a.name);
      notify(
        `${label}: ${own.length} own grant${own.length === 1 ? "" : "s"} or denial${own.length === 1 ? "" : "s"} removed`,
      );
    });

  return (
    <section class="st-sub" aria-labelledby="role-acls-title">
      <h3 id="role-acls-title">ACLs</h3>
      <p class="muted">
        {effective.size} effective ACL{effective.size === 1 ? "" : "s"}: {grants.size} granted here,{" "}
        {[...effective].filter((a) => !grants.has(a)).length} inherited; {denials.size} denied here.
      </p>
      <ErrorLine error={error} />
      <AclTree
        label="ACLs"
        catalogue={catalogue}
        include={(a) => show === "all" || (show === "effective" ? effective.has(a) : grants.has(a) || denials.has(a))}
        counted={(a) => effective.has(a)}
        status={status}
        actions={actions}
        groupActions={
          props.editable
            ? (g, visible) => (
                <>
                  {visible.some((a) => !grants.has(a.name) && mayGive(a.name)) && (
                    <Button
                      disabled={busy}
                      aria-label={`Grant all of ${g.label}`}
                      onClick={() => grantAll(visible, g.label)}
                    >
                      Grant all
                    </Button>
                  )}
                  {visible.some((a) => grants.has(a.name) || denials.has(a.name)) && (
                    <Button
                      disabled={busy}
                      aria-label={`Remove own grants and denials of ${g.label}`}
                      onClick={() => removeAll(visible, g.label)}
                    >
                      Remove own
                    </Button>
                  )}
                </>
              )
            : undefined
        }
        toolbar={
          <Field label="Show">
            {(a) => (
              <select {...a} value={show} onChange={(e) => setShow(e.currentTarget.value as Show)}>
                <option value="all">All ACLs</option>
                <option value="effective">Effective only</option>
                <option value="here">Granted or denied here</option>
              </select>
            )}
          </Field>
        }
      />
    </section>
  );
}

// --- inheritance -----------------------------------------------------------------------------

function RoleInheritance(props: { data: RoleAcls; editable: boolean; onChanged: () => Promise<void> }) {
  const session = useSession();
  const { role, parents } = props.data;
  const options = useRoleOptions(role.tenant_id, props.editable);
  const action = useAction((e) => fieldMessage(e.message, e.field));
  const { busy, error } = action;
  const candidates = (options.data ?? []).filter((r) => r.id !== role.id && !parents.some((p) => p.id === r.id));
  const act = (what: () => Promise<unknown>, done: string) => action.act(what, done, props.onChanged);
  return (
    <section class="st-sub" aria-labelledby="role-inherits-title">
      <h3 id="role-inherits-title">Inherited roles</h3>
      {parents.length === 0 ? (
        <p class="muted">This role inherits no other role.</p>
      ) : (
        <ul class="st-chips">
          {parents.map((p) => (
            <li key={p.id} class="st-chip">
              <Link to={`/roles/${p.id}`}>{roleLabel(p, session.multitenant)}</Link>
              <span class="muted"> · {p.acls.length} ACLs</span>
              {props.editable && (
                <Button
                  kind="plain"
                  class="st-chip-remove"
                  disabled={busy}
                  aria-label={`Stop inheriting ${p.name}`}
                  onClick={() =>
                    act(
                      () => api.del(`/roles/${role.id}/inherits/${p.id}`),
                      `${role.name} no longer inherits ${p.name}`,
                    )
                  }
                >
                  Remove
                </Button>
              )}
            </li>
          ))}
        </ul>
      )}
      {props.editable && (
        <RolePicker
          label="Inherit another role"
          action="Add"
          candidates={candidates}
          busy={busy}
          error={error ?? (options.error && `Cannot list the roles: ${options.error}`)}
          onPick={(parent) =>
            act(
              () => api.post(`/roles/${role.id}/inherits`, { role_id: parent.id }),
              `${role.name} now inherits ${parent.name}`,
            )
          }
        />
      )}
    </section>
  );
}
