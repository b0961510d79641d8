// `qvd node --check`: whether this machine can be a node, one line per requirement (ok, warn,
// fail, and how to fix it). It covers both halves of `qvd node` (the HKD's kernel, tools,
// images and storage; the L7R's certificates and browser sessions) and their shared database.
// Read-only: it starts no desktop, creates no bridge or firewall, takes no lock and writes
// nothing but a probe file it removes at once (storage writability). The KVM probe of
// src/virt/registry.ts does run a short test VM under /dev/kvm (with a temporary log file) when
// vm.kvm.accel is auto or kvm, exactly as `qvd node` does before it settles the accelerator.
//
// Each check is a function of a shared context (one database connection, memoised probes),
// run with a time limit; all run at once and are printed in order as they finish.
import { createPrivateKey, randomBytes, X509Certificate } from "node:crypto";
import {
  accessSync,
  closeSync,
  constants,
  existsSync,
  openSync,
  readdirSync,
  readFileSync,
  rmSync,
  statfsSync,
  statSync,
} from "node:fs";
import { release } from "node:os";
import { basename, dirname, join } from "node:path";
import { gunzipSync } from "node:zlib";
import { maskUrl } from "../cli.ts";
import type { Config } from "../config.ts";
import { listConfigRows } from "../db/configs.ts";
import { dis as disDef } from "../db/dis.ts";
import { hosts as hostsDef } from "../db/hosts.ts";
import { ALL_TENANTS, list } from "../db/objects.ts";
import { osfs as osfsDef } from "../db/osfs.ts";
import { connect, databaseClock, ping, type Sql } from "../db/pool.ts";
import { schemaStatus, type SchemaStatus } from "../db/schema.ts";
import { UserError } from "../errors.ts";
import { nodeTls } from "../farm/certs.ts";
import { run } from "../run.ts";
import type { Hypervisor } from "../virt/backend.ts";
import { isImageFileName } from "../virt/images.ts";
import { isQcow2 } from "../virt/kvm-image.ts";
import { detectCgroups } from "../virt/lxc.ts";
import { configuredHypervisors, type DriverStatus, probeKvm, probeLxc } from "../virt/registry.ts";

export type Level = "ok" | "warn" | "fail";

export interface CheckResult {
  level: Level;
  /** The requirement, e.g. "path.storage.root". */
  what: string;
  /** What was found (the figure, the file, the error). */
  detail?: string;
  /** For warn and fail: what the administrator does about it. */
  fix?: string;
  /** False when another failure kept this one from being checked (reported as a warning). */
  checked?: false;
}

type Outcome = Omit<CheckResult, "what">;

export interface Check {
  what: string;
  /** Seconds before the check counts as failed (default 10). */
  timeoutS?: number;
  run(ctx: CheckContext): Promise<Outcome>;
}

export interface CheckOptions {
  /** `--register --address ADDR` were given with --check: the node would register itself. */
  register?: boolean;
  address?: string;
}

/** Exit status when a check failed: the node cannot run desktops (UserError's status, src/errors.ts). */
export const CHECK_FAILED = 1;

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;
const DAY_MS = 86_400_000;
/** Free space under which storage is a warning, and a failure (path.run holds only small files). */
const SPACE_LIMITS = { storage: { warn: 5 * GiB, fail: 512 * MiB }, run: { warn: 256 * MiB, fail: 16 * MiB } };
const CERT_WARN_DAYS = 30;
const CLOCK = { warnS: 2, failS: 30 };
const NFS_SUPER_MAGIC = 0x6969;

const ok = (detail?: string): Outcome => ({ level: "ok", detail });
const warn = (detail: string, fix: string): Outcome => ({ level: "warn", detail, fix });
const fail = (detail: string, fix: string): Outcome => ({ level: "fail", detail, fix });
/** A requirement another failure keeps from being checked: a warning, counted apart. */
const notChecked = (why: string, see: string): Outcome => ({
  level: "warn",
  detail: `not checked: ${why}`,
  fix: see,
  checked: false,
});

/** Passwords in URLs never reach the output, whatever a message quotes. */
const scrub = (s: string) =>
  s.replace(/(\w+:\/\/[^:@/\s]*:)[^@\s]*@/g, "$1********@").replace(/([?&]password=)[^&\s]*/g, "$1********");

const which = (prog: string) => Bun.which(prog, { PATH: `${process.env.PATH ?? ""}:/usr/sbin:/sbin` });

const errCode = (err: unknown) => (err as NodeJS.ErrnoException).code;
const fileError = (err: unknown) =>
  errCode(err) === "ENOENT" ? "no such file" : errCode(err) === "EACCES" ? "permission denied" : (err as Error).message;

const gib = (bytes: number) => (bytes >= GiB ? `${(bytes / GiB).toFixed(1)} GiB` : `${Math.round(bytes / MiB)} MiB`);
const day = (d: Date) => d.toISOString().slice(0, 10);

// --- the shared context -----------------------------------------------------------------------

interface DbState {
  sql?: Sql;
  /** Why the database cannot be used (masked URL included). */
  error?: string;
}

export class CheckContext {
  private dbState?: Promise<DbState>;
  private schema?: Promise<SchemaStatus | undefined>;
  private probes?: Promise<DriverStatus[]>;
  private kconfig?: Map<string, string> | null;
  readonly hypervisors: Hypervisor[];

  constructor(
    readonly cfg: Config,
    readonly opts: CheckOptions = {},
  ) {
    this.hypervisors = configuredHypervisors(cfg);
  }

  /** One connection for every check, with a short timeout: a check must not hang on it. */
  db(): Promise<DbState> {
    return (this.dbState ??= (async () => {
      const url = this.cfg.databaseUrl();
      let sql: Sql | undefined;
      try {
        sql = connect(url, {
          max: 2,
          connectTimeout: Math.min(5, this.cfg.get("database.connect_timeout")),
          applicationName: "qvd-check",
        });
        await ping(sql);
        return { sql };
      } catch (err) {
        await sql?.end({ timeout: 1 }).catch(() => {});
        const e = err as NodeJS.ErrnoException;
        return { error: `cannot connect to ${maskUrl(url)}: ${e.message || e.code || String(err)}` };
      }
    })());
  }

  /** The schema's state, or undefined without a database. */
  schemaStatus(): Promise<SchemaStatus | undefined> {
    return (this.schema ??= this.db().then((d) => (d.sql ? schemaStatus(d.sql) : undefined)));
  }

  /** The database when its schema is this binary's (queries of src/db/ may be used on it). */
  async current(): Promise<Sql | undefined> {
    const st = await this.schemaStatus();
    return st && st.version === st.latest ? (await this.db()).sql : undefined;
  }

  /** The registry's probes of the configured backends, once for every line that reports them. */
  backendProbes(): Promise<DriverStatus[]> {
    return (this.probes ??= Promise.all(this.hypervisors.map((k) => (k === "lxc" ? probeLxc() : probeKvm(this.cfg)))));
  }

  /** The running kernel's build configuration (/proc/config.gz or /boot), or null when absent. */
  kernelConfig(): Map<string, string> | null {
    if (this.kconfig !== undefined) return this.kconfig;
    let text: string | undefined;
    try {
      text = gunzipSync(readFileSync("/proc/config.gz")).toString("utf8");
    } catch {
      try {
        text = readFileSync(`/boot/config-${release()}`, "utf8");
      } catch {}
    }
    this.kconfig = text ? new Map([...text.matchAll(/^(CONFIG_\w+)=(.*)$/gm)].map((m) => [m[1]!, m[2]!])) : null;
    return this.kconfig;
  }

  async close(): Promise<void> {
    const d = await this.dbState;
    await d?.sql?.end({ timeout: 1 }).catch(() => {});
  }
}

const NO_DB = notChecked("the database cannot be used", "see the database line");
const OLD_SCHEMA = notChecked("the database's schema is not this qvd's", "see the schema version line");

/** The reason a database-backed check cannot run, or undefined when it can. */
async function dbUnusable(ctx: CheckContext): Promise<Outcome | undefined> {
  if (!(await ctx.db()).sql) return NO_DB;
  if (!(await ctx.current())) return OLD_SCHEMA;
  return undefined;
}

// --- the machine ----------------------------------------------------------------------------------

const rootCheck: Check = {
  what: "running as root",
  async run() {
    const uid = process.getuid?.() ?? -1;
    if (uid === 0) return ok();
    return fail(
      `running as uid ${uid}: the HKD creates containers, bridges and firewall rules, and the other results below may be wrong`,
      "run qvd node (and this check) as root",
    );
  },
};

/**
 * A kernel feature: present now, built in, or a module modprobe can load (a dry run: nothing is
 * loaded). Without the kernel's configuration, modprobe's answer is all there is to go on.
 */
async function kernelFeature(
  ctx: CheckContext,
  f: { config: string; module: string; present: () => boolean },
): Promise<Outcome> {
  if (f.present()) return ok("in the running kernel");
  const conf = ctx.kernelConfig();
  const v = conf?.get(f.config);
  if (v === "y") return ok("built into the kernel");
  if (conf && v !== "m")
    return fail(
      `kernel ${release()} is built without it (${f.config} is not set)`,
      `boot a kernel with ${f.config} (Debian's own kernels have it)`,
    );
  const modprobe = which("modprobe");
  const probe = modprobe
    ? await run([modprobe, "-n", "-q", f.module], { allowFail: true, timeoutMs: 5000 }).catch(() => undefined)
    : undefined;
  if (probe?.status === 0) return ok(`module ${f.module}, loaded when first used`);
  if (v === "m")
    return fail(
      `module ${f.module} is not installed for kernel ${release()}`,
      `install this kernel's modules (apt-get install linux-image-${release()})`,
    );
  return warn(
    `cannot tell: no kernel configuration (/proc/config.gz, /boot/config-${release()}) and modprobe does not find ${f.module}`,
    `modprobe ${f.module}, then check again`,
  );
}

const cgroupCheck: Check = {
  what: "cgroups (memory, cpu)",
  async run() {
    const mountinfo = readFileSync("/proc/self/mountinfo", "utf8");
    if (!/ - cgroup2? /.test(mountinfo))
      return fail(
        "no cgroup hierarchy is mounted: LXC cannot start containers",
        "mount cgroup2 on /sys/fs/cgroup (systemd does at boot)",
      );
    const c = detectCgroups(mountinfo);
    const found = `memory ${c.memory ?? "missing"}, cpu ${c.cpu ?? "missing"}`;
    const missing = (["memory", "cpu"] as const).filter((k) => c[k] === null);
    // The HKD starts desktops without them (src/virt/lxc.ts logs it): unlimited, not refused.
    if (missing.length)
      return warn(
        `${found}: desktops' ${missing.join(" and ")} use is not limited`,
        `enable the ${missing.join(" and ")} controller${missing.length > 1 ? "s" : ""} (cgroup v2: +${missing.join(" +")} in /sys/fs/cgroup/cgroup.subtree_control; kernel command line cgroup_enable=memory)`,
      );
    return ok(found);
  },
};

const userNsCheck: Check = {
  what: "user namespaces",
  async run() {
    if (!existsSync("/proc/self/ns/user"))
      return fail(
        "this kernel has no user namespaces (CONFIG_USER_NS): desktops are unprivileged containers and need them",
        "boot a kernel with CONFIG_USER_NS",
      );
    const read = (f: string) => {
      try {
        return Number(readFileSync(f, "utf8").trim());
      } catch {
        return undefined;
      }
    };
    const max = read("/proc/sys/user/max_user_namespaces");
    if (max === 0)
      return fail(
        "user.max_user_namespaces is 0: no container can be created",
        "sysctl -w user.max_user_namespaces=15000, and set it in /etc/sysctl.d/",
      );
    // Root creates the containers whatever this says; it matters to desktop users inside them.
    const clone = read("/proc/sys/kernel/unprivileged_userns_clone");
    if (clone === 0)
      return warn(
        "kernel.unprivileged_userns_clone is 0: desktop users cannot create user namespaces, so browsers' sandboxes (Chromium) fail in desktops",
        "sysctl -w kernel.unprivileged_userns_clone=1, and set it in /etc/sysctl.d/",
      );
    return ok(max === undefined ? "enabled" : `user.max_user_namespaces = ${max}`);
  },
};

const overlayCheck: Check = {
  what: "overlayfs",
  run: (ctx) =>
    kernelFeature(ctx, {
      config: "CONFIG_OVERLAY_FS",
      module: "overlay",
      present: () => /\toverlay$/m.test(readFileSync("/proc/filesystems", "utf8")),
    }),
};

const bridgeCheck: Check = {
  what: "bridge (kernel)",
  run: (ctx) =>
    kernelFeature(ctx, { config: "CONFIG_BRIDGE", module: "bridge", present: () => existsSync("/sys/module/bridge") }),
};

const vethCheck: Check = {
  what: "veth (kernel)",
  run: (ctx) =>
    kernelFeature(ctx, { config: "CONFIG_VETH", module: "veth", present: () => existsSync("/sys/module/veth") }),
};

const tunCheck: Check = {
  what: "/dev/net/tun",
  async run(ctx) {
    const driver = await kernelFeature(ctx, {
      config: "CONFIG_TUN",
      module: "tun",
      present: () => existsSync("/sys/class/misc/tun"),
    });
    if (driver.level !== "ok") return { ...driver, detail: `${driver.detail}: KVM desktops get no network` };
    if (!existsSync("/dev/net/tun"))
      return fail(
        "the tun driver is there but /dev/net/tun is missing: KVM desktops get no network",
        "mkdir -p /dev/net && mknod /dev/net/tun c 10 200",
      );
    return ok(driver.detail);
  },
};

/** One backend's line: the registry's probe, failed only when no configured backend can run. */
function backendCheck(kind: Hypervisor): Check {
  return {
    what: `${kind} backend`,
    // KVM's probe may run a test VM for up to 8 s (src/virt/registry.ts kvmWorks).
    timeoutS: 30,
    async run(ctx) {
      const all = await ctx.backendProbes();
      const s = all.find((p) => p.kind === kind)!;
      if (!s.available) {
        const others = all.filter((p) => p.available).map((p) => p.kind);
        const fix = `install what is missing, or take ${kind} out of vm.hypervisor (now ${ctx.cfg.get("vm.hypervisor")})`;
        return others.length
          ? warn(`${s.reason}; the node leaves ${kind} out and runs ${others.join(", ")} only`, fix)
          : fail(`${s.reason}; no configured backend can run here`, fix);
      }
      if (kind === "kvm" && s.accel === "tcg" && ctx.cfg.get("vm.kvm.accel") === "auto")
        return warn(
          s.reason,
          "make /dev/kvm work here (hardware virtualisation on, the kvm_intel or kvm_amd module), or set vm.kvm.accel = tcg to accept software emulation",
        );
      return ok(s.reason);
    },
  };
}

const networkToolsCheck: Check = {
  what: "network tools",
  async run(ctx) {
    const firewall = ctx.cfg.get("vm.network.firewall.enable");
    const tools = ["ip", "bridge", ...(firewall ? ["nft"] : [])];
    const missing = tools.filter((t) => !which(t));
    if (missing.length)
      return fail(
        `missing ${missing.join(", ")}: the node's bridge${firewall ? " and firewall" : ""} cannot be set up`,
        "apt-get install iproute2 nftables",
      );
    return ok(tools.join(", "));
  },
};

const vmBridgeCheck: Check = {
  what: "VM bridge",
  async run(ctx) {
    const br = ctx.cfg.get("vm.network.bridge");
    const dev = join("/sys/class/net", br);
    const create = ctx.cfg.get("vm.network.bridge.create");
    if (existsSync(dev) && !existsSync(join(dev, "bridge")))
      return fail(`${br} exists but is not a bridge`, `remove it, or name another bridge in vm.network.bridge`);
    if (existsSync(dev)) return ok(`${br} exists${create ? "" : " (vm.network.bridge.create is off: used as it is)"}`);
    if (create) return ok(`${br}: created at start`);
    return fail(
      `${br} does not exist and vm.network.bridge.create is off`,
      `create it (ip link add ${br} type bridge, with the VMs' gateway address), or set vm.network.bridge.create = 1`,
    );
  },
};

const qvdBinaryCheck: Check = {
  what: "qvd binary for desktops",
  async run(ctx) {
    // As src/roles/hkd.ts chooses it: hkd.qvd_binary, else this program when it is the compiled qvd.
    const configured = ctx.cfg.get("hkd.qvd_binary");
    const bin = configured || (!/^bun(\.exe)?$/.test(basename(process.execPath)) ? process.execPath : undefined);
    if (!bin)
      return fail(
        "running from sources: desktops need a compiled qvd",
        "set hkd.qvd_binary to a compiled qvd (npm run build makes dist/qvd)",
      );
    try {
      if (!statSync(bin).isFile()) return fail(`${bin} is not a file`, "set hkd.qvd_binary to the compiled qvd");
      accessSync(bin, constants.X_OK);
    } catch (err) {
      return fail(
        `${bin}: ${errCode(err) === "EACCES" ? "not executable" : fileError(err)}`,
        "set hkd.qvd_binary to the compiled qvd",
      );
    }
    return ok(bin);
  },
};

// --- images -----------------------------------------------------------------------------------

const noImageFix = (kind: Hypervisor) =>
  `build one (qvd di build${kind === "kvm" ? " --kvm" : ""}) and add it as a disk image of a${kind === "kvm" ? " KVM" : "n LXC"} OSF: qvd admin di new osf=NAME path=FILE, then upload the file (PUT /api/v1/dis/ID/image, or the WAT's Images screen)`;

/** The newest usable image of `kind` the database lists, or the newest such file without a database. */
async function newestImage(
  ctx: CheckContext,
  kind: Hypervisor,
): Promise<{ file: string; label: string } | { none: string }> {
  const dir = ctx.cfg.storagePath("path.storage.images");
  const sql = await ctx.current();
  if (sql) {
    const osfs = await list(sql, osfsDef, ALL_TENANTS, {
      filters: [{ field: "hypervisor", op: "=", value: kind }],
      fields: ["id"],
      limit: 10_000,
    });
    if (osfs.rows.length) {
      const found = await list(sql, disDef, ALL_TENANTS, {
        filters: [
          { field: "osf_id", op: "in", value: osfs.rows.map((o) => String(o.id)) },
          { field: "state", op: "in", value: ["ready", "published"] },
          { field: "blocked", op: "=", value: "false" },
        ],
        sort: [{ field: "created_at", desc: true }],
        limit: 1,
      });
      const di = found.rows[0];
      if (di) return { file: join(dir, di.path), label: `disk image ${di.id} of OSF ${di.osf_name}` };
    }
    return { none: `no usable ${kind} disk image in the database yet` };
  }
  // No database: any image file will do, the newest first.
  let names: string[] = [];
  try {
    names = readdirSync(dir);
  } catch {}
  const files = names
    .map((n) => join(dir, n))
    .filter((f) => (kind === "lxc" ? isImageFileName(f) : isQcow2(f)))
    .map((f) => ({ f, t: statSync(f, { throwIfNoEntry: false })?.mtimeMs ?? 0 }))
    .sort((a, b) => b.t - a.t);
  if (!files.length) return { none: `no ${kind === "lxc" ? "image tarball" : "qcow2 image"} in ${dir} yet` };
  return { file: files[0]!.f, label: "the newest image file (no database to ask)" };
}

/** Whether the tarball holds `member` (a path without the leading /); stops at the first match. */
async function tarHas(
  file: string,
  member: string,
  timeoutMs: number,
): Promise<{ found: boolean } | { error: string }> {
  // Archives name members "usr/…" or "./usr/…": --no-anchored matches both (and deeper
  // ".../usr/bin/nxagent" too, so the name is compared after).
  const wanted = (n: string) => n.replace(/^(\.\/|\/)+/, "") === member;
  // One deadline for both listings: tar is killed at it, never left reading after we exit.
  const deadline = Date.now() + timeoutMs;
  const listing = (first: boolean) =>
    run(["tar", "-t", "-f", file, "--no-anchored", ...(first ? ["--occurrence=1"] : []), member], {
      allowFail: true,
      timeoutMs: Math.max(1, deadline - Date.now()),
      env: { LC_ALL: "C" },
    });
  let r = await listing(true);
  if (r.status === 0 && !r.stdout.split("\n").some(wanted) && Date.now() < deadline) r = await listing(false);
  if (Date.now() >= deadline) return { error: `not read to the end within ${timeoutMs / 1000} s` };
  if (r.stdout.split("\n").some(wanted)) return { found: true };
  if (r.status === 0 || /Not found in archive/.test(r.stderr)) return { found: false };
  return {
    error:
      r.stderr
        .trim()
        .split("\n")
        .filter((l) => !/Exiting with failure/.test(l))
        .slice(-2)
        .join(" / ") || `tar exited with ${r.status}`,
  };
}

function imageCheck(kind: Hypervisor): Check {
  const tarLimitMs = 25_000;
  return {
    what: kind === "lxc" ? "nxagent in the newest image" : "newest KVM image",
    timeoutS: 30,
    async run(ctx) {
      const img = await newestImage(ctx, kind);
      if ("none" in img) return warn(`no image yet: ${img.none}`, noImageFix(kind));
      const st = statSync(img.file, { throwIfNoEntry: false });
      if (!st?.isFile())
        return fail(`${img.file} (${img.label}) is missing`, "is the shared storage mounted? (path.storage.images)");
      if (kind === "kvm") {
        if (!isQcow2(img.file))
          return fail(`${img.file} (${img.label}) is not a qcow2 disk`, `check it with qvd di check ${img.file}`);
        return ok(`${img.file} (${img.label}): a qcow2 disk (nxagent inside is not inspected)`);
      }
      // The VMA runs the node's vma.command.nxagent (src/vma/node-settings.ts), inside the image.
      const agent = ctx.cfg.get("vma.command.nxagent");
      const member = agent.startsWith("/") ? agent.slice(1) : `usr/bin/${agent}`;
      const r = await tarHas(img.file, member, tarLimitMs);
      if ("error" in r)
        return r.error.startsWith("not read")
          ? warn(`${img.file} (${img.label}): ${r.error}`, `check it with qvd di check ${img.file}`)
          : fail(`${img.file} (${img.label}) cannot be read: ${r.error}`, `check it with qvd di check ${img.file}`);
      if (!r.found)
        return fail(
          `${img.file} (${img.label}) has no /${member}: its desktops cannot show a session`,
          "install nxagent in the image (images of qvd di build have it), or set vma.command.nxagent to where it is",
        );
      return ok(`/${member} in ${img.file} (${img.label})`);
    },
  };
}

const browserCheck: Check = {
  what: "browser desktop (l7r.web)",
  async run(ctx) {
    if (!ctx.cfg.get("l7r.web")) return ok("l7r.web is off: not needed");
    const progs = { Xvnc: ctx.cfg.get("l7r.web.xvnc"), nxproxy: ctx.cfg.get("l7r.web.nxproxy") };
    const missing = Object.values(progs).filter((p) => !which(p));
    if (missing.length)
      return warn(
        `missing ${missing.join(", ")}: desktops in a web browser fail (NX clients are not affected)`,
        "apt-get install tigervnc-standalone-server nxproxy, or set l7r.web = 0",
      );
    return ok(
      Object.values(progs)
        .map((p) => which(p))
        .join(", "),
    );
  },
};

// --- storage ----------------------------------------------------------------------------------

/** Creates and removes a file in `dir`: the one write of this command's own. */
function writable(dir: string): string | undefined {
  const probe = join(dir, `.qvd-check-${process.pid}-${randomBytes(4).toString("hex")}`);
  try {
    closeSync(openSync(probe, "wx", 0o600));
    return undefined;
  } catch (err) {
    const c = errCode(err);
    return c === "EROFS"
      ? "the filesystem is read-only"
      : c === "EACCES" || c === "EPERM"
        ? `uid ${process.getuid?.()} cannot write there`
        : (err as Error).message;
  } finally {
    rmSync(probe, { force: true });
  }
}

type StorageKey =
  | "path.storage.root"
  | "path.storage.images"
  | "path.storage.homes"
  | "path.storage.overlays"
  | "path.run";

function storageCheck(key: StorageKey): Check {
  return {
    what: key,
    async run(ctx) {
      const cfg = ctx.cfg;
      const root = cfg.get("path.storage.root");
      const path = key === "path.storage.root" || key === "path.run" ? cfg.get(key) : cfg.storagePath(key);
      const limits = key === "path.run" ? SPACE_LIMITS.run : SPACE_LIMITS.storage;
      let st;
      try {
        st = statSync(path);
      } catch (err) {
        if (errCode(err) !== "ENOENT") return fail(`${path}: ${fileError(err)}`, `make ${path} reachable for root`);
      }
      let at = path;
      let note = "";
      if (!st) {
        if (key === "path.storage.root")
          return fail(`${path} does not exist`, `mount the shared storage there, or create it (mkdir -p ${path})`);
        if ((path + "/").startsWith(root + "/") && !existsSync(root))
          return notChecked(
            `${path} is below path.storage.root, which does not exist`,
            "see the path.storage.root line",
          );
        // The node makes it at first use (mkdir -p): what counts is the filesystem it will be on.
        while (!existsSync(at)) at = dirname(at);
        note = `does not exist yet (the node creates it); `;
      } else if (!st.isDirectory()) return fail(`${path} is not a directory`, `point ${key} at a directory`);
      const denied = writable(at);
      if (denied)
        return fail(
          `${at}: ${denied}`,
          (process.getuid?.() ?? 0) !== 0
            ? "run the check as root"
            : `let root write to ${at} (an NFS export needs no_root_squash for the nodes; see README "Running in production")`,
        );
      const fs = statfsSync(at);
      if (key === "path.storage.overlays" && fs.type === NFS_SUPER_MAGIC && ctx.hypervisors.includes("lxc"))
        return fail(
          `${path} is on NFS: overlayfs cannot keep desktops' writable layers there`,
          "point path.storage.overlays at a local filesystem (ext4, xfs), e.g. /var/lib/qvd/overlays",
        );
      const free = fs.bavail * fs.bsize;
      const detail = `${path}: ${note}${gib(free)} free${at !== path ? ` on ${at}` : ""}`;
      if (free < limits.fail)
        return fail(
          `${detail}, less than ${gib(limits.fail)}`,
          `free space on that filesystem, or point ${key} elsewhere`,
        );
      if (free < limits.warn)
        return warn(
          `${detail}, less than ${gib(limits.warn)}`,
          `free space on that filesystem, or point ${key} elsewhere`,
        );
      return ok(detail);
    },
  };
}

// --- the database -----------------------------------------------------------------------------

const databaseCheck: Check = {
  what: "database",
  async run(ctx) {
    const d = await ctx.db();
    if (d.error)
      return fail(
        d.error,
        "check database.url (or --db, QVD_DATABASE_URL), that PostgreSQL runs and that it lets this node in (pg_hba.conf)",
      );
    return ok(`${maskUrl(ctx.cfg.databaseUrl())}: connected`);
  },
};

const schemaCheck: Check = {
  what: "schema version",
  async run(ctx) {
    const st = await ctx.schemaStatus();
    if (!st) return NO_DB;
    if (st.version === null)
      return st.tables > 0
        ? fail(`no QVD schema (the database has ${st.tables} other tables)`, "point database.url at the QVD database")
        : fail("no QVD schema: the database is empty", "run qvd db init");
    if (st.version > st.latest)
      return fail(
        `the database's schema (version ${st.version}) is newer than this qvd's (${st.latest})`,
        "upgrade qvd on this node",
      );
    if (st.version < st.latest)
      return fail(
        `version ${st.version}, this qvd needs ${st.latest} (pending migrations: ${st.pending.join(", ")})`,
        "run qvd db migrate",
      );
    return ok(`version ${st.version}`);
  },
};

const settingsCheck: Check = {
  what: "cluster settings (configs)",
  async run(ctx) {
    const why = await dbUnusable(ctx);
    if (why) return why;
    const rows = await listConfigRows((await ctx.current())!);
    const ignored: string[] = [];
    try {
      // As the HKD and the L7R layer them at start (src/roles/hkd.ts).
      ctx.cfg.withDatabase(
        rows.map((r) => ({ tenantId: r.tenant_id, key: r.key, value: r.value })),
        (m) => ignored.push(m),
      );
    } catch (err) {
      if (err instanceof UserError)
        return fail(err.message, "correct it with qvd admin config set (or in the WAT's settings)");
      throw err;
    }
    if (ignored.length)
      return warn(
        `${ignored.length} ignored: ${ignored[0]}`,
        "remove them: qvd admin config unset KEY (--tenant T for a tenant's)",
      );
    return ok(`${rows.length} setting${rows.length === 1 ? "" : "s"} from the database`);
  },
};

const clockCheck: Check = {
  what: "clock",
  async run(ctx) {
    const { sql } = await ctx.db();
    if (!sql) return NO_DB;
    // The database's time against the middle of the round trip, which bounds the error; the
    // quickest of a few rounds (the pool is shared with the other checks running meanwhile).
    let best = { rtt: Infinity, skewMs: 0 };
    for (let i = 0; i < 3; i++) {
      const t0 = Date.now();
      const r = { t: await databaseClock(sql) };
      const t1 = Date.now();
      if (t1 - t0 < best.rtt) best = { rtt: t1 - t0, skewMs: (t0 + t1) / 2 - r.t.getTime() };
    }
    const skewS = best.skewMs / 1000;
    const off = Math.abs(skewS);
    const detail = `this node's clock is ${off.toFixed(1)} s ${skewS >= 0 ? "ahead of" : "behind"} the database's`;
    // Heartbeats, cluster.lost_after and placement compare the database's own timestamps
    // (src/db/cluster.ts, src/db/placement.ts); the node's clock counts elsewhere.
    const why =
      "TOTP codes (one 30 s step of leeway), desktop expiry times and certificate validity are judged by this node's clock (heartbeats and cluster.lost_after use the database's)";
    const fix = "keep the clocks synchronised (chrony or systemd-timesyncd) here and on the database server";
    if (off > CLOCK.failS) return fail(`${detail}: ${why}`, fix);
    if (off > CLOCK.warnS) return warn(`${detail}: ${why}`, fix);
    return ok(detail);
  },
};

const hostCheck: Check = {
  what: "node registered (hosts)",
  async run(ctx) {
    const why = await dbUnusable(ctx);
    if (why) return why;
    const name = ctx.cfg.get("nodename");
    const {
      rows: [h],
    } = await list((await ctx.current())!, hostsDef, ALL_TENANTS, {
      filters: [{ field: "name", op: "=", value: name }],
      limit: 1,
    });
    // src/roles/hkd.ts: without a hosts row the HKD refuses to start, unless --register --address.
    if (!h) {
      if (ctx.opts.register && ctx.opts.address)
        return ok(`no hosts row "${name}" yet: --register creates it (address ${ctx.opts.address})`);
      if (ctx.opts.register)
        return fail(
          `no hosts row "${name}", and --register needs --address`,
          "add --address ADDR (the address other nodes reach this node on)",
        );
      return warn(
        `no hosts row "${name}" (nodename): qvd node refuses to start without one`,
        `start it once with qvd node --register --address ADDR, or add it: qvd admin host new name=${name} address=ADDR`,
      );
    }
    if (!h.backend)
      return fail(
        `host "${name}" is not a backend node (hosts.backend is false): the HKD refuses to start`,
        `qvd admin host set ${name} backend=true`,
      );
    const held = [
      h.blocked && "blocked",
      h.drain && "draining",
      h.state === "lost" && "declared lost (it rejoins at start)",
    ].filter(Boolean);
    const detail = `host "${name}" (id ${h.id}, address ${h.address}, ${h.state})`;
    if (h.blocked || h.drain)
      return warn(
        `${detail}: ${held.join(", ")}: no new desktops are placed here`,
        `qvd admin host ${h.blocked ? "unblock" : "undrain"} ${name}`,
      );
    return ok(held.length ? `${detail}; ${held.join(", ")}` : detail);
  },
};

// --- certificates -------------------------------------------------------------------------------

/** Validity of a certificate now: fail when not valid, warn within CERT_WARN_DAYS. */
function validity(c: X509Certificate, file: string, renew: string): Outcome | undefined {
  const now = Date.now();
  const to = new Date(c.validTo);
  if (to.getTime() <= now) return fail(`${file} expired on ${day(to)}`, renew);
  if (new Date(c.validFrom).getTime() > now)
    return fail(`${file} is not valid before ${c.validFrom}`, "check this node's clock, or issue it again");
  const days = Math.floor((to.getTime() - now) / DAY_MS);
  if (days < CERT_WARN_DAYS)
    return warn(`${file} expires on ${day(to)}, in ${days} day${days === 1 ? "" : "s"}`, renew);
  return undefined;
}

const pemCerts = (text: string) => text.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];

const l7rCertCheck: Check = {
  what: "L7R certificate (l7r.tls.*)",
  async run(ctx) {
    const certFile = ctx.cfg.get("l7r.tls.cert");
    const keyFile = ctx.cfg.get("l7r.tls.key");
    const unset = (["l7r.tls.cert", "l7r.tls.key"] as const).filter((k) => !ctx.cfg.get(k));
    if (unset.length)
      return fail(
        `${unset.join(" and ")} ${unset.length > 1 ? "are" : "is"} not set: the L7R serves TLS`,
        "set l7r.tls.cert and l7r.tls.key (or --cert and --key) to the PEM files users' clients trust",
      );
    const renew = `renew it and restart the node (l7r.tls.cert = ${certFile})`;
    let cert: X509Certificate;
    try {
      const pem = pemCerts(readFileSync(certFile, "utf8"))[0];
      if (!pem)
        return fail(
          `${certFile} holds no PEM certificate`,
          "point l7r.tls.cert at the PEM certificate (the server's first, then its chain)",
        );
      cert = new X509Certificate(pem);
    } catch (err) {
      return fail(
        `l7r.tls.cert ${certFile}: ${fileError(err)}`,
        "point l7r.tls.cert at a PEM certificate root can read",
      );
    }
    let keyText: string;
    try {
      keyText = readFileSync(keyFile, "utf8");
    } catch (err) {
      return fail(
        `l7r.tls.key ${keyFile}: ${fileError(err)}`,
        "point l7r.tls.key at the certificate's PEM private key, readable by root",
      );
    }
    let matches: boolean;
    try {
      matches = cert.checkPrivateKey(createPrivateKey(keyText));
    } catch {
      return fail(
        `l7r.tls.key ${keyFile} is not a PEM private key`,
        "point l7r.tls.key at the certificate's PEM private key",
      );
    }
    if (!matches)
      return fail(
        `l7r.tls.key ${keyFile} is not the key of ${certFile}`,
        "give the key the certificate was made for (or a certificate made for this key)",
      );
    const v = validity(cert, certFile, renew);
    if (v) return v;
    const clientCa = ctx.cfg.get("l7r.tls.client_ca");
    if (clientCa) {
      try {
        if (!pemCerts(readFileSync(clientCa, "utf8")).length)
          return fail(
            `l7r.tls.client_ca ${clientCa} holds no PEM certificate`,
            "point l7r.tls.client_ca at the clients' CA, or leave it empty",
          );
      } catch (err) {
        return fail(
          `l7r.tls.client_ca ${clientCa}: ${fileError(err)}`,
          "point l7r.tls.client_ca at the clients' CA, or leave it empty",
        );
      }
    }
    return ok(`${certFile}, valid until ${day(new Date(cert.validTo))}`);
  },
};

const farmCertCheck: Check = {
  what: "farm certificate (cluster.tls.*)",
  async run(ctx) {
    const name = ctx.cfg.get("nodename");
    const issue = `qvd farm cert --name ${name} --address ADDR on the farm CA's machine (README "Node certificates")`;
    const renew = `issue a new one: ${issue.replace("ADDR", "ADDR --force")}`;
    const unset = (["cluster.tls.ca", "cluster.tls.cert", "cluster.tls.key"] as const).filter((k) => !ctx.cfg.get(k));
    if (unset.length)
      return fail(
        `${unset.join(", ")} not set: nodes prove who they are to each other with the farm CA's certificates, and qvd node refuses to start without`,
        `make them with ${issue} and set cluster.tls.* to its files`,
      );
    let farm;
    try {
      // The same checks qvd node makes before it starts anything (src/farm/certs.ts).
      farm = nodeTls(ctx.cfg);
    } catch (err) {
      if (!(err instanceof UserError)) throw err;
      return fail(err.message, /expired/.test(err.message) ? renew : `give this node's files from ${issue}`);
    }
    const leaf = new X509Certificate(pemCerts(readFileSync(farm.cert, "utf8"))[0]!);
    const v = validity(leaf, farm.cert, renew);
    if (v) return v;
    // An expired CA fails every node-to-node handshake, whatever the nodes' own certificates say.
    for (const pem of pemCerts(readFileSync(farm.ca, "utf8"))) {
      const caV = validity(
        new X509Certificate(pem),
        `the farm CA ${farm.ca}`,
        "make a new farm CA (qvd farm ca) and new node certificates for every node",
      );
      if (caV) return caV;
    }
    return ok(`${farm.cert} (node ${farm.name}), valid until ${day(farm.validTo)}`);
  },
};

// --- the node lock ----------------------------------------------------------------------------

/** The pid holding a flock on `file` (from /proc/locks), without taking the lock. */
function lockHolder(file: string): number | undefined {
  const st = statSync(file, { bigint: true, throwIfNoEntry: false });
  if (!st) return undefined;
  const dev = st.dev;
  const major = ((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn);
  const minor = (dev & 0xffn) | ((dev >> 12n) & ~0xffn);
  const id = `${major.toString(16).padStart(2, "0")}:${minor.toString(16).padStart(2, "0")}:${st.ino}`;
  for (const line of readFileSync("/proc/locks", "utf8").split("\n")) {
    // "1: FLOCK  ADVISORY  WRITE 1234 00:1c:5678 0 EOF"; waiters ("1: -> FLOCK …") are not holders.
    const f = line.trim().split(/\s+/);
    if (f[1] === "FLOCK" && f[5]?.toLowerCase() === id) return Number(f[4]);
  }
  return undefined;
}

const lockCheck: Check = {
  what: "node lock",
  async run(ctx) {
    const file = join(ctx.cfg.get("path.run"), "hkd.lock");
    const pid = lockHolder(file);
    // src/hkd/lock.ts: one HKD per node; a second one refuses to start.
    if (pid !== undefined)
      return warn(
        `an HKD already runs on this node (pid ${pid} holds ${file}): a second qvd node here would refuse to start`,
        "expected while the node runs; stop it first to start it again",
      );
    return ok(`${file} is free`);
  },
};

// --- running them -------------------------------------------------------------------------------

/** The checks for this configuration, in the order they are printed. */
export function nodeChecks(ctx: CheckContext): Check[] {
  const lxc = ctx.hypervisors.includes("lxc");
  const kvm = ctx.hypervisors.includes("kvm");
  return [
    rootCheck,
    ...(lxc ? [cgroupCheck, userNsCheck, overlayCheck] : []),
    bridgeCheck,
    ...(lxc ? [vethCheck] : []),
    ...(kvm ? [tunCheck] : []),
    ...ctx.hypervisors.map(backendCheck),
    networkToolsCheck,
    vmBridgeCheck,
    qvdBinaryCheck,
    ...ctx.hypervisors.map(imageCheck),
    browserCheck,
    ...(
      ["path.storage.root", "path.storage.images", "path.storage.homes", "path.storage.overlays", "path.run"] as const
    ).map(storageCheck),
    databaseCheck,
    schemaCheck,
    settingsCheck,
    clockCheck,
    l7rCertCheck,
    farmCertCheck,
    hostCheck,
    lockCheck,
  ];
}

/** Runs one check within its time; an exception is a failed line, never a stack trace. */
async function runOne(check: Check, ctx: CheckContext): Promise<CheckResult> {
  const limitS = check.timeoutS ?? 10;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<Outcome>((resolve) => {
    timer = setTimeout(
      () =>
        resolve(
          fail(`no answer within ${limitS} s`, "see what blocks it (a hung mount, a database that does not answer)"),
        ),
      limitS * 1000,
    );
  });
  let out: Outcome;
  try {
    out = await Promise.race([check.run(ctx), timeout]);
  } catch (err) {
    out = fail(
      err instanceof UserError ? err.message : `internal error: ${(err as Error).message}`,
      "report this if the message does not say what to do",
    );
  } finally {
    clearTimeout(timer);
  }
  const res: CheckResult = { level: out.level, what: check.what };
  if (out.detail) res.detail = scrub(out.detail);
  if (out.level !== "ok" && out.fix) res.fix = scrub(out.fix);
  if (out.checked === false) res.checked = false;
  return res;
}

/** Runs every check at once; `onResult` gets them in list order, each as soon as it and those before it are done. */
export async function runChecks(
  checks: Check[],
  ctx: CheckContext,
  onResult?: (r: CheckResult) => void,
): Promise<CheckResult[]> {
  const pending = checks.map((c) => runOne(c, ctx));
  const out: CheckResult[] = [];
  for (const p of pending) {
    const r = await p;
    out.push(r);
    onResult?.(r);
  }
  return out;
}

/** One aligned line: level, requirement, what was found, and for warn and fail the fix. */
export function formatResult(r: CheckResult, width: number): string {
  const text = [r.detail, r.fix && `fix: ${r.fix}`].filter(Boolean).join(" — ");
  return `${r.level.padEnd(4)}  ${text ? `${r.what.padEnd(width)}  ${text}` : r.what}`;
}

/** `qvd node --check`: prints the results (text or JSON) and returns the exit status. */
export async function nodeCheck(cfg: Config, opts: CheckOptions & { json?: boolean } = {}): Promise<number> {
  const ctx = new CheckContext(cfg, opts);
  const checks = nodeChecks(ctx);
  const width = Math.max(...checks.map((c) => c.what.length));
  let results: CheckResult[];
  try {
    results = await runChecks(checks, ctx, opts.json ? undefined : (r) => console.log(formatResult(r, width)));
  } finally {
    await ctx.close();
  }
  const failed = results.filter((r) => r.level === "fail").length;
  const unchecked = results.filter((r) => r.checked === false).length;
  const warned = results.filter((r) => r.level === "warn").length - unchecked;
  const status = failed ? CHECK_FAILED : 0;
  if (opts.json)
    console.log(JSON.stringify({ ok: failed === 0, failed, warnings: warned, unchecked, checks: results }));
  else {
    const counts = [
      failed && `${failed} failed`,
      warned && `${warned} warning${warned === 1 ? "" : "s"}`,
      unchecked && `${unchecked} not checked`,
    ]
      .filter(Boolean)
      .join(", ");
    console.log(
      failed
        ? `\nThis machine cannot run desktops as configured: ${counts}.`
        : `\nThis machine can run desktops${counts ? ` (${counts})` : ""}.`,
    );
  }
  return status;
}
