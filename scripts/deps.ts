// The system programs the project needs (tests, demo, later nodes), in one table, and
// `ensureDeps()` that installs what is missing with apt-get when run as root.
//   bun scripts/deps.ts [name…]      checks (and installs) from the command line
// To add a program: add one entry to DEPS. An entry is present when any of its `bins` is on
// PATH or any of its `globs` matches a file.
import { existsSync, readdirSync } from "node:fs";
import { run } from "../src/run.ts";

export interface Dep {
  /** What the project uses it for (shown when it is missing). */
  purpose: string;
  /** Programs looked up on PATH. */
  bins?: string[];
  /** Absolute paths with `*` in whole segments, e.g. /usr/lib/postgresql/*\/bin/pg_ctl. */
  globs?: string[];
  /** Debian packages that provide it. */
  packages: string[];
}

export const DEPS = {
  postgresql: {
    purpose: "PostgreSQL server (throwaway clusters in tests, `qvd demo`)",
    bins: ["pg_ctl"],
    globs: ["/usr/lib/postgresql/*/bin/pg_ctl"],
    packages: ["postgresql"],
  },
  debootstrap: {
    purpose: "builds Debian desktop images (`qvd di build`, test/di-build.test.ts)",
    bins: ["debootstrap"],
    globs: ["/usr/sbin/debootstrap"],
    packages: ["debootstrap"],
  },
  xvfb: {
    purpose: "a virtual X display (the client side of NX tests)",
    bins: ["Xvfb"],
    packages: ["xvfb"],
  },
  nxproxy: {
    purpose: "the NX proxy of the client (tests)",
    bins: ["nxproxy"],
    packages: ["nxproxy"],
  },
  nxagent: {
    purpose: "the NX agent (VMA tests run sessions on the host)",
    bins: ["nxagent"],
    packages: ["nxagent"],
  },
  xinit: {
    purpose: "starts X sessions under nxagent (VMA tests)",
    bins: ["xinit"],
    packages: ["xinit"],
  },
  xwd: { purpose: "screenshots of X displays (tests)", bins: ["xwd"], packages: ["x11-apps"] },
  xsetroot: {
    purpose: "paints X displays in a known colour (tests)",
    bins: ["xsetroot"],
    packages: ["x11-xserver-utils"],
  },
  xwininfo: { purpose: "lists the windows of X displays (tests)", bins: ["xwininfo"], packages: ["x11-utils"] },
  imagemagick: {
    purpose: "reads pixels of screenshots (tests); called as /usr/bin/convert",
    globs: ["/usr/bin/convert"],
    packages: ["imagemagick"],
  },
  slapd: {
    purpose: "an OpenLDAP server for the LDAP authentication tests (test/auth.test.ts)",
    bins: ["slapd"],
    globs: ["/usr/sbin/slapd"],
    packages: ["slapd"],
  },
  "ldap-utils": {
    purpose: "LDAP command-line tools (ldapsearch, ldapwhoami) to inspect the test directory",
    bins: ["ldapsearch"],
    packages: ["ldap-utils"],
  },
  openssl: { purpose: "self-signed certificates for TLS tests", bins: ["openssl"], packages: ["openssl"] },
  curl: {
    purpose: "HTTP requests from inside test network namespaces",
    bins: ["curl"],
    packages: ["curl"],
  },
  runuser: {
    purpose: "runs PostgreSQL as an unprivileged user when started as root",
    bins: ["runuser"],
    packages: ["util-linux"],
  },
  lxc: {
    purpose: "LXC containers (the LXC desktop backend)",
    bins: ["lxc-start"],
    packages: ["lxc"],
  },
  iproute2: {
    purpose: "the VM bridge and veths (ip, bridge)",
    bins: ["bridge"],
    packages: ["iproute2"],
  },
  nftables: {
    purpose: "the VM firewall (tables inet qvd and bridge qvd)",
    bins: ["nft"],
    packages: ["nftables"],
  },
  nsenter: {
    purpose: "runs node commands inside a network namespace (tests)",
    bins: ["nsenter"],
    packages: ["util-linux"],
  },
  busybox: {
    purpose: "a static busybox: the tiny root filesystem of LXC tests",
    globs: ["/bin/busybox", "/usr/bin/busybox"],
    packages: ["busybox-static"],
  },
  tcpdump: {
    purpose: "captures the farm network's traffic (test/farm.test.ts: nothing between nodes in clear)",
    bins: ["tcpdump"],
    globs: ["/usr/bin/tcpdump", "/usr/sbin/tcpdump"],
    packages: ["tcpdump"],
  },
  haproxy: {
    purpose: "a TLS-terminating TCP proxy to compare the L7R splice with (bench/l7r.ts)",
    bins: ["haproxy"],
    globs: ["/usr/sbin/haproxy"],
    packages: ["haproxy"],
  },
  xvnc: {
    purpose: "the X server a browser session is shown on (the L7R's web desktop: src/web/desktop/README.md)",
    bins: ["Xvnc"],
    packages: ["tigervnc-standalone-server", "xauth"],
  },
  chromium: {
    purpose: "a real browser for the WAT and browser-desktop tests (driven by playwright-core)",
    bins: ["chromium"],
    globs: ["/usr/bin/chromium"],
    packages: ["chromium"],
  },
  // The client side of the session services (test/support/services.ts, test/session-services.test.ts).
  cupsd: {
    purpose: "a CUPS standing for the user's printers (printing tests)",
    bins: ["cupsd"],
    globs: ["/usr/sbin/cupsd"],
    packages: ["cups-daemon"],
  },
  "cups-client": { purpose: "lp, lpstat and lpadmin (printing tests)", bins: ["lpstat"], packages: ["cups-client"] },
  "cups-pdf": {
    purpose: "a CUPS backend printing to PDF files: the user's printer in printing tests",
    globs: ["/usr/lib/cups/backend/cups-pdf"],
    packages: ["printer-driver-cups-pdf"],
  },
  "cups-filters": {
    purpose: "the client's CUPS converts the desktop's jobs (text, PDF) for its printer (printing tests)",
    globs: ["/usr/lib/cups/filter/texttopdf"],
    packages: ["cups-filters"],
  },
  pdftotext: {
    purpose: "reads the text of printed PDFs (printing tests)",
    bins: ["pdftotext"],
    packages: ["poppler-utils"],
  },
  pulseaudio: {
    purpose: "sound servers on both sides of the audio tunnel (sound tests)",
    bins: ["pulseaudio"],
    packages: ["pulseaudio"],
  },
  "pulseaudio-utils": {
    purpose: "pactl, paplay and parec (sound tests)",
    bins: ["parec"],
    packages: ["pulseaudio-utils"],
  },
  "sftp-server": {
    purpose: "the SFTP server of shared folders (shares tests)",
    globs: ["/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server"],
    packages: ["openssh-sftp-server"],
  },
  sshfs: { purpose: "mounts shared folders over SFTP (shares tests)", bins: ["sshfs"], packages: ["sshfs"] },
  bwrap: {
    purpose: "confines the client's SFTP server to the shared folder",
    bins: ["bwrap"],
    packages: ["bubblewrap"],
  },
  usbip: {
    purpose: "USB/IP tools (`qvd client --usb`)",
    bins: ["usbip"],
    globs: ["/usr/sbin/usbip"],
    packages: ["usbip"],
  },
  "qemu-system": {
    purpose: "runs KVM desktops (the KVM backend; tests run it with -accel tcg)",
    bins: ["qemu-system-x86_64"],
    packages: ["qemu-system-x86"],
  },
  "qemu-img": {
    purpose: "checks and converts qcow2 disk images (KVM images, overlays, homes; `qvd di build --kvm`)",
    bins: ["qemu-img"],
    packages: ["qemu-utils"],
  },
  e2fsprogs: {
    purpose: "mkfs.ext4 -d makes KVM images' filesystems, debugfs reads their kernels without mounting",
    bins: ["debugfs"],
    globs: ["/usr/sbin/debugfs", "/sbin/debugfs"],
    packages: ["e2fsprogs"],
  },
} satisfies Record<string, Dep>;

export type DepName = keyof typeof DEPS;

/** Files matching an absolute pattern whose `*` stand for whole path segments. */
export function globFiles(pattern: string): string[] {
  let paths = ["/"];
  for (const seg of pattern.split("/").filter(Boolean)) {
    const next: string[] = [];
    for (const p of paths) {
      if (!seg.includes("*")) {
        const q = p === "/" ? `/${seg}` : `${p}/${seg}`;
        if (existsSync(q)) next.push(q);
        continue;
      }
      const re = new RegExp(
        "^" +
          seg
            .split("*")
            .map((s) => s.replace(/[.+?^${}()|[\]\\]/g, "\\$&"))
            .join(".*") +
          "$",
      );
      let names: string[] = [];
      try {
        names = readdirSync(p);
      } catch {}
      for (const n of names.sort()) if (re.test(n)) next.push(p === "/" ? `/${n}` : `${p}/${n}`);
    }
    paths = next;
  }
  return paths;
}

/** Where the program was found, or undefined when it is missing. */
export function detect(dep: Dep): string | undefined {
  for (const b of dep.bins ?? []) {
    const found = Bun.which(b);
    if (found) return found;
  }
  for (const g of dep.globs ?? []) {
    const found = globFiles(g)[0];
    if (found) return found;
  }
  return undefined;
}

let aptUpdated = false;

/**
 * Makes sure the named programs (default: all of DEPS) are installed. As root, installs the
 * missing ones with apt-get (one `apt-get update` per process); otherwise throws an error
 * whose message is one line naming the packages to install.
 */
export async function ensureDeps(
  names: DepName[] = Object.keys(DEPS) as DepName[],
  log: (line: string) => void = (l) => console.log(l),
): Promise<void> {
  const missing = names.filter((n) => !detect(DEPS[n]));
  if (missing.length === 0) {
    log(`deps: ok (${names.join(", ")})`);
    return;
  }
  const packages = [...new Set(missing.flatMap((n) => DEPS[n].packages))];
  if (process.getuid?.() !== 0)
    throw new Error(
      `missing system programs (${missing.join(", ")}): install as root: apt-get install -y --no-install-recommends ${packages.join(" ")}`,
    );
  for (const n of missing) log(`deps: ${n} missing (${DEPS[n].purpose})`);
  if (!aptUpdated) {
    log("deps: apt-get update");
    await run(["apt-get", "update"]);
    aptUpdated = true;
  }
  log(`deps: apt-get install ${packages.join(" ")}`);
  await run(["apt-get", "install", "-y", "--no-install-recommends", ...packages], {
    env: { DEBIAN_FRONTEND: "noninteractive" },
  });
  const still = missing.filter((n) => !detect(DEPS[n]));
  if (still.length) throw new Error(`still missing after installing ${packages.join(" ")}: ${still.join(", ")}`);
  log(`deps: installed ${packages.join(" ")}`);
}

if (import.meta.main) {
  const args = process.argv.slice(2);
  const unknown = args.filter((a) => !(a in DEPS));
  if (unknown.length) {
    console.error(`deps: unknown: ${unknown.join(", ")} (known: ${Object.keys(DEPS).join(", ")})`);
    process.exit(64);
  }
  try {
    await ensureDeps(args.length ? (args as DepName[]) : undefined);
  } catch (err) {
    console.error(`deps: ${(err as Error).message}`);
    process.exit(1);
  }
}
