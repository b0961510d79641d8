// Failed-login throttling rows (login_throttle). The policy is src/auth/throttle.ts's; this
// file only reads and writes the counters, atomically across every process of the farm.
import type { Db, Sql } from "./pool.ts";

export interface ThrottleRow {
  key: string;
  failures: number;
  failed_at: Date | null;
  pending: number;
  pending_until: Date | null;
}

/** The row as a decision writes it back. */
export type ThrottleUpdate = ThrottleRow;

/**
 * Locks the rows of `keys` (made when missing), in key order so that concurrent callers never
 * deadlock, and hands them and the database's clock to `decide`; its updates are written in
 * the same transaction. `known`, when given, is also looked up: when it last succeeded.
 */
export async function withThrottleRows<T>(
  sql: Sql,
  keys: string[],
  known: string | undefined,
  decide: (rows: Map<string, ThrottleRow>, now: Date, knownAt: Date | null) => { result: T; updates: ThrottleUpdate[] },
): Promise<T> {
  const sorted = [...new Set(keys)].sort();
  return sql.begin(async (tx) => {
    await tx`INSERT INTO login_throttle (key) SELECT k FROM unnest(${sorted}::text[]) AS k ORDER BY k ON CONFLICT (key) DO NOTHING`;
    const rows = await tx`SELECT key, failures, failed_at, pending, pending_until FROM login_throttle
      WHERE key = ANY(${sorted}::text[]) ORDER BY key FOR UPDATE`;
    const [{ now }] = (await tx`SELECT now() AS now`) as unknown as [{ now: Date }];
    let knownAt: Date | null = null;
    if (known !== undefined) {
      const [k] = await tx`SELECT updated_at FROM login_throttle WHERE key = ${known}`;
      knownAt = (k?.updated_at as Date | undefined) ?? null;
    }
    const { result, updates } = decide(
      new Map(rows.map((r) => [r.key as string, r as unknown as ThrottleRow])),
      now,
      knownAt,
    );
    for (const u of updates)
      await tx`UPDATE login_throttle SET failures = ${u.failures}, failed_at = ${u.failed_at}, pending = ${u.pending},
          pending_until = ${u.pending_until}, updated_at = now() WHERE key = ${u.key}`;
    return result;
  }) as Promise<T>;
}

/**
 * Ends tries that `withThrottleRows` let through: each key gives back its slot and `failed`
 * keys count a failure; `succeeded` keys (made when missing) record a success now.
 */
export async function endThrottledTry(
  db: Db,
  k: { failed: string[]; released: string[]; succeeded: string[] },
): Promise<void> {
  // One row per statement: never two row locks held at once, so no deadlock with withThrottleRows.
  for (const key of [...k.failed].sort())
    await db`UPDATE login_throttle SET pending = greatest(pending - 1, 0), failures = failures + 1, failed_at = now(), updated_at = now()
      WHERE key = ${key}`;
  for (const key of [...k.released].sort())
    await db`UPDATE login_throttle SET pending = greatest(pending - 1, 0), updated_at = now() WHERE key = ${key}`;
  for (const key of k.succeeded)
    await db`INSERT INTO login_throttle (key) VALUES (${key}) ON CONFLICT (key) DO UPDATE SET updated_at = now()`;
}

/** Deletes rows untouched for `seconds` (their counts are forgotten by then anyway). */
export async function deleteStaleThrottleRows(db: Db, seconds: number): Promise<number> {
  return (await db`DELETE FROM login_throttle WHERE updated_at < now() - make_interval(secs => ${seconds}) RETURNING 1`)
    .length;
}
