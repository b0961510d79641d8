// `qvd client`, the flow: connect to the L7R, list the user's desktops, pick one, optionally
// stop it first, connect with the qvd.client.* parameters, show the 102 progress, and on the
// 101 run nxproxy against a local port spliced with the stream (docs/PROTOCOL.md, "The NX stream and the session cookie"), with its side
// channels: printing (cups=), sound (media=) and the slave channel (shared folders, open a file,
// USB) driven by src/client/slave.ts.
import { mkdtempSync, readFileSync, realpathSync, rmSync, statSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { basename, dirname, join, relative, sep } from "node:path";
import { createInterface } from "node:readline";
import { startClientAudio, type ClientAudio } from "./audio.ts";
import { UserError } from "../errors.ts";
import { logger } from "../log.ts";
import { spawnDaemon, type Daemon } from "../run.ts";
import { bodyLine, EXIT, L7RConnection, type Response } from "./l7r.ts";
import {
  bwrapUsable,
  openFile,
  requestUsbip,
  shareFolder,
  SlaveError,
  usbDeviceMissing,
  usbipBind,
  usbipUnbind,
  type Share,
  type SlaveEndpoint,
} from "./slave.ts";
import {
  DEFAULT_USBIPD,
  deviceId,
  importDevice,
  listExported,
  relayDevice,
  type UsbForward,
  type UsbipdAddress,
} from "./usbip.ts";
import { listenLocal, splice } from "./splice.ts";

const log = logger("client");

export interface ClientOptions {
  host: string;
  port: number;
  tls: boolean;
  /** Basic login (user + password), or a bearer token from /qvd/create_auth_token. */
  user?: string;
  password?: string;
  token?: string;
  /** Log in, print a new bearer token (create_auth_token) and stop there. */
  printToken?: boolean;
  /** A VM id or name. */
  vm?: string;
  link: string;
  geometry: string;
  fullscreen: boolean;
  keyboard: string;
  ca?: string;
  insecure: boolean;
  /** Client certificate and key files (servers that ask for one). */
  cert?: string;
  key?: string;
  /** Stop the desktop before connecting ("restart session"). */
  stop: boolean;
  /** nxproxy and any leading arguments (tests); `-S localhost:<D>` is appended. */
  nxproxy: string[];
  responseTimeoutMs?: number;
  /** How long nxproxy has to connect to the local port. */
  nxproxyTimeoutMs?: number;
  /** Progress and information (stdout by default). */
  say?: (line: string) => void;
  /** Ask for the desktop's printing through the user's CUPS (qvd.client.printing.enabled). */
  printing?: boolean;
  /** Ask for the desktop's sound on the user's PulseAudio (qvd.client.audio.enabled). */
  audio?: boolean;
  /** Folders to share with the desktop (existing directories). */
  shares?: string[];
  /** A file to open in the desktop (shared through its folder). */
  file?: string;
  /** USB devices (bus ids) to forward with USB/IP. */
  usb?: string[];
  /** The usbipd exporting them (default 127.0.0.1:3240). */
  usbipd?: UsbipdAddress;
  /** Serve shares without the bwrap sandbox (the desktop can then read the whole machine as this user). */
  shareUnconfined?: boolean;
  sftpServer?: string;
  bwrap?: string;
  /** The CUPS nxproxy forwards printing to (default: CUPS_SERVER, else 631). */
  cupsServer?: string;
}

export interface Desktop {
  id: number;
  name: string;
  state: string;
  blocked: boolean;
}

/** The L7R's booleans come as 0/1, "0"/"1", true/false or null (docs/PROTOCOL.md, "list_of_vm and list_of_applications"). */
const truthy = (v: unknown) => v === true || v === 1 || v === "1" || v === "true";

export function parseDesktops(body: Uint8Array, where: string): Desktop[] {
  let data: unknown;
  try {
    data = JSON.parse(new TextDecoder().decode(body));
  } catch {
    throw new UserError(`${where} is not a QVD server (the list of desktops is not JSON)`, EXIT.unreachable);
  }
  if (!Array.isArray(data))
    throw new UserError(`${where} is not a QVD server (the list of desktops is not a JSON array)`, EXIT.unreachable);
  return data.map((v: Record<string, unknown>) => ({
    id: Number(v.id),
    name: String(v.name ?? v.id),
    state: String(v.state ?? "unknown"),
    blocked: truthy(v.blocked),
  }));
}

const describeDesktop = (d: Desktop) => `${d.id} ${d.name} (${d.state}${d.blocked ? ", blocked" : ""})`;

/** Errors common to every request: 401, 403, 404, 5xx. */
function failure(r: Response, what: string, where: string, bearer = false): UserError {
  const said = bodyLine(r.body);
  const detail = said ? `: ${said}` : "";
  switch (true) {
    case r.status === 401:
      return new UserError(
        bearer
          ? `${where} refused the token (expired, unknown, or the account is blocked): log in with the password again`
          : `${where} refused the login (wrong user name or password, or the account is blocked)`,
        EXIT.auth,
      );
    case r.status === 403:
      return new UserError(`${where} refused ${what} (forbidden)${detail}`, EXIT.forbidden);
    case r.status === 408 || r.status >= 500:
      return new UserError(`${where} could not ${what}: ${r.status} ${r.reason}${detail}`, EXIT.unavailable);
    default:
      return new UserError(`${where} refused ${what}: ${r.status} ${r.reason}${detail}`, EXIT.failed);
  }
}

/** Reads responses, printing each 102's X-QVD-VM-Info, until a final one. */
async function finalResponse(conn: L7RConnection, what: string, say: (l: string) => void): Promise<Response> {
  for (;;) {
    const r = await conn.readResponse(what);
    if (r.status !== 102) return r;
    const info = r.headers.get("x-qvd-vm-info");
    if (info) say(info);
  }
}

async function choose(desktops: Desktop[], user: string, where: string, want?: string): Promise<Desktop> {
  if (want !== undefined) {
    const d = desktops.find((x) => String(x.id) === want) ?? desktops.find((x) => x.name === want);
    if (!d) {
      const list = desktops.length
        ? `; the user's desktops: ${desktops.map(describeDesktop).join(", ")}`
        : "; the user has no desktops";
      throw new UserError(`no desktop ${want} for ${user} on ${where}${list}`, EXIT.noDesktop);
    }
    return d;
  }
  if (desktops.length === 0) throw new UserError(`${user} has no desktops on ${where}`, EXIT.noDesktop);
  if (desktops.length === 1) return desktops[0]!;
  if (!process.stdin.isTTY) {
    throw new UserError(
      `${user} has ${desktops.length} desktops, choose one with --vm ID: ${desktops.map(describeDesktop).join(", ")}`,
      EXIT.usage,
    );
  }
  process.stderr.write(`Desktops of ${user}:\n`);
  for (const [i, d] of desktops.entries()) process.stderr.write(`  ${i + 1}) ${describeDesktop(d)}\n`);
  const rl = createInterface({ input: process.stdin, output: process.stderr });
  try {
    for (;;) {
      const answer = await new Promise<string | null>((resolve) => {
        rl.question(`Connect to which one [1-${desktops.length}]? `, resolve);
        rl.once("close", () => resolve(null));
      });
      if (answer === null) throw new UserError("no desktop chosen", EXIT.usage);
      const n = Number(answer.trim());
      if (Number.isInteger(n) && n >= 1 && n <= desktops.length) return desktops[n - 1]!;
      const byId = desktops.find((d) => String(d.id) === answer.trim() || d.name === answer.trim());
      if (byId) return byId;
    }
  } finally {
    rl.close();
  }
}

/** After nxproxy's "Established X server connection": the desktop's nxagent finishes resuming. */
const SLAVE_SETTLE_MS = 1000;
/** Slave requests go anyway this long after the slave channel listens (an nxproxy that never says it). */
const SLAVE_FALLBACK_MS = 8000;

/** The connect_to_vm query: id plus the qvd.client.* keys, percent-encoded (`+` and `/` too). */
export function connectQuery(
  id: number,
  o: Pick<ClientOptions, "keyboard" | "link" | "geometry" | "fullscreen" | "printing" | "audio">,
): string {
  const params: [string, string][] = [
    ["id", String(id)],
    ["qvd.client.os", "linux"],
    ["qvd.client.keyboard", o.keyboard],
    ["qvd.client.link", o.link],
    ["qvd.client.geometry", o.geometry],
    ["qvd.client.fullscreen", o.fullscreen ? "1" : "0"],
    ["qvd.client.printing.enabled", o.printing ? "1" : "0"],
    ["qvd.client.audio.enabled", o.audio ? "1" : "0"],
    ["qvd.client.type", "qvd-bun"],
  ];
  return params.map(([k, v]) => `${k}=${encodeURIComponent(v)}`).join("&");
}

const warnLine = (l: string) => process.stderr.write(`qvd: warning: ${l}\n`);

/** Where nxproxy's cups= channel goes: CUPS_SERVER's host[:port] or socket path, else localhost:631. */
export function cupsTarget(server: string | undefined): { spec: string; path?: string; host?: string; port?: number } {
  const v = (server ?? "").trim().replace(/\/version=[\d.]+$/, "");
  if (!v) return { spec: "631", host: "localhost", port: 631 };
  if (v.startsWith("/")) {
    // nxcomp splits its options on ',' and takes a trailing ':digits' for the display.
    if (/[,:\s]/.test(v))
      throw new Error(
        `CUPS_SERVER ${JSON.stringify(v)}: a socket path with ',', ':' or spaces cannot be given to nxproxy`,
      );
    return { spec: `unix:${v}`, path: v };
  }
  const m = /^([A-Za-z0-9][A-Za-z0-9.-]{0,252})(?::(\d{1,5}))?$/.exec(v);
  const port = m ? Number(m[2] ?? 631) : 0;
  if (!m || port < 1 || port > 65535)
    throw new Error(`CUPS_SERVER ${JSON.stringify(v)}: expected HOST, HOST:PORT or a socket path`);
  return { spec: `tcp:${m[1]}:${port}`, host: m[1], port };
}

/** Whether something accepts connections there (1 s). */
function reachable(t: { path?: string; host?: string; port?: number }): Promise<boolean> {
  return new Promise((resolve) => {
    const s = t.path ? net.connect(t.path) : net.connect(t.port!, t.host!);
    const done = (ok: boolean) => {
      clearTimeout(timer);
      s.destroy();
      resolve(ok);
    };
    const timer = setTimeout(() => done(false), 1000);
    s.once("connect", () => done(true));
    s.once("error", () => done(false));
  });
}

/** A free TCP port on 127.0.0.1 (for the sound module; nxproxy forwards media= to it). */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const port = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(port));
    });
  });
}

/** nxcomp reads a trailing ':digits' of an option argument as the display: one with ':' ends with ':<display>'. */
export function nxOption(opt: string, display: number): string {
  return opt.includes(":") ? `${opt}:${display}` : opt;
}

function isWithin(child: string, parent: string): boolean {
  return child === parent || child.startsWith(parent.endsWith(sep) ? parent : parent + sep);
}

/** Shares, the file to open and USB devices, once nxproxy listens for slave connections. */
async function slaveActions(
  o: ClientOptions,
  ep: SlaveEndpoint,
  key: string,
  workDir: string,
  say: (l: string) => void,
  shares: Share[],
  forwards: UsbForward[],
): Promise<void> {
  const bwrap = o.shareUnconfined ? undefined : (o.bwrap ?? "bwrap");
  const sftpServer = o.sftpServer ?? "/usr/lib/openssh/sftp-server";
  const share = async (dir: string): Promise<Share | undefined> => {
    try {
      const s = await shareFolder({
        endpoint: ep,
        key,
        dir,
        sftpServer,
        bwrap,
        workDir,
        onLog: (l) => log.debug("sftp-server", { dir, line: l }),
      });
      shares.push(s);
      say(`Shared ${dir} with the desktop${s.ticket ? ` (${s.ticket})` : ""}`);
      return s;
    } catch (e) {
      warnLine(`${dir} is not shared: ${e instanceof SlaveError ? e.message : (e as Error).message}`);
      return undefined;
    }
  };
  for (const dir of o.shares ?? []) await share(dir);
  if (o.file) {
    const file = realpathSync(o.file);
    let s = shares.find((x) => isWithin(file, x.dir));
    if (!s) s = await share(dirname(file));
    if (s && !s.ticket) warnLine(`${o.file} was not opened: the desktop gave no share ticket`);
    else if (s) {
      try {
        await openFile(ep, key, s.ticket, relative(s.dir, file));
        say(`Opened ${basename(file)} in the desktop`);
      } catch (e) {
        warnLine(`${o.file} was not opened: ${(e as Error).message}`);
      }
    }
  }
  for (const busid of o.usb ?? []) {
    const f = await forwardUsb(o, ep, key, busid, say);
    if (f) forwards.push(f);
  }
}

/**
 * One --usb device: exported by this machine's usbipd (bound first when we are root), imported,
 * and relayed to the desktop after its 101 (src/client/usbip.ts). Failures are warnings.
 */
async function forwardUsb(
  o: ClientOptions,
  ep: SlaveEndpoint,
  key: string,
  busid: string,
  say: (l: string) => void,
): Promise<UsbForward | undefined> {
  const usbipd = o.usbipd ?? DEFAULT_USBIPD;
  const not = (why: string) => void warnLine(`USB device ${busid} is not forwarded: ${why}`);
  let bound = false;
  try {
    let exported = await listExported(usbipd);
    if (!exported.some((d) => d.busid === busid) && process.getuid?.() === 0) {
      const missing = usbDeviceMissing(busid);
      if (missing) return void warnLine(missing);
      const err = usbipBind(busid);
      if (err) return not(err);
      bound = true;
      exported = await listExported(usbipd);
    }
    if (!exported.some((d) => d.busid === busid)) {
      return not(
        `usbipd does not export it: bind it to usbip-host as root first (usbip bind -b ${busid})${exported.length ? `; exported: ${exported.map((d) => d.busid).join(", ")}` : ""}`,
      );
    }
    const r = await requestUsbip(ep, key);
    let imported;
    try {
      imported = await importDevice(usbipd, busid);
    } catch (e) {
      r.sock.destroy();
      throw e;
    }
    const f = relayDevice(busid, imported, r.sock, r.rest);
    say(`Forwarded USB device ${busid} (${deviceId(f.device)}) to the desktop`);
    void f.ended.then(({ attached }) => {
      if (!attached) not("the desktop did not attach it (see the desktop's log)");
      if (bound) usbipUnbind(busid);
    });
    return f;
  } catch (e) {
    // No usbipd here: on a machine without USB, say that instead.
    const missing = e instanceof SlaveError && /usbipd/.test(e.message) ? usbDeviceMissing(busid) : undefined;
    if (missing) warnLine(missing);
    else not(e instanceof SlaveError ? e.message : (e as Error).message);
    if (bound) usbipUnbind(busid);
    return undefined;
  }
}

/** Checks the service flags before connecting; the problems are usage errors. */
export function checkServiceOptions(o: Pick<ClientOptions, "shares" | "file" | "shareUnconfined" | "bwrap">): void {
  for (const dir of o.shares ?? []) {
    let st;
    try {
      st = statSync(dir);
    } catch (e) {
      throw new UserError(
        `--share ${dir}: ${(e as NodeJS.ErrnoException).code === "ENOENT" ? "no such directory" : (e as Error).message}`,
        EXIT.usage,
      );
    }
    if (!st.isDirectory()) throw new UserError(`--share ${dir}: not a directory`, EXIT.usage);
  }
  if (o.file !== undefined) {
    let st;
    try {
      st = statSync(o.file);
    } catch (e) {
      throw new UserError(
        `--file ${o.file}: ${(e as NodeJS.ErrnoException).code === "ENOENT" ? "no such file" : (e as Error).message}`,
        EXIT.usage,
      );
    }
    if (!st.isFile()) throw new UserError(`--file ${o.file}: not a regular file`, EXIT.usage);
  }
  if (((o.shares?.length ?? 0) > 0 || o.file !== undefined) && !o.shareUnconfined) {
    const why = bwrapUsable(o.bwrap ?? "bwrap");
    if (why) {
      throw new UserError(
        `${o.file !== undefined && !o.shares?.length ? "--file" : "--share"} needs a sandbox that lets the desktop reach only the shared folder: ${why}` +
          "; install bubblewrap, or give --share-unconfined (the desktop can then read every file this user can)",
        EXIT.usage,
      );
    }
  }
}

/** Runs a whole session; returns the exit code (0: the session ended normally). */
export async function runClient(o: ClientOptions): Promise<number> {
  const say = o.say ?? ((l: string) => console.log(l));
  if (!o.printToken) checkServiceOptions(o);
  if (o.insecure) process.stderr.write("qvd: warning: --insecure: the server's certificate is not verified\n");
  if (o.shareUnconfined && (o.shares?.length || o.file !== undefined))
    warnLine("--share-unconfined: the desktop can read and write every file you can");
  const pem = (flag: string, file: string | undefined, what: string) => {
    if (!file) return undefined;
    try {
      return readFileSync(file, "utf8");
    } catch (err) {
      throw new UserError(`${flag} ${file}: cannot read the ${what} file: ${(err as Error).message}`, EXIT.usage);
    }
  };
  const conn = await L7RConnection.connect({
    host: o.host,
    port: o.port,
    tls: o.tls,
    ca: pem("--ca", o.ca, "certificate"),
    insecure: o.insecure,
    responseTimeoutMs: o.responseTimeoutMs,
    cert: pem("--cert", o.cert, "client certificate"),
    key: pem("--key", o.key, "client key"),
  });
  const where = conn.where;
  const bearer = o.token !== undefined;
  const auth = {
    Authorization: bearer ? `Bearer ${o.token}` : `Basic ${Buffer.from(`${o.user}:${o.password}`).toString("base64")}`,
  };
  const who = o.user || "the token's user";
  let nx: Daemon | undefined;
  let local: ReturnType<typeof listenLocal> | undefined;
  let audio: ClientAudio | undefined;
  let workDir: string | undefined;
  const shares: Share[] = [];
  const forwards: UsbForward[] = [];
  let cleaned: Promise<void> | undefined;
  let services: Promise<{ cups?: string }> | undefined;
  // Undoes what the side channels set up on this machine; once, also on a signal.
  const cleanup = () =>
    (cleaned ??= (async () => {
      await services?.catch(() => {});
      for (const s of shares) s.stop();
      for (const f of forwards) f.stop();
      await audio?.stop().catch(() => {});
      if (workDir) rmSync(workDir, { recursive: true, force: true });
    })());
  try {
    // The side channels this machine can serve, prepared while the desktops are listed: they add nothing to the connect time.
    services = o.printToken
      ? undefined
      : (async () => {
          let cups: string | undefined;
          if (o.printing !== false) {
            try {
              const t = cupsTarget(o.cupsServer ?? process.env.CUPS_SERVER);
              if (await reachable(t)) cups = t.spec;
              else
                warnLine(
                  `no printing: no CUPS answers at ${t.path ?? `${t.host}:${t.port}`} (CUPS_SERVER; --no-printing to not ask)`,
                );
            } catch (e) {
              warnLine(`no printing: ${(e as Error).message}`);
            }
          }
          const a =
            o.audio === false
              ? undefined
              : await startClientAudio({
                  port: await freePort(),
                  warn: (l) => warnLine(l.replace(/^qvd client: /, "")),
                });
          // Stopped by cleanup() even when the session never gets that far.
          audio = a;
          return { cups };
        })();
    // 1. The desktops.
    conn.request("/qvd/list_of_vm", { ...auth, Accept: "application/json" });
    const list = await finalResponse(conn, "the list of desktops", say);
    if (list.status === 404)
      throw new UserError(`${where} is not a QVD server (404 for /qvd/list_of_vm)`, EXIT.unreachable);
    if (list.status !== 200) throw failure(list, "to list the desktops", where, bearer);
    if (o.printToken) {
      // With --vm the token is good for that desktop only.
      const bound =
        o.vm === undefined ? "" : `?vm_id=${(await choose(parseDesktops(list.body, where), who, where, o.vm)).id}`;
      conn.request(`/qvd/create_auth_token${bound}`, auth);
      const t = await finalResponse(conn, "a token", say);
      if (t.status !== 200) throw failure(t, "to create a token", where, bearer);
      let token: unknown;
      try {
        token = JSON.parse(new TextDecoder().decode(t.body)).auth_token;
      } catch {}
      if (typeof token !== "string" || !token.trim())
        throw new UserError(`${where} is not a QVD server (no auth_token in its answer)`, EXIT.unreachable);
      process.stdout.write(token.trim() + "\n");
      return EXIT.ok;
    }
    const desktops = parseDesktops(list.body, where);
    const vm = await choose(desktops, who, where, o.vm);
    if (vm.blocked)
      throw new UserError(`desktop ${describeDesktop(vm)} is blocked (under maintenance)`, EXIT.forbidden);

    // 2. Optionally stop it first.
    if (o.stop) {
      say(`Stopping desktop ${vm.name} (${vm.id})`);
      conn.request(`/qvd/stop_vm?id=${vm.id}`, { ...auth, Connection: "Upgrade", Upgrade: "QVD/1.0" });
      const r = await finalResponse(conn, `to stop desktop ${vm.id}`, say);
      if (r.status === 404) throw new UserError(`no desktop ${vm.id} on ${where} (it was removed)`, EXIT.noDesktop);
      if (r.status === 401 || r.status === 403) throw failure(r, `to stop desktop ${vm.id}`, where, bearer);
      if (r.status !== 200)
        process.stderr.write(
          `qvd: warning: the desktop was not stopped: ${r.status} ${r.reason}: ${bodyLine(r.body)}\n`,
        );
    }

    // 3. The side channels this machine can serve (prepared while the desktops were listed), then connect.
    const { cups } = (await services) ?? {};
    const wantSlave = (o.shares?.length ?? 0) > 0 || o.file !== undefined || (o.usb?.length ?? 0) > 0;
    say(`Connecting to desktop ${vm.name} (${vm.id})`);
    conn.request(
      `/qvd/connect_to_vm?${connectQuery(vm.id, { ...o, printing: cups !== undefined, audio: audio !== undefined })}`,
      { ...auth, Connection: "Upgrade", Upgrade: "QVD/1.0" },
    );
    const r = await finalResponse(conn, `to start desktop ${vm.id}`, say);
    if (r.status !== 101) {
      if (r.status === 404)
        throw new UserError(
          `no desktop ${vm.id} on ${where} (it does not exist any more, or it is blocked)`,
          EXIT.noDesktop,
        );
      if (r.status === 426)
        throw new UserError(`${where} requires a more up-to-date client (426 Upgrade Required)`, EXIT.failed);
      throw failure(r, `start desktop ${vm.id}`, where, bearer);
    }
    log.debug("101", { slaveKey: r.headers.has("x-qvd-slave-key") });
    // It goes into our requests' Authorization header: printable ASCII only.
    const givenKey = r.headers.get("x-qvd-slave-key");
    const slaveKey = givenKey && /^[\x21-\x7e]{1,1024}$/.test(givenKey) ? givenKey : undefined;
    if (wantSlave && !slaveKey)
      warnLine(
        `the server gave ${givenKey ? "a malformed" : "no"} slave key: no shared folders, files or USB devices in this session`,
      );

    // 4. nxproxy on a local port, spliced with the stream.
    local = listenLocal();
    const options: string[] = [];
    let slavePath: string | undefined;
    if (wantSlave && slaveKey) {
      // The slave listener is a socket in a private directory: only this user reaches the desktop's slave server.
      // nxcomp cuts its options at ',' and ':'; a Unix socket path has at most 107 bytes.
      const base = /^[^,:\s]{1,60}$/.test(tmpdir()) ? tmpdir() : "/tmp";
      workDir = mkdtempSync(join(base, "qvd-client-"));
      slavePath = join(workDir, "slave");
      options.push(`slave=unix:${slavePath}`);
    }
    if (audio) options.push(`media=${audio.port}`);
    if (cups) options.push(`cups=${cups}`);
    const argv = [...o.nxproxy, "-S", ...options.map((x) => nxOption(x, local!.display)), `localhost:${local.display}`];
    let slaveStarted: Promise<void> | undefined;
    let slaveListening = false;
    let xConnected = false;
    const startSlave = () => {
      if (slaveStarted || !slavePath || !slaveKey) return;
      slaveStarted = slaveActions(o, { path: slavePath }, slaveKey, workDir!, say, shares, forwards).catch((e) => {
        warnLine(`the slave channel failed: ${(e as Error).message}`);
      });
    };
    // nxproxy exits 0 even when the session fails; its "Error: …" lines say why.
    const stderrTail: string[] = [];
    const nxErrors: string[] = [];
    try {
      // No NX_SLAVE_CMD: the desktop cannot start programs on this machine through the slave channel.
      const { NX_SLAVE_CMD: _a, QVD_SLAVE_CMD: _b, ...env } = process.env;
      nx = spawnDaemon(argv, {
        env: { ...env, NX_CLIENT: process.env.NX_CLIENT ?? "/bin/false" },
        onLine: (line) => {
          log.debug("nxproxy", { line });
          const t = line.trim();
          if (!t) return;
          // Slave requests wait until the desktop's nxagent has its display back through this
          // proxy, and a moment more: a slave connection opened while nxagent was still
          // resuming ended the session now and then (test/session-services.test.ts).
          if (/^Info: Listening to slave connections on port /.test(t)) {
            slaveListening = true;
            setTimeout(() => startSlave(), SLAVE_FALLBACK_MS).unref();
          }
          if (/^Info: Established X server connection/.test(t)) xConnected = true;
          if (slaveListening && xConnected) setTimeout(() => startSlave(), SLAVE_SETTLE_MS).unref();
          stderrTail.push(t);
          if (stderrTail.length > 5) stderrTail.shift();
          const e = /^Error: (.*)$/.exec(t);
          if (e) nxErrors.push(e[1]!);
        },
      });
    } catch (err) {
      throw new UserError(
        `cannot start ${o.nxproxy[0]} (is nxproxy installed?): ${(err as Error).message}`,
        EXIT.failed,
      );
    }
    const nxReason = () => {
      const why = nxErrors.at(-1) ?? stderrTail.at(-1);
      const x = why && /^Connection to '(.*)' failed/.exec(why);
      return x ? `cannot open the X display ${x[1]} (DISPLAY): ${why}` : why;
    };
    const onSignal = (sig: NodeJS.Signals) => {
      proxy0.kill("SIGTERM");
      conn.close();
      void Promise.race([cleanup(), Bun.sleep(3000)]).finally(() => process.exit(sig === "SIGINT" ? 130 : 143));
    };
    const proxy0 = nx;
    process.once("SIGINT", onSignal);
    process.once("SIGTERM", onSignal);
    say(`Connected; nxproxy on display localhost:${local.display} (port ${local.port})`);
    const proxy = nx;
    const nxproxyEnded = (code: number) => {
      const why = nxReason();
      return new UserError(`nxproxy ended (exit ${code}) before connecting${why ? `: ${why}` : ""}`, EXIT.failed);
    };
    const timeoutMs = o.nxproxyTimeoutMs ?? 30_000;
    let timer: Timer | undefined;
    const sock = await Promise.race([
      local.accepted,
      proxy.exited.then(async (code) => {
        await proxy.drained;
        throw nxproxyEnded(code);
      }),
      new Promise<never>((_, reject) => {
        timer = setTimeout(
          () =>
            reject(
              new UserError(
                `nxproxy did not connect to localhost:${local!.port} within ${timeoutMs / 1000} s`,
                EXIT.failed,
              ),
            ),
          timeoutMs,
        );
      }),
    ]).finally(() => clearTimeout(timer));
    local.stop();
    const result = await splice(conn.sock, sock, conn.takeRaw(), conn.isClosed);
    log.debug("session ended", { ...result });
    // The server ended the session: give nxproxy a moment to finish, then end it.
    const code = await Promise.race([proxy.exited, Bun.sleep(5000).then(() => undefined)]);
    if (code === undefined) {
      proxy.kill("SIGTERM");
      await proxy.exited;
      return EXIT.ok;
    }
    await proxy.drained;
    if (result.closedBy === "local" && (code !== 0 || nxErrors.length)) {
      const why = nxReason();
      throw new UserError(
        `the NX session failed${code ? ` (nxproxy exit ${code})` : ""}${why ? `: ${why}` : ""}`,
        EXIT.failed,
      );
    }
    say("Session ended");
    return EXIT.ok;
  } finally {
    local?.stop();
    nx?.kill("SIGTERM");
    conn.close();
    await cleanup();
  }
}
