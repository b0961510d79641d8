// The API's event stream (GET /api/v1/events, server-sent events), shared by the whole app:
// one EventSource, opened while any screen listens and closed shortly after the last one
// leaves. Screens subscribe by object kind; `resync` (changes may have been missed: the
// server reconnected to the database, or this stream was down) reaches every subscriber.
import { useEffect, useRef } from "preact/hooks";
import { api, BASE, sessionExpired } from "./api.ts";

export interface ChangeEvent {
  object: string;
  op: "create" | "update" | "delete";
  id: number;
  tenant_id: number | null;
}

/** A change, or `"resync"`: reload everything shown. */
export type Listener = (e: ChangeEvent | "resync") => void;

const subs = new Map<Listener, Set<string>>();
let source: EventSource | undefined;
let closeTimer: ReturnType<typeof setTimeout> | undefined;
let retryTimer: ReturnType<typeof setTimeout> | undefined;
let retryMs = 1000;
let lostSince = false;

function dispatch(e: ChangeEvent | "resync"): void {
  for (const [f, kinds] of subs) if (e === "resync" || kinds.has(e.object)) f(e);
}

function open(): void {
  if (source || retryTimer) return;
  const es = new EventSource(`${BASE}/events`, { withCredentials: true });
  source = es;
  es.addEventListener("ready", () => {
    retryMs = 1000;
    // Back after a break: whatever happened meanwhile was not seen.
    if (lostSince) dispatch("resync");
    lostSince = false;
  });
  es.addEventListener("change", (m) => {
    try {
      dispatch(JSON.parse((m as MessageEvent).data));
    } catch {
      dispatch("resync");
    }
  });
  es.addEventListener("resync", () => dispatch("resync"));
  es.addEventListener("logout", () => {
    close();
    if (subs.size) sessionExpired();
  });
  es.onerror = () => {
    lostSince = true;
    if (es.readyState !== EventSource.CLOSED) return; // the browser retries by itself
    // Refused (401, server gone): ask whether the session lives (a 401 there ends it), then retry.
    source = undefined;
    if (!subs.size) return;
    retryTimer = setTimeout(() => {
      retryTimer = undefined;
      api.get("/session").then(
        () => subs.size && open(),
        () => subs.size && open(),
      );
    }, retryMs);
    retryMs = Math.min(retryMs * 2, 30_000);
  };
}

function close(): void {
  source?.close();
  source = undefined;
  clearTimeout(retryTimer);
  retryTimer = undefined;
}

/** Listens to changes of these object kinds; returns the unsubscribe function. */
export function subscribe(kinds: string[], f: Listener): () => void {
  subs.set(f, new Set(kinds));
  clearTimeout(closeTimer);
  open();
  return () => {
    subs.delete(f);
    // Navigating unmounts one screen before the next subscribes: keep the stream a moment.
    if (!subs.size) closeTimer = setTimeout(() => !subs.size && close(), 1000);
  };
}

/**
 * Calls `f` with the changes of these kinds while the component is mounted, batched: at most
 * once per `delayMs`, with the ids changed meanwhile (`all` when a create/delete/resync asks
 * for a full reload).
 */
export function useChanges(
  kinds: string[],
  f: (changed: { all: boolean; ids: Set<number>; kinds: Set<string> }) => void,
  delayMs = 250,
): void {
  const fn = useRef(f);
  fn.current = f;
  const key = kinds.join(",");
  useEffect(() => {
    if (!kinds.length) return;
    let pending: { all: boolean; ids: Set<number>; kinds: Set<string> } | undefined;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const unsub = subscribe(kinds, (e) => {
      pending ??= { all: false, ids: new Set(), kinds: new Set() };
      if (e === "resync") pending.all = true;
      else {
        pending.kinds.add(e.object);
        if (e.op === "update") pending.ids.add(e.id);
        else pending.all = true;
      }
      timer ??= setTimeout(() => {
        const p = pending!;
        pending = undefined;
        timer = undefined;
        fn.current(p);
      }, delayMs);
    });
    return () => {
      unsub();
      clearTimeout(timer);
    };
  }, [key]);
}
