// An administrator's roles (assign, take away) and their effective ACLs (shown on the
// administrator's detail page).
import { useState } from "preact/hooks";
import { api } from "../api.ts";
import { useSession } from "../session.ts";
import { Button, Confirm, ErrorLine, Link, Loading } from "../ui.tsx";
import { AclTree, Badge } from "./acl-tree.tsx";
import { aclCatalogue, type Acl } from "./acls.ts";
import { useAction, useLoad } from "../load.ts";
import type { RoleWithAcls } from "../../../db/roles.ts";
import { roleLabel, RolePicker, useRoleOptions } from "./role-picker.tsx";

export function AdminRoles(props: {
  administrator: { id: number; name: string; [k: string]: unknown };
  onChange?: () => void;
}) {
  const session = useSession();
  const id = props.administrator.id;
  const loaded = useLoad(
    async (s) => {
      const [acls, catalogue] = await Promise.all([
        api.get<{ items: string[]; roles: RoleWithAcls[] }>(`/administrators/${id}/acls`, s),
        aclCatalogue(),
      ]);
      return { effective: new Set(acls.items), roles: acls.roles, catalogue };
    },
    [id, JSON.stringify(props.administrator.roles)], // and again when the page's row changes
  );
  const editable = session.can("administrator.assign_role");
  const tenantId =
    typeof props.administrator.tenant_id === "number" ? props.administrator.tenant_id : session.administrator.tenant_id;
  const options = useRoleOptions(tenantId, editable);
  const action = useAction();
  const { busy, error } = action;
  const [dropOwn, setDropOwn] = useState<RoleWithAcls>();
  if (!loaded.data)
    return loaded.error ? <ErrorLine error={`Cannot load the roles: ${loaded.error}`} /> : <Loading what="roles" />;
  const { roles, effective, catalogue } = loaded.data;
  const candidates = (options.data ?? []).filter((r) => !roles.some((x) => x.id === r.id));
  const act = (what: () => Promise<unknown>, done: string) =>
    action.act(what, done, async () => {
      await loaded.reload();
      props.onChange?.();
    });
  const name = props.administrator.name;
  const take = (r: RoleWithAcls) =>
    act(() => api.del(`/administrators/${id}/roles/${r.id}`), `${name} no longer has role ${r.name}`);
  return (
    <div class="admin-roles">
      <section class="st-sub" aria-labelledby="admin-roles-title">
        <h3 id="admin-roles-title">Roles</h3>
        {roles.length === 0 ? (
          <p class="muted">{name} has no role, so no ACL: they can log in but see nothing.</p>
        ) : (
          <ul class="st-chips">
            {roles.map((r) => (
              <li key={r.id} class="st-chip">
                {session.can("role.see") ? (
                  <Link to={`/roles/${r.id}`}>{roleLabel(r, session.multitenant)}</Link>
                ) : (
                  roleLabel(r, session.multitenant)
                )}
                <span class="muted"> · {r.acls.length} ACLs</span>
                {editable && (
                  <Button
                    kind="plain"
                    class="st-chip-remove"
                    disabled={busy}
                    aria-label={`Take role ${r.name} from ${name}`}
                    onClick={() => (id === session.administrator.id ? setDropOwn(r) : take(r))}
                  >
                    Remove
                  </Button>
                )}
              </li>
            ))}
          </ul>
        )}
        {editable && (
          <RolePicker
            label="Assign a role"
            action="Assign"
            candidates={candidates}
            busy={busy}
            error={error ?? (options.error && `Cannot list the roles: ${options.error}`)}
            onPick={(role) =>
              act(
                () => api.post(`/administrators/${id}/roles`, { role_id: role.id }),
                `${name} now has role ${role.name}`,
              )
            }
          />
        )}
        {!editable && error && <ErrorLine error={error} />}
      </section>
      {dropOwn && (
        <Confirm
          title="Remove your own role"
          message={`Take role ${dropOwn.name} from yourself? You lose its ACLs at once, perhaps including the right to give it back.`}
          action="Remove"
          danger
          onClose={() => setDropOwn(undefined)}
          onConfirm={async () => void (await take(dropOwn))}
        />
      )}
      <EffectiveAcls title="Effective ACLs" catalogue={catalogue} effective={effective} roles={roles} />
    </div>
  );
}

/** Read-only: the ACLs someone holds, by object, with the roles they come from when known. */
export function EffectiveAcls(props: {
  title: string;
  catalogue: Acl[];
  effective: Set<string>;
  roles?: { name: string; acls: string[] }[];
}) {
  const { effective, roles } = props;
  return (
    <section class="st-sub" aria-label={props.title}>
      <h3>{props.title}</h3>
      <p class="muted">
        {effective.size} of {props.catalogue.length} ACLs.
      </p>
      {effective.size > 0 && (
        <AclTree
          label={props.title}
          catalogue={props.catalogue}
          include={(a) => effective.has(a)}
          counted={(a) => effective.has(a)}
          status={(a) => {
            const from = roles?.filter((r) => r.acls.includes(a)).map((r) => r.name) ?? [];
            return <Badge kind="ok">{from.length ? `From ${from.join(", ")}` : "Granted"}</Badge>;
          }}
        />
      )}
    </section>
  );
}
