// The one runner for external programs (lxc-*, qemu, ip, tar, initdb, …): logs the command
// line, captures output, and turns a non-zero exit into an error that names the command.
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
  stdin?: string | Uint8Array;
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

/** Quotes an argument for the log line only (never passed to a shell). */
function shellQuote(a: string): string {
  return /^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, "'\\''")}'`;
}

export async function run(argv: string[], opts: RunOptions = {}): Promise<RunResult> {
  const line = argv.map(shellQuote).join(" ");
  log.debug("exec", { cmd: line });
  let proc;
  try {
    proc = Bun.spawn(argv, {
      cwd: opts.cwd,
      env: opts.env ? { ...process.env, ...opts.env } : process.env,
      stdin: opts.stdin === undefined ? "ignore" : new Blob([opts.stdin as BlobPart]),
      stdout: "pipe",
      stderr: "pipe",
      timeout: opts.timeoutMs,
    });
  } catch (err) {
    throw new CommandError(argv[0] ?? "?", null, (err as Error).message);
  }
  const [stdout, stderr, status] = await Promise.all([
    new Response(proc.stdout).text(),
    new Response(proc.stderr).text(),
    proc.exited,
  ]);
  if (status !== 0 && !opts.allowFail) throw new CommandError(line, status, stderr || stdout);
  return { status, stdout, stderr };
}
