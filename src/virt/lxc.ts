// The LXC backend: desktops as LXC 5 containers, driven with the real lxc-* tools.
//
// Per VM (container `qvd-<id>`):
//   <lxcPath>/qvd-<id>/config      the LXC configuration (renderConfig), removed at cleanup
//   <lxcPath>/qvd-<id>/net-up      lxc.net.0.script.up: joins the veth to the bridge, isolated
//   <lxcPath>/qvd-<id>/vma.json    the VMA's secret (mode 0400), bind-mounted read-only on
//                                  /run/qvd/vma.json in the guest
//   <lxcPath>/qvd-<id>/state.json  what cleanup needs to know (persistence) when the spec is gone
//   <lxcPath>/logs/qvd-<id>.log    LXC's log, and .console.log the guest's console (init's
//                                  output, i.e. the VMA's log); kept after cleanup, reset at start
//   <storage>/overlays/<id>/upper  the writable layer (LXC mounts `overlay:<basefs>:<upper>`;
//   <storage>/overlays/<id>/work   work is LXC's overlay work dir), removed at cleanup unless
//                                  persistent
// The rootfs and every mount entry are mounted by LXC inside the container's own mount
// namespace, so they vanish with the container: nothing is ever mounted on the node itself.
//
// Unprivileged: `lxc.idmap` maps the guest's ids 0…size-1 to the node's base…base+size-1
// (vm.lxc.idmap.*), so container root is an unprivileged uid on the node. LXC mounts the rootfs
// and the mount entries as that mapped root, so what it mounts must be reachable and owned by
// shifted ids: basefs is unpacked shifted (images.ts), the upper dir, the home and vma.json are
// owned by base here, and basefs/, overlays/, homes/ and the VM's directory are root:<base>
// 0710 (the mapped root crosses them by group; node users cannot). Capabilities: an allow-list
// (CAPS); seccomp: a deny-list (SECCOMP); AppArmor's `generated` profile where the kernel has it.
//
// Network namespace: every lxc-* (and ip/nft) command runs through the NodeNetwork's runner,
// i.e. `nsenter --net=/run/netns/<ns> --` when a netns is configured (tests), since LXC's
// command socket is an abstract unix socket that belongs to the network namespace that started
// the container. LXC is not told the bridge (lxc.net.0.link): with nsenter, /sys/class/net is
// the machine's and LXC would not find the bridge there. Our script.up attaches the veth.
import {
  existsSync,
  lstatSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmdirSync,
  rmSync,
  writeFileSync,
  chmodSync,
  chownSync,
  lchownSync,
  statSync,
} from "node:fs";
import { dirname, join, relative } from "node:path";
import type { Backend, BackendState, VmSpec } from "./backend.ts";
import { type NodeNetwork, nodeNetworkFromConfig, vethName } from "./network.ts";
import { CommandError } from "../run.ts";
import { ConfigError, UserError } from "../errors.ts";
import { gateDir, type IdMap } from "./images.ts";
import { logger } from "../log.ts";
import type { Config } from "../config.ts";

const log = logger("lxc");

// --- cgroups ------------------------------------------------------------------------------------

export type CgroupVersion = "v1" | "v2";

/** Where the controllers QVD limits live: a hybrid host may have memory in v1 and nothing in v2. */
export interface CgroupInfo {
  memory: CgroupVersion | null;
  cpu: CgroupVersion | null;
  devices: CgroupVersion | null;
  /** v1: memory.memsw.* exists (swap accounting), so swap can be limited too. */
  memsw: boolean;
  /** v2: memory.swap.max exists. */
  swapMax: boolean;
}

/** Reads /proc/self/mountinfo (and the cgroup2 mount's cgroup.controllers) to find the controllers. */
export function detectCgroups(mountinfo?: string): CgroupInfo {
  const text = mountinfo ?? readFileSync("/proc/self/mountinfo", "utf8");
  const v1 = new Map<string, string>(); // controller → mount point
  let v2: string | undefined;
  for (const line of text.split("\n")) {
    const [pre, post] = line.split(" - ");
    if (!pre || !post) continue;
    const mp = pre.split(" ")[4]!.replace(/\\040/g, " ");
    const [fstype, , superOpts = ""] = post.split(" ");
    if (fstype === "cgroup") for (const o of superOpts.split(",")) v1.set(o, mp);
    else if (fstype === "cgroup2" && !v2) v2 = mp;
  }
  let v2ctl: string[] = [];
  if (v2) {
    try {
      v2ctl = readFileSync(join(v2, "cgroup.controllers"), "utf8").trim().split(/\s+/);
    } catch {}
  }
  const where = (c: string): CgroupVersion | null => (v1.has(c) ? "v1" : v2ctl.includes(c) ? "v2" : null);
  const memory = where("memory");
  let swapMax = false;
  if (memory === "v2" && v2) {
    try {
      swapMax = readdirSync(v2).some((d) => existsSync(join(v2!, d, "memory.swap.max")));
    } catch {}
  }
  return {
    memory,
    cpu: where("cpu"),
    // cgroup2 has no devices controller file: LXC applies lxc.cgroup2.devices.* as a BPF program.
    devices: v1.has("devices") ? "v1" : v2 ? "v2" : null,
    memsw: memory === "v1" && existsSync(join(v1.get("memory")!, "memory.memsw.limit_in_bytes")),
    swapMax,
  };
}

/** cgroup v1 cpu.shares → cgroup v2 cpu.weight (the kernel's and systemd's conversion). */
export function sharesToWeight(shares: number): number {
  const s = Math.min(262144, Math.max(2, Math.round(shares)));
  return Math.min(10000, Math.max(1, 1 + Math.floor(((s - 2) * 9999) / 262142)));
}

// --- configuration ------------------------------------------------------------------------------

export interface LxcOptions {
  /** Directory of container configurations (lxc-* -P), node-local: vm.lxc.path or <path.run>/lxc. */
  lxcPath: string;
  /** path.storage.root: overlays/<vm-id>/ lives below it. */
  storageRoot: string;
  /** The node's network (bridge, firewall); its netns is where every command runs. */
  network: NodeNetwork;
  /** The VMA is the container's init (vm.lxc.vma_init, default true). */
  vmaInit?: boolean;
  /** The image's own init when vmaInit is false (vm.lxc.init, default /sbin/init). */
  init?: string;
  /** Where the qvd binary appears in the guest (vm.lxc.guest_qvd_path). */
  guestQvdPath?: string;
  /** lxc.signal.halt (vm.lxc.halt_signal; default by vmaInit). */
  haltSignal?: string;
  /** lxc.apparmor.profile (vm.lxc.apparmor.profile; default by AppArmor's presence). */
  apparmorProfile?: string;
  /** Lines appended to every configuration (vm.lxc.conf.extra). */
  extraConfig?: string;
  /** Detected when absent. */
  cgroups?: CgroupInfo;
  /** How long lxc-wait waits for RUNNING (default 30 s). */
  startTimeoutMs?: number;
  /** The desktops' subordinate id range (vm.lxc.idmap.*; default DEFAULT_IDMAP). */
  idmap?: IdMap;
  /** path.storage.homes (default <storageRoot>/homes): gated like basefs. */
  homesRoot?: string;
  /** path.storage.overlays (default <storageRoot>/overlays): local, overlayfs cannot write to NFS. */
  overlaysRoot?: string;
}

export const DEFAULT_IDMAP: IdMap = { base: 100000, size: 65536 };

/** vm.lxc.idmap.*, checked: ids shifted once must never look unshifted (base ≥ size). */
export function idmapFromConfig(cfg: Config): IdMap {
  const m = { base: cfg.get("vm.lxc.idmap.base"), size: cfg.get("vm.lxc.idmap.size") };
  if (m.base < m.size)
    throw new ConfigError(
      `vm.lxc.idmap.base (${m.base}) must be at least vm.lxc.idmap.size (${m.size}): shifted and unshifted ids must not overlap`,
    );
  if (m.base + m.size > 0xffffffff)
    throw new ConfigError("vm.lxc.idmap.base + vm.lxc.idmap.size exceeds the largest uid");
  // A desktop user's uid or gid outside the map cannot own anything in the container.
  for (const k of ["identity.uid.max", "identity.gid.max"] as const)
    if (cfg.get(k) >= m.size)
      log.warn(
        `${k} (${cfg.get(k)}) is not below vm.lxc.idmap.size (${m.size}): desktop users with such ids cannot be provisioned`,
      );
  return m;
}

/** The options the HKD passes, from the node's configuration. */
export function lxcOptionsFromConfig(cfg: Config, network: NodeNetwork): LxcOptions {
  const extra = cfg.get("vm.lxc.conf.extra").replace(/\\n/g, "\n");
  return {
    lxcPath: cfg.get("vm.lxc.path") || join(cfg.get("path.run"), "lxc"),
    storageRoot: cfg.get("path.storage.root"),
    network,
    vmaInit: cfg.get("vm.lxc.vma_init"),
    init: cfg.get("vm.lxc.init"),
    guestQvdPath: cfg.get("vm.lxc.guest_qvd_path"),
    haltSignal: cfg.get("vm.lxc.halt_signal") || undefined,
    apparmorProfile: cfg.get("vm.lxc.apparmor.profile") || undefined,
    extraConfig: extra || undefined,
    idmap: idmapFromConfig(cfg),
    homesRoot: cfg.storagePath("path.storage.homes"),
    overlaysRoot: cfg.storagePath("path.storage.overlays"),
  };
}

/**
 * What the node does at start-up: the network from the configuration (bridge made to exist,
 * firewall installed), then the backend. `netns`: run everything in that network namespace
 * (tests, demo); production passes nothing and uses the machine's own.
 */
export async function lxcBackendFromConfig(cfg: Config, opts: { netns?: string } = {}): Promise<LxcBackend> {
  const network = nodeNetworkFromConfig(cfg, opts.netns);
  await network.setup();
  return new LxcBackend(lxcOptionsFromConfig(cfg, network));
}

function apparmorEnabled(): boolean {
  try {
    return readFileSync("/sys/module/apparmor/parameters/enabled", "utf8").trim() === "Y";
  } catch {
    return false;
  }
}

/** fstab-style escaping for lxc.mount.entry fields (whitespace and backslash as octal). */
function fstabField(s: string): string {
  return s.replace(/[\\\s]/g, (c) => "\\" + c.charCodeAt(0).toString(8).padStart(3, "0"));
}

/** A path inside the guest, relative to its root, as mount entries want it. */
const rel = (p: string) => p.replace(/^\/+/, "");

const PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

// Character devices a desktop may use: null, zero, full, random, urandom, tty, console, ptmx,
// pts, fuse, tun. Any device may be created (mknod), but only these opened.
const DEVICES = [
  "c *:* m",
  "b *:* m",
  "c 1:3 rwm",
  "c 1:5 rwm",
  "c 1:7 rwm",
  "c 1:8 rwm",
  "c 1:9 rwm",
  "c 5:0 rwm",
  "c 5:1 rwm",
  "c 5:2 rwm",
  "c 136:* rwm",
  "c 10:229 rwm",
  "c 10:200 rwm",
];

// Capabilities the container keeps (all others leave the bounding set): what the VMA needs to
// provision the user and run the session as that user (chown, dac_override, fowner, fsetid,
// setuid, setgid, kill), useradd's chroot, services on low ports, and sys_boot so an image's own
// init can power off (in a PID namespace reboot(2) only ends that namespace). Gone among others:
// sys_admin (mounts), sys_module, sys_rawio, sys_time, sys_ptrace, net_admin, net_raw, mknod,
// syslog, mac_*, audit_*, setfcap, setpcap, dac_read_search. These are capabilities over the
// container's user namespace only; the node's kernel grants none of them towards itself.
export const CAPS = [
  "chown",
  "dac_override",
  "fowner",
  "fsetid",
  "kill",
  "setgid",
  "setuid",
  "sys_chroot",
  "sys_boot",
  "net_bind_service",
];

// Syscalls no desktop needs and that reach kernel state shared with the node (LXC's
// common.seccomp, plus keyrings, BPF, perf, userfaultfd, io_uring, swap, accounting, quotas and
// the old ioperm/iopl). clone/unshare of new user namespaces stay: Chromium's sandbox uses them,
// and a nested namespace holds capabilities only over its own objects. mount() needs
// CAP_SYS_ADMIN in the caller's namespace, which container root does not have.
export const SECCOMP_DENY = [
  "kexec_load",
  "kexec_file_load",
  "open_by_handle_at",
  "name_to_handle_at",
  "init_module",
  "finit_module",
  "delete_module",
  "keyctl",
  "add_key",
  "request_key",
  "bpf",
  "perf_event_open",
  "userfaultfd",
  "io_uring_setup",
  "io_uring_enter",
  "io_uring_register",
  "swapon",
  "swapoff",
  "acct",
  "quotactl",
  "lookup_dcookie",
  "ioperm",
  "iopl",
  "syslog",
];
const SECCOMP = ["2", "denylist", "reject_force_umount", "[all]", ...SECCOMP_DENY.map((s) => `${s} errno 1`), ""].join(
  "\n",
);

let apparmorNoted = false;

/**
 * Shared folders mount FUSE in the desktop (src/vma/shares.ts) through the node's /dev/fuse,
 * which must be crw-rw-rw- as udev makes it on the distributions; a node without udev may have
 * it root's alone. Set once per process, and said.
 */
let fuseChecked = false;
export function fuseForDesktops(dev = "/dev/fuse"): void {
  if (fuseChecked) return;
  fuseChecked = true;
  try {
    const st = statSync(dev);
    if (!st.isCharacterDevice()) return;
    if ((st.mode & 0o666) !== 0o666) {
      chmodSync(dev, (st.mode & 0o7777) | 0o666);
      log.info("made /dev/fuse usable by desktops (crw-rw-rw-, the distributions' default) for shared folders");
    }
  } catch {
    log.info("no /dev/fuse on this node: desktops get no shared folders");
  }
}

export interface RenderContext {
  vmDir: string;
  logDir: string;
  upperDir: string;
  cgroups: CgroupInfo;
  vmaInit: boolean;
  init: string;
  guestQvdPath: string;
  haltSignal: string;
  apparmorProfile: string;
  extraConfig?: string;
  idmap: IdMap;
}

/** The LXC 5 configuration of one container. */
export function renderConfig(spec: VmSpec, c: RenderContext): string {
  const n = spec.network;
  for (const [what, p] of [
    ["image", spec.image.path],
    ["upper dir", c.upperDir],
  ] as const)
    if (p.includes(":"))
      throw new UserError(`the ${what} path ${p} contains ":", which LXC's overlay rootfs cannot take`);
  if (!/^[\w.-]+$/.test(spec.home.user))
    throw new UserError(`user name "${spec.home.user}" cannot be a home directory name`);
  const memBytes = spec.memoryMb * 1024 * 1024;
  const L: string[] = [
    "# Generated by qvd for this start of the desktop; do not edit (rewritten at every start).",
    `lxc.uts.name = ${spec.name}`,
    // Unprivileged: guest ids 0…size-1 are node ids base…base+size-1.
    `lxc.idmap = u 0 ${c.idmap.base} ${c.idmap.size}`,
    `lxc.idmap = g 0 ${c.idmap.base} ${c.idmap.size}`,
    spec.overlay.enabled
      ? `lxc.rootfs.path = overlay:${spec.image.path}:${c.upperDir}`
      : `lxc.rootfs.path = dir:${spec.image.path}`,
    ...(spec.overlay.enabled ? [] : ["lxc.rootfs.options = ro"]),
    "lxc.autodev = 1",
    "lxc.mount.auto = proc:mixed sys:ro cgroup:mixed",
    // A fresh /run (the image's /run may hold stale files; systemd keeps an existing /run mount).
    "lxc.mount.entry = tmpfs run tmpfs rw,nosuid,nodev,mode=755 0 0",
    // FUSE for shared folders (src/vma/shares.ts mounts in a namespace of its own; the node's
    // /dev/fuse must be crw-rw-rw-, the distributions' default): absent on the node, no entry made.
    "lxc.mount.entry = /dev/fuse dev/fuse none bind,optional,create=file 0 0",
    `lxc.mount.entry = ${fstabField(join(c.vmDir, "vma.json"))} run/qvd/vma.json none bind,ro,create=file 0 0`,
    `lxc.mount.entry = ${fstabField(spec.qvdBinary)} ${fstabField(rel(c.guestQvdPath))} none bind,ro,create=file 0 0`,
    // Without an overlay the image is read-only: give /home a tmpfs for the mount point.
    ...(spec.overlay.enabled ? [] : ["lxc.mount.entry = tmpfs home tmpfs rw,nosuid,nodev,mode=755 0 0"]),
    `lxc.mount.entry = ${fstabField(spec.home.hostPath)} home/${spec.home.user} none bind,create=dir 0 0`,
    "lxc.pty.max = 1024",
    "lxc.tty.max = 3",
    "lxc.tty.dir = lxc",
    `lxc.console.logfile = ${join(c.logDir, `${spec.name}.console.log`)}`,
    `lxc.log.file = ${join(c.logDir, `${spec.name}.log`)}`,
    "lxc.log.level = WARN",
    `lxc.apparmor.profile = ${c.apparmorProfile}`,
    // LXC's generated profile, without the rules that let a container run nested containers.
    ...(c.apparmorProfile === "generated" ? ["lxc.apparmor.allow_nesting = 0"] : []),
    `lxc.cap.keep = ${CAPS.join(" ")}`,
    `lxc.seccomp.profile = ${join(c.vmDir, "seccomp")}`,
  ];
  // Limits, for the hierarchy each controller is in (a hybrid host mixes both).
  if (c.cgroups.memory === "v1") {
    L.push(`lxc.cgroup.memory.limit_in_bytes = ${memBytes}`);
    if (c.cgroups.memsw) L.push(`lxc.cgroup.memory.memsw.limit_in_bytes = ${memBytes}`);
  } else if (c.cgroups.memory === "v2") {
    L.push(`lxc.cgroup2.memory.max = ${memBytes}`);
    if (c.cgroups.swapMax) L.push("lxc.cgroup2.memory.swap.max = 0");
  }
  if (c.cgroups.cpu === "v1") L.push(`lxc.cgroup.cpu.shares = ${Math.max(2, Math.round(spec.cpuShares))}`);
  else if (c.cgroups.cpu === "v2") L.push(`lxc.cgroup2.cpu.weight = ${sharesToWeight(spec.cpuShares)}`);
  if (c.cgroups.devices) {
    const k = c.cgroups.devices === "v1" ? "lxc.cgroup.devices" : "lxc.cgroup2.devices";
    L.push(`${k}.deny = a`, ...DEVICES.map((d) => `${k}.allow = ${d}`));
  }
  L.push(
    "lxc.net.0.type = veth",
    `lxc.net.0.veth.pair = ${vethName(spec.vmId)}`,
    `lxc.net.0.script.up = ${join(c.vmDir, "net-up")}`,
    "lxc.net.0.name = eth0",
    "lxc.net.0.flags = up",
    `lxc.net.0.hwaddr = ${n.mac}`,
    `lxc.net.0.ipv4.address = ${n.ip}/${n.prefix}`,
    `lxc.net.0.ipv4.gateway = ${n.gateway}`,
    `lxc.environment = PATH=${PATH}`,
    "lxc.environment = LANG=C.UTF-8",
    "lxc.environment = HOME=/root",
    `lxc.init.cmd = ${c.vmaInit ? `${c.guestQvdPath} vma` : c.init}`,
    `lxc.signal.halt = ${c.haltSignal}`,
  );
  if (c.extraConfig) L.push("# vm.lxc.conf.extra", c.extraConfig);
  return L.join("\n") + "\n";
}

// --- the backend --------------------------------------------------------------------------------

interface VmState {
  persistent: boolean;
  overlay: boolean;
}

export class LxcBackend implements Backend {
  readonly kind = "lxc" as const;
  readonly lxcPath: string;
  readonly logDir: string;
  private cgroupInfo?: CgroupInfo;

  constructor(readonly o: LxcOptions) {
    this.lxcPath = o.lxcPath;
    this.logDir = join(o.lxcPath, "logs");
  }

  get idmap(): IdMap {
    return this.o.idmap ?? DEFAULT_IDMAP;
  }

  get cgroups(): CgroupInfo {
    return (this.cgroupInfo ??= this.o.cgroups ?? detectCgroups());
  }

  private get net(): NodeNetwork {
    return this.o.network;
  }

  name(vmId: number): string {
    return `qvd-${vmId}`;
  }
  vmDir(vmId: number): string {
    return join(this.lxcPath, this.name(vmId));
  }
  overlayDir(vmId: number): string {
    return join(this.o.overlaysRoot ?? join(this.o.storageRoot, "overlays"), String(vmId));
  }
  upperDir(vmId: number): string {
    return join(this.overlayDir(vmId), "upper");
  }
  logFile(vmId: number): string {
    return join(this.logDir, `${this.name(vmId)}.log`);
  }
  consoleLog(vmId: number): string {
    return join(this.logDir, `${this.name(vmId)}.console.log`);
  }

  private lxc(tool: string, vmId: number, args: string[] = [], opts: { allowFail?: boolean; timeoutMs?: number } = {}) {
    return this.net.run([tool, "-n", this.name(vmId), "-P", this.lxcPath, ...args], opts);
  }

  async prepare(spec: VmSpec): Promise<void> {
    if (spec.name !== this.name(spec.vmId))
      throw new UserError(`container name ${spec.name} must be ${this.name(spec.vmId)}`);
    if (!existsSync(spec.image.path))
      throw new UserError(`the disk image's root filesystem ${spec.image.path} does not exist`);
    if (!existsSync(spec.qvdBinary)) throw new UserError(`the qvd binary ${spec.qvdBinary} does not exist`);
    // LXC bind-mounts it as the container's (unprivileged) root, and the guest runs it as such.
    if ((statSync(spec.qvdBinary).mode & 0o005) !== 0o005)
      throw new UserError(
        `the qvd binary ${spec.qvdBinary} must be readable and executable by others (mode o+rx): desktops run it as an unprivileged node uid`,
      );
    const m = this.idmap;
    const vmDir = this.vmDir(spec.vmId);
    // LXC checks that the mapped root can cross the container path (not list it).
    mkdirSync(this.lxcPath, { recursive: true, mode: 0o711 });
    const lp = statSync(this.lxcPath).mode;
    if ((lp & 0o001) === 0) chmodSync(this.lxcPath, (lp & 0o7777) | 0o001);
    mkdirSync(vmDir, { recursive: true, mode: 0o710 });
    chownSync(vmDir, 0, m.base); // the mapped root crosses it to bind-mount vma.json
    chmodSync(vmDir, 0o710);
    mkdirSync(this.logDir, { recursive: true, mode: 0o700 });
    // Writable layer: a leftover one is kept only when the VM is persistent.
    if (spec.overlay.enabled) {
      gateDir(dirname(this.overlayDir(spec.vmId)), m);
      const upper = this.upperDir(spec.vmId);
      if (!spec.overlay.persistent) discard(this.overlayDir(spec.vmId));
      mkdirSync(upper, { recursive: true, mode: 0o755 });
      rmSync(join(this.overlayDir(spec.vmId), "work"), { recursive: true, force: true });
      // LXC makes the work dir beside the upper one as the mapped root.
      chownSync(this.overlayDir(spec.vmId), m.base, m.base);
      chmodSync(this.overlayDir(spec.vmId), 0o700);
      this.ownByMappedRoot(upper, "writable layer", spec.vmId);
    }
    // The home on shared storage, created on first use (the VMA owns it to the user); the
    // directories above it are gated like basefs.
    const homesRoot = this.o.homesRoot ?? join(this.o.storageRoot, "homes");
    const below = relative(homesRoot, dirname(spec.home.hostPath));
    if (!below.startsWith("..") && !below.startsWith("/")) {
      gateDir(homesRoot, m);
      let d = homesRoot;
      for (const part of below.split("/").filter(Boolean)) gateDir((d = join(d, part)), m);
    }
    this.ownByMappedRoot(spec.home.hostPath, "home", spec.vmId);
    const state: VmState = { persistent: spec.overlay.persistent, overlay: spec.overlay.enabled };
    writeFileSync(join(vmDir, "state.json"), JSON.stringify(state) + "\n");
    // Readable by the guest's root only (owner: the mapped root, mode 0400).
    writeSecret(
      join(vmDir, "vma.json"),
      JSON.stringify({
        vm_id: spec.vmId,
        secret: spec.vma.secret,
        node_address: spec.network.gateway,
        port: spec.vma.port,
        settings: spec.vma.settings ?? {},
      }) + "\n",
      m.base,
    );
    writeFileSync(join(vmDir, "net-up"), this.net.attachScript(), { mode: 0o700 });
    writeFileSync(join(vmDir, "seccomp"), SECCOMP);
    fuseForDesktops();
    const vmaInit = this.o.vmaInit ?? true;
    const config = renderConfig(spec, {
      vmDir,
      logDir: this.logDir,
      upperDir: this.upperDir(spec.vmId),
      cgroups: this.cgroups,
      vmaInit,
      init: this.o.init ?? "/sbin/init",
      guestQvdPath: guestQvdPath(spec, this.o.guestQvdPath ?? "/usr/local/bin/qvd"),
      // Not SIGPWR (LXC's default) for the VMA: Bun (1.4) never delivers SIGPWR to handlers.
      haltSignal: this.o.haltSignal ?? (vmaInit ? "SIGTERM" : "SIGRTMIN+3"),
      apparmorProfile: this.o.apparmorProfile ?? this.defaultApparmor(),
      extraConfig: this.o.extraConfig,
      idmap: m,
    });
    writeFileSync(join(vmDir, "config"), config);
    if (this.cgroups.memory === null)
      log.warn("no memory cgroup controller found: the desktop's memory is not limited", { vm: spec.vmId });
    await this.net.addVm({ vmId: spec.vmId, ifname: vethName(spec.vmId), ip: spec.network.ip, mac: spec.network.mac });
  }

  /** LXC's generated profile where AppArmor is on; else said once, since nothing replaces it. */
  private defaultApparmor(): string {
    if (apparmorEnabled()) return "generated";
    if (!apparmorNoted) {
      apparmorNoted = true;
      log.info(
        "AppArmor is not enabled on this node: desktops are confined by their user namespace, capabilities and seccomp only",
      );
    }
    return "unconfined";
  }

  /**
   * A directory the container's root must own: created owned by the mapped root, or, when it
   * holds ids from before unprivileged desktops (its owner below the range), shifted once.
   */
  private ownByMappedRoot(dir: string, what: string, vmId: number): void {
    const m = this.idmap;
    if (!existsSync(dir)) {
      mkdirSync(dir, { recursive: true, mode: 0o755 });
      chownSync(dir, m.base, m.base);
      return;
    }
    const st = lstatSync(dir);
    if (!st.isDirectory()) throw new UserError(`the desktop's ${what} ${dir} is not a directory`);
    if (st.uid < m.size) {
      const t0 = performance.now();
      const n = shiftTree(dir, m);
      log.info(`shifted the ${what} into the desktops' id range`, {
        vm: vmId,
        dir,
        entries: n,
        ms: Math.round(performance.now() - t0),
      });
    }
  }

  async start(spec: VmSpec): Promise<{ pid?: number }> {
    const t0 = performance.now();
    for (const f of [this.logFile(spec.vmId), this.consoleLog(spec.vmId)]) writeFileSync(f, "");
    try {
      // -d returns once LXC reports RUNNING (or fails); lxc-wait is the belt to those braces.
      await this.lxc("lxc-start", spec.vmId, ["-d"], { timeoutMs: this.o.startTimeoutMs ?? 30_000 });
      const secs = Math.max(1, Math.ceil((this.o.startTimeoutMs ?? 30_000) / 1000));
      await this.lxc("lxc-wait", spec.vmId, ["-s", "RUNNING", "-t", String(secs)]);
    } catch (err) {
      throw new UserError(`container ${spec.name} did not start: ${this.failureReason(spec.vmId, err)}`);
    }
    const pid = await this.initPid(spec.vmId);
    log.info("container running", { vm: spec.vmId, pid, ms: Math.round(performance.now() - t0) });
    return { pid };
  }

  /** The lines of LXC's log that say why, else the command's own error. */
  private failureReason(vmId: number, err: unknown): string {
    let lines: string[] = [];
    try {
      lines = readFileSync(this.logFile(vmId), "utf8")
        .split("\n")
        .filter((l) => / ERROR /.test(l));
    } catch {}
    const clean = lines
      .map((l) => l.replace(/^.*? ERROR\s+\S+ - \S+ - /, ""))
      .filter((l) => !/Failed to (spawn|receive)|instead of "RUNNING"/.test(l));
    if (clean.length) return clean.slice(-3).join(" / ");
    return err instanceof CommandError ? err.message : String(err);
  }

  /** PID of the container's init on the node, if it runs. */
  async initPid(vmId: number): Promise<number | undefined> {
    const r = await this.lxc("lxc-info", vmId, ["-p", "-H"], { allowFail: true });
    const pid = Number(r.stdout.trim());
    return r.status === 0 && pid > 0 ? pid : undefined;
  }

  async stop(vmId: number, timeoutMs: number): Promise<boolean> {
    if ((await this.status(vmId)) === "stopped") return true;
    // lxc.signal.halt (SIGTERM for the VMA) to init; --nokill: report failure instead of killing.
    const secs = Math.max(1, Math.ceil(timeoutMs / 1000));
    await this.lxc("lxc-stop", vmId, ["--nokill", "-t", String(secs)], {
      allowFail: true,
      timeoutMs: timeoutMs + 10_000,
    });
    return (await this.status(vmId)) === "stopped";
  }

  async kill(vmId: number): Promise<void> {
    if ((await this.status(vmId)) === "stopped") return;
    await this.lxc("lxc-stop", vmId, ["-k"], { allowFail: true, timeoutMs: 30_000 });
    await this.lxc("lxc-wait", vmId, ["-s", "STOPPED", "-t", "10"], { allowFail: true });
    if ((await this.status(vmId)) !== "stopped")
      throw new UserError(`container ${this.name(vmId)} could not be killed`);
  }

  async status(vmId: number): Promise<BackendState> {
    if (!existsSync(join(this.vmDir(vmId), "config"))) {
      // No configuration: LXC knows nothing about it (a config removed under a running
      // container would still show in running(), which does not need the config).
      const r = await this.net.run(["lxc-ls", "-P", this.lxcPath, "--running", "-1"], { allowFail: true });
      return r.stdout.split("\n").includes(this.name(vmId)) ? "running" : "stopped";
    }
    const r = await this.lxc("lxc-info", vmId, ["-s", "-H"], { allowFail: true });
    const s = r.stdout.trim();
    return r.status !== 0 || s === "STOPPED" || s === "" ? "stopped" : "running";
  }

  async running(): Promise<number[]> {
    if (!existsSync(this.lxcPath)) return [];
    const r = await this.net.run(["lxc-ls", "-P", this.lxcPath, "--running", "-1"], { allowFail: true });
    return r.stdout
      .split("\n")
      .map((l) => /^qvd-(\d+)$/.exec(l.trim()))
      .filter((m): m is RegExpExecArray => m !== null)
      .map((m) => Number(m[1]))
      .sort((a, b) => a - b);
  }

  async leftovers(): Promise<number[]> {
    const ids = new Set<number>();
    if (existsSync(this.lxcPath))
      for (const e of readdirSync(this.lxcPath)) {
        const m = /^qvd-(\d+)$/.exec(e);
        if (m) ids.add(Number(m[1]));
      }
    // veths only: a KVM desktop's tap has the same name (kvm.ts).
    const links = await this.net.run(["ip", "-o", "link", "show", "type", "veth"], { allowFail: true });
    for (const m of links.stdout.matchAll(/^\d+: qvd(\d+)[@:]/gm)) ids.add(Number(m[1]));
    return [...ids].sort((a, b) => a - b);
  }

  async cleanup(vmId: number, opts: { keepStorage?: boolean } = {}): Promise<void> {
    const vmDir = this.vmDir(vmId);
    if ((await this.status(vmId)) !== "stopped") await this.kill(vmId);
    let state: VmState | undefined;
    try {
      state = JSON.parse(readFileSync(join(vmDir, "state.json"), "utf8")) as VmState;
    } catch {}
    // Nothing is mounted on the node by this backend, but a crashed LXC of an older layout
    // (or an administrator) may have left mounts below the VM's directories.
    await unmountBelow(opts.keepStorage ? [vmDir] : [vmDir, this.overlayDir(vmId)], (argv) =>
      this.net.run(argv, { allowFail: true }),
    );
    await this.net.removeVeth(vethName(vmId));
    // LXC removes its cgroups when the container ends, but not always after a failed start.
    removeEmptyCgroups(this.name(vmId));
    await this.net.removeVm(vmId);
    // The writable layer: without a record (e.g. /run was wiped by a reboot) it is kept; the
    // next prepare discards it unless that start is persistent.
    if (opts.keepStorage) {
      // Released to another node, which runs it over this same layer now: not ours to touch.
    } else if (state && !state.persistent) discard(this.overlayDir(vmId));
    else rmSync(join(this.overlayDir(vmId), "work"), { recursive: true, force: true });
    rmSync(vmDir, { recursive: true, force: true });
  }
}

/**
 * Where the qvd binary goes in the guest: the configured path, except on a read-only image
 * (no overlay) that lacks it, where no mount point can be created: then below the tmpfs /run.
 */
function guestQvdPath(spec: VmSpec, wanted: string): string {
  if (spec.overlay.enabled || existsSync(join(spec.image.path, wanted))) return wanted;
  return "/run/qvd/bin/qvd";
}

/**
 * Removes LXC's cgroups of a container (lxc.monitor.<name>, lxc.payload.<name>) in every
 * hierarchy, deepest first. Only empty cgroups can be removed: a running container's stay.
 */
export function removeEmptyCgroups(name: string): string[] {
  const removed: string[] = [];
  const mounts: string[] = [];
  for (const line of readFileSync("/proc/self/mountinfo", "utf8").split("\n")) {
    const [pre, post] = line.split(" - ");
    const fstype = post?.split(" ")[0];
    if (pre && (fstype === "cgroup" || fstype === "cgroup2")) mounts.push(pre.split(" ")[4]!);
  }
  // LXC places containers below the cgroup of PID 1 (lxc.cgroup.relative = 0) or its own.
  const paths = new Set<string>(["/"]);
  for (const f of ["/proc/1/cgroup", "/proc/self/cgroup"]) {
    try {
      for (const l of readFileSync(f, "utf8").trim().split("\n")) paths.add(l.split(":").slice(2).join(":") || "/");
    } catch {}
  }
  const rmTree = (dir: string) => {
    let entries: string[] = [];
    try {
      entries = readdirSync(dir, { withFileTypes: true })
        .filter((e) => e.isDirectory())
        .map((e) => e.name);
    } catch {
      return;
    }
    for (const e of entries) rmTree(join(dir, e));
    try {
      rmdirSync(dir);
      removed.push(dir);
    } catch {}
  };
  for (const mp of mounts)
    for (const p of paths)
      for (const kind of ["lxc.monitor.", "lxc.payload."]) {
        const dir = join(mp, p, kind + name);
        if (existsSync(dir)) rmTree(dir);
      }
  if (removed.length) log.debug("removed leftover cgroups", { container: name, count: removed.length });
  return removed;
}

/** Writes a file only its owner (root, or `owner`) can read, replacing any earlier one (read-only). */
function writeSecret(file: string, data: string, owner?: number): void {
  rmSync(file, { force: true });
  writeFileSync(file, data, { mode: 0o400 });
  if (owner !== undefined) chownSync(file, owner, owner);
  chmodSync(file, 0o400);
}

/**
 * Shifts the ownership of a tree into the id map: every uid and gid below `size` gets `base`
 * added; ids already shifted (or foreign) stay, so it is idempotent and a crash midway is
 * finished by the next run (the top directory goes last: it says whether a shift is due).
 * Never follows symlinks, never crosses into another filesystem; modes are kept (chown clears
 * setuid/setgid; they are restored) and file capabilities are dropped by the kernel's chown.
 * Returns the number of entries changed.
 */
export function shiftTree(top: string, m: IdMap): number {
  const dev = lstatSync(top).dev;
  let changed = 0;
  const shift = (p: string) => {
    const st = lstatSync(p);
    const uid = st.uid < m.size ? st.uid + m.base : st.uid;
    const gid = st.gid < m.size ? st.gid + m.base : st.gid;
    if (uid === st.uid && gid === st.gid) return;
    lchownSync(p, uid, gid);
    if (!st.isSymbolicLink() && st.mode & 0o6000) chmodSync(p, st.mode & 0o7777);
    changed++;
  };
  const walk = (dir: string) => {
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      const p = join(dir, e.name);
      if (lstatSync(p).dev !== dev) continue; // a mount point: not ours to change
      if (e.isDirectory()) walk(p);
      shift(p);
    }
  };
  walk(top);
  shift(top);
  return changed;
}

/** Removes a directory tree; renames it first so that a half-removed tree is never reused. */
function discard(dir: string): void {
  if (!existsSync(dir)) return;
  const gone = join(dirname(dir), `.deleteme-${dir.split("/").pop()}-${process.pid}-${Date.now()}`);
  try {
    renameSync(dir, gone);
  } catch {
    rmSync(dir, { recursive: true, force: true });
    return;
  }
  rmSync(gone, { recursive: true, force: true });
}

/** Unmounts every mount at or below the given directories, deepest first. */
async function unmountBelow(dirs: string[], run: (argv: string[]) => Promise<unknown>): Promise<void> {
  const unescapeOctal = (s: string) => s.replace(/\\([0-7]{3})/g, (_, o) => String.fromCharCode(parseInt(o, 8)));
  for (let round = 0; round < 5; round++) {
    const mounts = readFileSync("/proc/self/mountinfo", "utf8")
      .split("\n")
      .map((l) => l.split(" ")[4])
      .filter((m): m is string => !!m)
      .map(unescapeOctal)
      .filter((m) => dirs.some((d) => m === d || m.startsWith(d + "/")));
    if (mounts.length === 0) return;
    for (const m of mounts.sort((a, b) => b.length - a.length)) await run(["umount", "-l", m]);
  }
}
