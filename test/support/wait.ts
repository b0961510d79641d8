// Waiting in tests: the one place that polls for a condition or bounds a wait on an event.
//   const ip = await waitFor("the VM's address", async () => (await vmRow(id)).ip ?? undefined, 30_000);
//   await until(() => got.length === 1, "the first notification", 30_000);
//   const closed = await poll(() => socket.closed, 5000);          // no throw: true, or undefined
//   const event = await within(stream.next(), 10_000, "event");   // fails "no event within 10 s"

export interface WaitOptions {
  /** Added to the timeout's message (the state seen, the end of a log). */
  detail?: () => string;
  /** A reason to stop waiting at once (the process died); thrown as `${what}: ${reason}`. */
  abort?: () => string | undefined;
}

/**
 * Calls `f` every `stepMs` until it gives a value other than undefined or false and returns that
 * value; after `timeoutMs`, undefined (no throw: for "wait a while for it, then look").
 */
export async function poll<T>(
  f: () => Promise<T | undefined | false> | T | undefined | false,
  timeoutMs: number,
  stepMs = 100,
  o: { abort?: () => unknown } = {},
): Promise<T | undefined> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await f();
    if (v !== undefined && v !== false) return v as T;
    if (o.abort?.() || Date.now() > end) return undefined;
    await Bun.sleep(stepMs);
  }
}

/** Calls `f` every `stepMs` until it gives a value other than undefined or false; throws naming `what` after `timeoutMs`. */
export async function waitFor<T>(
  what: string,
  f: () => Promise<T | undefined | false> | T | undefined | false,
  timeoutMs = 15_000,
  stepMs = 100,
  o: WaitOptions = {},
): Promise<T> {
  let why: string | undefined;
  const v = await poll(f, timeoutMs, stepMs, { abort: () => (why = o.abort?.()) });
  if (v !== undefined) return v;
  if (why) throw new Error(`${what}: ${why}`);
  throw new Error(`timed out waiting for ${what}${o.detail?.() ?? ""}`);
}

/** Waits until `pred` holds, trying every `stepMs`; throws naming `what` after `ms`. */
export async function until(
  pred: () => Promise<boolean> | boolean,
  what: string,
  ms = 60_000,
  stepMs = 100,
  o: WaitOptions = {},
): Promise<void> {
  await waitFor(what, pred, ms, stepMs, o);
}

/**
 * `p`, or a failure saying `no ${what} within N s` after `ms`: for a test whose only check is
 * that something happens, so that it fails as an expectation and not by the test's timeout.
 */
export async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no ${what} within ${ms / 1000} s`)), ms);
  });
  try {
    return await Promise.race([p, late]);
  } finally {
    clearTimeout(timer);
  }
}
