// A page of objects from the API, kept live: changed rows are fetched again by id (batched),
// and the page is reloaded when objects appear, disappear or may have moved in or out of
// the filter.
import { useEffect, useRef, useState } from "preact/hooks";
import { api, type Page } from "../api.ts";
import { useChanges } from "../events.ts";
import { toQuery } from "./query.ts";
import type { ObjectSpec, Row } from "./types.ts";

export interface ListState {
  page?: Page<Row>;
  error?: string;
  loading: boolean;
  reload: () => void;
}

/** `refresh`: a value whose change reloads the page (the detail page's object changed). */
export function useObjectList(
  spec: ObjectSpec,
  p: { filter: Record<string, string>; sort: string; limit: number; offset: number },
  refresh?: unknown,
): ListState {
  const [page, setPage] = useState<Page<Row>>();
  const [error, setError] = useState<string>();
  const [loading, setLoading] = useState(true);
  const [tick, setTick] = useState(0);
  const key = JSON.stringify(p);
  const current = useRef<Page<Row>>();
  current.current = page;
  const url = `/${spec.path}${toQuery({ ...p.filter, sort: p.sort, limit: p.limit, offset: p.offset })}`;

  useEffect(() => {
    const ac = new AbortController();
    setLoading(true);
    api.get<Page<Row>>(url, ac.signal).then(
      (res) => {
        setPage(res);
        setError(undefined);
        setLoading(false);
      },
      (err) => {
        if ((err as Error).name === "AbortError") return;
        setError((err as Error).message);
        setLoading(false);
      },
    );
    return () => ac.abort();
  }, [key, tick, refresh]);

  const reload = () => setTick((t) => t + 1);

  useChanges([spec.kind, ...(spec.alsoChangedBy ?? [])], async (c) => {
    const shown = current.current;
    if (!shown) return;
    // Creations, deletions, a resync or changes of other kinds: the page itself may differ.
    if (c.all || [...c.kinds].some((k) => k !== spec.kind)) return reload();
    const onPage = [...c.ids].filter((id) => shown.items.some((r) => r.id === id));
    if (onPage.length < c.ids.size) {
      if (Object.keys(p.filter).length) return reload(); // others may have entered the filter
      if (!onPage.length) return;
    }
    try {
      const res = await api.get<Page<Row>>(
        `/${spec.path}${toQuery({ ...p.filter, "id[in]": onPage.join(","), limit: onPage.length })}`,
      );
      if (res.items.length < onPage.length) return reload(); // some left the filter
      const byId = new Map(res.items.map((r) => [r.id, r]));
      setPage((pg) => pg && { ...pg, items: pg.items.map((r) => byId.get(r.id) ?? r) });
    } catch {
      reload();
    }
  });

  return { page, error, loading, reload };
}
