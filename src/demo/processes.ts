// The demo's child processes (the node, the API): the same qvd binary in other roles, each in
// a session of its own (so a Ctrl-C in the terminal reaches only the demo, which stops them in
// order: desktops before the database), its output appended to a log file, its pid in a file
// so that a demo that was killed hard can stop them at its next run.
import { closeSync, existsSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { UserError } from "../errors.ts";
import { spawnDaemon, type Daemon } from "../run.ts";

/** The environment of a child: no QVD_* settings of the caller (the demo passes its own). */
const childEnv = () =>
  Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("QVD_"))) as Record<string, string>;

const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

export class Child {
  /** Exit status once it has exited (128 + signal number for a signal). */
  status: number | undefined;

  private constructor(
    readonly name: string,
    readonly proc: Daemon,
    readonly logFile: string,
    private readonly pidFile: string,
  ) {
    void proc.exited.then((s) => (this.status = s));
  }

  static spawn(name: string, argv: string[], logFile: string, pidFile: string): Child {
    const fd = openSync(logFile, "a");
    try {
      writeFileSync(fd, `--- ${new Date().toISOString()} ${argv.join(" ")}\n`);
      const proc = spawnDaemon(argv, { env: childEnv(), detached: true, outputFd: fd });
      writeFileSync(pidFile, `${proc.pid}\n`);
      return new Child(name, proc, logFile, pidFile);
    } finally {
      closeSync(fd);
    }
  }

  get running(): boolean {
    return this.status === undefined;
  }

  /** The end of its log, for error messages. */
  logTail(lines = 15): string {
    try {
      return readFileSync(this.logFile, "utf8").trimEnd().split("\n").slice(-lines).join("\n");
    } catch {
      return "";
    }
  }

  /** An error for the user: what went wrong, and the end of the child's log. */
  failure(what: string): UserError {
    const tail = this.logTail();
    return new UserError(`the ${this.name} ${what}; the end of ${this.logFile}:\n${tail.replace(/^/gm, "  ")}`);
  }

  /** SIGTERM, then SIGKILL after `graceMs`; true when it stopped by itself. */
  async stop(graceMs: number): Promise<boolean> {
    let clean = true;
    if (this.running) {
      this.proc.kill("SIGTERM");
      const timer = setTimeout(() => {
        clean = false;
        this.proc.kill("SIGKILL");
      }, graceMs);
      await this.proc.exited;
      clearTimeout(timer);
    }
    rmSync(this.pidFile, { force: true });
    return clean;
  }
}

/**
 * The pid recorded in `pidFile` when that process still runs a command line containing
 * `marker`: never a stranger that got the same pid since.
 */
export function recordedPid(pidFile: string, marker: string): number | undefined {
  if (!existsSync(pidFile)) return undefined;
  const pid = Number(readFileSync(pidFile, "utf8").trim());
  if (!(pid > 1) || pid === process.pid) return undefined;
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").replace(/\0/g, " ").includes(marker) ? pid : undefined;
  } catch {
    return undefined;
  }
}

/** Stops a process an earlier demo left running (its pid file is there, see recordedPid). */
export async function stopLeftover(pidFile: string, marker: string): Promise<boolean> {
  const pid = recordedPid(pidFile, marker);
  rmSync(pidFile, { force: true });
  if (pid === undefined) return false;
  process.kill(pid, "SIGTERM");
  for (let i = 0; i < 1200 && alive(pid); i++) await Bun.sleep(100);
  if (alive(pid)) process.kill(pid, "SIGKILL");
  return true;
}

/** Waits until `ready` holds, failing early when the child exits. */
export async function waitReady(
  child: Child,
  what: string,
  ready: () => Promise<boolean> | boolean,
  ms: number,
): Promise<void> {
  const end = Date.now() + ms;
  for (;;) {
    if (!child.running) throw child.failure(`exited (status ${child.status}) before ${what}`);
    if (await ready()) return;
    if (Date.now() > end) throw child.failure(`did not get to ${what} within ${ms / 1000} s`);
    await Bun.sleep(200);
  }
}

/** Whether something accepts TCP connections at host:port (for the API; never nxagent's port). */
export async function tcpAccepts(hostname: string, port: number): Promise<boolean> {
  try {
    const s = await Bun.connect({ hostname, port, socket: { data() {} } });
    s.end();
    return true;
  } catch {
    return false;
  }
}
