// `qvd di build` for real: debootstrap from the Debian mirror, then the image is checked and
// unpacked as a node would. The image is kept under /var/cache/qvd/test and built again only
// when it is older than the build code (or the package cache makes a rebuild cheap).
import { afterAll, describe, expect, test } from "bun:test";
import { existsSync, lstatSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { join } from "node:path";
import { run, spawnDaemon, type Daemon } from "../src/run.ts";
import {
  DESKTOP_PACKAGES,
  INITRAMFS_MODULES,
  KVM_PACKAGES,
  KVM_REQUIRED_FILES,
  MASKED_UNITS,
  OPT_QVD_MOUNT,
  QVD_VMA_SERVICE,
  REQUIRED_FILES,
  SESSION_SCRIPT,
} from "../src/virt/image-build.ts";
import { inspectQcow2 } from "../src/virt/kvm-image.ts";
import { KVM_TEST_IMAGE, kvmTestImageFresh } from "./support/kvm-image.ts";
import { DESKTOP_IMAGE, desktopImageFresh } from "./support/node.ts";
import { until } from "./support/wait.ts";
import { unpackImage } from "../src/virt/images.ts";

const root = join(import.meta.dir, "..");
const IMAGE = DESKTOP_IMAGE;
const work = mkdtempSync("/tmp/qvd-di-build-test-");
let rootfs: string | undefined; // the image unpacked by a test below

afterAll(() => {
  rmSync(work, { recursive: true, force: true });
});

const fresh = desktopImageFresh;

describe("qvd di build", () => {
  test(
    "builds a Debian desktop image (or finds a fresh one)",
    async () => {
      if (!Bun.which("debootstrap", { PATH: `${process.env.PATH}:/usr/sbin` })) {
        const { ensureDeps } = await import("../scripts/deps.ts");
        await ensureDeps(["debootstrap"], () => {});
      }
      if (fresh()) return;
      const lines: string[] = [];
      const res = await run([process.execPath, join(root, "src/main.ts"), "di", "build", "--output", IMAGE], {
        onLine: (l) => lines.push(l),
        env: { QVD_CONFIG: undefined },
      });
      const out = res.stdout;
      expect(out).toContain(`Image:   ${IMAGE}`);
      const sha = /SHA-256: ([0-9a-f]{64})/.exec(out)?.[1];
      expect(sha).toBe(new Bun.CryptoHasher("sha256").update(readFileSync(IMAGE)).digest("hex"));
      expect(out).toMatch(new RegExp(`Size: +[\\d.]+ MiB \\(${statSync(IMAGE).size} bytes\\)`));
      // Progress lines while it worked (the cache may have made it a copy).
      expect(out).toMatch(/\[1\/5\] (debootstrap|base system from the cache)|using the cached image/);
    },
    { timeout: 20 * 60_000 },
  );

  test(
    "the image holds nxagent, xinit, the window manager, xterm and the session",
    async () => {
      expect(existsSync(IMAGE)).toBe(true);
      const listing = (await run(["tar", "-tzf", IMAGE])).stdout.split("\n");
      const names = new Set(listing.map((n) => n.replace(/^\.\//, "")));
      for (const f of REQUIRED_FILES) expect(names.has(f)).toBe(true);
      expect(names.has("usr/bin/x-session-manager")).toBe(true);
      // Build leftovers stay out.
      expect(listing.filter((n) => /^\.\/(dev|proc|sys|run)\/./.test(n))).toEqual([]);
      expect(listing.filter((n) => n.endsWith(".deb"))).toEqual([]);
      expect(listing.filter((n) => n.startsWith("./var/lib/apt/lists/") && !n.endsWith("/"))).toEqual([]);
      expect(names.has("usr/sbin/policy-rc.d")).toBe(false);
    },
    { timeout: 120_000 },
  );

  test(
    "a node unpacks it, and its programs run",
    async () => {
      const basefsDir = join(work, "basefs");
      const phases = new Set<string>();
      const sha = new Bun.CryptoHasher("sha256").update(readFileSync(IMAGE)).digest("hex");
      const res = await unpackImage({
        image: IMAGE,
        basefsDir,
        diId: 1,
        sha256: sha,
        onProgress: (p) => phases.add(p.phase),
      });
      expect(res.unpacked).toBe(true);
      expect(res.rootfs).toBe(res.basefs);
      rootfs = res.rootfs;
      expect([...phases].sort()).toEqual(["extract", "verify"]);
      expect(res.skipped).toEqual([]); // no device nodes in a built image
      for (const f of REQUIRED_FILES) expect(() => lstatSync(join(res.rootfs, f))).not.toThrow();
      expect(readFileSync(join(res.rootfs, "usr/local/bin/qvd-session"), "utf8")).toBe(SESSION_SCRIPT);
      expect(statSync(join(res.rootfs, "usr/local/bin/qvd-session")).mode & 0o111).toBe(0o111);
      // Ownership, setuid bits and file capabilities survive the round trip.
      const passwd = statSync(join(res.rootfs, "usr/bin/passwd"));
      expect(passwd.uid).toBe(0);
      expect(passwd.mode & 0o4000).toBe(0o4000);
      const meta = JSON.parse(readFileSync(join(res.rootfs, "etc/qvd-image.json"), "utf8"));
      expect(meta.packages).toEqual([...DESKTOP_PACKAGES]);
      // The programs start inside the image (every library is there).
      const v = await run(["chroot", res.rootfs, "/usr/bin/nxagent", "-version"], { allowFail: true });
      expect(v.stdout + v.stderr).toMatch(/NXAGENT - Version 3\./);
      expect((await run(["chroot", res.rootfs, "/usr/bin/xterm", "-version"])).stdout).toMatch(/XTerm/);
      expect((await run(["chroot", res.rootfs, "/bin/sh", "-n", "/usr/local/bin/qvd-session"])).status).toBe(0);
      expect((await run(["chroot", res.rootfs, "readlink", "-f", "/usr/bin/x-session-manager"])).stdout.trim()).toBe(
        "/usr/local/bin/qvd-session",
      );
      expect((await run(["chroot", res.rootfs, "readlink", "-f", "/usr/bin/x-window-manager"])).stdout.trim()).toBe(
        "/usr/bin/jwm",
      );
      // The session services' programs (src/vma/README.md): CUPS, PulseAudio, sshfs, xdg-open.
      expect((await run(["chroot", res.rootfs, "/usr/sbin/cupsd", "-t"], { allowFail: true })).status).toBe(0);
      expect((await run(["chroot", res.rootfs, "/usr/bin/pulseaudio", "--version"])).stdout).toMatch(/^pulseaudio \d+/);
      expect((await run(["chroot", res.rootfs, "/usr/bin/sshfs", "--version"], { allowFail: true })).stdout).toMatch(
        /SSHFS version/,
      );
      const mime = (args: string[]) =>
        run([
          "chroot",
          res.rootfs,
          "env",
          "-i",
          "PATH=/usr/bin:/bin",
          "HOME=/nonexistent",
          "xdg-mime",
          "query",
          ...args,
        ]);
      for (const t of ["text/plain", "text/x-shellscript", "application/json"])
        expect((await mime(["default", t])).stdout.trim()).toBe("qvd-xedit.desktop");
      expect((await mime(["default", "image/png"])).stdout.trim()).toBe(""); // nothing claims what it cannot show
      // No PulseAudio starts behind the VMA's back: clients do not autospawn one.
      expect(readFileSync(join(res.rootfs, "etc/pulse/client.conf.d/99-qvd.conf"), "utf8")).toMatch(
        /^autospawn = no$/m,
      );
      // No key pair baked in for every desktop to share; nothing links a library the dpkg filters dropped.
      expect(existsSync(join(res.rootfs, "etc/ssl/private/ssl-cert-snakeoil.key"))).toBe(false);
      const ldd = await run([
        "chroot",
        res.rootfs,
        "/bin/sh",
        "-c",
        "ldd /usr/bin/pulseaudio /usr/bin/paplay /usr/sbin/cupsd /usr/bin/sshfs /usr/bin/xedit /usr/bin/nxagent | grep -c 'not found' || true",
      ]);
      expect(ldd.stdout.trim()).toBe("0");
    },
    { timeout: 300_000 },
  );

  test(
    "its desktop shows through NX: jwm and xterm on nxagent, displayed by nxproxy on an Xvfb",
    async () => {
      if (!rootfs) throw new Error("the image was not unpacked");
      const { ensureDeps } = await import("../scripts/deps.ts");
      await ensureDeps(["xvfb", "nxproxy"], () => {});
      const R = rootfs;
      // A free display: no X socket and no NX port (4000 + display) in use.
      const free = async (d: number) => {
        if (existsSync(`/tmp/.X11-unix/X${d}`) || existsSync(`/tmp/.X${d}-lock`)) return false;
        try {
          Bun.listen({ hostname: "0.0.0.0", port: 4000 + d, socket: { data() {} } }).stop(true);
          return true;
        } catch {
          return false;
        }
      };
      let agentDisplay = 200 + (process.pid % 100);
      while (!(await free(agentDisplay)) || !(await free(agentDisplay + 1))) agentDisplay += 2;
      const clientDisplay = agentDisplay + 1;
      const daemons: Daemon[] = [];
      const agentOut: string[] = [];
      /** Waits for `ok`, with nxagent's last lines when it times out. */
      const waitHere = (what: string, ok: () => boolean | Promise<boolean>, ms = 30_000) =>
        until(ok, what, ms, 250, { detail: () => `; nxagent said:\n${agentOut.slice(-30).join("\n")}` });
      try {
        // The guest side, as the VMA starts it (here as root, in a chroot with its own mounts).
        const agent = spawnDaemon(
          [
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            `mount --rbind /dev "$0/dev" && mount -t proc proc "$0/proc" && exec chroot "$0" env HOME=/root PATH=/usr/local/bin:/usr/bin:/bin ` +
              `xinit /usr/local/bin/qvd-session -- /usr/bin/nxagent :${agentDisplay} -ac -name QVD -nolisten tcp -display nx/nx,link=lan,geometry=800x600:${agentDisplay}`,
            R,
          ],
          { detached: true, onLine: (l) => agentOut.push(l) },
        );
        daemons.push(agent);
        await waitHere("nxagent to listen", () => agentOut.some((l) => l.includes(`:${4000 + agentDisplay}'`)));
        // The client side: an X server and the NX proxy.
        daemons.push(
          spawnDaemon(["Xvfb", `:${clientDisplay}`, "-screen", "0", "1024x768x24", "-nolisten", "tcp", "-noreset"], {
            detached: true,
          }),
        );
        await waitHere("Xvfb", () => existsSync(`/tmp/.X11-unix/X${clientDisplay}`));
        daemons.push(
          spawnDaemon(["nxproxy", "-S", `localhost:${agentDisplay}`], {
            detached: true,
            env: { ...process.env, DISPLAY: `:${clientDisplay}` },
          }),
        );
        const tree = async (d: number) =>
          (await run(["chroot", R, "xwininfo", "-display", `:${d}`, "-root", "-tree"], { allowFail: true })).stdout;
        // In the desktop: the window manager (with its tray clock) and the terminal.
        await waitHere("jwm and xterm", async () => {
          const t = await tree(agentDisplay);
          return t.includes('"JWM"') && t.includes('("xterm" "XTerm")') && t.includes('("xclock" "XClock")');
        });
        // On the client's screen: nxagent's window.
        expect(await tree(clientDisplay)).toContain('"QVD": ("NXAgent" "NXAgent")');
        // Fonts are rendered in the guest: no core font was missing on the client side.
        expect(agentOut.filter((l) => /cannot load font|invalid include/.test(l))).toEqual([]);
      } finally {
        for (const d of daemons.reverse()) d.killGroup("SIGTERM");
        await Promise.all(daemons.map((d) => Promise.race([d.exited, Bun.sleep(5000)])));
        for (const d of daemons) d.killGroup("SIGKILL");
      }
    },
    { timeout: 120_000 },
  );
});

describe("qvd di build --kvm", () => {
  const raw = join(work, "kvm.raw");
  /** debugfs on the image's filesystem (read-only, nothing mounted). */
  const fs = async (request: string) => (await run(["debugfs", "-R", request, raw], { env: { LC_ALL: "C" } })).stdout;
  const cat = (path: string) => fs(`cat ${path}`);
  const stat = (path: string) => fs(`stat ${path}`);
  const linkOf = async (path: string) => /Fast link dest: "(.*)"/.exec(await stat(path))?.[1];

  test(
    "builds a bootable qcow2 of the desktop (or finds a fresh one); a second build is a copy from the cache",
    async () => {
      const { ensureDeps } = await import("../scripts/deps.ts");
      await ensureDeps(["debootstrap", "qemu-img", "e2fsprogs"], () => {});
      const cli = (output: string) =>
        run([process.execPath, join(root, "src/main.ts"), "di", "build", "--kvm", "--output", output], {
          env: { QVD_CONFIG: undefined },
        });
      const tarballsBefore = readdirSync("/var/cache/qvd/debootstrap/images").filter((n) => n.includes(".tar"));
      if (!kvmTestImageFresh()) {
        const out = (await cli(KVM_TEST_IMAGE)).stdout;
        expect(out).toContain(`Image:   ${KVM_TEST_IMAGE}`);
        expect(out).toMatch(/\[1\/6\] (debootstrap|base system from the cache)|using the cached image/);
        console.log(
          out
            .split("\n")
            .filter((l) => /^(Built|Copied|Size|Disk)/.test(l))
            .join("\n"),
        );
      }
      // Again: from the build cache, the same bytes.
      const copy = join(work, "copy.qcow2");
      const out = (await cli(copy)).stdout;
      expect(out).toContain("Copied from the cache");
      const sha = /SHA-256: ([0-9a-f]{64})/.exec(out)?.[1];
      expect(sha).toBe(new Bun.CryptoHasher("sha256").update(readFileSync(KVM_TEST_IMAGE)).digest("hex"));
      expect(out).toMatch(/Disk: +[\d.]+ MiB virtual \(ext4, label qvd-root\)/);
      rmSync(copy);
      // The KVM build kept the tarball's cache (one cached image per kind).
      const after = readdirSync("/var/cache/qvd/debootstrap/images");
      for (const t of tarballsBefore) expect(after).toContain(t);
      expect(after.filter((n) => n.endsWith(".qcow2")).length).toBe(1);
    },
    { timeout: 20 * 60_000 },
  );

  test("a KVM image must be a .qcow2, a tarball must not be one", async () => {
    const bad = await run(
      [process.execPath, join(root, "src/main.ts"), "di", "build", "--kvm", "--output", join(work, "x.tar.gz")],
      { allowFail: true, env: { QVD_CONFIG: undefined } },
    );
    expect(bad.status).not.toBe(0);
    expect(bad.stderr + bad.stdout).toContain("a KVM image's name must end in .qcow2");
    expect(bad.stderr).not.toMatch(/\n\s+at /); // no stack trace
    const bad2 = await run(
      [process.execPath, join(root, "src/main.ts"), "di", "build", "--output", join(work, "x.qcow2")],
      { allowFail: true, env: { QVD_CONFIG: undefined } },
    );
    expect(bad2.status).not.toBe(0);
    expect(bad2.stderr + bad2.stdout).toMatch(/must end in \.tar\.gz/);
  });

  test("the disk: one whole ext4 filesystem labelled qvd-root with the desktop, the kernel, the guest's units and no login", async () => {
    expect((await inspectQcow2(KVM_TEST_IMAGE)).virtualSize).toBeGreaterThan(512 * 1024 * 1024);
    await run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", KVM_TEST_IMAGE, raw]);
    expect(await fs("stats")).toMatch(/Filesystem volume name: +qvd-root/);
    for (const f of [...REQUIRED_FILES, ...KVM_REQUIRED_FILES]) expect(await stat(`/${f}`), f).toMatch(/^Inode: \d+/m);
    // The kernel: /vmlinuz and /initrd.img are relative links into /boot.
    expect(await linkOf("/vmlinuz")).toMatch(/^boot\/vmlinuz-[\d.]+-\d+-amd64$/);
    expect(await linkOf("/initrd.img")).toMatch(/^boot\/initrd\.img-[\d.]+-\d+-amd64$/);
    // The guest contract's units.
    expect(await cat("/etc/systemd/system/opt-qvd.mount")).toBe(OPT_QVD_MOUNT);
    expect(OPT_QVD_MOUNT).toMatch(/^What=\/dev\/disk\/by-id\/virtio-qvd-bin$/m);
    expect(await cat("/etc/systemd/system/qvd-vma.service")).toBe(QVD_VMA_SERVICE);
    expect(QVD_VMA_SERVICE).toMatch(/^ExecStart=\/opt\/qvd\/qvd vma --kvm-guest$/m);
    expect(await linkOf("/etc/systemd/system/multi-user.target.wants/qvd-vma.service")).toBe(
      "/etc/systemd/system/qvd-vma.service",
    );
    expect(await linkOf("/etc/systemd/system/default.target")).toBe("/lib/systemd/system/multi-user.target");
    expect(await cat("/etc/fstab")).toMatch(/^\/dev\/vda \/ ext4 /m);
    // No login anywhere, no periodic jobs: masked, and nothing left wanting them.
    for (const u of [
      "getty.target",
      "getty@.service",
      "serial-getty@.service",
      "apt-daily.timer",
      "e2scrub_all.timer",
      "fstrim.timer",
      "cups.service",
    ]) {
      expect(MASKED_UNITS as readonly string[]).toContain(u);
      expect(await linkOf(`/etc/systemd/system/${u}`), u).toBe("/dev/null");
    }
    expect(await fs("ls /etc/systemd/system/getty.target.wants")).not.toMatch(/getty@/);
    expect(await cat("/etc/machine-id")).toBe("");
    // A small initramfs: only the listed modules.
    expect(await cat("/etc/initramfs-tools/modules")).toContain(INITRAMFS_MODULES.join("\n"));
    expect(await cat("/etc/initramfs-tools/conf.d/qvd")).toMatch(/^MODULES=list$/m);
    // Modules for hardware a VM never has are not there; virtio's and usbip's are.
    const kver = (await linkOf("/vmlinuz"))!.replace("boot/vmlinuz-", "");
    const mods = `/lib/modules/${kver}/kernel`;
    expect(await fs(`ls ${mods}/drivers/gpu`)).not.toMatch(/drm/);
    expect(await fs(`ls ${mods}/sound`)).not.toMatch(/\bcore\b/);
    for (const m of [
      "drivers/block/virtio_blk.ko",
      "drivers/net/virtio_net.ko",
      "drivers/usb/usbip/vhci-hcd.ko",
      "drivers/firmware/qemu_fw_cfg.ko",
      "drivers/net/tun.ko",
      "fs/fuse/fuse.ko",
    ])
      expect(await stat(`${mods}/${m}`), m).toMatch(/Type: regular/);
    const meta = JSON.parse(await cat("/etc/qvd-image.json"));
    expect(meta.packages).toEqual([...DESKTOP_PACKAGES, ...KVM_PACKAGES]);
    expect(meta.hypervisor).toBe("kvm");
    rmSync(raw);
  }, 300_000);

  test("qvd di check and qvd di unpack take a qcow2: the node's checks and preparation, by hand", async () => {
    const di = (...a: string[]) =>
      run([process.execPath, join(root, "src/main.ts"), "di", ...a], {
        allowFail: true,
        env: { QVD_CONFIG: undefined },
      });
    const sha = new Bun.CryptoHasher("sha256").update(readFileSync(KVM_TEST_IMAGE)).digest("hex");
    const ok = await di("check", KVM_TEST_IMAGE, "--sha256", sha);
    expect(ok.stdout).toContain(`${KVM_TEST_IMAGE}: ok (qcow2, a KVM image)`);
    expect(ok.stdout).toContain(`SHA-256:     ${sha}`);
    expect((await di("check", KVM_TEST_IMAGE, "--sha256", "0".repeat(64))).stderr).toContain("checksum mismatch");
    // A qcow2 on top of another: refused with its reason, no stack trace.
    const over = join(work, "over.qcow2");
    await run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", KVM_TEST_IMAGE, "-F", "qcow2", over]);
    const bad = await di("check", over);
    expect(bad.status).not.toBe(0);
    expect(bad.stderr).toContain("has a backing file of its own");
    expect(bad.stderr).not.toMatch(/\n\s+at /);
    const storage = join(work, "storage");
    const u = await di("unpack", KVM_TEST_IMAGE, "--id", "9", "--sha256", sha, "--set", `path.storage.root=${storage}`);
    expect(u.stdout).toContain(
      `Prepared: ${join(storage, "basefs/9/vmlinuz")}, ${join(storage, "basefs/9/initrd.img")}`,
    );
    expect(readFileSync(join(storage, "basefs/9/vmlinuz")).subarray(0x202, 0x206).toString()).toBe("HdrS");
    expect((await di("unpack", KVM_TEST_IMAGE, "--id", "9", "--set", `path.storage.root=${storage}`)).stdout).toContain(
      "Already prepared:",
    );
  }, 120_000);
});
