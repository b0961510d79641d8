// `qvd demo`: a whole farm on one machine, kept in one directory across runs: PostgreSQL
// managed by qvd, the admin API (and the WAT) on 127.0.0.1, a node (HKD + L7R) whose desktops
// live in a network namespace of the demo's own, the Debian desktop image, and a user `demo`
// with one desktop. The user's client reaches the node's L7R at 127.0.0.1:8443 through a relay
// (src/demo/relay.ts). Ctrl-C stops desktops, node, API and PostgreSQL, and removes the namespace.
// Installs nothing: `npm run demo` (scripts/demo.ts) checks the system programs first.
import { existsSync, mkdirSync, realpathSync, rmSync, writeFileSync } from "node:fs";
import { basename, join, resolve } from "node:path";
import { defineCommand } from "citty";
import { LocalCluster } from "../db/local-cluster.ts";
import { connect } from "../db/pool.ts";
import { UserError } from "../errors.ts";
import { setLogLevel } from "../log.ts";
import { run, shellQuote } from "../run.ts";
import { DEMO_DB, PASSWORD_FILE, startDatabase } from "../demo/database.ts";
import { ensureHost, ensureImage, ensureUser, NODE_ADDRESS, unpackForNode, VM_RANGE } from "../demo/desktop.ts";
import { DemoNetns } from "../demo/netns.ts";
import { Child, recordedPid, stopLeftover, tcpAccepts, waitReady } from "../demo/processes.ts";
import { startRelay, type Relay } from "../demo/relay.ts";
import { demoCertificate, demoFarmCertificate } from "../demo/tls.ts";

export { DEMO_DB, PASSWORD_FILE };
const PID_FILE = "demo.pid";
const NODE_NAME = "demo";
const BRIDGE = "qvdbr0";

/** Refuses to share the directory with a running demo; records this one. */
function takeDir(dir: string): void {
  const pidFile = join(dir, PID_FILE);
  const other = recordedPid(pidFile, "demo");
  if (other !== undefined) throw new UserError(`another qvd demo (pid ${other}) is running in ${dir}: stop it first`);
  writeFileSync(pidFile, `${process.pid}\n`);
}

/** How to run this very qvd from a shell: `qvd` when that is what PATH finds. */
function qvdCommand(): string {
  const onPath = Bun.which("qvd");
  try {
    if (onPath && realpathSync(onPath) === realpathSync(process.execPath)) return "qvd";
  } catch {}
  return shellQuote(process.execPath);
}

const port = (flag: string, v: string) => {
  const n = Number(v);
  if (!/^\d+$/.test(v) || n < 1 || n > 65535) throw new UserError(`--${flag} ${v}: not a port number`);
  return n;
};

class Interrupted extends Error {}

export default defineCommand({
  meta: {
    name: "demo",
    description:
      "A whole farm on this machine: PostgreSQL, admin API, a node with a desktop, a user (runs until Ctrl-C)",
  },
  args: {
    dir: {
      type: "string",
      description: "Directory of the demo's database, image, certificate and logs (kept across runs)",
      default: "/var/lib/qvd/demo",
      valueHint: "DIR",
    },
    port: {
      type: "string",
      description: "Port on 127.0.0.1 for the user's client (the node's L7R)",
      default: "8443",
      valueHint: "PORT",
    },
    "api-port": {
      type: "string",
      description: "Port on 127.0.0.1 of the admin API and the WAT",
      default: "8444",
      valueHint: "PORT",
    },
    netns: {
      type: "string",
      description: "Name of the network namespace the desktops live in",
      default: "qvd-demo",
      valueHint: "NAME",
    },
    image: {
      type: "string",
      description: "Use this desktop image tarball instead of building one with qvd di build",
      valueHint: "FILE",
    },
  },
  async run({ args }) {
    const dir = resolve(args.dir);
    const l7rPort = port("port", String(args.port));
    const apiPort = port("api-port", String(args["api-port"]));
    if (l7rPort === apiPort) throw new UserError("--port and --api-port must differ");
    const netns = new DemoNetns(String(args.netns));
    if (process.getuid?.() !== 0)
      throw new UserError("qvd demo runs as root: it starts LXC containers in a network namespace");
    if (basename(process.execPath) === "bun")
      throw new UserError(
        "qvd demo runs from the compiled binary (its desktops run it as their agent): npm run demo builds and starts dist/qvd",
      );
    const self = process.execPath;
    setLogLevel("warn"); // the demo's own progress lines say what happens; its children log to files

    // A signal ends the demo: between setup steps, or while it runs.
    let signalled: string | undefined;
    let stillSaid = false;
    let onStop: (sig: string) => void = () => {};
    const stopSignal = new Promise<string>((r) => (onStop = r));
    for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"] as const)
      process.on(sig, () => {
        if (signalled) {
          // Once: `npm run demo` passes on the terminal's Ctrl-C, which reached the demo too.
          if (!stillSaid) console.log("Still stopping (desktops first)…");
          stillSaid = true;
          return;
        }
        signalled = sig;
        console.log(`${sig}: stopping${setupDone ? "" : " after this step"}…`);
        onStop(sig);
      });
    let setupDone = false;
    const STEPS = 7;
    let stepNo = 0;
    const step = (what: string) => {
      if (signalled) throw new Interrupted();
      console.log(`[${++stepNo}/${STEPS}] ${what}`);
    };
    const say = (line: string) => console.log(`      ${line}`);

    console.log(`qvd demo in ${dir}`);
    mkdirSync(dir, { recursive: true, mode: 0o755 });
    takeDir(dir);
    const runDir = join(dir, "run");
    const logDir = join(dir, "logs");
    const storage = join(dir, "storage");
    const lxcPath = join(runDir, "lxc");
    const socket = join(runDir, "l7r.sock");
    const cluster = new LocalCluster({ dir: join(dir, "postgresql") });
    let dbStarted = false;
    let relay: Relay | undefined;
    let node: Child | undefined;
    let api: Child | undefined;
    let netnsMade = false;
    let failed = false;
    try {
      for (const d of [runDir, logDir, storage]) mkdirSync(d, { recursive: true, mode: 0o755 });
      if (Buffer.byteLength(socket) > 100)
        throw new UserError(`${dir}: too long a path for the L7R's unix socket (${socket}); choose a shorter --dir`);

      step(`Database (PostgreSQL in ${cluster.dir})`);
      const url = await startDatabase(cluster, dir, say, () => (dbStarted = true));

      // Whatever an earlier demo in this directory left when it was killed: its node and API, then its namespace.
      for (const [file, name] of [
        ["node", "node"],
        ["api", "API"],
      ])
        if (await stopLeftover(join(runDir, `${file}.pid`), dir))
          say(`Stopped the ${name} left running by an earlier demo`);
      if (netns.exists) {
        // Processes in it that are not desktops of this directory belong to someone else.
        const left = await netns.containers(lxcPath);
        const pids = (await run(["ip", "netns", "pids", netns.name], { allowFail: true })).stdout
          .split("\n")
          .filter(Boolean);
        if (pids.length > 0 && left.length === 0)
          throw new UserError(
            `the network namespace ${netns.name} is in use (processes ${pids.join(", ")}), by another demo perhaps: choose another --netns`,
          );
        await netns.remove(lxcPath);
        say(
          `Removed the network namespace ${netns.name} left by an earlier demo${left.length ? ` (and its desktops ${left.join(", ")})` : ""}`,
        );
      }

      step("TLS certificate");
      const tls = await demoCertificate(dir);
      say(`${tls.created ? "Made" : "Reusing"} ${tls.cert} (self-signed, for 127.0.0.1 and localhost)`);
      const farm = await demoFarmCertificate(dir, NODE_NAME, NODE_ADDRESS);
      say(`${farm.created ? "Made" : "Reusing"} the farm CA ${farm.ca} and the node's certificate ${farm.cert}`);
      // The ports now, before the long steps: a port in use fails the demo early.
      if (await tcpAccepts("127.0.0.1", apiPort))
        throw new UserError(`127.0.0.1:${apiPort} is in use: choose another --api-port`);
      try {
        relay = startRelay({ hostname: "127.0.0.1", port: l7rPort, unix: socket, proxyProtocol: true });
      } catch (err) {
        throw new UserError(`cannot listen on 127.0.0.1:${l7rPort} (${(err as Error).message}): choose another --port`);
      }

      step("Desktop image, user and desktop");
      const imageOpts = {
        storageRoot: storage,
        imagesDir: join(storage, "images"),
        image: args.image ? resolve(String(args.image)) : undefined,
        say,
      };
      const sql = connect(url, { max: 2 });
      let user;
      let di;
      try {
        await ensureHost(sql, NODE_NAME);
        di = await ensureImage(sql, imageOpts);
        user = await ensureUser(sql, dir);
      } finally {
        await sql.end({ timeout: 5 });
      }
      say(`User ${user.name}, desktop "${user.vm.name}" (VM ${user.vm.id}, ${user.vm.ip ?? "no address"})`);
      if (user.newPassword) {
        say(`Password of ${user.name}: ${user.newPassword}`);
        say(`This password is shown only once; it is also in ${user.passwordFile} (mode 0600).`);
      }
      if (signalled) throw new Interrupted();
      say("Unpacking the image for the node…");
      await unpackForNode(di, imageOpts);

      step(`Network namespace ${netns.name} (the VM bridge ${BRIDGE} and ${VM_RANGE} live in it)`);
      netnsMade = true; // it did not exist a moment ago (checked above): whatever part gets made is ours
      await netns.create();

      step("Node (HKD + L7R) in the namespace");
      rmSync(socket, { force: true });
      const settings = {
        nodename: NODE_NAME,
        "path.run": runDir,
        "path.storage.root": storage,
        "vm.network.bridge": BRIDGE,
        "vm.network.range": VM_RANGE,
        "l7r.listen.unix": socket,
        // The relay names each client in a PROXY v2 header (the L7R counts and throttles by it).
        "l7r.proxy_protocol": "v2",
        "cluster.tls.ca": farm.ca,
        "cluster.tls.cert": farm.cert,
        "cluster.tls.key": farm.key,
        // One node: its node-to-node endpoint needs no address other nodes reach.
        "cluster.peer.listen": "127.0.0.1",
      };
      node = Child.spawn(
        "node",
        [
          ...netns.exec,
          self,
          "node",
          "--config",
          "/dev/null",
          "--db",
          url,
          "--listen",
          `127.0.0.1:${l7rPort}`,
          "--cert",
          tls.cert,
          "--key",
          tls.key,
          ...Object.entries(settings).flatMap(([k, v]) => ["--set", `${k}=${v}`]),
        ],
        join(logDir, "node.log"),
        join(runDir, "node.pid"),
      );
      await waitReady(node, "listening", () => existsSync(socket), 120_000);
      say(`Running (pid ${node.proc.pid}); log ${node.logFile}`);

      step("Admin API");
      // The node's storage: an image uploaded through the API (the WAT) lands where the node reads it.
      api = Child.spawn(
        "API",
        [
          self,
          "api",
          "--config",
          "/dev/null",
          "--db",
          url,
          "--listen",
          `127.0.0.1:${apiPort}`,
          "--cert",
          tls.cert,
          "--key",
          tls.key,
          "--set",
          `path.storage.root=${storage}`,
        ],
        join(logDir, "api.log"),
        join(runDir, "api.pid"),
      );
      await waitReady(api, "listening", () => tcpAccepts("127.0.0.1", apiPort), 60_000);
      say(`Running (pid ${api.proc.pid}); log ${api.logFile}`);

      step(`Users' entry: 127.0.0.1:${l7rPort}, relayed to the node's L7R`);
      if (signalled) throw new Interrupted();
      setupDone = true;

      const qvd = qvdCommand();
      console.log("");
      console.log(
        "Ready. Connect to the desktop from an X session on this machine (password of demo in " +
          user.passwordFile +
          "):",
      );
      console.log(
        `  ${qvd} client --host 127.0.0.1 --port ${l7rPort} --user ${user.name} --ca ${shellQuote(tls.cert)}`,
      );
      console.log(`Or in a web browser, with nothing to install: https://127.0.0.1:${l7rPort}/  (user ${user.name})`);
      console.log(
        `Web admin tool: https://127.0.0.1:${apiPort}/wat/  (admin API: https://127.0.0.1:${apiPort}/api/v1)`,
      );
      console.log(`Admin login: superadmin, tenant *, password in ${join(dir, PASSWORD_FILE)}`);
      console.log(`Database: ${qvd} db status --db ${shellQuote(url)}`);
      console.log(`Logs: ${logDir}/`);
      console.log("Running; press Ctrl-C to stop (desktops, node, API and PostgreSQL).");

      // Bun spins a CPU when only signal handlers keep the event loop alive: keep a timer.
      const keepAlive = setInterval(() => {}, 2 ** 30);
      const why = await Promise.race([
        stopSignal,
        node.proc.exited.then(() => "node"),
        api.proc.exited.then(() => "api"),
      ]);
      clearInterval(keepAlive);
      if (why === "node" || why === "api") {
        const child = why === "node" ? node : api;
        console.error(`qvd demo: ${child.failure(`exited (status ${child.status})`).message}`);
        failed = true;
        console.log("Stopping the rest…");
      }
    } catch (err) {
      if (!(err instanceof Interrupted)) throw err;
    } finally {
      relay?.stop();
      if (node) {
        if (node.running) console.log("Stopping the node and its desktops…");
        if (!(await node.stop(120_000))) console.log("The node did not stop in time: killed.");
      }
      if (api) await api.stop(15_000);
      try {
        // Only a namespace this run made: one found in use at start-up belongs to someone else.
        if (netnsMade) {
          const left = await netns.remove(lxcPath);
          if (left.length) console.log(`Desktops left running were stopped by force: ${left.join(", ")}`);
          console.log(`Removed the network namespace ${netns.name}.`);
        }
      } finally {
        try {
          if (dbStarted || (await cluster.running())) {
            console.log("Stopping PostgreSQL…");
            await cluster.stop("fast");
          }
        } finally {
          rmSync(join(dir, PID_FILE), { force: true });
        }
      }
    }
    console.log("Stopped.");
    if (failed) process.exitCode = 1;
  },
});
