// The systemd units and the logrotate file `qvd install` writes (src/roles/install.ts), as text
// compiled into the binary. Each unit's sandbox is the tightest its role allows; the comments in
// the units say why each setting is there, or why a stronger one is not.
import { VERSION } from "../version.ts";

export const ROLES = ["node", "api", "l7r"] as const;
export type Role = (typeof ROLES)[number];

export const BINARY = "/usr/local/bin/qvd";
export const unitName = (role: Role) => `qvd-${role}.service`;
export const unitPath = (role: Role) => `/etc/systemd/system/${unitName(role)}`;
export const configPath = (role: Role) => `/etc/qvd/${role}.conf`;
export const LOGROTATE_PATH = "/etc/logrotate.d/qvd";

/** What a unit depends on in its role's configuration (its paths and ports). */
export interface UnitContext {
  /** Directories under /run the role keeps its state in (RuntimeDirectory=, relative to /run). */
  runtimeDirs: string[];
  /** Other directories the role writes (ReadWritePaths=; made by the installer). */
  writable: string[];
  /** Directories that may be mount points the role needs (RequiresMountsFor=). */
  mounts: string[];
  /** A listening port below 1024 (api.listen, l7r.listen, cluster.peer.port). */
  lowPort: boolean;
}

/** One capability and why the role needs it (the reason becomes a comment in the unit). */
type Cap = [name: string, why: string];

// test/install.test.ts runs a node under exactly this set and starts and stops a desktop (on a
// cgroup v1 machine without AppArmor, so the first and last of the list are not exercised there).
const NODE_CAPS: Cap[] = [
  ["CAP_SYS_ADMIN", "LXC on cgroup v2: each desktop's device filter is a BPF program"],
  ["CAP_NET_ADMIN", "the VM bridge, veth and tap devices, nftables rules"],
  [
    "CAP_SETUID",
    "desktops' uid maps (LXC, lxc-usernsexec unpacking images), QEMU's -runas, setpriv for browser sessions",
  ],
  ["CAP_SETGID", "the same for gids and groups"],
  ["CAP_SETFCAP", "a uid map that maps a desktop's root (Linux 5.12 and later)"],
  ["CAP_CHOWN", "overlays, homes and run directories owned by desktops' shifted ids; browser sessions' directories"],
  ["CAP_DAC_OVERRIDE", "reading and removing what shifted ids and session uids own (0700 homes, upper layers)"],
  ["CAP_FOWNER", "modes and times of files owned by shifted ids"],
  ["CAP_KILL", "stopping QEMU (a uid of its own) and browser sessions' Xvnc (a container's processes need none)"],
  ["CAP_MAC_ADMIN", "AppArmor hosts: LXC loads each desktop's generated profile"],
];

const L7R_CAPS: Cap[] = [
  ["CAP_SETUID", "setpriv runs each browser session's Xvnc and nxproxy as a uid of its own (l7r.web.uid_base)"],
  ["CAP_SETGID", "the same for the session's gid, and dropping supplementary groups"],
  ["CAP_CHOWN", "the session's private directory and X authority file go to that uid"],
  ["CAP_DAC_OVERRIDE", "creating the NX socket in, and removing, the session's 0700 directory"],
  ["CAP_KILL", "stopping the session's Xvnc and nxproxy, which run as another uid"],
];

const BIND: Cap = ["CAP_NET_BIND_SERVICE", "a listening port below 1024 in the configuration"];

function capLines(caps: Cap[]): string[] {
  const w = Math.max(...caps.map(([n]) => n.length));
  return [
    ...caps.map(([n, why]) => `#   ${n.padEnd(w)}  ${why}`),
    `CapabilityBoundingSet=${caps.map(([n]) => n).join(" ")}`,
  ];
}

function pathLines(role: Role, c: UnitContext): string[] {
  const out: string[] = [];
  if (c.runtimeDirs.length) {
    out.push(`RuntimeDirectory=${c.runtimeDirs.join(" ")}`);
    // Kept across restarts: desktops' LXC configurations and sockets live there while they run.
    if (role !== "api") out.push("RuntimeDirectoryPreserve=yes");
  }
  if (c.writable.length) out.push(`ReadWritePaths=${c.writable.join(" ")}`);
  // /home, /root and /run/user hold nothing of qvd's, unless the configuration put a path there.
  const underHome = c.writable.some((p) => /^\/(home|root|run\/user)(\/|$)/.test(p));
  out.push(`ProtectHome=${underHome ? "read-only" : "yes"}`);
  return out;
}

const HEAD = (role: Role) => [
  `# Written by \`qvd install ${role}\` (qvd ${VERSION}). After changing path.* or a listening port`,
  `# in ${configPath(role)}, run \`qvd install ${role} --force\` again: the sandbox below lists them.`,
  `# Local changes belong in a drop-in (\`systemctl edit ${unitName(role)}\`).`,
];

const unitSection = (description: string, c: UnitContext, after: string[] = []) => [
  "[Unit]",
  `Description=${description}`,
  "Wants=network-online.target",
  `After=${["network-online.target", ...after, "postgresql.service"].join(" ")}`,
  ...(c.mounts.length ? [`RequiresMountsFor=${c.mounts.join(" ")}`] : []),
];

const restart = [
  "Restart=on-failure",
  "RestartSec=5",
  "# 78 is a configuration error: restarting does not mend it.",
  "RestartPreventExitStatus=78",
];

const install = ["", "[Install]", "WantedBy=multi-user.target", ""];

function nodeUnit(c: UnitContext): string {
  const caps = c.lowPort ? [...NODE_CAPS, BIND] : NODE_CAPS;
  return [
    ...HEAD("node"),
    ...unitSection("QVD node: desktops (HKD) and user broker (L7R)", c, ["remote-fs.target"]),
    "",
    "[Service]",
    "Type=exec",
    `ExecStart=${BINARY} node --config ${configPath("node")}`,
    ...restart,
    "# SIGTERM goes to `qvd node` alone: it stops the L7R, then the HKD, which stops the desktops",
    "# or leaves them running (hkd.on_shutdown). Once it has exited, whatever is left in the unit's",
    "# cgroup gets SIGKILL: a browser session's Xvnc or nxproxy, a hung lxc-*, ip or nft command.",
    "# LXC desktops are not in that cgroup (LXC run as root moves each container to cgroups of its",
    "# own, lxc.monitor.qvd-<id> and lxc.payload.qvd-<id>), so with hkd.on_shutdown = leave they",
    "# outlive a restart and the next HKD adopts them. QEMU (KVM desktops) stays in the unit's",
    "# cgroup and is killed: keep hkd.on_shutdown = stop on KVM nodes. (control-group would signal",
    "# the HKD and the L7R at once, out of order; process would leave stray helpers behind.)",
    "KillMode=mixed",
    "# Desktops stop in parallel, each within hkd.timeout.poweroff + hkd.timeout.kill (45 s).",
    "TimeoutStopSec=120",
    "",
    "# Sandbox. The node is root and runs LXC, QEMU, ip and nft. What a unit restricts is inherited",
    "# by the desktops LXC starts: seccomp filters and no-new-privileges cross into containers",
    "# (capabilities do not: a new user namespace begins with a full set). Hence, left out:",
    "#   NoNewPrivileges, RestrictSUIDSGID: desktops run setuid programs (sudo, fusermount3 for",
    "#     shared folders), images hold setuid files, and LXC changes AppArmor profile on exec;",
    "#   SystemCallArchitectures, LockPersonality, MemoryDenyWriteExecute, a SystemCallFilter allow",
    "#     list: they would hold in every desktop (32-bit programs, debuggers, browsers' JIT);",
    "#   ProtectHostname: LXC sets each container's hostname (sethostname would be refused);",
    "#   ProtectControlGroups, ProtectKernelTunables: LXC makes cgroups for each desktop, loads",
    "#     AppArmor profiles through /sys and writes /proc/sys;",
    "#   PrivateDevices, ProtectClock (it implies a device allow-list), ProtectProc: /dev/kvm,",
    "#     /dev/net/tun and /dev/fuse are used, and the HKD finds QEMU (another uid) in /proc;",
    "#   PrivateUsers, RestrictNamespaces: containers are user, mount, network… namespaces.",
    "ProtectSystem=strict",
    "PrivateMounts=yes",
    ...pathLines("node", c),
    "# Nothing of the node's lives in /tmp (LXC's, QEMU's, Xvnc's sockets are elsewhere or abstract).",
    "PrivateTmp=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "RestrictRealtime=yes",
    "# Also what desktops may open: packet, vsock, alg… sockets, frequent paths of kernel exploits",
    "# from user namespaces, are refused. Netlink: ip, nft and LXC configure the network with it.",
    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    "# Only calls neither the node nor a desktop has any use for (old ones, port I/O, swap, modules);",
    "# not @reboot (a container's init powers off with it), @cpu-emulation (Wine), @debug, @clock.",
    "SystemCallFilter=~@obsolete @raw-io @swap @module",
    "SystemCallErrorNumber=EPERM",
    "# Capabilities (none other: no module loading, raw I/O, clock, raw sockets, ptrace, chroot…):",
    ...capLines(caps),
    ...install,
  ].join("\n");
}

/** What the L7R and the API, network services without containers to run, both give up. */
const SERVICE_SANDBOX = [
  "PrivateDevices=yes",
  "ProtectKernelTunables=yes",
  "ProtectKernelModules=yes",
  "ProtectKernelLogs=yes",
  "ProtectControlGroups=yes",
  "ProtectClock=yes",
  "ProtectHostname=yes",
  "ProtectProc=invisible",
  "RestrictNamespaces=yes",
  "RestrictRealtime=yes",
  "RestrictSUIDSGID=yes",
  "LockPersonality=yes",
  "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
  "SystemCallArchitectures=native",
];

function l7rUnit(c: UnitContext): string {
  const caps = c.lowPort ? [...L7R_CAPS, BIND] : L7R_CAPS;
  return [
    ...HEAD("l7r"),
    ...unitSection("QVD L7R: user broker", c),
    "",
    "[Service]",
    "Type=exec",
    `ExecStart=${BINARY} l7r --config ${configPath("l7r")}`,
    ...restart,
    "# SIGTERM to the L7R alone, which ends its sessions; then SIGKILL to anything left in the",
    "# cgroup (browser sessions' Xvnc and nxproxy die with it anyway: setpriv --pdeathsig).",
    "KillMode=mixed",
    "",
    "# Sandbox. Root, because the node's firewall lets only uid 0 open connections to desktops",
    "# (src/virt/network.ts), but with five capabilities, for the browser sessions' processes.",
    "# setpriv drops privileges and gains none: no-new-privileges holds.",
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "PrivateMounts=yes",
    ...pathLines("l7r", c),
    "# Xvnc's /tmp/.X11-unix: a private /tmp of the L7R's own is enough (it talks to Xvnc over the",
    "# abstract socket, and the RFB and NX sockets live under path.run).",
    "PrivateTmp=yes",
    "# The L7R signals its sessions' processes by pid, never through /proc.",
    ...SERVICE_SANDBOX,
    "# mincore: Xvnc's libunwind probes its stack with it at start.",
    "SystemCallFilter=@system-service mincore",
    "SystemCallErrorNumber=EPERM",
    "# Not MemoryDenyWriteExecute: Bun's JavaScript JIT compiler writes executable memory.",
    "# Capabilities:",
    ...capLines(caps),
    ...install,
  ].join("\n");
}

function apiUnit(c: UnitContext): string {
  return [
    ...HEAD("api"),
    ...unitSection("QVD admin API and web administration tool", c),
    "",
    "[Service]",
    "Type=exec",
    `ExecStart=${BINARY} api --config ${configPath("api")}`,
    ...restart,
    "",
    "# Sandbox. A network service with no children: its own user, no capabilities",
    c.lowPort
      ? "# but binding api.listen's port below 1024, writing only the images folder."
      : "# (api.listen's port is not below 1024), writing only the images folder (uploads).",
    "User=qvd",
    "Group=qvd",
    ...(c.lowPort
      ? ["CapabilityBoundingSet=CAP_NET_BIND_SERVICE", "AmbientCapabilities=CAP_NET_BIND_SERVICE"]
      : ["CapabilityBoundingSet=", "AmbientCapabilities="]),
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "PrivateMounts=yes",
    ...pathLines("api", c),
    "PrivateTmp=yes",
    // A capability to bind a low port holds only in the machine's user namespace.
    ...(c.lowPort ? [] : ["PrivateUsers=yes"]),
    ...SERVICE_SANDBOX,
    "SystemCallFilter=@system-service",
    "SystemCallFilter=~@privileged @resources",
    "SystemCallErrorNumber=EPERM",
    "RemoveIPC=yes",
    "UMask=0027",
    "# Not MemoryDenyWriteExecute: Bun's JavaScript JIT compiler writes executable memory.",
    ...install,
  ].join("\n");
}

export function unitText(role: Role, c: UnitContext): string {
  return role === "node" ? nodeUnit(c) : role === "l7r" ? l7rUnit(c) : apiUnit(c);
}

/**
 * The node's per-desktop log files: LXC's log and the guest's console (the VMA's log) of every
 * container, QEMU's serial console of every VM. They are emptied at each start of their desktop
 * but grow while it runs, in path.run, which is memory (tmpfs). Everything else goes to stderr,
 * i.e. the journal. copytruncate: LXC and QEMU keep the file open.
 */
export function logrotateText(logDirs: string[]): string {
  return [
    `# Written by \`qvd install node\` (qvd ${VERSION}). The per-desktop logs of the node: LXC's log`,
    "# and console log of each container, QEMU's serial console of each VM. They live in path.run",
    "# (memory) and are emptied when their desktop starts again; this keeps a long-running one from",
    "# filling it. Everything else qvd logs goes to stderr, i.e. the journal.",
    `${logDirs.map((d) => `${d}/*.log`).join(" ")} {`,
    "    size 10M",
    "    rotate 2",
    "    compress",
    "    missingok",
    "    notifempty",
    "    # LXC and QEMU keep the file open and write on.",
    "    copytruncate",
    "}",
    "",
  ].join("\n");
}
