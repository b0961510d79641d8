// Administrator sessions of the admin API: a random bearer token (also the browser's cookie)
// of which only the SHA-256 is stored, with a sliding expiry.
import { createHash, randomBytes } from "node:crypto";
import { z } from "zod";
import { timestamp } from "./objects.ts";
import type { Db } from "./pool.ts";

export const SessionRow = z.object({
  id: z.string(), // first 12 hex digits of the hash: enough to name a session, useless to use it
  administrator_id: z.number().int(),
  administrator_name: z.string(),
  tenant_id: z.number().int(),
  created_at: timestamp,
  last_seen_at: timestamp,
  expires_at: timestamp,
  address: z.string().nullable(),
  source: z.enum(["api", "cli", "wat"]),
});
export type SessionRow = z.infer<typeof SessionRow>;

const hash = (token: string) => createHash("sha256").update(token).digest("hex");

export async function createSession(
  db: Db,
  s: { administratorId: number; ttlSeconds: number; address?: string; source: "api" | "cli" | "wat" },
): Promise<{ token: string; expires_at: Date }> {
  const token = randomBytes(32).toString("base64url");
  const [r] = await db`INSERT INTO admin_sessions (token_hash, administrator_id, expires_at, address, source)
    VALUES (${hash(token)}, ${s.administratorId}, now() + make_interval(secs => ${s.ttlSeconds}), ${s.address ?? null}, ${s.source})
    RETURNING expires_at`;
  return { token, expires_at: r!.expires_at };
}

/**
 * The administrator of a live session, extending its expiry (sliding). Blocked administrators
 * and administrators of blocked tenants have no live sessions.
 */
export async function useSession(
  db: Db,
  token: string,
  ttlSeconds: number,
): Promise<{ administratorId: number; sessionId: string } | undefined> {
  const h = hash(token);
  // Refresh at most every 10 s so a busy client does not write on every request.
  const [r] =
    await db`UPDATE admin_sessions s SET last_seen_at = now(), expires_at = now() + make_interval(secs => ${ttlSeconds})
     FROM administrators a JOIN tenants t ON t.id = a.tenant_id
    WHERE s.token_hash = ${h} AND s.expires_at > now() AND a.id = s.administrator_id AND NOT a.blocked AND NOT t.blocked
      AND s.last_seen_at < now() - interval '10 seconds'
    RETURNING s.administrator_id`;
  if (r) return { administratorId: r.administrator_id, sessionId: h.slice(0, 12) };
  const [fresh] = await db`SELECT s.administrator_id FROM admin_sessions s
      JOIN administrators a ON a.id = s.administrator_id JOIN tenants t ON t.id = a.tenant_id
     WHERE s.token_hash = ${h} AND s.expires_at > now() AND NOT a.blocked AND NOT t.blocked`;
  return fresh ? { administratorId: fresh.administrator_id, sessionId: h.slice(0, 12) } : undefined;
}

/** Whether a session is still live, without extending it (background checks are not activity). */
export async function sessionAlive(db: Db, token: string): Promise<boolean> {
  const [r] =
    await db`SELECT 1 FROM admin_sessions s JOIN administrators a ON a.id = s.administrator_id JOIN tenants t ON t.id = a.tenant_id
    WHERE s.token_hash = ${hash(token)} AND s.expires_at > now() AND NOT a.blocked AND NOT t.blocked`;
  return Boolean(r);
}

export async function endSession(db: Db, token: string): Promise<boolean> {
  return (await db`DELETE FROM admin_sessions WHERE token_hash = ${hash(token)} RETURNING 1`).length > 0;
}

/** Sessions, optionally of one tenant's administrators. */
export async function listSessions(db: Db, tenantId?: number): Promise<SessionRow[]> {
  const rows =
    await db`SELECT left(s.token_hash, 12) AS id, s.administrator_id, a.name AS administrator_name, a.tenant_id,
      s.created_at, s.last_seen_at, s.expires_at, s.address, s.source
    FROM admin_sessions s JOIN administrators a ON a.id = s.administrator_id
    WHERE s.expires_at > now() AND (${tenantId ?? null}::int IS NULL OR a.tenant_id = ${tenantId ?? null})
    ORDER BY s.last_seen_at DESC`;
  return rows.map((r) => SessionRow.parse(r));
}

/** Ends a session named by its id (as listed); returns whether one was ended. */
export async function endSessionById(db: Db, id: string, tenantId?: number): Promise<boolean> {
  if (!/^[0-9a-f]{12}$/.test(id)) return false;
  const rows = await db`DELETE FROM admin_sessions s USING administrators a
    WHERE left(s.token_hash, 12) = ${id} AND a.id = s.administrator_id
      AND (${tenantId ?? null}::int IS NULL OR a.tenant_id = ${tenantId ?? null}) RETURNING 1`;
  return rows.length > 0;
}

/** Ends an administrator's sessions, but the one of `keepToken` (a password change keeps the session that made it). */
export async function endSessionsOf(db: Db, administratorId: number, keepToken?: string): Promise<number> {
  const keep = keepToken ? hash(keepToken) : "";
  return (
    await db`DELETE FROM admin_sessions WHERE administrator_id = ${administratorId} AND token_hash <> ${keep} RETURNING 1`
  ).length;
}

export async function deleteExpiredSessions(db: Db): Promise<number> {
  return (await db`DELETE FROM admin_sessions WHERE expires_at <= now() RETURNING 1`).length;
}
