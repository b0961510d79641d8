// Running a program to its end in a test and looking at what it said (src/run.ts's run() is for
// programs that must succeed, and passes the test's whole environment on).
//   const r = await capture([process.execPath, "src/main.ts", "config", "show"], { env: cleanEnv({ HOME: dir }) });
//   expect([r.code, r.stderr]).toEqual([0, ""]);

/** How a program ended: its exit status and its whole output. */
export interface Captured {
  code: number;
  stdout: string;
  stderr: string;
}

/** The environment for a qvd child: no QVD_* settings leak in from the test's own; then `extra`. */
export function cleanEnv(extra: Record<string, string> = {}): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("QVD_") && v !== undefined) env[k] = v;
  return { ...env, ...extra };
}

/** Runs `argv` (with exactly the environment `env`, when given) and waits for its exit and its output; never throws on a status. */
export async function capture(
  argv: string[],
  o: { cwd?: string; env?: Record<string, string>; stdin?: string; timeoutMs?: number } = {},
): Promise<Captured> {
  const p = Bun.spawn(argv, {
    cwd: o.cwd,
    env: o.env,
    stdin: o.stdin !== undefined ? new TextEncoder().encode(o.stdin) : "ignore",
    stdout: "pipe",
    stderr: "pipe",
    timeout: o.timeoutMs,
  });
  const [stdout, stderr, code] = await Promise.all([
    new Response(p.stdout).text(),
    new Response(p.stderr).text(),
    p.exited,
  ]);
  return { code, stdout, stderr };
}

/** A process a test started (Bun's Subprocess, or anything with kill and exited). */
interface Stoppable {
  kill(signal?: number | NodeJS.Signals): void;
  exited: Promise<number>;
}

/**
 * Stops the processes a test started: SIGTERM to each (so that Xvfb and nxagent remove their
 * /tmp/.X*-lock files), up to `graceMs` for each to exit, then SIGKILL to what is left. One that
 * is gone already is no error.
 */
export async function stopAll(procs: Stoppable[], graceMs = 3000): Promise<void> {
  const signal = (s: NodeJS.Signals) => {
    for (const p of procs)
      try {
        p.kill(s);
      } catch {}
  };
  signal("SIGTERM");
  await Promise.all(procs.map((p) => Promise.race([p.exited, Bun.sleep(graceMs)])));
  signal("SIGKILL");
}
