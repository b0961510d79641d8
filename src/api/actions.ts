// Actions on objects (start/stop/block…), role and ACL editing, property values, cluster
// configuration and dashboard statistics. Single-object actions live at
// POST /<objects>/:id/<action>; the same action on every object matching a filter at
// POST /<objects>/actions/<action>?<filter>, with a result per object.
import { z } from "zod";
import { currentIdentityRules, identityValueProblem, isIdentityProperty } from "../auth/identity.ts";
import { tenantConfig } from "../auth/chain.ts";
import { isConfigKey, KEYS, type ConfigKey } from "../config.ts";
import * as D from "../db/index.ts";
import { declareHostLost, setHostDrain } from "../db/cluster.ts";
import { clearZombie } from "../db/lifecycle.ts";
import { DataError, ValidationError } from "../db/errors.ts";
import type { ObjectDef } from "../db/objects.ts";
import type { Ctx, Route } from "./context.ts";
import {
  forEachMatching,
  idParam,
  noEscalation,
  noPowerOverAdministrator,
  noPowerOverRole,
  objectBody,
} from "./resources.ts";

interface ActionSpec {
  path: string; // objects path
  def: ObjectDef<any>;
  name: string;
  acl: string;
  summary: string;
  body?: z.ZodObject;
  run: (ctx: Ctx, objId: number, body: Record<string, unknown>) => Promise<unknown>;
}

const alive = (ctx: Ctx) => ({ aliveWithinS: D.aliveWithinS(ctx.cfg) });
const BlockBody = z.object({ reason: z.string().max(1000).optional() });
const LostBody = z.object({ reason: z.string().trim().min(1, "say why the node is declared lost").max(1000) });
const ExpiryBody = z.object({
  soft_at: z.coerce.date().nullable().optional(),
  hard_at: z.coerce.date().nullable().optional(),
});

const ACTIONS: ActionSpec[] = [
  {
    path: "vms",
    def: D.vms,
    name: "start",
    acl: "vm.start",
    summary: "Start a VM: choose a node if it has none, command the start",
    run: (ctx, vm) => D.startVm(ctx.sql, ctx.scope, vm, alive(ctx)),
  },
  {
    path: "vms",
    def: D.vms,
    name: "stop",
    acl: "vm.stop",
    summary: "Stop a VM",
    run: (ctx, vm) => D.stopVm(ctx.sql, ctx.scope, vm),
  },
  {
    path: "vms",
    def: D.vms,
    name: "disconnect",
    acl: "vm.disconnect",
    summary: "Disconnect the VM's user",
    run: (ctx, vm) => D.disconnectVmUser(ctx.sql, ctx.scope, vm),
  },
  {
    path: "vms",
    def: D.vms,
    name: "block",
    acl: "vm.block",
    summary: "Block a VM (it cannot be started or connected to)",
    body: BlockBody,
    run: (ctx, vm, b) =>
      D.setVmBlocked(ctx.sql, ctx.scope, vm, true, (b.reason as string | undefined) ?? "blocked by an administrator"),
  },
  {
    path: "vms",
    def: D.vms,
    name: "expire",
    acl: "vm.update.expiration",
    body: ExpiryBody,
    summary:
      "Set when a running VM's user is warned (soft_at) and when it is stopped (hard_at); null clears, absent keeps",
    run: (ctx, vm, b) => D.setVmExpiry(ctx.sql, ctx.scope, vm, b as { soft_at?: Date | null; hard_at?: Date | null }),
  },
  {
    path: "vms",
    def: D.vms,
    name: "unblock",
    acl: "vm.block",
    summary: "Unblock a VM",
    run: (ctx, vm) => D.setVmBlocked(ctx.sql, ctx.scope, vm, false),
  },
  {
    path: "vms",
    def: D.vms,
    name: "clear_zombie",
    acl: "vm.stop",
    summary: "Mark stopped a zombie VM whose node is lost, stopped or gone (on a live node, stop it: the node retries)",
    run: (ctx, vm) => clearZombie(ctx.sql, ctx.scope, vm),
  },
  {
    path: "users",
    def: D.users,
    name: "block",
    acl: "user.block",
    summary: "Block a user (cannot log in)",
    run: (ctx, u) => D.setUserBlocked(ctx.sql, ctx.scope, u, true),
  },
  {
    path: "users",
    def: D.users,
    name: "unblock",
    acl: "user.block",
    summary: "Unblock a user",
    run: (ctx, u) => D.setUserBlocked(ctx.sql, ctx.scope, u, false),
  },
  {
    path: "users",
    def: D.users,
    name: "disconnect",
    acl: "user.disconnect",
    summary: "Disconnect every session of a user",
    run: async (ctx, u) => ({ disconnected: await D.disconnectUser(ctx.sql, ctx.scope, u) }),
  },
  {
    path: "users",
    def: D.users,
    name: "revoke_tokens",
    acl: "user.update.tokens",
    summary: "Revoke every L7R bearer token of a user (their clients must log in with the password again)",
    run: async (ctx, u) => ({ revoked: await D.revokeUserTokens(ctx.sql, ctx.scope, u) }),
  },
  {
    path: "hosts",
    def: D.hosts,
    name: "block",
    acl: "host.block",
    summary: "Block a node: no new desktops there",
    run: (ctx, h) => D.setHostBlocked(ctx.sql, ctx.scope, h, true),
  },
  {
    path: "hosts",
    def: D.hosts,
    name: "unblock",
    acl: "host.block",
    summary: "Unblock a node",
    run: (ctx, h) => D.setHostBlocked(ctx.sql, ctx.scope, h, false),
  },
  {
    path: "hosts",
    def: D.hosts,
    name: "stop_vms",
    acl: "host.stop_vms",
    summary: "Stop every VM of a node",
    run: async (ctx, h) => ({ stopping: await D.stopHostVms(ctx.sql, ctx.scope, h) }),
  },
  // Whole nodes: superadministrators only (the data layer refuses a tenant's administrator).
  {
    path: "hosts",
    def: D.hosts,
    name: "declare_lost",
    acl: "host.stop_vms",
    body: LostBody,
    summary:
      "Declare a node lost (dead, or to be treated so): its VMs are released and can start elsewhere; a node that is in fact alive kills its desktops and rejoins",
    run: async (ctx, h, b) => {
      const res = await declareHostLost(ctx.sql, ctx.scope, h, b.reason as string);
      ctx.audited.arguments = { reason: b.reason, released_vms: res.vms };
      return { released_vms: res.vms };
    },
  },
  {
    path: "hosts",
    def: D.hosts,
    name: "drain",
    acl: "host.block",
    summary: "Drain a node: no new desktops there, and its users move to other nodes at their next connect",
    run: (ctx, h) => setHostDrain(ctx.sql, ctx.scope, h, true),
  },
  {
    path: "hosts",
    def: D.hosts,
    name: "undrain",
    acl: "host.block",
    summary: "End a node's drain",
    run: (ctx, h) => setHostDrain(ctx.sql, ctx.scope, h, false),
  },
  {
    path: "dis",
    def: D.dis,
    name: "block",
    acl: "di.block",
    summary: "Block an image (VMs will not start from it)",
    run: async (ctx, d) => void (await D.update(ctx.sql, D.dis, ctx.scope, d, { blocked: true })),
  },
  {
    path: "dis",
    def: D.dis,
    name: "unblock",
    acl: "di.block",
    summary: "Unblock an image",
    run: async (ctx, d) => void (await D.update(ctx.sql, D.dis, ctx.scope, d, { blocked: false })),
  },
];

function actionRoutes(a: ActionSpec): Route[] {
  const kind = a.def.kind;
  const body = (ctx: Ctx) => (a.body ? D.validate(a.body, objectBody(ctx.body)) : objectBody(ctx.body));
  return [
    {
      method: "POST",
      path: `/${a.path}/:id/${a.name}`,
      tag: a.path,
      acl: [a.acl],
      summary: a.summary,
      body: a.body,
      audit: { action: `${kind}.${a.name}`, object: kind },
      handler: async (ctx) => {
        const objId = idParam(ctx);
        ctx.audited.object_id = objId;
        const res = await a.run(ctx, objId, body(ctx));
        const row = await D.get(ctx.sql, a.def, ctx.scope, objId);
        ctx.audited.object_name = row.name as string;
        if (typeof row.tenant_id === "number") ctx.audited.tenant_id = row.tenant_id;
        return res === undefined ? row : { ...(res as object), [kind]: row };
      },
    },
    {
      method: "POST",
      path: `/${a.path}/actions/${a.name}`,
      tag: a.path,
      acl: [a.acl],
      body: a.body,
      query: "list",
      summary: `${a.summary}, for every ${kind} matching the filter (as for the list; all=true for every one)`,
      audit: { action: `${kind}.${a.name}_many`, object: kind },
      handler: (ctx) => {
        const b = body(ctx);
        return forEachMatching(ctx, a.def, `${kind}.${a.name}`, (objId) => a.run(ctx, objId, b));
      },
    },
  ];
}

const TagBody = z.object({
  tag: z.string(),
  expire_soft_s: z.number().int().min(0).nullable().optional(),
  expire_hard_s: z.number().int().min(0).nullable().optional(),
});
const AclBody = z.object({ acl: z.string(), positive: z.boolean().optional() });
const RoleRef = z.object({ role_id: z.number().int() });
const PropertyValue = z.object({ value: z.string().max(32768) });
const ConfigValue = z.object({ value: z.string().max(4096), tenant_id: z.number().int().min(0).optional() });

/** Identity properties (qvd.vm.user.uid…) need an ACL of their own besides the object's update. */
const propertyAcls = (acl: string) => (ctx: Ctx) =>
  isIdentityProperty(ctx.params?.key ?? "") ? [`${acl}.update`, "property.identity"] : [`${acl}.update`];
const TARGET_DEFS: Record<D.PropertyTarget, ObjectDef<any>> = {
  user: D.users,
  vm: D.vms,
  host: D.hosts,
  osf: D.osfs,
  di: D.dis,
};

const PROPERTY_OBJECTS: [string, D.PropertyTarget, string][] = [
  ["users", "user", "user"],
  ["vms", "vm", "vm"],
  ["hosts", "host", "host"],
  ["osfs", "osf", "osf"],
  ["dis", "di", "di"],
];

/** The tenant a configuration request is about: the admin's own, or any existing one for a superadmin. */
async function configTenant(ctx: Ctx, given: number | undefined): Promise<number> {
  if (ctx.scope.tenantId === null) {
    if (given !== undefined && !(await D.find(ctx.sql, D.tenants, ctx.scope, given)))
      throw new DataError("no such tenant", 404);
    return given ?? 0;
  }
  if (given !== undefined && given !== ctx.scope.tenantId) throw new DataError("no such tenant", 404);
  return ctx.scope.tenantId;
}

function clusterKey(key: string): ConfigKey {
  if (!isConfigKey(key) || KEYS[key].scope !== "cluster")
    throw new DataError(`no cluster setting ${JSON.stringify(key)}`, 404);
  return key;
}

const tenantParam = (ctx: Ctx) => {
  const t = ctx.url.searchParams.get("tenant_id");
  if (t === null) return undefined;
  if (!/^\d{1,9}$/.test(t)) throw new ValidationError("tenant_id", "must be a tenant id");
  return Number(t);
};

export const ACTION_ROUTES: Route[] = [
  ...ACTIONS.flatMap(actionRoutes),

  // Users' second factor (TOTP): a new secret and its otpauth:// URI, shown once.
  {
    method: "POST",
    path: "/users/:id/totp",
    tag: "users",
    acl: ["user.update.totp"],
    summary: "Enrol a user in TOTP (replaces any secret): returns the secret and its otpauth:// URI",
    audit: { action: "user.enrol_totp", object: "user" },
    handler: async (ctx) => {
      ctx.audited.object_id = idParam(ctx);
      // The user's tenant may name its own issuer.
      const user = await D.get(ctx.sql, D.users, ctx.scope, idParam(ctx));
      const issuer = (await tenantConfig(ctx.sql, ctx.cfg, user.tenant_id)).get("auth.totp.issuer");
      const { secret, uri } = await D.enrolUserTotp(ctx.sql, ctx.scope, idParam(ctx), issuer);
      return { secret, uri, user: await D.get(ctx.sql, D.users, ctx.scope, idParam(ctx)) };
    },
  },
  {
    method: "DELETE",
    path: "/users/:id/totp",
    tag: "users",
    acl: ["user.update.totp"],
    summary: "Remove a user's TOTP secret (the password alone logs in again)",
    audit: { action: "user.remove_totp", object: "user" },
    handler: async (ctx) => {
      ctx.audited.object_id = idParam(ctx);
      const removed = await D.removeUserTotp(ctx.sql, ctx.scope, idParam(ctx));
      return { removed, user: await D.get(ctx.sql, D.users, ctx.scope, idParam(ctx)) };
    },
  },

  // Image tags.
  {
    method: "POST",
    path: "/dis/:id/tags",
    tag: "dis",
    acl: ["di.tag"],
    body: TagBody,
    summary:
      "Put a tag on an image (it moves from the OSF's other image); running VMs on the old image get the image's (or the given) soft/hard expiry",
    audit: { action: "di.tag", object: "di" },
    handler: async (ctx) => {
      const { tag, expire_soft_s, expire_hard_s } = D.validate(TagBody, objectBody(ctx.body));
      ctx.audited.object_id = idParam(ctx);
      const previous = await D.tagDi(ctx.sql, ctx.scope, idParam(ctx), tag, {
        soft_s: expire_soft_s,
        hard_s: expire_hard_s,
      });
      return { di: await D.get(ctx.sql, D.dis, ctx.scope, idParam(ctx)), previous_di_id: previous ?? null };
    },
  },
  {
    method: "DELETE",
    path: "/dis/:id/tags/:tag",
    tag: "dis",
    acl: ["di.tag"],
    summary: "Remove a tag from an image (not head, default or the version)",
    audit: { action: "di.untag", object: "di" },
    handler: async (ctx) => {
      ctx.audited.object_id = idParam(ctx);
      ctx.audited.arguments = { tag: ctx.params.tag };
      if (!(await D.untagDi(ctx.sql, ctx.scope, idParam(ctx), ctx.params.tag!)))
        throw new DataError(`image has no tag ${JSON.stringify(ctx.params.tag)}`, 404);
      return D.get(ctx.sql, D.dis, ctx.scope, idParam(ctx));
    },
  },

  // Roles: grants, denials, inheritance; administrators: roles and effective ACLs.
  {
    method: "GET",
    path: "/acls",
    tag: "roles",
    acl: [],
    summary: "The ACL catalogue",
    handler: async (ctx) => ({ items: await D.listAcls(ctx.sql) }),
  },
  {
    method: "GET",
    path: "/roles/:id/acls",
    tag: "roles",
    acl: ["role.see"],
    summary:
      "A role's effective ACLs (items) and the roles it inherits with theirs (inherits: where inherited ACLs come from)",
    handler: async (ctx) => {
      await D.get(ctx.sql, D.roles, ctx.scope, idParam(ctx));
      return {
        items: [...(await D.roleEffectiveAcls(ctx.sql, idParam(ctx)))].sort(),
        inherits: await D.parentRolesWithAcls(ctx.sql, idParam(ctx)),
      };
    },
  },
  {
    method: "PUT",
    path: "/roles/:id/acls",
    tag: "roles",
    acl: ["role.assign_acl"],
    body: AclBody,
    summary: "Grant (positive, the default) or deny an ACL in a role",
    audit: { action: "role.assign_acl", object: "role" },
    handler: async (ctx) => {
      const b = D.validate(AclBody, objectBody(ctx.body));
      ctx.audited.object_id = idParam(ctx);
      await D.get(ctx.sql, D.roles, ctx.scope, idParam(ctx)); // another tenant's role: 404 first
      if (b.positive ?? true) noEscalation(ctx, [b.acl]);
      else await noPowerOverRole(ctx, idParam(ctx), "deny ACLs in"); // a denial demotes whoever holds the role
      await D.setRoleAcl(ctx.sql, ctx.scope, idParam(ctx), b.acl, b.positive ?? true);
      return D.get(ctx.sql, D.roles, ctx.scope, idParam(ctx));
    },
  },
  {
    method: "DELETE",
    path: "/roles/:id/acls/:acl",
    tag: "roles",
    acl: ["role.assign_acl"],
    summary: "Remove a role's own grant or denial of an ACL",
    audit: { action: "role.unassign_acl", object: "role" },
    handler: async (ctx) => {
      ctx.audited.object_id = idParam(ctx);
      await noPowerOverRole(ctx, idParam(ctx), "remove grants from"); // removing a grant demotes whoever holds the role
      noEscalation(ctx, [ctx.params.acl!]); // removing a denial can give the ACL back
      if (!(await D.clearRoleAcl(ctx.sql, ctx.scope, idParam(ctx), ctx.params.acl!)))
        throw new DataError(`the role has no own grant or denial of ${ctx.params.acl}`, 404);
      return D.get(ctx.sql, D.roles, ctx.scope, idParam(ctx));
    },
  },
  {
    method: "POST",
    path: "/roles/:id/inherits",
    tag: "roles",
    acl: ["role.assign_role"],
    body: RoleRef,
    summary: "Make a role inherit another",
    audit: { action: "role.assign_role", object: "role" },
    handler: async (ctx) => {
      const b = D.validate(RoleRef, objectBody(ctx.body));
      ctx.audited.object_id = idParam(ctx);
      await D.get(ctx.sql, D.roles, ctx.scope, idParam(ctx));
      await D.get(ctx.sql, D.roles, ctx.scope, b.role_id);
      noEscalation(ctx, await D.roleEffectiveAcls(ctx.sql, b.role_id));
      await D.addInheritance(ctx.sql, ctx.scope, idParam(ctx), b.role_id);
      return D.get(ctx.sql, D.roles, ctx.scope, idParam(ctx));
    },
  },
  {
    method: "DELETE",
    path: "/roles/:id/inherits/:parent",
    tag: "roles",
    acl: ["role.assign_role"],
    summary: "Stop a role inheriting another",
    audit: { action: "role.unassign_role", object: "role" },
    handler: async (ctx) => {
      ctx.audited.object_id = idParam(ctx);
      await noPowerOverRole(ctx, idParam(ctx), "change the inheritance of");
      if (!(await D.removeInheritance(ctx.sql, ctx.scope, idParam(ctx), idParam(ctx, "parent"))))
        throw new DataError("the role does not inherit that role", 404);
      return D.get(ctx.sql, D.roles, ctx.scope, idParam(ctx));
    },
  },
  {
    method: "GET",
    path: "/administrators/:id/acls",
    tag: "administrators",
    acl: ["administrator.see"],
    summary: "An administrator's effective ACLs (items) and their roles with each one's (roles)",
    handler: async (ctx) => {
      await D.get(ctx.sql, D.administrators, ctx.scope, idParam(ctx));
      return {
        items: [...(await D.administratorEffectiveAcls(ctx.sql, idParam(ctx)))].sort(),
        roles: await D.administratorRolesWithAcls(ctx.sql, idParam(ctx)),
      };
    },
  },
  {
    method: "POST",
    path: "/administrators/:id/roles",
    tag: "administrators",
    acl: ["administrator.assign_role"],
    body: RoleRef,
    summary: "Give an administrator a role",
    audit: { action: "administrator.assign_role", object: "administrator" },
    handler: async (ctx) => {
      const b = D.validate(RoleRef, objectBody(ctx.body));
      ctx.audited.object_id = idParam(ctx);
      await D.get(ctx.sql, D.administrators, ctx.scope, idParam(ctx));
      await D.get(ctx.sql, D.roles, ctx.scope, b.role_id);
      noEscalation(ctx, await D.roleEffectiveAcls(ctx.sql, b.role_id));
      await D.assignRole(ctx.sql, ctx.scope, idParam(ctx), b.role_id);
      return D.get(ctx.sql, D.administrators, ctx.scope, idParam(ctx));
    },
  },
  {
    method: "DELETE",
    path: "/administrators/:id/roles/:role",
    tag: "administrators",
    acl: ["administrator.assign_role"],
    summary: "Take a role from an administrator",
    audit: { action: "administrator.unassign_role", object: "administrator" },
    handler: async (ctx) => {
      ctx.audited.object_id = idParam(ctx);
      await noPowerOverAdministrator(ctx, idParam(ctx), "take roles from");
      if (!(await D.unassignRole(ctx.sql, ctx.scope, idParam(ctx), idParam(ctx, "role"))))
        throw new DataError("the administrator does not have that role", 404);
      return D.get(ctx.sql, D.administrators, ctx.scope, idParam(ctx));
    },
  },

  // Custom property values on objects.
  ...PROPERTY_OBJECTS.flatMap(([path, target, acl]): Route[] => [
    {
      method: "GET",
      path: `/${path}/:id/properties`,
      tag: path,
      acl: [`${acl}.see`],
      summary: `Property values of a ${target}`,
      handler: (ctx) => D.propertyValues(ctx.sql, ctx.scope, target, idParam(ctx)),
    },
    {
      method: "PUT",
      path: `/${path}/:id/properties/:key`,
      tag: path,
      acl: propertyAcls(acl),
      body: PropertyValue,
      summary: `Set a property value of a ${target}`,
      audit: { action: `${target}.set_property`, object: target },
      handler: async (ctx) => {
        const b = D.validate(PropertyValue, objectBody(ctx.body));
        ctx.audited.object_id = idParam(ctx);
        if (isIdentityProperty(ctx.params.key!)) {
          await D.get(ctx.sql, TARGET_DEFS[target], ctx.scope, idParam(ctx)); // another tenant's object: 404 first
          const problem = identityValueProblem(ctx.params.key!, b.value, await currentIdentityRules(ctx.sql, ctx.cfg));
          if (problem) throw new ValidationError("value", `${ctx.params.key}: ${problem}`);
        }
        await D.setPropertyValue(ctx.sql, ctx.scope, target, idParam(ctx), ctx.params.key!, b.value);
        return D.propertyValues(ctx.sql, ctx.scope, target, idParam(ctx));
      },
    },
    {
      method: "DELETE",
      path: `/${path}/:id/properties/:key`,
      tag: path,
      acl: propertyAcls(acl),
      summary: `Remove a property value of a ${target}`,
      audit: { action: `${target}.delete_property`, object: target },
      handler: async (ctx) => {
        ctx.audited.object_id = idParam(ctx);
        ctx.audited.arguments = { key: ctx.params.key };
        await D.deletePropertyValue(ctx.sql, ctx.scope, target, idParam(ctx), ctx.params.key!);
        return D.propertyValues(ctx.sql, ctx.scope, target, idParam(ctx));
      },
    },
  ]),

  // Cluster configuration (the `configs` table), per tenant over the global scope.
  {
    method: "GET",
    path: "/configs",
    tag: "configs",
    acl: ["config.see"],
    query: ["tenant_id"],
    summary: "Cluster settings: effective value, default and source (?tenant_id= for a tenant's view)",
    handler: async (ctx) => {
      const tenant = await configTenant(ctx, tenantParam(ctx));
      const rows = await D.listConfigRows(ctx.sql, tenant);
      // Secrets (auth.ldap.bind_password) can be set but never read back.
      const items = D.effectiveConfigs(rows, tenant).map((e) => ({
        ...e,
        doc: KEYS[e.key].doc,
        secret: KEYS[e.key].secret,
        tenant: KEYS[e.key].tenant,
      }));
      return { tenant_id: tenant, items };
    },
  },
  {
    method: "PUT",
    path: "/configs/:key",
    tag: "configs",
    acl: ["config.update"],
    body: ConfigValue,
    summary: "Set a cluster setting (globally, or for a tenant with tenant_id)",
    audit: { action: "config.set", object: "config" },
    handler: async (ctx) => {
      // The audit entry shows the value of a known, non-secret key only (a mistyped key may be a
      // secret's), also when the request fails.
      const shown = isConfigKey(ctx.params.key!) && !KEYS[ctx.params.key].secret;
      if (!shown && ctx.body && typeof ctx.body === "object" && "value" in ctx.body)
        ctx.audited.arguments = { ...ctx.body, value: "********" };
      const b = D.validate(ConfigValue, objectBody(ctx.body));
      const tenant = await configTenant(ctx, b.tenant_id);
      const key = clusterKey(ctx.params.key!);
      ctx.audited.object_name = key;
      ctx.audited.tenant_id = tenant;
      return D.maskedConfigRow(await D.setConfig(ctx.sql, tenant, key, b.value));
    },
  },
  {
    method: "DELETE",
    path: "/configs/:key",
    tag: "configs",
    acl: ["config.update"],
    query: ["tenant_id"],
    summary: "Remove an override (?tenant_id= for a tenant's)",
    audit: { action: "config.delete", object: "config" },
    handler: async (ctx) => {
      const tenant = await configTenant(ctx, tenantParam(ctx));
      ctx.audited.object_name = ctx.params.key;
      ctx.audited.tenant_id = tenant;
      if (!(await D.deleteConfig(ctx.sql, tenant, clusterKey(ctx.params.key!))))
        throw new DataError(`no override of ${ctx.params.key} here`, 404);
      return { deleted: ctx.params.key };
    },
  },

  // Dashboard.
  {
    method: "GET",
    path: "/stats",
    tag: "stats",
    acl: ["stats.see"],
    summary: "Counts for the dashboard",
    handler: (ctx) => D.statistics(ctx.sql, ctx.scope),
  },
];
