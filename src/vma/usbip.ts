// USB/IP in a KVM desktop: the VMA (root in the guest) attaches a client's USB device to the
// guest kernel's vhci_hcd and relays the device's USB/IP traffic to the slave channel. See
// src/vma/README.md, "USB devices".
//
// The stream, after the client's 101 (the original QVD's protocol): one line "<devid> <speed>\n"
// (devid = busnum << 16 | devnum on the client, speed the kernel's enum usb_device_speed), then the
// URBs between the guest's vhci_hcd and the client's usbip-host. vhci_hcd takes a socket from the
// process that writes "<port> <sockfd> <devid> <speed>" to its attach file. Bun cannot hand out a
// socket's descriptor, so a fixed bash one-liner connects to a listener of the VMA on 127.0.0.1
// (bash's /dev/tcp), writes the attach line with that descriptor and exits; the kernel keeps the
// socket and the VMA relays between its end and the slave stream. The listener takes only a
// connection whose socket belongs to root (/proc/net/tcp): a desktop user cannot step in.
//
// Only a desktop with a kernel of its own may do this (vm.hypervisor kvm): in an LXC desktop the
// driver would be the node's.
import {
  existsSync,
  lstatSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { createServer, type Socket } from "node:net";
import { basename, join } from "node:path";
import { logger } from "../log.ts";
import { runQuiet } from "./shares.ts";

const log = logger("vma-usbip");

/** enum usb_device_speed values vhci_hcd accepts: low, full, high, super, super-plus (not wireless). */
export const USB_SPEEDS: Readonly<Record<number, string>> = {
  1: "low",
  2: "full",
  3: "high",
  5: "super",
  6: "super-plus",
};
/** Devices attached at a time per desktop (vhci_hcd has 8 + 8 ports per controller by default). */
export const MAX_USB_DEVICES = 8;
/** The device line: at most this many bytes, within this many milliseconds of the 101. */
export const MAX_LINE = 64;
const LINE_TIMEOUT_MS = 15_000;

export interface UsbDeviceId {
  devid: number;
  speed: number;
}

/** The client's "<devid> <speed>" line, checked: undefined when it is not one. */
export function parseDeviceLine(line: string): UsbDeviceId | undefined {
  const m = /^(\d{1,10}) (\d)\r?$/.exec(line);
  if (!m) return undefined;
  const devid = Number(m[1]);
  const speed = Number(m[2]);
  if (devid > 0xffffffff || !USB_SPEEDS[speed]) return undefined;
  // busnum and devnum are both at least 1 on a real bus.
  if (devid >>> 16 === 0 || (devid & 0xffff) === 0) return undefined;
  return { devid, speed };
}

export interface VhciPort {
  hub: "hs" | "ss";
  port: number;
  /** enum usbip_device_status: 4 free (VDEV_ST_NULL), 5 not yet assigned, 6 in use. */
  state: number;
  /** The device's bus id on the guest's side ("0-0" while none). */
  busid: string;
}

/** vhci_hcd's status files ("hub port sta spd dev sockfd local_busid" rows). */
export function parseVhciStatus(text: string): VhciPort[] {
  const out: VhciPort[] = [];
  for (const line of text.split("\n")) {
    const f = line.trim().split(/\s+/);
    if (f.length < 7 || (f[0] !== "hs" && f[0] !== "ss") || !/^\d+$/.test(f[1]!) || !/^\d+$/.test(f[2]!)) continue;
    out.push({ hub: f[0], port: Number(f[1]), state: Number(f[2]), busid: f[6]! });
  }
  return out;
}

/** A free port of the right hub: SuperSpeed devices go on the ss hub, the others on hs. */
export function pickPort(ports: VhciPort[], speed: number): number | undefined {
  const hub = speed >= 5 ? "ss" : "hs";
  return ports.find((p) => p.hub === hub && p.state === 4)?.port;
}

/** The owner's uid of the TCP socket 127.0.0.1:<local> → 127.0.0.1:<remote> (/proc/net/tcp). */
export function tcpSocketUid(procNetTcp: string, local: number, remote: number): number | undefined {
  const hex = (p: number) => `0100007F:${p.toString(16).toUpperCase().padStart(4, "0")}`;
  for (const line of procNetTcp.split("\n").slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f[1] === hex(local) && f[2] === hex(remote)) return Number(f[7]);
  }
  return undefined;
}

/** What a device's sysfs says, made safe for a log line (its strings are the client's to choose). */
const clean = (s: string) =>
  s
    .trim()
    .replace(/[^\x20-\x7e]/g, "?")
    .slice(0, 64);

export interface AttachedInfo {
  busid: string;
  id: string;
  name: string;
  /** Device nodes below it and their owners: "/dev/sdb 1048576 owner=1000" (block devices with their size in bytes), "/dev/bus/usb/003/002 owner=1000". */
  nodes: string[];
}

/** The device at /sys/bus/usb/devices/<busid> and its device nodes. */
export function describeDevice(sysUsb: string, busid: string): AttachedInfo {
  const dir = join(sysUsb, "devices", busid);
  const read = (f: string) => {
    try {
      return clean(readFileSync(join(dir, f), "utf8"));
    } catch {
      return "";
    }
  };
  const nodes: string[] = [];
  let real = dir;
  try {
    real = join(dir, "..", readlinkSync(dir));
  } catch {}
  const walk = (d: string, depth: number) => {
    if (depth > 12) return;
    let names: string[] = [];
    try {
      names = readdirSync(d);
    } catch {
      return;
    }
    if (names.includes("dev")) {
      try {
        const devname = /^DEVNAME=(.*)$/m.exec(readFileSync(join(d, "uevent"), "utf8"))?.[1];
        if (devname) {
          const size = names.includes("size") ? Number(readFileSync(join(d, "size"), "utf8").trim()) * 512 : undefined;
          const node = `/dev/${clean(devname)}`;
          let owner = "?";
          try {
            owner = String(statSync(node).uid);
          } catch {}
          nodes.push(`${node}${size !== undefined ? ` ${size}` : ""} owner=${owner}`);
        }
      } catch {}
    }
    for (const n of names) {
      if (n === "subsystem" || n === "driver" || n === "device" || n === "port" || n === "firmware_node") continue;
      const p = join(d, n);
      // Children are real directories; links lead elsewhere (bdi, the block class's "holders").
      if (lstatSync(p, { throwIfNoEntry: false })?.isDirectory()) walk(p, depth + 1);
    }
  };
  walk(real, 0);
  return {
    busid,
    id: `${read("idVendor")}:${read("idProduct")}`,
    name: [read("manufacturer"), read("product")].filter(Boolean).join(" "),
    nodes: nodes.sort(),
  };
}

export interface UsbipOptions {
  /** /sys/devices/platform (tests). */
  platformDir?: string;
  /** /sys/bus/usb */
  sysUsb?: string;
  bash?: string;
  modprobe?: string;
  udevadm?: string;
  /** Where the session's udev rule goes (USB_UDEV_RULE_FILE). */
  udevRuleFile?: string;
  maxDevices?: number;
}

/** One attached device: its vhci port and its relay. */
interface Attachment {
  port: number;
  busid?: string;
  tcp: Socket;
  stream: Socket;
}

/** The desktop's USB devices: attaches, relays, detaches (all at suspend and stop). */
export class UsbipAttacher {
  private readonly attached = new Set<Attachment>();
  private readonly platformDir: string;
  private readonly sysUsb: string;

  constructor(readonly o: UsbipOptions = {}) {
    this.platformDir = o.platformDir ?? "/sys/devices/platform";
    this.sysUsb = o.sysUsb ?? "/sys/bus/usb";
  }

  get count(): number {
    return this.attached.size;
  }

  /** Gives the session's user the nodes of the devices attached from now on (usbUdevRule). */
  async installRule(uid: number, gid: number): Promise<boolean> {
    return await installUsbUdevRule(uid, gid, this.o.udevRuleFile, this.o.udevadm);
  }

  private get vhci(): string {
    return join(this.platformDir, "vhci_hcd.0");
  }

  /** Loads vhci_hcd when it is not there; the reason when it cannot be had. */
  async ensureDriver(): Promise<string | undefined> {
    if (existsSync(join(this.vhci, "attach"))) return undefined;
    const r = await runQuiet([this.o.modprobe ?? "modprobe", "vhci-hcd"]);
    if (existsSync(join(this.vhci, "attach"))) return undefined;
    return `the desktop's kernel has no vhci_hcd driver${r.stderr ? ` (${r.stderr.trim().split("\n")[0]})` : ""}`;
  }

  /** Every port of every vhci_hcd controller (their status files are all in vhci_hcd.0). */
  ports(): VhciPort[] {
    let files: string[] = [];
    try {
      files = readdirSync(this.vhci).filter((n) => /^status(\.\d+)?$/.test(n));
    } catch {}
    return files.flatMap((f) => {
      try {
        return parseVhciStatus(readFileSync(join(this.vhci, f), "utf8"));
      } catch {
        return [];
      }
    });
  }

  /** Why another device cannot be attached now, or undefined. */
  async refusal(): Promise<{ status: number; error: string } | undefined> {
    if (this.attached.size >= (this.o.maxDevices ?? MAX_USB_DEVICES))
      return { status: 503, error: `at most ${this.o.maxDevices ?? MAX_USB_DEVICES} USB devices at a time` };
    const why = await this.ensureDriver();
    if (why) return { status: 501, error: why };
    return undefined;
  }

  /**
   * Reads the device line from `stream` (the client's, relayed by `qvd vma-slave`), attaches the
   * device and relays until either side ends. `first` holds bytes already read from the stream.
   */
  async attach(stream: Socket, first: Buffer): Promise<void> {
    const got = await readLine(stream, first);
    const dev = got && parseDeviceLine(got.line);
    if (!got || !dev) {
      log.warn("USB device refused: no valid device line from the client");
      stream.destroy();
      return;
    }
    const port = pickPort(this.ports(), dev.speed);
    if (port === undefined) {
      log.warn("USB device refused: no free vhci_hcd port", { speed: USB_SPEEDS[dev.speed] });
      stream.destroy();
      return;
    }
    let tcp: Socket;
    try {
      tcp = await this.kernelSocket(port, dev);
    } catch (e) {
      log.warn("USB device not attached", { port, err: (e as Error).message });
      stream.destroy();
      return;
    }
    const a: Attachment = { port, tcp, stream };
    this.attached.add(a);
    let ended = false;
    const end = () => {
      if (ended) return;
      ended = true;
      this.attached.delete(a);
      tcp.destroy();
      stream.destroy();
      this.detachPort(port);
      log.info("USB device detached", { port, busid: a.busid ?? "" });
    };
    tcp.on("close", end);
    stream.on("close", end);
    tcp.on("error", () => tcp.destroy());
    stream.on("error", () => stream.destroy());
    if (got.rest.length) tcp.write(got.rest);
    stream.pipe(tcp);
    tcp.pipe(stream);
    stream.resume();
    void this.report(a, dev, () => ended);
  }

  /**
   * Logs what was attached once the guest has enumerated it and its drivers have made their
   * device nodes (a USB disk's comes a second or two after the device), or that it was not.
   */
  private async report(a: Attachment, dev: UsbDeviceId, ended: () => boolean): Promise<void> {
    const t0 = Date.now();
    let seen: string | undefined;
    let stable = 0;
    while (!ended() && Date.now() - t0 < 30_000) {
      const p = this.ports().find((x) => x.port === a.port);
      if (p && p.state === 6 && p.busid !== "0-0" && existsSync(join(this.sysUsb, "devices", p.busid))) {
        a.busid = p.busid;
        await runQuiet([this.o.udevadm ?? "udevadm", "settle", "-t", "5"]);
        const info = describeDevice(this.sysUsb, p.busid);
        const now = info.nodes.join(", ");
        stable = now === seen ? stable + 1 : 0;
        seen = now;
        if (stable >= 3 || Date.now() - t0 > 20_000) {
          log.info("USB device attached", {
            port: a.port,
            busid: info.busid,
            id: info.id,
            name: info.name,
            speed: USB_SPEEDS[dev.speed],
            nodes: now,
          });
          return;
        }
        await Bun.sleep(700);
        continue;
      }
      await Bun.sleep(200);
    }
    if (!ended()) log.warn("USB device attached but not enumerated by the desktop's kernel", { port: a.port });
  }

  /** Ends every relay: vhci_hcd drops the devices when their sockets close. */
  detachAll(): void {
    for (const a of [...this.attached]) {
      a.stream.destroy();
      a.tcp.destroy();
    }
  }

  private detachPort(port: number): void {
    const p = this.ports().find((x) => x.port === port);
    if (!p || p.state === 4) return;
    try {
      writeFileSync(join(this.vhci, "detach"), `${port}`);
    } catch {
      /* already gone */
    }
  }

  /**
   * A TCP connection whose other end vhci_hcd now owns: bash connects to a listener of ours and
   * writes the attach line with that descriptor (every value a checked number).
   */
  private async kernelSocket(port: number, dev: UsbDeviceId): Promise<Socket> {
    const server = createServer({ pauseOnConnect: true });
    await new Promise<void>((res, rej) => {
      server.once("error", rej);
      server.listen(0, "127.0.0.1", () => res());
    });
    const lport = (server.address() as { port: number }).port;
    const accepted = new Promise<Socket>((res) => {
      server.on("connection", (s: Socket) => {
        let uid: number | undefined;
        try {
          uid = tcpSocketUid(readFileSync("/proc/net/tcp", "utf8"), s.remotePort!, lport);
        } catch {}
        if (uid !== 0) {
          log.warn("a non-root connection to the USB attach listener was refused", { uid: uid ?? "unknown" });
          s.destroy();
          return;
        }
        res(s);
      });
    });
    try {
      const script = 'exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 3; printf "%s 3 %s %s\\n" "$2" "$3" "$4" > "$5"';
      const r = runQuiet([
        this.o.bash ?? "/bin/bash",
        "-c",
        script,
        "qvd-usbip-attach",
        String(lport),
        String(port),
        String(dev.devid),
        String(dev.speed),
        join(this.vhci, "attach"),
      ]);
      const sock = await Promise.race([accepted, Bun.sleep(10_000).then(() => undefined)]);
      const done = await r;
      if (!sock || done.status !== 0) {
        sock?.destroy();
        throw new Error(
          `vhci_hcd refused the device: ${done.stderr.trim().split("\n").pop() || `exit ${done.status}`}`,
        );
      }
      sock.setNoDelay(true);
      return sock;
    } finally {
      server.close();
    }
  }
}

/** Reads one line (at most MAX_LINE bytes) from a paused socket; the rest stays for the relay. */
async function readLine(s: Socket, first: Buffer): Promise<{ line: string; rest: Buffer } | undefined> {
  let buf = first;
  const take = () => {
    const nl = buf.indexOf(10);
    return nl < 0 ? undefined : { line: buf.subarray(0, nl).toString("latin1"), rest: buf.subarray(nl + 1) };
  };
  const now = take();
  if (now) return now;
  return await new Promise((res) => {
    const timer = setTimeout(() => finish(undefined), LINE_TIMEOUT_MS);
    const finish = (v: { line: string; rest: Buffer } | undefined) => {
      clearTimeout(timer);
      s.off("data", onData);
      s.off("close", onClose);
      s.pause();
      res(v);
    };
    const onData = (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      const t = take();
      if (t) finish(t);
      else if (buf.length > MAX_LINE) finish(undefined);
    };
    const onClose = () => finish(undefined);
    s.on("data", onData);
    s.on("close", onClose);
    s.resume();
  });
}

/**
 * The udev rule that gives the session's user the device nodes of attached USB devices (the
 * desktop is the user's alone: every vhci_hcd device is theirs). Written at session start.
 */
export function usbUdevRule(uid: number, gid: number): string {
  return (
    `# Written by the qvd VMA: USB devices forwarded from the user's client belong to the desktop's user.\n` +
    `ACTION=="add|change", DEVPATH=="/devices/platform/vhci_hcd.*", OWNER="${uid}", GROUP="${gid}"\n`
  );
}

export const USB_UDEV_RULE_FILE = "/run/udev/rules.d/70-qvd-usb.rules";

/** Installs the rule (and has udev read it); false when udev is not there. */
export async function installUsbUdevRule(
  uid: number,
  gid: number,
  file = USB_UDEV_RULE_FILE,
  udevadm = "udevadm",
): Promise<boolean> {
  try {
    mkdirSync(join(file, ".."), { recursive: true });
    writeFileSync(file, usbUdevRule(uid, gid), { mode: 0o644 });
  } catch (e) {
    log.warn("cannot write the USB udev rule", { file: basename(file), err: (e as Error).message });
    return false;
  }
  const r = await runQuiet([udevadm, "control", "--reload"]);
  return r.status === 0;
}
