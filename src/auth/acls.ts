// The ACL catalogue and the built-in roles. ACLs are named permissions `object.verb`, with
// `object.update.field` where one field needs its own right (a user's password). `db init`
// and `db migrate` synchronise this list into the `acls` table and the built-in roles into
// `roles` (tenant 0, builtin), so upgrading the binary upgrades the catalogue.

type Catalogue = Record<string, string>;

const crud = (obj: string, label: string): Catalogue => ({
  [`${obj}.see`]: `List and view ${label}`,
  [`${obj}.create`]: `Create ${label}`,
  [`${obj}.update`]: `Change ${label}`,
  [`${obj}.delete`]: `Delete ${label}`,
});

export const ACLS: Catalogue = {
  ...crud("tenant", "tenants"),
  "tenant.block": "Block and unblock tenants",
  ...crud("administrator", "administrators"),
  "administrator.update.password": "Change another administrator's password",
  "administrator.assign_role": "Assign roles to administrators",
  ...crud("role", "roles"),
  "role.assign_acl": "Grant and deny ACLs in roles",
  "role.assign_role": "Make roles inherit other roles",
  ...crud("user", "users"),
  "user.update.password": "Set users' passwords",
  "user.update.totp": "Enrol or reset users' second factor",
  "user.block": "Block and unblock users",
  "user.disconnect": "Disconnect all sessions of a user",
  "user.update.tokens": "Revoke users' L7R bearer tokens",
  ...crud("vm", "virtual machines"),
  "vm.update.di_tag": "Change which image tag a VM uses",
  "vm.update.expiration": "Set VMs' expiry times",
  "vm.start": "Start VMs",
  "vm.stop": "Stop VMs",
  "vm.disconnect": "Disconnect the user of a VM",
  "vm.block": "Block and unblock VMs",
  ...crud("osf", "OS flavours"),
  ...crud("di", "disk images"),
  "di.tag": "Tag and untag disk images",
  "di.block": "Block and unblock disk images",
  ...crud("host", "nodes"),
  "host.block": "Block and unblock nodes",
  "host.stop_vms": "Stop every VM of a node",
  ...crud("property", "custom property definitions"),
  "property.identity":
    "Set identity properties (qvd.vm.user.uid, gid, home, groups): who a desktop user is in the desktop",
  "config.see": "View cluster configuration",
  "config.update": "Change cluster configuration",
  "audit.see": "Read the audit log",
  "session.see": "List administrator sessions",
  "session.delete": "End administrator sessions",
  "stats.see": "View dashboard statistics",
};

export type AclName = keyof typeof ACLS;

const all = Object.keys(ACLS);
// property.identity: what a user owns in the desktop is the farm's decision, not a tenant's.
const notTenantWide = (a: string) =>
  a !== "property.identity" &&
  !a.startsWith("tenant.") &&
  !a.startsWith("session.") &&
  !/^host\.(create|update|delete|block|stop_vms)$/.test(a);

/** Built-in roles: name → (description, granted ACLs). Global (tenant 0) and read-only. */
export const BUILTIN_ROLES: Record<string, { description: string; acls: string[] }> = {
  Superadmin: { description: "Everything, in every tenant", acls: all },
  "Tenant administrator": { description: "Everything within one tenant", acls: all.filter(notTenantWide) },
  Operator: {
    description: "Starts, stops and blocks desktops and users; reads the rest",
    acls: [
      "vm.see",
      "vm.start",
      "vm.stop",
      "vm.disconnect",
      "vm.block",
      "user.see",
      "user.block",
      "user.disconnect",
      "osf.see",
      "di.see",
      "host.see",
      "stats.see",
    ],
  },
  Auditor: { description: "Reads everything, changes nothing", acls: all.filter((a) => a.endsWith(".see")) },
};
