// The cluster monitor, run by every HKD: a node whose heartbeat is older than
// cluster.lost_after is declared lost, and its VMs are released to start elsewhere. That is
// safe because a node without the database stops its own desktops after hkd.fence_after, which
// the configuration keeps below lost_after (src/config.ts).
//
// Any number of monitors may run at once: each declaration is one conditional UPDATE of the
// node's row (src/db/lifecycle.ts declareNodeLost: only while it is not lost yet and its
// heartbeat is still that old), so the first monitor to commit wins and every other one finds
// the row changed and does nothing. No leader or advisory lock is needed, and a monitor that
// dies halfway leaves nothing half done (one transaction).
//
// Grace: a monitor declares nothing until its own database connection has worked for
// lost_after without a gap. After a farm-wide database outage every heartbeat is old; the
// grace gives every node lost_after of working database to heartbeat again first.
import { audit } from "../db/audit.ts";
import { staleHosts } from "../db/cluster.ts";
import { declareNodeLost } from "../db/lifecycle.ts";
import type { Db } from "../db/pool.ts";
import { logger } from "../log.ts";

const log = logger("monitor");

export interface MonitorOptions {
  sql: Db;
  /** The node this monitor runs on (never declared by itself). */
  host: { id: number; name: string };
  lostAfterS: number;
  /** Seconds the database has worked for this node without a gap; undefined: it is failing now. */
  dbOkForS: () => number | undefined;
  /** Called when the monitor's own queries fail (a gap in the database, for the grace). */
  onDbError?: (err: Error) => void;
}

export interface Declared {
  hostId: number;
  name: string;
  vms: number[];
}

export class ClusterMonitor {
  private inGrace = true;

  constructor(private readonly o: MonitorOptions) {}

  /** One round: declares the stale nodes lost (none while in grace); returns what it declared. */
  async check(): Promise<Declared[]> {
    const okFor = this.o.dbOkForS();
    if (okFor === undefined || okFor < this.o.lostAfterS) {
      if (!this.inGrace)
        log.info("database gap: no node is declared lost until it has worked for cluster.lost_after", {
          lost_after: this.o.lostAfterS,
        });
      this.inGrace = true;
      return [];
    }
    this.inGrace = false;
    const out: Declared[] = [];
    try {
      for (const h of await staleHosts(this.o.sql, this.o.lostAfterS, this.o.host.id)) {
        const reason = `no heartbeat for ${Math.round(h.silent_s)} s (cluster.lost_after ${this.o.lostAfterS} s), seen by node ${this.o.host.name}`;
        const res = await declareNodeLost(this.o.sql, h.id, reason, { staleForS: this.o.lostAfterS, by: "monitor" });
        if (!res.declared) continue; // another monitor was first, or the node came back
        log.warn("declared a node lost; its VMs are released", {
          node: h.name,
          id: h.id,
          vms: res.vms.join(",") || "none",
          reason,
        });
        await audit(this.o.sql, {
          action: "host.declare_lost",
          source: "hkd",
          ok: true,
          object_type: "host",
          object_id: h.id,
          object_name: h.name,
          arguments: { reason, released_vms: res.vms, by_node: this.o.host.name },
        }).catch((e) => log.error("could not write the audit log", { error: (e as Error).message }));
        out.push({ hostId: h.id, name: h.name, vms: res.vms });
      }
    } catch (err) {
      this.o.onDbError?.(err as Error);
      throw err;
    }
    return out;
  }
}
