// Commands in a test's LXC desktop, as root or as its user, and inside the user's X session: its
// namespaces (the session may run in a nested user+mount namespace of the VMA's, where shares
// are mounted) and its environment (DISPLAY, CUPS_SERVER, PULSE_SERVER… as the desktop's own
// programs get them).
import { run } from "../../src/run.ts";
import type { TestNode } from "./node.ts";

/** lxc-attach's shell (as the container's root): enters the X session's namespaces if it has its own, then becomes the user; $1 is the window manager's pid. */
const SESSION_WRAPPER = `p=$(pgrep -x -u "$QVD_TEST_USER" jwm | head -1)
[ -n "$p" ] || { echo "no X session" >&2; exit 97; }
u=$(readlink /proc/$p/ns/user 2>/dev/null)
if [ -n "$u" ] && [ "$u" != "$(readlink /proc/self/ns/user)" ]; then
  exec nsenter --user=/proc/$p/ns/user --mount=/proc/$p/ns/mnt -- setpriv --reuid="$QVD_TEST_USER" --regid="$QVD_TEST_USER" --clear-groups /bin/sh -c "$1" sh "$p"
fi
exec setpriv --reuid="$QVD_TEST_USER" --regid="$QVD_TEST_USER" --clear-groups /bin/sh -c "$1" sh "$p"`;

export interface DesktopShell {
  /** A shell script in the desktop, as root or as the user, with optional input. */
  inDesktop(script: string, o?: { user?: boolean; stdin?: string | Uint8Array }): ReturnType<typeof run>;
  /** A script as the user inside the X session's namespaces; $1 is the window manager's pid. */
  inSession(script: string, stdin?: string | Uint8Array): ReturnType<typeof run>;
  /** A script as the user with the X session's environment and namespaces, as if started from the desktop. */
  asSession(script: string, stdin?: string | Uint8Array): ReturnType<typeof run>;
}

export function desktopShell(node: TestNode, vmId: () => number, user: string): DesktopShell {
  const lxc = () => [...node.ns.exec, "lxc-attach", "-n", `qvd-${vmId()}`, "-P", node.lxcPath, "--"];
  const inSession = (script: string, stdin?: string | Uint8Array) =>
    run([...lxc(), "env", `QVD_TEST_USER=${user}`, "/bin/sh", "-c", SESSION_WRAPPER, "qvd-test", script], {
      allowFail: true,
      timeoutMs: 30_000,
      stdin,
    });
  /** The window manager's environment as `export` lines. */
  const sessionEnv = async () => {
    const r = await inSession("tr '\\0' '\\n' < /proc/$1/environ");
    if (r.status !== 0) throw new Error(`cannot read the X session's environment: ${r.stderr}`);
    return r.stdout
      .split("\n")
      .filter((l) => /^[A-Z_][A-Z0-9_]*=/.test(l))
      .map((l) => `export ${l.slice(0, l.indexOf("="))}='${l.slice(l.indexOf("=") + 1).replace(/'/g, "'\\''")}'`)
      .join("\n");
  };
  return {
    inDesktop: (script, o = {}) =>
      run(
        [
          ...lxc(),
          ...(o.user ? ["setpriv", "--reuid", user, "--regid", user, "--clear-groups"] : []),
          "/bin/sh",
          "-c",
          script,
        ],
        { allowFail: true, timeoutMs: 30_000, stdin: o.stdin },
      ),
    inSession,
    asSession: async (script, stdin) => inSession(`${await sessionEnv()}\n${script}`, stdin),
  };
}
