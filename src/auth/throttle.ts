// Failed-login throttling, one policy for the admin API and the L7R (README: "Users").
//
// Each key (an account of a service; a client address) has its checked failures. The first
// `tries` failures cost nothing; after that each one makes the next try wait, twice as long
// each time (delay, 2×delay, … up to max_delay), announced as Retry-After. A try takes its slot
// atomically before the password is checked (login_throttle row locks, src/db/throttle.ts), so
// N parallel connections get no more checks than one would; a try refused with 429 is not
// checked and changes nothing, so it cannot extend the wait. After the wait ONE try is checked:
// if it is right, it succeeds. An address the account logged in from recently is not held back
// by the account's failures (only by its own), so strangers elsewhere cannot keep the owner
// out; a success forgets no failures, so the owner's logins do not buy strangers more guesses.
import { createHash } from "node:crypto";
import { Config } from "../config.ts";
import type { Sql } from "../db/pool.ts";
import {
  deleteStaleThrottleRows,
  endThrottledTry,
  withThrottleRows,
  type ThrottleRow,
  type ThrottleUpdate,
} from "../db/throttle.ts";
import { logger } from "../log.ts";

const log = logger("throttle");

export interface ThrottlePolicy {
  /** Failures of one account (all addresses) before its tries must wait. */
  accountTries: number;
  /** Failures from one address (all accounts) before its tries must wait. */
  addressTries: number;
  /** Seconds of the first wait; each further failure doubles it. */
  delayS: number;
  maxDelayS: number;
  /** Seconds without a failure after which a key's failures are forgotten. */
  forgetS: number;
  /** Seconds an address an account logged in from stays exempt from that account's failures. */
  knownForS: number;
}

/** The policy from the `auth.throttle.*` keys. */
export function throttlePolicy(cfg: Pick<Config, "get">): ThrottlePolicy {
  return {
    accountTries: cfg.get("auth.throttle.account.tries"),
    addressTries: cfg.get("auth.throttle.address.tries"),
    delayS: cfg.get("auth.throttle.delay"),
    maxDelayS: cfg.get("auth.throttle.max_delay"),
    forgetS: cfg.get("auth.throttle.forget"),
    knownForS: cfg.get("auth.throttle.known_for"),
  };
}

/** The keys' defaults. */
export const DEFAULT_POLICY: ThrottlePolicy = throttlePolicy(new Config());

/** How long a try in flight holds its slot if its process dies before it ends the try. */
const LEASE_S = 120;

export type Gate =
  | {
      ok: true;
      /** Ends the try: whether the password (or the plugin chain) accepted it; null: it could not be checked (an error), so it does not count. */
      done(succeeded: boolean | null): Promise<void>;
    }
  | { ok: false /** Whole seconds to announce as Retry-After (at least 1). */; retryAfterS: number };

/** Seconds a key must wait after its `failures`-th failure. */
export const waitAfter = (failures: number, tries: number, p: ThrottlePolicy) =>
  failures < tries ? 0 : Math.min(p.maxDelayS, p.delayS * 2 ** Math.min(failures - tries, 30));

/** Whether a key admits a try now; else the seconds until it should. Pure, for the row lock. */
export function decide(
  row: ThrottleRow,
  tries: number,
  now: Date,
  p: ThrottlePolicy,
): { admit: true; update: ThrottleUpdate } | { admit: false; waitS: number } {
  const t = now.getTime();
  const forgotten = !row.failed_at || t - row.failed_at.getTime() > p.forgetS * 1000;
  const failures = forgotten ? 0 : row.failures;
  const pending = row.pending_until && row.pending_until.getTime() > t ? row.pending : 0;
  const retryAt = failures >= tries ? row.failed_at!.getTime() + waitAfter(failures, tries, p) * 1000 : -Infinity;
  if (failures + pending < tries || (pending === 0 && t >= retryAt))
    return {
      admit: true,
      update: {
        key: row.key,
        failures,
        failed_at: forgotten ? null : row.failed_at,
        pending: pending + 1,
        pending_until: new Date(t + LEASE_S * 1000),
      },
    };
  // Held by tries in flight: if they fail, the wait is the one after them.
  return { admit: false, waitS: pending > 0 ? waitAfter(failures + pending, tries, p) : (retryAt - t) / 1000 };
}

// Attacker-chosen account names are bounded in the keys by hashing the long ones.
const keyOf = (...parts: string[]) => {
  const k = parts.join("|");
  return k.length <= 200 ? k : "sha256:" + createHash("sha256").update(k).digest("hex");
};

/** An IPv4-mapped IPv6 address counts as the IPv4 address; none known is one shared source. */
export const normalizeAddress = (a: string | undefined) =>
  a ? a.replace(/^::ffff:(?=\d+\.\d+\.\d+\.\d+$)/i, "").toLowerCase() : "unknown";

let lastSweep = 0;

/**
 * Asks to check one login: `service` separates the API's administrators from the L7R's users,
 * `account` is the name as given (known or not: the answer is the same), `address` the client's.
 */
export async function beginLogin(
  sql: Sql,
  p: ThrottlePolicy,
  t: { service: "api" | "l7r"; account: string; address: string | undefined },
): Promise<Gate> {
  const address = normalizeAddress(t.address);
  const accountKey = keyOf(t.service, "account", t.account);
  const addressKey = keyOf(t.service, "address", address);
  const knownKey = keyOf(t.service, "known", t.account, address);
  type Decision = { ok: true; keys: string[] } | { ok: false; waitS: number };
  const gate = await withThrottleRows<Decision>(sql, [accountKey, addressKey], knownKey, (rows, now, knownAt) => {
    const known = p.knownForS > 0 && knownAt !== null && now.getTime() - knownAt.getTime() <= p.knownForS * 1000;
    const checks: [string, number][] = [
      [addressKey, p.addressTries],
      ...(known ? [] : [[accountKey, p.accountTries] as [string, number]]),
    ];
    const updates: ThrottleUpdate[] = [];
    let waitS = 0;
    for (const [key, tries] of checks) {
      const d = decide(rows.get(key)!, tries, now, p);
      if (d.admit) updates.push(d.update);
      else waitS = Math.max(waitS, d.waitS);
    }
    return waitS > 0
      ? { result: { ok: false, waitS }, updates: [] }
      : { result: { ok: true, keys: updates.map((u) => u.key) }, updates };
  });
  if (!gate.ok) return { ok: false, retryAfterS: Math.max(1, Math.ceil(gate.waitS)) };
  let ended = false;
  return {
    ok: true,
    async done(succeeded) {
      if (ended) return;
      ended = true;
      const held = gate.keys;
      await endThrottledTry(sql, {
        failed: succeeded === false ? held : [],
        released: succeeded === false ? [] : held,
        succeeded: succeeded ? [knownKey] : [],
      });
      if (Date.now() - lastSweep > 600_000) {
        lastSweep = Date.now();
        await deleteStaleThrottleRows(sql, Math.max(p.forgetS, p.knownForS) + LEASE_S).catch((e) =>
          log.warn("could not delete old throttle rows", { error: String(e) }),
        );
      }
    },
  };
}
