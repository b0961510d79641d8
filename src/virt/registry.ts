// The node's backends: which of LXC and KVM it runs (vm.hypervisor), each probed first, behind
// one Backend that the HKD drives. The network (bridge, firewall) is the node's and built here
// once; both backends attach their VMs to it the same way.
//
// A probe says whether a driver can run here and why not (like Incus's driver statuses): a
// configured backend that cannot run is left out with a warning, and the node refuses to start
// when none is left. KVM's probe also settles the accelerator (vm.kvm.accel): `auto` tries a
// short real run under /dev/kvm (SeaBIOS must print within a few seconds) and falls back to tcg,
// saying why; the node writes that into its hosts row (host_runtimes.hypervisor_notes).
import { existsSync, rmSync } from "node:fs";
import { spawn } from "node:child_process";
import { join } from "node:path";
import { tmpdir } from "node:os";
import type { Config } from "../config.ts";
import { UserError } from "../errors.ts";
import { logger } from "../log.ts";
import { HYPERVISORS, type Backend, type BackendState, type Hypervisor, type VmSpec } from "./backend.ts";
import { type Accel, KvmBackend } from "./kvm.ts";
import { LxcBackend, lxcOptionsFromConfig } from "./lxc.ts";
import { type NodeNetwork, nodeNetworkFromConfig } from "./network.ts";

const log = logger("backends");

export interface DriverStatus {
  kind: Hypervisor;
  available: boolean;
  /** Why not, or what was chosen (KVM: the accelerator and why). */
  reason: string;
  accel?: Accel;
}

/** The backends vm.hypervisor asks for, in order, without repeats. */
export function configuredHypervisors(cfg: Pick<Config, "get">): Hypervisor[] {
  const kinds = cfg
    .get("vm.hypervisor")
    .split(",")
    .map((s) => s.trim())
    .filter(Boolean) as Hypervisor[];
  return [...new Set(kinds)].filter((k) => (HYPERVISORS as readonly string[]).includes(k));
}

const which = (prog: string) => Bun.which(prog, { PATH: `${process.env.PATH ?? ""}:/usr/sbin:/sbin` });

export async function probeLxc(): Promise<DriverStatus> {
  const missing = ["lxc-start", "lxc-stop", "lxc-info", "lxc-usernsexec", "nsenter", "nft"].filter((p) => !which(p));
  if (missing.length)
    return {
      kind: "lxc",
      available: false,
      reason: `missing ${missing.join(", ")} (apt-get install lxc nftables util-linux)`,
    };
  return { kind: "lxc", available: true, reason: "lxc tools found" };
}

/**
 * Whether KVM acceleration really works: a VM with SeaBIOS under -accel kvm must write its
 * banner to the debug port within `timeoutMs`. /dev/kvm can exist and still hang (nested
 * virtualisation without support): only running guest code tells.
 */
export async function kvmWorks(qemu: string, timeoutMs = 8000): Promise<{ ok: boolean; why: string }> {
  if (!existsSync("/dev/kvm")) return { ok: false, why: "/dev/kvm does not exist" };
  const out = join(tmpdir(), `qvd-kvm-probe-${process.pid}-${Date.now()}.log`);
  const child = spawn(
    qemu,
    [
      "-accel",
      "kvm",
      "-machine",
      "pc",
      "-nodefaults",
      "-display",
      "none",
      "-no-reboot",
      "-m",
      "32",
      "-debugcon",
      `file:${out}`,
      "-global",
      "isa-debugcon.iobase=0x402",
      "-serial",
      "none",
      "-monitor",
      "none",
    ],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  let stderr = "";
  child.stderr!.on("data", (d) => (stderr += d.toString()));
  let exited = false;
  child.on("exit", () => (exited = true));
  child.on("error", () => (exited = true));
  const deadline = Date.now() + timeoutMs;
  let printed = false;
  try {
    while (Date.now() < deadline && !exited) {
      try {
        printed = (await Bun.file(out).text()).includes("SeaBIOS");
      } catch {}
      if (printed) break;
      await Bun.sleep(100);
    }
  } finally {
    if (!exited) child.kill("SIGKILL");
    rmSync(out, { force: true });
  }
  if (printed) return { ok: true, why: "a test VM ran under /dev/kvm" };
  if (exited)
    return { ok: false, why: `QEMU could not use /dev/kvm: ${stderr.trim().split("\n").pop() ?? "it exited"}` };
  return {
    ok: false,
    why: `a test VM under /dev/kvm ran no code within ${Math.round(timeoutMs / 1000)} s (KVM hangs here)`,
  };
}

export async function probeKvm(cfg: Pick<Config, "get">): Promise<DriverStatus> {
  const tools = [cfg.get("vm.kvm.qemu"), cfg.get("vm.kvm.qemu_img"), "mkfs.ext4", "ip", "bridge"];
  const missing = tools.filter((p) => !which(p));
  if (missing.length)
    return {
      kind: "kvm",
      available: false,
      reason: `missing ${missing.join(", ")} (apt-get install qemu-system-x86 qemu-utils e2fsprogs iproute2)`,
    };
  if (!existsSync("/dev/net/tun"))
    return { kind: "kvm", available: false, reason: "/dev/net/tun is missing (the tun module): VMs get no network" };
  const wanted = cfg.get("vm.kvm.accel");
  if (wanted === "tcg")
    return {
      kind: "kvm",
      available: true,
      accel: "tcg",
      reason: "tcg (vm.kvm.accel = tcg): software emulation, several times slower than kvm",
    };
  const probe = await kvmWorks(which(cfg.get("vm.kvm.qemu"))!);
  if (probe.ok) return { kind: "kvm", available: true, accel: "kvm", reason: `kvm: ${probe.why}` };
  if (wanted === "kvm") return { kind: "kvm", available: false, reason: `vm.kvm.accel = kvm, but ${probe.why}` };
  return {
    kind: "kvm",
    available: true,
    accel: "tcg",
    reason: `tcg: ${probe.why} (vm.kvm.accel = auto falls back to software emulation, several times slower)`,
  };
}

/**
 * Several backends as one: a VM goes to its spec's backend, and the node remembers which one
 * has it. After a restart, a VM it does not know is looked up in each backend's running VMs and
 * leftovers (`kvm` keeps a directory per VM, `lxc` a container configuration and a veth).
 */
export class NodeBackends implements Backend {
  readonly kind: Hypervisor;
  private readonly owner = new Map<number, Hypervisor>();

  constructor(readonly backends: Map<Hypervisor, Backend>) {
    const first = [...backends.keys()][0];
    if (!first) throw new UserError("no desktop backend can run on this node");
    this.kind = first;
  }

  get hypervisors(): Hypervisor[] {
    return [...this.backends.keys()];
  }

  private of(spec: VmSpec): Backend {
    const b = this.backends.get(spec.hypervisor);
    if (!b) throw new UserError(`this node does not run ${spec.hypervisor} desktops`);
    this.owner.set(spec.vmId, spec.hypervisor);
    return b;
  }

  /** The backends that may hold `vmId`: its known one, else every one that reports it. */
  private async holders(vmId: number): Promise<Backend[]> {
    const k = this.owner.get(vmId);
    if (k) return [this.backends.get(k)!];
    const found: Backend[] = [];
    for (const [kind, b] of this.backends) {
      const ids = new Set([...(await b.running().catch(() => [])), ...(await b.leftovers().catch(() => []))]);
      if (ids.has(vmId)) {
        found.push(b);
        this.owner.set(vmId, kind);
      }
    }
    return found;
  }

  prepare(spec: VmSpec): Promise<void> {
    return this.of(spec).prepare(spec);
  }

  start(spec: VmSpec): Promise<{ pid?: number }> {
    return this.of(spec).start(spec);
  }

  async stop(vmId: number, timeoutMs: number): Promise<boolean> {
    let down = true;
    for (const b of await this.holders(vmId)) down = (await b.stop(vmId, timeoutMs)) && down;
    return down;
  }

  async kill(vmId: number): Promise<void> {
    for (const b of await this.holders(vmId)) await b.kill(vmId);
  }

  async status(vmId: number): Promise<BackendState> {
    for (const b of await this.holders(vmId)) if ((await b.status(vmId)) === "running") return "running";
    return "stopped";
  }

  async running(): Promise<number[]> {
    const ids: number[] = [];
    for (const [kind, b] of this.backends)
      for (const id of await b.running()) {
        ids.push(id);
        this.owner.set(id, kind);
      }
    return ids.sort((a, b) => a - b);
  }

  async leftovers(): Promise<number[]> {
    const ids = new Set<number>();
    for (const b of this.backends.values()) for (const id of await b.leftovers()) ids.add(id);
    return [...ids].sort((a, b) => a - b);
  }

  async cleanup(vmId: number, opts?: { keepStorage?: boolean }): Promise<void> {
    // Unknown: every backend removes what it may have left (each cleanup is idempotent).
    const holders = await this.holders(vmId);
    for (const b of holders.length ? holders : this.backends.values()) await b.cleanup(vmId, opts);
    this.owner.delete(vmId);
  }
}

export interface NodeBackendsResult {
  backend: NodeBackends;
  network: NodeNetwork;
  statuses: DriverStatus[];
  /** One line for the hosts row and the log: what runs here and how. */
  notes: string;
}

/**
 * What the node does at start-up: probes the configured backends, builds the network once, and
 * the backends that can run. `netns`: tests and the demo run everything in that namespace.
 */
export async function nodeBackendsFromConfig(cfg: Config, opts: { netns?: string } = {}): Promise<NodeBackendsResult> {
  const statuses: DriverStatus[] = [];
  for (const kind of configuredHypervisors(cfg)) statuses.push(kind === "lxc" ? await probeLxc() : await probeKvm(cfg));
  for (const s of statuses) {
    if (s.available) log.info(`backend ${s.kind} available`, { reason: s.reason });
    else log.warn(`backend ${s.kind} cannot run here: left out`, { reason: s.reason });
  }
  const usable = statuses.filter((s) => s.available);
  const notes = statuses.map((s) => `${s.kind}: ${s.available ? s.reason : `unavailable: ${s.reason}`}`).join("; ");
  if (!usable.length)
    throw new UserError(
      `no desktop backend can run on this node (vm.hypervisor = ${cfg.get("vm.hypervisor")}): ${notes}`,
    );
  const network = nodeNetworkFromConfig(cfg, opts.netns);
  await network.setup();
  const backends = new Map<Hypervisor, Backend>();
  for (const s of usable) {
    if (s.kind === "lxc") backends.set("lxc", new LxcBackend(lxcOptionsFromConfig(cfg, network)));
    else backends.set("kvm", new KvmBackend(kvmOptionsFromConfig(cfg, network, s.accel ?? "tcg")));
  }
  return { backend: new NodeBackends(backends), network, statuses, notes };
}

export function kvmOptionsFromConfig(cfg: Config, network: NodeNetwork, accel: Accel) {
  return {
    kvmPath: cfg.get("vm.kvm.path") || join(cfg.get("path.run"), "kvm"),
    overlaysRoot: cfg.storagePath("path.storage.overlays"),
    network,
    accel,
    qemu: cfg.get("vm.kvm.qemu"),
    qemuImg: cfg.get("vm.kvm.qemu_img"),
    machine: cfg.get("vm.kvm.machine"),
    cmdline: cfg.get("vm.kvm.cmdline"),
    extraArgs: cfg.get("vm.kvm.args.extra").split(/\s+/).filter(Boolean),
    uidBase: cfg.get("vm.kvm.uid_base"),
  };
}
