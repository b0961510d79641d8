// `qvd install node|api|l7r [--root DIR] [--force]`: puts this binary, the role's systemd unit, a
// commented configuration file and (for a node) its logrotate file into DIR (default /). Writes
// nothing when everything is in place; replaces a file that differs only with --force, and never
// replaces the configuration file. The texts are in src/install/.
import { execFileSync } from "node:child_process";
import {
  chmodSync,
  chownSync,
  closeSync,
  copyFileSync,
  existsSync,
  mkdirSync,
  openSync,
  readFileSync,
  readSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { basename, dirname, isAbsolute, join, resolve } from "node:path";
import { defineCommand } from "citty";
import { Config, type ConfigKey, readConfigFile } from "../config.ts";
import { UserError } from "../errors.ts";
import { configText, roleKeys } from "../install/config-file.ts";
import {
  BINARY,
  configPath,
  LOGROTATE_PATH,
  logrotateText,
  type Role,
  ROLES,
  type UnitContext,
  unitName,
  unitPath,
  unitText,
} from "../install/units.ts";
import { VERSION } from "../version.ts";

/** The settings of the role's file that shape its unit: where it writes, which ports it binds. */
const UNIT_PATH_KEYS = new Set<string>([
  "path.run",
  "path.storage.root",
  "path.storage.images",
  "path.storage.homes",
  "path.storage.overlays",
  "vm.lxc.path",
  "vm.kvm.path",
  "l7r.listen.unix",
  "cluster.peer.port",
]);
/** The keys giving an ADDRESS:PORT to listen on (api.listen, l7r.listen, *.metrics.listen…). */
const isListenKey = (k: string) => /(^|\.)listen$/.test(k);

/** The existing configuration's values of those keys (defaults when there is no file yet). */
function unitSettings(root: string, role: Role): Config {
  const file = join(root, configPath(role));
  if (!existsSync(file)) return new Config();
  return new Config(readConfigFile(file).filter((s) => UNIT_PATH_KEYS.has(s.key) || isListenKey(s.key)));
}

/** `paths` without those inside another one of them. */
function outermost(paths: string[]): string[] {
  const sorted = [...new Set(paths)].sort((a, b) => a.length - b.length);
  return sorted.filter((p, i) => !sorted.slice(0, i).some((q) => q === "/" || p.startsWith(q + "/")));
}

/** A path the unit names: absolute, and without blanks (systemd's lists are blank-separated). */
function absolute(k: ConfigKey, p: string): string {
  if (!isAbsolute(p) || /\s/.test(p))
    throw new UserError(`${k} = ${p}: the unit needs an absolute path without blanks`);
  return resolve(p);
}

/** A port below 1024 among the role's listening addresses (and the node-to-node port). */
function lowPort(role: Role, cfg: Config): boolean {
  const ports = roleKeys(role)
    .filter(isListenKey)
    .map((k) => /:(\d+)$/.exec(String(cfg.get(k)))?.[1]);
  if (role !== "api") ports.push(String(cfg.get("cluster.peer.port")));
  return ports.some((p) => p !== undefined && Number(p) > 0 && Number(p) < 1024);
}

/** The role's unit's paths (its state under /run as RuntimeDirectory=, the rest to create and allow) and ports. */
export function unitContext(role: Role, cfg: Config): UnitContext & { logDirs: string[] } {
  const run = absolute("path.run", cfg.get("path.run"));
  const unixListen = cfg.get("l7r.listen.unix");
  const state: string[] = [];
  const storage: string[] = [];
  let logDirs: string[] = [];
  if (role === "api") {
    storage.push(absolute("path.storage.images", cfg.storagePath("path.storage.images")));
  } else {
    state.push(run);
    if (unixListen) state.push(dirname(absolute("l7r.listen.unix", unixListen)));
  }
  if (role === "node") {
    const lxc = absolute("vm.lxc.path", cfg.get("vm.lxc.path") || join(run, "lxc"));
    const kvm = absolute("vm.kvm.path", cfg.get("vm.kvm.path") || join(run, "kvm"));
    // /run/lxc: LXC's own lock files.
    state.push(lxc, kvm, "/run/lxc");
    logDirs = [join(lxc, "logs"), join(kvm, "logs")];
    storage.push(absolute("path.storage.root", cfg.get("path.storage.root")));
    for (const k of ["path.storage.images", "path.storage.homes", "path.storage.overlays"] as const)
      storage.push(absolute(k, cfg.storagePath(k)));
  }
  const all = outermost([...state, ...storage]);
  const underRun = (p: string) => p.startsWith("/run/") && !p.startsWith("/run/user/");
  return {
    runtimeDirs: all.filter(underRun).map((p) => p.slice("/run/".length)),
    writable: all.filter((p) => !underRun(p)),
    mounts: outermost(storage),
    lowPort: lowPort(role, cfg),
    logDirs,
  };
}

type State = "new" | "same" | "differs" | "kept";

interface Planned {
  /** The path on the target system. */
  path: string;
  what: string;
  mode: number;
  /** The text to write, or the file to copy. */
  content: string | { copyOf: string };
  /** Never replaced once it exists. */
  keep?: boolean;
  state?: State;
  why?: string;
}

function sameBytes(a: string, b: string): boolean {
  const [sa, sb] = [statSync(a), statSync(b)];
  if (sa.size !== sb.size) return false;
  const [fa, fb] = [openSync(a, "r"), openSync(b, "r")];
  try {
    const [ba, bb] = [Buffer.alloc(1 << 20), Buffer.alloc(1 << 20)];
    for (;;) {
      const n = readSync(fa, ba, 0, ba.length, null);
      const m = readSync(fb, bb, 0, bb.length, null);
      if (n !== m || !ba.subarray(0, n).equals(bb.subarray(0, m))) return false;
      if (n === 0) return true;
    }
  } finally {
    closeSync(fa);
    closeSync(fb);
  }
}

function fsError(err: unknown, what: string): UserError {
  const code = (err as NodeJS.ErrnoException).code;
  const why =
    code === "EACCES" || code === "EPERM"
      ? "permission denied"
      : code === "EROFS"
        ? "read-only file system"
        : code === "ENOTDIR"
          ? "a path component is not a directory"
          : (err as Error).message;
  return new UserError(`cannot ${what}: ${why}`);
}

/** Compares the planned file with what is on the target. */
function inspect(root: string, f: Planned): void {
  const abs = join(root, f.path);
  let st;
  try {
    st = statSync(abs);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return void (f.state = "new");
    throw fsError(err, `read ${abs}`);
  }
  if (f.keep) return void (f.state = "kept");
  if (!st.isFile()) throw new UserError(`${abs} exists and is not a file`);
  let same: boolean;
  try {
    same = typeof f.content === "string" ? readFileSync(abs, "utf8") === f.content : sameBytes(abs, f.content.copyOf);
  } catch (err) {
    throw fsError(err, `read ${abs}`);
  }
  const modeOk = (st.mode & 0o7777) === f.mode;
  f.state = same && modeOk ? "same" : "differs";
  if (!same) f.why = "content";
  else if (!modeOk)
    f.why = `mode ${(st.mode & 0o7777).toString(8).padStart(4, "0")}, not ${f.mode.toString(8).padStart(4, "0")}`;
}

/** Writes the file next to its place, then renames it there (a running qvd binary can be replaced). */
function put(root: string, f: Planned, gid: number): void {
  const abs = join(root, f.path);
  const tmp = join(dirname(abs), `.${basename(abs)}.qvd-install-${process.pid}`);
  try {
    mkdirSync(dirname(abs), { recursive: true, mode: 0o755 });
    if (typeof f.content === "string") writeFileSync(tmp, f.content, { mode: f.mode });
    else copyFileSync(f.content.copyOf, tmp);
    chmodSync(tmp, f.mode);
    chownSync(tmp, 0, gid);
    renameSync(tmp, abs);
  } catch (err) {
    rmSync(tmp, { force: true });
    throw fsError(err, `write ${abs}`);
  }
}

/** The user's or group's id from the system's databases (NSS), or undefined. */
function getent(db: "passwd" | "group", name: string): number | undefined {
  try {
    return Number(execFileSync("getent", [db, name], { encoding: "utf8" }).split(":")[2]);
  } catch {
    return undefined;
  }
}

const USERADD = [
  "useradd",
  "--system",
  "--user-group",
  "--home-dir",
  "/nonexistent",
  "--no-create-home",
  "--shell",
  "/usr/sbin/nologin",
  "--comment",
  "QVD admin API",
  "qvd",
];
const USERADD_LINE = USERADD.map((a) => (/\s/.test(a) ? `'${a}'` : a)).join(" ");

/** systemd is the running init (sd_booted()'s test). */
const systemdRuns = () => existsSync("/run/systemd/system");

export interface InstallResult {
  files: Planned[];
  changed: boolean;
  notes: string[];
}

export function install(role: Role, root: string, opts: { force?: boolean; binary: string }): InstallResult {
  const onHost = root === "/";
  const cfg = unitSettings(root, role);
  const ctx = unitContext(role, cfg);
  const files: Planned[] = [
    { path: BINARY, what: `qvd ${VERSION}`, mode: 0o755, content: { copyOf: opts.binary } },
    { path: unitPath(role), what: "systemd unit", mode: 0o644, content: unitText(role, ctx) },
    { path: configPath(role), what: "configuration", mode: 0o640, content: configText(role), keep: true },
  ];
  if (role === "node")
    files.push({
      path: LOGROTATE_PATH,
      what: "logrotate, per-desktop logs",
      mode: 0o644,
      content: logrotateText(ctx.logDirs),
    });
  for (const f of files) inspect(root, f);

  const differing = files.filter((f) => f.state === "differs");
  if (differing.length && !opts.force)
    throw new UserError(
      `${differing.length === 1 ? "this file differs" : "these files differ"} from what \`qvd install ${role}\` writes: ` +
        `${differing.map((f) => `${join(root, f.path)} (${f.why})`).join(", ")}. Nothing was changed; run again with --force to replace ` +
        `${differing.length === 1 ? "it" : "them"} (${configPath(role)} is never replaced).`,
    );

  const notes: string[] = [];
  // Kept as it is, but it holds the database password: say so when others may read it.
  for (const f of files.filter((f) => f.state === "kept")) {
    const m = statSync(join(root, f.path)).mode & 0o777;
    if (m & 0o007)
      notes.push(
        `${f.path} is mode ${m.toString(8).padStart(4, "0")}: it holds the database password, make it 0640 (chmod 0640 ${f.path})`,
      );
  }
  let changed = false;
  let gid = 0;
  if (role === "api") {
    if (onHost) {
      if (getent("passwd", "qvd") === undefined) {
        try {
          execFileSync(USERADD[0]!, USERADD.slice(1), { stdio: ["ignore", "ignore", "pipe"] });
        } catch (err) {
          throw new UserError(
            `cannot create the user qvd the API runs as (${USERADD_LINE}): ${String((err as { stderr?: Buffer }).stderr ?? (err as Error).message).trim()}`,
          );
        }
        notes.push("created the system user qvd (the API runs as it)");
        changed = true;
      }
      gid = getent("group", "qvd") ?? 0;
    } else {
      notes.push(
        `the API runs as the user qvd: on the target, \`${USERADD_LINE}\`, then \`chgrp qvd ${configPath("api")}\` and \`chown qvd:qvd ${ctx.writable.join(" ")}\``,
      );
    }
  }

  const write = files.filter((f) => f.state === "new" || f.state === "differs");
  for (const f of write) put(root, f, f.keep ? gid : 0);
  if (write.length) changed = true;

  // The directories the sandbox lets the role write must exist, or the unit does not start.
  for (const d of ctx.writable) {
    const abs = join(root, d);
    if (existsSync(abs)) {
      if (role === "api" && onHost && statSync(abs).uid !== getent("passwd", "qvd"))
        notes.push(`${d} is not owned by qvd: uploads need \`chown qvd:qvd ${d}\``);
      continue;
    }
    try {
      // Parents open to all (the API's user must reach its folder); the API's folder its own.
      mkdirSync(dirname(abs), { recursive: true, mode: 0o755 });
      mkdirSync(abs, { mode: role === "api" ? 0o750 : 0o755 });
      if (role === "api" && onHost) chownSync(abs, getent("passwd", "qvd") ?? 0, gid);
    } catch (err) {
      throw fsError(err, `create ${abs}`);
    }
    notes.push(`created ${d}`);
    changed = true;
  }

  if (onHost && write.some((f) => f.path === unitPath(role))) {
    if (systemdRuns()) {
      try {
        execFileSync("systemctl", ["daemon-reload"], { stdio: ["ignore", "ignore", "pipe"] });
        notes.push("systemd reloaded its units");
      } catch (err) {
        notes.push(
          `systemctl daemon-reload failed: ${String((err as { stderr?: Buffer }).stderr ?? (err as Error).message).trim()}`,
        );
      }
    } else notes.push("systemd is not running here: run `systemctl daemon-reload` once it is");
  }
  return { files, changed, notes };
}

const LABEL: Record<State, string> = { new: "created", same: "unchanged", differs: "replaced", kept: "kept" };

function nextSteps(role: Role, onHost: boolean): string[] {
  const conf = configPath(role);
  const fill =
    role === "api"
      ? "database.url, api.tls.cert and api.tls.key"
      : "database.url, nodename, l7r.tls.* and the farm certificate (cluster.tls.*, `qvd farm cert`)";
  return [
    "Next:",
    `  1. Edit ${conf}: ${fill}.`,
    `  2. Bring the database schema up to date with this binary (once per farm): ${BINARY} db migrate --config ${conf}`,
    `  3. ${onHost ? "" : "On the target: systemctl daemon-reload; "}systemctl enable --now ${unitName(role).replace(/\.service$/, "")}` +
      `   (logs: journalctl -u ${unitName(role)})`,
  ];
}

export default defineCommand({
  meta: {
    name: "install",
    description:
      "Install this binary, a hardened systemd unit, a commented configuration file and log rotation for a role",
  },
  args: {
    role: { type: "positional", description: `The role: ${ROLES.join(", ")}`, required: true, valueHint: "ROLE" },
    root: {
      type: "string",
      description: "Install into this directory instead of / (an image or a chroot being prepared)",
      valueHint: "DIR",
      default: "/",
    },
    force: {
      type: "boolean",
      description: "Replace the binary, unit and logrotate file where they differ (never the configuration file)",
    },
  },
  run({ args }) {
    const role = args.role as Role;
    if (!ROLES.includes(role))
      throw new UserError(`unknown role "${args.role}": expected one of ${ROLES.join(", ")}`, 2);
    // Bun running the sources: there is no qvd binary to install.
    if (basename(process.execPath) === "bun" || basename(process.execPath) === "bun.exe")
      throw new UserError(
        "qvd install copies the running qvd binary, and this is bun running the sources: build the binary first (bun scripts/build-binaries.ts makes dist/qvd), then run dist/qvd install " +
          role,
      );
    const root = resolve(args.root || "/");
    let isDir = false;
    try {
      isDir = statSync(root).isDirectory();
    } catch {}
    if (!isDir) throw new UserError(`--root ${args.root}: no such directory`, 2);
    const res = install(role, root, { force: args.force, binary: process.execPath });
    console.log(`qvd install ${role}${root === "/" ? "" : ` into ${root}`}:`);
    for (const f of res.files) {
      const label = f.state === "kept" ? "kept (never overwritten)" : LABEL[f.state!];
      console.log(
        `  ${label.padEnd(24)} ${f.path}  (${f.what}${f.state === "differs" ? `; it differed: ${f.why}` : ""})`,
      );
    }
    for (const n of res.notes) console.log(`  ${n}`);
    if (!res.changed) {
      console.log("Nothing to do: everything was already in place.");
      return;
    }
    for (const l of nextSteps(role, root === "/")) console.log(l);
  },
});
