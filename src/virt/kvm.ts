// The KVM backend: one QEMU process per desktop, driven through its QMP socket.
//
// Per VM (`qvd-<id>`):
//   <kvmPath>/qvd-<id>/vma.json     what the guest's VMA needs (secret, network, home), handed to
//                                   the guest through fw_cfg `opt/org.qvd/vma.json` (mode 0600)
//   <kvmPath>/qvd-<id>/qmp.sock     QMP: status, system_powerdown, quit
//   <kvmPath>/qvd-<id>/qemu.pid     QEMU's pid (it daemonizes, so it outlives an HKD restart)
//   <kvmPath>/qvd-<id>/state.json   what cleanup needs when the spec is gone (persistence)
//   <kvmPath>/logs/qvd-<id>.console.log  the guest's serial console (kernel, systemd, the VMA's
//                                   log); reset at start, kept after cleanup
//   <overlays>/<id>/disk.qcow2      the VM's root disk: a qcow2 overlay whose backing file is the
//                                   image on shared storage, opened read-only; discarded at
//                                   cleanup unless persistent
//   <homes>/<tenant>/<user>.qcow2   the user's home disk (user_storage_mb), made at first start,
//                                   kept; the guest's VMA formats it once and mounts it on /home
//   <kvmPath>/bin/qvd-<digest>.img  a read-only ext4 disk holding the node's qvd binary, made once
//                                   per binary; the guest mounts it on /opt/qvd and runs the VMA
// Guest contract (what the image must do with these): src/virt/README.md, "KVM backend".
//
// Confinement: QEMU opens its devices as root, then drops to uid/gid vm.kvm.uid_base + <vm id>
// (-runas: no two desktops share an id, none is a node account) under a seccomp filter
// (-sandbox: no obsolete syscalls, no set*id, no exec, no scheduler/resource changes). The
// network is the LXC desktops': a tap `qvd<id>` on the node's bridge as an isolated port, with
// the same anti-spoofing chain (network.ts).
import {
  closeSync,
  existsSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { spawn } from "node:child_process";
import { connect } from "node:net";
import { join, resolve } from "node:path";
import { inspectQcow2 } from "./kvm-image.ts";
import type { Backend, BackendState, VmSpec } from "./backend.ts";
import { type NodeNetwork, netnsPrefix, vethName } from "./network.ts";
import { run } from "../run.ts";
import { UserError } from "../errors.ts";
import { logger } from "../log.ts";

const log = logger("kvm");

export type Accel = "kvm" | "tcg";

export interface KvmOptions {
  /** Node-local state (vm.kvm.path or <path.run>/kvm). */
  kvmPath: string;
  /** Where the VMs' root overlays live (path.storage.overlays). */
  overlaysRoot: string;
  network: NodeNetwork;
  /** The accelerator the registry's probe settled on. */
  accel: Accel;
  qemu?: string;
  qemuImg?: string;
  machine?: string;
  /** Kernel command line after `root=/dev/vda rw`. */
  cmdline?: string;
  extraArgs?: string[];
  uidBase?: number;
  /** How long start waits for QEMU to daemonize (default 60 s). */
  startTimeoutMs?: number;
}

/** A VM's state on disk, for cleanup when the spec is gone. */
interface VmState {
  persistent: boolean;
  overlay: string;
}

/** What the guest reads from fw_cfg (src/vma/kvm-guest.ts checks it). */
export interface KvmGuestFile {
  vm_id: number;
  secret: string;
  node_address: string;
  port: number;
  settings: Record<string, string>;
  kvm: { ip: string; prefix: number; gateway: string; mac: string; home: boolean };
}

export const FW_CFG_NAME = "opt/org.qvd/vma.json";

/** A human-readable `qemu-img` / QEMU failure, without the command line. */
function qemuError(what: string, stderr: string): UserError {
  const msg = stderr.trim().split("\n").filter(Boolean).slice(-3).join("; ");
  return new UserError(`${what}: ${msg || "failed"}`);
}

const pidAlive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
};

export class KvmBackend implements Backend {
  readonly kind = "kvm" as const;
  private readonly qemu: string;
  private readonly qemuImg: string;

  constructor(readonly o: KvmOptions) {
    this.qemu = o.qemu ?? "qemu-system-x86_64";
    this.qemuImg = o.qemuImg ?? "qemu-img";
  }

  name = (vmId: number) => `qvd-${vmId}`;
  vmDir = (vmId: number) => join(this.o.kvmPath, this.name(vmId));
  overlayDir = (vmId: number) => join(this.o.overlaysRoot, String(vmId));
  consoleLog = (vmId: number) => join(this.o.kvmPath, "logs", `${this.name(vmId)}.console.log`);
  private qmpPath = (vmId: number) => join(this.vmDir(vmId), "qmp.sock");
  private pidFile = (vmId: number) => join(this.vmDir(vmId), "qemu.pid");
  /** QEMU's uid and gid for this VM. */
  runAs = (vmId: number) => (this.o.uidBase ?? 200000) + vmId;

  async prepare(spec: VmSpec): Promise<void> {
    if (spec.hypervisor !== "kvm") throw new UserError(`VM ${spec.vmId} is a ${spec.hypervisor} desktop, not kvm`);
    if (!spec.image.kernel || !spec.image.initrd)
      throw new UserError(`image ${spec.image.diId} has no kernel to boot (not prepared for KVM)`);
    const dir = this.vmDir(spec.vmId);
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    mkdirSync(join(this.o.kvmPath, "logs"), { recursive: true, mode: 0o700 });

    // The root disk: a fresh overlay at every start unless persistent (an OSF without an overlay
    // gets a throw-away one too: a VM cannot boot on a read-only root).
    const persistent = spec.overlay.enabled && spec.overlay.persistent;
    const ovDir = this.overlayDir(spec.vmId);
    const overlay = join(ovDir, "disk.qcow2");
    mkdirSync(ovDir, { recursive: true, mode: 0o700 });
    if (!persistent || !existsSync(overlay)) {
      rmSync(overlay, { force: true });
      const r = await run(
        [this.qemuImg, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", spec.image.path, `${overlay}.tmp`],
        { allowFail: true },
      );
      if (r.status !== 0)
        throw qemuError(`cannot make the root disk of VM ${spec.vmId} over ${spec.image.path}`, r.stderr);
      renameSync(`${overlay}.tmp`, overlay);
    } else {
      await this.checkOwnDisk(overlay, spec.image.path);
    }
    writeFileSync(join(dir, "state.json"), JSON.stringify({ persistent, overlay } satisfies VmState));

    // The home disk: made once, kept on shared storage.
    if (spec.home.sizeMb > 0) await this.ensureHomeDisk(spec.home.hostPath, spec.home.sizeMb);

    const guest: KvmGuestFile = {
      vm_id: spec.vmId,
      secret: spec.vma.secret,
      node_address: spec.network.gateway,
      port: spec.vma.port,
      // The poweroff method ends the session and the VMA; the power-off itself is the ACPI
      // button that stop() presses through QMP (systemd-logind in the guest powers off).
      settings: spec.vma.settings ?? {},
      kvm: {
        ip: spec.network.ip,
        prefix: spec.network.prefix,
        gateway: spec.network.gateway,
        mac: spec.network.mac,
        home: spec.home.sizeMb > 0,
      },
    };
    writeFileSync(join(dir, "vma.json"), JSON.stringify(guest), { mode: 0o600 });
    await this.binaryDisk(spec.qvdBinary);

    // The tap, as an isolated bridge port with the VM's anti-spoofing chain.
    const tap = vethName(spec.vmId);
    const net = this.o.network;
    await net.removeVeth(tap);
    await net.run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"]);
    await net.run(["ip", "link", "set", "dev", tap, "master", net.o.bridge]);
    await net.run(["bridge", "link", "set", "dev", tap, "isolated", "on"]);
    await net.run(["ip", "link", "set", "dev", tap, "up"]);
    await net.addVm({ vmId: spec.vmId, ifname: tap, ip: spec.network.ip, mac: spec.network.mac });
  }

  /** A persistent root disk is used again only while it is still an overlay of this image. */
  private async checkOwnDisk(file: string, backing: string): Promise<void> {
    const r = await run([this.qemuImg, "info", "--output=json", "-f", "qcow2", file], { allowFail: true });
    let info: { "backing-filename"?: string } = {};
    try {
      info = JSON.parse(r.stdout);
    } catch {}
    if (r.status !== 0 || info["backing-filename"] !== backing) {
      log.warn("the persistent root disk is not an overlay of this image: made anew", {
        file,
        backing: info["backing-filename"] ?? null,
      });
      rmSync(file, { force: true });
      const c = await run([this.qemuImg, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing, file], {
        allowFail: true,
      });
      if (c.status !== 0) throw qemuError("cannot make the root disk", c.stderr);
    }
  }

  /** Makes the user's home disk on first use; grows it when the OSF's size grew (never shrinks). */
  private async ensureHomeDisk(file: string, sizeMb: number): Promise<void> {
    const dir = join(file, "..");
    mkdirSync(dir, { recursive: true, mode: 0o710 });
    if (!existsSync(file)) {
      const r = await run([this.qemuImg, "create", "-q", "-f", "qcow2", `${file}.tmp`, `${sizeMb}M`], {
        allowFail: true,
      });
      if (r.status !== 0) throw qemuError(`cannot make the home disk ${file}`, r.stderr);
      renameSync(`${file}.tmp`, file);
      log.info("home disk made", { file, size_mb: sizeMb });
      return;
    }
    // The guest writes only the disk's data: the header (backing file, data file) is ours. One
    // that has either was not made here and is not opened.
    const { virtualSize } = await inspectQcow2(resolve(file), { qemuImg: this.qemuImg, check: false }).catch(
      (e: Error) => {
        throw new UserError(`the home disk cannot be used: ${e.message}`);
      },
    );
    if (virtualSize < sizeMb * 1024 * 1024) {
      const g = await run([this.qemuImg, "resize", "-q", "-f", "qcow2", file, `${sizeMb}M`], { allowFail: true });
      if (g.status !== 0) log.warn("cannot grow the home disk", { file, error: g.stderr.trim() });
      else log.info("home disk grown", { file, size_mb: sizeMb });
    }
  }

  /** The read-only disk holding the qvd binary, made once per binary (size, mtime, inode). */
  async binaryDisk(qvdBinary: string): Promise<string> {
    const st = statSync(qvdBinary);
    const digest = new Bun.CryptoHasher("sha256")
      .update(`${qvdBinary}:${st.size}:${st.mtimeMs}:${st.ino}`)
      .digest("hex")
      .slice(0, 16);
    const binDir = join(this.o.kvmPath, "bin");
    const img = join(binDir, `qvd-${digest}.img`);
    if (existsSync(img)) return img;
    mkdirSync(binDir, { recursive: true, mode: 0o700 });
    const stage = join(binDir, `.stage-${process.pid}`);
    rmSync(stage, { recursive: true, force: true });
    mkdirSync(stage, { mode: 0o755 });
    try {
      await run(["cp", "--preserve=mode", qvdBinary, join(stage, "qvd")]);
      const sizeMb = Math.ceil(st.size / 1048576) + 16;
      const tmp = `${img}.tmp-${process.pid}`;
      closeSync(openSync(tmp, "w"));
      await run(["truncate", "-s", `${sizeMb}M`, tmp]);
      // root:root 0755 inside: the guest's users may run it, not change it (and the disk is read-only).
      const r = await run(["mkfs.ext4", "-q", "-F", "-L", "qvd-bin", "-E", "root_owner=0:0", "-d", stage, tmp], {
        allowFail: true,
      });
      if (r.status !== 0) throw qemuError("cannot make the qvd binary disk", r.stderr);
      renameSync(tmp, img);
    } finally {
      rmSync(stage, { recursive: true, force: true });
    }
    // Older binaries' disks: no VM starts on them any more (running QEMUs keep theirs open).
    for (const n of readdirSync(binDir))
      if (n.startsWith("qvd-") && join(binDir, n) !== img && n.endsWith(".img"))
        rmSync(join(binDir, n), { force: true });
    return img;
  }

  /** QEMU's command line for a prepared VM. */
  async argv(spec: VmSpec): Promise<string[]> {
    const id = spec.vmId;
    const dir = this.vmDir(id);
    const overlay = join(this.overlayDir(id), "disk.qcow2");
    const uid = this.runAs(id);
    const accel = this.o.accel;
    const args = [
      this.qemu,
      "-name",
      `${this.name(id)},process=${this.name(id)}`,
      "-machine",
      this.o.machine ?? "q35",
      // tcg: a 128 MiB cache of translated code instead of QEMU's 1 GiB default, which made
      // most of an idle desktop's memory (bench/vm-start.ts: 470 of 887 MiB).
      "-accel",
      accel === "tcg" ? "tcg,tb-size=128" : "kvm",
      // tcg: every feature QEMU emulates (the qvd binary needs more than qemu64, e.g. SSE4.2).
      "-cpu",
      accel === "kvm" ? "host" : "max",
      "-m",
      String(spec.memoryMb),
      "-smp",
      String(Math.max(1, spec.vcpus)),
      "-nodefaults",
      "-no-user-config",
      "-display",
      "none",
      "-kernel",
      spec.image.kernel!,
      "-initrd",
      spec.image.initrd!,
      "-append",
      `root=/dev/vda rw ${this.o.cmdline ?? "console=ttyS0 quiet"}`.trim(),
      "-drive",
      `file=${overlay},format=qcow2,if=none,id=root,discard=unmap`,
      "-device",
      "virtio-blk-pci,drive=root,serial=qvd-root",
      "-drive",
      `file=${await this.binaryDisk(spec.qvdBinary)},format=raw,if=none,id=bin,readonly=on`,
      "-device",
      "virtio-blk-pci,drive=bin,serial=qvd-bin",
      "-netdev",
      `tap,id=net0,ifname=${vethName(id)},script=no,downscript=no`,
      "-device",
      `virtio-net-pci,netdev=net0,mac=${spec.network.mac}`,
      "-device",
      "virtio-rng-pci",
      "-fw_cfg",
      `name=${FW_CFG_NAME},file=${join(dir, "vma.json")}`,
      "-chardev",
      `file,id=console,path=${this.consoleLog(id)}`,
      "-serial",
      "chardev:console",
      "-qmp",
      `unix:${this.qmpPath(id)},server=on,wait=off`,
      "-pidfile",
      this.pidFile(id),
      // After -runas QEMU holds no capability (set*id cannot bring them back, so that part of the
      // sandbox stays allowed: QEMU needs it to drop); no fork or exec, no scheduler changes.
      "-runas",
      `${uid}:${uid}`,
      "-sandbox",
      "on,obsolete=deny,spawn=deny,resourcecontrol=deny",
    ];
    if (spec.home.sizeMb > 0)
      args.push(
        "-drive",
        `file=${spec.home.hostPath},format=qcow2,if=none,id=home,discard=unmap`,
        "-device",
        "virtio-blk-pci,drive=home,serial=qvd-home",
      );
    args.push(...(this.o.extraArgs ?? []));
    return args;
  }

  async start(spec: VmSpec): Promise<{ pid?: number }> {
    const id = spec.vmId;
    writeFileSync(this.consoleLog(id), "");
    rmSync(this.pidFile(id), { force: true });
    const argv = [...netnsPrefix(this.o.network.o.netns), ...(await this.argv(spec))];
    // Not -daemonize (its fork is what -sandbox spawn=deny forbids): a session of its own, so the
    // VM outlives the HKD (adopted at its next start), with QEMU's own messages in qemu.log.
    const logFile = join(this.vmDir(id), "qemu.log");
    const out = openSync(logFile, "w", 0o600);
    let exited: number | null = null;
    try {
      const child = spawn(argv[0]!, argv.slice(1), { detached: true, stdio: ["ignore", out, out] });
      child.on("exit", (code, signal) => (exited = code ?? (signal ? 128 : 1)));
      child.on("error", () => (exited = 127));
      child.unref();
    } finally {
      closeSync(out);
    }
    const failed = () => {
      const msg = readFileSync(logFile, "utf8");
      return qemuError(`QEMU did not start VM ${id}`, msg);
    };
    const deadline = Date.now() + (this.o.startTimeoutMs ?? 60_000);
    for (;;) {
      if (exited !== null) throw failed();
      const pid = this.pid(id);
      if (pid) {
        const st = (await this.qmp(id, "query-status", undefined, 2000).catch(() => undefined)) as
          | { status?: string }
          | undefined;
        if (st?.status === "running") {
          log.info("vm started", { vm: id, pid, accel: this.o.accel });
          return { pid };
        }
      }
      if (Date.now() > deadline) {
        if (pid) await this.kill(id).catch(() => {});
        throw new UserError(
          `QEMU did not report VM ${id} running within ${Math.round((this.o.startTimeoutMs ?? 60_000) / 1000)} s`,
        );
      }
      await Bun.sleep(100);
    }
  }

  /** The pid of the VM's QEMU when it runs (checked against its process name). */
  pid(vmId: number): number | undefined {
    let pid: number;
    try {
      pid = Number(readFileSync(this.pidFile(vmId), "utf8").trim());
    } catch {
      return undefined;
    }
    if (!Number.isInteger(pid) || pid <= 1 || !pidAlive(pid)) return undefined;
    try {
      // -name …,process=qvd-<id>: QEMU's thread name (a pid reused by another program is not it).
      if (readFileSync(`/proc/${pid}/comm`, "utf8").trim() !== this.name(vmId)) return undefined;
    } catch {
      return undefined;
    }
    return pid;
  }

  /** One QMP command; resolves with its `return`, rejects on an error or when QEMU is gone. */
  async qmp(vmId: number, command: string, args?: Record<string, unknown>, timeoutMs = 5000): Promise<unknown> {
    return await new Promise((resolve, reject) => {
      const sock = connect(this.qmpPath(vmId));
      let buf = "";
      let phase = 0;
      const timer = setTimeout(() => {
        sock.destroy();
        reject(new Error(`QMP ${command}: no answer within ${timeoutMs} ms`));
      }, timeoutMs);
      const done = (err: Error | null, v?: unknown) => {
        clearTimeout(timer);
        sock.destroy();
        err ? reject(err) : resolve(v);
      };
      sock.on("error", (e) => done(e));
      sock.on("close", () => done(new Error(`QMP ${command}: connection closed`)));
      sock.on("data", (d) => {
        buf += d.toString();
        let nl: number;
        while ((nl = buf.indexOf("\n")) >= 0) {
          const line = buf.slice(0, nl).trim();
          buf = buf.slice(nl + 1);
          if (!line) continue;
          let msg: { QMP?: unknown; return?: unknown; error?: { desc?: string }; event?: string };
          try {
            msg = JSON.parse(line);
          } catch {
            continue;
          }
          if (msg.event) continue;
          if (phase === 0 && msg.QMP) {
            phase = 1;
            sock.write(JSON.stringify({ execute: "qmp_capabilities" }) + "\n");
          } else if (phase === 1 && "return" in msg) {
            phase = 2;
            sock.write(JSON.stringify(args ? { execute: command, arguments: args } : { execute: command }) + "\n");
          } else if (phase === 2) {
            if (msg.error) done(new Error(`QMP ${command}: ${msg.error.desc ?? "error"}`));
            else done(null, msg.return);
          }
        }
      });
    });
  }

  private async waitGone(pid: number, timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      if (!pidAlive(pid)) return true;
      await Bun.sleep(200);
    }
    return !pidAlive(pid);
  }

  async stop(vmId: number, timeoutMs: number): Promise<boolean> {
    const pid = this.pid(vmId);
    if (!pid) return true;
    // ACPI power button: the guest's systemd (logind) powers off.
    const t0 = Date.now();
    await this.qmp(vmId, "system_powerdown").catch((e) =>
      log.debug("system_powerdown failed", { vm: vmId, error: (e as Error).message }),
    );
    const down = await this.waitGone(pid, timeoutMs);
    if (down)
      log.info("vm powered off (ACPI power button through QMP)", {
        vm: vmId,
        seconds: ((Date.now() - t0) / 1000).toFixed(1),
      });
    return down;
  }

  async kill(vmId: number): Promise<void> {
    const pid = this.pid(vmId);
    if (!pid) return;
    await this.qmp(vmId, "quit", undefined, 3000).catch(() => {});
    if (await this.waitGone(pid, 5000)) return;
    for (const sig of ["SIGTERM", "SIGKILL"] as const) {
      try {
        process.kill(pid, sig);
      } catch {}
      if (await this.waitGone(pid, 5000)) return;
    }
    throw new UserError(`QEMU of VM ${vmId} (pid ${pid}) could not be killed`);
  }

  async status(vmId: number): Promise<BackendState> {
    return this.pid(vmId) ? "running" : "stopped";
  }

  async running(): Promise<number[]> {
    return this.dirs().filter((id) => this.pid(id) !== undefined);
  }

  private dirs(): number[] {
    if (!existsSync(this.o.kvmPath)) return [];
    return readdirSync(this.o.kvmPath)
      .map((e) => /^qvd-(\d+)$/.exec(e))
      .filter((m): m is RegExpExecArray => m !== null)
      .map((m) => Number(m[1]))
      .sort((a, b) => a - b);
  }

  async leftovers(): Promise<number[]> {
    const ids = new Set(this.dirs());
    const taps = await this.o.network.run(["ip", "-o", "tuntap", "show"], { allowFail: true });
    for (const m of taps.stdout.matchAll(/^qvd(\d+):/gm)) ids.add(Number(m[1]));
    return [...ids].sort((a, b) => a - b);
  }

  async cleanup(vmId: number, opts: { keepStorage?: boolean } = {}): Promise<void> {
    if ((await this.status(vmId)) !== "stopped") await this.kill(vmId);
    const dir = this.vmDir(vmId);
    let state: VmState | undefined;
    try {
      state = JSON.parse(readFileSync(join(dir, "state.json"), "utf8")) as VmState;
    } catch {}
    await this.o.network.removeVeth(vethName(vmId));
    await this.o.network.removeVm(vmId);
    // The root disk: kept when persistent, when another node runs the VM over it now, and when
    // there is no record (the next prepare discards it unless that start is persistent).
    if (!opts.keepStorage && state && !state.persistent)
      rmSync(this.overlayDir(vmId), { recursive: true, force: true });
    rmSync(dir, { recursive: true, force: true });
  }
}
