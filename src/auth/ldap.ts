// The LDAP plugin (ldapts). Two ways to find the user's entry:
//  - direct bind: `auth.ldap.bind_dn_template` with %u → the user's DN, bound with the password;
//  - search then bind: bind as `auth.ldap.bind_dn` (or anonymously), search
//    `auth.ldap.search_base` with `auth.ldap.search_filter`, then bind as the entry found.
// LDAPS (ldaps:// URL) or StartTLS (`auth.ldap.starttls`), verified against `auth.ldap.ca_file`
// or the system CAs. An optional group search must find the user. uid, gid and home come from
// the entry's attributes and travel to the VMA. Passwords are never logged.
//
// Results: a user it cannot find (search) is not its business (pass); a wrong password, a
// user outside the group or an unreachable directory is a refusal. With direct bind an unknown
// user cannot be told from a wrong password: put `local` before `ldap` in that case.
import { readFileSync } from "node:fs";
import type { ConnectionOptions } from "node:tls";
import { Client, InvalidCredentialsError, SizeLimitExceededError } from "ldapts";
import type { Config } from "../config.ts";
import type { Db } from "../db/pool.ts";
import { logger } from "../log.ts";
import { externalUser, type AutoprovisionSettings } from "./autoprovision.ts";
import { defaultIdentityRules, gidProblem, homeProblem, uidProblem, type IdentityRules } from "./identity.ts";
import type { AuthPlugin, AuthResult, LoginAttempt } from "./user-auth.ts";

const log = logger("auth.ldap");

export interface LdapSettings {
  url: string;
  starttls: boolean;
  caFile: string;
  /** PEM text (auth.ldap.ca), used instead of caFile when set. */
  caPem: string;
  timeoutS: number;
  bindDnTemplate: string;
  searchBase: string;
  searchFilter: string;
  searchScope: "base" | "one" | "sub";
  bindDn: string;
  bindPassword: string;
  groupFilter: string;
  groupBase: string;
  attrUid: string;
  attrGid: string;
  attrHome: string;
}

export function ldapSettings(cfg: Config): LdapSettings {
  return {
    url: cfg.get("auth.ldap.url"),
    starttls: cfg.get("auth.ldap.starttls"),
    caFile: cfg.get("auth.ldap.ca_file"),
    caPem: cfg.get("auth.ldap.ca").replace(/\\n/g, "\n"),
    timeoutS: cfg.get("auth.ldap.timeout"),
    bindDnTemplate: cfg.get("auth.ldap.bind_dn_template"),
    searchBase: cfg.get("auth.ldap.search_base"),
    searchFilter: cfg.get("auth.ldap.search_filter"),
    searchScope: cfg.get("auth.ldap.search_scope"),
    bindDn: cfg.get("auth.ldap.bind_dn"),
    bindPassword: cfg.get("auth.ldap.bind_password"),
    groupFilter: cfg.get("auth.ldap.group_filter"),
    groupBase: cfg.get("auth.ldap.group_base"),
    attrUid: cfg.get("auth.ldap.attr.uid"),
    attrGid: cfg.get("auth.ldap.attr.gid"),
    attrHome: cfg.get("auth.ldap.attr.home"),
  };
}

/** RFC 4515 escaping of a value inside a search filter. */
export function escapeFilterValue(v: string): string {
  return v.replace(/[\\*()\0]/g, (c) => "\\" + c.charCodeAt(0).toString(16).padStart(2, "0"));
}

/** RFC 4514 escaping of an attribute value inside a DN. */
export function escapeDnValue(v: string): string {
  let out = v.replace(/[\\,+"<>;=\0]/g, (c) => (c === "\0" ? "\\00" : "\\" + c));
  if (out.startsWith(" ") || out.startsWith("#")) out = "\\" + out;
  if (out.endsWith(" ") && !out.endsWith("\\ ")) out = out.slice(0, -1) + "\\ ";
  return out;
}

/** The dc= components at the end of a DN (a default search base for groups). */
function dcSuffix(dn: string): string {
  const parts = dn.split(/,(?=(?:[^\\]|$))/).map((p) => p.trim());
  const i = parts.findIndex((p) => /^dc=/i.test(p));
  return i < 0 ? "" : parts.slice(i).join(",");
}

const first = (v: unknown): string | undefined => {
  const x = Array.isArray(v) ? v[0] : v;
  if (x === undefined || x === null) return undefined;
  return Buffer.isBuffer(x) ? x.toString("utf8") : String(x);
};

const intAttr = (v: unknown): number | undefined => {
  const s = first(v);
  return s !== undefined && /^\d+$/.test(s) ? Number(s) : undefined;
};

/** `identity`: the global identity rules (src/auth/identity.ts) the entry's uid, gid and home must keep. */
export function ldapPlugin(
  s: LdapSettings,
  provision: AutoprovisionSettings,
  identity: IdentityRules = defaultIdentityRules(),
): AuthPlugin {
  return {
    name: "ldap",
    async authenticate(db: Db, a: LoginAttempt): Promise<AuthResult> {
      if (!s.url) return { ok: false, reason: "LDAP is not configured (auth.ldap.url)" };
      if (!s.bindDnTemplate && !s.searchBase)
        return { ok: false, reason: "LDAP is not configured (auth.ldap.bind_dn_template or auth.ldap.search_base)" };
      // An empty password would be an unauthenticated bind, which servers accept.
      if (a.password === "") return { ok: false, reason: "empty password" };
      let tlsOptions: ConnectionOptions | undefined;
      if (s.caPem) tlsOptions = { ca: s.caPem };
      else if (s.caFile) {
        try {
          tlsOptions = { ca: readFileSync(s.caFile) };
        } catch (err) {
          return { ok: false, reason: `LDAP: cannot read auth.ldap.ca_file: ${(err as Error).message}` };
        }
      }
      const ms = s.timeoutS * 1000;
      const ldaps = /^ldaps:/i.test(s.url);
      // ldapts adds the socket to the options it is given: a fresh object for each use.
      const client = new Client({
        url: s.url,
        timeout: ms,
        connectTimeout: ms,
        tlsOptions: ldaps ? { ...tlsOptions } : undefined,
        strictDN: false,
      });
      try {
        if (s.starttls && !ldaps) await client.startTLS({ ...tlsOptions });
        const attributes = [s.attrUid, s.attrGid, s.attrHome].filter(Boolean);
        let dn: string;
        let entry: Record<string, unknown> | undefined;
        if (s.bindDnTemplate) {
          dn = s.bindDnTemplate.replaceAll("%u", escapeDnValue(a.login));
          if (!(await bindAs(client, dn, a.password))) return { ok: false, reason: "wrong login or password (LDAP)" };
        } else {
          if (s.bindDn) {
            if (!(await bindAs(client, s.bindDn, s.bindPassword)))
              return { ok: false, reason: "LDAP: the service account (auth.ldap.bind_dn) cannot bind" };
          }
          const filter = s.searchFilter.replaceAll("%u", escapeFilterValue(a.login));
          const { searchEntries } = await client
            .search(s.searchBase, { scope: s.searchScope, filter, attributes, sizeLimit: 2 })
            .catch((err) => {
              if (err instanceof SizeLimitExceededError) return { searchEntries: [{ dn: "" }, { dn: "" }] }; // more than 2
              throw err;
            });
          if (searchEntries.length === 0) return { ok: "pass" };
          if (searchEntries.length > 1) return { ok: false, reason: "LDAP: the login matches several entries" };
          entry = searchEntries[0]!;
          dn = entry.dn as string;
          if (!(await bindAs(client, dn, a.password))) return { ok: false, reason: "wrong password (LDAP)" };
        }
        // Direct bind: read the entry as the user (its attributes, and that it exists).
        if (!entry && attributes.length) {
          // The entry may not be readable by its own user: then there are no attributes.
          entry = await client.search(dn, { scope: "base", filter: "(objectClass=*)", attributes }).then(
            (r) => r.searchEntries[0],
            (err) => void log.debug("cannot read the user's entry", { dn, error: (err as Error).message }),
          );
        }
        if (s.groupFilter) {
          const base = s.groupBase || dcSuffix(dn) || s.searchBase;
          const filter = s.groupFilter
            .replaceAll("%d", escapeFilterValue(dn))
            .replaceAll("%u", escapeFilterValue(a.login));
          const { searchEntries } = await client
            .search(base, { scope: "sub", filter, attributes: ["dn"], sizeLimit: 1 })
            .catch((err) => {
              // sizeLimit exceeded still means at least one match
              if (err instanceof SizeLimitExceededError) return { searchEntries: [{ dn: "" }] };
              throw err;
            });
          if (searchEntries.length === 0) return { ok: false, reason: "not a member of the required LDAP group" };
        }
        const uid = entry && s.attrUid ? intAttr(entry[s.attrUid]) : undefined;
        const gid = entry && s.attrGid ? intAttr(entry[s.attrGid]) : undefined;
        const home = entry && s.attrHome ? first(entry[s.attrHome]) : undefined;
        // The directory's identity is checked as an administrator's would be: refused, not
        // ignored (the user's files in a shared home belong to that uid), before any provisioning.
        const problem =
          (uid !== undefined && uidProblem(uid, identity)) ||
          (gid !== undefined && gidProblem(gid, identity)) ||
          (home !== undefined && homeProblem(home, identity));
        if (problem) {
          log.warn("LDAP identity refused", { login: a.login, problem });
          return { ok: false, reason: `LDAP entry's identity refused: ${problem}` };
        }
        let user;
        try {
          user = await externalUser(db, provision, a.tenantId, a.login);
        } catch (err) {
          log.error("auto-provisioning failed", {
            tenant_id: a.tenantId,
            login: a.login,
            error: (err as Error).message,
          });
          return { ok: false, reason: `auto-provisioning failed: ${(err as Error).message}` };
        }
        if (!user) return { ok: false, reason: "authenticated by LDAP but not a QVD user (auto-provisioning is off)" };
        return {
          ok: true,
          user: {
            userId: user.id,
            tenantId: user.tenant_id,
            login: user.name,
            ...(uid !== undefined && { uid }),
            ...(gid !== undefined && { gid }),
            ...(home !== undefined && { home }),
          },
        };
      } catch (err) {
        const msg = (err as Error)?.message ?? String(err);
        log.warn("LDAP authentication failed", { url: s.url, login: a.login, error: msg });
        return { ok: false, reason: `LDAP error: ${msg}` };
      } finally {
        await client.unbind().catch(() => {});
      }
    },
  };
}

/** True when the bind succeeds, false on invalid credentials; other errors propagate. */
async function bindAs(client: Client, dn: string, password: string): Promise<boolean> {
  if (password === "") return false;
  try {
    await client.bind(dn, password);
    return true;
  } catch (err) {
    if (err instanceof InvalidCredentialsError) return false;
    throw err;
  }
}
