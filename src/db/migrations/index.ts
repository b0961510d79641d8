// Numbered migrations. Migration N takes a database at schema version N-1 to version N;
// schema.sql is always the result of applying all of them, and `qvd db init` writes it
// directly. Add a file `NNNN-what.sql`, import it here, and update schema.sql to match.
export interface Migration {
  version: number;
  name: string;
  sql: string;
}

import tokenAuthParams from "./0002-token-auth-params.sql" with { type: "text" };
import sessionEndNotify from "./0003-session-end-notify.sql" with { type: "text" };
import vmAddresses from "./0004-vm-addresses.sql" with { type: "text" };
import loginThrottle from "./0005-login-throttle.sql" with { type: "text" };
import farm from "./0006-farm.sql" with { type: "text" };
import kvm from "./0007-kvm.sql" with { type: "text" };

export const MIGRATIONS: Migration[] = [
  { version: 2, name: "token auth params", sql: tokenAuthParams },
  { version: 3, name: "session end notify", sql: sessionEndNotify },
  { version: 4, name: "vm addresses", sql: vmAddresses },
  { version: 5, name: "login throttle", sql: loginThrottle },
  { version: 6, name: "farm", sql: farm },
  { version: 7, name: "kvm", sql: kvm },
];
