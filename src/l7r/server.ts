// The L7R: the users' TLS entry point (docs/PROTOCOL.md). One connection serves any number of
// requests in order (src/l7r/connection.ts, the endpoints in src/l7r/routes.ts); connect_to_vm
// ends HTTP with a 101 and splices the client's TLS stream with nxagent's
// (src/l7r/connect-flow.ts). Session bookkeeping lives in vm_runtimes (src/db/l7r.ts); an abort
// for one of this node's sessions arrives on the node's channel and closes it here.
import { authenticateUser, type Authenticate } from "../auth/chain.ts";
import { DEFAULT_POLICY } from "../auth/throttle.ts";
import { Config } from "../config.ts";
import * as L from "../db/l7r.ts";
import { listen, type Listener } from "../db/listen.ts";
import { aliveWithinS } from "../db/placement.ts";
import { logger } from "../log.ts";
import { Registry } from "../metrics.ts";
import { Admission } from "./admission.ts";
import { Connection } from "./connection.ts";
import { l7rMetrics, type L7rContext } from "./context.ts";
import { listenL7r } from "./listeners.ts";
import { DEFAULT_BOUNDS, DEFAULT_TIMEOUTS, type L7rOptions } from "./options.ts";
import { routes } from "./routes.ts";

export {
  DEFAULT_BOUNDS,
  DEFAULT_TIMEOUTS,
  type L7rBounds,
  type L7rOptions,
  type L7rTimeouts,
  type WebOptions,
} from "./options.ts";

const log = logger("l7r");

export interface L7r {
  port: number;
  /** Client connections held now, in all and by address (with their requests in progress). */
  load(): { connections: number; byAddress: Record<string, { connections: number; requests: number }> };
  stop(): Promise<void>;
}

export async function startL7r(o: L7rOptions): Promise<L7r> {
  const sql = o.sql;
  const authConfig = o.identityConfig ?? new Config();
  const bounds = { ...DEFAULT_BOUNDS, ...o.bounds };
  // Waiters for VM changes (qvd_events).
  const vmWaiters = new Map<number, Set<() => void>>();
  const ctx: L7rContext = {
    o,
    sql,
    t: { ...DEFAULT_TIMEOUTS, ...o.timeouts },
    bounds,
    admission: new Admission(bounds),
    metric: l7rMetrics(o.metrics ?? new Registry()),
    aliveWithin: o.aliveWithinS ?? aliveWithinS(new Config()), // the key's default
    authConfig,
    authenticate:
      o.authenticate ?? (((db, attempt) => authenticateUser(db, authConfig, attempt)) satisfies Authenticate),
    throttle: { ...DEFAULT_POLICY, ...o.throttle },
    sessions: new Map(),
    webSlots: new Set(),
    vmChanged(vmId, ms) {
      return new Promise((resolve) => {
        let set = vmWaiters.get(vmId);
        if (!set) vmWaiters.set(vmId, (set = new Set()));
        const done = () => {
          clearTimeout(timer);
          set!.delete(done);
          if (set!.size === 0) vmWaiters.delete(vmId);
          resolve();
        };
        const timer = setTimeout(done, ms);
        set.add(done);
      });
    },
  };

  const host0 = await L.l7rHost(sql, o.nodename);
  if (host0) await L.releaseNodeSessions(sql, host0.id);
  const checkAborts = async () => {
    if (!host0) return;
    for (const a of await L.abortedSessions(sql, host0.id)) ctx.sessions.get(a.l7r_session)?.();
  };
  const channels = ["qvd_events", ...(host0 ? [`qvd_host_${host0.id}`] : [])];
  const listener: Listener = await listen(o.databaseUrl, channels, {
    onNotify(channel, payload) {
      let p: any;
      try {
        p = JSON.parse(payload);
      } catch {
        return;
      }
      if (channel === "qvd_events" && p.object === "vm") for (const w of vmWaiters.get(p.id) ?? []) w();
      else if (p.user_cmd === "abort")
        void checkAborts().catch((e) => log.warn("abort check failed", { error: String(e) }));
    },
    onReady() {
      for (const ws of vmWaiters.values()) for (const w of ws) w();
      void checkAborts().catch(() => {});
    },
  });

  const sockets = await listenL7r(o, ctx.t.handshake, ctx.admission, (s, address, handshakeMs) => {
    const conn = new Connection(ctx, s, address);
    conn.start(routes(ctx, conn), handshakeMs);
  }).catch(async (err) => {
    await listener.close();
    throw err;
  });
  log.info("L7R listening", {
    address: `${o.hostname}:${sockets.port}`,
    node: o.nodename,
    ...(o.unix ? { unix: o.unix } : {}),
  });
  return {
    port: sockets.port,
    load: () => ctx.admission.load(),
    async stop() {
      sockets.stop();
      await listener.close();
    },
  };
}
