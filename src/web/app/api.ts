// The admin API from the browser: JSON in and out, the session in an HttpOnly cookie (set by
// POST /login), errors as ApiError with the server's message and the field it names.
export class ApiError extends Error {
  constructor(
    message: string,
    readonly status: number,
    readonly field?: string,
    readonly dependents?: unknown,
  ) {
    super(message);
  }
}

export const BASE = "/api/v1";

let onExpired: () => void = () => {};
/** Called once when a request answers 401: the session ended (expired, logged out elsewhere). */
export const whenSessionExpires = (f: () => void) => void (onExpired = f);
/** Starts the session-expired flow from elsewhere (the event stream's `logout`). */
export const sessionExpired = () => onExpired();

export async function call<T = any>(
  method: string,
  path: string,
  body?: unknown,
  init: { signal?: AbortSignal; raw?: boolean } = {},
): Promise<T> {
  let res: Response;
  try {
    res = await fetch(BASE + path, {
      method,
      credentials: "same-origin",
      headers: { "x-qvd-source": "wat", ...(body !== undefined ? { "content-type": "application/json" } : {}) },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: init.signal,
    });
  } catch (err) {
    if ((err as Error).name === "AbortError") throw err;
    throw new ApiError("cannot reach the server; check the connection and try again", 0);
  }
  const text = await res.text();
  let parsed: any;
  try {
    parsed = text ? JSON.parse(text) : undefined;
  } catch {
    parsed = undefined;
  }
  if (!res.ok) {
    const e = parsed?.error;
    if (res.status === 401 && path !== "/login") onExpired();
    throw new ApiError(e?.message ?? `the server answered ${res.status}`, res.status, e?.field, e?.dependents);
  }
  return parsed as T;
}

export const api = {
  get: <T = any>(path: string, signal?: AbortSignal) => call<T>("GET", path, undefined, { signal }),
  post: <T = any>(path: string, body: unknown = {}) => call<T>("POST", path, body),
  put: <T = any>(path: string, body: unknown = {}) => call<T>("PUT", path, body),
  patch: <T = any>(path: string, body: unknown) => call<T>("PATCH", path, body),
  del: <T = any>(path: string) => call<T>("DELETE", path),
};

/** A list page as the API answers it. */
export interface Page<T> {
  total: number;
  limit: number;
  offset: number;
  items: T[];
}

/** Query string from a record (undefined and "" left out). */
export function qs(params: Record<string, string | number | boolean | undefined | null>): string {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") p.set(k, String(v));
  const s = p.toString();
  return s ? `?${s}` : "";
}
