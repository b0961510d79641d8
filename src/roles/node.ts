// `qvd node`: a whole node, the HKD (desktops) and the L7R (users' broker), as two processes of
// this same binary (`qvd hkd …` and `qvd l7r …` with this command's flags): a storm on the L7R
// (strangers' connections, argon2 logins) cannot stall the HKD's event loop, its heartbeat
// and fencing. Signals are passed on; the L7R stops before the HKD; when either child exits,
// the other is stopped and `qvd node` exits with the first one's status. `qvd node --check`
// runs neither: it checks whether this machine can be the node (src/hkd/preflight.ts).
import { basename } from "node:path";
import { defineCommand } from "citty";
import { UserError } from "../errors.ts";
import { nodeTls } from "../farm/certs.ts";
import { logger } from "../log.ts";
import { spawnDaemon, type Daemon } from "../run.ts";
import { hkdArgs } from "./hkd.ts";
import { l7rArgs, l7rConfig } from "./l7r.ts";

const log = logger("node");

/** The argv that runs this very program: the compiled qvd, or bun with the entry script. */
function self(): string[] {
  return basename(process.execPath) === "bun" || basename(process.execPath) === "bun.exe"
    ? [process.execPath, process.argv[1]!]
    : [process.execPath];
}

export default defineCommand({
  meta: {
    name: "node",
    description: "Run a node: the HKD (desktops, as root) and the L7R (user broker), as two child processes",
  },
  args: {
    ...hkdArgs,
    ...l7rArgs,
    check: {
      type: "boolean",
      description:
        "Check that this machine can run the node as configured, one line per requirement; starts nothing (exit 1: a requirement fails)",
    },
    json: { type: "boolean", description: "With --check: print the results as JSON" },
  },
  async run({ args, rawArgs }) {
    if (args.json && !args.check) throw new UserError("--json goes with --check", 2);
    if (args.check) {
      // Before nodeTls below: a missing farm certificate is one of the lines, not the end.
      const { nodeCheck } = await import("../hkd/preflight.ts");
      process.exitCode = await nodeCheck(l7rConfig(args, rawArgs), {
        register: args.register,
        address: args.address,
        json: args.json,
      });
      return;
    }
    // A configuration error, or a missing or wrong farm certificate, is reported here, once, before any child runs.
    nodeTls(l7rConfig(args, rawArgs));
    const env = { ...process.env, QVD_PARENT_PID: String(process.pid) };
    let hkdReady!: () => void;
    const ready = new Promise<void>((r) => (hkdReady = r));
    const start = (role: "hkd" | "l7r"): Daemon =>
      spawnDaemon([...self(), role, ...rawArgs], {
        env,
        // The children log as they would alone; their lines pass through as they are.
        onLine: (line, stream) => {
          if (stream === "stdout") console.log(line);
          else console.error(line);
          if (role === "hkd" && line.startsWith("qvd hkd running")) hkdReady();
        },
      });
    const keepAlive = setInterval(() => {}, 1 << 30);
    let signalled = false;
    let l7r: Daemon | undefined;
    const onSignal = (sig: NodeJS.Signals) => {
      if (signalled) return;
      signalled = true;
      log.info("stopping", { signal: sig });
      if (l7r) l7r.kill("SIGTERM");
      else hkd.kill("SIGTERM");
    };
    process.on("SIGINT", onSignal);
    process.on("SIGTERM", onSignal);
    // The HKD first (it may register the node's hosts row, which the L7R looks up at start).
    const hkd = start("hkd");
    let hkdDone = false;
    void hkd.exited.then(() => (hkdDone = true));
    await Promise.race([ready, hkd.exited]);
    if (!hkdDone && !signalled) l7r = start("l7r");
    if (!l7r) {
      hkd.kill("SIGTERM");
      const status = await hkd.exited;
      clearInterval(keepAlive);
      process.exitCode = signalled ? 0 : status || 1;
      return;
    }
    // The first child to exit decides the status; the other is stopped (the L7R before the HKD).
    const first = await Promise.race([
      hkd.exited.then((s) => ({ who: "hkd", s })),
      l7r!.exited.then((s) => ({ who: "l7r", s })),
    ]);
    if (!signalled)
      log.error(`the ${first.who === "hkd" ? "HKD" : "L7R"} exited (status ${first.s}): stopping the node`);
    l7r!.kill("SIGTERM");
    await l7r!.exited;
    hkd.kill("SIGTERM");
    await hkd.exited;
    await Promise.all([hkd.drained, l7r!.drained]);
    clearInterval(keepAlive);
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
    process.exitCode = signalled && first.who === "l7r" && first.s === 0 ? 0 : first.s;
  },
});
