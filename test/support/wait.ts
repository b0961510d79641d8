// Polling for tests: the one waitFor (a value, or undefined/false while not there yet).

/** Calls `f` every `stepMs` until it gives a value other than undefined or false; throws naming `what` after `timeoutMs`. */
export async function waitFor<T>(what: string, f: () => Promise<T | undefined | false> | T | undefined | false, timeoutMs = 15_000, stepMs = 100): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await f();
    if (v !== undefined && v !== false) return v as T;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(stepMs);
  }
}
