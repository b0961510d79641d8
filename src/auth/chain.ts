// The per-tenant authentication chain the L7R calls. The chain of a tenant is the cluster
// setting `l7r.auth.plugins` ("local" by default, e.g. "local,ldap"), which a tenant may
// override in `configs` like any cluster key (so can every auth.* key). Plugins are asked in
// order: the first success or refusal decides; when every plugin passes the login fails.
// A user with a TOTP secret appends the 6-digit code to the password (as the original clients
// do): the chain strips it, runs the plugins with the rest, then checks the code.
// Blocked tenants and users are refused, with a reason; throttling is the L7R's.
import type { Config } from "../config.ts";
import { authConfigRows, findLoginUser, findTenantById, findTenantByName } from "../db/auth.ts";
import { DEFAULT_TENANT_NAME } from "../db/schema.ts";
import type { Db } from "../db/pool.ts";
import { autoprovisionSettings } from "./autoprovision.ts";
import { identityRules, type IdentityRules } from "./identity.ts";
import { ldapPlugin, ldapSettings } from "./ldap.ts";
import { localPlugin } from "./local.ts";
import { splitTotpPassword, verifyTotp } from "./totp.ts";
import type { AuthPlugin, AuthResult, LoginAttempt } from "./user-auth.ts";

/** What the L7R calls to check a login attempt: a tenant's chain (`authenticateUser`), or a test's stand-in. */
export type Authenticate = (db: Db, attempt: LoginAttempt) => Promise<AuthResult>;

export type ResolvedLogin =
  | { ok: true; tenantId: number; tenantName: string; tenantBlocked: boolean; login: string }
  | { ok: false; reason: string };

export interface ResolveOptions {
  /** Separator characters (`l7r.auth.plugin.default.separators`); default "@#". */
  separators?: string;
  /** Tenant of a login without one in multitenant mode (`l7r.auth.plugin.default.tenant`). */
  defaultTenant?: string;
}

/** Splits a login at the first separator character: ["alice", "acme"] or ["alice", undefined] (each part trimmed). */
export function splitLogin(raw: string, separators = "@#"): [string, string | undefined] {
  let i = -1;
  for (let k = 0; k < raw.length; k++) {
    if (separators.includes(raw[k]!)) {
      i = k;
      break;
    }
  }
  return i < 0 ? [raw.trim(), undefined] : [raw.slice(0, i).trim(), raw.slice(i + 1).trim()];
}

/**
 * The tenant and login of a login as typed (`alice`, `alice@acme`, `alice#acme`): the tenant
 * named after the first separator, or the default one (`l7r.auth.plugin.default.tenant`). As the
 * original, whatever wat.multitenant says: a monotenant farm has only the default tenant, and
 * a role need not know the mode to find it.
 */
export async function resolveLogin(db: Db, raw: string, opts: ResolveOptions = {}): Promise<ResolvedLogin> {
  const [login, tenantPart] = splitLogin(raw.trim(), opts.separators ?? "@#");
  if (login === "") return { ok: false, reason: "empty login" };
  const tenant = await findTenantByName(db, tenantPart || opts.defaultTenant || DEFAULT_TENANT_NAME);
  if (!tenant)
    return {
      ok: false,
      reason: `no such tenant ${JSON.stringify(tenantPart ?? opts.defaultTenant ?? DEFAULT_TENANT_NAME)}`,
    };
  return { ok: true, tenantId: tenant.id, tenantName: tenant.name, tenantBlocked: tenant.blocked, login };
}

/** The farm's rules for splitting logins: its global settings (the node's configuration and the global rows). */
export async function loginRules(
  db: Db,
  cfg: Config,
): Promise<ResolveOptions & { separators: string; defaultTenant: string }> {
  const global = await tenantConfig(db, cfg, 0);
  return {
    separators: global.get("l7r.auth.plugin.default.separators"),
    defaultTenant: global.get("l7r.auth.plugin.default.tenant"),
  };
}

/** The effective configuration of a tenant: `cfg` with the global and the tenant's `configs` rows. */
export async function tenantConfig(db: Db, cfg: Config, tenantId: number): Promise<Config> {
  return cfg.withDatabase(await authConfigRows(db, tenantId));
}

/** The plugins of a tenant's chain, built from its effective configuration. */
export function chainPlugins(cfg: Config, identity?: IdentityRules): AuthPlugin[] {
  const names = cfg
    .get("l7r.auth.plugins")
    .split(",")
    .map((n) => n.trim())
    .filter(Boolean);
  return names.map((n) => {
    switch (n) {
      case "local":
        return localPlugin();
      case "ldap":
        return ldapPlugin(ldapSettings(cfg), autoprovisionSettings(cfg), identity);
      default:
        throw new Error(`unknown authentication plugin ${JSON.stringify(n)}`);
    }
  });
}

export interface AuthOptions {
  /** Test hook: the time TOTP codes are checked against (ms since the epoch). */
  now?: number;
  /**
   * Set when `cfg` already holds this tenant's effective configuration (skips reading
   * `configs`); otherwise the global and the tenant's rows are layered over `cfg`.
   */
  tenantConfigLoaded?: boolean;
}

/**
 * Authenticates a login attempt with the tenant's chain. `cfg` is the node's configuration
 * (file, environment, flags); the database's cluster settings are layered in for the tenant.
 */
export async function authenticateUser(
  db: Db,
  cfg: Config,
  attempt: LoginAttempt,
  opts: AuthOptions = {},
): Promise<AuthResult> {
  const tenant = await findTenantById(db, attempt.tenantId);
  if (!tenant) return { ok: false, reason: "no such tenant" };
  if (tenant.blocked) return { ok: false, reason: `tenant ${JSON.stringify(tenant.name)} is blocked` };
  if (attempt.login === "") return { ok: false, reason: "empty login" };
  if (attempt.password === "") return { ok: false, reason: "empty password" };
  const tcfg = opts.tenantConfigLoaded ? cfg : await tenantConfig(db, cfg, tenant.id);

  // Second factor: known before the plugins run, from the user's row (when there is one).
  const known = await findLoginUser(db, tenant.id, attempt.login);
  let password = attempt.password;
  let code: string | undefined;
  if (known?.totp_secret) {
    const split = splitTotpPassword(password);
    if (!split) return { ok: false, reason: "one-time code missing (append it to the password)" };
    ({ password, code } = split);
  }

  let plugins: AuthPlugin[];
  try {
    // The identity rules are the farm's: a tenant's rows of identity.* are never layered in
    // (Config.withDatabase), so the tenant's configuration holds the global ones.
    plugins = chainPlugins(tcfg, identityRules(tcfg));
  } catch (err) {
    return { ok: false, reason: (err as Error).message };
  }
  const a: LoginAttempt = { ...attempt, tenantId: tenant.id, tenantName: tenant.name, password };
  let result: AuthResult = { ok: false, reason: "unknown user" };
  for (const p of plugins) {
    const r = await p.authenticate(db, a);
    if (r.ok === "pass") continue;
    result = r.ok ? r : { ok: false, reason: `${r.reason} (${p.name})` };
    break;
  }
  if (result.ok !== true) return result;

  const user = await findLoginUser(db, tenant.id, result.user.login);
  if (!user || user.id !== result.user.userId)
    return { ok: false, reason: "the user disappeared during authentication" };
  if (user.blocked) return { ok: false, reason: `user ${JSON.stringify(user.name)} is blocked` };
  if (user.totp_secret) {
    if (code === undefined) return { ok: false, reason: "one-time code missing (append it to the password)" };
    if (!verifyTotp(user.totp_secret, code, opts.now)) return { ok: false, reason: "wrong one-time code" };
  }
  return result;
}

export interface RawLogin {
  /** As typed: `alice`, `alice@acme`. */
  login: string;
  password: string;
  address?: string;
}

/** resolveLogin + authenticateUser, for a login as the client sends it (Basic auth). */
export async function authenticateLogin(
  db: Db,
  cfg: Config,
  raw: RawLogin,
  opts: AuthOptions = {},
): Promise<AuthResult> {
  const rules = await loginRules(db, cfg);
  const r = await resolveLogin(db, raw.login, rules);
  if (!r.ok) return r;
  if (r.tenantBlocked) return { ok: false, reason: `tenant ${JSON.stringify(r.tenantName)} is blocked` };
  return authenticateUser(
    db,
    cfg,
    { tenantId: r.tenantId, tenantName: r.tenantName, login: r.login, password: raw.password, address: raw.address },
    opts,
  );
}
