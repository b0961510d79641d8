// Data the user authentication chain (src/auth/) reads and writes: tenants and users by name,
// TOTP secrets, and auto-provisioning of externally authenticated users.
import { newTotpSecret, otpauthUri } from "../auth/totp.ts";
import { get, tenantScope, type Scope } from "./objects.ts";
import { transaction, type Db } from "./pool.ts";
import { users } from "./users.ts";
import { createVm, type VmRow } from "./vms.ts";

export interface LoginTenant {
  id: number;
  name: string;
  blocked: boolean;
}

export async function findTenantByName(db: Db, name: string): Promise<LoginTenant | undefined> {
  const [r] = await db`SELECT id, name, blocked FROM tenants WHERE name = ${name} AND id <> 0`;
  return r as LoginTenant | undefined;
}

export async function findTenantById(db: Db, id: number): Promise<LoginTenant | undefined> {
  const [r] = await db`SELECT id, name, blocked FROM tenants WHERE id = ${id} AND id <> 0`;
  return r as LoginTenant | undefined;
}

export interface LoginUser {
  id: number;
  tenant_id: number;
  name: string;
  blocked: boolean;
  has_password: boolean;
  totp_secret: string | null;
}

/** A user as the login sees it (with the TOTP secret); undefined when unknown. */
export async function findLoginUser(db: Db, tenantId: number, name: string): Promise<LoginUser | undefined> {
  const [r] = await db`SELECT id, tenant_id, name, blocked, password_hash IS NOT NULL AS has_password, totp_secret
    FROM users WHERE tenant_id = ${tenantId} AND name = ${name}`;
  return r as LoginUser | undefined;
}

/** Effective cluster settings rows of a tenant (global scope and the tenant's overrides). */
export async function authConfigRows(
  db: Db,
  tenantId: number,
): Promise<{ tenantId: number; key: string; value: string }[]> {
  const rows = await db`SELECT tenant_id, key, value FROM configs WHERE tenant_id = 0 OR tenant_id = ${tenantId}`;
  return rows.map((r) => ({ tenantId: r.tenant_id as number, key: r.key as string, value: r.value as string }));
}

// --- TOTP enrolment -------------------------------------------------------------------------------

/** Gives a user a new TOTP secret (replacing any old one); returns it and its otpauth:// URI. */
export async function enrolUserTotp(
  db: Db,
  scope: Scope,
  userId: number,
  issuer = "QVD",
): Promise<{ secret: string; uri: string }> {
  const user = await get(db, users, scope, userId);
  const secret = newTotpSecret();
  await db`UPDATE users SET totp_secret = ${secret}, updated_at = now() WHERE id = ${user.id}`;
  return { secret, uri: otpauthUri(secret, `${user.name}@${user.tenant_name}`, issuer) };
}

/** Removes a user's second factor; returns whether it had one. */
export async function removeUserTotp(db: Db, scope: Scope, userId: number): Promise<boolean> {
  const user = await get(db, users, scope, userId);
  const rows =
    await db`UPDATE users SET totp_secret = NULL, updated_at = now() WHERE id = ${user.id} AND totp_secret IS NOT NULL RETURNING id`;
  return rows.length > 0;
}

// --- auto-provisioning ----------------------------------------------------------------------------

export interface ProvisionSpec {
  /** OSF name in the tenant; no VM when absent. */
  osfName?: string;
  vmName: string;
  diTag: string;
  network?: { range: string; gateway?: string };
}

export interface ProvisionResult {
  user: LoginUser;
  created: boolean;
  vm?: VmRow;
}

/**
 * Creates an externally authenticated user (no password) and, when an OSF is named, a VM for
 * them, in one transaction: either both exist afterwards or neither. A user that already
 * exists is returned as it is (no VM is added). Concurrent first logins create one user.
 */
export async function provisionExternalUser(
  db: Db,
  tenantId: number,
  name: string,
  spec: ProvisionSpec,
): Promise<ProvisionResult> {
  return transaction(db, async (tx) => {
    const [ins] =
      await tx`INSERT INTO users (tenant_id, name, description) VALUES (${tenantId}, ${name}, 'auto-provisioned at first login')
      ON CONFLICT (tenant_id, name) DO NOTHING RETURNING id`;
    const user = (await findLoginUser(tx, tenantId, name))!;
    if (!ins) return { user, created: false };
    let vm: VmRow | undefined;
    if (spec.osfName) {
      const [osf] = await tx`SELECT id FROM osfs WHERE tenant_id = ${tenantId} AND name = ${spec.osfName}`;
      if (!osf) throw new Error(`auto-provisioning: the tenant has no OSF named ${JSON.stringify(spec.osfName)}`);
      vm = await createVm(
        tx,
        tenantScope(tenantId),
        { user_id: user.id, osf_id: osf.id, name: spec.vmName, di_tag: spec.diTag },
        spec.network,
      );
    }
    return { user, created: true, vm };
  });
}
