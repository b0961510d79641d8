// What a benchmark must undo (processes, namespaces, databases): run in reverse order at its
// end, after a failure, and on Ctrl-C or SIGTERM.
export const cleanups: (() => unknown)[] = [];
let cleaning: Promise<void> | undefined;

/** Whether the clean-up has begun (a benchmark interrupted starts nothing more). */
export const cleaningUp = () => cleaning !== undefined;

/** Runs every clean-up once, the latest first; a failing one is reported and the rest still run. */
export const cleanup = () =>
  (cleaning ??= (async () => {
    while (cleanups.length) {
      try {
        await cleanups.pop()!();
      } catch (e) {
        console.error(`cleanup: ${(e as Error).message}`);
      }
    }
  })());

/** Forgets a clean-up that already ran. */
export const untrack = (f: () => unknown) => {
  const i = cleanups.indexOf(f);
  if (i >= 0) cleanups.splice(i, 1);
};

for (const sig of ["SIGINT", "SIGTERM"] as const)
  process.on(sig, () => {
    console.error(`\n${sig}: cleaning up`);
    void cleanup().then(() => process.exit(130));
  });
