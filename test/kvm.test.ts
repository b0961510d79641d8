// KVM desktops end to end: `qvd node` (HKD + L7R) in a network namespace of this test, running
// both backends (vm.hypervisor = lxc,kvm), the image of `qvd di build --kvm`, QEMU under tcg
// (KVM acceleration hangs on this machine: the probe must find that out and say so), and
// `qvd client` with a real nxproxy showing the desktop on an Xvfb of the test.
//
// One VM boots twice in this file (a boot under tcg takes about a minute): the tests run in
// order and share it.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, linkSync, copyFileSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { join } from "node:path";
import * as D from "../src/db/index.ts";
import { run } from "../src/run.ts";
import { useTestDatabase } from "./support/db.ts";
import { busyboxImage, TestNode, until } from "./support/node.ts";
import { kvmTestImage } from "./support/kvm-image.ts";
import { screenMean, startXvfb } from "./support/services.ts";
import { PARTITION_BYTES, STICK_BUSID, STICK_BYTES, startUsbMachine } from "./support/usb-machine.ts";

const isRoot = process.getuid?.() === 0;
const db = useTestDatabase();
const ALL = D.ALL_TENANTS;
const PORT = 8443;
const DISPLAY = 64;
const UID_BASE = 200000;
const output = join(import.meta.dir, "..", ".test-output");

describe.skipIf(!isRoot)("KVM desktops", () => {
  const node = new TestNode(db, "kvmnode");
  const sql = () => db().sql;
  let vm: D.VmRow;
  let xvfb: { stop(): Promise<void> } | undefined;
  // tcg by configuration: on this machine KVM can run a test VM's BIOS (so `auto` picks it) and
  // then hang in the guest's kernel; accel is a node's choice for that reason.
  const settings = {
    "vm.hypervisor": "lxc,kvm",
    "vm.kvm.accel": "tcg",
    "hkd.timeout.vma_start": "400",
    "hkd.timeout.poweroff": "90",
    "cluster.peer.port": "0",
  };
  const startNode = () => node.startNode(PORT, settings);
  const log = () => readFileSync(node.logFile, "utf8");
  const vmRow = async () =>
    (
      await sql()`SELECT vm_state, user_state, vm_pid, vma_secret, blocked, blocked_reason FROM vm_runtimes WHERE vm_id = ${vm.id}`
    )[0]!;
  const homeDisk = () => join(node.root, "storage", "homes", "default", "alice.qcow2");
  const mean = () => screenMean(DISPLAY);

  /** A file of the user's home disk, read from the node (a raw copy read by debugfs: nothing mounted). */
  async function homeFile(path: string): Promise<string> {
    const raw = join(node.root, "home-copy.raw");
    try {
      await run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", homeDisk(), raw]);
      const r = await run(["debugfs", "-R", `cat ${path}`, raw], { allowFail: true });
      return r.stdout;
    } finally {
      rmSync(raw, { force: true });
    }
  }

  const consoleLog = () => readFileSync(join(node.kvmPath, "logs", `qvd-${vm.id}.console.log`), "utf8");

  /** One session of `qvd client`: connected, the desktop's pixels on the user's display, then logout. */
  async function session(extra: string[] = [], png?: string, during?: () => Promise<void>): Promise<string> {
    await run(["xsetroot", "-display", `:${DISPLAY}`, "-solid", "black"], { allowFail: true });
    const before = await mean();
    const client = node.client({
      port: PORT,
      user: "alice",
      password: "alice-pw-1",
      display: DISPLAY,
      args: ["--no-printing", "--no-audio", ...extra],
    });
    try {
      await until(
        async () => (await D.get(sql(), D.vms, ALL, vm.id)).user_state === "connected" || client.exitCode !== null,
        "the client's session",
        600_000,
      );
      expect(client.exitCode, client.exitCode !== null ? await new Response(client.stderr).text() : "").toBeNull();
      let m = before;
      await until(
        async () => (m = await mean()) > before + 0.05 || client.exitCode !== null,
        "the desktop's pixels",
        180_000,
      ).catch(() => {});
      if (m <= before + 0.05) {
        client.kill("SIGTERM");
        await client.exited;
        throw new Error(
          `no desktop pixels; the client exited with ${client.exitCode} and said: ${(await new Response(client.stderr).text()).slice(-2000)}\nguest console: ${consoleLog().slice(-3000)}`,
        );
      }
      if (png)
        await run(["sh", "-c", `xwd -root -silent -display :${DISPLAY} | /usr/bin/convert xwd:- ${png}`], {
          allowFail: true,
        });
      if (during) {
        try {
          await during();
        } catch (e) {
          client.kill("SIGTERM");
          await client.exited;
          throw new Error(
            `${(e as Error).message}; the client said: ${(await new Response(client.stdout).text()).slice(-1500)} ${(await new Response(client.stderr).text()).slice(-1500)}\nguest console: ${consoleLog().slice(-4000)}`,
          );
        }
      }
    } finally {
      client.kill("SIGTERM");
      await client.exited;
    }
    await until(
      async () => (await D.get(sql(), D.vms, ALL, vm.id)).user_state === "disconnected",
      "the session to be released",
      60_000,
    );
    return new Response(client.stdout).text();
  }

  beforeAll(async () => {
    const { ensureDeps } = await import("../scripts/deps.ts");
    await ensureDeps(["xvfb", "nxproxy", "xwd", "imagemagick", "qemu-system", "qemu-img", "e2fsprogs"], () => {});
    const image = await kvmTestImage();
    await node.setup();
    // A link, not a copy, where the filesystem allows it (the image is half a gigabyte).
    const linkOrCopy = async (p: string) => {
      try {
        linkSync(image, p);
      } catch {
        copyFileSync(image, p);
      }
    };
    ({ vm } = await node.addDesktop(linkOrCopy, {
      password: "alice-pw-1",
      osf: { name: "debian-kvm", hypervisor: "kvm", vcpus: 1, user_storage_mb: 256 },
      file: "desktop.qcow2",
    }));
    await startNode();
    xvfb = await startXvfb(DISPLAY);
    mkdirSync(output, { recursive: true });
  }, 30 * 60_000);

  afterAll(async () => {
    await xvfb?.stop();
    await node.stop();
  }, 180_000);

  test("the probe: the node runs kvm desktops with the accelerator it was given (tcg here) and says so", async () => {
    const [h] = await sql()`SELECT hypervisors, hypervisor_notes FROM host_runtimes WHERE host_id = ${node.host.id}`;
    expect([...h!.hypervisors].sort()).toEqual(["kvm", "lxc"]);
    expect(h!.hypervisor_notes).toContain("kvm: tcg (vm.kvm.accel = tcg): software emulation");
    expect(h!.hypervisor_notes).toContain("lxc: ");
    expect(log()).toMatch(/backend kvm available.*tcg/);
  });

  test("qvd client starts the KVM desktop through the L7R and shows it with a real nxproxy; QEMU runs unprivileged and confined", async () => {
    const out = await session([], join(output, "kvm-desktop.png"));
    expect(out).toContain("Starting virtual machine");
    const r = await vmRow();
    expect(r.vm_state).toBe("running");
    // vm_pid is QEMU's, which runs as the VM's own uid with no capabilities, under seccomp.
    const pid = Number(r.vm_pid);
    expect(node.qemuPids()).toEqual([pid]);
    const status = readFileSync(`/proc/${pid}/status`, "utf8");
    const uid = UID_BASE + vm.id;
    expect(status).toMatch(new RegExp(`^Uid:\\s+${uid}\\s+${uid}\\s+${uid}\\s+${uid}$`, "m"));
    expect(status).toMatch(/^CapEff:\s+0+$/m);
    expect(status).toMatch(/^Seccomp:\s+2$/m);
    const cmdline = readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0");
    expect(cmdline[cmdline.indexOf("-accel") + 1]).toStartWith("tcg");
    // The guest's console: the VMA set up the network and the home disk, then listened.
    const console = readFileSync(join(node.kvmPath, "logs", `qvd-${vm.id}.console.log`), "utf8");
    expect(console).toContain("formatting the new home disk");
    expect(console).toContain("home disk mounted on /home");
    expect(console).toContain("home created");
    expect(console).toContain("qvd vma listening");
    // The home disk was made at its size and holds the user's home (the session's log).
    expect(existsSync(homeDisk())).toBe(true);
    const info = JSON.parse((await run(["qemu-img", "info", "-U", "--output=json", homeDisk()])).stdout);
    expect(info["virtual-size"]).toBe(256 * 1024 * 1024);
    // The tap is an isolated bridge port with the VM's anti-spoofing chain.
    expect((await run([...node.ns.exec, "bridge", "-d", "link", "show", "dev", `qvd${vm.id}`])).stdout).toMatch(
      /isolated on/,
    );
    expect((await run([...node.ns.exec, "nft", "list", "chain", "bridge", "qvd", `vm${vm.id}`])).stdout).toContain(
      vm.ip!,
    );
  }, 900_000);

  test("USB: qvd client --usb forwards a stick of the user's machine (usbip-host and usbipd, in a VM of its own) into the desktop's kernel; it is the user's there, and goes with the session", async () => {
    // The kernel and initramfs the node extracted from the image (basefs/<di id>/).
    const basefs = join(node.root, "storage", "basefs");
    const di = readdirSync(basefs).find((n) => /^\d+$/.test(n))!;
    const machine = await startUsbMachine({
      dir: node.root,
      image: await kvmTestImage(),
      kernel: join(basefs, di, "vmlinuz"),
      initrd: join(basefs, di, "initrd.img"),
      nsExec: node.ns.exec,
    });
    const exported = async () => {
      const r = await run(
        [
          ...node.ns.exec,
          process.execPath,
          "-e",
          `const { listExported } = await import(${JSON.stringify(join(import.meta.dir, "../src/client/usbip.ts"))}); console.log(JSON.stringify((await listExported()).map((d) => d.busid)))`,
        ],
        { allowFail: true },
      );
      return r.stdout.trim();
    };
    try {
      expect(await exported()).toBe(JSON.stringify([STICK_BUSID]));
      const out = await session(["--usb", STICK_BUSID], undefined, async () => {
        await until(
          async () => /USB device attached|USB device not attached|USB device refused/.test(consoleLog()),
          "the desktop's VMA to attach the stick",
          180_000,
        );
      });
      expect(out).toContain(`Forwarded USB device ${STICK_BUSID} (46f4:0001) to the desktop`);
      const line = consoleLog()
        .split("\n")
        .find((l) => l.includes("USB device attached"));
      expect(line, consoleLog().slice(-3000)).toBeDefined();
      // Enumerated by the desktop's kernel through the whole path: the device's ids, the SCSI
      // disk's size (READ CAPACITY) and the partition read from its first sector.
      expect(line).toContain('id="46f4:0001"');
      expect(line).toContain('speed="super"');
      const disk = /\/dev\/(sd[a-z]) (\d+) owner=(\d+)/.exec(line!);
      expect(disk?.[2]).toBe(String(STICK_BYTES));
      const part = new RegExp(`/dev/${disk![1]}1 (\\d+) owner=(\\d+)`).exec(line!);
      expect(part?.[1]).toBe(String(PARTITION_BYTES));
      // The device nodes belong to the desktop's user (the VMA's udev rule), not to root.
      expect(Number(disk![3])).toBeGreaterThan(0);
      expect(part![2]).toBe(disk![3]);
      // The client went away: the desktop let the device go, and the user's machine has it back.
      await until(async () => consoleLog().includes("USB device detached"), "the desktop to detach the stick", 60_000);
      await until(
        async () => (await exported()) === JSON.stringify([STICK_BUSID]),
        "the user's usbipd to offer the stick again",
        30_000,
      );
    } finally {
      await machine.stop();
    }
  }, 900_000);

  test("killing the node (HKD and all) and starting it again adopts the running QEMU", async () => {
    const before = node.qemuPids();
    expect(before.length).toBe(1);
    const [h] = await sql()`SELECT pid FROM host_runtimes WHERE host_id = ${node.host.id}`;
    // No orderly shutdown: the parent first, then its HKD child before it notices. Its L7R child
    // notices within a second and lets the port go; the new node's L7R waits for it meanwhile.
    await node.kill("SIGKILL");
    try {
      process.kill(Number(h!.pid), "SIGKILL");
    } catch {}
    await Bun.sleep(500);
    expect(node.qemuPids()).toEqual(before);
    await startNode();
    await until(() => log().includes("adopted running desktop"), "the adoption", 60_000);
    expect(node.qemuPids()).toEqual(before);
    const r = await vmRow();
    expect(r.vm_state).toBe("running");
    expect((await node.vma(`http://${vm.ip}:3030`, r.vma_secret, "/vma/ping")).status).toBe(200);
    // The user resumes the same desktop: no new start.
    const out = await session();
    expect(out).not.toContain("Starting virtual machine");
  }, 900_000);

  test("a restart stops the VM gracefully through QMP and boots it again; the home disk keeps the user's files", async () => {
    const pidBefore = node.qemuPids()[0]!;
    const out = await session(["--stop"]);
    expect(out).toContain("Stopping virtual machine");
    expect(out).toContain("Starting virtual machine");
    // The old QEMU powered off on the ACPI button (not killed), a new one runs.
    expect(log()).toContain("vm powered off (ACPI power button through QMP)");
    expect(node.qemuPids()).not.toContain(pidBefore);
    expect(node.qemuPids().length).toBe(1);
    // The new boot found the user's home on its disk: nothing formatted, no home created.
    const console = consoleLog();
    expect(console).toContain("home disk mounted on /home");
    expect(console).not.toContain("formatting the new home disk");
    expect(console).not.toContain("home created");
    await D.stopVm(sql(), ALL, vm.id);
    await until(
      async () => (await D.get(sql(), D.vms, ALL, vm.id)).vm_state === "stopped",
      "the desktop to stop",
      300_000,
    );
    expect(node.qemuPids()).toEqual([]);
    // Nothing is left on the node: no tap, no anti-spoofing chain, no VM directory, no overlay.
    expect(await node.links()).not.toContain(`qvd${vm.id}`);
    expect(existsSync(join(node.kvmPath, `qvd-${vm.id}`))).toBe(false);
    expect(existsSync(join(node.root, "storage", "overlays", String(vm.id), "disk.qcow2"))).toBe(false);
    // The home disk stays, with what the user's sessions wrote in it: the session log holds
    // both boots' X sessions (each one's xterm says so when its X server ends; its font
    // warnings at start, which this counted before, do not always come).
    expect(statSync(homeDisk()).size).toBeGreaterThan(0);
    const sessionLog = await homeFile("/alice/.qvd-session.log");
    expect(
      sessionLog.split("\n").filter((l) => l.startsWith("xterm: fatal IO error")).length,
      sessionLog,
    ).toBeGreaterThanOrEqual(2);
  }, 900_000);

  test("an LXC image (a tarball) on a KVM OSF is refused with a clear reason, and the VM is blocked", async () => {
    const user = await D.create(sql(), D.users, ALL, { tenant_id: 1, name: "bob", password: "bob-pw-1" });
    const kvmOsf = await D.create(sql(), D.osfs, ALL, {
      tenant_id: 1,
      name: "kvm-with-tarball",
      memory_mb: 512,
      hypervisor: "kvm",
    });
    await node.addImage(kvmOsf.id, "busybox.tar.gz", (p) => busyboxImage(p));
    const bad = await D.createVm(
      sql(),
      ALL,
      { user_id: user.id, osf_id: kvmOsf.id, name: "bad" },
      { range: "198.18.0.0/16" },
    );
    await D.startVm(sql(), ALL, bad.id, { aliveWithinS: 60 });
    await until(
      async () => (await sql()`SELECT blocked FROM vm_runtimes WHERE vm_id = ${bad.id}`)[0]!.blocked === true,
      "the VM to be blocked",
      120_000,
    );
    const [r] = await sql()`SELECT blocked_reason FROM vm_runtimes WHERE vm_id = ${bad.id}`;
    expect(String(r!.blocked_reason)).toMatch(/not a qcow2/i);
    expect(node.qemuPids()).toEqual([]);
  }, 300_000);
});
