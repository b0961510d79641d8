// The House Keeping Daemon of one node: heartbeat, commands (by NOTIFY, with a slow poll as
// fallback), the lifecycle of this node's desktops, reconciliation at start-up, expiry, and
// self-fencing when the database is out of reach.
//
// VM lifecycle (DESIGN section 5): stopped → starting → running → stopping → stopped; a start
// that fails blocks the VM with a reason and cleans up; a stop asks the VMA to power off,
// then the backend to stop, then kills; cleanup always runs.
import { randomBytes } from "node:crypto";
import { freemem, loadavg, cpus } from "node:os";
import { currentIdentityRules, identitySettings } from "../auth/identity.ts";
import type { Config } from "../config.ts";
import * as N from "../db/node.ts";
import type { DiRow } from "../db/dis.ts";
import { listen, type Listener } from "../db/listen.ts";
import type { Sql } from "../db/pool.ts";
import { logger } from "../log.ts";
import { VERSION } from "../version.ts";
import { macFor, type Backend, type VmSpec } from "../virt/backend.ts";
import { vmaCall, waitForVma, type VmaTarget } from "./vma-client.ts";
import { ClusterMonitor } from "./monitor.ts";
import { rejoinHost } from "../db/lifecycle.ts";
import { nodeVmaSettings } from "../vma/node-settings.ts";

const log = logger("hkd");
const NX_DISPLAY = 100;

/** Where desktops' root filesystems come from (src/virt/images.ts). */
export interface ImageSource {
  /** The unpacked root filesystem of an image, unpacking it first when needed. */
  rootfsFor(di: DiRow): Promise<string>;
}

export interface HkdOptions {
  sql: Sql;
  databaseUrl: string;
  cfg: Config;
  host: N.HostIdentity;
  backend: Backend;
  images: ImageSource;
  /** Host path of the qvd binary for the guests. */
  qvdBinary: string;
  /** Home directory of a user on shared storage. */
  homeOf: (tenant: string, user: string) => string;
}

type Phase = "starting" | "running" | "stopping";

interface VmRun {
  vmId: number;
  phase: Phase;
  vma?: VmaTarget;
  /** Aborted when a stop arrives while the start is still under way. */
  abort: AbortController;
  failures: number;
  /** Settles when the current start or stop sequence is over. */
  busy?: Promise<void>;
}

export class Hkd {
  private readonly runs = new Map<number, VmRun>();
  private listener?: Listener;
  private timers: ReturnType<typeof setInterval>[] = [];
  private lastDbOk = Date.now();
  /** Since when the database has worked without a gap (undefined: failing now); the monitor's grace. */
  private dbOkSince?: number;
  private fenced = false;
  private rejoining = false;
  private monitor?: ClusterMonitor;
  private stopping = false;
  private processing?: Promise<void>;
  private again = false;

  constructor(private readonly o: HkdOptions) {}

  private get id() {
    return this.o.host.id;
  }

  /** Starts the daemon: state starting, reconcile, listen, running. */
  async start(): Promise<void> {
    const { sql, cfg } = this.o;
    await N.setHostState(sql, this.id, "starting");
    await this.beat();
    await this.reconcile();
    this.listener = await listen(this.o.databaseUrl, [`qvd_host_${this.id}`], {
      onNotify: () => this.kick(),
      // After a gap, commands may have been missed: look at the table again.
      onReady: () => this.kick(),
    });
    const every = (s: number, fn: () => Promise<unknown>) => this.timers.push(setInterval(() => void fn().catch((e) => log.warn(String(e?.message ?? e))), s * 1000));
    every(cfg.get("hkd.heartbeat_interval"), () => this.beat());
    this.monitor = new ClusterMonitor({
      sql, host: this.o.host, lostAfterS: cfg.get("cluster.lost_after"),
      dbOkForS: () => (this.dbOkSince === undefined || this.fenced ? undefined : (Date.now() - this.dbOkSince) / 1000),
      onDbError: () => (this.dbOkSince = undefined),
    });
    every(cfg.get("hkd.heartbeat_interval"), () => this.monitor!.check());
    every(cfg.get("hkd.poll_interval"), async () => this.kick());
    every(cfg.get("hkd.vma_check_interval"), () => this.checkVmas());
    every(Math.min(60, cfg.get("hkd.poll_interval")), () => this.checkExpiry());
    await N.setHostState(sql, this.id, "running");
    log.info("node running", { host: this.o.host.name, id: this.id, backend: this.o.backend.kind });
    this.kick();
  }

  /** Orderly shutdown: stop (or leave, by config) the desktops, then mark the node stopped. */
  async stop(): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    for (const t of this.timers) clearInterval(t);
    await this.listener?.close();
    await N.setHostState(this.o.sql, this.id, "stopping").catch(() => {});
    if (this.o.cfg.get("hkd.on_shutdown") === "stop") {
      await Promise.all([...this.runs.keys()].map((id) => this.stopVm(id, "the node is shutting down")));
    } else {
      log.info("leaving desktops running (hkd.on_shutdown = leave)", { vms: this.runs.size });
    }
    await Promise.all([...this.runs.values()].map((r) => r.busy));
    await N.setHostState(this.o.sql, this.id, "stopped").catch(() => {});
  }

  // --- heartbeat and fencing --------------------------------------------------------------------

  private async beat(): Promise<void> {
    try {
      const ok = await N.heartbeat(this.o.sql, this.id, {
        pid: process.pid,
        usableRamMb: Math.floor(freemem() / 1024 / 1024),
        usableCpu: Math.max(0, cpus().length - (loadavg()[0] ?? 0)) * 1000,
        version: VERSION,
      });
      this.lastDbOk = Date.now();
      this.dbOkSince ??= Date.now();
      if (!ok) await this.rejoin();
      else if (this.fenced && !this.rejoining) {
        log.info("database reachable again; reconciling");
        this.fenced = false;
        await this.reconcile();
        this.kick();
      }
    } catch (err) {
      this.dbOkSince = undefined;
      const silentFor = (Date.now() - this.lastDbOk) / 1000;
      log.warn("heartbeat failed", { error: (err as Error).message, seconds_without_db: Math.round(silentFor) });
      if (silentFor >= this.o.cfg.get("hkd.fence_after")) await this.fence(`no database for ${Math.round(silentFor)} s`);
    }
  }

  /**
   * Declared lost (by a monitor or an administrator): every desktop here was released and may
   * already run elsewhere. Kill them all, then rejoin and reconcile, which adopts only what the
   * database gives this node now (nothing it ran before), so a released VM never runs here again.
   */
  private async rejoin(): Promise<void> {
    if (this.rejoining) return;
    this.rejoining = true;
    try {
      await this.fence("this node was declared lost");
      if (!(await rejoinHost(this.o.sql, this.id))) return; // not lost any more: the next beat tells
      log.info("rejoining the farm after being declared lost");
      await this.reconcile();
      await N.setHostState(this.o.sql, this.id, "running");
      this.fenced = false;
      log.info("node running again");
      this.kick();
    } finally {
      this.rejoining = false;
    }
  }

  /**
   * Self-fencing: this node may no longer own its desktops (another node could start them and
   * corrupt their homes), so it stops them all at once, without the database.
   */
  private async fence(why: string): Promise<void> {
    if (this.fenced) return;
    this.fenced = true;
    log.error("fencing: stopping every desktop of this node", { reason: why });
    for (const r of this.runs.values()) r.abort.abort();
    const ids = new Set([...this.runs.keys(), ...(await this.o.backend.running().catch(() => []))]);
    await Promise.all([...ids].map(async (id) => {
      await this.o.backend.kill(id).catch(() => {});
      await this.o.backend.cleanup(id).catch((e) => log.error("cleanup failed", { vm: id, error: (e as Error).message }));
    }));
    this.runs.clear();
  }

  // --- commands -------------------------------------------------------------------------------

  /** Processes commands now; coalesces bursts of notifications into one pass. */
  kick(): void {
    if (this.stopping || this.fenced) return;
    if (this.processing) {
      this.again = true;
      return;
    }
    this.processing = (async () => {
      do {
        this.again = false;
        try {
          await this.processCommands();
        } catch (err) {
          log.warn("processing commands failed", { error: (err as Error).message });
        }
      } while (this.again && !this.stopping);
    })().finally(() => (this.processing = undefined));
  }

  private async processCommands(): Promise<void> {
    const { sql } = this.o;
    if ((await N.takeHostCommand(sql, this.id)) === "stop") {
      log.info("host stop command: stopping every desktop");
      for (const id of this.runs.keys()) void this.stopVm(id, "the node was told to stop its desktops");
    }
    for (const id of await N.claimStops(sql, this.id)) void this.stopVm(id, "stop command");
    for (const id of await N.claimStarts(sql, this.id)) {
      if (this.runs.has(id)) continue;
      void this.startVm(id);
    }
  }

  // --- one desktop ------------------------------------------------------------------------------

  private async startVm(vmId: number): Promise<void> {
    const run: VmRun = { vmId, phase: "starting", abort: new AbortController(), failures: 0 };
    this.runs.set(vmId, run);
    let done!: () => void;
    run.busy = new Promise<void>((r) => (done = r));
    const { sql, cfg, backend } = this.o;
    const t0 = performance.now();
    try {
      const vm = await N.vmToStart(sql, vmId);
      if (!vm.di) throw new StartError(`no usable disk image with tag "${vm.di_tag}" for this VM's OSF (missing, blocked or not uploaded)`);
      if (!vm.ip) throw new StartError("the VM has no IP address");
      const rootfs = await this.o.images.rootfsFor(vm.di).catch((e: Error) => {
        throw new StartError(`disk image ${vm.di!.version} cannot be used: ${e.message}`);
      });
      const [net, bits] = cfg.get("vm.network.range").split("/");
      const gateway = cfg.get("vm.network.gateway") || nthAddress(net!, 1);
      // The identity rules as stored now, so the VMA checks what the API and the L7R check.
      const identity = identitySettings(await currentIdentityRules(sql, cfg));
      const spec: VmSpec = {
        vmId, name: `qvd-${vmId}`, memoryMb: vm.memory_mb, cpuShares: vm.cpu_shares,
        image: { diId: vm.di.id, path: rootfs },
        overlay: { enabled: vm.use_overlay, persistent: vm.persistent },
        home: { hostPath: this.o.homeOf(vm.tenant_name, vm.user_name), user: vm.user_name },
        network: { ip: vm.ip, prefix: Number(bits), gateway, mac: macFor(vm.ip, cfg.get("vm.network.mac.prefix")), bridge: cfg.get("vm.network.bridge") },
        vma: { port: cfg.get("vm.vma.port"), secret: randomBytes(24).toString("base64url"), settings: { ...nodeVmaSettings(cfg), ...identity } },
        qvdBinary: this.o.qvdBinary,
      };
      run.vma = { address: vm.ip, port: spec.vma.port, secret: spec.vma.secret };
      await N.saveStartingRuntime(sql, this.id, vmId, {
        diId: vm.di.id, osfId: vm.osf_id, address: vm.ip, vmaPort: spec.vma.port, xPort: 4000 + NX_DISPLAY, vmaSecret: spec.vma.secret,
      });
      await backend.cleanup(vmId); // leftovers of an earlier run
      await backend.prepare(spec);
      await backend.start(spec);
      const deadline = Date.now() + cfg.get("hkd.timeout.vma_start") * 1000;
      if (!(await waitForVma(run.vma, deadline, run.abort.signal))) {
        if (run.abort.signal.aborted) throw new Aborted();
        throw new StartError(`the desktop's agent (VMA) did not answer within ${cfg.get("hkd.timeout.vma_start")} s`);
      }
      if (!(await N.setVmState(sql, this.id, vmId, "running"))) throw new Aborted();
      run.phase = "running";
      log.info("desktop running", { vm: vmId, seconds: ((performance.now() - t0) / 1000).toFixed(2) });
      done();
    } catch (err) {
      done();
      if (err instanceof StartError) {
        log.warn("start failed; blocking the VM", { vm: vmId, reason: err.message });
        await N.blockVmWithReason(sql, vmId, `start failed: ${err.message}`).catch(() => {});
      } else if (!(err instanceof Aborted)) {
        log.error("start failed", { vm: vmId, error: (err as Error).message });
        await N.blockVmWithReason(sql, vmId, `start failed: ${(err as Error).message}`).catch(() => {});
      }
      await this.teardown(vmId, run, false);
    }
  }

  /** Stops a desktop: VMA poweroff, backend stop, kill; always cleans up and records `stopped`. */
  private async stopVm(vmId: number, why: string): Promise<void> {
    let run = this.runs.get(vmId);
    if (!run) {
      // Not known to this process (e.g. adopted state lost): clean up what may be there.
      run = { vmId, phase: "stopping", abort: new AbortController(), failures: 0 };
      this.runs.set(vmId, run);
    }
    if (run.phase === "starting") {
      // The start sequence notices the abort, ends, and tears down by itself.
      run.abort.abort();
      await run.busy;
    }
    if (!this.runs.has(vmId)) return;
    if (run.phase === "stopping" && run.busy) return run.busy;
    log.info("stopping desktop", { vm: vmId, why });
    await this.teardown(vmId, run, true);
  }

  private teardown(vmId: number, run: VmRun, graceful: boolean): Promise<void> {
    const { sql, cfg, backend } = this.o;
    run.phase = "stopping";
    run.busy = (async () => {
      await N.setVmState(sql, this.id, vmId, "stopping").catch(() => false);
      try {
        let down = (await backend.status(vmId).catch(() => "running")) === "stopped";
        if (!down && graceful && run.vma) {
          await vmaCall(run.vma, "poweroff", {}).catch(() => {});
          down = await backend.stop(vmId, cfg.get("hkd.timeout.poweroff") * 1000).catch(() => false);
        }
        if (!down) down = await backend.stop(vmId, cfg.get("hkd.timeout.kill") * 1000).catch(() => false);
        if (!down) await backend.kill(vmId);
        await backend.cleanup(vmId);
        await N.clearVmRuntime(sql, this.id, vmId);
      } catch (err) {
        log.error("stop failed; the VM is a zombie until the next attempt", { vm: vmId, error: (err as Error).message });
        await N.setVmState(sql, this.id, vmId, "zombie").catch(() => false);
      } finally {
        this.runs.delete(vmId);
      }
    })();
    return run.busy;
  }

  // --- monitoring -------------------------------------------------------------------------------

  private async checkVmas(): Promise<void> {
    const limit = this.o.cfg.get("hkd.vma_failures");
    await Promise.all([...this.runs.values()].filter((r) => r.phase === "running" && r.vma).map(async (r) => {
      try {
        await vmaCall(r.vma!, "ping");
        r.failures = 0;
      } catch {
        if (++r.failures >= limit) await this.stopVm(r.vmId, `the VMA did not answer ${r.failures} checks`);
      }
    }));
  }

  private async checkExpiry(): Promise<void> {
    if (this.fenced) return;
    const now = Date.now();
    for (const row of await N.vmsOfHost(this.o.sql, this.id)) {
      const r = this.runs.get(row.vm_id);
      if (!r || r.phase !== "running") continue;
      if (row.expire_hard_at && row.expire_hard_at.getTime() <= now) void this.stopVm(row.vm_id, "its hard expiry time was reached");
      else if (row.expire_soft_at && row.expire_soft_at.getTime() <= now && r.vma)
        await vmaCall(r.vma, "expire", { soft: row.expire_soft_at, hard: row.expire_hard_at }).catch(() => {});
    }
  }

  // --- reconciliation ---------------------------------------------------------------------------

  /**
   * Makes the database and the machine agree: desktops running here that the database gives to
   * this node are adopted; the database's desktops that do not run are marked stopped; desktops
   * running without the database knowing (or half-started) are stopped. Leftovers are cleaned.
   */
  async reconcile(): Promise<void> {
    const { sql, backend } = this.o;
    const rows = await N.vmsOfHost(sql, this.id);
    const running = new Set(await backend.running());
    const known = new Set<number>();
    for (const row of rows) {
      known.add(row.vm_id);
      if (this.runs.has(row.vm_id)) continue;
      if (running.has(row.vm_id) && row.vm_state === "running" && row.vma_secret && row.vm_address) {
        this.runs.set(row.vm_id, {
          vmId: row.vm_id, phase: "running", abort: new AbortController(), failures: 0,
          vma: { address: row.vm_address, port: row.vma_port ?? this.o.cfg.get("vm.vma.port"), secret: row.vma_secret },
        });
        log.info("adopted running desktop", { vm: row.vm_id });
      } else if (running.has(row.vm_id)) {
        log.info("stopping a desktop left half-started or half-stopped", { vm: row.vm_id, state: row.vm_state });
        await this.teardown(row.vm_id, { vmId: row.vm_id, phase: "stopping", abort: new AbortController(), failures: 0 }, false);
      } else {
        log.info("desktop not running here any more: marking it stopped", { vm: row.vm_id, state: row.vm_state });
        await backend.cleanup(row.vm_id).catch((e) => log.warn("cleanup failed", { vm: row.vm_id, error: (e as Error).message }));
        await N.clearVmRuntime(sql, this.id, row.vm_id);
      }
    }
    for (const id of running) {
      if (known.has(id)) continue;
      log.warn("a desktop runs here that the database does not give to this node: stopping it", { vm: id });
      await backend.kill(id).catch(() => {});
      await backend.cleanup(id).catch(() => {});
    }
    // What stopped desktops left behind (configuration, network devices, overlays).
    for (const id of await backend.leftovers()) {
      if (this.runs.has(id) || running.has(id)) continue;
      log.info("cleaning up what a stopped desktop left", { vm: id });
      await backend.cleanup(id).catch((e) => log.warn("cleanup failed", { vm: id, error: (e as Error).message }));
    }
  }

  /** VM ids this HKD currently handles, with their phase (for tests and status). */
  status(): { vmId: number; phase: Phase }[] {
    return [...this.runs.values()].map((r) => ({ vmId: r.vmId, phase: r.phase }));
  }
}

class StartError extends Error {}
class Aborted extends Error {}

function nthAddress(network: string, n: number): string {
  const x = network.split(".").reduce((a, o) => a * 256 + Number(o), 0) + n;
  return [24, 16, 8, 0].map((s) => Math.floor(x / 2 ** s) % 256).join(".");
}
