// Dashboard statistics, within the caller's tenant scope.
import { count, list, type Scope } from "./objects.ts";
import type { Db } from "./pool.ts";
import { dis } from "./dis.ts";
import { hosts } from "./hosts.ts";
import { osfs } from "./osfs.ts";
import { users } from "./users.ts";
import { vms } from "./vms.ts";

export async function statistics(db: Db, scope: Scope) {
  const blocked = [{ field: "blocked", op: "=" as const, value: true }];
  const [usersTotal, usersBlocked, usersConnected, vmsTotal, vmsBlocked, vmsRunning, hostsTotal, hostsBlocked, hostsRunning, osfsTotal, disTotal, disBlocked] =
    await Promise.all([
      count(db, users, scope),
      count(db, users, scope, blocked),
      count(db, users, scope, [{ field: "vms_connected", op: ">", value: 0 }]),
      count(db, vms, scope),
      count(db, vms, scope, blocked),
      count(db, vms, scope, [{ field: "vm_state", op: "=", value: "running" }]),
      count(db, hosts, scope),
      count(db, hosts, scope, blocked),
      count(db, hosts, scope, [{ field: "state", op: "=", value: "running" }]),
      count(db, osfs, scope),
      count(db, dis, scope),
      count(db, dis, scope, blocked),
    ]);
  const topHosts = await list(db, hosts, scope, {
    filters: [{ field: "vms_running", op: ">", value: 0 }], sort: [{ field: "vms_running", desc: true }], limit: 5, fields: ["name", "vms_running"],
  });
  const expiring = await list(db, vms, scope, {
    filters: [{ field: "expire_hard_at", op: "notnull" }], sort: [{ field: "expire_hard_at" }], limit: 5, fields: ["name", "user_name", "expire_soft_at", "expire_hard_at"],
  });
  return {
    users: { total: usersTotal, blocked: usersBlocked, connected: usersConnected },
    vms: { total: vmsTotal, blocked: vmsBlocked, running: vmsRunning },
    hosts: { total: hostsTotal, blocked: hostsBlocked, running: hostsRunning },
    osfs: { total: osfsTotal },
    dis: { total: disTotal, blocked: disBlocked },
    top_hosts: topHosts.rows,
    vms_close_to_expiry: expiring.rows,
  };
}
