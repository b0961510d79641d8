// HTTP plumbing of the admin API: errors as JSON, bounded body reading, list queries from
// query strings (`?vm_state=running&name[like]=desk%&sort=-name&limit=50`).
import { DataError, ValidationError } from "../db/errors.ts";
import { FILTER_OPS, type Filter, type FilterOp, type ListQuery } from "../db/objects.ts";
import type { Route } from "./context.ts";

export class ApiError extends DataError {}

export const unauthorized = (msg = "log in first") => new ApiError(msg, 401);
export const forbidden = (acls: string[]) => new ApiError(`missing permission: ${acls.join(", ")}`, 403);

/** The error document every failing route answers. */
export function errorBody(err: DataError): {
  error: { status: number; message: string; field?: string; dependents?: unknown };
} {
  const dependents = (err as { dependents?: unknown }).dependents;
  return {
    error: {
      status: err.status,
      message: err.message,
      ...(err.field ? { field: err.field } : {}),
      ...(dependents ? { dependents } : {}),
    },
  };
}

export const MAX_JSON_BODY = 1024 * 1024;

/** Reads and parses a JSON body (an absent body is `{}`), refusing anything over the limit. */
export async function readJson(request: Request, limit = MAX_JSON_BODY): Promise<unknown> {
  const len = Number(request.headers.get("content-length") ?? "0");
  if (len > limit) throw new ApiError(`request body too large (limit ${limit} bytes)`, 413);
  if (!request.body) return {};
  const reader = request.body.getReader();
  const chunks: Uint8Array[] = [];
  let size = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    size += value.byteLength;
    if (size > limit) {
      await reader.cancel();
      throw new ApiError(`request body too large (limit ${limit} bytes)`, 413);
    }
    chunks.push(value);
  }
  const text = Buffer.concat(chunks).toString("utf8");
  if (text.trim() === "") return {};
  const type = request.headers.get("content-type") ?? "application/json";
  if (!/^application\/(.+\+)?json\b/i.test(type))
    throw new ApiError("the body must be JSON (Content-Type: application/json)", 415);
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    throw new ApiError("the body is not valid JSON", 400);
  }
  if (depthOver(parsed, MAX_JSON_DEPTH))
    throw new ApiError(`the body is nested more than ${MAX_JSON_DEPTH} levels deep`, 400);
  return parsed;
}

/** No API body needs deep nesting; deeper ones would only strain whatever walks them. */
export const MAX_JSON_DEPTH = 32;

/** Whether a parsed JSON value is nested deeper than `max` (iteratively: no recursion to exhaust). */
function depthOver(v: unknown, max: number): boolean {
  const stack: [unknown, number][] = [[v, 0]];
  while (stack.length) {
    const [x, d] = stack.pop()!;
    if (!x || typeof x !== "object") continue;
    if (d >= max) return true;
    for (const y of Object.values(x)) stack.push([y, d + 1]);
  }
  return false;
}

/** The path of the first string (or key) holding a NUL character, which PostgreSQL text cannot store. */
function nulPath(v: unknown, path: string): string | undefined {
  if (typeof v === "string") return v.includes("\0") ? path : undefined;
  if (!v || typeof v !== "object") return undefined;
  for (const [k, x] of Object.entries(v)) {
    const p = path ? `${path}.${k}` : k;
    if (k.includes("\0")) return p;
    const found = nulPath(x, p);
    if (found !== undefined) return found;
  }
  return undefined;
}

/**
 * What every route's input must satisfy beyond its own validation: only the query parameters
 * it declares, no body unless it has a body schema, and no NUL characters anywhere.
 */
export function checkInput(route: Route, url: URL, params: Record<string, string>, body: unknown): void {
  for (const [k, v] of url.searchParams) {
    if (route.query !== "list" && !route.query?.includes(k)) throw new ValidationError(k, "unknown query parameter");
    if (k.includes("\0") || v.includes("\0")) throw new ValidationError(k, "must not contain NUL characters");
  }
  for (const [k, v] of Object.entries(params))
    if (v.includes("\0")) throw new ValidationError(k, "must not contain NUL characters");
  const nul = nulPath(body, "");
  if (nul !== undefined) throw new ValidationError(nul || undefined, "must not contain NUL characters");
  if (!route.body && !route.rawBody && body !== undefined) {
    const isObject = body !== null && typeof body === "object" && !Array.isArray(body);
    if (!isObject) throw new ValidationError(undefined, "this request takes no body");
    const keys = Object.keys(body);
    if (keys.length)
      throw new ValidationError(
        keys[0],
        `unknown field${keys.length > 1 ? "s" : ""} ${keys.map((k) => `"${k}"`).join(", ")}`,
      );
  }
}

const OP_NAMES: Record<string, FilterOp> = {
  eq: "=",
  ne: "!=",
  lt: "<",
  le: "<=",
  lte: "<=",
  gt: ">",
  ge: ">=",
  gte: ">=",
  in: "in",
  like: "like",
  null: "null",
  notnull: "notnull",
};
const RESERVED = new Set(["sort", "limit", "offset", "fields", "all"]);

/** Turns URL query parameters into a list query; unknown fields are caught by the data layer. */
export function listQueryFrom(params: URLSearchParams): ListQuery & { all: boolean } {
  const filters: Filter[] = [];
  const q: ListQuery & { all: boolean } = { filters, all: false };
  for (const [rawKey, value] of params) {
    const m = /^([a-z_][a-z0-9_]*)(?:\[([a-z]+)\])?$/.exec(rawKey);
    if (!m) throw new ValidationError(rawKey, "unknown query parameter");
    const [, key, opName] = m as unknown as [string, string, string | undefined];
    if (RESERVED.has(key) && !opName) {
      if (key === "sort")
        q.sort = value
          .split(",")
          .filter(Boolean)
          .map((s) => (s.startsWith("-") ? { field: s.slice(1), desc: true } : { field: s }));
      else if (key === "fields") q.fields = value.split(",").filter(Boolean);
      else if (key === "all") q.all = value === "" || value === "1" || value === "true";
      else {
        const n = Number(value);
        if (!/^\d+$/.test(value) || !Number.isSafeInteger(n))
          throw new ValidationError(key, "must be a non-negative integer");
        if (key === "limit") q.limit = n;
        else q.offset = n;
      }
      continue;
    }
    const op = opName === undefined ? "=" : OP_NAMES[opName];
    if (!op || !FILTER_OPS.includes(op))
      throw new ValidationError(rawKey, `unknown operator "${opName}"; use one of ${Object.keys(OP_NAMES).join(", ")}`);
    filters.push({ field: key, op, value });
  }
  return q;
}
