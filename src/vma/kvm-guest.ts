// `qvd vma --kvm-guest`: what the VMA does first inside a KVM desktop (src/virt/kvm.ts starts
// it; the image's qvd-vma.service runs it). An LXC guest gets all of this from LXC; a VM gets
// it from the node through QEMU's fw_cfg file `opt/org.qvd/vma.json`, readable by the guest's
// root only, and does it itself:
//   - /run/qvd/vma.json (0400), the file the VMA reads as in a container;
//   - the network: the interface with the VM's MAC gets its address and the default route;
//   - the home disk (serial qvd-home), when the OSF has one: formatted at its first use, grown
//     to the disk's size, mounted on /home (nodev, nosuid).
import { chmodSync, existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { z } from "zod";
import { ConfigError, UserError } from "../errors.ts";
import { logger } from "../log.ts";
import { run } from "../run.ts";

const log = logger("vma.kvm");

export const FW_CFG_FILE = "/sys/firmware/qemu_fw_cfg/by_name/opt/org.qvd/vma.json/raw";
export const HOME_DISK = "/dev/disk/by-id/virtio-qvd-home";

const ipv4 = z.string().regex(/^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/, "expected an IPv4 address");
export const kvmSchema = z.object({
  ip: ipv4,
  prefix: z.number().int().min(1).max(32),
  gateway: ipv4,
  mac: z.string().regex(/^([0-9a-f]{2}:){5}[0-9a-f]{2}$/i, "expected a MAC address"),
  home: z.boolean(),
});
export type KvmGuest = z.infer<typeof kvmSchema>;

async function waitFor(path: string, ms: number): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (!existsSync(path)) {
    if (Date.now() > deadline) return false;
    await Bun.sleep(100);
  }
  return true;
}

/** The interface whose MAC is `mac` (case-insensitive). */
export function interfaceWithMac(mac: string, sysClassNet = "/sys/class/net"): string | undefined {
  for (const n of readdirSync(sysClassNet)) {
    try {
      if (
        readFileSync(join(sysClassNet, n, "address"), "utf8")
          .trim()
          .toLowerCase() === mac.toLowerCase()
      )
        return n;
    } catch {}
  }
  return undefined;
}

/** Reads the node's file from fw_cfg and writes it where the VMA reads it; returns its `kvm` part. */
export async function kvmGuestSetup(o: { vmaFile: string; fwCfg?: string }): Promise<KvmGuest> {
  const src = o.fwCfg ?? FW_CFG_FILE;
  if (!existsSync(src)) await run(["modprobe", "qemu_fw_cfg"], { allowFail: true });
  if (!(await waitFor(src, 10_000)))
    throw new ConfigError(
      `${src} is missing: this VM was not started by a qvd node (no fw_cfg ${"opt/org.qvd/vma.json"})`,
    );
  const text = readFileSync(src, "utf8");
  let raw: { kvm?: unknown };
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new ConfigError(`${src}: not JSON: ${(err as Error).message}`);
  }
  const k = kvmSchema.safeParse(raw.kvm);
  if (!k.success)
    throw new ConfigError(`${src}: kvm.${k.error.issues[0]!.path.join(".")}: ${k.error.issues[0]!.message}`);
  await runDirMount(join(o.vmaFile, ".."));
  writeFileSync(o.vmaFile, text, { mode: 0o400 });
  chmodSync(o.vmaFile, 0o400);
  await setupNetwork(k.data);
  if (k.data.home) await setupHome();
  return k.data;
}

/** True when `dir` is itself a mount point (/proc/self/mountinfo's fifth field). */
export function isMountPoint(mountinfo: string, dir: string): boolean {
  return mountinfo.split("\n").some((l) => l.split(" ")[4]?.replace(/\\040/g, " ") === dir);
}

/**
 * The VMA's run directory on a tmpfs of its own: Debian's initramfs mounts /run noexec, and
 * nxagent execs the slave channel's handler (a wrapper the VMA writes there, src/vma/shares.ts).
 * Mounted once per boot (the VMA may restart).
 */
async function runDirMount(dir: string): Promise<void> {
  mkdirSync(dir, { recursive: true, mode: 0o755 });
  if (isMountPoint(readFileSync("/proc/self/mountinfo", "utf8"), dir)) return;
  const r = await run(["mount", "-t", "tmpfs", "-o", "nosuid,nodev,mode=0755,size=64m", "qvd-run", dir], {
    allowFail: true,
  });
  if (r.status !== 0)
    log.warn("the run directory stays on /run (noexec there: no slave channel)", { dir, err: r.stderr.trim() });
}

async function setupNetwork(k: KvmGuest): Promise<void> {
  let ifname: string | undefined;
  const deadline = Date.now() + 10_000;
  while (!(ifname = interfaceWithMac(k.mac)) && Date.now() < deadline) await Bun.sleep(100);
  if (!ifname) throw new UserError(`no network interface has the VM's MAC ${k.mac}`);
  await run(["ip", "link", "set", "dev", "lo", "up"]);
  await run(["ip", "link", "set", "dev", ifname, "up"]);
  await run(["ip", "address", "replace", `${k.ip}/${k.prefix}`, "dev", ifname]);
  await run(["ip", "route", "replace", "default", "via", k.gateway, "dev", ifname]);
  log.info("network up", { interface: ifname, address: `${k.ip}/${k.prefix}`, gateway: k.gateway });
}

async function setupHome(): Promise<void> {
  if (!(await waitFor(HOME_DISK, 10_000))) throw new UserError(`the home disk ${HOME_DISK} is missing`);
  const mounted = readFileSync("/proc/self/mounts", "utf8")
    .split("\n")
    .some((l) => l.split(" ")[1] === "/home");
  if (mounted) return;
  const type = (await run(["blkid", "-p", "-o", "value", "-s", "TYPE", HOME_DISK], { allowFail: true })).stdout.trim();
  if (!type) {
    // A new disk: no filesystem, no partition table (blkid -p finds either).
    log.info("formatting the new home disk");
    await run(["mkfs.ext4", "-q", "-L", "qvd-home", "-m", "0", HOME_DISK]);
  } else if (type !== "ext4") {
    throw new UserError(`the home disk holds ${type}, not ext4: not mounted`);
  } else {
    // The OSF's user_storage_mb may have grown the disk since.
    await run(["e2fsck", "-p", HOME_DISK], { allowFail: true });
    await run(["resize2fs", HOME_DISK], { allowFail: true });
  }
  mkdirSync("/home", { recursive: true });
  await run(["mount", "-t", "ext4", "-o", "nodev,nosuid", HOME_DISK, "/home"]);
  log.info("home disk mounted on /home");
}
