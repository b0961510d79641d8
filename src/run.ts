// The one runner for external programs (lxc-*, qemu, ip, tar, initdb, …): logs the command
// line, captures output, and turns a non-zero exit into an error that names the command.
import os from "node:os";
import { UserError } from "./errors.ts";
import { logger } from "./log.ts";

const log = logger("run");

export class CommandError extends UserError {
  constructor(
    readonly command: string,
    readonly status: number | null,
    readonly stderr: string,
  ) {
    const detail = stderr.trim().split("\n").slice(-3).join(" / ");
    super(`${command} failed (exit ${status ?? "signal"})${detail ? `: ${detail}` : ""}`);
    this.name = "CommandError";
  }
}

export interface RunOptions {
  cwd?: string;
  env?: Record<string, string | undefined>;
  /** Input; a stream is piped as it is read (large files, with hashing or progress on the way). */
  stdin?: string | Uint8Array | ReadableStream<Uint8Array>;
  /** Called with each line of output as it arrives (the output is still captured in the result). */
  onLine?: (line: string, stream: "stdout" | "stderr") => void;
  /** Do not throw on a non-zero exit; the caller inspects `status`. */
  allowFail?: boolean;
  /** Kill the program after this many milliseconds. */
  timeoutMs?: number;
}

export interface RunResult {
  status: number;
  stdout: string;
  stderr: string;
}

/** Quotes an argument for a log line or a command shown to a person (never passed to a shell here). */
export function shellQuote(a: string): string {
  return /^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, "'\\''")}'`;
}

/**
 * A command line as it may be logged: passwords in URLs (`postgres://qvd:PW@db/…`, `?password=PW`)
 * are masked, since a database URL may be passed on a command line (`qvd node --db …` hands its
 * flags to its children).
 */
export function loggableCommand(argv: string[]): string {
  return argv
    .map(shellQuote)
    .join(" ")
    .replace(/(\w+:\/\/[^:@/\s']*:)[^@\s']*@/g, "$1********@")
    .replace(/([?&]password=)[^&\s']*/g, "$1********");
}

/**
 * Pids of the children this process spawned through this module and has not yet seen exit.
 * Bun reaps them itself; a PID 1 reaper (src/vma/init.ts) must leave them alone.
 */
export const ownChildren = new Set<number>();

function track(proc: { pid: number; exited: Promise<number> }): void {
  ownChildren.add(proc.pid);
  void proc.exited.finally(() => ownChildren.delete(proc.pid));
}

export async function run(argv: string[], opts: RunOptions = {}): Promise<RunResult> {
  const line = loggableCommand(argv);
  log.debug("exec", { cmd: line });
  let proc;
  try {
    proc = Bun.spawn(argv, {
      cwd: opts.cwd,
      env: opts.env ? { ...process.env, ...opts.env } : process.env,
      stdin:
        opts.stdin === undefined
          ? "ignore"
          : opts.stdin instanceof ReadableStream
            ? opts.stdin
            : new Blob([opts.stdin as BlobPart]),
      stdout: "pipe",
      stderr: "pipe",
      timeout: opts.timeoutMs,
    });
  } catch (err) {
    throw new CommandError(argv[0] ?? "?", null, (err as Error).message);
  }
  track(proc);
  const [stdout, stderr, status] = await Promise.all([
    opts.onLine ? readLines(proc.stdout, (l) => opts.onLine!(l, "stdout")) : new Response(proc.stdout).text(),
    opts.onLine ? readLines(proc.stderr, (l) => opts.onLine!(l, "stderr")) : new Response(proc.stderr).text(),
    proc.exited,
  ]);
  if (status !== 0 && !opts.allowFail) throw new CommandError(line, status, stderr || stdout);
  return { status, stdout, stderr };
}

/** Reads a stream to its end, calling `onLine` for every complete line; returns the whole text. */
async function readLines(stream: ReadableStream<Uint8Array>, onLine: (line: string) => void): Promise<string> {
  const decoder = new TextDecoder();
  let all = "";
  let pending = "";
  const reader = stream.getReader();
  for (;;) {
    const { done, value: chunk } = await reader.read();
    if (done) break;
    const text = decoder.decode(chunk, { stream: true });
    all += text;
    const lines = (pending + text).split("\n");
    pending = lines.pop()!;
    for (const l of lines) onLine(l.replace(/\r$/, ""));
  }
  const tail = decoder.decode();
  all += tail;
  if (pending + tail) onLine((pending + tail).replace(/\r$/, ""));
  return all;
}

export interface DaemonOptions {
  cwd?: string;
  /** The complete environment of the child (not merged with this process's). */
  env?: Record<string, string | undefined>;
  /** Called with every line the child writes on stdout or stderr (merged, in arrival order per stream). */
  onLine?: (line: string, stream: "stdout" | "stderr") => void;
  /** Own process group (setsid), so that the whole tree can be signalled with `killGroup`. */
  detached?: boolean;
  /**
   * Write stdout and stderr to this open file instead of handing lines to `onLine`: the output
   * then outlives this process (a log file of a child that keeps running if we are killed).
   */
  outputFd?: number;
}

export interface Daemon {
  readonly pid: number;
  readonly command: string;
  /** Exit code, or 128 + signal number when a signal ended it. */
  readonly exited: Promise<number>;
  /** Resolves once both output streams have been read to the end. */
  readonly drained: Promise<void>;
  kill(signal?: NodeJS.Signals | number): boolean;
  /** Signals the child's process group (only meaningful with `detached`). */
  killGroup(signal?: NodeJS.Signals | number): boolean;
}

async function pumpLines(stream: ReadableStream<Uint8Array>, emit: (line: string) => void): Promise<void> {
  const decoder = new TextDecoder();
  let buf = "";
  const reader = stream.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let nl: number;
    while ((nl = buf.indexOf("\n")) >= 0) {
      emit(buf.slice(0, nl).replace(/\r$/, ""));
      buf = buf.slice(nl + 1);
    }
  }
  buf += decoder.decode();
  if (buf !== "") emit(buf);
}

/**
 * Starts a long-running child (nxagent under xinit, …) without waiting for it: its output is
 * handed over line by line, the command line is logged as `run` does.
 */
export function spawnDaemon(argv: string[], opts: DaemonOptions = {}): Daemon {
  const line = loggableCommand(argv);
  log.info("spawn", { cmd: line });
  let proc;
  try {
    proc = Bun.spawn(argv, {
      cwd: opts.cwd,
      env: opts.env ?? process.env,
      stdin: "ignore",
      stdout: opts.outputFd ?? "pipe",
      stderr: opts.outputFd ?? "pipe",
      detached: opts.detached,
    });
  } catch (err) {
    throw new CommandError(argv[0] ?? "?", null, (err as Error).message);
  }
  track(proc);
  const emit = (stream: "stdout" | "stderr") => (l: string) => {
    try {
      opts.onLine?.(l, stream);
    } catch (err) {
      log.error("output handler failed", { cmd: argv[0], err: (err as Error).message });
    }
  };
  const drained =
    opts.outputFd !== undefined
      ? Promise.resolve()
      : Promise.all([
          pumpLines(proc.stdout as ReadableStream<Uint8Array>, emit("stdout")).catch(() => {}),
          pumpLines(proc.stderr as ReadableStream<Uint8Array>, emit("stderr")).catch(() => {}),
        ]).then(() => {});
  const p = proc;
  const exited = p.exited.then((code) => {
    const sig = p.signalCode;
    const status = sig ? 128 + (os.constants.signals[sig as keyof typeof os.constants.signals] ?? 0) : code;
    log.info("exited", { cmd: argv[0], pid: p.pid, status });
    return status;
  });
  return {
    pid: p.pid,
    command: line,
    exited,
    drained,
    kill: (signal = "SIGTERM") => {
      if (p.exitCode !== null || p.signalCode !== null) return false;
      try {
        p.kill(signal);
        return true;
      } catch {
        return false;
      }
    },
    killGroup: (signal = "SIGTERM") => {
      try {
        process.kill(-p.pid, signal);
        return true;
      } catch {
        return false;
      }
    },
  };
}
