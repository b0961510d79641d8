// A desktop's X session as the VMA runs it (src/vma/session.ts), for tests and benches on this
// machine: what they all share, so each names only what it is about.
import { Session, type SessionOptions } from "../../src/vma/session.ts";

type Own =
  | "display"
  | "tolerancechecks"
  | "sessionCommand"
  | "asCurrentUser"
  | "root"
  | "homePath"
  | "runDir"
  | "timeouts";

/** nxagent and xinit of this machine, taking the node at 127.0.0.1 only; /bin/sh, no groups, LANG C. */
export function testSession(o: Pick<SessionOptions, Own> & Partial<SessionOptions>): Session {
  return new Session({
    nxagent: "/usr/bin/nxagent",
    xinit: "xinit",
    nxagentExtraArgs: [],
    acceptFrom: "127.0.0.1",
    shell: "/bin/sh",
    groups: [],
    defaultLang: "C",
    ...o,
  });
}
