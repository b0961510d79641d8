// The logged-in administrator: who they are, their effective ACLs (every screen, column and
// button asks `can()`), and whether the farm is multitenant.
import { createContext } from "preact";
import { useContext } from "preact/hooks";

export interface Administrator {
  id: number;
  name: string;
  tenant_id: number;
  tenant_name: string;
  superadmin: boolean;
  language?: string;
  [k: string]: unknown;
}

export interface Session {
  administrator: Administrator;
  acls: Set<string>;
  multitenant: boolean;
  can(acl: string): boolean;
  /** True when the administrator has any of the ACLs. */
  canAny(...acls: string[]): boolean;
}

export function makeSession(s: { administrator: Administrator; acls: string[]; multitenant: boolean }): Session {
  const acls = new Set(s.acls);
  return {
    administrator: s.administrator,
    acls,
    multitenant: s.multitenant,
    can: (a) => acls.has(a),
    canAny: (...a) => a.some((x) => acls.has(x)),
  };
}

export const SessionContext = createContext<Session | null>(null);

export function useSession(): Session {
  const s = useContext(SessionContext);
  if (!s) throw new Error("useSession outside a session");
  return s;
}
