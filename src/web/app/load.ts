// Loading data for a screen: the result, the error to show (and its HTTP status), and a reload
// that keeps the old data on screen while it runs (no flicker after each change).
import { useCallback, useEffect, useRef, useState } from "preact/hooks";
import { ApiError } from "./api.ts";
import { notify } from "./ui.tsx";

export interface Loaded<T> {
  data?: T;
  error?: string;
  /** HTTP status of the error (404: the object is gone). */
  status?: number;
  loading: boolean;
  reload: () => Promise<void>;
  /** Shows data the screen already has (the answer of a save) without loading it again. */
  set: (data: T) => void;
}

export function useLoad<T>(load: (signal: AbortSignal) => Promise<T>, deps: unknown[]): Loaded<T> {
  const [state, setState] = useState<{ data?: T; error?: string; status?: number; loading: boolean }>({
    loading: true,
  });
  const current = useRef<AbortController>();
  const reload = useCallback(async () => {
    current.current?.abort();
    const ac = new AbortController();
    current.current = ac;
    setState((s) => ({ ...s, loading: true }));
    try {
      const data = await load(ac.signal);
      if (!ac.signal.aborted) setState({ data, loading: false });
    } catch (err) {
      if (!ac.signal.aborted && (err as Error).name !== "AbortError")
        setState((s) => ({
          data: s.data,
          error: (err as Error).message,
          status: err instanceof ApiError ? err.status : undefined,
          loading: false,
        }));
    }
  }, deps);
  useEffect(() => {
    void reload();
    return () => current.current?.abort();
  }, [reload]);
  const set = useCallback((data: T) => setState({ data, loading: false }), []);
  return { ...state, reload, set };
}

/** A field error's text without the field name the server puts first ("value: value: …"). */
export function fieldMessage(message: string, ...names: (string | undefined)[]): string {
  let m = message;
  for (let again = true; again; ) {
    again = false;
    for (const n of names) if (n && m.startsWith(`${n}: `)) (m = m.slice(n.length + 2)), (again = true);
  }
  return m;
}

/**
 * A change made from a screen: busy while it runs, a notice when it is done, its error kept to
 * be shown, and `after` (a reload) either way. `act` tells whether the change succeeded.
 */
export function useAction(describe: (e: ApiError) => string = (e) => e.message) {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string>();
  const act = async (what: () => Promise<unknown>, done: string, after: () => unknown): Promise<boolean> => {
    setBusy(true);
    setError(undefined);
    let ok = false;
    try {
      await what();
      notify(done);
      ok = true;
    } catch (err) {
      setError(describe(err as ApiError));
    }
    await after();
    setBusy(false);
    return ok;
  };
  return { busy, error, act };
}
