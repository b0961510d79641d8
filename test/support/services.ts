// The user's side of the session services, for tests that run `qvd client`: a CUPS with PDF
// printers standing for the user's printers, a PulseAudio with a null sink standing for the
// user's speakers, and an Xvfb display for nxproxy. Each runs as root with its own files in a
// temp dir, optionally inside a network namespace (`exec`: an argv prefix such as
// TestNode.ns.exec), and `stop()` removes what it made.
import {
  chmodSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import { run, spawnDaemon } from "../../src/run.ts";
import { RATE, recordMonitor } from "./tone.ts";
import { until, waitFor } from "./wait.ts";

const PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

interface Proc {
  pid: number;
  /** Set once it has exited. */
  readonly exited: boolean;
  /** The end of its output. */
  output(): string;
  /** TERM, then KILL after `graceMs`; resolves once it is gone. */
  stop(graceMs?: number): Promise<void>;
}

function daemon(argv: string[], env: Record<string, string>): Proc {
  const lines: string[] = [];
  let done = false;
  const d = spawnDaemon(argv, { cwd: "/", env, onLine: (l) => void (lines.push(l) > 200 && lines.shift()) });
  const ended = d.exited.then(() => void (done = true));
  return {
    pid: d.pid,
    get exited() {
      return done;
    },
    output: () => lines.join("\n"),
    async stop(graceMs = 5000) {
      if (done) return;
      d.kill("SIGTERM");
      const t = setTimeout(() => d.kill("SIGKILL"), graceMs);
      await ended;
      clearTimeout(t);
    },
  };
}

/** A TCP port free on 127.0.0.1 of the namespace `exec` enters (asked of the kernel there). */
export async function freePortIn(exec: string[] = []): Promise<number> {
  const script = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])";
  return Number((await run([...exec, "python3", "-c", script])).stdout.trim());
}

// --- CUPS -------------------------------------------------------------------------------------

export interface ClientPrinter {
  /** The queue's name in the user's CUPS. */
  name: string;
  /** Where cups-pdf writes this queue's PDFs. */
  outDir: string;
}

export interface ClientCups {
  /** host:port for CUPS_SERVER / nxproxy `cups=`. */
  server: string;
  port: number;
  /** The default queue (made first) and a second one. */
  printers: [ClientPrinter, ClientPrinter];
  dir: string;
  /** Waits for a PDF of `printer` whose text (pdftotext) contains `text`; returns that text. */
  waitForPdf(printer: ClientPrinter, text: string, ms?: number): Promise<string>;
  /** The PDFs `printer` has written so far. */
  pdfs(printer: ClientPrinter): string[];
  /** lpstat of this CUPS (e.g. ["-p"], ["-d"], ["-W", "completed", "-o"]). */
  lpstat(args: string[]): Promise<string>;
  /** The end of cupsd's error log (for failure messages). */
  log(): string;
  stop(): Promise<void>;
}

/**
 * A cupsd for the user's printers, listening on 127.0.0.1:<port> (in the namespace of `exec`)
 * and on a local socket for its administration. Two cups-pdf queues, `<prefix>_b` the
 * default and `<prefix>_a` the other (so "first is the default" is not alphabetical order).
 * cups-pdf reads its configuration from /etc/cups only: device URI cups-pdf:/<queue> makes it
 * read /etc/cups/cups-pdf-<queue>.conf (written here, removed by stop()), which sends its PDFs
 * and its log to the temp dir.
 */
export async function startClientCups(o: { exec?: string[] } = {}): Promise<ClientCups> {
  const { ensureDeps } = await import("../../scripts/deps.ts");
  await ensureDeps(["cupsd", "cups-client", "cups-pdf", "cups-filters", "pdftotext"], () => {});
  const exec = o.exec ?? [];
  const dir = mkdtempSync("/tmp/qvd-test-cups-");
  chmodSync(dir, 0o755);
  const prefix = `qvdtest_${randomBytes(3).toString("hex")}`;
  const printers: [ClientPrinter, ClientPrinter] = [
    { name: `${prefix}_b`, outDir: join(dir, "pdf-b") },
    { name: `${prefix}_a`, outDir: join(dir, "pdf-a") },
  ];
  const confs = printers.map((p) => `/etc/cups/cups-pdf-${p.name}.conf`);
  const etc = join(dir, "etc");
  for (const d of [
    "etc/ppd",
    "etc/ssl",
    "spool/tmp",
    "cache",
    "state",
    "log",
    "cups-pdf-spool",
    ...printers.map((p) => p.outDir.slice(dir.length + 1)),
  ])
    mkdirSync(join(dir, d), { recursive: true });
  // cups-pdf runs ghostscript as the job's user, `nobody` for a user this machine lacks (the desktop's).
  for (const p of printers) chmodSync(p.outDir, 0o1777);
  const port = await freePortIn(exec);
  const sock = join(dir, "cups.sock");
  writeFileSync(
    join(etc, "cups-files.conf"),
    [
      `ServerRoot ${etc}`,
      `RequestRoot ${join(dir, "spool")}`,
      `TempDir ${join(dir, "spool/tmp")}`,
      `CacheDir ${join(dir, "cache")}`,
      `StateDir ${join(dir, "state")}`,
      `ServerBin /usr/lib/cups`,
      `DataDir /usr/share/cups`,
      `AccessLog ${join(dir, "log/access_log")}`,
      `ErrorLog ${join(dir, "log/error_log")}`,
      `PageLog ${join(dir, "log/page_log")}`,
      `Printcap ${join(dir, "printcap")}`,
      "User lp",
      "Group lp",
      "SystemGroup root",
      "FileDevice No",
      "",
    ].join("\n"),
  );
  writeFileSync(
    join(etc, "cupsd.conf"),
    [
      "LogLevel debug",
      `Listen 127.0.0.1:${port}`,
      `Listen ${sock}`,
      "Browsing No",
      "BrowseLocalProtocols none",
      "WebInterface No",
      "DefaultAuthType Basic",
      "ServerAlias *",
      "<Location />",
      "  Order allow,deny",
      "  Allow localhost",
      "</Location>",
      "<Policy default>",
      "  <Limit CUPS-Add-Modify-Printer CUPS-Delete-Printer CUPS-Add-Modify-Class CUPS-Delete-Class CUPS-Set-Default CUPS-Get-Devices>",
      "    AuthType Default",
      "    Require user @SYSTEM",
      "    Order deny,allow",
      "  </Limit>",
      "  <Limit All>",
      "    Order deny,allow",
      "  </Limit>",
      "</Policy>",
      "",
    ].join("\n"),
  );
  for (const [i, p] of printers.entries())
    writeFileSync(
      confs[i]!,
      `# Written by a QVD test (test/support/services.ts); removed when it ends.\nOut ${p.outDir}\nAnonDirName ${p.outDir}\nSpool ${join(dir, "cups-pdf-spool")}\nLog ${join(dir, "log")}\nUserUMask 0022\nAnonUMask 0022\nGrp root\n`,
    );
  const errorLog = join(dir, "log/error_log");
  const accessLog = join(dir, "log/access_log");
  const tail = (f: string, keep: (l: string) => boolean) =>
    existsSync(f) ? readFileSync(f, "utf8").split("\n").filter(keep).slice(-40).join("\n") : "";
  /** The jobs' lines and errors of cupsd's log (debug level), and its access log. */
  const log = () =>
    `${errorLog}:\n${tail(errorLog, (l) => /^[EW] |\[Job \d+\]/.test(l))}\n${accessLog}:\n${tail(accessLog, () => true)}`;
  const cupsd = daemon([...exec, "cupsd", "-f", "-c", join(etc, "cupsd.conf"), "-s", join(etc, "cups-files.conf")], {
    PATH,
    LANG: "C",
  });
  const stop = async () => {
    await cupsd.stop().catch(() => {});
    for (const c of confs) rmSync(c, { force: true });
    rmSync(dir, { recursive: true, force: true });
  };
  const lp = (prog: string, args: string[]) =>
    run([prog, "-h", sock, ...args], { env: { PATH, LANG: "C" }, allowFail: true });
  try {
    await until(
      async () => (await lp("lpstat", ["-r"])).stdout.includes("is running"),
      "the client's cupsd",
      20_000,
      100,
      {
        abort: () => (cupsd.exited ? `cupsd exited: ${cupsd.output()} ${log()}` : undefined),
      },
    );
    const ppd = "/usr/share/ppd/cups-pdf/CUPS-PDF_opt.ppd";
    for (const p of printers) {
      const r = await lp("lpadmin", [
        "-p",
        p.name,
        "-E",
        "-v",
        `cups-pdf:/${p.name}`,
        ...(existsSync(ppd) ? ["-P", ppd] : ["-m", "lsb/usr/cups-pdf/CUPS-PDF_opt.ppd"]),
        "-o",
        "printer-is-shared=false",
        // PostScript for cups-pdf made by poppler-cairo: ghostscript's loses the text pdftotext reads.
        "-o",
        "pdftops-renderer-default=pdftocairo",
      ]);
      if (r.status !== 0) throw new Error(`lpadmin ${p.name}: ${r.stderr.trim()}`);
    }
    const d = await lp("lpadmin", ["-d", printers[0].name]);
    if (d.status !== 0) throw new Error(`lpadmin -d: ${d.stderr.trim()}`);
  } catch (e) {
    await stop();
    throw e;
  }
  const pdfs = (p: ClientPrinter) =>
    existsSync(p.outDir)
      ? readdirSync(p.outDir)
          .filter((n) => n.endsWith(".pdf"))
          .map((n) => join(p.outDir, n))
      : [];
  return {
    server: `127.0.0.1:${port}`,
    port,
    printers,
    dir,
    pdfs,
    log,
    async lpstat(args) {
      return (await lp("lpstat", args)).stdout;
    },
    async waitForPdf(p, text, ms = 60_000) {
      const seen = new Map<string, string>();
      return waitFor(
        `a PDF with "${text}" from ${p.name}`,
        async () => {
          for (const f of pdfs(p)) {
            // cups-pdf writes the file in place: read it again until its text is complete.
            const r = await run(["pdftotext", "-q", f, "-"], { allowFail: true });
            seen.set(f, r.stdout);
            if (r.status === 0 && r.stdout.includes(text)) return r.stdout;
          }
          return undefined;
        },
        ms,
        100,
        { detail: () => `; PDFs: ${JSON.stringify([...seen])}; cupsd log: ${log()}` },
      );
    },
    stop,
  };
}

// --- PulseAudio -------------------------------------------------------------------------------

export interface ClientPulse {
  /** PULSE_SERVER for the user's programs (`qvd client` loads its TCP module here). */
  server: string;
  /** The null sink standing for the speakers (the default sink). */
  sink: string;
  /** Records the sink's monitor while `during` runs (from `leadMs` before, to `tailMs` after; 0 and 500 by default): s16le mono samples at RATE. */
  record(during: () => Promise<unknown>, t?: { leadMs?: number; tailMs?: number }): Promise<Int16Array>;
  /** pactl against this PulseAudio. */
  pactl(args: string[]): Promise<string>;
  stop(): Promise<void>;
}

/**
 * A PulseAudio with a null sink as its default sink, reached through its own unix socket; with
 * `source`, a null source of that name too (the user's microphone).
 */
export async function startClientPulse(
  o: { exec?: string[]; sink?: string; source?: string } = {},
): Promise<ClientPulse> {
  const { ensureDeps } = await import("../../scripts/deps.ts");
  await ensureDeps(["pulseaudio", "pulseaudio-utils"], () => {});
  const exec = o.exec ?? [];
  const sink = o.sink ?? "QvdTestSpeakers";
  const dir = mkdtempSync("/tmp/qvd-test-pulse-");
  chmodSync(dir, 0o700);
  const socket = join(dir, "native");
  mkdirSync(join(dir, "home"));
  mkdirSync(join(dir, "run"), { mode: 0o700 });
  writeFileSync(
    join(dir, "client.pa"),
    [
      `load-module module-native-protocol-unix socket=${socket}`,
      `load-module module-null-sink sink_name=${sink} rate=${RATE}`,
      `set-default-sink ${sink}`,
      ...(o.source ? [`load-module module-null-source source_name=${o.source}`] : []),
      "",
    ].join("\n"),
  );
  const env = {
    PATH,
    HOME: join(dir, "home"),
    XDG_RUNTIME_DIR: join(dir, "run"),
    DBUS_SESSION_BUS_ADDRESS: "disabled:",
    LANG: "C",
  };
  const pa = daemon(
    [
      ...exec,
      "pulseaudio",
      "-n",
      "-F",
      join(dir, "client.pa"),
      "--daemonize=no",
      "--exit-idle-time=-1",
      "--realtime=no",
      "--high-priority=no",
      "--use-pid-file=no",
      "--log-target=stderr",
    ],
    env,
  );
  const server = `unix:${socket}`;
  const pactl = async (args: string[]) =>
    (await run(["pactl", "-s", server, ...args], { env, allowFail: true })).stdout;
  const stop = async () => {
    await pa.stop().catch(() => {});
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    await until(
      async () => (await pactl(["info"])).includes(`Default Sink: ${sink}`),
      "the client's PulseAudio",
      20_000,
      100,
      {
        abort: () => (pa.exited ? `pulseaudio exited: ${pa.output().slice(-2000)}` : undefined),
      },
    );
  } catch (e) {
    await stop();
    throw e;
  }
  return {
    server,
    sink,
    pactl,
    record: (during, t = {}) => recordMonitor({ server, sink, env }, during, { tailMs: 500, ...t }),
    stop,
  };
}

// --- X ----------------------------------------------------------------------------------------

/** An Xvfb on `:display` for nxproxy (in the namespace of `exec`; no TCP). */
export async function startXvfb(
  display: number,
  o: { exec?: string[] } = {},
): Promise<{ display: number; stop(): Promise<void> }> {
  const { ensureDeps } = await import("../../scripts/deps.ts");
  await ensureDeps(["xvfb", "xwd"], () => {});
  const x = daemon(
    [...(o.exec ?? []), "Xvfb", `:${display}`, "-screen", "0", "1024x768x24", "-nolisten", "tcp", "-noreset"],
    { PATH },
  );
  await until(
    async () => (await run(["xwd", "-root", "-silent", "-display", `:${display}`], { allowFail: true })).status === 0,
    `Xvfb :${display}`,
    20_000,
    100,
    {
      abort: () => (x.exited ? `Xvfb exited: ${x.output().slice(-1000)}` : undefined),
    },
  ).catch(async (e) => {
    await x.stop(2000); // not left behind by a caller that never got the handle
    throw e;
  });
  return { display, stop: () => x.stop(2000) };
}

/** Mean brightness (0–1) of X display `display` (0 when it cannot be read); saved as `png` too, if given. */
export async function screenMean(display: number, png?: string): Promise<number> {
  const save = png ? `-write ${png} ` : "";
  const r = await run(
    ["sh", "-c", `xwd -root -silent -display :${display} | /usr/bin/convert xwd:- ${save}-format '%[fx:mean]' info:-`],
    { allowFail: true },
  );
  return Number(r.stdout.trim()) || 0;
}
