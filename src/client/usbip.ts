// USB devices from the user's machine to the desktop (`qvd client --usb BUSID`), over USB/IP.
//
// The user's machine exports the device with the kernel's usbip-host and usbipd (both root's:
// `usbip bind -b BUSID`, `usbipd -D`; the client binds by itself when it runs as root). The client
// then needs no privilege: it imports the device from usbipd on 127.0.0.1:3240 like a remote
// `usbip attach` would (usbipd hands that TCP connection to usbip-host), asks the desktop for
// `POST /usbip` on the slave channel, sends the original QVD's device line "<devid> <speed>\n"
// and relays the two streams. The desktop's VMA attaches the device to its kernel (src/vma/usbip.ts).
//
// The wire format of usbipd (Linux's Documentation/usb/usbip_protocol.rst): big-endian, a
// common header (version 0x0111, code, status), then the device records of 312 bytes.
import net from "node:net";
import { SlaveError } from "./slave.ts";

export const USBIP_VERSION = 0x0111;
const OP_REQ_DEVLIST = 0x8005;
const OP_REP_DEVLIST = 0x0005;
const OP_REQ_IMPORT = 0x8003;
const OP_REP_IMPORT = 0x0003;
/** struct usbip_usb_device: path[256] busid[32] busnum devnum speed (u32) idVendor idProduct bcdDevice (u16) six u8. */
export const DEVICE_BYTES = 312;
const INTERFACE_BYTES = 4;
/** Bounds on what a usbipd may announce (a list is read whole). */
const MAX_DEVICES = 256;
const MAX_INTERFACES = 32;

export interface UsbipdAddress {
  host: string;
  port: number;
}

export const DEFAULT_USBIPD: UsbipdAddress = { host: "127.0.0.1", port: 3240 };

export interface ExportedDevice {
  path: string;
  busid: string;
  busnum: number;
  devnum: number;
  speed: number;
  idVendor: number;
  idProduct: number;
}

const hex4 = (n: number) => n.toString(16).padStart(4, "0");
export const deviceId = (d: ExportedDevice) => `${hex4(d.idVendor)}:${hex4(d.idProduct)}`;
/** The line the desktop's VMA reads after the 101 (the original QVD client's export data). */
export const deviceLine = (d: ExportedDevice) => `${((d.busnum << 16) | d.devnum) >>> 0} ${d.speed}\n`;

function cString(b: Buffer): string {
  const end = b.indexOf(0);
  return b
    .subarray(0, end < 0 ? b.length : end)
    .toString("latin1")
    .replace(/[^\x20-\x7e]/g, "?");
}

/** Decodes one struct usbip_usb_device. */
export function decodeDevice(b: Buffer): ExportedDevice {
  if (b.length < DEVICE_BYTES) throw new SlaveError("usbipd sent a short device record");
  return {
    path: cString(b.subarray(0, 256)),
    busid: cString(b.subarray(256, 288)),
    busnum: b.readUInt32BE(288),
    devnum: b.readUInt32BE(292),
    speed: b.readUInt32BE(296),
    idVendor: b.readUInt16BE(300),
    idProduct: b.readUInt16BE(302),
  };
}

/** Encodes a struct usbip_usb_device (tests stand up a usbipd with it). */
export function encodeDevice(d: ExportedDevice, extra: { bNumInterfaces?: number } = {}): Buffer {
  const b = Buffer.alloc(DEVICE_BYTES);
  b.write(d.path.slice(0, 255), 0, "latin1");
  b.write(d.busid.slice(0, 31), 256, "latin1");
  b.writeUInt32BE(d.busnum, 288);
  b.writeUInt32BE(d.devnum, 292);
  b.writeUInt32BE(d.speed, 296);
  b.writeUInt16BE(d.idVendor, 300);
  b.writeUInt16BE(d.idProduct, 302);
  b.writeUInt8(extra.bNumInterfaces ?? 0, 311);
  return b;
}

export function header(code: number, status = 0): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt16BE(USBIP_VERSION, 0);
  b.writeUInt16BE(code, 2);
  b.writeUInt32BE(status, 4);
  return b;
}

/** Reads exact byte counts from a socket, with one deadline for the whole exchange. */
class Exact {
  private buf = Buffer.alloc(0);
  private waiter: (() => void) | undefined;
  private closed = false;

  constructor(
    readonly sock: net.Socket,
    private readonly deadline: number,
    private readonly what: string,
  ) {
    sock.on("data", (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.waiter?.();
    });
    sock.on("close", () => {
      this.closed = true;
      this.waiter?.();
    });
    sock.on("error", () => undefined);
  }

  async take(n: number): Promise<Buffer> {
    while (this.buf.length < n) {
      if (this.closed) throw new SlaveError(`${this.what} closed the connection`);
      const left = this.deadline - Date.now();
      if (left <= 0) throw new SlaveError(`${this.what} did not answer in time`);
      await new Promise<void>((res) => {
        const t = setTimeout(res, left);
        this.waiter = () => {
          clearTimeout(t);
          res();
        };
      });
      this.waiter = undefined;
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  /** Stops reading; what was read past the last take. */
  release(): Buffer {
    this.sock.removeAllListeners("data");
    this.sock.removeAllListeners("close");
    this.sock.pause();
    return this.buf;
  }
}

function connectUsbipd(a: UsbipdAddress, timeoutMs: number): Promise<net.Socket> {
  return new Promise((res, rej) => {
    const s = net.connect(a.port, a.host);
    const t = setTimeout(() => {
      s.destroy();
      rej(new SlaveError(`usbipd on ${a.host}:${a.port} did not answer`));
    }, timeoutMs);
    s.once("connect", () => {
      clearTimeout(t);
      s.setNoDelay(true);
      res(s);
    });
    s.once("error", (e: NodeJS.ErrnoException) => {
      clearTimeout(t);
      rej(
        new SlaveError(
          e.code === "ECONNREFUSED"
            ? `no usbipd on ${a.host}:${a.port} (start it as root: usbipd -D)`
            : `cannot reach usbipd on ${a.host}:${a.port}: ${e.message}`,
        ),
      );
    });
  });
}

async function expectHeader(r: Exact, code: number): Promise<number> {
  const h = await r.take(8);
  if (h.readUInt16BE(2) !== code) throw new SlaveError("usbipd answered with an unexpected message (is it usbipd?)");
  return h.readUInt32BE(4);
}

/** The devices usbipd exports (OP_REQ_DEVLIST). */
export async function listExported(a: UsbipdAddress = DEFAULT_USBIPD, timeoutMs = 5000): Promise<ExportedDevice[]> {
  const sock = await connectUsbipd(a, timeoutMs);
  try {
    const r = new Exact(sock, Date.now() + timeoutMs, "usbipd");
    sock.write(header(OP_REQ_DEVLIST));
    const status = await expectHeader(r, OP_REP_DEVLIST);
    if (status !== 0) throw new SlaveError(`usbipd refused to list its devices (status ${status})`);
    const n = (await r.take(4)).readUInt32BE(0);
    if (n > MAX_DEVICES) throw new SlaveError(`usbipd announced ${n} devices`);
    const out: ExportedDevice[] = [];
    for (let i = 0; i < n; i++) {
      const raw = await r.take(DEVICE_BYTES);
      const ifaces = raw.readUInt8(311);
      if (ifaces > MAX_INTERFACES) throw new SlaveError(`usbipd announced a device with ${ifaces} interfaces`);
      await r.take(ifaces * INTERFACE_BYTES);
      out.push(decodeDevice(raw));
    }
    return out;
  } finally {
    sock.destroy();
  }
}

/**
 * Imports a device (OP_REQ_IMPORT): on success usbipd has handed the connection to the kernel's
 * usbip-host, and what follows on it is the device's USB/IP traffic.
 */
export async function importDevice(
  a: UsbipdAddress,
  busid: string,
  timeoutMs = 10_000,
): Promise<{ sock: net.Socket; device: ExportedDevice; rest: Buffer }> {
  const sock = await connectUsbipd(a, timeoutMs);
  try {
    const r = new Exact(sock, Date.now() + timeoutMs, "usbipd");
    const req = Buffer.alloc(32);
    req.write(busid, 0, "latin1");
    sock.write(Buffer.concat([header(OP_REQ_IMPORT), req]));
    const status = await expectHeader(r, OP_REP_IMPORT);
    if (status !== 0)
      throw new SlaveError(`usbipd refused to export ${busid} (status ${status}: not bound to usbip-host, or in use)`);
    const device = decodeDevice(await r.take(DEVICE_BYTES));
    if (device.busid !== busid) throw new SlaveError(`usbipd exported ${device.busid} instead of ${busid}`);
    return { sock, device, rest: r.release() };
  } catch (e) {
    sock.destroy();
    throw e;
  }
}

export interface UsbForward {
  busid: string;
  device: ExportedDevice;
  /** Resolves when the relay ends: `attached` is false when the desktop never answered a byte (it did not attach the device). */
  ended: Promise<{ attached: boolean }>;
  stop(): void;
}

/**
 * Relays a device's USB/IP stream between usbipd's connection and the desktop's (after the 101):
 * the device line first, then bytes both ways until either side ends.
 */
export function relayDevice(
  busid: string,
  imported: { sock: net.Socket; device: ExportedDevice; rest: Buffer },
  desktop: net.Socket,
  desktopRest: Buffer,
): UsbForward {
  const dev = imported.sock;
  let fromDesktop = desktopRest.length;
  const ended = new Promise<{ attached: boolean }>((res) => {
    let done = false;
    const end = () => {
      if (done) return;
      done = true;
      dev.destroy();
      desktop.destroy();
      res({ attached: fromDesktop > 0 });
    };
    dev.on("close", end);
    desktop.on("close", end);
    dev.on("error", end);
    desktop.on("error", end);
  });
  desktop.write(deviceLine(imported.device));
  if (imported.rest.length) desktop.write(imported.rest);
  if (desktopRest.length) dev.write(desktopRest);
  desktop.on("data", (d: Buffer) => {
    fromDesktop += d.length;
  });
  desktop.pipe(dev);
  dev.pipe(desktop);
  desktop.resume();
  dev.resume();
  return {
    busid,
    device: imported.device,
    ended,
    stop: () => {
      dev.destroy();
      desktop.destroy();
    },
  };
}
