// An administrator's roles (assign, take away) and their effective ACLs (shown on the
// administrator's detail page).
export function AdminRoles(props: { administrator: { id: number; name: string; [k: string]: unknown }; onChange?: () => void }) {
  return <p class="muted">Roles of {props.administrator.name}: not built yet.</p>;
}
