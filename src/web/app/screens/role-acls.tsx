// The ACL editor of a role (shown on the role's detail page): the ACL tree by object and
// action with own, inherited and denied grants, and the inheritance editor.
export function RoleAclEditor(props: { role: { id: number; name: string; [k: string]: unknown }; onChange?: () => void }) {
  return <p class="muted">ACLs of {props.role.name}: not built yet.</p>;
}
