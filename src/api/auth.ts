// Administrator login, sessions and the current administrator. Failed logins are throttled
// per account and per address (src/auth/throttle.ts), counted in the database so that every
// API process agrees.
import { z } from "zod";
import { beginLogin, throttlePolicy } from "../auth/throttle.ts";
import * as D from "../db/index.ts";
import { DataError } from "../db/errors.ts";
import type { Admin, Ctx, Route } from "./context.ts";
import { ApiError, unauthorized } from "./http.ts";
import { objectBody } from "./resources.ts";

export const SESSION_COOKIE = "qvd_session";

const LoginBody = z.object({
  tenant: z.string().max(80).optional(),
  name: z.string().min(1).max(160),
  password: z.string().min(1).max(1024),
});
const PasswordBody = z.object({
  current_password: z.string().min(1).max(1024),
  password: z.string().min(8, "must have at least 8 characters").max(1024),
});

/** The session token of a request: `Authorization: Bearer …`, else the session cookie. */
export function tokenOf(request: Request): string | undefined {
  const auth = request.headers.get("authorization");
  const m = auth ? /^Bearer\s+([A-Za-z0-9_-]{20,100})\s*$/i.exec(auth) : null;
  if (m) return m[1];
  const cookie = request.headers.get("cookie") ?? "";
  for (const part of cookie.split(";")) {
    const [k, ...v] = part.trim().split("=");
    if (k === SESSION_COOKIE) return v.join("=");
  }
  return undefined;
}

/** Loads the administrator of a session token, with their effective ACLs. */
export async function authenticate(ctx: Pick<Ctx, "sql" | "cfg">, token: string | undefined): Promise<Admin> {
  if (!token) throw unauthorized();
  const s = await D.useSession(ctx.sql, token, ctx.cfg.get("api.session.ttl"));
  if (!s) throw unauthorized("your session has expired or was ended; log in again");
  const row = await D.get(ctx.sql, D.administrators, D.ALL_TENANTS, s.administratorId);
  const acls = await D.administratorEffectiveAcls(ctx.sql, row.id);
  return {
    id: row.id,
    name: row.name,
    tenant_id: row.tenant_id,
    tenant_name: row.tenant_name,
    superadmin: row.superadmin,
    acls,
    sessionId: s.sessionId,
    token,
  };
}

/**
 * Splits `name@tenant` and finds the tenant; without one, the global scope then `default`. A
 * tenant that does not exist stays in the list as id -1 (nobody), so that a login costs the
 * same password checks whether the tenant and the account exist or not.
 */
async function resolveTenants(
  ctx: Ctx,
  name: string,
  tenant?: string,
): Promise<{ name: string; tenants: { id: number; name: string; blocked: boolean }[] }> {
  let n = name;
  let t = tenant;
  const at = name.lastIndexOf("@");
  if (t === undefined && at > 0) [n, t] = [name.slice(0, at), name.slice(at + 1)];
  const names = t !== undefined ? [t] : ctx.cfg.get("wat.multitenant") ? ["*"] : ["*", "default"];
  const rows = await D.tenantsByName(ctx.sql, names);
  const tenants = names.map((x) => rows.find((r) => r.name === x) ?? { id: -1, name: x, blocked: false });
  return { name: ctx.cfg.get("model.user.login.case-sensitive") ? n : n.toLowerCase(), tenants };
}

async function sessionOf(ctx: Ctx, admin: Admin) {
  return {
    administrator: await D.get(ctx.sql, D.administrators, D.ALL_TENANTS, admin.id),
    acls: [...admin.acls].sort(),
    multitenant: ctx.cfg.get("wat.multitenant"),
  };
}

function cookieFor(ctx: Ctx, token: string, maxAge: number): string {
  const secure = ctx.url.protocol === "https:" ? "; Secure" : "";
  return `${SESSION_COOKIE}=${token}; HttpOnly; SameSite=Strict; Path=/${secure}; Max-Age=${maxAge}`;
}

async function login(ctx: Ctx) {
  const b = D.validate(LoginBody, objectBody(ctx.body));
  const { name, tenants } = await resolveTenants(ctx, b.name, b.tenant);
  const account = `${b.tenant ?? tenants[0]!.name}/${name}`;
  ctx.audited.object_name = account;
  ctx.audited.arguments = { tenant: b.tenant, name: b.name };
  // The try takes its slot before the password is checked (parallel tries are counted). One
  // key per account however it is spelled: without tenants, "bob", "bob@default" and "bob@*"
  // all try the same password, so they count as one.
  const throttled = ctx.cfg.get("wat.multitenant") ? account : name;
  const gate = await beginLogin(ctx.sql, throttlePolicy(ctx.cfg), {
    service: "api",
    account: throttled,
    address: ctx.address,
  });
  if (!gate.ok) {
    ctx.set.headers["retry-after"] = String(gate.retryAfterS);
    throw new ApiError(`too many failed logins; try again in ${gate.retryAfterS} seconds`, 429);
  }
  let admin: D.AdministratorRow | undefined;
  let tenant: { name: string; blocked: boolean } | undefined;
  try {
    // Every candidate tenant is checked, found or not: the same cost for unknown accounts.
    for (const t of tenants) {
      const a = await D.verifyAdministrator(ctx.sql, t.id, name, b.password);
      if (a && !admin) [admin, tenant] = [a, t];
    }
  } finally {
    await gate.done(admin !== undefined);
  }
  if (!admin) throw new ApiError("wrong tenant, name or password", 401);
  if (tenant!.blocked) throw new ApiError(`tenant ${tenant!.name} is blocked`, 403);
  if (admin.blocked) throw new ApiError("this administrator is blocked", 403);
  ctx.audited.object_name = `${admin.tenant_name}/${admin.name}`;
  ctx.audited.object_id = admin.id;
  ctx.audited.administrator_id = admin.id;
  ctx.audited.administrator_name = admin.name;
  ctx.audited.tenant_id = admin.tenant_id;
  ctx.audited.tenant_name = admin.tenant_name;
  ctx.audited.superadmin = admin.superadmin;
  const ttl = ctx.cfg.get("api.session.ttl");
  const s = await D.createSession(ctx.sql, {
    administratorId: admin.id,
    ttlSeconds: ttl,
    address: ctx.address,
    source: ctx.source,
  });
  ctx.set.headers["set-cookie"] = cookieFor(ctx, s.token, ttl);
  const acls = [...(await D.administratorEffectiveAcls(ctx.sql, admin.id))].sort();
  return {
    token: s.token,
    expires_at: s.expires_at,
    administrator: admin,
    acls,
    multitenant: ctx.cfg.get("wat.multitenant"),
  };
}

export const AUTH_ROUTES: Route[] = [
  {
    method: "POST",
    path: "/login",
    tag: "session",
    public: true,
    body: LoginBody,
    summary: "Log in: answers a bearer token and sets an HttpOnly session cookie. `name@tenant` names the tenant too.",
    audit: { action: "login", object: "session" },
    handler: login,
  },
  {
    method: "GET",
    path: "/login",
    tag: "session",
    public: true,
    summary:
      "Before logging in: the tenancy mode (a tenant is asked for when multitenant) and whether the request already has a live session",
    handler: async (ctx) => {
      const admin = await authenticate(ctx, tokenOf(ctx.request)).catch(() => undefined);
      // With a live session, the session itself (as GET /session): one round trip for the WAT.
      return {
        multitenant: ctx.cfg.get("wat.multitenant"),
        logged_in: !!admin,
        ...(admin ? { session: await sessionOf(ctx, admin) } : {}),
      };
    },
  },
  {
    method: "POST",
    path: "/logout",
    tag: "session",
    acl: [],
    summary: "End this session",
    audit: { action: "logout", object: "session" },
    handler: async (ctx) => {
      await D.endSession(ctx.sql, ctx.admin.token);
      ctx.set.headers["set-cookie"] = cookieFor(ctx, "", 0);
      return { ok: true };
    },
  },
  {
    method: "GET",
    path: "/session",
    tag: "session",
    acl: [],
    summary: "The current administrator, their ACLs and the tenancy mode",
    handler: (ctx) => sessionOf(ctx, ctx.admin),
  },
  {
    method: "PUT",
    path: "/session/password",
    tag: "session",
    acl: [],
    body: PasswordBody,
    summary: "Change your own password (needs the current one)",
    audit: { action: "administrator.update_own_password", object: "administrator" },
    handler: async (ctx) => {
      const b = D.validate(PasswordBody, objectBody(ctx.body));
      ctx.audited.object_id = ctx.admin.id;
      if (!(await D.verifyAdministrator(ctx.sql, ctx.admin.tenant_id, ctx.admin.name, b.current_password)))
        throw new DataError("current_password: wrong password", 422, "current_password");
      await D.update(ctx.sql, D.administrators, D.ALL_TENANTS, ctx.admin.id, { password: b.password });
      // Whoever knew the old password is logged out everywhere but here.
      const ended = await D.endSessionsOf(ctx.sql, ctx.admin.id, ctx.admin.token);
      return { ok: true, sessions_ended: ended };
    },
  },
  {
    method: "GET",
    path: "/sessions",
    tag: "session",
    acl: ["session.see"],
    summary: "Live administrator sessions",
    handler: async (ctx) => ({ items: await D.listSessions(ctx.sql, ctx.scope.tenantId ?? undefined) }),
  },
  {
    method: "DELETE",
    path: "/sessions/:sid",
    tag: "session",
    acl: ["session.delete"],
    summary: "End an administrator's session",
    audit: { action: "session.delete", object: "session" },
    handler: async (ctx) => {
      ctx.audited.object_name = ctx.params.sid;
      if (!(await D.endSessionById(ctx.sql, ctx.params.sid!, ctx.scope.tenantId ?? undefined)))
        throw new DataError("no such session", 404);
      return { ok: true };
    },
  },
];
