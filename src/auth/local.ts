// The local plugin: argon2id password hashes in the users table. A user it does not know, or
// one without a password (external users), is not its business: the next plugin decides.
import { findLoginUser } from "../db/auth.ts";
import type { Db } from "../db/pool.ts";
import { verifyUserPassword } from "../db/users.ts";
import type { AuthPlugin, AuthResult, LoginAttempt } from "./user-auth.ts";

export function localPlugin(): AuthPlugin {
  return {
    name: "local",
    async authenticate(db: Db, a: LoginAttempt): Promise<AuthResult> {
      // verifyUserPassword costs the same for unknown users: do it before deciding to pass.
      const row = await verifyUserPassword(db, a.tenantId, a.login, a.password);
      if (row) return { ok: true, user: { userId: row.id, tenantId: row.tenant_id, login: row.name } };
      const user = await findLoginUser(db, a.tenantId, a.login);
      if (!user?.has_password) return { ok: "pass" };
      return { ok: false, reason: "wrong password" };
    },
  };
}
