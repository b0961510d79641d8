// Dashboard statistics, within the caller's tenant scope.
import { count, countBy, list, type Scope } from "./objects.ts";
import type { Db } from "./pool.ts";
import { dis } from "./dis.ts";
import { hosts } from "./hosts.ts";
import { osfs } from "./osfs.ts";
import { users } from "./users.ts";
import { vms } from "./vms.ts";

export async function statistics(db: Db, scope: Scope) {
  const blocked = [{ field: "blocked", op: "=" as const, value: true }];
  const [
    usersTotal,
    usersBlocked,
    usersConnected,
    vmsTotal,
    vmsBlocked,
    vmsRunning,
    hostsTotal,
    hostsBlocked,
    hostsRunning,
    osfsTotal,
    disTotal,
    disBlocked,
  ] = await Promise.all([
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
  // Counted over the VMs in scope: a tenant's administrator sees how many of their own VMs each
  // node runs, not the other tenants'.
  const topHosts = (
    await countBy(
      db,
      vms,
      scope,
      ["host_id", "host_name"],
      [
        { field: "host_id", op: "notnull" },
        { field: "vm_state", op: "!=", value: "stopped" },
      ],
      5,
    )
  ).map((r) => ({ id: r.host_id as number, name: r.host_name as string, vms_running: r.n as number }));
  const expiring = await list(db, vms, scope, {
    filters: [{ field: "expire_hard_at", op: "notnull" }],
    sort: [{ field: "expire_hard_at" }],
    limit: 5,
    fields: ["name", "user_name", "expire_soft_at", "expire_hard_at"],
  });
  return {
    users: { total: usersTotal, blocked: usersBlocked, connected: usersConnected },
    vms: { total: vmsTotal, blocked: vmsBlocked, running: vmsRunning },
    hosts: { total: hostsTotal, blocked: hostsBlocked, running: hostsRunning },
    osfs: { total: osfsTotal },
    dis: { total: disTotal, blocked: disBlocked },
    top_hosts: topHosts,
    vms_close_to_expiry: expiring.rows,
  };
}
