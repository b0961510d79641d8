// What the L7R (user broker) reads and writes: its node, the user's desktops, and the session
// bookkeeping of vm_runtimes (user_state, l7r_host_id, l7r_session, user_cmd). Every write on a
// session is conditioned on the connection's own `l7r_session` uuid, so a connection that lost
// its session (taken over) can never change the new owner's row.
import type { Db } from "./pool.ts";

export interface L7rHost {
  id: number;
  name: string;
  address: string;
  state: string;
  blocked: boolean;
}

export async function l7rHost(db: Db, name: string): Promise<L7rHost | undefined> {
  const [r] =
    await db`SELECT h.id, h.name, h.address, coalesce(r.state, 'stopped') AS state, coalesce(r.blocked, false) AS blocked
    FROM hosts h LEFT JOIN host_runtimes r ON r.host_id = h.id WHERE h.name = ${name}`;
  return r as L7rHost | undefined;
}

/** Sessions a node's L7R held before it (re)started are over: their rows say nobody is connected. */
export async function releaseNodeSessions(db: Db, hostId: number): Promise<void> {
  await db`UPDATE vm_runtimes SET user_state = 'disconnected', user_state_ts = now(), user_cmd = NULL,
      l7r_host_id = NULL, l7r_pid = NULL, l7r_session = NULL WHERE l7r_host_id = ${hostId}`;
}

export async function userForL7r(
  db: Db,
  userId: number,
): Promise<{ id: number; name: string; tenant_id: number; blocked: boolean; tenant_blocked: boolean } | undefined> {
  const [r] = await db`SELECT u.id, u.name, u.tenant_id, u.blocked, t.blocked AS tenant_blocked
    FROM users u JOIN tenants t ON t.id = u.tenant_id WHERE u.id = ${userId}`;
  return r as any;
}

export interface UserVm {
  id: number;
  name: string;
  state: string;
  blocked: boolean;
}

export async function userVms(db: Db, userId: number): Promise<UserVm[]> {
  return (await db`SELECT v.id, v.name, r.vm_state AS state, r.blocked
    FROM vms v JOIN vm_runtimes r ON r.vm_id = v.id WHERE v.user_id = ${userId} ORDER BY v.id`) as unknown as UserVm[];
}

export interface SessionVm {
  vm_id: number;
  user_id: number;
  name: string;
  user_name: string;
  tenant_id: number;
  blocked: boolean;
  vm_state: string;
  vm_cmd: string | null;
  host_id: number | null;
  vm_address: string | null;
  vma_port: number | null;
  x_port: number | null;
  vma_secret: string | null;
  user_state: string;
  user_cmd: string | null;
  l7r_host_id: number | null;
  l7r_session: string | null;
}

export async function sessionVm(db: Db, vmId: number): Promise<SessionVm | undefined> {
  const [r] =
    await db`SELECT v.id AS vm_id, v.user_id, v.name, u.name AS user_name, v.tenant_id, r.blocked, r.vm_state, r.vm_cmd, r.host_id,
      host(r.vm_address) AS vm_address, r.vma_port, r.x_port, r.vma_secret, r.user_state, r.user_cmd, r.l7r_host_id, r.l7r_session::text AS l7r_session
    FROM vms v JOIN users u ON u.id = v.user_id JOIN vm_runtimes r ON r.vm_id = v.id WHERE v.id = ${vmId}`;
  return r as SessionVm | undefined;
}

/** Takes a free session (disconnected): this connection now owns it, `connecting`. */
export async function claimSession(
  db: Db,
  vmId: number,
  s: { hostId: number; session: string; pid: number; userIp?: string },
): Promise<boolean> {
  const rows = await db`UPDATE vm_runtimes SET user_state = 'connecting', user_state_ts = now(), user_cmd = NULL,
      l7r_host_id = ${s.hostId}, l7r_pid = ${s.pid}, l7r_session = ${s.session}::uuid, user_ip = ${s.userIp ?? null}::inet
    WHERE vm_id = ${vmId} AND user_state = 'disconnected' RETURNING vm_id`;
  return rows.length === 1;
}

/** Asks the connection holding the session to give it up (its node is notified by trigger). */
export async function abortOtherSession(db: Db, vmId: number, mySession: string): Promise<boolean> {
  const rows = await db`UPDATE vm_runtimes SET user_cmd = 'abort'
    WHERE vm_id = ${vmId} AND user_state IN ('connecting', 'connected') AND l7r_session IS DISTINCT FROM ${mySession}::uuid
      AND user_cmd IS NULL RETURNING vm_id`;
  return rows.length === 1;
}

/** connecting → connected, unless the session was aborted or taken meanwhile. */
export async function markConnected(db: Db, vmId: number, session: string): Promise<boolean> {
  const rows = await db`UPDATE vm_runtimes SET user_state = 'connected', user_state_ts = now()
    WHERE vm_id = ${vmId} AND l7r_session = ${session}::uuid AND user_state = 'connecting' AND user_cmd IS NULL RETURNING vm_id`;
  return rows.length === 1;
}

/** True when this connection still owns the session and nobody asked it to abort. */
export async function sessionStillMine(db: Db, vmId: number, session: string): Promise<boolean> {
  const [r] =
    await db`SELECT 1 FROM vm_runtimes WHERE vm_id = ${vmId} AND l7r_session = ${session}::uuid AND user_cmd IS NULL`;
  return !!r;
}

/** The session is over: the row is free again (only if this connection still owns it). */
export async function releaseSession(db: Db, vmId: number, session: string): Promise<void> {
  await db`UPDATE vm_runtimes SET user_state = 'disconnected', user_state_ts = now(), user_cmd = NULL,
      l7r_host_id = NULL, l7r_pid = NULL, l7r_session = NULL, user_ip = NULL
    WHERE vm_id = ${vmId} AND l7r_session = ${session}::uuid`;
}

/** Sessions held through this node that were told to abort. */
export async function abortedSessions(db: Db, hostId: number): Promise<{ vm_id: number; l7r_session: string }[]> {
  return (await db`SELECT vm_id, l7r_session::text AS l7r_session FROM vm_runtimes
    WHERE l7r_host_id = ${hostId} AND user_cmd = 'abort' AND l7r_session IS NOT NULL`) as unknown as {
    vm_id: number;
    l7r_session: string;
  }[];
}

/** Custom property values that apply to a VM's session, per level (l7r README: x_start). */
export interface PropertyLayers {
  osf: Record<string, string>;
  di: Record<string, string>;
  user: Record<string, string>;
  vm: Record<string, string>;
}

/**
 * The property values of a VM's OSF, of the image it runs (the one it was started with, else
 * none), of its user and of the VM itself, in one query.
 */
export async function sessionProperties(db: Db, vmId: number): Promise<PropertyLayers> {
  const rows = await db`
    WITH m AS (SELECT v.id, v.user_id, coalesce(r.current_osf_id, v.osf_id) AS osf_id, r.current_di_id AS di_id
               FROM vms v JOIN vm_runtimes r ON r.vm_id = v.id WHERE v.id = ${vmId})
    SELECT 'osf' AS level, p.key, x.value, p.tenant_id FROM m JOIN osf_properties x ON x.osf_id = m.osf_id JOIN properties p ON p.id = x.property_id
    UNION ALL
    SELECT 'di', p.key, x.value, p.tenant_id FROM m JOIN di_properties x ON x.di_id = m.di_id JOIN properties p ON p.id = x.property_id
    UNION ALL
    SELECT 'user', p.key, x.value, p.tenant_id FROM m JOIN user_properties x ON x.user_id = m.user_id JOIN properties p ON p.id = x.property_id
    UNION ALL
    SELECT 'vm', p.key, x.value, p.tenant_id FROM m JOIN vm_properties x ON x.vm_id = m.id JOIN properties p ON p.id = x.property_id
    ORDER BY tenant_id`; // a tenant's own definition wins over a global one of the same key
  const out: PropertyLayers = { osf: {}, di: {}, user: {}, vm: {} };
  for (const r of rows) out[r.level as keyof PropertyLayers][r.key] = r.value;
  return out;
}
