// Builds a desktop image (a root filesystem tarball) from Debian packages: debootstrap's
// minbase, then apt-get inside a chroot for the desktop packages, then a clean-up and `tar`.
// Used by `qvd di build` (src/roles/di.ts). Needs root, debootstrap and a Debian mirror.
//
// Cache (default /var/cache/qvd/debootstrap, config di.build.cache):
//   debs/          packages debootstrap downloaded (its --cache-dir)
//   apt/           packages apt-get downloaded inside the chroot (restored before the next build)
//   base/          the base system debootstrap made (up to 30 days; updates are applied on top)
//   images/        the last finished image per recipe: an unchanged recipe is not built again
//   build-*/       work directories of running builds (removed at the end, even on failure)
//   .lock          one build at a time per cache
import {
  copyFileSync,
  existsSync,
  linkSync,
  lstatSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  renameSync,
  rmSync,
  statSync,
  symlinkSync,
  truncateSync,
  writeFileSync,
  chmodSync,
} from "node:fs";
import { basename, dirname, join, resolve } from "node:path";
import { UserError } from "../errors.ts";
import { run } from "../run.ts";
import { lockFile } from "./images.ts";

export const SUITE = "bookworm";
export const DEFAULT_IMAGE_NAME = `debian-${SUITE}-desktop.tar.gz`;

/**
 * Installed on top of debootstrap's minbase (passwd, login, apt, coreutils…), without
 * recommends. The window manager is JWM: under 0.5 MB, a taskbar with a program menu and a
 * window list, and it needs nothing but X libraries (openbox pulls python3; icewm an image
 * and sound stack; matchbox shows one maximised window at a time, a phone UI). Any plain X11
 * window manager works under nxagent, which is an ordinary X server to its clients.
 */
export const DESKTOP_PACKAGES = [
  "nxagent", // the X server the client's nxproxy connects to (port 4000 + display)
  "xkb-data", // keymaps and fonts nxagent cannot start without (only Recommends of nxagent)
  "xfonts-base",
  "xinit", // the VMA runs `xinit <session> -- nxagent …`; brings /etc/X11/Xsession
  "xauth",
  "jwm",
  "xterm",
  "x11-apps",
  "x11-utils",
  "fonts-dejavu-core", // the Xft font of jwm and xterm -fa
  "iproute2", // `ip` for the guest's network
  "procps", // ps, kill, pkill for the session and the VMA
  // The session's services (src/vma/README.md). Nothing starts them on its own: the image has
  // no init but the VMA, and the build's policy-rc.d keeps the packages' scripts from starting them.
  "cups-daemon", // the desktop's CUPS: the VMA adds the client's printers as raw queues (the client's CUPS converts)
  "cups-client", // lp, lpstat, lpadmin
  "pulseaudio", // the user's sound server, started by the VMA with a tunnel sink to the client
  "pulseaudio-utils", // paplay, pactl, parec
  "sshfs", // shared folders: mounts the client's folder over the slave channel (brings fuse3)
  "openssh-sftp-server", // the desktop side of the original's reverse shares
  "xclip", // the clipboard from a shell and scripts (the browser desktop's tests read it too)
  "xdg-utils", // xdg-open: `qvd client --file` opens the file with the desktop's application
  "file", // xdg-mime's file type detection outside a desktop environment
] as const;

/**
 * dpkg filters kept in the image (/etc/dpkg/dpkg.cfg.d/qvd-slim): documentation, manuals and
 * translations, and mesa's software OpenGL (its dri drivers and LLVM, about 170 MB, pulled in
 * by glxinfo of x11-utils; nxagent draws 2D and has no use for them). Likewise libavcodec and
 * its video codecs (about 100 MB): pulseaudio depends on libasound2-plugins, whose a52 and
 * lavrate ALSA plugins alone link them, and the desktop's sound goes to the VMA's tunnel sink,
 * never through ALSA (no other program of the image needs these libraries). Delete the file and
 * reinstall a package to get its files back.
 */
export const DPKG_EXCLUDES = `# Written by qvd di build: files dpkg does not install in this image.
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
path-exclude /usr/lib/*/dri/*
path-exclude /usr/lib/*/libLLVM-*
path-exclude /usr/lib/*/libz3.so*
path-exclude /usr/lib/*/alsa-lib/libasound_module_pcm_a52.so
path-exclude /usr/lib/*/alsa-lib/libasound_module_rate_lavrate*
path-exclude /usr/lib/*/libavcodec.so*
path-exclude /usr/lib/*/libavutil.so*
path-exclude /usr/lib/*/libswresample.so*
path-exclude /usr/lib/*/libx264.so*
path-exclude /usr/lib/*/libx265.so*
path-exclude /usr/lib/*/libcodec2.so*
path-exclude /usr/lib/*/libmfx*
path-exclude /usr/lib/*/mfx/*
path-exclude /usr/lib/*/libSvtAv1Enc.so*
path-exclude /usr/lib/*/libaom.so*
path-exclude /usr/lib/*/libdav1d.so*
path-exclude /usr/lib/*/librav1e.so*
path-exclude /usr/lib/*/libvpx.so*
path-exclude /usr/lib/*/libjxl*
path-exclude /usr/lib/*/libhwy*
path-exclude /usr/lib/*/libxvidcore.so*
path-exclude /usr/lib/*/libzvbi*
path-exclude /usr/lib/*/libtheora*
path-exclude /usr/lib/*/libopenjp2.so*
path-exclude /usr/lib/*/libnuma.so*
path-exclude /usr/lib/*/liblcms2.so*
path-exclude /usr/lib/*/libOpenCL.so*
path-exclude /usr/lib/*/libva.so*
path-exclude /usr/lib/*/libva-*.so*
path-exclude /usr/lib/*/libvdpau*
path-exclude /usr/lib/*/vdpau/*
`;

/** The default session: a window manager and a terminal (also the x-session-manager). */
export const SESSION_SCRIPT = `#!/bin/sh
# QVD desktop session, installed by \`qvd di build\`. The VMA starts it as the user under
# nxagent, through xinit: directly, or as /etc/X11/Xsession -> x-session-manager (where a
# user's own ~/.xsession comes first). The session lasts as long as the window manager.
if [ -r /etc/default/locale ]; then . /etc/default/locale; export LANG; fi
# X resources for every X toolkit program of the session (there is no xrdb in the image).
[ -n "$XENVIRONMENT" ] || { XENVIRONMENT=/etc/X11/qvd.Xresources; export XENVIRONMENT; }
cd "$HOME" 2>/dev/null || cd /
xterm &
exec jwm
`;

/**
 * Fonts drawn in the guest: nxagent forwards core X fonts to the client's X server, which may
 * lack the "fixed" fonts xterm and the Xaw programs ask for; Xft fonts are rendered here.
 */
export const X_RESOURCES = `! Written by qvd di build; loaded through XENVIRONMENT by /usr/local/bin/qvd-session.
XTerm*faceName: DejaVu Sans Mono
XTerm*faceSize: 11
XTerm*geometry: 100x30+40+40
XClock*render: true
XClock*face: DejaVu Sans-9
*international: false
`;

/** The types `file --mime-type` gives text files; all open in the text editor. */
export const TEXT_TYPES = [
  "text/plain",
  "text/x-shellscript",
  "text/x-c",
  "text/x-c++",
  "text/x-python",
  "text/x-script.python",
  "text/x-perl",
  "text/x-ruby",
  "text/x-java",
  "text/x-makefile",
  "text/x-diff",
  "text/x-tex",
  "text/troff",
  "text/x-asm",
  "text/x-po",
  "text/x-lisp",
  "text/x-tcl",
  "text/x-php",
  "text/x-awk",
  "text/x-m4",
  "text/x-msdos-batch",
  "text/csv",
  "text/xml",
  "text/html",
  "text/rtf",
  "application/json",
  "application/x-empty",
  "inode/x-empty",
] as const;

/** jwm's root menu includes this file (normally generated by Debian's menu package). */
export const JWM_MENU = `<?xml version="1.0"?>
<JWM>
    <!-- Written by qvd di build. -->
    <Menu label="Applications">
        <Program label="Terminal">xterm</Program>
        <Program label="Text editor">xedit</Program>
        <Program label="Calculator">xcalc</Program>
        <Program label="Clock">xclock</Program>
        <Program label="Load">xload</Program>
        <Program label="Eyes">xeyes</Program>
    </Menu>
</JWM>
`;

/** The desktop entry of the text editor, the application xdg-open gives text files. */
export const EDITOR_DESKTOP_ENTRY = `[Desktop Entry]
# Written by qvd di build.
Type=Application
Name=Text editor
Exec=xedit %f
Terminal=false
MimeType=${TEXT_TYPES.join(";")};
`;

/**
 * /etc/xdg/mimeapps.list: xdg-open outside a desktop environment asks `xdg-mime query default`,
 * which has no wildcards, so each text type `file --mime-type` reports is listed.
 */
export const MIMEAPPS_LIST = `# Written by qvd di build: the applications xdg-open uses (a user's ~/.config/mimeapps.list comes first).
[Default Applications]
${TEXT_TYPES.map((t) => `${t}=qvd-xedit.desktop`).join("\n")}
`;

/**
 * PulseAudio clients never start a daemon of their own: the VMA starts the user's PulseAudio
 * when the session has sound, and without it a local daemon would play into no device.
 */
export const PULSE_CLIENT_CONF = `# Written by qvd di build.
autospawn = no
`;

/** Everything that decides the content of an image: a change means a new build. */
export const RECIPE = {
  revision: 3,
  suite: SUITE,
  variant: "minbase",
  packages: DESKTOP_PACKAGES,
  dpkgExcludes: DPKG_EXCLUDES,
  session: SESSION_SCRIPT,
  xResources: X_RESOURCES,
  jwmMenu: JWM_MENU,
  editor: EDITOR_DESKTOP_ENTRY,
  mimeapps: MIMEAPPS_LIST,
  pulse: PULSE_CLIENT_CONF,
};

// --- KVM images (`qvd di build --kvm`): the same desktop as a bootable disk ------------------------

export const DEFAULT_KVM_IMAGE_NAME = `debian-${SUITE}-desktop.qcow2`;

/** What a VM needs besides the desktop: a kernel and initramfs, systemd as init, udev (disk ids). */
export const KVM_PACKAGES = [
  "linux-image-amd64", // booted directly by QEMU (-kernel/-initrd, extracted by the node: src/virt/kvm-image.ts)
  "systemd-sysv", // init: mounts the qvd binary's disk and runs the VMA as a service
  "udev", // /dev/disk/by-id/virtio-<serial>: how the guest finds the qvd binary's and the home's disks
  "kmod",
  "e2fsprogs", // the VMA formats the user's home disk (mkfs.ext4)
  "usbip", // not used by the VMA (it attaches through vhci_hcd's sysfs files): usbip port/list help an administrator look
  "dbus", // systemd-logind needs it: it powers the VM off on the ACPI button (the node's graceful stop, QMP system_powerdown)
  "zstd", // initramfs compression (without it mkinitramfs falls back to gzip: larger, slower to unpack)
] as const;

/**
 * Kernel modules for hardware a VM never has, kept out by dpkg (/etc/dpkg/dpkg.cfg.d/qvd-kvm):
 * about 200 MB of the 400 MB of modules. What a QEMU guest uses stays: virtio_* (block, net,
 * console, rng, balloon, input), tun, usbip/vhci-hcd, SCSI (USB storage through usbip),
 * filesystems, nls, 9p, fuse/virtiofs, qemu_fw_cfg. The virtio GPU goes with the GPU drivers:
 * desktops draw through nxagent, the VM has no display.
 */
export const KVM_MODULE_EXCLUDES = `# Written by qvd di build --kvm: kernel modules for hardware a virtual machine never has.
${[
  "drivers/gpu",
  "drivers/media",
  "drivers/net/wireless",
  "drivers/net/ethernet",
  "drivers/net/can",
  "drivers/net/wwan",
  "drivers/infiniband",
  "drivers/staging",
  "drivers/iio",
  "drivers/platform",
  "drivers/hwmon",
  "drivers/comedi",
  "drivers/isdn",
  "drivers/bluetooth",
  "drivers/mtd",
  "drivers/mmc",
  "drivers/memstick",
  "drivers/target",
  "drivers/thunderbolt",
  "drivers/firewire",
  "drivers/atm",
  "drivers/nfc",
  "drivers/fpga",
  "drivers/gnss",
  "drivers/w1",
  "drivers/pcmcia",
  "drivers/edac",
  "drivers/video",
  "sound",
  "net/wireless",
  "net/mac80211",
  "net/bluetooth",
  "net/can",
  "net/nfc",
  "net/atm",
]
  .flatMap((d) => [`path-exclude /lib/modules/*/kernel/${d}/*`, `path-exclude /usr/lib/modules/*/kernel/${d}/*`])
  .join("\n")}
`;

/** The initramfs only has to find /dev/vda: MODULES=list builds it in seconds instead of minutes. */
export const INITRAMFS_MODULES = ["virtio_pci", "virtio_blk", "ext4", "crc32c_generic"] as const;
export const INITRAMFS_CONF = `# Written by qvd di build --kvm: only the modules listed in /etc/initramfs-tools/modules.
MODULES=list
`;

/** The node's qvd binary: a small read-only ext4 disk with serial qvd-bin, holding /qvd. */
export const OPT_QVD_MOUNT = `# Written by qvd di build --kvm: the node's qvd binary, on a read-only disk the node attaches.
[Unit]
Description=The node's qvd binary (read-only disk)

[Mount]
What=/dev/disk/by-id/virtio-qvd-bin
Where=/opt/qvd
Type=ext4
Options=ro,nodev,nosuid
`;

/** The VMA: reads its settings from fw_cfg, sets up the network and the home disk, serves the node. */
export const QVD_VMA_SERVICE = `# Written by qvd di build --kvm: the desktop's agent, from the node's qvd binary.
[Unit]
Description=QVD VM agent
Requires=opt-qvd.mount
After=opt-qvd.mount

[Service]
ExecStart=/opt/qvd/qvd vma --kvm-guest
Restart=on-failure
RestartSec=1
# Its log also on the serial console, which the node keeps (<vm.kvm.path>/logs/qvd-<id>.console.log).
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
`;

/**
 * Units masked in the guest: no login on any console (nothing listens, nobody logs in but
 * through the desktop), no periodic jobs writing to a disk that is thrown away at stop, and the
 * session services the VMA starts itself (CUPS, PulseAudio) not started by systemd.
 */
export const MASKED_UNITS = [
  "getty.target",
  "getty@.service",
  "serial-getty@.service",
  "autovt@.service",
  "console-getty.service",
  "container-getty@.service",
  "apt-daily.timer",
  "apt-daily.service",
  "apt-daily-upgrade.timer",
  "apt-daily-upgrade.service",
  "e2scrub_all.timer",
  "e2scrub_all.service",
  "e2scrub_reap.service",
  "fstrim.timer",
  "fstrim.service",
  "man-db.timer",
  "man-db.service",
  "dpkg-db-backup.timer",
  "dpkg-db-backup.service",
  "systemd-timesyncd.service",
  "cups.service",
  "cups.socket",
  "cups.path",
  "cups-browsed.service",
  "pulseaudio.service",
  "pulseaudio-enable-autospawn.service",
] as const;

export const KVM_FSTAB = `# Written by qvd di build --kvm: the image is one ext4 filesystem on the whole disk.
/dev/vda / ext4 rw,errors=remount-ro 0 1
`;

/** Everything that decides a KVM image beyond the desktop (RECIPE). */
export const KVM_RECIPE = {
  revision: 1,
  packages: KVM_PACKAGES,
  moduleExcludes: KVM_MODULE_EXCLUDES,
  initramfsModules: INITRAMFS_MODULES,
  initramfsConf: INITRAMFS_CONF,
  mount: OPT_QVD_MOUNT,
  service: QVD_VMA_SERVICE,
  masked: MASKED_UNITS,
  fstab: KVM_FSTAB,
};

export const recipeHash = (kvm = false) =>
  new Bun.CryptoHasher("sha256").update(JSON.stringify(kvm ? { ...RECIPE, kvm: KVM_RECIPE } : RECIPE)).digest("hex");

/** Files required in every built image (relative to its root). */
export const REQUIRED_FILES = [
  "usr/bin/nxagent",
  "usr/bin/xinit",
  "usr/bin/jwm",
  "usr/bin/xterm",
  "usr/local/bin/qvd-session",
  "etc/X11/Xsession",
  "etc/X11/qvd.Xresources",
  "etc/jwm/debian-menu",
  "usr/bin/xkbcomp",
  "usr/sbin/useradd",
  "usr/bin/ip",
  "usr/sbin/cupsd",
  "usr/sbin/lpadmin",
  "usr/bin/lp",
  "usr/lib/cups/backend/ipp",
  "usr/bin/pulseaudio",
  "usr/bin/paplay",
  "usr/bin/pactl",
  "usr/bin/sshfs",
  "usr/bin/fusermount3",
  "usr/lib/openssh/sftp-server",
  "usr/bin/xdg-open",
  "usr/bin/file",
  "usr/bin/xedit",
  "usr/share/applications/qvd-xedit.desktop",
  "etc/xdg/mimeapps.list",
  "etc/pulse/client.conf.d/99-qvd.conf",
];

/** Files required in every KVM image besides REQUIRED_FILES (the guest contract, src/virt/README.md). */
export const KVM_REQUIRED_FILES = [
  "vmlinuz",
  "initrd.img",
  "sbin/init",
  "usr/bin/systemctl",
  "usr/sbin/usbip",
  "sbin/mkfs.ext4",
  "etc/fstab",
  "etc/systemd/system/opt-qvd.mount",
  "etc/systemd/system/qvd-vma.service",
  "etc/systemd/system/multi-user.target.wants/qvd-vma.service",
  "etc/initramfs-tools/modules",
];

// --- mirrors ------------------------------------------------------------------------------------

export interface Mirrors {
  debian: string;
  security: string;
}

/** The Debian mirrors of this machine's apt sources (deb822 and one-line formats). */
export function aptMirrors(etcApt = "/etc/apt"): Partial<Mirrors> {
  const found: Partial<Mirrors> = {};
  const consider = (types: string[], uris: string[], suites: string[]) => {
    if (!types.includes("deb") || uris.length === 0) return;
    if (!found.debian && suites.includes(SUITE)) found.debian = uris[0];
    if (!found.security && suites.includes(`${SUITE}-security`)) found.security = uris[0];
  };
  const files: string[] = [];
  if (existsSync(join(etcApt, "sources.list"))) files.push(join(etcApt, "sources.list"));
  const d = join(etcApt, "sources.list.d");
  if (existsSync(d))
    for (const n of readdirSync(d).sort()) if (n.endsWith(".list") || n.endsWith(".sources")) files.push(join(d, n));
  for (const f of files) {
    let text: string;
    try {
      text = readFileSync(f, "utf8");
    } catch {
      continue;
    }
    if (f.endsWith(".sources")) {
      for (const stanza of text.split(/\n\s*\n/)) {
        const field = (name: string) =>
          (new RegExp(`^${name}:\\s*(.*)$`, "mi").exec(stanza)?.[1] ?? "").trim().split(/\s+/).filter(Boolean);
        if (/^Enabled:\s*no/im.test(stanza)) continue;
        consider(field("Types"), field("URIs"), field("Suites"));
      }
    } else {
      for (const raw of text.split("\n")) {
        const line = raw.replace(/#.*/, "").trim();
        const m = /^(deb|deb-src)\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)/.exec(line);
        if (m) consider([m[1]!], [m[2]!], [m[3]!]);
      }
    }
  }
  return found;
}

export function resolveMirrors(configured: string): Mirrors {
  const apt = aptMirrors();
  const debian = (configured || apt.debian || "http://deb.debian.org/debian").replace(/\/+$/, "");
  const security = (apt.security || "http://deb.debian.org/debian-security").replace(/\/+$/, "");
  return { debian, security };
}

// --- helpers ------------------------------------------------------------------------------------

/** Mount points at or below `dir` (deepest first), from /proc/self/mountinfo. */
function mountsBelow(dir: string): string[] {
  let text = "";
  try {
    text = readFileSync("/proc/self/mountinfo", "utf8");
  } catch {
    return [];
  }
  const unescapeOctal = (s: string) =>
    s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
  return text
    .split("\n")
    .map((l) => unescapeOctal(l.split(" ")[4] ?? ""))
    .filter((m) => m === dir || m.startsWith(dir + "/"))
    .sort((a, b) => b.length - a.length);
}

/** Removes a work directory, unmounting whatever a failed chroot step left mounted in it first. */
async function removeWorkDir(dir: string): Promise<void> {
  for (const m of mountsBelow(dir)) await run(["umount", "-l", m], { allowFail: true });
  const still = mountsBelow(dir);
  if (still.length) throw new UserError(`cannot remove ${dir}: still mounted: ${still.join(", ")}`);
  rmSync(dir, { recursive: true, force: true });
}

/** Hard-links (or copies, across filesystems) every .deb of `from` into `to`. */
function linkDebs(from: string, to: string): number {
  if (!existsSync(from)) return 0;
  mkdirSync(to, { recursive: true });
  let n = 0;
  for (const name of readdirSync(from)) {
    if (!name.endsWith(".deb")) continue;
    const dst = join(to, name);
    if (existsSync(dst)) continue;
    try {
      linkSync(join(from, name), dst);
    } catch {
      copyFileSync(join(from, name), dst);
    }
    n++;
  }
  return n;
}

export async function sha256File(file: string): Promise<string> {
  const hasher = new Bun.CryptoHasher("sha256");
  const reader = Bun.file(file).stream().getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    hasher.update(value);
  }
  return hasher.digest("hex");
}

/** tar's compression flags for an output file name. */
function compressionFor(file: string): { args: string[]; ext: string } {
  if (/\.(tar\.gz|tgz)$/.test(file)) return { args: ["-z"], ext: ".tar.gz" };
  if (/\.(tar\.xz|txz)$/.test(file)) return { args: ["-I", "xz -T0"], ext: ".tar.xz" };
  if (/\.(tar\.zst|tzst)$/.test(file)) return { args: ["-I", "zstd -T0"], ext: ".tar.zst" };
  if (/\.tar$/.test(file)) return { args: [], ext: ".tar" };
  throw new UserError(`${file}: the image name must end in .tar.gz, .tgz, .tar.xz, .tar.zst or .tar`);
}

const MiB = (n: number) => `${(n / 1024 / 1024).toFixed(1)} MiB`;

// --- KVM images -----------------------------------------------------------------------------------

/** The guest contract's side in the image (src/virt/README.md "KVM images"): units, masks, fstab. */
async function configureGuest(root: string): Promise<void> {
  const sys = join(root, "etc/systemd/system");
  mkdirSync(join(sys, "multi-user.target.wants"), { recursive: true });
  writeFileSync(join(sys, "opt-qvd.mount"), OPT_QVD_MOUNT);
  writeFileSync(join(sys, "qvd-vma.service"), QVD_VMA_SERVICE);
  mkdirSync(join(root, "opt/qvd"), { recursive: true });
  // What `systemctl enable` and `mask` write, without a running systemd to ask.
  const link = (target: string, at: string) => {
    rmSync(at, { force: true });
    symlinkSync(target, at);
  };
  link("/etc/systemd/system/qvd-vma.service", join(sys, "multi-user.target.wants/qvd-vma.service"));
  link("/lib/systemd/system/multi-user.target", join(sys, "default.target"));
  for (const u of MASKED_UNITS) link("/dev/null", join(sys, u));
  // Whatever a package enabled among them goes too (a masked unit's wants links are dead ends).
  for (const d of readdirSync(sys)) {
    if (!d.endsWith(".wants") && !d.endsWith(".requires")) continue;
    for (const n of readdirSync(join(sys, d)))
      if ((MASKED_UNITS as readonly string[]).includes(n) || /^(getty|serial-getty|autovt)@/.test(n))
        rmSync(join(sys, d, n), { force: true });
  }
  writeFileSync(join(root, "etc/fstab"), KVM_FSTAB);
  // Every desktop would share one machine id: empty means systemd makes one at boot.
  writeFileSync(join(root, "etc/machine-id"), "");
  rmSync(join(root, "var/lib/dbus/machine-id"), { force: true });
  // The initramfs finds the root disk (virtio) and its filesystem.
  const initrd = readlinkSync(join(root, "initrd.img"));
  if (initrd.startsWith("/") || initrd.split("/").includes(".."))
    throw new UserError(`/initrd.img links to ${initrd}, not into /boot`);
  const listed = initramfsNames(readFileSync(join(root, initrd)));
  for (const m of ["virtio_blk", "virtio_pci", "ext4"])
    if (!listed.some((n) => n.endsWith(`/${m}.ko`))) throw new UserError(`the initramfs lacks ${m}.ko`);
}

/**
 * The names in an initramfs: cpio "newc" archives, uncompressed (early microcode) or gzip/zstd,
 * one after the other (what lsinitramfs shows, without cpio or a chroot with /proc).
 */
export function initramfsNames(buf: Uint8Array): string[] {
  const names: string[] = [];
  let b = Buffer.from(buf);
  let off = 0;
  while (off < b.length) {
    if (b[off] === 0) {
      off++; // padding between archives
      continue;
    }
    const magic = b.subarray(off, off + 6).toString("latin1");
    if (magic === "070701" || magic === "070702") {
      for (;;) {
        const h = b.subarray(off, off + 110).toString("latin1");
        if (h.length < 110 || !h.startsWith("0707")) throw new UserError("the initramfs is not a cpio archive");
        const field = (i: number) => parseInt(h.slice(6 + i * 8, 14 + i * 8), 16);
        const size = field(6);
        const nameSize = field(11);
        const name = b.subarray(off + 110, off + 110 + nameSize - 1).toString("latin1");
        off = (off + 110 + nameSize + 3) & ~3;
        off = (off + size + 3) & ~3;
        if (name === "TRAILER!!!") break;
        names.push(name);
      }
      continue;
    }
    if (b[off] === 0x1f && b[off + 1] === 0x8b) b = Buffer.from(Bun.gunzipSync(b.subarray(off)));
    else if (b.readUInt32LE(off) === 0xfd2fb528) b = Buffer.from(Bun.zstdDecompressSync(b.subarray(off)));
    else throw new UserError("the initramfs is neither a cpio archive nor gzip or zstd compressed");
    off = 0;
  }
  return names;
}

/**
 * The root filesystem as a disk: ext4 (label qvd-root) on the whole disk, made by mkfs.ext4 -d
 * from the tree (no mount), used size + 25 % + 512 MiB, then converted into a qcow2.
 */
async function makeDisk(
  root: string,
  work: string,
  out: string,
  o: { mkfs: string; qemuImg: string; log: (l: string) => void; elapsed: () => string },
): Promise<void> {
  // Runtime directories stay empty (devtmpfs, proc, sysfs and tmpfs are mounted over them).
  for (const d of ["dev", "proc", "sys", "run"]) {
    const p = join(root, d);
    if (existsSync(p)) for (const n of readdirSync(p)) rmSync(join(p, n), { recursive: true, force: true });
  }
  const used = Number((await run(["du", "-s", "-x", "-B1", root])).stdout.split(/\s/)[0]);
  const size = Math.ceil((used * 1.25 + 512 * 1024 * 1024) / (1024 * 1024)) * 1024 * 1024;
  const raw = join(work, "disk.raw");
  o.log(`[5/6] mkfs.ext4 -L qvd-root: ${MiB(used)} of files on a ${MiB(size)} disk`);
  writeFileSync(raw, "");
  truncateSync(raw, size);
  // Inode tables and journal written now (not lazily by every guest's kernel into its overlay).
  await run(
    [
      o.mkfs,
      "-q",
      "-F",
      "-t",
      "ext4",
      "-L",
      "qvd-root",
      "-m",
      "1",
      "-E",
      "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
      "-d",
      root,
      raw,
    ],
    { env: { LC_ALL: "C" } },
  );
  await run(["e2fsck", "-f", "-n", raw], { env: { LC_ALL: "C" } });
  o.log(`      filesystem made (${o.elapsed()})`);
  o.log(`[6/6] qemu-img convert -O qcow2`);
  await run([o.qemuImg, "convert", "-f", "raw", "-O", "qcow2", raw, out]);
  rmSync(raw, { force: true });
  o.log(`      ${MiB(statSync(out).size)} qcow2, ${MiB(size)} virtual (${o.elapsed()})`);
}

// --- the build ----------------------------------------------------------------------------------

export interface BuildOptions {
  output: string;
  cacheDir: string;
  mirror?: string;
  /** Build even when the cache holds an image of the same recipe, and bootstrap the base system anew. */
  rebuild?: boolean;
  /** Progress lines for people. */
  log?: (line: string) => void;
  /** A KVM image: a bootable qcow2 (output must end in .qcow2) instead of a tarball. */
  kvm?: boolean;
}

export interface BuildResult {
  output: string;
  sha256: string;
  bytes: number;
  /** True when the image came from the cache. */
  cached: boolean;
  seconds: number;
  recipe: string;
}

/** A cached base system older than this is bootstrapped again. */
const BASE_MAX_AGE_DAYS = 30;

const CHROOT_ENV = { DEBIAN_FRONTEND: "noninteractive", LC_ALL: "C", LANG: "C", PATH: "/usr/sbin:/usr/bin:/sbin:/bin" };

export async function buildImage(opts: BuildOptions): Promise<BuildResult> {
  const log = opts.log ?? (() => {});
  const started = Date.now();
  const elapsed = () => `${((Date.now() - started) / 1000).toFixed(0)}s`;
  const output = resolve(opts.output);
  const cacheDir = resolve(opts.cacheDir);
  const kvm = Boolean(opts.kvm);
  if (kvm && !output.endsWith(".qcow2")) throw new UserError(`${output}: a KVM image's name must end in .qcow2`);
  const comp = kvm ? { args: [], ext: ".qcow2" } : compressionFor(output);
  if (process.getuid?.() !== 0) throw new UserError("building an image needs root (debootstrap and chroot)");
  const which = (prog: string) => {
    const found = Bun.which(prog, { PATH: `${process.env.PATH ?? ""}:/usr/sbin:/sbin` });
    if (!found)
      throw new UserError(
        `${prog} is missing (apt-get install debootstrap tar coreutils${kvm ? " e2fsprogs qemu-utils util-linux" : ""})`,
      );
    return found;
  };
  const [debootstrap, chrootBin] = [which("debootstrap"), which("chroot")];
  const [mkfs, qemuImg, unshare] = kvm ? [which("mkfs.ext4"), which("qemu-img"), which("unshare")] : ["", "", ""];
  const steps = kvm ? 6 : 5;
  const recipe = recipeHash(kvm);
  mkdirSync(cacheDir, { recursive: true });
  mkdirSync(dirname(output), { recursive: true });

  const lock = await lockFile(join(cacheDir, ".lock"), undefined, () =>
    log(`waiting for another build using ${cacheDir}`),
  );
  const work = join(cacheDir, `build-${process.pid}-${Date.now().toString(36)}`);
  const tmpOut = join(dirname(output), `.${basename(output)}.tmp-${process.pid}`);
  try {
    // One cached image per kind: a tarball build never evicts the qcow2, nor the other way round.
    const cachePrefix = kvm ? `debian-${SUITE}-desktop-kvm-` : `debian-${SUITE}-desktop-`;
    const sameKind = (n: string) =>
      n.startsWith(cachePrefix) && (kvm ? n.endsWith(".qcow2") : !n.endsWith(".qcow2") && !n.includes("-kvm-"));
    const cached = join(cacheDir, "images", `${cachePrefix}${recipe.slice(0, 16)}${comp.ext}`);
    if (!opts.rebuild && existsSync(cached)) {
      log(`using the cached image ${cached} (same recipe; --rebuild to build anew)`);
      copyFileSync(cached, tmpOut);
      renameSync(tmpOut, output);
      const bytes = statSync(output).size;
      return {
        output,
        sha256: await sha256File(output),
        bytes,
        cached: true,
        seconds: (Date.now() - started) / 1000,
        recipe,
      };
    }
    // Work directories of builds that died (we hold the cache lock, so none is running).
    if (lock.locked)
      for (const n of readdirSync(cacheDir)) if (n.startsWith("build-")) await removeWorkDir(join(cacheDir, n));

    const mirrors = resolveMirrors(opts.mirror ?? "");
    const root = join(work, "rootfs");
    mkdirSync(root, { recursive: true });

    // 1. The base system: debootstrap, or its result from an earlier build.
    const base = join(
      cacheDir,
      "base",
      `${SUITE}-minbase-${new Bun.CryptoHasher("sha256").update(mirrors.debian).digest("hex").slice(0, 8)}.tar.gz`,
    );
    const baseAge = existsSync(base) ? (Date.now() - statSync(base).mtimeMs) / 86_400_000 : Infinity;
    const tarFlags = ["--numeric-owner", "--xattrs", "--xattrs-include=*"];
    if (!opts.rebuild && baseAge < BASE_MAX_AGE_DAYS) {
      log(`[1/${steps}] base system from the cache (${base}, ${baseAge.toFixed(1)} days old; updates come in step 2)`);
      await run(["tar", "-x", "-z", "-p", "-f", base, "-C", root, ...tarFlags]);
      for (const d of ["var/lib/apt/lists/partial", "var/cache/apt/archives/partial"])
        mkdirSync(join(root, d), { recursive: true });
    } else {
      log(`[1/${steps}] debootstrap --variant=minbase ${SUITE} from ${mirrors.debian}`);
      mkdirSync(join(cacheDir, "debs"), { recursive: true });
      let pkgs = 0;
      await run(
        [
          debootstrap,
          "--variant=minbase",
          "--components=main",
          `--cache-dir=${join(cacheDir, "debs")}`,
          SUITE,
          root,
          mirrors.debian,
        ],
        {
          env: { LC_ALL: "C" },
          onLine: (line) => {
            const per =
              /^I: (Retrieving|Validating|Extracting|Unpacking|Configuring) (?!InRelease|Packages|Release)(\S+)/.exec(
                line,
              );
            if (!per) {
              if (line.startsWith("I: ") || line.startsWith("W: ") || line.startsWith("E: ")) log(`      ${line}`);
              return;
            }
            if (per[1] === "Unpacking" || per[1] === "Configuring") return;
            if (per[1] === "Retrieving" && ++pkgs % 25 === 0) log(`      … ${pkgs} packages retrieved (${elapsed()})`);
          },
        },
      );
      if (mountsBelow(root).length)
        throw new UserError(`debootstrap left mounts below ${root}: ${mountsBelow(root).join(", ")}`);
      mkdirSync(dirname(base), { recursive: true });
      await run([
        "tar",
        "-c",
        "-z",
        "-f",
        `${base}.tmp`,
        "-C",
        root,
        ...tarFlags,
        "--exclude=./var/cache/apt/archives/*.deb",
        "--exclude=./var/cache/apt/*.bin",
        "--exclude=./var/lib/apt/lists/*",
        ".",
      ]);
      renameSync(`${base}.tmp`, base);
    }
    log(`      base system ready (${elapsed()})`);

    // 2. The desktop packages, with apt inside the chroot.
    log(`[2/${steps}] apt-get install ${[...DESKTOP_PACKAGES, ...(kvm ? KVM_PACKAGES : [])].join(" ")}`);
    writeFileSync(
      join(root, "etc/apt/sources.list"),
      `deb ${mirrors.debian} ${SUITE} main\ndeb ${mirrors.debian} ${SUITE}-updates main\ndeb ${mirrors.security} ${SUITE}-security main\n`,
    );
    writeFileSync(join(root, "etc/apt/apt.conf.d/90qvd"), 'APT::Install-Recommends "0";\nAPT::Install-Suggests "0";\n');
    writeFileSync(join(root, "etc/dpkg/dpkg.cfg.d/qvd-slim"), DPKG_EXCLUDES);
    writeFileSync(join(root, "etc/dpkg/dpkg.cfg.d/qvd-build"), "# only while the image is built\nforce-unsafe-io\n");
    if (kvm) {
      // Before the kernel is installed: its modules are filtered, its initramfs made once, small.
      writeFileSync(join(root, "etc/dpkg/dpkg.cfg.d/qvd-kvm"), KVM_MODULE_EXCLUDES);
      mkdirSync(join(root, "etc/initramfs-tools/conf.d"), { recursive: true });
      writeFileSync(join(root, "etc/initramfs-tools/conf.d/qvd"), INITRAMFS_CONF);
      writeFileSync(
        join(root, "etc/initramfs-tools/modules"),
        `# Written by qvd di build --kvm: what finds the root disk.\n${INITRAMFS_MODULES.join("\n")}\n`,
      );
    }
    writeFileSync(
      join(root, "usr/sbin/policy-rc.d"),
      "#!/bin/sh\n# no services start while the image is built\nexit 101\n",
      { mode: 0o755 },
    );
    copyFileSync("/etc/resolv.conf", join(root, "etc/resolv.conf"));
    const archives = join(root, "var/cache/apt/archives");
    const restored = linkDebs(join(cacheDir, "apt"), archives);
    if (restored) log(`      ${restored} packages from the cache`);
    const chroot = (args: string[], onLine?: (l: string) => void) =>
      run([chrootBin, root, ...args], { env: CHROOT_ENV, onLine: onLine && ((l) => onLine(l)) });
    await chroot(["apt-get", "update", "-q"]);
    let got = 0;
    let setup = 0;
    await chroot(["apt-get", "install", "-y", "-q", "--no-install-recommends", ...DESKTOP_PACKAGES], (l) => {
      if (/^Need to get|^After this operation/.test(l)) log(`      ${l}`);
      else if (/^Get:\d+/.test(l) && ++got % 25 === 0) log(`      … ${got} packages downloaded (${elapsed()})`);
      else if (/^Setting up /.test(l) && ++setup % 25 === 0) log(`      … ${setup} packages set up (${elapsed()})`);
      else if (/^(E|W): /.test(l) && !/Can not write log/.test(l)) log(`      ${l}`); // no /dev/pts in the chroot: harmless
    });
    await chroot(["apt-get", "upgrade", "-y", "-q"]); // the base system from debootstrap, with security updates
    if (kvm) {
      // The kernel's postinst (update-initramfs) needs /proc and /dev: mounted in a mount
      // namespace of this step only, so they vanish with it, whatever happens (nothing to unmount).
      const t = Date.now();
      await run(
        [
          unshare,
          "-m",
          "--propagation",
          "private",
          "sh",
          "-c",
          'mount -t proc proc "$0/proc" && mount --rbind /dev "$0/dev" && exec chroot "$0" "$@"',
          root,
          "apt-get",
          "install",
          "-y",
          "-q",
          "--no-install-recommends",
          "-o",
          "Dpkg::Options::=--force-confdef",
          "-o",
          "Dpkg::Options::=--force-confold",
          ...KVM_PACKAGES,
        ],
        {
          env: CHROOT_ENV,
          onLine: (l) => {
            if (/^(E|W): /.test(l) && !/Can not write log/.test(l)) log(`      ${l}`);
          },
        },
      );
      log(`      kernel, systemd and initramfs installed (${((Date.now() - t) / 1000).toFixed(0)}s)`);
    }
    // Keep the downloads for the next build (this build's set replaces the older one).
    rmSync(join(cacheDir, "apt"), { recursive: true, force: true });
    linkDebs(archives, join(cacheDir, "apt"));
    log(`      packages installed (${elapsed()})`);

    // 3. The session and the guest's identity.
    log(`[3/${steps}] configuring the session${kvm ? " and the guest's units" : ""}`);
    writeFileSync(join(root, "usr/local/bin/qvd-session"), SESSION_SCRIPT);
    chmodSync(join(root, "usr/local/bin/qvd-session"), 0o755);
    await chroot([
      "update-alternatives",
      "--install",
      "/usr/bin/x-session-manager",
      "x-session-manager",
      "/usr/local/bin/qvd-session",
      "90",
    ]);
    writeFileSync(join(root, "etc/X11/qvd.Xresources"), X_RESOURCES);
    writeFileSync(join(root, "etc/jwm/debian-menu"), JWM_MENU);
    mkdirSync(join(root, "usr/share/applications"), { recursive: true });
    writeFileSync(join(root, "usr/share/applications/qvd-xedit.desktop"), EDITOR_DESKTOP_ENTRY);
    writeFileSync(join(root, "etc/xdg/mimeapps.list"), MIMEAPPS_LIST);
    mkdirSync(join(root, "etc/pulse/client.conf.d"), { recursive: true });
    writeFileSync(join(root, "etc/pulse/client.conf.d/99-qvd.conf"), PULSE_CLIENT_CONF);
    // ssl-cert (a dependency of cups-daemon) made a key pair while the image was built: every
    // desktop would share it. Nothing uses it here (cupsd makes its own under /etc/cups/ssl).
    for (const f of ["etc/ssl/private/ssl-cert-snakeoil.key", "etc/ssl/certs/ssl-cert-snakeoil.pem"])
      rmSync(join(root, f), { force: true });
    if (kvm) await configureGuest(root);
    writeFileSync(join(root, "etc/default/locale"), "LANG=C.UTF-8\n");
    writeFileSync(join(root, "etc/hostname"), "qvd-desktop\n");
    writeFileSync(
      join(root, "etc/hosts"),
      "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tqvd-desktop\n",
    );
    writeFileSync(
      join(root, "etc/qvd-image.json"),
      JSON.stringify(
        {
          builder: "qvd di build",
          suite: SUITE,
          recipe,
          packages: kvm ? [...DESKTOP_PACKAGES, ...KVM_PACKAGES] : DESKTOP_PACKAGES,
          hypervisor: kvm ? "kvm" : "lxc",
          built_at: new Date().toISOString(),
          session: "/usr/local/bin/qvd-session",
        },
        null,
        1,
      ) + "\n",
    );
    // Smoke test: the programs start (their libraries are all there).
    await chroot(["/usr/bin/nxagent", "-version"]);
    await chroot(["/usr/bin/xterm", "-version"]);
    await chroot(["/usr/sbin/cupsd", "-t"]);
    await chroot(["/usr/bin/pulseaudio", "--version"]);
    await chroot(["/usr/bin/sshfs", "--version"]);
    // The dpkg filters above dropped libraries: none of the session's programs may need them.
    const missing = await run(
      [
        chrootBin,
        root,
        "/bin/sh",
        "-c",
        "ldd /usr/bin/pulseaudio /usr/bin/paplay /usr/bin/pactl /usr/lib/pulse-*/modules/*.so /usr/sbin/cupsd /usr/lib/cups/backend/ipp /usr/bin/sshfs /usr/bin/xedit /usr/bin/nxagent 2>&1 | grep 'not found' || true",
      ],
      { env: CHROOT_ENV },
    );
    if (missing.stdout.trim()) throw new UserError(`libraries missing in the image: ${missing.stdout.trim()}`);
    const editor = (
      await run([chrootBin, root, "xdg-mime", "query", "default", "text/plain"], { env: CHROOT_ENV })
    ).stdout.trim();
    if (editor !== "qvd-xedit.desktop")
      throw new UserError(`xdg-mime gives text files to "${editor}", not qvd-xedit.desktop`);

    // 4. Clean up what only the build needed.
    log(`[4/${steps}] cleaning up`);
    await chroot(["apt-get", "clean"]);
    rmSync(join(root, "usr/sbin/policy-rc.d"), { force: true });
    rmSync(join(root, "etc/dpkg/dpkg.cfg.d/qvd-build"), { force: true });
    writeFileSync(join(root, "etc/resolv.conf"), ""); // the guest's network setup writes it
    for (const d of [
      "var/lib/apt/lists",
      "var/cache/apt",
      "var/log",
      "tmp",
      "var/tmp",
      "usr/share/man",
      "usr/share/info",
      "usr/share/lintian",
    ]) {
      const p = join(root, d);
      if (!existsSync(p)) continue;
      for (const n of readdirSync(p)) {
        if (d === "var/lib/apt/lists" && n === "partial") continue;
        if (d === "var/cache/apt" && n === "archives") continue;
        if (d === "var/log") {
          // Keep the directories (some programs expect them), drop the build's logs.
          await run(["find", join(p, n), "-xdev", "-type", "f", "-delete"]);
          continue;
        }
        rmSync(join(p, n), { recursive: true, force: true });
      }
    }
    rmSync(join(root, "var/cache/apt/archives"), { recursive: true, force: true });
    mkdirSync(join(root, "var/cache/apt/archives/partial"), { recursive: true });
    // Documentation and translations of the base system (the dpkg filter covers the rest).
    await run(["find", join(root, "usr/share/doc"), "-xdev", "-type", "f", "!", "-name", "copyright", "-delete"]);
    await run([
      "find",
      join(root, "usr/share/locale"),
      "-xdev",
      "-mindepth",
      "1",
      "-maxdepth",
      "1",
      "!",
      "-name",
      "locale.alias",
      "-exec",
      "rm",
      "-rf",
      "{}",
      "+",
    ]);
    rmSync(join(root, "var/cache/debconf/config.dat-old"), { force: true });
    rmSync(join(root, "var/cache/debconf/templates.dat-old"), { force: true });
    rmSync(join(root, "root/.bash_history"), { force: true });
    for (const f of kvm ? [...REQUIRED_FILES, ...KVM_REQUIRED_FILES] : REQUIRED_FILES) {
      try {
        lstatSync(join(root, f));
      } catch {
        throw new UserError(`the built image lacks /${f}`);
      }
    }
    if (mountsBelow(root).length)
      throw new UserError(`something is still mounted below ${root}: ${mountsBelow(root).join(", ")}`);

    if (kvm) {
      await makeDisk(root, work, tmpOut, { mkfs, qemuImg, log, elapsed });
    } else {
      // 5. The tarball: device nodes, and the contents of /proc, /sys, /run and /dev stay out.
      log(`[5/5] packing ${output}`);
      await run(
        [
          "tar",
          "-C",
          root,
          "-c",
          "-f",
          tmpOut,
          ...comp.args,
          "--numeric-owner",
          "--xattrs",
          "--xattrs-include=*",
          "--sort=name",
          "--exclude=./dev/*",
          "--exclude=./proc/*",
          "--exclude=./sys/*",
          "--exclude=./run/*",
          "--record-size=1M",
          "--checkpoint=64",
          "--checkpoint-action=echo=%{w}T",
          ".",
        ],
        {
          env: { LC_ALL: "C" },
          onLine: (l) => {
            const m = /^tar: (\d+) /.exec(l);
            if (m) log(`      … ${MiB(Number(m[1]))} packed (${elapsed()})`);
          },
        },
      );
    }
    renameSync(tmpOut, output);
    const bytes = statSync(output).size;
    const sha256 = await sha256File(output);
    // Keep this image as the cache of its recipe (only the newest one of its kind).
    mkdirSync(join(cacheDir, "images"), { recursive: true });
    for (const n of readdirSync(join(cacheDir, "images")))
      if (sameKind(n)) rmSync(join(cacheDir, "images", n), { force: true });
    const part = `${cached}.tmp-${process.pid}`;
    copyFileSync(output, part);
    renameSync(part, cached);
    return { output, sha256, bytes, cached: false, seconds: (Date.now() - started) / 1000, recipe };
  } finally {
    rmSync(tmpOut, { force: true });
    if (existsSync(work)) await removeWorkDir(work);
    lock.release();
  }
}
