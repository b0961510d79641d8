// What every part of one L7R shares: its options, the database, its bounds and metrics, and the
// state that outlives a connection (this node's sessions, browser display slots, VM waiters).
import type { Authenticate } from "../auth/chain.ts";
import type { ThrottlePolicy } from "../auth/throttle.ts";
import type { Config } from "../config.ts";
import type { Sql } from "../db/pool.ts";
import type { Registry } from "../metrics.ts";
import type { Admission } from "./admission.ts";
import type { L7rBounds, L7rOptions, L7rTimeouts } from "./options.ts";

export interface L7rContext {
  readonly o: L7rOptions;
  readonly sql: Sql;
  readonly t: L7rTimeouts;
  readonly bounds: L7rBounds;
  readonly admission: Admission;
  readonly metric: L7rMetrics;
  /** Seconds of heartbeat freshness a node needs to be given a VM. */
  readonly aliveWithin: number;
  /** The configuration the database's auth rows are layered over. */
  readonly authConfig: Config;
  readonly authenticate: Authenticate;
  readonly throttle: ThrottlePolicy;
  /** This node's sessions by uuid (vm_runtimes.l7r_session): each one's abort. */
  readonly sessions: Map<string, () => void>;
  /** Slots of the browser sessions held (each one's uid is l7r.web.uid_base + slot). */
  readonly webSlots: Set<number>;
  /** Resolves on the VM's next change notification, or after `ms`. */
  vmChanged(vmId: number, ms: number): Promise<void>;
}

export type L7rMetrics = ReturnType<typeof l7rMetrics>;

/** The L7R's metrics (docs/METRICS.md). */
export function l7rMetrics(reg: Registry) {
  return {
    logins: reg.counter(
      "qvd_l7r_logins_total",
      "User logins on this L7R, by kind (password, token) and result (ok, failed, throttled).",
    ),
    connects: reg.counter(
      "qvd_l7r_connects_total",
      "Connects to a desktop, by client (qvd: a QVD client's connect_to_vm; browser) and result (ok, failed).",
    ),
    connectSeconds: reg.histogram(
      "qvd_l7r_connect_seconds",
      "Seconds from a connect request to the desktop's NX session, by client and path: cold (the desktop had to start), resumed (its X session was suspended), warm (a new X session on a running desktop).",
    ),
    sessions: reg.gauge("qvd_l7r_sessions", "Desktop sessions this L7R holds now, by client."),
    spliceBytes: reg.counter(
      "qvd_l7r_splice_bytes_total",
      "NX bytes this L7R spliced, by client and direction (up: from the user), counted when a session ends.",
    ),
  };
}
