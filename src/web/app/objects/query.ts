// From a list's URL query (what the administrator chose, bookmarkable) to the API's list
// query, and the filter a mass action sends.
import type { ObjectSpec } from "./types.ts";

export const PAGE_SIZES = [20, 50, 100, 200];
export const DEFAULT_LIMIT = 50;

/** `%` and `_` typed in the Search box are literal, not wildcards. */
export const likeAny = (v: string) => `%${v.replace(/[\\%_]/g, (c) => `\\${c}`)}%`;

/** The API filter (no sort or paging) of the URL query. */
export function apiFilter(spec: ObjectSpec, q: URLSearchParams): Record<string, string> {
  const out: Record<string, string> = {};
  const search = q.get("q")?.trim();
  if (spec.search && search) out[`${spec.search}[like]`] = likeAny(search);
  for (const f of spec.filters) {
    const v = q.get(f.key);
    if (v === null || v === "") continue;
    Object.assign(out, f.toApi ? f.toApi(v) : { [f.key]: v });
  }
  for (const k of spec.passThrough ?? []) {
    const v = q.get(k);
    if (v !== null && v !== "") out[k] = v;
  }
  return out;
}

export function listParams(
  spec: ObjectSpec,
  q: URLSearchParams,
): { filter: Record<string, string>; sort: string; limit: number; offset: number } {
  const limit = Number(q.get("limit")) || DEFAULT_LIMIT;
  const page = Math.max(1, Number(q.get("page")) || 1);
  return {
    filter: apiFilter(spec, q),
    sort: q.get("sort") ?? spec.defaultSort ?? "name",
    limit,
    offset: (page - 1) * limit,
  };
}

/** A query string from a record, in order (URLSearchParams encodes brackets, which the API accepts). */
export function toQuery(p: Record<string, string | number | undefined>): string {
  const s = new URLSearchParams();
  for (const [k, v] of Object.entries(p)) if (v !== undefined && v !== "") s.set(k, String(v));
  const t = s.toString();
  return t ? `?${t}` : "";
}

/** What a mass action acts on: the chosen ids, or every object matching the filter. */
export type Selection =
  | { ids: Set<number>; allMatching: false }
  | { allMatching: true; filter: Record<string, string>; total: number };

export function selectionQuery(sel: Selection): string {
  if (!sel.allMatching) return toQuery({ "id[in]": [...sel.ids].join(",") });
  return toQuery(Object.keys(sel.filter).length ? sel.filter : { all: "true" });
}

export const selectionSize = (sel: Selection) => (sel.allMatching ? sel.total : sel.ids.size);
