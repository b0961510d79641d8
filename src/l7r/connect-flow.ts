// The connect flow a QVD client's connect_to_vm and a browser session share: takeover of the
// VM's session, placement and start, x_start, and the NX connection to nxagent
// (docs/ARCHITECTURE.md, "A desktop start and connection"). Session bookkeeping is in
// vm_runtimes (src/db/l7r.ts).
import { randomBytes, randomUUID } from "node:crypto";
import { currentIdentityRules } from "../auth/identity.ts";
import type { AuthenticatedUser } from "../auth/user-auth.ts";
import { leaveDrainingNode } from "../db/cluster.ts";
import { HomeInUseError, NoNodeAvailableError, startVm, VmBlockedError } from "../db/commands.ts";
import { incrementHostCounter } from "../db/hosts.ts";
import * as L from "../db/l7r.ts";
import { tenantScope } from "../db/objects.ts";
import { startQueuePlace, withdrawStaleStart } from "../db/placement.ts";
import { VmaError } from "../hkd/vma-client.ts";
import { logger } from "../log.ts";
import { newNxCookie } from "../nx/handshake.ts";
import type { IoSocket } from "../nx/splice.ts";
import type { Connection } from "./connection.ts";
import type { L7rContext } from "./context.ts";
import { desktopLink, LinkError, type DesktopLink } from "./link.ts";
import { mayUse, Status, unavailable } from "./status.ts";
import { xStartBody, XStartParamError } from "./x-start.ts";

const log = logger("l7r");

export type ClientKind = "qvd" | "browser";

/**
 * One connect of a connection to a desktop, from the request to the session's end. The session
 * it holds is released however the connection ends.
 */
export class DesktopSession {
  private session?: { vmId: number; id: string };
  private nx?: IoSocket;
  private abortRequested = false;
  /** For the metrics: when the connect began, what it had to do, whether its session is counted. */
  private readonly t0 = performance.now();
  private cold = false;
  private resumed = false;
  private counted = false;
  /** Cancels the end at the connection's close (a failed connect has nothing left to end). */
  private unregister = () => {};

  constructor(
    private readonly ctx: L7rContext,
    private readonly conn: Connection,
    readonly client: ClientKind,
  ) {}

  /**
   * Runs the flow to an NX connection with nxagent. `ready` runs before the session is marked
   * connected (a browser's display must be up). Every failure is a 503 with the reason (as the
   * original), and releases the session.
   */
  async open(
    user: AuthenticatedUser,
    vm: L.SessionVm,
    params: Map<string, string>,
    host: L.L7rHost,
    ready?: () => Promise<void>,
  ) {
    const { sql, metric } = this.ctx;
    const id = vm.vm_id;
    let nx: IoSocket | undefined;
    try {
      if (!mayUse(user, vm.user_id, id)) throw unavailable("You are not allowed to access requested virtual machine");
      await this.takeover(id, host);
      this.conn.progress(`Session acquired for VM_ID: ${id}`);
      const running = await this.startAndWait(id, user);
      const slaveKey = randomBytes(48).toString("base64").replace(/[+/=]/g, "").slice(0, 64).padEnd(64, "A");
      // nxagent takes only a proxy that presents this cookie; the splice adds it to the client's greeting.
      const cookie = newNxCookie();
      // Directly on this node, or through the desktop's node over the farm's TLS (src/l7r/link.ts).
      const link = await desktopLink(sql, {
        vm: running,
        hereId: host.id,
        session: this.session!.id,
        peer: this.ctx.o.peer,
      }).catch((err) => {
        throw err instanceof LinkError ? unavailable(`Unable to reach VM ${id}: ${err.message}`) : err;
      });
      await this.startX(running, link, user, params, slaveKey, cookie, host);
      this.conn.progress(`Connecting X session for VM_ID: ${id}`);
      await incrementHostCounter(sql, host.id, "nx_attempts").catch(() => {});
      nx = await link.nx(this.ctx.t.vma * 1000).catch((err: Error) => {
        throw unavailable(`Unable to connect to X server on VM VM_ID: ${id}: ${err.message}`);
      });
      await incrementHostCounter(sql, host.id, "nx_ok").catch(() => {});
      await ready?.();
      if (this.conn.closed || !(await L.markConnected(sql, id, this.session!.id)))
        throw unavailable(`Aborted by contending session VM VM_ID: ${id}`);
      metric.connects.inc({ client: this.client, result: "ok" });
      metric.connectSeconds.observe(
        { client: this.client, path: this.cold ? "cold" : this.resumed ? "resumed" : "warm" },
        (performance.now() - this.t0) / 1000,
      );
      return { nx, slaveKey, cookie };
    } catch (err) {
      metric.connects.inc({ client: this.client, result: "failed" });
      nx?.end();
      // The failed attempt must not hold the session.
      this.unregister();
      await this.release();
      if (err instanceof Status) throw err;
      throw unavailable((err as Error)?.message ?? String(err));
    }
  }

  /** The NX connection is the user's now: an abort from another client ends the connection. */
  attach(nx: IoSocket) {
    this.nx = nx;
  }

  /** Counts the session among those held (once it is the user's). */
  countSession() {
    if (this.counted || this.conn.closed) return;
    this.counted = true;
    this.ctx.metric.sessions.inc({ client: this.client });
  }

  countBytes(up: number, down: number) {
    this.ctx.metric.spliceBytes.inc({ client: this.client, direction: "up" }, up);
    this.ctx.metric.spliceBytes.inc({ client: this.client, direction: "down" }, down);
  }

  /** The connection ended. */
  private end() {
    this.nx?.end();
    if (this.counted) this.ctx.metric.sessions.dec({ client: this.client });
    void this.release();
  }

  private async release() {
    const sess = this.session;
    if (!sess) return;
    this.session = undefined;
    this.ctx.sessions.delete(sess.id);
    await L.releaseSession(this.ctx.sql, sess.vmId, sess.id).catch((e) =>
      log.warn("could not release a session", { vm: sess.vmId, error: String(e) }),
    );
  }

  /** Takes the VM's session, asking a holder (on any node) to abort, for up to the takeover timeout. */
  private async takeover(vmId: number, host: L.L7rHost) {
    const { sql, t } = this.ctx;
    const id = randomUUID();
    const address = this.conn.address;
    const deadline = Date.now() + t.takeover * 1000;
    for (;;) {
      if (this.conn.closed) throw unavailable("the client went away");
      if (
        await L.claimSession(sql, vmId, {
          hostId: host.id,
          session: id,
          pid: process.pid,
          userIp: /^\d+\.\d+\.\d+\.\d+$/.test(address) ? address : undefined,
        })
      ) {
        this.session = { vmId, id };
        this.unregister = this.conn.onClose(() => this.end());
        if (this.conn.closed) throw unavailable("the client went away"); // and end() released it
        this.ctx.sessions.set(id, () => {
          // Told to abort: a connecting session fails by itself; a connected one is closed.
          if (this.nx) this.conn.close(4001, "taken over by another client");
          else this.abortRequested = true;
        });
        return;
      }
      if (Date.now() >= deadline) throw unavailable("Unable to acquire VM, close other clients");
      this.conn.progress(`Aborting contending session for VM_ID: ${vmId}`);
      await L.abortOtherSession(sql, vmId, id);
      await this.ctx.vmChanged(vmId, Math.min(2000, deadline - Date.now()));
    }
  }

  private async checkAbort(vmId: number) {
    if (
      this.abortRequested ||
      this.conn.closed ||
      !this.session ||
      !(await L.sessionStillMine(this.ctx.sql, vmId, this.session.id))
    )
      throw unavailable(`Aborted by contending session VM VM_ID: ${vmId}`);
  }

  private async startAndWait(vmId: number, user: AuthenticatedUser): Promise<L.SessionVm> {
    const { sql, t, aliveWithin } = this.ctx;
    const progress = (info: string) => this.conn.progress(info);
    // A desktop on a draining node moves at its user's connect: stopped there, started elsewhere.
    for (
      const end = Date.now() + t.vmStop * 1000;
      Date.now() < end && (await leaveDrainingNode(sql, vmId, this.session!.id));
      await this.ctx.vmChanged(vmId, 2000)
    )
      progress("Moving the desktop off a draining node");
    let vm = (await L.sessionVm(sql, vmId))!;
    // Placed on a node that died before taking it: place it again rather than wait for lost_after.
    if (vm.vm_state === "stopped" && vm.vm_cmd === "start" && (await withdrawStaleStart(sql, vmId, aliveWithin)))
      vm = (await L.sessionVm(sql, vmId))!;
    if (vm.vm_state === "stopped" && !vm.vm_cmd) {
      if (!vm.host_id) progress(`Assigning VM ${vmId} to host`);
      try {
        await startVm(sql, tenantScope(user.tenantId), vmId, { aliveWithinS: aliveWithin, by: "l7r" });
      } catch (err) {
        if (err instanceof HomeInUseError) throw unavailable(err.message);
        if (err instanceof NoNodeAvailableError)
          throw unavailable("Unable to assign vm to host, there is no host available");
        if (err instanceof VmBlockedError)
          throw new Status(403, "The requested virtual machine is offline for maintenance");
        throw unavailable(`Unable to start VM ${vmId}, state changed unexpectedly`);
      }
      progress("Starting virtual machine");
      this.cold = true;
    }
    await this.checkAbort(vmId);
    const deadline = Date.now() + t.vmStart * 1000;
    for (;;) {
      vm = (await L.sessionVm(sql, vmId))!;
      if (vm.vm_state === "running" && vm.vm_address && vm.vma_port && vm.vma_secret) return vm;
      if (vm.blocked) throw unavailable(`Failed to start virtual machine ${vmId}`);
      // Stopped with no command pending: the node gave up on the start.
      if (vm.vm_state === "stopped" && !vm.vm_cmd) throw unavailable(`Failed to start virtual machine ${vmId}`);
      if (["stopping", "zombie"].includes(vm.vm_state))
        throw unavailable(`Unable to start VM ${vmId}, state changed unexpectedly`);
      if (Date.now() >= deadline) throw unavailable("VM didn't reach state 'running'. Timeout");
      await this.checkAbort(vmId);
      // Still queued while its node starts others: at hkd.max_starting; say where it stands.
      const queued = vm.vm_state === "stopped" && vm.vm_cmd === "start" ? await startQueuePlace(sql, vmId) : undefined;
      progress(
        queued?.starting
          ? `Waiting for a free start slot on node ${queued.host_name} (${queued.ahead} ahead)`
          : "Waiting for VM to reach state 'running'",
      );
      await this.ctx.vmChanged(vmId, Math.min(2000, deadline - Date.now()));
    }
  }

  private async startX(
    vm: L.SessionVm,
    link: DesktopLink,
    user: AuthenticatedUser,
    params: Map<string, string>,
    slaveKey: string,
    cookie: string,
    host: L.L7rHost,
  ) {
    const { sql, t } = this.ctx;
    let body;
    try {
      const identity = await currentIdentityRules(sql, this.ctx.o.identityConfig);
      body = {
        ...xStartBody({
          client: params,
          layers: await L.sessionProperties(sql, vm.vm_id),
          user,
          hostAddress: host.address,
          slaveKey,
          identity,
        }),
        cookie,
      };
    } catch (err) {
      if (err instanceof XStartParamError)
        throw unavailable(`The desktop is misconfigured (${err.message}), ask an administrator`);
      throw err;
    }
    this.conn.progress(`Starting X session at VM ${vm.vm_id}`);
    let lastErr = "";
    for (let attempt = 0; ; attempt++) {
      await this.checkAbort(vm.vm_id);
      try {
        this.resumed = (await link.vma<{ resumed?: boolean }>("x_start", body, t.vma * 1000))?.resumed === true;
        break;
      } catch (err) {
        lastErr = (err as Error).message;
        // A 409 while connected: the VMA suspends the old session; a retry resumes it.
        const retry = err instanceof VmaError && (err.status === undefined || err.status === 409);
        if (!retry || attempt + 1 >= t.xStartAttempts)
          throw unavailable(`Unable to start X session on VM ${vm.vm_id}: ${lastErr}`);
        await Bun.sleep(1000);
      }
    }
    this.conn.progress(`Waiting for X session to come up on VM ${vm.vm_id}`);
    let deadline = Date.now() + t.xStart * 1000;
    // nxagent is usually listening within a few hundred ms: ask often at first, then less.
    let pause = 20;
    for (;;) {
      let state = "";
      try {
        state = (await link.vma<{ state: string }>("x_state", undefined, t.vma * 1000)).state;
      } catch {
        /* no answer: keep waiting */
      }
      if (state === "listening") return;
      if (state === "provisioning") deadline = Date.now() + t.xStart * 1000;
      else if (state && state !== "starting")
        throw unavailable(`Unable to start X session on VM ${vm.vm_id}, state went to ${state}`);
      if (Date.now() >= deadline)
        throw unavailable(`Unable to start X session on VM ${vm.vm_id}, operation timed out!`);
      await this.checkAbort(vm.vm_id);
      await Bun.sleep(pause);
      pause = Math.min(250, Math.round(pause * 1.5));
    }
  }
}
