// The identity of a desktop user: uid, primary gid, home and supplementary groups, from the
// qvd.vm.user.{uid,gid,home,groups} properties or the directory (LDAP). They decide what the
// user owns in the desktop (a home of /etc, a gid of shadow = root), so they are the product's:
// checked against the global identity.* settings where they are written (API, LDAP login), when
// the L7R assembles x_start, and by the VMA before it provisions anything.
import { Config, PRIVILEGED_GROUPS } from "../config.ts";
import { listConfigRows } from "../db/configs.ts";
import type { Db } from "../db/pool.ts";

/** Ids below this are the system's, whatever the configuration says. */
export const FIRST_USER_ID = 1000;

export const IDENTITY_PROPERTIES = [
  "qvd.vm.user.uid",
  "qvd.vm.user.gid",
  "qvd.vm.user.home",
  "qvd.vm.user.groups",
] as const;
export const isIdentityProperty = (key: string) => (IDENTITY_PROPERTIES as readonly string[]).includes(key);

export interface IdentityRules {
  homeBase: string;
  uid: { min: number; max: number };
  gid: { min: number; max: number };
  groups: string[];
}

const list = (s: string) => s.split(/[\s,]+/).filter(Boolean);

export function identityRules(cfg: Pick<Config, "get">): IdentityRules {
  return {
    homeBase: cfg.get("identity.home.base"),
    uid: { min: cfg.get("identity.uid.min"), max: cfg.get("identity.uid.max") },
    gid: { min: cfg.get("identity.gid.min"), max: cfg.get("identity.gid.max") },
    groups: list(cfg.get("identity.groups.allowed")),
  };
}

/**
 * The rules as the global scope stores them now, over `cfg` (node.conf, environment, flags). A
 * tenant's own identity.* rows are never read: a tenant cannot widen them.
 */
export async function currentIdentityRules(db: Db, cfg: Config = new Config()): Promise<IdentityRules> {
  const rows = (await listConfigRows(db)).filter((r) => r.tenant_id === 0);
  return identityRules(cfg.withDatabase(rows.map((r) => ({ tenantId: 0, key: r.key, value: r.value }))));
}

/** The built-in defaults (a VMA given no settings, tests). */
export const defaultIdentityRules = (): IdentityRules => identityRules(new Config());

/** The rules as VMA settings (vma.json), so the node's values win over the image's. */
export function identitySettings(r: IdentityRules): Record<string, string> {
  return {
    "identity.home.base": r.homeBase,
    "identity.uid.min": String(r.uid.min),
    "identity.uid.max": String(r.uid.max),
    "identity.gid.min": String(r.gid.min),
    "identity.gid.max": String(r.gid.max),
    "identity.groups.allowed": r.groups.join(","),
  };
}

function idProblem(what: "uid" | "gid", n: number, r: IdentityRules): string | undefined {
  const { min, max } = r[what];
  const lo = Math.max(min, FIRST_USER_ID);
  if (!Number.isInteger(n) || n < lo || n > max)
    return `${what} ${n} is outside the allowed range ${lo}-${max} (identity.${what}.min/max)`;
  return undefined;
}
export const uidProblem = (n: number, r: IdentityRules) => idProblem("uid", n, r);
export const gidProblem = (n: number, r: IdentityRules) => idProblem("gid", n, r);

/** A home: <base>/<name>[/<name>…], written normalised (no //, ., .., trailing /). */
export function homeProblem(home: string, r: IdentityRules): string | undefined {
  const base = r.homeBase.replace(/\/+$/, "");
  const rest = home.startsWith(base + "/") ? home.slice(base.length + 1) : undefined;
  if (rest === undefined || !rest.split("/").every((c) => /^[A-Za-z0-9_-][A-Za-z0-9_.-]*$/.test(c)))
    return `home ${JSON.stringify(home)} is not a plain directory below ${base} (identity.home.base)`;
  return undefined;
}

export function groupsProblem(groups: string[], r: IdentityRules): string | undefined {
  const bad = groups.filter((g) => PRIVILEGED_GROUPS.has(g) || !r.groups.includes(g));
  if (bad.length)
    return `group${bad.length > 1 ? "s" : ""} ${bad.join(", ")} not allowed (identity.groups.allowed: ${r.groups.join(",") || "none"})`;
  return undefined;
}

export const parseGroups = list;

export interface Identity {
  uid: number;
  gid: number;
  home?: string;
  groups?: string[];
}

/** The first rule an identity breaks and the field it is in (undefined: it keeps them all). */
export function identityProblem(
  i: Identity,
  r: IdentityRules,
): { field: "uid" | "gid" | "home" | "groups"; message: string } | undefined {
  const checks = [
    ["uid", uidProblem(i.uid, r)],
    ["gid", gidProblem(i.gid, r)],
    ["home", i.home !== undefined ? homeProblem(i.home, r) : undefined],
    ["groups", i.groups !== undefined ? groupsProblem(i.groups, r) : undefined],
  ] as const;
  const bad = checks.find(([, m]) => m !== undefined);
  return bad && { field: bad[0], message: bad[1]! };
}

/** What is wrong with an identity property's value (as stored: text); undefined when fine or not one. */
export function identityValueProblem(key: string, value: string, r: IdentityRules): string | undefined {
  switch (key) {
    case "qvd.vm.user.uid":
    case "qvd.vm.user.gid":
      if (!/^\d{1,10}$/.test(value)) return `expected a number, not ${JSON.stringify(value)}`;
      return idProblem(key === "qvd.vm.user.uid" ? "uid" : "gid", Number(value), r);
    case "qvd.vm.user.home":
      return homeProblem(value, r);
    case "qvd.vm.user.groups":
      if (!/^[\s,]*([a-z_][a-z0-9_-]{0,31}([\s,]+|$))*$/.test(value))
        return "expected group names separated by commas or spaces";
      return groupsProblem(list(value), r);
  }
  return undefined;
}

/** The uid of a user without one: 10000 + the user's id, folded into the allowed range. */
export function defaultUid(userId: number, r: IdentityRules): number {
  const lo = Math.max(r.uid.min, FIRST_USER_ID);
  const d = 10000 + userId;
  if (r.uid.max < lo) return lo; // an empty range: the check says so
  return d >= lo && d <= r.uid.max ? d : lo + (userId % (r.uid.max - lo + 1));
}
