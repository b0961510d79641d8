// Free resources for the servers a test starts: an X display number, a TCP port on 127.0.0.1.
import { existsSync } from "node:fs";

/** The first display from `from` on (within `span`) with neither an X lock file nor an X socket. */
export function freeDisplay(from: number, span = 60): number {
  for (let d = from; d < from + span; d++)
    if (!existsSync(`/tmp/.X${d}-lock`) && !existsSync(`/tmp/.X11-unix/X${d}`)) return d;
  throw new Error("no free X display");
}

/** A TCP port free on 127.0.0.1 now (the kernel's pick; free again once this returns). */
export function freePort(): number {
  const s = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
  const p = s.port;
  s.stop(true);
  return p;
}
