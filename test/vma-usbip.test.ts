// USB/IP up to the kernel boundary, on this host (whose kernel has no vhci_hcd or usbip-host; the
// real kernels are in test/kvm.test.ts): the desktop side (src/vma/usbip.ts) through the VMA's
// real socket with a vhci_hcd stand-in in a scratch sysfs directory, so the attach line it writes
// can be read back; and the client side (src/client/usbip.ts) against usbipd stand-ins that
// misbehave. What a desktop user or a hostile client controls is tried: the device line, the
// listener that hands the socket to the kernel, the key.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync, existsSync } from "node:fs";
import { connect, createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { SharesService } from "../src/vma/shares.ts";
import type { ServiceContext } from "../src/vma/services.ts";
import {
  parseDeviceLine,
  parseVhciStatus,
  pickPort,
  tcpSocketUid,
  UsbipAttacher,
  usbUdevRule,
} from "../src/vma/usbip.ts";
import {
  decodeDevice,
  deviceLine,
  encodeDevice,
  header,
  importDevice,
  listExported,
  type ExportedDevice,
} from "../src/client/usbip.ts";
import { waitFor } from "./support/wait.ts";

const isRoot = process.getuid?.() === 0;
const KEY = "Uv7wX9yZ1aB3cD5eF7gH9iJ1kL3mN5oP7qR9sT1uV3wX5yZ7aB9cD1eF3gH5iJ7k";

/** vhci_hcd's status file as Linux 6.1 writes it: 8 high-speed and 8 SuperSpeed ports. */
function vhciStatus(used: Record<number, string> = {}): string {
  const rows = ["hub port sta spd dev      sockfd local_busid"];
  for (let p = 0; p < 16; p++) {
    const hub = p < 8 ? "hs" : "ss";
    rows.push(
      used[p]
        ? `${hub}  ${String(p).padStart(4, "0")} 006 003 00020002 000003 ${used[p]}`
        : `${hub}  ${String(p).padStart(4, "0")} 004 000 00000000 000000 0-0`,
    );
  }
  return rows.join("\n") + "\n";
}

describe("the desktop's checks", () => {
  test("the device line: two numbers, a real bus and device, a speed vhci_hcd takes; anything else is refused", () => {
    expect(parseDeviceLine("65538 3")).toEqual({ devid: 65538, speed: 3 });
    expect(parseDeviceLine("131074 5\r")).toEqual({ devid: 131074, speed: 5 });
    for (const bad of [
      "",
      "65538",
      "65538 4",
      "65538 7",
      "65538 0",
      "2 3",
      "65536 3",
      "4294967296 3",
      "-1 3",
      "65538  3",
      "65538 3 x",
      "65538 3; reboot",
      "0x10002 3",
      "65538\t3",
      " 65538 3",
      "99999999999 3",
    ])
      expect(parseDeviceLine(bad)).toBeUndefined();
  });

  test("vhci_hcd's status: a free port on the right hub (SuperSpeed on ss, the others on hs); none when all are used", () => {
    const ports = parseVhciStatus(vhciStatus({ 0: "3-1" }));
    expect(ports).toHaveLength(16);
    expect(ports[0]).toEqual({ hub: "hs", port: 0, state: 6, busid: "3-1" });
    expect(pickPort(ports, 3)).toBe(1);
    expect(pickPort(ports, 1)).toBe(1);
    expect(pickPort(ports, 5)).toBe(8);
    expect(pickPort(ports, 6)).toBe(8);
    const full = parseVhciStatus(vhciStatus(Object.fromEntries([...Array(8).keys()].map((p) => [p, `3-${p + 1}`]))));
    expect(pickPort(full, 3)).toBeUndefined();
    expect(pickPort(full, 5)).toBe(8);
  });

  test("the udev rule gives the session's user the devices below vhci_hcd, and nothing else", () => {
    const rule = usbUdevRule(1001, 1002);
    expect(rule).toContain('DEVPATH=="/devices/platform/vhci_hcd.*", OWNER="1001", GROUP="1002"');
    expect(rule.split("\n").filter((l) => l && !l.startsWith("#"))).toHaveLength(1);
  });
});

describe.skipIf(!isRoot)("the listener that hands the socket to the kernel takes root's connections only", () => {
  test("/proc/net/tcp names the owner of a connection's socket: root's and another user's", async () => {
    const server = createServer();
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
    const port = (server.address() as { port: number }).port;
    const owners: (number | undefined)[] = [];
    server.on("connection", (s: Socket) => {
      owners.push(tcpSocketUid(readFileSync("/proc/net/tcp", "utf8"), s.remotePort!, port));
      s.destroy();
    });
    try {
      // bash as nobody, then as root: the first is what a desktop user racing the VMA would be.
      for (const argv of [["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"], []]) {
        const p = Bun.spawn([...argv, "bash", "-c", `exec 3<>/dev/tcp/127.0.0.1/${port}; sleep 0.3`]);
        await p.exited;
      }
      await waitFor("both connections", () => owners.length === 2);
      expect(owners).toEqual([65534, 0]);
    } finally {
      server.close();
    }
  });
});

describe.skipIf(!isRoot)("the VMA's socket: a USB device request, then the stream to vhci_hcd's attach", () => {
  const UID = 4243;
  let work: string;
  let runDir: string;
  let platform: string;
  let svc: SharesService;
  let ctx: ServiceContext;
  let attacher: UsbipAttacher;

  const context = (props: Record<string, string>): ServiceContext =>
    ({
      account: { user: "usbuser", uid: UID, gid: UID, home: join(work, "home"), shell: "/bin/sh", groups: [] },
      properties: props,
      display: 100,
      runDir,
      homeOnDisk: join(work, "home"),
      env: { HOME: join(work, "home"), PATH: "/usr/sbin:/usr/bin:/sbin:/bin" },
      runAsUser: () => undefined,
      execAsUser: async () => ({ status: 1, stdout: "", stderr: "" }),
    }) as unknown as ServiceContext;

  /** A request on the socket; the answer line and the socket (open after a 200). */
  async function ask(req: unknown): Promise<{ answer: { status: number; error?: string }; sock: Socket }> {
    return await new Promise((res, rej) => {
      const sock = connect(join(runDir, "slave.sock"));
      let buf = "";
      const onData = (d: Buffer) => {
        buf += d.toString();
        const nl = buf.indexOf("\n");
        if (nl >= 0) {
          sock.off("data", onData);
          res({ answer: JSON.parse(buf.slice(0, nl)), sock });
        }
      };
      sock.on("data", onData);
      sock.on("error", rej);
      sock.write(JSON.stringify(req) + "\n");
    });
  }

  const closed = (s: Socket) => new Promise<void>((r) => (s.destroyed ? r() : s.once("close", () => r())));
  const vhci = () => join(platform, "vhci_hcd.0");

  beforeAll(async () => {
    work = mkdtempSync(join(tmpdir(), "qvd-usbip-"));
    runDir = join(work, "run");
    platform = join(work, "platform");
    mkdirSync(runDir, { mode: 0o711 });
    mkdirSync(platform);
    attacher = new UsbipAttacher({
      platformDir: platform,
      sysUsb: join(work, "sys-bus-usb"),
      modprobe: "/bin/false",
      udevadm: "/bin/true",
      udevRuleFile: join(work, "rules.d", "70-qvd-usb.rules"),
    });
    svc = new SharesService({ enabled: true, qvd: "/usr/bin/true", fuse: false, usbip: attacher });
    ctx = context({ "qvd.slave.key": KEY, "qvd.vm.shares.enable": "0" });
    await svc.prepare(ctx);
  });
  afterAll(async () => {
    await svc?.stopped(ctx);
    rmSync(work, { recursive: true, force: true });
  });

  test("prepare: a KVM desktop's wrapper offers USB (no --usb-unavailable), the socket listens for it with shares off, and the udev rule names the user", () => {
    const wrapper = readFileSync(join(runDir, "qvd-slave"), "utf8");
    expect(wrapper).toContain("--no-shares");
    expect(wrapper).not.toContain("--usb-unavailable");
    expect(existsSync(join(runDir, "slave.sock"))).toBe(true);
    expect(readFileSync(join(work, "rules.d", "70-qvd-usb.rules"), "utf8")).toContain(`OWNER="${UID}", GROUP="${UID}"`);
  });

  test("a wrong key: 401; no vhci_hcd (and modprobe cannot load it): 501 naming the driver", async () => {
    expect((await ask({ key: "x".repeat(64), usbip: true })).answer.status).toBe(401);
    const r = await ask({ key: KEY, usbip: true });
    expect(r.answer).toEqual({ status: 501, error: "the desktop's kernel has no vhci_hcd driver" });
  });

  test("a SuperSpeed device goes to a free ss port, a high-speed one to an hs port: the attach line carries a socket descriptor, the devid and the speed", async () => {
    mkdirSync(vhci(), { recursive: true });
    writeFileSync(join(vhci(), "status"), vhciStatus({ 0: "3-1" }));
    for (const [line, expected] of [
      ["131074 5\n", "8 3 131074 5\n"],
      ["65539 3\n", "1 3 65539 3\n"],
    ] as const) {
      writeFileSync(join(vhci(), "attach"), "");
      const { answer, sock } = await ask({ key: KEY, usbip: true });
      expect(answer).toEqual({ status: 200 });
      sock.write(line + "URB bytes");
      // The stand-in is a plain file: bash writes its line and exits, its descriptor closes,
      // and the relay ends (a real vhci_hcd keeps the socket).
      await closed(sock);
      expect(readFileSync(join(vhci(), "attach"), "utf8")).toBe(expected);
    }
  });

  test("a line that is not a device, or none: nothing written to attach, the stream closed", async () => {
    for (const bad of ["131074 4\n", "1 3; echo 0 > /proc/sysrq-trigger\n", "x".repeat(100)]) {
      writeFileSync(join(vhci(), "attach"), "");
      const { answer, sock } = await ask({ key: KEY, usbip: true });
      expect(answer.status).toBe(200);
      sock.write(bad);
      await closed(sock);
      expect(readFileSync(join(vhci(), "attach"), "utf8")).toBe("");
    }
  }, 30_000);

  test("no free port of the device's kind: nothing attached", async () => {
    writeFileSync(
      join(vhci(), "status"),
      vhciStatus(Object.fromEntries([...Array(8).keys()].map((p) => [p, `3-${p + 1}`]))),
    );
    writeFileSync(join(vhci(), "attach"), "");
    const { sock } = await ask({ key: KEY, usbip: true });
    sock.write("65539 3\n");
    await closed(sock);
    expect(readFileSync(join(vhci(), "attach"), "utf8")).toBe("");
  });

  test("at most maxDevices at a time: 503", async () => {
    const none = new UsbipAttacher({ platformDir: platform, maxDevices: 0 });
    expect(await none.refusal()).toEqual({ status: 503, error: "at most 0 USB devices at a time" });
  });

  test("qvd.vm.usb.enable=off: the socket refuses USB with 403 (shares on, so it still listens)", async () => {
    const c2 = context({ "qvd.slave.key": KEY, "qvd.vm.usb.enable": "off" });
    const other = new SharesService({ enabled: true, qvd: "/usr/bin/true", fuse: false, usbip: attacher });
    const saved = runDir;
    runDir = join(work, "run2");
    mkdirSync(runDir, { mode: 0o711 });
    try {
      await other.prepare({ ...c2, runDir });
      expect(readFileSync(join(runDir, "qvd-slave"), "utf8")).toContain("--no-usb");
      expect((await ask({ key: KEY, usbip: true })).answer.status).toBe(403);
    } finally {
      await other.stopped({ ...c2, runDir });
      runDir = saved;
    }
  });
});

describe("the client's side: usbipd's protocol, and usbipd stand-ins that misbehave", () => {
  const stick: ExportedDevice = {
    path: "/sys/devices/pci0000:00/0000:00:03.0/usb2/2-1",
    busid: "2-1",
    busnum: 2,
    devnum: 2,
    speed: 5,
    idVendor: 0x46f4,
    idProduct: 0x0001,
  };
  let server: Server;
  let port = 0;
  let behave: (s: Socket, req: Buffer) => unknown = () => undefined;

  beforeAll(async () => {
    server = createServer((s) => {
      let buf = Buffer.alloc(0);
      s.on("data", (d: Buffer) => {
        buf = Buffer.concat([buf, d]);
        const code = buf.length >= 8 ? buf.readUInt16BE(2) : 0;
        if (code === 0x8005 || (code === 0x8003 && buf.length >= 40)) behave(s, buf);
      });
      s.on("error", () => undefined);
    });
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
    port = (server.address() as { port: number }).port;
  });
  afterAll(() => server.close());
  const addr = () => ({ host: "127.0.0.1", port });

  test("a device record survives encoding; the device line is the original client's (busnum << 16 | devnum, speed)", () => {
    expect(decodeDevice(encodeDevice(stick))).toEqual(stick);
    expect(deviceLine(stick)).toBe("131074 5\n");
    expect(deviceLine({ ...stick, busnum: 65535, devnum: 65535 })).toBe("4294967295 5\n");
  });

  test("the list and the import, as usbipd answers them; what follows the import stays for the relay", async () => {
    behave = (s, req) => {
      if (req.readUInt16BE(2) === 0x8005) {
        const n = Buffer.alloc(4);
        n.writeUInt32BE(1);
        s.end(
          Buffer.concat([header(0x0005), n, encodeDevice(stick, { bNumInterfaces: 1 }), Buffer.from([8, 6, 80, 0])]),
        );
      } else {
        expect(req.subarray(8, 40).toString("latin1").replace(/\0+$/, "")).toBe("2-1");
        s.write(Buffer.concat([header(0x0003), encodeDevice(stick), Buffer.from("first URB")]));
      }
    };
    expect(await listExported(addr())).toEqual([stick]);
    const imp = await importDevice(addr(), "2-1");
    expect(imp.device).toEqual(stick);
    expect(imp.rest.toString()).toBe("first URB");
    imp.sock.destroy();
  });

  const hostile: [string, (s: Socket, req: Buffer) => unknown, RegExp][] = [
    ["another protocol's answer", (s) => s.end("HTTP/1.1 200 OK\r\n\r\n"), /unexpected message/],
    [
      "a list of a million devices",
      (s) => {
        const n = Buffer.alloc(4);
        n.writeUInt32BE(1_000_000);
        s.end(Buffer.concat([header(0x0005), n]));
      },
      /announced 1000000 devices/,
    ],
    [
      "a device with 200 interfaces",
      (s) => {
        const n = Buffer.alloc(4);
        n.writeUInt32BE(1);
        s.end(Buffer.concat([header(0x0005), n, encodeDevice(stick, { bNumInterfaces: 200 })]));
      },
      /200 interfaces/,
    ],
    [
      "a record cut short",
      (s) => {
        const n = Buffer.alloc(4);
        n.writeUInt32BE(1);
        s.end(Buffer.concat([header(0x0005), n, Buffer.alloc(100)]));
      },
      /closed the connection/,
    ],
    ["no answer at all", () => undefined, /did not answer in time/],
    ["a refusal", (s) => s.end(header(0x0005, 1)), /refused to list/],
  ];
  for (const [what, f, err] of hostile) {
    test(`listing: ${what} → a clear error`, async () => {
      behave = f;
      await expect(listExported(addr(), 1500)).rejects.toThrow(err);
    });
  }

  test("import: a refusal, and another device than asked for, are errors that name the bus id", async () => {
    behave = (s) => s.end(header(0x0003, 1));
    await expect(importDevice(addr(), "2-1")).rejects.toThrow(
      "usbipd refused to export 2-1 (status 1: not bound to usbip-host, or in use)",
    );
    behave = (s) => s.end(Buffer.concat([header(0x0003), encodeDevice({ ...stick, busid: "1-9" })]));
    await expect(importDevice(addr(), "2-1")).rejects.toThrow("usbipd exported 1-9 instead of 2-1");
  });

  test("no usbipd: the error says how to start one", async () => {
    const s = createServer();
    await new Promise<void>((r) => s.listen(0, "127.0.0.1", () => r()));
    const free = (s.address() as { port: number }).port;
    await new Promise<void>((r) => s.close(() => r()));
    await expect(listExported({ host: "127.0.0.1", port: free })).rejects.toThrow(
      `no usbipd on 127.0.0.1:${free} (start it as root: usbipd -D)`,
    );
  });
});
