// The interface every desktop backend implements (lxc.ts, kvm.ts; registry.ts picks them). The HKD drives it; a
// backend knows nothing about the database. All methods are idempotent where they can be:
// the HKD calls cleanup() after any failure, and on start-up for leftovers.

export interface VmNetwork {
  ip: string; // the VM's address, e.g. 198.18.0.7
  prefix: number; // netmask length of the VM network, e.g. 16
  gateway: string; // the node's address on the bridge, where the VMA's caller comes from
  mac: string; // derived from the IP (vm.network.mac.prefix + the IP's last three octets)
  bridge: string; // the node's bridge
}

/** The kinds of desktop a node can run, and an OSF's `hypervisor`. */
export const HYPERVISORS = ["lxc", "kvm"] as const;
export type Hypervisor = (typeof HYPERVISORS)[number];

export interface VmSpec {
  vmId: number;
  /** Which backend runs it (the OSF's hypervisor). */
  hypervisor: Hypervisor;
  /** Container / domain name: always `qvd-<vmId>`. */
  name: string;
  memoryMb: number;
  cpuShares: number;
  /** Virtual CPUs (KVM; LXC desktops share the node's CPUs by cpuShares). */
  vcpus: number;
  /**
   * The image, ready for its backend. LXC: `path` is the unpacked root filesystem (basefs/).
   * KVM: `path` is the qcow2 on shared storage (the read-only backing file of the VM's
   * overlay), `kernel` and `initrd` what QEMU boots directly (extracted once under basefs/).
   */
  image: { diId: number; path: string; kernel?: string; initrd?: string };
  /** A writable layer over the image; kept across restarts when persistent. */
  overlay: { enabled: boolean; persistent: boolean };
  /**
   * The user's persistent home on shared storage. LXC: `hostPath` is a directory, mounted at
   * /home/<user>. KVM: `hostPath` is a qcow2 disk of `sizeMb` (the OSF's user_storage_mb; 0: no
   * home disk, the home lives and dies with the VM's root disk), mounted at /home in the guest.
   */
  home: { hostPath: string; user: string; sizeMb: number };
  network: VmNetwork;
  /** What the VMA in the guest needs: the per-start secret, the port it listens on, and the
   * node's settings for it (vma.json `settings`: they win over the image's vma.conf). */
  vma: { port: number; secret: string; settings?: Record<string, string> };
  /** Host path of the qvd binary, bind-mounted read-only into the guest. */
  qvdBinary: string;
}

export type BackendState = "running" | "stopped";

export interface Backend {
  readonly kind: Hypervisor;
  /** Prepares storage, network and configuration; nothing runs yet. */
  prepare(spec: VmSpec): Promise<void>;
  /** Starts the guest; resolves once the backend says it runs (not that the VMA answers). */
  start(spec: VmSpec): Promise<{ pid?: number }>;
  /** Asks the guest to shut down and waits up to `timeoutMs`; false when it is still running. */
  stop(vmId: number, timeoutMs: number): Promise<boolean>;
  /** Ends the guest at once (TERM, then KILL). */
  kill(vmId: number): Promise<void>;
  status(vmId: number): Promise<BackendState>;
  /** VM ids of the guests this backend runs on this node (for reconciliation). */
  running(): Promise<number[]>;
  /** VM ids that left something on this node (configuration, network device), running or not. */
  leftovers(): Promise<number[]>;
  /**
   * Removes what prepare/start left: mounts, network devices, upper dir unless persistent, config.
   * `keepStorage`: only this node's part; the VM's writable layer on shared storage is another
   * node's now (the VM was released and runs there).
   */
  cleanup(vmId: number, opts?: { keepStorage?: boolean }): Promise<void>;
}

/** The MAC address of a VM: a fixed 3-octet prefix and the IP's last three octets. */
export function macFor(ip: string, prefix: string): string {
  const o = ip.split(".").map(Number);
  return [prefix, ...o.slice(1).map((x) => x.toString(16).padStart(2, "0"))].join(":");
}
