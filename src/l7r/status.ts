// The answers a request can end in, and the checks every endpoint shares.
import type { AuthenticatedUser } from "../auth/user-auth.ts";

/** An HTTP answer other than success, thrown by a handler and sent by the connection. */
export class Status extends Error {
  constructor(
    readonly status: number,
    message?: string,
    readonly headers: [string, string][] = [],
  ) {
    super(message ?? "");
  }
}

/** The original's answer to every failure of a connect after its checks (docs/PROTOCOL.md). */
export const unavailable = (reason: string) =>
  new Status(503, `The requested virtual machine is not available: ${reason}, retry later.`);

/** Whether a login may use a VM: its own, and only the one its token was made for, if any. */
export const mayUse = (user: AuthenticatedUser, ownerId: number, vmId: number) =>
  ownerId === user.userId && (user.vmId === undefined || user.vmId === vmId);

/** A VM id a client may name: an integer the database's integer column can hold (else it is no VM). */
export const isId = (n: number) => Number.isInteger(n) && n >= 1 && n <= 0x7fffffff;
