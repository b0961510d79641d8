// Printing to the client's printers (the original's `ipp` flavour): nxagent's CUPS channel
// (`cups=<display+2000>`) makes the client's CUPS reachable inside the desktop at
// 127.0.0.1:<display+2000>. At every connect and resume the client's printers become queues
// `QVD-<name>` → ipp://127.0.0.1:2100/printers/<name> of the desktop's CUPS, the client's default
// (else the first) the default; at suspend and stop every QVD-* queue is deleted.
//
// The desktop's CUPS is a cupsd of the session's own, run as the USER (never root: nothing the
// user can drive runs as root), configured under <path.run>/cups and listening only on the Unix
// socket <path.run>/cups/cups.sock in that 0700 directory; the session gets CUPS_SERVER pointing
// there. Its queues are raw (no PPD, no filters): the client's CUPS converts the job for its
// printer, so the image needs only cups-daemon and cups-client.
//
// Printer names come from the client's CUPS: untrusted. Only [A-Za-z0-9_.-]{1,100} are used (the
// others are skipped and logged), at most MAX_PRINTERS, and only as single argv entries.
import { randomBytes } from "node:crypto";
import {
  existsSync,
  lchownSync,
  lstatSync,
  mkdirSync,
  readdirSync,
  renameSync,
  rmdirSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { logger } from "../log.ts";
import { run, type Daemon } from "../run.ts";
import { propertyOff, type Prepared, type ServiceContext, type SessionService } from "./services.ts";

const log = logger("vma.printing");

export const PRINTER_PREFIX = "QVD-";
export const MAX_PRINTERS = 32;
const NAME = /^[A-Za-z0-9_.-]{1,100}$/;

export interface PrintingServiceOptions {
  /** vma.printing.enable */
  enable: boolean;
  /** vma.command.cupsd, vma.command.lpadmin, vma.command.lpstat */
  cupsd?: string;
  lpadmin?: string;
  lpstat?: string;
  /**
   * Where the client's CUPS answers inside the desktop (host:port); default 127.0.0.1:<display+2000>,
   * nxagent's channel. Tests point it at a CUPS of their own.
   */
  clientCups?: (display: number) => string;
  /** Milliseconds the session's cupsd has to answer once started (default 10000). */
  startTimeoutMs?: number;
  /** Milliseconds a listing or lpadmin may take (default 15000). */
  commandTimeoutMs?: number;
}

/** The directory of the session's CUPS (configuration, spool, socket). */
export const cupsDir = (runDir: string) => join(runDir, "cups");
export const cupsSocket = (runDir: string) => join(cupsDir(runDir), "cups.sock");

/** Whether the client asked for printing (the original's qvd.client.printing.enabled) and can have it. */
export function clientWantsPrinting(props: Record<string, string | number | boolean>, clientOs?: string): boolean {
  // Windows clients print through the cifs/slave4 flavours, which are not implemented.
  if (/^(windows|winnt)$/i.test(clientOs ?? String(props["qvd.client.os"] ?? ""))) return false;
  const v = props["qvd.client.printing.enabled"];
  return v === true || v === 1 || /^(1|true|yes|on)$/i.test(String(v ?? "").trim());
}

/** The printer names of `lpstat -e` output that may be used, in order, capped; the others are reported. */
export function usablePrinterNames(lpstatOut: string): { names: string[]; refused: string[] } {
  const names: string[] = [];
  const refused: string[] = [];
  for (const raw of lpstatOut.split("\n")) {
    const l = raw.replace(/\r$/, "");
    if (!l.trim()) continue;
    if (!NAME.test(l)) refused.push(l);
    else if (names.length >= MAX_PRINTERS) refused.push(l);
    else if (!names.includes(l)) names.push(l);
  }
  return { names, refused };
}

/** The scheduler configuration: the Unix socket only, no browsing, no web interface, every local request allowed (the socket's directory is the user's, 0700). */
export function cupsdConf(dir: string): string {
  return [
    `Listen ${join(dir, "cups.sock")}`,
    "Browsing No",
    "BrowseLocalProtocols none",
    "WebInterface No",
    "DefaultShared No",
    "LogLevel warn",
    "DefaultAuthType None",
    "MaxJobs 200",
    "<Location />",
    "  Order allow,deny",
    "  Allow all",
    "</Location>",
    "<Policy default>",
    "  <Limit All>",
    "    Order deny,allow",
    "  </Limit>",
    "</Policy>",
    "",
  ].join("\n");
}

export function cupsFilesConf(dir: string): string {
  return [
    `ServerRoot ${dir}`,
    `StateDir ${join(dir, "state")}`,
    `CacheDir ${join(dir, "cache")}`,
    `RequestRoot ${join(dir, "spool")}`,
    `TempDir ${join(dir, "spool/tmp")}`,
    `AccessLog ${join(dir, "log/access_log")}`,
    `ErrorLog ${join(dir, "log/error_log")}`,
    `PageLog ${join(dir, "log/page_log")}`,
    `Printcap ${join(dir, "printcap")}`,
    "FileDevice No",
    "",
  ].join("\n");
}

/**
 * Removes a directory a user owned (an earlier session's CUPS directory). Root never walks a
 * tree its owner can still change (a subdirectory swapped for a symlink to /etc while a
 * recursive delete runs): it is moved aside within path.run (root's; the user cannot write
 * there), then deleted by its owner.
 */
export async function removeUserDir(dir: string, runDir: string): Promise<void> {
  let st;
  try {
    st = lstatSync(dir);
  } catch {
    return;
  }
  const trash = join(runDir, `.cups-old-${randomBytes(6).toString("hex")}`);
  renameSync(dir, trash);
  if (st.uid === 0 || st.uid === process.getuid!() || !st.isDirectory()) {
    rmSync(trash, { recursive: true, force: true });
    return;
  }
  // The owner empties it (the directory itself is in root's path.run: root removes it, empty).
  await run(["setpriv", `--reuid=${st.uid}`, `--regid=${st.gid}`, "--clear-groups", "--", "rm", "-rf", "--", trash], {
    allowFail: true,
    timeoutMs: 30_000,
  });
  try {
    rmdirSync(trash);
  } catch (err) {
    log.warn("an old CUPS directory could not be removed", { dir: trash, err: (err as Error).message });
  }
}

export function printingService(o: PrintingServiceOptions): SessionService {
  const cupsd = o.cupsd ?? "/usr/sbin/cupsd";
  const lpadmin = o.lpadmin ?? "/usr/sbin/lpadmin";
  const lpstat = o.lpstat ?? "/usr/bin/lpstat";
  const timeoutMs = o.commandTimeoutMs ?? 15_000;
  let daemon: Daemon | undefined;
  let running = false;
  /** The last x_start asked for printing. */
  let wanted = false;

  const local = (ctx: ServiceContext) => ({ CUPS_SERVER: cupsSocket(ctx.runDir) });
  const exec = (ctx: ServiceContext, argv: string[]) => ctx.execAsUser(argv, { env: local(ctx), timeoutMs });

  /**
   * A fresh configuration directory, written by root while root owns it (0700), then handed to
   * the user deepest first: the user can touch nothing in it before root is done.
   */
  async function writeConfig(ctx: ServiceContext): Promise<void> {
    const dir = cupsDir(ctx.runDir);
    await removeUserDir(dir, ctx.runDir);
    mkdirSync(dir, { mode: 0o700 });
    for (const d of ["state", "cache", "spool", "spool/tmp", "log", "ppd"]) mkdirSync(join(dir, d), { mode: 0o700 });
    writeFileSync(join(dir, "cupsd.conf"), cupsdConf(dir), { mode: 0o600 });
    writeFileSync(join(dir, "cups-files.conf"), cupsFilesConf(dir), { mode: 0o600 });
    const { uid, gid } = ctx.account;
    const own = (p: string) => {
      if (lstatSync(p).isDirectory()) for (const e of readdirSync(p)) own(join(p, e));
      lchownSync(p, uid, gid);
    };
    own(dir);
  }

  async function startCupsd(ctx: ServiceContext): Promise<boolean> {
    if (running) return true;
    const dir = cupsDir(ctx.runDir);
    if (!existsSync(join(dir, "cupsd.conf"))) await writeConfig(ctx);
    const d = ctx.runAsUser([cupsd, "-f", "-c", join(dir, "cupsd.conf"), "-s", join(dir, "cups-files.conf")]);
    if (!d) throw new Error("no X session to run the session's cupsd in");
    daemon = d;
    running = true;
    void d.exited.then((status) => {
      if (daemon !== d) return;
      running = false;
      daemon = undefined;
      log.info("the session's cupsd ended", { status });
    });
    const until = Date.now() + (o.startTimeoutMs ?? 10_000);
    while (Date.now() < until) {
      if (!running) throw new Error(`the session's cupsd exited at start (see ${join(dir, "log/error_log")})`);
      const r = await ctx.execAsUser([lpstat, "-r"], { env: local(ctx), timeoutMs: 2000 });
      if (r.status === 0 && /is running/.test(r.stdout)) return true;
      await Bun.sleep(50);
    }
    throw new Error("the session's cupsd does not answer");
  }

  /** Deletes every QVD-* queue of the session's cupsd (the user may have added others: those stay). */
  async function removeQueues(ctx: ServiceContext): Promise<number> {
    if (!running) return 0;
    const r = await exec(ctx, [lpstat, "-e"]);
    let n = 0;
    for (const name of r.stdout.split("\n").map((l) => l.trim())) {
      if (!name.startsWith(PRINTER_PREFIX) || !NAME.test(name)) continue;
      const x = await exec(ctx, [lpadmin, "-x", name]);
      if (x.status !== 0) log.warn("cannot delete a printer", { printer: name, err: x.stderr.trim().slice(0, 200) });
      else n++;
    }
    return n;
  }

  async function addQueues(ctx: ServiceContext): Promise<string[]> {
    const server = o.clientCups ? o.clientCups(ctx.display) : `127.0.0.1:${ctx.display + 2000}`;
    // Right after connect the channel to the client's CUPS may not carry yet: a failed listing
    // is tried again, briefly (the next x_start's prepare waits for this hook; an empty list is
    // an answer).
    let list = await exec(ctx, [lpstat, "-h", server, "-e"]);
    for (let tries = 0; tries < 3 && list.status !== 0; tries++) {
      await Bun.sleep(300);
      list = await exec(ctx, [lpstat, "-h", server, "-e"]);
    }
    if (list.status !== 0) {
      log.warn("cannot list the client's printers", {
        server,
        status: list.status,
        err: list.stderr.trim().slice(0, 200),
      });
      return [];
    }
    const { names, refused } = usablePrinterNames(list.stdout);
    if (refused.length)
      log.warn("client printers skipped (bad name or too many)", {
        count: refused.length,
        first: JSON.stringify(refused[0]!.slice(0, 60)),
      });
    const def = await exec(ctx, [lpstat, "-h", server, "-d"]);
    const clientDefault = /destination: (\S+)\s*$/.exec(def.stdout.trim())?.[1];
    const added: string[] = [];
    for (const name of names) {
      const q = PRINTER_PREFIX + name;
      const r = await exec(ctx, [
        lpadmin,
        "-p",
        q,
        "-E",
        "-v",
        `ipp://${server}/printers/${name}`,
        "-D",
        `${name} (QVD client)`,
        "-o",
        "printer-is-shared=false",
      ]);
      if (r.status !== 0) log.warn("cannot add a printer", { printer: q, err: r.stderr.trim().slice(0, 200) });
      else added.push(name);
    }
    if (added.length) {
      const first = clientDefault && added.includes(clientDefault) ? clientDefault : added[0]!;
      const r = await exec(ctx, [lpadmin, "-d", PRINTER_PREFIX + first]);
      if (r.status !== 0)
        log.warn("cannot set the default printer", {
          printer: PRINTER_PREFIX + first,
          err: r.stderr.trim().slice(0, 200),
        });
    }
    return added;
  }

  async function stopCupsd(ctx: ServiceContext): Promise<void> {
    const d = daemon;
    if (d) {
      d.killGroup("SIGTERM");
      const done = await Promise.race([d.exited.then(() => true), Bun.sleep(3000).then(() => false)]);
      if (!done) d.killGroup("SIGKILL");
      await Promise.race([d.exited, Bun.sleep(1000)]);
    }
    daemon = undefined;
    running = false;
    await removeUserDir(cupsDir(ctx.runDir), ctx.runDir);
  }

  return {
    name: "printing",
    async prepare(ctx): Promise<Prepared> {
      if (!o.enable || propertyOff(ctx.properties, "qvd.vm.printing.enable")) {
        wanted = false;
        return { options: [] };
      }
      wanted = clientWantsPrinting(ctx.properties, ctx.clientOs);
      // CUPS_SERVER even when this client does not print: a resume by one that does finds it set.
      const env = local(ctx);
      // nxagent's channels stay as the X session started (src/vma/session.ts): cups= whatever
      // this client wants (not for Windows clients: no flavour of theirs); the wish decides
      // whether the client's printers are added.
      if (/^(windows|winnt)$/i.test(ctx.clientOs ?? String(ctx.properties["qvd.client.os"] ?? "")))
        return { options: [], env };
      if (!running && wanted) await writeConfig(ctx);
      return { options: [`cups=${ctx.display + 2000}`], env };
    },
    async connected(ctx) {
      if (!wanted) {
        await removeQueues(ctx);
        return;
      }
      const t0 = Date.now();
      await startCupsd(ctx);
      await removeQueues(ctx);
      const added = await addQueues(ctx);
      log.info("client printers added", { count: added.length, ms: Date.now() - t0 });
    },
    async suspended(ctx) {
      const n = await removeQueues(ctx);
      if (n) log.info("client printers removed", { count: n });
    },
    async stopped(ctx) {
      await removeQueues(ctx).catch(() => 0);
      await stopCupsd(ctx);
    },
  };
}
