// The node's side of the VMA protocol (src/virt/README.md): HTTP to the guest's VMA with the
// per-start secret. Used by the HKD (ping, poweroff, expire) and later the L7R (x_start…).

export class VmaError extends Error {
  constructor(
    message: string,
    readonly status?: number,
  ) {
    super(message);
    this.name = "VmaError";
  }
}

export interface VmaTarget {
  address: string;
  port: number;
  secret: string;
}

export async function vmaCall<T = unknown>(t: VmaTarget, method: string, body?: unknown, timeoutMs = 3000): Promise<T> {
  let res: Response;
  try {
    res = await fetch(`http://${t.address}:${t.port}/vma/${method}`, {
      method: body === undefined ? "GET" : "POST",
      headers: { "x-qvd-vma-secret": t.secret, ...(body === undefined ? {} : { "content-type": "application/json" }) },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(timeoutMs),
    });
  } catch (err) {
    throw new VmaError(`VMA at ${t.address}:${t.port} did not answer ${method}: ${(err as Error).message}`);
  }
  const text = await res.text();
  if (!res.ok) throw new VmaError(`VMA ${method} failed with ${res.status}: ${vmaReason(text)}`, res.status);
  try {
    return (text ? JSON.parse(text) : {}) as T;
  } catch {
    throw new VmaError(`VMA ${method} answered something that is not JSON`);
  }
}

/**
 * The reason in a VMA's error answer (`{"error": "..."}`), or its text: one line of at most 200
 * characters, since it reaches users and logs and the guest's VMA is not trusted to keep it short.
 */
function vmaReason(text: string): string {
  let why = text;
  try {
    const e = (JSON.parse(text) as { error?: unknown }).error;
    if (typeof e === "string") why = e;
  } catch {}
  return why
    .replace(/[\x00-\x1f\x7f]+/g, " ")
    .trim()
    .slice(0, 200);
}

/** Pings until the VMA answers or the deadline passes (or `signal` aborts); true when it answered. */
export async function waitForVma(t: VmaTarget, deadline: number, signal?: AbortSignal): Promise<boolean> {
  let delay = 50;
  while (Date.now() < deadline && !signal?.aborted) {
    try {
      await vmaCall(t, "ping", undefined, Math.max(200, Math.min(2000, deadline - Date.now())));
      return true;
    } catch {
      await Bun.sleep(delay);
      delay = Math.min(500, delay * 2);
    }
  }
  return false;
}
