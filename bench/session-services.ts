// What the session services (issue 12) add to a connect, on the VMA's side (aim: under 100 ms).
// Run as root: bun bench/session-services.ts [--rounds 5] [--services printing,audio,slave]
//
// Method (printed with the figures): a real Session (src/vma/session.ts) as a provisioned user
// (temporary root, as test/vma.test.ts), nxagent under xinit, and on the "client" side an Xvfb,
// nxproxy through the cookie relay (test/support/nx-relay.ts), a CUPS with two cups-pdf printers
// and a PulseAudio with a null sink behind the client's sound relay (src/client/audio.ts), as
// `qvd client` gives nxproxy (cups=, media=). Each round times, for a new X session and for a
// resume: x_start → `listening` (what the L7R waits for before it connects), nxproxy's start →
// `connected`, and (services on) `connected` → the client's printers in the desktop and the
// desktop's PulseAudio tunnel up, which happen after the connect, off its path. "off": the
// Session without services; "on": printing, sound and the slave channel as `qvd vma` wires them.
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { cpus, loadavg } from "node:os";
import { join } from "node:path";
import { startClientAudio } from "../src/client/audio.ts";
import { setLogLevel } from "../src/log.ts";
import { audioService } from "../src/vma/audio.ts";
import { cupsSocket, printingService } from "../src/vma/printing.ts";
import type { SessionService } from "../src/vma/services.ts";
import { execAs, privPrefix } from "../src/vma/session.ts";
import { sharesService } from "../src/vma/shares.ts";
import { startNxRelay } from "../test/support/nx-relay.ts";
import { freePortIn, startClientCups, startClientPulse, startXvfb } from "../test/support/services.ts";
import { testSession } from "../test/support/vma-session.ts";

setLogLevel("error");
const i = process.argv.indexOf("--rounds");
const ROUNDS = i > 0 ? Number(process.argv[i + 1]) || 5 : 5;
const j = process.argv.indexOf("--services");
const ON = new Set((j > 0 ? (process.argv[j + 1] ?? "") : "printing,audio,slave").split(","));
const UID = 51030;
const PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
if (process.getuid!() !== 0) throw new Error("run as root");

const freeDisplay = (from: number) => {
  for (let d = from; d < from + 60; d++)
    if (!existsSync(`/tmp/.X${d}-lock`) && !existsSync(`/tmp/.X11-unix/X${d}`)) return d;
  throw new Error("no free X display");
};
async function until(what: string, f: () => boolean | Promise<boolean>, ms = 30_000): Promise<number> {
  const t0 = performance.now();
  while (!(await f())) {
    if (performance.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(2);
  }
  return performance.now();
}
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const fmt = (xs: number[]) =>
  xs.length
    ? `median ${median(xs).toFixed(0)} ms (min ${Math.min(...xs).toFixed(0)}, max ${Math.max(...xs).toFixed(0)})`
    : "-";

const work = mkdtempSync("/tmp/qvd-bench-services-");
chmodSync(work, 0o755);
const root = join(work, "root");
mkdirSync(join(root, "etc/skel"), { recursive: true });
const pick = (file: string, names: string[]) =>
  readFileSync(file, "utf8")
    .split("\n")
    .filter((l) => names.includes(l.split(":")[0]!))
    .join("\n") + "\n";
for (const [f, names] of [
  ["passwd", ["root", "daemon", "nobody"]],
  ["group", ["root", "daemon", "nogroup"]],
  ["shadow", ["root", "daemon", "nobody"]],
  ["gshadow", ["root", "daemon", "nogroup"]],
] as const)
  writeFileSync(join(root, "etc", f), pick(`/etc/${f}`, [...names]), { mode: f.endsWith("shadow") ? 0o640 : 0o644 });

const cups = await startClientCups();
for (const p of cups.printers) chmodSync(p.outDir, 0o1777);
const pulse = await startClientPulse();
const audioPort = await freePortIn();
const clientAudio = await startClientAudio({ port: audioPort, pulseServer: pulse.server, warn: () => {} });
const xvfb = await startXvfb(freeDisplay(180));
const display = freeDisplay(xvfb.display + 1);
const COOKIE = "0123456789abcdef0123456789abcdef";
const relay = startNxRelay({ host: "127.0.0.1", targetPort: 4000 + display, cookie: COOKIE });
const desktop = privPrefix({ user: "bench", uid: UID, gid: UID, home: "/", shell: "/bin/sh", groups: [] });

type Figures = { listening: number[]; connected: number[]; printers: number[]; sound: number[] };
const results: Record<string, Figures> = {};

async function rounds(label: "off" | "on"): Promise<void> {
  const services: SessionService[] =
    label === "off"
      ? []
      : [
          ...(ON.has("printing") ? [printingService({ enable: true })] : []),
          ...(ON.has("audio") ? [audioService({ enable: true })] : []),
          ...(ON.has("slave") ? [sharesService({ enabled: true, qvd: process.execPath })] : []),
        ];
  const session = testSession({
    display,
    tolerancechecks: "risky",
    sessionCommand: ["/bin/sleep", "100000"],
    asCurrentUser: false,
    root,
    homePath: "/home",
    runDir: join(work, `run-${label}`),
    timeouts: { starting: 30_000, listening: 30_000, suspending: 20_000, stopping: 20_000 },
    services,
  });
  const props = { "qvd.client.printing.enabled": "1", "qvd.slave.key": "k".repeat(64) };
  const lpstat = () => execAs(desktop, ["lpstat", "-e"], { PATH, CUPS_SERVER: cupsSocket(session.opts.runDir) });
  const pactl = () =>
    execAs(desktop, ["pactl", "list", "short", "sinks"], { PATH, PULSE_SERVER: `unix:/run/user/${UID}/pulse/native` });
  try {
    for (const kind of ["new", "resume"] as const) {
      const f: Figures = (results[`${label} ${kind}`] = { listening: [], connected: [], printers: [], sound: [] });
      for (let r = 0; r < ROUNDS; r++) {
        if (kind === "resume") {
          if (session.state === "stopped") {
            session.start({ user: "bench", uid: UID, gid: UID, cookie: COOKIE, client_os: "linux", properties: props });
            await until("listening", () => session.state === "listening");
            Bun.spawn(["nxproxy", "-S", `cups=${cups.port}`, `media=${audioPort}`, `localhost:${relay.display}`], {
              env: { ...process.env, DISPLAY: `:${xvfb.display}` },
              stdout: "ignore",
              stderr: "ignore",
            });
            await until("connected", () => session.state === "connected");
          }
          // nxagent may miss a SIGHUP that comes right after a connect: say it again until it listens.
          let last = 0;
          await until(`suspended (state ${session.state})`, () => {
            if (session.state === "connected" && performance.now() - last > 2000) {
              last = performance.now();
              session.suspend();
            }
            return session.state === "suspended";
          });
          await Bun.sleep(1500); // the services' suspend hooks
        }
        const t0 = performance.now();
        session.start({ user: "bench", uid: UID, gid: UID, cookie: COOKIE, client_os: "linux", properties: props });
        const tl = await until("listening", () => session.state === "listening");
        const tp = performance.now();
        const nx = Bun.spawn(
          ["nxproxy", "-S", `cups=${cups.port}`, `media=${audioPort}`, `localhost:${relay.display}`],
          { env: { ...process.env, DISPLAY: `:${xvfb.display}` }, stdout: "ignore", stderr: "ignore" },
        );
        const tc = await until("connected", () => session.state === "connected");
        f.listening.push(tl - t0);
        f.connected.push(tc - tp);
        if (label === "on") {
          const [a, b] = await Promise.all([
            ON.has("printing")
              ? until(
                  "the printers",
                  async () => (await lpstat()).stdout.split("\n").filter((l) => l.startsWith("QVD-")).length === 2,
                  20_000,
                )
              : NaN,
            ON.has("audio")
              ? until("the sound tunnel", async () => (await pactl()).stdout.includes("QVD_Audio"), 20_000).catch(
                  () => NaN,
                )
              : NaN,
          ]);
          if (!Number.isNaN(a)) f.printers.push(a - tc);
          if (!Number.isNaN(b)) f.sound.push(b - tc);
        }
        if (kind === "new") {
          session.stop();
          await until("stopped", () => session.state === "stopped");
          await nx.exited;
          await Bun.sleep(1500); // the services' stop hooks
        }
      }
    }
  } finally {
    await session.shutdown(10_000); // also when a round failed: no session left behind
  }
}

try {
  await rounds("off");
  await rounds("on");
  console.log(
    `session services (${[...ON].join(", ")}), ${ROUNDS} rounds each, ${cpus().length} CPUs, load ${loadavg()[0]!.toFixed(2)}`,
  );
  for (const [k, f] of Object.entries(results)) {
    console.log(`${k.padEnd(11)} x_start → listening ${fmt(f.listening)}; nxproxy → connected ${fmt(f.connected)}`);
    if (f.printers.length || f.sound.length)
      console.log(`${"".padEnd(11)} after connected: printers ${fmt(f.printers)}; sound tunnel ${fmt(f.sound)}`);
  }
  for (const kind of ["new", "resume"]) {
    const off = results[`off ${kind}`]!,
      on = results[`on ${kind}`]!;
    const added = median(on.listening) + median(on.connected) - median(off.listening) - median(off.connected);
    console.log(
      `added to a ${kind === "new" ? "new session's" : "resume's"} connect by the services: ${added.toFixed(0)} ms (medians)`,
    );
  }
} finally {
  relay.stop();
  await clientAudio?.stop();
  await pulse.stop();
  await cups.stop();
  await xvfb.stop();
  rmSync(work, { recursive: true, force: true });
}
process.exit(0);
