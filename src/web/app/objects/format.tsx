// How values look in lists and detail pages: states as coloured badges, yes/no, sizes,
// links to other objects.
import type { ComponentChildren } from "preact";
import { Link, When } from "../ui.tsx";
import type { Row } from "./types.ts";

const STATE_KIND: Record<string, string> = {
  running: "ok",
  connected: "ok",
  ready: "ok",
  published: "ok",
  starting: "busy",
  stopping: "busy",
  connecting: "busy",
  uploading: "busy",
  verifying: "busy",
  new: "busy",
  zombie: "bad",
  lost: "bad",
  failed: "bad",
  debugging: "bad",
};

export function Badge(props: { value: string; kind?: string; title?: string }) {
  return (
    <span class={`badge badge-${props.kind ?? STATE_KIND[props.value] ?? "idle"}`} title={props.title}>
      {props.value}
    </span>
  );
}

export const state = (field: string) => (r: Row) => <Badge value={String(r[field])} />;

export const blocked = (r: Row) =>
  r.blocked ? (
    <Badge value="blocked" kind="bad" title={r.blocked_reason || undefined} />
  ) : (
    <span class="muted">no</span>
  );

export const yesNo = (field: string) => (r: Row) => (r[field] ? "yes" : <span class="muted">no</span>);

export const when = (field: string) => (r: Row) => <When at={r[field]} />;

export const text = (v: unknown): ComponentChildren =>
  v === null || v === undefined || v === "" ? <span class="muted">—</span> : String(v);

export function bytes(n: number | null | undefined): string {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v < 10 && i ? v.toFixed(1) : Math.round(v)} ${units[i]}`;
}

/** A link to another object's detail page, or a dash. */
export function objLink(path: string, idField: string, nameField: string) {
  return (r: Row) =>
    r[idField] === null || r[idField] === undefined ? (
      <span class="muted">—</span>
    ) : (
      <Link to={`/${path}/${r[idField]}`}>{String(r[nameField] ?? r[idField])}</Link>
    );
}

/** Seconds as "2 h 5 min". */
export function duration(s: number | null | undefined): string {
  if (s === null || s === undefined) return "never";
  if (s < 60) return `${s} s`;
  const d = Math.floor(s / 86400),
    h = Math.floor((s % 86400) / 3600),
    m = Math.floor((s % 3600) / 60);
  return [d && `${d} d`, h && `${h} h`, m && `${m} min`].filter(Boolean).join(" ") || "0 min";
}

export const STATE_OPTIONS = (states: readonly string[]): [string, string][] => states.map((s) => [s, s]);
export const YES_NO: [string, string][] = [
  ["true", "yes"],
  ["false", "no"],
];
