// Who a request is: its Authorization header, Basic (a login split by the farm's rules and
// checked by the tenant's auth chain, src/auth/chain.ts) or Bearer (a token that
// create_auth_token made). Failed logins are throttled (src/auth/throttle.ts) and audited.
import { loginRules, resolveLogin, splitLogin, type Authenticate, type ResolvedLogin } from "../auth/chain.ts";
import { beginLogin } from "../auth/throttle.ts";
import type { AuthenticatedUser } from "../auth/user-auth.ts";
import { audit } from "../db/audit.ts";
import { incrementHostCounter } from "../db/hosts.ts";
import * as L from "../db/l7r.ts";
import { useUserToken } from "../db/tokens.ts";
import { verifyUserPassword } from "../db/users.ts";
import type { L7rContext } from "./context.ts";
import { Status } from "./status.ts";

/** What a token keeps of its login's plugin result (see pluginIdentityFrom). */
export const pluginIdentity = (u: AuthenticatedUser) => ({ uid: u.uid, gid: u.gid, home: u.home, params: u.params });

function pluginIdentityFrom(p: Record<string, unknown> | null): Partial<AuthenticatedUser> {
  if (!p) return {};
  const id = (v: unknown) => (typeof v === "number" && Number.isInteger(v) && v > 0 ? v : undefined);
  const params =
    p.params && typeof p.params === "object"
      ? (Object.fromEntries(Object.entries(p.params).filter(([, v]) => typeof v === "string")) as Record<
          string,
          string
        >)
      : undefined;
  return { uid: id(p.uid), gid: id(p.gid), home: typeof p.home === "string" ? p.home : undefined, params };
}

/** The logins of one connection: a header checked once is not checked again on it. */
export class Logins {
  private readonly cache = new Map<string, AuthenticatedUser>();

  constructor(
    private readonly ctx: L7rContext,
    /** The client's address: throttled and audited by it. */
    private readonly address: string,
  ) {}

  /** The user of an Authorization header's value; a Status 401 (or 429, throttled) when none. */
  async user(header: string, hostId: number): Promise<AuthenticatedUser> {
    const cached = this.cache.get(header);
    if (cached) return cached;
    const { sql, metric } = this.ctx;
    const m = /^(Basic|Bearer)\s+(\S+)$/i.exec(header);
    if (!m) throw unauthorized();
    await incrementHostCounter(sql, hostId, "auth_attempts").catch(() => {});
    const decoded = Buffer.from(m[2]!, "base64").toString("utf8");
    let user: AuthenticatedUser;
    if (m[1]!.toLowerCase() === "bearer") {
      const tok = await useUserToken(sql, decoded.trim());
      const u = tok && (await L.userForL7r(sql, tok.user_id));
      if (!u || u.blocked || u.tenant_blocked) {
        metric.logins.inc({ kind: "token", result: "failed" });
        throw unauthorized();
      }
      metric.logins.inc({ kind: "token", result: "ok" });
      // The identity the plugin gave at the login that made the token (LDAP uid/gid/home…).
      user = {
        ...pluginIdentityFrom(tok.auth_params),
        userId: u.id,
        tenantId: u.tenant_id,
        login: u.name,
        ...(tok.vm_id !== null ? { vmId: tok.vm_id } : {}),
      };
    } else {
      const colon = decoded.indexOf(":");
      if (colon <= 0) throw unauthorized();
      user = await this.password(decoded.slice(0, colon), decoded.slice(colon + 1));
    }
    await incrementHostCounter(sql, hostId, "auth_ok").catch(() => {});
    this.cache.set(header, user);
    return user;
  }

  private async password(name: string, password: string): Promise<AuthenticatedUser> {
    const { sql, metric } = this.ctx;
    // Names are lower case; the login is split by the farm's rules (src/auth/chain.ts:
    // l7r.auth.plugin.default.separators and .tenant), as everywhere.
    const full = name.trim().toLowerCase();
    const rules = await loginRules(sql, this.ctx.authConfig);
    const [login, tenantPart] = splitLogin(full, rules.separators);
    const account = `${tenantPart || rules.defaultTenant}/${login}`; // throttled and audited by this name
    // The try takes its slot before the password is checked (src/auth/throttle.ts).
    const gate = await beginLogin(sql, this.ctx.throttle, { service: "l7r", account, address: this.address });
    if (!gate.ok) {
      metric.logins.inc({ kind: "password", result: "throttled" });
      throw new Status(429, `Too many failed logins; try again in ${gate.retryAfterS} seconds\r\n`, [
        ["Retry-After", String(gate.retryAfterS)],
      ]);
    }
    const failed = async (reason: string, tenantId?: number) => {
      metric.logins.inc({ kind: "password", result: "failed" });
      await gate.done(false);
      await audit(sql, {
        action: "user.login",
        source: "l7r",
        ok: false,
        error: reason,
        object_type: "user",
        object_name: account,
        tenant_id: tenantId,
        address: this.address,
      });
      return unauthorized();
    };
    let r: Awaited<ReturnType<Authenticate>>;
    let tenant: ResolvedLogin;
    try {
      tenant = await resolveLogin(sql, full, rules);
      if (!tenant.ok && tenant.reason === "empty login") throw await failed("empty login");
      if (!tenant.ok || tenant.tenantBlocked) {
        // A password check all the same, so that an unknown tenant answers as slowly.
        await verifyUserPassword(sql, -1, login, password);
        throw await failed(tenant.ok ? "tenant blocked" : "unknown tenant");
      }
      r = await this.ctx.authenticate(sql, {
        tenantId: tenant.tenantId,
        tenantName: tenant.tenantName,
        login: tenant.login,
        password,
        address: this.address,
      });
    } catch (e) {
      await gate.done(null); // an error (e.g. the directory is down) checked nothing; no-op after failed()
      throw e;
    }
    if (r.ok !== true) throw await failed(r.ok === false ? r.reason : "no plugin knows this user", tenant.tenantId);
    const u = await L.userForL7r(sql, r.user.userId);
    if (!u) throw await failed("no such user", tenant.tenantId);
    if (u.blocked) throw await failed("user blocked", tenant.tenantId);
    await gate.done(true);
    metric.logins.inc({ kind: "password", result: "ok" });
    await audit(sql, {
      action: "user.login",
      source: "l7r",
      ok: true,
      object_type: "user",
      object_id: u.id,
      object_name: account,
      tenant_id: tenant.tenantId,
      address: this.address,
    });
    return r.user;
  }
}

const unauthorized = () => new Status(401, undefined, [["WWW-Authenticate", 'Basic realm="QVD"']]);
