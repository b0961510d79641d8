// User authentication for the L7R: a chain of plugins per tenant. Each plugin answers for a
// login attempt: a user (authenticated), a refusal (stop the chain: wrong password, outside
// the group…), or "not mine" (try the next plugin). The chain's result is what connect_to_vm,
// list_of_vm and the other endpoints act on.
import type { Db } from "../db/pool.ts";

export interface LoginAttempt {
  tenantId: number;
  tenantName: string;
  /** The login as the user typed it, without the tenant part (already normalised). */
  login: string;
  /** The password as sent (a TOTP code may be appended, as the original clients do). */
  password: string;
  /** The client's address, for throttling and audit. */
  address?: string;
}

export interface AuthenticatedUser {
  userId: number;
  tenantId: number;
  login: string;
  /** Passed to the VMA's x_start: uid/gid/home from the directory when the plugin knows them. */
  uid?: number;
  gid?: number;
  home?: string;
  /** Extra session parameters a plugin provides (properties for the VMA). */
  params?: Record<string, string>;
  /** Set for a bearer token made for one VM: the login reaches that VM only. */
  vmId?: number;
}

export type AuthResult =
  | { ok: true; user: AuthenticatedUser }
  | { ok: false; reason: string } // refused: the chain stops
  | { ok: "pass" }; // not this plugin's user: the next plugin decides

export interface AuthPlugin {
  readonly name: string;
  authenticate(db: Db, attempt: LoginAttempt): Promise<AuthResult>;
}
