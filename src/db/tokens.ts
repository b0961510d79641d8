// User bearer tokens (created by /qvd/create_auth_token, accepted by the L7R). Only a hash is
// stored; a single-use token is consumed atomically.
import { createHash, randomBytes } from "node:crypto";
import { get, type Scope } from "./objects.ts";
import type { Db } from "./pool.ts";
import { users } from "./users.ts";
import { vms } from "./vms.ts";

const hashToken = (t: string) => createHash("sha256").update(t).digest("hex");

export interface TokenInfo {
  user_id: number;
  vm_id: number | null;
  expires_at: Date;
  multi_use: boolean;
  /** What the authentication plugin knew at the login that made the token (opaque here). */
  auth_params: Record<string, unknown> | null;
}

export async function createUserToken(
  db: Db,
  scope: Scope,
  opts: { userId: number; vmId?: number; ttlSeconds: number; multiUse?: boolean; authParams?: Record<string, unknown> },
): Promise<{ token: string; expires_at: Date }> {
  const user = await get(db, users, scope, opts.userId);
  if (opts.vmId !== undefined) {
    const vm = await get(db, vms, scope, opts.vmId);
    if (vm.user_id !== user.id) throw new Error("token VM does not belong to the user");
  }
  const token = randomBytes(32).toString("base64url");
  const [r] = await db`INSERT INTO user_tokens (token_hash, user_id, vm_id, expires_at, multi_use, auth_params)
    VALUES (${hashToken(token)}, ${user.id}, ${opts.vmId ?? null}, now() + make_interval(secs => ${opts.ttlSeconds}), ${opts.multiUse ?? false},
            ${opts.authParams ? JSON.stringify(opts.authParams) : null}::text::jsonb)
    RETURNING expires_at`;
  return { token, expires_at: r!.expires_at };
}

/** Checks a token and, when it is single-use, consumes it. Undefined when invalid. */
export async function useUserToken(db: Db, token: string): Promise<TokenInfo | undefined> {
  const [r] = await db`UPDATE user_tokens SET used_at = now()
     WHERE token_hash = ${hashToken(token)} AND expires_at > now() AND (multi_use OR used_at IS NULL)
     RETURNING user_id, vm_id, expires_at, multi_use, auth_params`;
  return r as TokenInfo | undefined;
}

/** Ends every bearer token of a user (a password change, or an administrator's revocation). */
export async function deleteUserTokens(db: Db, userId: number): Promise<number> {
  return (await db`DELETE FROM user_tokens WHERE user_id = ${userId} RETURNING 1`).length;
}

/** Revokes the tokens of a user the caller can see (another tenant's user: not found). */
export async function revokeUserTokens(db: Db, scope: Scope, userId: number): Promise<number> {
  const user = await get(db, users, scope, userId);
  return deleteUserTokens(db, user.id);
}

export async function deleteExpiredUserTokens(db: Db): Promise<number> {
  const rows = await db`DELETE FROM user_tokens WHERE expires_at <= now() RETURNING 1`;
  return rows.length;
}
