// The node's VM network: the bridge the VMs' veths join, and the nftables rules that confine
// VMs. Everything here runs in the node's network namespace: in production that is the
// machine's own; tests (and anything else that passes `netns`) run each command through
// `nsenter --net=/run/netns/<name>` (see `netnsPrefix`).
//
// Confinement, without br_netfilter:
// - VM ↔ VM: every VM port on the bridge is `isolated`, so the bridge forwards nothing between
//   two VM ports (only to and from the bridge itself, i.e. the node); routed VM → VM traffic
//   through the node is dropped in `inet qvd` forward.
// - VM → node: table `inet qvd`, chain input: packets that arrive on the bridge pass only when
//   they answer the node's own connections (ct established/related) or go to a port listed
//   in vm.network.firewall.node_ports; everything else from the bridge is dropped.
// - Node users → VM: only root's processes open connections to VMs (chain output).
// - Other hosts → VM: nothing by default; the VMA (3030) and nxagent (4100) are the node's to
//   reach (the L7R, the HKD), and nxagent also takes connections from the node's address only
//   (accept=, src/vma/session.ts). vm.network.firewall.vm_ports opens ports to routed traffic
//   (an administrator's opt-in; another node's L7R goes through this node's node-to-node
//   endpoint instead, src/l7r/peer.ts), masqueraded to the node's bridge address so that the
//   VM still sees only the node.
// - Spoofing: table `bridge qvd` jumps, per VM port (a verdict map keyed by the host-side veth
//   name), to a chain that drops frames whose MAC, IPv4 or ARP sender differs from the VM's,
//   and all IPv6 (VMs are IPv4-only).
import { existsSync } from "node:fs";
import { run, type RunOptions, type RunResult } from "../run.ts";
import { logger } from "../log.ts";
import { UserError } from "../errors.ts";
import type { Config } from "../config.ts";

const log = logger("network");

/** The command prefix that runs a program in network namespace `netns` (none: as it is). */
export function netnsPrefix(netns?: string): string[] {
  // Not `ip netns exec`: it also unshares the mount namespace and remounts /sys, which hides
  // the cgroup hierarchies under /sys/fs/cgroup (LXC could then set no limits). nsenter only
  // switches the network namespace; /sys/class/net then still shows the machine's devices,
  // which is why VMs are attached to the bridge by our own script, not by LXC (lxc.ts).
  return netns ? ["nsenter", `--net=/run/netns/${netns}`, "--"] : [];
}

/** A runner bound to one network namespace. */
export type NsRun = (argv: string[], opts?: RunOptions) => Promise<RunResult>;
export function nsRunner(netns?: string): NsRun {
  const prefix = netnsPrefix(netns);
  if (netns && !existsSync(`/run/netns/${netns}`)) throw new UserError(`network namespace ${netns} does not exist`);
  return (argv, opts) => run([...prefix, ...argv], opts);
}

export interface PortRule {
  port: number;
  proto: "tcp" | "udp";
}

/** Parses "8443,53/udp" (vm.network.firewall.*_ports). */
export function parsePorts(s: string): PortRule[] {
  return s
    .split(",")
    .map((p) => p.trim())
    .filter(Boolean)
    .map((p) => {
      const [n, proto] = p.split("/");
      const port = Number(n);
      if (!Number.isInteger(port) || port < 1 || port > 65535) throw new UserError(`bad port "${p}"`);
      return { port, proto: (proto ?? "tcp") as "tcp" | "udp" };
    });
}

export interface NodeNetworkOptions {
  /** Bridge name (vm.network.bridge). */
  bridge: string;
  /** The node's address on the bridge (vm.network.gateway, default: first address of the range). */
  gateway: string;
  /** The VM network, e.g. 198.18.0.0/16 (vm.network.range). */
  range: string;
  /** Create and address the bridge when missing (vm.network.bridge.create). */
  createBridge: boolean;
  /** Install the nftables rules (vm.network.firewall.enable). */
  firewall: boolean;
  /** Node ports VMs may connect to (vm.network.firewall.node_ports). */
  nodePorts: PortRule[];
  /** VM ports reachable through the node from other hosts, masqueraded (vm.network.firewall.vm_ports; default none). */
  vmPorts: PortRule[];
  /** VMs may open connections beyond the node (vm.network.firewall.outbound). */
  outbound: boolean;
  /** Network namespace to work in (tests); default: the current one. */
  netns?: string;
}

export interface VmPort {
  vmId: number;
  /** Host-side veth name. */
  ifname: string;
  ip: string;
  mac: string;
}

/** Host-side name of a VM's veth: `qvd<id>` (as the original). */
export const vethName = (vmId: number) => `qvd${vmId}`;

function portSet(rules: PortRule[], proto: "tcp" | "udp"): string | undefined {
  const ports = rules.filter((r) => r.proto === proto).map((r) => r.port);
  return ports.length ? `{ ${[...new Set(ports)].join(", ")} }` : undefined;
}

export class NodeNetwork {
  readonly run: NsRun;
  private readonly prefix: number;

  constructor(readonly o: NodeNetworkOptions) {
    this.run = nsRunner(o.netns);
    const bits = Number(o.range.split("/")[1]);
    if (!Number.isInteger(bits) || bits < 1 || bits > 30) throw new UserError(`bad VM network range "${o.range}"`);
    this.prefix = bits;
    if (!/^[\w.-]{1,15}$/.test(o.bridge)) throw new UserError(`bad bridge name "${o.bridge}"`);
  }

  /** Makes the bridge exist and be up (and addressed, when we manage it); installs the base rules. */
  async setup(): Promise<void> {
    await this.ensureBridge();
    if (this.o.firewall) await this.installFirewall();
  }

  /** Removes the rules (and the bridge, when `removeBridge`); for node shutdown and tests. */
  async teardown(opts: { removeBridge?: boolean } = {}): Promise<void> {
    if (this.o.firewall) {
      await this.run(["nft", "delete", "table", "inet", "qvd"], { allowFail: true });
      await this.run(["nft", "delete", "table", "bridge", "qvd"], { allowFail: true });
    }
    if (opts.removeBridge) await this.run(["ip", "link", "del", "dev", this.o.bridge], { allowFail: true });
  }

  async bridgeExists(): Promise<boolean> {
    return (await this.run(["ip", "link", "show", "dev", this.o.bridge], { allowFail: true })).status === 0;
  }

  async ensureBridge(): Promise<void> {
    const br = this.o.bridge;
    if (!(await this.bridgeExists())) {
      if (!this.o.createBridge)
        throw new UserError(`the VM bridge ${br} does not exist (create it, or set vm.network.bridge.create)`);
      log.info("creating the VM bridge", { bridge: br, address: `${this.o.gateway}/${this.prefix}` });
      // No STP and no forwarding delay: VM ports forward as soon as they join.
      await this.run(["ip", "link", "add", "name", br, "type", "bridge", "stp_state", "0", "forward_delay", "0"]);
    }
    if (this.o.createBridge) await this.run(["ip", "addr", "replace", `${this.o.gateway}/${this.prefix}`, "dev", br]);
    await this.run(["ip", "link", "set", "dev", br, "up"]);
  }

  /** The rules of table `inet qvd` (rebuilt as a whole) and the skeleton of `bridge qvd`. */
  firewallRuleset(): string {
    const br = JSON.stringify(this.o.bridge);
    const range = this.o.range;
    const nodeTcp = portSet(this.o.nodePorts, "tcp");
    const nodeUdp = portSet(this.o.nodePorts, "udp");
    const vmTcp = portSet(this.o.vmPorts, "tcp");
    const vmUdp = portSet(this.o.vmPorts, "udp");
    return [
      // inet qvd: replaced atomically (add + delete + define in one transaction).
      "add table inet qvd",
      "delete table inet qvd",
      "table inet qvd {",
      "  chain input {",
      "    type filter hook input priority filter; policy accept;",
      `    iifname ${br} jump from_vms`,
      "  }",
      "  chain from_vms {",
      "    ct state established,related accept",
      nodeTcp && `    ct state new tcp dport ${nodeTcp} accept`,
      nodeUdp && `    udp dport ${nodeUdp} accept`,
      "    counter drop",
      "  }",
      // Node → VM: only root's processes (the L7R, the HKD) open connections to desktops; a
      // node user has no business with a desktop's agent or NX ports.
      "  chain output {",
      "    type filter hook output priority filter; policy accept;",
      `    oifname ${br} ct state new meta skuid != 0 counter reject`,
      "  }",
      "  chain forward {",
      "    type filter hook forward priority filter; policy accept;",
      `    iifname ${br} jump from_vms_routed`,
      `    oifname ${br} jump to_vms_routed`,
      "  }",
      "  chain from_vms_routed {",
      `    oifname ${br} counter drop`,
      `    ip daddr ${range} counter drop`,
      "    ct state established,related accept",
      this.o.outbound ? "    meta nfproto ipv4 accept" : undefined,
      "    counter drop",
      "  }",
      "  chain to_vms_routed {",
      "    ct state established,related accept",
      vmTcp && `    tcp dport ${vmTcp} accept`,
      vmUdp && `    udp dport ${vmUdp} accept`,
      "    counter drop",
      "  }",
      // What vm_ports lets in arrives from the node's bridge address: a VM answers only the node.
      ...(vmTcp || vmUdp
        ? [
            "  chain to_vms_nat {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            vmTcp && `    oifname ${br} ip daddr ${range} tcp dport ${vmTcp} masquerade`,
            vmUdp && `    oifname ${br} ip daddr ${range} udp dport ${vmUdp} masquerade`,
            "  }",
          ]
        : []),
      "}",
      // bridge qvd: kept across node restarts (running VMs' chains stay); only its base chain
      // is rebuilt.
      "add table bridge qvd",
      "add map bridge qvd ports { type ifname : verdict; }",
      "add chain bridge qvd prerouting { type filter hook prerouting priority filter; policy accept; }",
      "flush chain bridge qvd prerouting",
      "add rule bridge qvd prerouting iifname vmap @ports",
      "",
    ]
      .filter((l) => l !== undefined)
      .join("\n");
  }

  async installFirewall(): Promise<void> {
    await this.run(["nft", "-f", "-"], { stdin: this.firewallRuleset() });
  }

  /** Anti-spoofing rules for one VM port (before the VM starts; idempotent). */
  vmRuleset(p: VmPort): string {
    const chain = `vm${p.vmId}`;
    return [
      `add chain bridge qvd ${chain}`,
      `flush chain bridge qvd ${chain}`,
      `add rule bridge qvd ${chain} ether saddr != ${p.mac} counter drop`,
      `add rule bridge qvd ${chain} ether type ip6 counter drop`,
      `add rule bridge qvd ${chain} ether type ip ip saddr != ${p.ip} counter drop`,
      `add rule bridge qvd ${chain} ether type arp arp saddr ip != ${p.ip} counter drop`,
      `add rule bridge qvd ${chain} ether type arp arp saddr ether != ${p.mac} counter drop`,
      `add element bridge qvd ports { ${JSON.stringify(p.ifname)} : jump ${chain} }`,
      "",
    ].join("\n");
  }

  async addVm(p: VmPort): Promise<void> {
    if (!this.o.firewall) return;
    await this.run(["nft", "-f", "-"], { stdin: this.vmRuleset(p) });
  }

  async removeVm(vmId: number, ifname = vethName(vmId)): Promise<void> {
    if (!this.o.firewall) return;
    await this.run(["nft", "delete", "element", "bridge", "qvd", "ports", `{ ${JSON.stringify(ifname)} }`], {
      allowFail: true,
    });
    await this.run(["nft", "delete", "chain", "bridge", "qvd", `vm${vmId}`], { allowFail: true });
  }

  /**
   * The script LXC runs (lxc.net.0.script.up) once the host side of a VM's veth exists, in the
   * node's network namespace: joins the bridge as an isolated port. LXC calls it with
   * `<container> net up veth <host-ifname>`.
   */
  attachScript(): string {
    const ip = Bun.which("ip") ?? "/usr/sbin/ip";
    const bridge = Bun.which("bridge") ?? "/usr/sbin/bridge";
    return [
      "#!/bin/sh",
      "# Written by qvd: attaches a VM's veth to the node's bridge as an isolated port.",
      "set -e",
      '[ "$4" = veth ] && [ -n "$5" ]',
      `${ip} link set dev "$5" master ${this.o.bridge}`,
      `${bridge} link set dev "$5" isolated on`,
      `${ip} link set dev "$5" up`,
      "",
    ].join("\n");
  }

  /** Removes a VM's host-side veth if LXC left it (idempotent). */
  async removeVeth(ifname: string): Promise<void> {
    const r = await this.run(["ip", "link", "show", "dev", ifname], { allowFail: true });
    if (r.status === 0) await this.run(["ip", "link", "del", "dev", ifname], { allowFail: true });
  }
}

/** The address `n` places after the start of an IPv4 network ("198.18.0.0", 1 → "198.18.0.1"). */
export function nthAddress(network: string, n: number): string {
  const v = network.split(".").reduce((a, o) => a * 256 + Number(o), 0) + n;
  return [24, 16, 8, 0].map((s) => Math.floor(v / 2 ** s) % 256).join(".");
}

/** The node's network as the configuration describes it (netns: tests only). */
export function nodeNetworkFromConfig(cfg: Config, netns?: string): NodeNetwork {
  const range = cfg.get("vm.network.range");
  return new NodeNetwork({
    bridge: cfg.get("vm.network.bridge"),
    gateway: cfg.get("vm.network.gateway") || nthAddress(range.split("/")[0]!, 1),
    range,
    createBridge: cfg.get("vm.network.bridge.create"),
    firewall: cfg.get("vm.network.firewall.enable"),
    nodePorts: parsePorts(cfg.get("vm.network.firewall.node_ports")),
    vmPorts: parsePorts(cfg.get("vm.network.firewall.vm_ports")),
    outbound: cfg.get("vm.network.firewall.outbound"),
    netns,
  });
}
