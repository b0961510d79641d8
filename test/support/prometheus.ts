// Reading Prometheus exposition text in tests (src/metrics.ts writes it).

/** The value of one series (`name{labels}` exactly as written), undefined when absent. */
export function sample(text: string, series: string): number | undefined {
  const line = text.split("\n").find((l) => l.startsWith(`${series} `));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
}
