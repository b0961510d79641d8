// A user's machine with a USB device, for `qvd client --usb`: this host's kernel has neither USB
// nor usbip-host, so a small QEMU VM (the KVM test image's kernel and root, read-only) stands for
// the user's machine. It has a USB stick (QEMU's usb-storage on an xHCI controller,
// holding a partition table the test knows, bus id 2-1), loads usbip-host, binds the stick and runs usbipd.
// QEMU's user-mode network forwards 127.0.0.1:3240 of the network namespace it runs in to that
// usbipd, where `qvd client` looks for it. That network is QEMU's own (198.18.250.0/24, restricted):
// nothing leaves the process.
//
// The VM boots straight into its script (init=/bin/sh), which prints its progress on the console.
import { spawn } from "node:child_process";
import { closeSync, openSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { waitFor } from "./wait.ts";

/** Written on the machine's console once the stick is exported. */
/** QEMU's usb-storage is a SuperSpeed device: on the xHCI's USB 3 bus (2), port 1. */
export const STICK_BUSID = "2-1";
export const EXPORTED = `QVDTEST-USB: exported ${STICK_BUSID}`;
export const STICK_BYTES = 4 * 1048576;
export const PARTITION_BYTES = 2 * 1048576;

// PID 1 of the machine (init=/bin/sh): no systemd, no udev; what it needs it loads itself.
const SCRIPT = `mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev 2>/dev/null
exec >/dev/ttyS0 2>&1
say() { echo "QVDTEST-USB: $*"; }
say "the user's machine is up"
for m in virtio_net xhci_pci usb_storage sd_mod usbip-host; do modprobe $m || say "no module $m"; done
ip link set lo up
for i in /sys/class/net/*; do n=\${i##*/}; [ "$n" = lo ] && continue; ip addr add 198.18.250.15/24 dev "$n"; ip link set "$n" up; done
i=0; until [ -e /sys/bus/usb/devices/${STICK_BUSID} ] || [ $i -ge 120 ]; do sleep 1; i=$((i+1)); done
usbip bind -b ${STICK_BUSID} || say "bind failed"
usbipd -4 -D
# Exported once usbipd listens (3240 = 0x0CA8, state 0A: listening).
i=0; until grep -q ':0CA8 00000000:0000 0A' /proc/net/tcp || [ $i -ge 60 ]; do sleep 0.5; i=$((i+1)); done
say "exported ${STICK_BUSID}"
while :; do sleep 3600; done
`;

/** The stick: an MBR with one Linux partition of PARTITION_BYTES at sector 2048, and a pattern in it. */
function mbrDisk(): Buffer {
  const disk = Buffer.alloc(STICK_BYTES);
  const e = 446;
  disk[e + 4] = 0x83;
  disk.writeUInt32LE(2048, e + 8);
  disk.writeUInt32LE(PARTITION_BYTES / 512, e + 12);
  disk[510] = 0x55;
  disk[511] = 0xaa;
  disk.write("QVD USB test stick\n", 2048 * 512, "latin1");
  return disk;
}

export interface UsbMachine {
  console: () => string;
  stop: () => Promise<void>;
  pid: number;
}

/** Boots the machine in the namespace of `nsExec` and waits until its stick is exported. */
export async function startUsbMachine(o: {
  dir: string;
  image: string;
  kernel: string;
  initrd: string;
  nsExec: string[];
  timeoutMs?: number;
}): Promise<UsbMachine> {
  const stick = join(o.dir, "usb-stick.raw");
  const script = join(o.dir, "usb-machine.sh");
  const consoleFile = join(o.dir, "usb-machine.console.log");
  writeFileSync(stick, mbrDisk());
  // The script is read by sh straight from the disk: newlines pad it to a whole block.
  writeFileSync(script, SCRIPT + "\n".repeat(4096 - SCRIPT.length));
  writeFileSync(consoleFile, "");
  const argv = [
    ...o.nsExec,
    "qemu-system-x86_64",
    "-machine",
    "q35",
    "-accel",
    "tcg,tb-size=64",
    "-cpu",
    "max",
    "-m",
    "384",
    "-smp",
    "1",
    "-nodefaults",
    "-no-user-config",
    "-display",
    "none",
    "-kernel",
    o.kernel,
    "-initrd",
    o.initrd,
    "-append",
    "root=/dev/vda ro console=ttyS0 init=/bin/sh -- /dev/vdb",
    "-drive",
    `file=${o.image},format=qcow2,if=none,id=root,snapshot=on`,
    "-device",
    "virtio-blk-pci,drive=root",
    "-drive",
    `file=${script},format=raw,if=none,id=script,readonly=on`,
    "-device",
    "virtio-blk-pci,drive=script",
    "-device",
    "qemu-xhci,id=xhci",
    "-drive",
    `file=${stick},format=raw,if=none,id=stick`,
    "-device",
    "usb-storage,bus=xhci.0,port=1,drive=stick",
    "-netdev",
    "user,id=n0,net=198.18.250.0/24,host=198.18.250.2,dns=198.18.250.3,restrict=on,hostfwd=tcp:127.0.0.1:3240-198.18.250.15:3240",
    "-device",
    "virtio-net-pci,netdev=n0",
    "-chardev",
    `file,id=console,path=${consoleFile}`,
    "-serial",
    "chardev:console",
  ];
  const out = openSync(join(o.dir, "usb-machine.qemu.log"), "w");
  const child = spawn(argv[0]!, argv.slice(1), { stdio: ["ignore", out, out] });
  closeSync(out);
  let exited = false;
  child.on("exit", () => (exited = true));
  const consoleText = () => readFileSync(consoleFile, "utf8");
  const stop = async () => {
    if (!exited) child.kill("SIGKILL");
    await new Promise((r) => (exited ? r(undefined) : child.once("exit", r)));
  };
  try {
    await waitFor(
      "the user's machine to export its USB stick",
      () => exited || consoleText().includes(EXPORTED),
      o.timeoutMs ?? 300_000,
      500,
    );
    if (exited)
      throw new Error(
        `the user's machine's QEMU exited: ${readFileSync(join(o.dir, "usb-machine.qemu.log"), "utf8").slice(-1000)}`,
      );
  } catch (e) {
    await stop();
    throw new Error(`${(e as Error).message}\nits console: ${consoleText().slice(-3000)}`);
  }
  return { console: consoleText, stop, pid: child.pid! };
}
