// A small history router: the app's URLs live under /wat/ (the server answers index.html for
// all of them, so they can be reloaded and bookmarked).
import { useEffect, useState } from "preact/hooks";

export const ROOT = "/wat";

const listeners = new Set<() => void>();
const notify = () => {
  for (const f of listeners) f();
};
addEventListener("popstate", notify);

/** The app path (without /wat) and its query. */
export function current(): { path: string; query: URLSearchParams } {
  const p = location.pathname.startsWith(ROOT) ? location.pathname.slice(ROOT.length) : "/";
  return { path: p === "" ? "/" : p, query: new URLSearchParams(location.search) };
}

export function navigate(to: string, opts: { replace?: boolean } = {}): void {
  const url = ROOT + (to.startsWith("/") ? to : `/${to}`);
  if (url === location.pathname + location.search) return;
  if (opts.replace) history.replaceState(null, "", url);
  else history.pushState(null, "", url);
  notify();
}

/** Re-renders the caller when the URL changes. */
export function useLocation(): { path: string; query: URLSearchParams } {
  const [, setTick] = useState(0);
  useEffect(() => {
    const f = () => setTick((n) => n + 1);
    listeners.add(f);
    return () => void listeners.delete(f);
  }, []);
  return current();
}

/** Matches "/vms/:id" against a path: the params, or undefined. */
export function match(pattern: string, path: string): Record<string, string> | undefined {
  const a = pattern.split("/").filter(Boolean);
  const b = path.split("/").filter(Boolean);
  if (a.length !== b.length) return undefined;
  const params: Record<string, string> = {};
  for (let i = 0; i < a.length; i++) {
    if (a[i]!.startsWith(":")) params[a[i]!.slice(1)] = decodeURIComponent(b[i]!);
    else if (a[i] !== b[i]) return undefined;
  }
  return params;
}

/** href for an app path (for <a>, so middle-click and "open in new tab" work). */
export const href = (to: string) => ROOT + (to.startsWith("/") ? to : `/${to}`);
