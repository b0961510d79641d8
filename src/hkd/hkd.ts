// The House Keeping Daemon of one node: heartbeat, commands (by NOTIFY, with a slow poll as
// fallback), the lifecycle of this node's desktops, reconciliation at start-up, expiry, and
// self-fencing when the database is out of reach.
//
// VM lifecycle (the table in src/db/lifecycle.ts): stopped → starting → running → stopping →
// stopped; a start that fails blocks the VM with a reason and cleans up; a stop asks the VMA to
// power off, then the backend to stop, then kills; cleanup always runs; a failed teardown makes
// a zombie, retried with backoff. The operations of one desktop run one after the other.
import { randomBytes } from "node:crypto";
import { freemem, loadavg, cpus } from "node:os";
import { currentIdentityRules, identitySettings } from "../auth/identity.ts";
import type { Config } from "../config.ts";
import * as N from "../db/node.ts";
import { claimStarts, claimStops } from "../db/lifecycle.ts";
import { Registry } from "../metrics.ts";
import type { DiRow } from "../db/dis.ts";
import { listen, type Listener } from "../db/listen.ts";
import type { Sql } from "../db/pool.ts";
import { logger } from "../log.ts";
import { VERSION } from "../version.ts";
import { macFor, type Backend, type Hypervisor, type VmSpec } from "../virt/backend.ts";
import { vmaCall, waitForVma, type VmaTarget } from "./vma-client.ts";
import { ClusterMonitor } from "./monitor.ts";
import { rejoinHost } from "../db/lifecycle.ts";
import { nodeVmaSettings } from "../vma/node-settings.ts";

const log = logger("hkd");
const NX_DISPLAY = 100;

/** Where desktops' images come from (src/virt/images.ts, src/virt/kvm-image.ts). */
export interface ImageSource {
  /** The image ready for its backend (LXC: unpacked; KVM: checked, kernel extracted), prepared first when needed. */
  imageFor(di: DiRow, hypervisor: Hypervisor): Promise<VmSpec["image"]>;
}

export interface HkdOptions {
  sql: Sql;
  databaseUrl: string;
  cfg: Config;
  host: N.HostIdentity;
  /** The node's backends behind one interface (src/virt/registry.ts dispatches by VM). */
  backend: Backend;
  /** The kinds of desktop the backend runs here (after probing). */
  hypervisors: Hypervisor[];
  images: ImageSource;
  /** Host path of the qvd binary for the guests. */
  qvdBinary: string;
  /** Where the HKD's metrics go (the role serves it on hkd.metrics.listen). */
  metrics?: Registry;
  /** A user's home on shared storage: a directory (LXC) or a disk file (KVM). */
  homeOf: (tenant: string, user: string, hypervisor: Hypervisor) => string;
}

/** What runs here: `idle` nothing known yet, `stopped` torn down (the entry is about to go). */
type Phase = "idle" | "starting" | "running" | "stopping" | "stopped" | "zombie";

/** The operations on one desktop; they run one after the other (see enqueue). */
type Op =
  | { kind: "start" }
  | { kind: "stop"; why: string; graceful: boolean; replacesStart?: boolean }
  | { kind: "retry" };

/** The longest wait between two teardown attempts of a zombie. */
const ZOMBIE_RETRY_CAP_S = 3600;

interface VmRun {
  vmId: number;
  phase: Phase;
  vma?: VmaTarget;
  /** Aborted when a stop arrives while the start is still under way. */
  abort: AbortController;
  failures: number;
  /** Waiting operations, and the one under way. */
  ops: Op[];
  current?: Op;
  /** Settles when no operation is left (undefined: none under way). */
  drained?: Promise<void>;
  /** A zombie's next teardown attempt, and the wait after it. */
  retry?: { timer?: ReturnType<typeof setTimeout>; delayS: number };
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

  // The HKD's metrics (docs/METRICS.md).
  private readonly metric;

  constructor(private readonly o: HkdOptions) {
    const r = o.metrics ?? new Registry();
    this.metric = {
      starts: r.counter(
        "qvd_hkd_starts_total",
        "Desktop starts on this node, by result (ok, failed, aborted: stopped while starting).",
      ),
      startSeconds: r.histogram(
        "qvd_hkd_start_seconds",
        "Seconds from a start's claim to the desktop's agent (VMA) answering.",
      ),
      commandLag: r.histogram(
        "qvd_hkd_command_lag_seconds",
        "Seconds from a start command in the database to this node claiming it (NOTIFY delivery and reaction).",
        [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30],
      ),
    };
    r.gauge("qvd_hkd_desktops", "Desktops placed on this node, by state (vm_runtimes.vm_state).", async () =>
      (await N.nodeVmStates(o.sql, o.host.id)).map((s) => ({ labels: { state: s.state }, value: s.count })),
    );
  }

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
    const every = (s: number, fn: () => Promise<unknown>) =>
      this.timers.push(setInterval(() => void fn().catch((e) => log.warn(String(e?.message ?? e))), s * 1000));
    every(cfg.get("hkd.heartbeat_interval"), () => this.beat());
    this.monitor = new ClusterMonitor({
      sql,
      host: this.o.host,
      lostAfterS: cfg.get("cluster.lost_after"),
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
      for (const id of [...this.runs.keys()])
        void this.enqueue(id, { kind: "stop", why: "the node is shutting down", graceful: true });
    } else {
      log.info("leaving desktops running (hkd.on_shutdown = leave)", { vms: this.runs.size });
    }
    await Promise.all([...this.runs.values()].map((r) => r.drained));
    for (const r of this.runs.values()) clearTimeout(r.retry?.timer);
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
      // A node declared lost watches nobody until it has rejoined and had its own grace.
      this.dbOkSince = ok ? (this.dbOkSince ?? Date.now()) : undefined;
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
      if (silentFor >= this.o.cfg.get("hkd.fence_after"))
        await this.fence(`no database for ${Math.round(silentFor)} s`);
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
    for (const r of this.runs.values()) {
      r.abort.abort();
      clearTimeout(r.retry?.timer);
    }
    const ids = new Set([...this.runs.keys(), ...(await this.o.backend.running().catch(() => []))]);
    await Promise.all(
      [...ids].map(async (id) => {
        await this.o.backend.kill(id).catch(() => {});
        // Without the database (or declared lost) the VM may run on another node by now, over
        // the same writable layer on shared storage: that is left to the next start's prepare.
        await this.o.backend
          .cleanup(id, { keepStorage: true })
          .catch((e) => log.error("cleanup failed", { vm: id, error: (e as Error).message }));
      }),
    );
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
    const { sql, cfg } = this.o;
    if ((await N.takeHostCommand(sql, this.id)) === "stop") {
      log.info("host stop command: stopping every desktop");
      for (const id of [...this.runs.keys()])
        void this.enqueue(id, { kind: "stop", why: "the node was told to stop its desktops", graceful: true });
    }
    for (const id of await claimStops(sql, this.id))
      void this.enqueue(id, { kind: "stop", why: "stop command", graceful: true });
    // At most hkd.max_starting starts at once; the others wait in the database, oldest first.
    const starting = [...this.runs.values()].filter(
      (r) => r.current?.kind === "start" || r.ops.some((o) => o.kind === "start"),
    ).length;
    for (const { vmId, lagS } of await claimStarts(sql, this.id, cfg.get("hkd.max_starting") - starting)) {
      if (lagS !== null) this.metric.commandLag.observe({}, Math.max(0, lagS));
      void this.enqueue(vmId, { kind: "start" });
    }
  }

  // --- one desktop ------------------------------------------------------------------------------

  /**
   * Queues an operation on one desktop; the operations of a desktop run one after the other. A
   * stop aborts a start under way (which then tears down) and replaces waiting starts and
   * retries; stops coalesce. Resolves when the desktop's queue is empty.
   */
  private enqueue(vmId: number, op: Op): Promise<void> {
    let r = this.runs.get(vmId);
    if (!r) {
      r = { vmId, phase: "idle", abort: new AbortController(), failures: 0, ops: [] };
      this.runs.set(vmId, r);
    }
    if (op.kind === "stop") {
      if (r.current?.kind === "start") r.abort.abort();
      // A claimed start that has not begun: the database says starting, so the stop must run
      // even if the desktop's last run is already torn down.
      const replaces = r.ops.some((o) => o.kind === "start");
      r.ops = r.ops.filter((o) => o.kind === "stop");
      if (r.ops.length) {
        if (replaces) (r.ops[0] as Extract<Op, { kind: "stop" }>).replacesStart = true;
        return r.drained!;
      }
      op = { ...op, replacesStart: replaces };
    }
    if (op.kind === "retry" && r.ops.length) return r.drained!;
    r.ops.push(op);
    r.drained ??= this.drain(r);
    return r.drained;
  }

  private async drain(r: VmRun): Promise<void> {
    try {
      for (let op = r.ops.shift(); op; op = r.ops.shift()) {
        r.current = op;
        try {
          if (op.kind === "start") await this.startVm(r);
          else if (op.kind === "stop" && (r.phase !== "stopped" || op.replacesStart)) {
            log.info("stopping desktop", { vm: r.vmId, why: op.why });
            await this.teardown(r, op.graceful);
          } else if (op.kind === "retry" && r.phase === "zombie") {
            log.info("retrying the teardown of a zombie", { vm: r.vmId });
            await this.teardown(r, false);
          }
        } catch (err) {
          log.error("desktop operation failed", { vm: r.vmId, op: op.kind, error: (err as Error).message });
        } finally {
          r.current = undefined;
        }
        // A start ended: a start waiting in the database may now be claimed.
        if (op.kind === "start") this.kick();
      }
    } finally {
      r.drained = undefined;
      if ((r.phase === "stopped" || r.phase === "idle") && this.runs.get(r.vmId) === r) this.runs.delete(r.vmId);
    }
  }

  private async startVm(run: VmRun): Promise<void> {
    const { vmId } = run;
    const { sql, cfg, backend } = this.o;
    run.abort = new AbortController(); // before any wait: a stop from now on aborts this start
    clearTimeout(run.retry?.timer);
    run.retry = undefined;
    if (run.phase !== "idle" && run.phase !== "stopped") {
      // A desktop of an earlier run still here: the database took it from this node and gave a
      // new start (e.g. released, then placed here again). The old one goes first, unrecorded.
      log.warn("a new start replaces a desktop the database no longer gives this node", { vm: vmId, phase: run.phase });
      await backend.kill(vmId).catch(() => {});
      await backend.cleanup(vmId).catch(() => {});
    }
    run.phase = "starting";
    run.failures = 0;
    run.vma = undefined;
    const aborted = () => {
      if (run.abort.signal.aborted) throw new Aborted();
    };
    const t0 = performance.now();
    try {
      aborted();
      const vm = await N.vmToStart(sql, vmId);
      if (!vm.di)
        throw new StartError(
          `no usable disk image with tag "${vm.di_tag}" for this VM's OSF (missing, blocked or not uploaded)`,
        );
      if (!vm.ip) throw new StartError("the VM has no IP address");
      if (!this.o.hypervisors.includes(vm.hypervisor))
        throw new StartError(
          `this node does not run ${vm.hypervisor} desktops (it runs ${this.o.hypervisors.join(", ")})`,
        );
      const image = await this.o.images.imageFor(vm.di, vm.hypervisor).catch((e: Error) => {
        throw new StartError(`disk image ${vm.di!.version} cannot be used: ${e.message}`);
      });
      aborted();
      const [net, bits] = cfg.get("vm.network.range").split("/");
      const gateway = cfg.get("vm.network.gateway") || nthAddress(net!, 1);
      // The identity rules as stored now, so the VMA checks what the API and the L7R check.
      const identity = identitySettings(await currentIdentityRules(sql, cfg));
      const spec: VmSpec = {
        vmId,
        hypervisor: vm.hypervisor,
        name: `qvd-${vmId}`,
        memoryMb: vm.memory_mb,
        cpuShares: vm.cpu_shares,
        vcpus: vm.vcpus,
        image,
        overlay: { enabled: vm.use_overlay, persistent: vm.persistent },
        home: {
          hostPath: this.o.homeOf(vm.tenant_name, vm.user_name, vm.hypervisor),
          user: vm.user_name,
          sizeMb: vm.user_storage_mb,
        },
        network: {
          ip: vm.ip,
          prefix: Number(bits),
          gateway,
          mac: macFor(vm.ip, cfg.get("vm.network.mac.prefix")),
          bridge: cfg.get("vm.network.bridge"),
        },
        vma: {
          port: cfg.get("vm.vma.port"),
          secret: randomBytes(24).toString("base64url"),
          settings: { ...nodeVmaSettings(cfg), ...identity },
        },
        qvdBinary: this.o.qvdBinary,
      };
      run.vma = { address: vm.ip, port: spec.vma.port, secret: spec.vma.secret };
      await N.saveStartingRuntime(sql, this.id, vmId, {
        diId: vm.di.id,
        osfId: vm.osf_id,
        address: vm.ip,
        vmaPort: spec.vma.port,
        xPort: 4000 + NX_DISPLAY,
        vmaSecret: spec.vma.secret,
      });
      await backend.cleanup(vmId); // leftovers of an earlier run
      aborted();
      await backend.prepare(spec);
      aborted();
      const { pid } = await backend.start(spec);
      if (pid) await N.saveVmPid(sql, this.id, vmId, pid);
      const deadline = Date.now() + cfg.get("hkd.timeout.vma_start") * 1000;
      if (!(await waitForVma(run.vma, deadline, run.abort.signal))) {
        aborted();
        throw new StartError(`the desktop's agent (VMA) did not answer within ${cfg.get("hkd.timeout.vma_start")} s`);
      }
      aborted();
      // Refused: the VM is no longer this node's (released meanwhile).
      if (!(await N.vmEvent(sql, this.id, vmId, "started"))) throw new Aborted();
      run.phase = "running";
      log.info("desktop running", { vm: vmId, seconds: ((performance.now() - t0) / 1000).toFixed(2) });
      this.metric.starts.inc({ result: "ok" });
      this.metric.startSeconds.observe({}, (performance.now() - t0) / 1000);
    } catch (err) {
      this.metric.starts.inc({ result: err instanceof Aborted ? "aborted" : "failed" });
      if (err instanceof StartError) {
        log.warn("start failed; blocking the VM", { vm: vmId, reason: err.message });
        await N.blockVmWithReason(sql, vmId, `start failed: ${err.message}`).catch(() => {});
      } else if (!(err instanceof Aborted)) {
        log.error("start failed", { vm: vmId, error: (err as Error).message });
        await N.blockVmWithReason(sql, vmId, `start failed: ${(err as Error).message}`).catch(() => {});
      }
      // Within this operation: a stop that aborted the start finds the desktop torn down.
      await this.teardown(run, false);
    }
  }

  /**
   * Tears a desktop down: VMA poweroff (graceful), backend stop, kill; always cleans up. Success
   * releases the VM in the database; a failure makes it a zombie, retried with backoff. The
   * database writes are lifecycle events of this node: refused when the VM is no longer its own,
   * while the machine is cleaned up all the same.
   */
  private async teardown(run: VmRun, graceful: boolean): Promise<void> {
    const { vmId } = run;
    const { sql, cfg, backend } = this.o;
    const wasZombie = run.phase === "zombie";
    run.phase = "stopping";
    await (wasZombie
      ? N.vmEvent(sql, this.id, vmId, "zombie_retried")
      : N.vmEvent(sql, this.id, vmId, "stop_begun").then((ok) => ok || N.vmEvent(sql, this.id, vmId, "zombie_retried"))
    ).catch(() => false);
    try {
      let down = (await backend.status(vmId).catch(() => "running")) === "stopped";
      if (!down && graceful && run.vma) {
        await vmaCall(run.vma, "poweroff", {}).catch(() => {});
        down = await backend.stop(vmId, cfg.get("hkd.timeout.poweroff") * 1000).catch(() => false);
      }
      if (!down) down = await backend.stop(vmId, cfg.get("hkd.timeout.kill") * 1000).catch(() => false);
      if (!down) await backend.kill(vmId);
      await backend.cleanup(vmId);
      await N.vmEvent(sql, this.id, vmId, "stopped");
      run.phase = "stopped";
      run.vma = undefined;
      clearTimeout(run.retry?.timer);
      run.retry = undefined;
    } catch (err) {
      run.phase = "zombie";
      await N.vmEvent(sql, this.id, vmId, "teardown_failed").catch(() => false);
      const delayS = run.retry?.delayS ?? cfg.get("hkd.zombie_retry");
      log.error("stop failed; the VM is a zombie until the next attempt", {
        vm: vmId,
        error: (err as Error).message,
        retry_in_s: delayS,
      });
      clearTimeout(run.retry?.timer);
      const timer = setTimeout(() => void this.enqueue(vmId, { kind: "retry" }), delayS * 1000);
      run.retry = { timer, delayS: Math.min(delayS * 2, ZOMBIE_RETRY_CAP_S) };
    }
  }

  // --- monitoring -------------------------------------------------------------------------------

  private async checkVmas(): Promise<void> {
    const limit = this.o.cfg.get("hkd.vma_failures");
    await Promise.all(
      [...this.runs.values()]
        .filter((r) => r.phase === "running" && r.vma && !r.current)
        .map(async (r) => {
          try {
            await vmaCall(r.vma!, "ping");
            r.failures = 0;
          } catch {
            if (++r.failures >= limit)
              await this.enqueue(r.vmId, {
                kind: "stop",
                why: `the VMA did not answer ${r.failures} checks`,
                graceful: true,
              });
          }
        }),
    );
  }

  private async checkExpiry(): Promise<void> {
    if (this.fenced) return;
    const now = Date.now();
    for (const row of await N.vmsOfHost(this.o.sql, this.id)) {
      const r = this.runs.get(row.vm_id);
      if (r?.phase !== "running") continue;
      if (row.expire_hard_at && row.expire_hard_at.getTime() <= now)
        void this.enqueue(row.vm_id, { kind: "stop", why: "its hard expiry time was reached", graceful: true });
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
          vmId: row.vm_id,
          phase: "running",
          abort: new AbortController(),
          failures: 0,
          ops: [],
          vma: { address: row.vm_address, port: row.vma_port ?? this.o.cfg.get("vm.vma.port"), secret: row.vma_secret },
        });
        log.info("adopted running desktop", { vm: row.vm_id });
      } else if (running.has(row.vm_id)) {
        log.info("stopping a desktop left half-started or half-stopped", { vm: row.vm_id, state: row.vm_state });
        await this.enqueue(row.vm_id, { kind: "stop", why: "left half-started or half-stopped", graceful: false });
      } else {
        log.info("desktop not running here any more: marking it stopped", { vm: row.vm_id, state: row.vm_state });
        const clean = await backend.cleanup(row.vm_id).then(
          () => true,
          (e) => {
            log.warn("cleanup failed", { vm: row.vm_id, error: (e as Error).message });
            return false;
          },
        );
        // Leftovers that cannot be removed: a teardown, which makes it a zombie and retries.
        if (clean) await N.vmEvent(sql, this.id, row.vm_id, "found_stopped");
        else
          await this.enqueue(row.vm_id, { kind: "stop", why: "its leftovers could not be removed", graceful: false });
      }
    }
    // A desktop released from this node (declared lost) may run elsewhere by now, over the same
    // writable layer on shared storage: only this node's part of it is cleaned up here.
    const leftovers = await backend.leftovers();
    const elsewhere = await N.vmsOnOtherNodes(
      sql,
      this.id,
      [...new Set([...running, ...leftovers])].filter((id) => !known.has(id)),
    );
    for (const id of running) {
      if (known.has(id)) continue;
      log.warn("a desktop runs here that the database does not give to this node: stopping it", { vm: id });
      if (this.runs.has(id)) {
        // Ours until the database took it: torn down in its queue (the node's events are refused).
        await this.enqueue(id, { kind: "stop", why: "the database no longer gives it to this node", graceful: false });
        continue;
      }
      await backend.kill(id).catch(() => {});
      await backend.cleanup(id, { keepStorage: elsewhere.has(id) }).catch(() => {});
    }
    // What stopped desktops left behind (configuration, network devices, overlays).
    for (const id of leftovers) {
      if (this.runs.has(id) || running.has(id)) continue;
      log.info("cleaning up what a stopped desktop left", {
        vm: id,
        ...(elsewhere.has(id) ? { runs_elsewhere: true } : {}),
      });
      await backend
        .cleanup(id, { keepStorage: elsewhere.has(id) })
        .catch((e) => log.warn("cleanup failed", { vm: id, error: (e as Error).message }));
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
