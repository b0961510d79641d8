// Auto-provisioning: after an external plugin (LDAP) authenticated someone QVD does not know,
// create the user (without a password) and, when `auth.autoprovision.osf` names one of the
// tenant's OSFs, a VM from it, on the configured VM network.
import type { Config } from "../config.ts";
import { findLoginUser, provisionExternalUser, type LoginUser } from "../db/auth.ts";
import { loginName } from "../db/objects.ts";
import type { Db } from "../db/pool.ts";
import { logger } from "../log.ts";

const log = logger("auth");

export interface AutoprovisionSettings {
  enable: boolean;
  osf: string;
  vmName: string;
  diTag: string;
  network: { range: string; gateway?: string };
}

export function autoprovisionSettings(cfg: Config): AutoprovisionSettings {
  return {
    enable: cfg.get("auth.autoprovision.enable"),
    osf: cfg.get("auth.autoprovision.osf"),
    vmName: cfg.get("auth.autoprovision.vm_name"),
    diTag: cfg.get("auth.autoprovision.di_tag"),
    network: { range: cfg.get("vm.network.range"), gateway: cfg.get("vm.network.gateway") || undefined },
  };
}

/**
 * The QVD user behind an externally authenticated login: the existing row, else (when
 * enabled) a new one with its VM. Undefined when the user is unknown and auto-provisioning
 * is off; throws when provisioning fails (nothing is left half-created).
 */
export async function externalUser(
  db: Db,
  s: AutoprovisionSettings,
  tenantId: number,
  login: string,
): Promise<LoginUser | undefined> {
  const existing = await findLoginUser(db, tenantId, login);
  if (existing || !s.enable) return existing;
  // The same rules as a user created through the API (the name is a directory of the homes).
  const name = loginName.safeParse(login);
  if (!name.success) throw new Error(`the login cannot be a user name: ${name.error.issues[0]!.message}`);
  const r = await provisionExternalUser(db, tenantId, login, {
    osfName: s.osf || undefined,
    vmName: s.vmName.replaceAll("%u", login).slice(0, 64),
    diTag: s.diTag,
    network: s.network,
  });
  if (r.created) log.info("auto-provisioned user", { tenant_id: tenantId, user: login, vm: r.vm?.name ?? "(none)" });
  return r.user;
}
