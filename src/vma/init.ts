// PID 1 duties of the VMA when it is a container's init (the LXC backend runs `qvd vma` as
// init): shut down on the signals that ask for it, and reap orphans.
//
// Signals: PID 1 gets no default action for any signal, so without handlers SIGTERM and
// SIGINT would do nothing. Each of them starts the shutdown path (the same as the poweroff method): stop the session, then as PID 1 send
// SIGTERM and later SIGKILL to every other process of the namespace, then exit. SIGHUP is
// ignored explicitly. When the VMA is not PID 1 the same handlers run (minus the kill of
// everything), so that a stopped VMA never leaves a session behind.
// SIGPWR (lxc-stop's default halt signal) cannot be used: Bun 1.4 catches it internally (the
// JavaScriptCore engine uses it to suspend threads; /proc/<pid>/status SigCgt has bit 30 set
// with no JS handler) and never delivers it to process.on handlers, so it is not registered
// here; the LXC backend sets `lxc.signal.halt = SIGTERM` when the VMA is init.
//
// Reaping: Bun reaps the children it spawned (through src/run.ts, which keeps their pids in
// `ownChildren`). Orphans re-parented to PID 1 become zombies that nobody waits for. A
// `waitpid(-1)` would also steal the exit status of Bun's own children, so instead a timer
// scans /proc for zombies whose parent is this process and that are not Bun's own children,
// and reaps each with `waitpid(pid, WNOHANG)` called through bun:ffi (libc). A SIGCHLD
// handler is not used: Bun watches its children itself, and a JS handler for SIGCHLD is not
// needed for a scan every second.
import { readdirSync, readFileSync } from "node:fs";
import { logger } from "../log.ts";
import { ownChildren } from "../run.ts";

const log = logger("vma.init");
const WNOHANG = 1;

type WaitPid = (pid: number, status: Int32Array) => number;
let waitpidFn: WaitPid | undefined;

async function loadWaitpid(): Promise<WaitPid | undefined> {
  try {
    const { dlopen, FFIType, ptr } = await import("bun:ffi");
    const libc = dlopen("libc.so.6", {
      waitpid: { args: [FFIType.i32, FFIType.ptr, FFIType.i32], returns: FFIType.i32 },
    });
    return (pid, status) => libc.symbols.waitpid(pid, ptr(status), WNOHANG) as number;
  } catch (err) {
    log.warn("cannot load waitpid from libc: orphans will not be reaped", { err: (err as Error).message });
    return undefined;
  }
}

/** Zombie processes whose parent is this process (from /proc/<pid>/stat). */
export function zombieChildren(): number[] {
  const me = process.pid;
  const out: number[] = [];
  let entries: string[];
  try {
    entries = readdirSync("/proc");
  } catch {
    return out;
  }
  for (const e of entries) {
    if (!/^\d+$/.test(e)) continue;
    let stat: string;
    try {
      stat = readFileSync(`/proc/${e}/stat`, "utf8");
    } catch {
      continue;
    }
    // pid (comm) state ppid …: comm may hold spaces and parentheses; split after the last ")".
    const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    if (rest[0] === "Z" && Number(rest[1]) === me) out.push(Number(e));
  }
  return out;
}

/** Reaps zombie orphans once; returns the pids reaped. */
export function reapOrphans(): number[] {
  if (!waitpidFn) return [];
  const reaped: number[] = [];
  const status = new Int32Array(1);
  for (const pid of zombieChildren()) {
    if (ownChildren.has(pid)) continue;
    if (waitpidFn(pid, status) === pid) reaped.push(pid);
  }
  if (reaped.length) log.debug("reaped orphans", { pids: reaped.join(",") });
  return reaped;
}

export interface InitOptions {
  /** The shutdown path (stop the session, close the server); called once. */
  shutdown: (reason: string) => Promise<void>;
  /** Reap orphans even when not PID 1 (tests); default: only as PID 1. */
  reap?: boolean;
  reapIntervalMs?: number;
}

export const isPid1 = () => process.pid === 1;

let shuttingDown: Promise<never> | undefined;

/** Runs the shutdown path once, then (as PID 1) ends every other process, then exits. */
export function powerOff(opts: InitOptions, reason: string, exitCode = 0): Promise<never> {
  shuttingDown ??= (async () => {
    log.info("shutting down", { reason, pid1: isPid1() });
    try {
      await opts.shutdown(reason);
    } catch (err) {
      log.error("shutdown failed", { err: (err as Error).message });
    }
    if (isPid1()) {
      // Everything but ourselves: kill(-1) skips PID 1.
      try {
        process.kill(-1, "SIGTERM");
      } catch {}
      const until = Date.now() + 3000;
      while (Date.now() < until && otherProcesses() > 0) {
        reapOrphans();
        await Bun.sleep(100);
      }
      try {
        process.kill(-1, "SIGKILL");
      } catch {}
      reapOrphans();
    }
    process.exit(exitCode);
  })();
  return shuttingDown;
}

function otherProcesses(): number {
  try {
    return readdirSync("/proc").filter((e) => /^\d+$/.test(e) && Number(e) !== process.pid).length;
  } catch {
    return 0;
  }
}

/** Installs the signal handlers and, as PID 1 (or when asked), the orphan reaper. */
export async function setupInit(opts: InitOptions): Promise<void> {
  for (const sig of ["SIGTERM", "SIGINT"] as const) process.on(sig, () => void powerOff(opts, sig));
  process.on("SIGHUP", () => log.info("SIGHUP ignored"));
  if (isPid1() || opts.reap) {
    waitpidFn = await loadWaitpid();
    const t = setInterval(reapOrphans, opts.reapIntervalMs ?? 1000);
    t.unref?.();
  }
}
