// The demo's child processes (the node, the API): the same qvd binary in other roles, each in
// a session of its own (so a Ctrl-C in the terminal reaches only the demo, which stops them in
// order: desktops before the database), its output appended to a log file, its pid in a file
// so that a demo that was killed hard can stop them at its next run.
import { closeSync, existsSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { UserError } from "../errors.ts";

/** The environment of a child: no QVD_* settings of the caller (the demo passes its own). */
const childEnv = () => Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("QVD_"))) as Record<string, string>;

const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

export class Child {
  private constructor(
    readonly name: string,
    readonly proc: Bun.Subprocess,
    readonly logFile: string,
    private readonly pidFile: string,
  ) {}

  static spawn(name: string, argv: string[], logFile: string, pidFile: string): Child {
    const fd = openSync(logFile, "a");
    try {
      writeFileSync(fd, `--- ${new Date().toISOString()} ${argv.join(" ")}\n`);
      const proc = Bun.spawn(argv, { stdin: "ignore", stdout: fd, stderr: fd, env: childEnv(), detached: true });
      writeFileSync(pidFile, `${proc.pid}\n`);
      return new Child(name, proc, logFile, pidFile);
    } finally {
      closeSync(fd);
    }
  }

  get running(): boolean {
    return this.proc.exitCode === null && this.proc.signalCode === null;
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
 * Stops a process an earlier demo left running (its pid file is there): only when that pid
 * still runs a command line containing `marker` (the demo directory), never a stranger that
 * got the same pid.
 */
export async function stopLeftover(pidFile: string, marker: string): Promise<boolean> {
  if (!existsSync(pidFile)) return false;
  const pid = Number(readFileSync(pidFile, "utf8").trim());
  rmSync(pidFile, { force: true });
  if (!(pid > 1)) return false;
  let cmdline = "";
  try {
    cmdline = readFileSync(`/proc/${pid}/cmdline`, "utf8").replace(/\0/g, " ");
  } catch {
    return false;
  }
  if (!cmdline.includes(marker)) return false;
  process.kill(pid, "SIGTERM");
  for (let i = 0; i < 1200 && alive(pid); i++) await Bun.sleep(100);
  if (alive(pid)) process.kill(pid, "SIGKILL");
  return true;
}

/** Waits until `ready` holds, failing early when the child exits. */
export async function waitReady(child: Child, what: string, ready: () => Promise<boolean> | boolean, ms: number): Promise<void> {
  const end = Date.now() + ms;
  for (;;) {
    if (!child.running) throw child.failure(`exited (${child.proc.exitCode ?? child.proc.signalCode}) before ${what}`);
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
