// The VMA's x_start request of a connect_to_vm: the session parameters merged the way the
// original's L7R merged them (docs/PROTOCOL.md, "Session parameters"), later entries overriding
// earlier ones:
//
//   1. the client's query parameters (only qvd.client.* and custom.*: anything else was refused)
//   2. host_address (this node's address, for tools in the desktop that call back)
//   3. properties of the OSF, 4. of the image (DI) the VM runs, 5. of the user, 6. of the VM
//   7. what the authentication plugin provides (its params; uid/gid/home from LDAP)
//   8. the session identity qvd.vm.user.{name,uid,gid,home} as decided below, and qvd.slave.key
//
// So an administrator's property overrides the client (e.g. qvd.client.link on the OSF forces
// the link), a VM's property overrides its user's, which overrides the image's and the OSF's.
// Identity: the user name is always the authenticated login; uid, gid and home come from the
// plugin when it knows them, else from the qvd.vm.user.uid/gid/home properties, else defaults.
// A client cannot reach any of these: its keys are qvd.client.* and custom.* only, and the
// identity is written after every other layer. Whatever its source, the identity must keep the
// global identity.* rules (src/auth/identity.ts): values stored before those rules, or set
// directly in the database, are refused here too.
import {
  defaultIdentityRules,
  defaultUid,
  identityProblem,
  parseGroups,
  type IdentityRules,
} from "../auth/identity.ts";
import type { AuthenticatedUser } from "../auth/user-auth.ts";
import type { PropertyLayers } from "../db/l7r.ts";
import type { SessionParams } from "../vma/session.ts";

export const CLIENT_PARAM = /^(qvd\.client\.|custom\.)/;

/** The body of the VMA's POST /vma/x_start (src/vma/README.md): the VMA's session parameters. */
export type XStartBody = SessionParams & { properties: Record<string, string> };

/** An administrator's value that cannot be used (the message names the property). */
export class XStartParamError extends Error {}

/** The login as a guest account name: `[a-z_][a-z0-9_.-]{0,31}`. */
export function guestUserName(login: string): string {
  const n = login.toLowerCase().replace(/[^a-z0-9_.-]/g, "_");
  return (/^[a-z_]/.test(n) ? n : `_${n}`).slice(0, 32);
}

function idValue(key: string, v: string | undefined): number | undefined {
  if (v === undefined || v === "") return undefined;
  if (!/^\d{1,10}$/.test(v) || Number(v) < 1 || Number(v) > 4294967294)
    throw new XStartParamError(`property ${key} = ${JSON.stringify(v)} is not a valid id (1 or more)`);
  return Number(v);
}

export function xStartBody(i: {
  /** The client's query parameters (without id). */
  client: Iterable<[string, string]>;
  layers: PropertyLayers;
  user: AuthenticatedUser;
  hostAddress: string;
  slaveKey: string;
  /** The global identity rules (default: the built-in ones). */
  identity?: IdentityRules;
}): XStartBody {
  const rules = i.identity ?? defaultIdentityRules();
  const m: Record<string, string> = {};
  // Defence in depth: the caller refused other keys already.
  for (const [k, v] of i.client) if (CLIENT_PARAM.test(k)) m[k] = v;
  m.host_address = i.hostAddress;
  Object.assign(m, i.layers.osf, i.layers.di, i.layers.user, i.layers.vm, i.user.params ?? {});

  const user = guestUserName(i.user.login);
  const uid = i.user.uid ?? idValue("qvd.vm.user.uid", m["qvd.vm.user.uid"]) ?? defaultUid(i.user.userId, rules);
  const gid = i.user.gid ?? idValue("qvd.vm.user.gid", m["qvd.vm.user.gid"]) ?? uid;
  const home = i.user.home ?? (m["qvd.vm.user.home"] || undefined);
  if (home !== undefined && (!/^(\/[\w.-]+)+$/.test(home) || home.split("/").includes("..")))
    throw new XStartParamError(`qvd.vm.user.home = ${JSON.stringify(home)} is not an absolute path`);
  const groups = m["qvd.vm.user.groups"];
  const problem = identityProblem(
    { uid, gid, home, groups: groups !== undefined ? parseGroups(groups) : undefined },
    rules,
  );
  if (problem) throw new XStartParamError(`identity refused: ${problem.message}`);
  Object.assign(m, { "qvd.vm.user.name": user, "qvd.vm.user.uid": String(uid), "qvd.vm.user.gid": String(gid) });
  if (home !== undefined) m["qvd.vm.user.home"] = home;
  else delete m["qvd.vm.user.home"];
  m["qvd.slave.key"] = i.slaveKey;

  // The nxagent options, from the merged map (so an administrator's value wins over the client's).
  const c = (k: string) => m[`qvd.client.${k}`] || undefined;
  const keyboard = c("keyboard");
  const fs = m["qvd.client.fullscreen"];
  return {
    user,
    uid,
    gid,
    ...(home !== undefined ? { home } : {}),
    // empty/empty: the Qt client's "transparent" keyboard, i.e. none.
    ...(keyboard && keyboard !== "empty/empty" ? { keyboard } : {}),
    ...(c("os") ? { client_os: c("os") } : {}),
    ...(c("link") ? { link: c("link") } : {}),
    ...(c("geometry") ? { geometry: c("geometry") } : {}),
    ...(fs !== undefined && fs !== "" ? { fullscreen: fs === "1" || fs === "true" } : {}),
    properties: m,
  };
}
