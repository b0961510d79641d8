// Output of the admin CLI for people: aligned tables, `key: value` lines. Scripts use --json,
// which prints the API's JSON unchanged. Bold headers only on a terminal (and not with NO_COLOR).

const colour = () => Boolean(process.stdout.isTTY) && !process.env.NO_COLOR && process.env.TERM !== "dumb";
const bold = (s: string) => (colour() ? `\x1b[1m${s}\x1b[22m` : s);

const ISO = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$/;

/** One value as text: null as -, booleans as yes/no, lists comma-separated. */
export function cell(v: unknown, opts: { short?: boolean } = {}): string {
  if (v === null || v === undefined) return "-";
  if (typeof v === "boolean") return v ? "yes" : "no";
  if (Array.isArray(v))
    return v.length === 0
      ? "-"
      : v.every((x) => typeof x !== "object" || x === null)
        ? v.map((x) => cell(x)).join(",")
        : JSON.stringify(v);
  if (typeof v === "object") return JSON.stringify(v);
  const s = String(v);
  if (opts.short && ISO.test(s)) return s.slice(0, 19).replace("T", " ");
  return s;
}

const MAX_CELL = 60;

/** An aligned table: a header row of field names, then one row per item. */
export function table(items: Record<string, unknown>[], columns: string[]): string {
  const truncate = Boolean(process.stdout.isTTY);
  const rows = items.map((it) =>
    columns.map((c) => {
      let s = cell(it[c], { short: true }).replace(/\s*\n\s*/g, " ");
      if (truncate && s.length > MAX_CELL) s = s.slice(0, MAX_CELL - 1) + "…";
      return s;
    }),
  );
  const widths = columns.map((c, i) => Math.max(c.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: string[]) =>
    cells
      .map((s, i) => (i === cells.length - 1 ? s : s.padEnd(widths[i]!)))
      .join("  ")
      .trimEnd();
  return [bold(line(columns)), ...rows.map(line)].join("\n");
}

/** `key: value` lines, keys aligned. Nested objects are flattened as `a.b: value`. */
export function keyValues(obj: Record<string, unknown>, prefix = ""): string {
  const pairs: [string, string][] = [];
  const walk = (o: Record<string, unknown>, p: string) => {
    for (const [k, v] of Object.entries(o)) {
      if (v && typeof v === "object" && !Array.isArray(v) && Object.keys(v).length > 0)
        walk(v as Record<string, unknown>, `${p}${k}.`);
      else if (Array.isArray(v) && v.some((x) => x && typeof x === "object")) {
        if (v.length === 0) pairs.push([p + k, "-"]);
        v.forEach((x, i) => {
          if (x && typeof x === "object") walk(x as Record<string, unknown>, `${p}${k}.${i}.`);
          else pairs.push([`${p}${k}.${i}`, cell(x)]);
        });
      } else pairs.push([p + k, cell(v)]);
    }
  };
  walk(obj, prefix);
  const w = Math.max(0, ...pairs.map(([k]) => k.length));
  return pairs.map(([k, v]) => `${(k + ":").padEnd(w + 1)} ${v}`).join("\n");
}

export const printJson = (v: unknown) => console.log(JSON.stringify(v, null, 2));

/** `user 12 (alice)` */
export function describe(label: string, row: Record<string, unknown> | undefined, id?: number | string): string {
  const name = row ? (row.name ?? row.key ?? row.version) : undefined;
  const i = row?.id ?? id;
  return `${label} ${i}${name !== undefined && name !== null ? ` (${name})` : ""}`;
}
