// The full test command (`npm test`): installs missing system programs, runs `bun test` with
// the given arguments, streams its output, and ends with exactly one line
// `N passed, N failed[, N skipped]`. Exits non-zero when anything failed.
import { join } from "node:path";
import { ensureDeps } from "./deps.ts";

export interface Counts {
  passed: number;
  failed: number;
  skipped: number;
}

const stripAnsi = (s: string) => s.replace(/\x1b\[[0-9;]*m/g, "");

/** The counts of bun's closing summary (" N pass", " N fail", …, "Ran N tests across …"), if any. */
export function parseSummary(output: string): Counts | undefined {
  const lines = stripAnsi(output).split(/\r?\n/);
  const ran = lines.findLastIndex((l) => /^Ran \d+ tests? across /.test(l));
  if (ran < 0) return undefined;
  const num = (word: string): number | undefined => {
    for (let i = ran - 1; i >= 0 && i >= ran - 12; i--) {
      const m = new RegExp(`^\\s*(\\d+) ${word}$`).exec(lines[i]!);
      if (m) return Number(m[1]);
    }
    return undefined;
  };
  const passed = num("pass");
  const failed = num("fail");
  if (passed === undefined && failed === undefined) return undefined;
  // Errors outside tests (a file that fails to load) are also counted as failures by bun;
  // make sure they never end up as "0 failed".
  return { passed: passed ?? 0, failed: Math.max(failed ?? 0, num("errors?") ?? 0), skipped: num("skip") ?? 0 };
}

/** Counts from the per-test lines, for an output without summary (bun crashed or was killed). */
export function countLines(output: string): Counts {
  const failed = new Set<string>();
  let passed = 0;
  let skipped = 0;
  for (const l of stripAnsi(output).split(/\r?\n/)) {
    if (/^\s*(\(pass\)|✓) /.test(l)) passed++;
    // A failure may be listed again in a recap: count each name once.
    else if (/^\s*(\(fail\)|✗) /.test(l)) failed.add(l.replace(/ \[[\d.]+m?s\]$/, "").trim());
    else if (/^\s*(\(skip\)|») /.test(l)) skipped++;
  }
  return { passed, failed: failed.size, skipped };
}

/**
 * The result of a `bun test` run from its stderr (where bun reports), its stdout and its exit
 * status. A run without summary counts one more failure (the crash); a non-zero status never
 * yields 0 failures.
 */
export function countResults(stderr: string, stdout: string, status: number): Counts {
  let counts = parseSummary(stderr) ?? parseSummary(stderr + "\n" + stdout);
  if (!counts) {
    counts = countLines(stderr + "\n" + stdout);
    counts.failed++;
  }
  if (status !== 0 && counts.failed === 0) counts.failed = 1;
  return counts;
}

export function finalLine(c: Counts): string {
  return `${c.passed} passed, ${c.failed} failed${c.skipped ? `, ${c.skipped} skipped` : ""}`;
}

async function pump(stream: ReadableStream<Uint8Array>, out: NodeJS.WriteStream, sink: string[]): Promise<void> {
  const decoder = new TextDecoder();
  const reader = stream.getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    out.write(value);
    sink.push(decoder.decode(value, { stream: true }));
  }
  sink.push(decoder.decode());
}

async function main(): Promise<number> {
  try {
    await ensureDeps();
  } catch (err) {
    console.error(`test: ${(err as Error).message}`);
    console.log(finalLine({ passed: 0, failed: 1, skipped: 0 }));
    return 1;
  }
  // Integration tests start real servers and containers: a generous per-test limit (bun's
  // default is 5 s, and setDefaultTimeout in a preload does not reach other files).
  const args = process.argv.slice(2);
  const timeout = args.some((a) => a.startsWith("--timeout")) ? [] : ["--timeout", "300000"];
  const proc = Bun.spawn([process.execPath, "test", ...timeout, ...args], {
    cwd: join(import.meta.dir, ".."),
    stdin: "inherit",
    stdout: "pipe",
    stderr: "pipe",
  });
  const forward = (sig: NodeJS.Signals) => () => proc.kill(sig);
  process.on("SIGINT", forward("SIGINT"));
  process.on("SIGTERM", forward("SIGTERM"));
  // Keep the two streams apart: bun writes the results to stderr, tests may print to stdout.
  const out: string[] = [];
  const err: string[] = [];
  await Promise.all([pump(proc.stdout, process.stdout, out), pump(proc.stderr, process.stderr, err)]);
  const status = await proc.exited;
  const counts = countResults(err.join(""), out.join(""), status);
  // Bun's last words and ours must not interleave.
  await new Promise<void>((r) => process.stderr.write("", () => r()));
  console.log(finalLine(counts));
  return counts.failed > 0 || status !== 0 ? 1 : 0;
}

if (import.meta.main) process.exit(await main());
