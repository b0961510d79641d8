// The default user authentication of the L7R: argon2 passwords in the users table. Used when
// no plugin chain is configured (the chain of src/auth/ wires in through `Authenticate`).
import type { AuthResult, LoginAttempt } from "../auth/user-auth.ts";
import type { Db } from "../db/pool.ts";
import { verifyUserPassword } from "../db/users.ts";

/** What the L7R calls to authenticate a login attempt (a plugin chain or `localAuth`). */
export type Authenticate = (db: Db, attempt: LoginAttempt) => Promise<AuthResult>;

export const localAuth: Authenticate = async (db, a) => {
  if (a.password === "") return { ok: false, reason: "empty password" };
  const u = await verifyUserPassword(db, a.tenantId, a.login, a.password);
  if (!u) return { ok: false, reason: "wrong name or password" };
  return { ok: true, user: { userId: u.id, tenantId: u.tenant_id, login: u.name } };
};
