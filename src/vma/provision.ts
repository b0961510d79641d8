// User provisioning in the guest (the original's `_provisionate_user`): the group and the user
// with the uid/gid the L7R passed, and the home. Everything happens below a filesystem `root`
// ("/" in a guest): groupadd/useradd get `--root ROOT` (they chroot there and take their own
// locks on ROOT/etc), and the home is ROOT/<home>. Tests use a temporary root holding a copy
// of a minimal /etc/passwd, group, shadow and gshadow, so the host's accounts are never touched.
//
// A home that exists (the backend bind-mounts the persistent one) is never emptied or
// recreated: only its owner is set. A missing one is created from ROOT/etc/skel.
import {
  chownSync,
  cpSync,
  existsSync,
  lchownSync,
  lstatSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  statSync,
} from "node:fs";
import { dirname, join } from "node:path";
import { identityProblem, type IdentityRules } from "../auth/identity.ts";
import { PRIVILEGED_GROUPS } from "../config.ts";
import { UserError } from "../errors.ts";
import { logger } from "../log.ts";
import { run } from "../run.ts";

const log = logger("vma.provision");

export interface Account {
  user: string;
  uid: number;
  gid: number;
  /** The home as the guest sees it (e.g. /home/alice). */
  home: string;
  shell: string;
  /** Numeric supplementary groups (from ROOT/etc/group), for setpriv --groups. */
  groups: number[];
}

export interface ProvisionRequest {
  user: string;
  uid: number;
  gid: number;
  home: string;
  shell: string;
  /** Supplementary group names (must exist). */
  groups: string[];
}

interface PasswdEntry {
  name: string;
  uid: number;
  gid: number;
  home: string;
  shell: string;
}
interface GroupEntry {
  name: string;
  gid: number;
  members: string[];
}

function readLines(file: string): string[][] {
  if (!existsSync(file)) return [];
  return readFileSync(file, "utf8")
    .split("\n")
    .filter((l) => l && !l.startsWith("#"))
    .map((l) => l.split(":"));
}

export function readPasswd(root: string): PasswdEntry[] {
  return readLines(join(root, "etc/passwd")).map((f) => ({
    name: f[0]!,
    uid: Number(f[2]),
    gid: Number(f[3]),
    home: f[5] ?? "",
    shell: f[6] ?? "",
  }));
}

export function readGroups(root: string): GroupEntry[] {
  return readLines(join(root, "etc/group")).map((f) => ({
    name: f[0]!,
    gid: Number(f[2]),
    members: (f[3] ?? "").split(",").filter(Boolean),
  }));
}

/** The path of a guest path on this machine's filesystem. */
export const underRoot = (root: string, p: string) => (root === "/" ? p : join(root, p));

/**
 * Refuses, before anything is created or chowned, an account the identity rules do not allow:
 * the one asked for, or the image's own account of that name (a login "root" or "daemon" is the
 * image's system account, whose ids and home win), with its groups in the image's /etc/group,
 * and a home reached through a symbolic link (an image's /home -> / makes /home/etc /etc).
 */
export function checkIdentity(req: ProvisionRequest, rules: IdentityRules, root = "/"): void {
  const pw = readPasswd(root).find((e) => e.name === req.user);
  const home = pw?.home || req.home;
  const groups = readGroups(root);
  const member = groups.filter((g) => g.members.includes(req.user)).map((g) => g.name);
  const named = [...new Set([...req.groups, ...member])];
  // The image decides which gid a name has: a group that shares a gid with root or a privileged
  // group (an "audio" of gid 0, a "shadow" of the user's primary gid) gives what that one gives.
  const privileged = new Set([0, ...groups.filter((g) => PRIVILEGED_GROUPS.has(g.name)).map((g) => g.gid)]);
  const gid = pw?.gid ?? req.gid;
  const sharing = named.filter((n) => privileged.has(groups.find((g) => g.name === n)?.gid ?? -1));
  const problem =
    identityProblem({ uid: pw?.uid ?? req.uid, gid, home, groups: named }, rules)?.message ??
    (privileged.has(gid) ? `gid ${gid} is a privileged group's in the image` : undefined) ??
    (sharing.length
      ? `group ${sharing.join(", ")} has the gid of root or a privileged group in the image`
      : undefined) ??
    symlinkProblem(root, home);
  if (problem)
    throw new UserError(`identity refused for ${req.user}: ${problem}${pw ? " (an account of the image)" : ""}`);
}

function symlinkProblem(root: string, home: string): string | undefined {
  let p = "";
  for (const c of home.split("/").filter(Boolean)) {
    p += `/${c}`;
    let link = false;
    try {
      link = lstatSync(underRoot(root, p)).isSymbolicLink();
    } catch {
      return undefined; // missing from here on: created as directories
    }
    if (link) return `home ${home}: ${p} is a symbolic link`;
  }
  return undefined;
}

/** Creates the group, the user and the home when missing; returns the account to run the session as. */
export async function provision(req: ProvisionRequest, root = "/"): Promise<Account> {
  const rootArgs = root === "/" ? [] : ["--root", root];
  let pw = readPasswd(root).find((e) => e.name === req.user);
  let createdGroup: string | undefined;
  if (!pw) {
    const groups = readGroups(root);
    let group = groups.find((g) => g.gid === req.gid);
    if (!group) {
      if (groups.some((g) => g.name === req.user))
        throw new UserError(
          `cannot provision ${req.user}: a group of that name exists with another gid than ${req.gid}`,
        );
      await run(["groupadd", ...rootArgs, "-g", String(req.gid), req.user]);
      createdGroup = req.user;
      group = { name: req.user, gid: req.gid, members: [] };
    }
    const extra = req.groups.length ? ["-G", req.groups.join(",")] : [];
    try {
      // -M: the home is handled below (it may be a bind mount that exists already).
      await run([
        "useradd",
        ...rootArgs,
        "-M",
        "-d",
        req.home,
        "-g",
        String(req.gid),
        "-u",
        String(req.uid),
        "-s",
        req.shell,
        ...extra,
        req.user,
      ]);
    } catch (err) {
      // As the original: undo what this attempt created (never the home).
      if (createdGroup) await run(["groupdel", ...rootArgs, createdGroup], { allowFail: true });
      throw err;
    }
    log.info("user added", { user: req.user, uid: req.uid, gid: req.gid, root });
    pw = readPasswd(root).find((e) => e.name === req.user);
    if (!pw) throw new UserError(`useradd succeeded but ${req.user} is not in ${join(root, "etc/passwd")}`);
  } else if (pw.uid !== req.uid || pw.gid !== req.gid) {
    log.warn("user exists with other ids; keeping them", {
      user: req.user,
      uid: pw.uid,
      gid: pw.gid,
      wanted_uid: req.uid,
      wanted_gid: req.gid,
    });
  }
  const home = pw.home || req.home;
  ensureHome(root, home, pw.uid, pw.gid);
  const groups = readGroups(root)
    .filter((g) => g.members.includes(req.user) && g.gid !== pw!.gid)
    .map((g) => g.gid);
  return { user: req.user, uid: pw.uid, gid: pw.gid, home, shell: pw.shell || req.shell, groups };
}

/** Creates a missing home from ROOT/etc/skel; an existing one only gets its owner set. */
export function ensureHome(root: string, home: string, uid: number, gid: number): void {
  const dir = underRoot(root, home);
  if (!existsSync(dir)) {
    mkdirSync(dirname(dir), { recursive: true, mode: 0o755 });
    mkdirSync(dir, { mode: 0o700 });
    const skel = underRoot(root, "/etc/skel");
    if (existsSync(skel)) {
      for (const e of readdirSync(skel))
        cpSync(join(skel, e), join(dir, e), { recursive: true, preserveTimestamps: true });
      chownTree(dir, uid, gid);
    }
    log.info("home created", { home: dir });
  }
  const st = statSync(dir);
  if (st.uid !== uid || st.gid !== gid) chownSync(dir, uid, gid);
}

function chownTree(dir: string, uid: number, gid: number): void {
  chownSync(dir, uid, gid);
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) chownTree(p, uid, gid);
    else lchownSync(p, uid, gid);
  }
}

/** KEY=VALUE lines of the image's locale and environment files (quotes stripped). */
export function readEnvFiles(root: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const f of ["/etc/locale.conf", "/etc/default/locale", "/etc/environment"]) {
    const p = underRoot(root, f);
    if (!existsSync(p)) continue;
    for (const line of readFileSync(p, "utf8").split("\n")) {
      const m = /^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$/.exec(line);
      if (m) out[m[1]!] = m[2]!.trim().replace(/^(["'])(.*)\1$/, "$2");
    }
  }
  return out;
}
