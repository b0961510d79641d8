// Paging under a list: previous/next, the range shown, and the page size.
import { Button } from "../ui.tsx";
import { PAGE_SIZES } from "./query.ts";

export function Pager(props: {
  total: number;
  limit: number;
  offset: number;
  onPage: (n: number) => void;
  onLimit?: (n: number) => void;
}) {
  const { total, limit, offset } = props;
  const page = Math.floor(offset / limit) + 1;
  const pages = Math.max(1, Math.ceil(total / limit));
  if (total <= limit && offset === 0 && !props.onLimit) return null;
  return (
    <nav class="pager" aria-label="Pages">
      <Button disabled={page <= 1} onClick={() => props.onPage(page - 1)}>
        Previous
      </Button>
      <span>
        {total ? `${offset + 1}–${Math.min(offset + limit, total)} of ${total}` : "0"} · page {page} of {pages}
      </span>
      <Button disabled={page >= pages} onClick={() => props.onPage(page + 1)}>
        Next
      </Button>
      {props.onLimit && (
        <label class="page-size">
          Per page{" "}
          <select value={String(limit)} onChange={(e) => props.onLimit!(Number(e.currentTarget.value))}>
            {[...new Set([...PAGE_SIZES, limit])]
              .sort((a, b) => a - b)
              .map((n) => (
                <option key={n} value={String(n)}>
                  {n}
                </option>
              ))}
          </select>
        </label>
      )}
    </nav>
  );
}
