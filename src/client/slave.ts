// The client's half of the slave channel: requests to the VMA's slave server (src/vma/slave.ts,
// the original QVD's protocol) through nxproxy's slave listener. Shared folders (PUT /shares,
// then sftp-server on the stream, confined to the folder), opening a file (POST /open) and
// USB/IP (POST /usbip). Nothing here ends a session: failures come back as SlaveError messages.
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync, lstatSync, readlinkSync, realpathSync, statSync, writeFileSync } from "node:fs";
import net from "node:net";
import { userInfo } from "node:os";
import { join } from "node:path";

/** Where nxproxy listens for slave connections: a Unix socket (what `qvd client` uses) or a TCP port on loopback. */
export type SlaveEndpoint = { path: string } | { port: number };

export class SlaveError extends Error {}

export interface SlaveResponse {
  status: number;
  reason: string;
  headers: Map<string, string>;
  body: string;
  /** After a 101: the open stream, paused, and the bytes already read past the header block. */
  sock: net.Socket;
  rest: Buffer;
}

const MAX_HEAD = 16384;
const MAX_BODY = 65536;

/** Percent-encodes each path segment and keeps the slashes: `/home/a b` → `/home/a%20b`. */
export const encodePath = (p: string) => p.split("/").map(encodeURIComponent).join("/");

function connect(ep: SlaveEndpoint, timeoutMs: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const sock = "path" in ep ? net.connect(ep.path) : net.connect(ep.port, "127.0.0.1");
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new SlaveError("the slave channel did not answer in time"));
    }, timeoutMs);
    sock.once("connect", () => {
      clearTimeout(timer);
      sock.setNoDelay(true);
      resolve(sock);
    });
    sock.once("error", (e) => {
      clearTimeout(timer);
      reject(new SlaveError(`cannot reach the slave channel: ${e.message}`));
    });
  });
}

/**
 * One request on a new slave connection. A 101 leaves the socket open (paused) for the caller;
 * any other answer is read whole (bounded) and the connection closed.
 */
export async function slaveRequest(
  ep: SlaveEndpoint,
  method: string,
  target: string,
  headers: [string, string][],
  timeoutMs = 15_000,
): Promise<SlaveResponse> {
  try {
    return await slaveRequestOnce(ep, method, target, headers, timeoutMs);
  } catch (e) {
    // Now and then the NX side closes a new slave connection before the desktop's server has
    // read anything (seen about once in a few dozen, under load): not a word came back, so the
    // request is sent once more on a new connection.
    if (!(e instanceof NoAnswer)) throw e;
    await Bun.sleep(300);
    return await slaveRequestOnce(ep, method, target, headers, timeoutMs);
  }
}

/** The connection ended before a single byte of an answer. */
class NoAnswer extends SlaveError {}

async function slaveRequestOnce(
  ep: SlaveEndpoint,
  method: string,
  target: string,
  headers: [string, string][],
  timeoutMs: number,
): Promise<SlaveResponse> {
  const sock = await connect(ep, timeoutMs);
  let head = `${method} ${target} HTTP/1.1\r\n`;
  for (const [k, v] of headers) head += `${k}: ${v}\r\n`;
  sock.write(head + "\r\n");
  return await new Promise<SlaveResponse>((resolve, reject) => {
    let buf = Buffer.alloc(0);
    let parsed: (Omit<SlaveResponse, "body" | "rest" | "sock"> & { length: number; start: number }) | undefined;
    const timer = setTimeout(
      () => fail(new SlaveError(`the desktop did not answer ${method} within ${timeoutMs / 1000} s`)),
      timeoutMs,
    );
    const done = () => {
      clearTimeout(timer);
      sock.off("data", onData);
      sock.off("end", onEnd);
      sock.off("error", onError);
    };
    const fail = (e: Error) => {
      done();
      sock.destroy();
      reject(e);
    };
    const finish = () => {
      const p = parsed!;
      const body = buf.subarray(p.start, p.start + p.length).toString("utf8");
      done();
      sock.destroy();
      resolve({ status: p.status, reason: p.reason, headers: p.headers, body, sock, rest: Buffer.alloc(0) });
    };
    const onEnd = () =>
      parsed
        ? finish()
        : fail(new (buf.length ? SlaveError : NoAnswer)("the desktop closed the slave connection without answering"));
    const onError = (e: Error & { code?: string }) =>
      fail(
        !parsed && !buf.length && (e.code === "EPIPE" || e.code === "ECONNRESET")
          ? new NoAnswer("the desktop closed the slave connection without answering")
          : new SlaveError(`slave connection: ${e.message}`),
      );
    const onData = (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      if (!parsed) {
        const end = buf.indexOf("\r\n\r\n");
        if (end < 0) {
          if (buf.length > MAX_HEAD) fail(new SlaveError("the slave server's answer is too large"));
          return;
        }
        const lines = buf.subarray(0, end).toString("latin1").split("\r\n");
        const m = /^HTTP\/1\.[01] (\d{3})(?: (.*))?$/.exec(lines.shift()!);
        if (!m) return fail(new SlaveError("the slave channel did not answer in HTTP (is it a QVD desktop?)"));
        const hs = new Map<string, string>();
        for (const l of lines) {
          const i = l.indexOf(":");
          if (i > 0) hs.set(l.slice(0, i).trim().toLowerCase(), l.slice(i + 1).trim());
        }
        const status = Number(m[1]);
        if (status === 101) {
          done();
          sock.pause();
          return resolve({ status, reason: m[2] ?? "", headers: hs, body: "", sock, rest: buf.subarray(end + 4) });
        }
        const cl = Number(hs.get("content-length") ?? NaN);
        parsed = {
          status,
          reason: m[2] ?? "",
          headers: hs,
          length: Number.isInteger(cl) && cl >= 0 ? Math.min(cl, MAX_BODY) : MAX_BODY,
          start: end + 4,
        };
      }
      if (buf.length - parsed.start >= parsed.length) finish();
      else if (buf.length > MAX_HEAD + MAX_BODY) finish();
    };
    sock.on("data", onData);
    sock.on("end", onEnd);
    sock.on("error", onError);
  });
}

/** What the desktop says, made safe for a terminal: control characters (escape sequences) become '?'. */
export const printable = (s: string) => s.replace(/[\x00-\x1f\x7f-\x9f]/g, "?");

/** The refusal of a request, as one line: status, reason and the server's first body line. */
export function refusal(r: SlaveResponse): string {
  const said = r.body
    .split(/\r?\n/)
    .map((l) => l.trim())
    .find(Boolean);
  return printable(`${r.status} ${r.reason}${said && said !== r.reason ? `: ${said.slice(0, 200)}` : ""}`);
}

// --- Shared folders ---

export interface ShareOptions {
  endpoint: SlaveEndpoint;
  key: string;
  dir: string;
  sftpServer: string;
  /** bwrap program (confined), or undefined to run sftp-server with the user's whole view of the machine. */
  bwrap?: string;
  /** A private directory for the sandbox's passwd/group files. */
  workDir: string;
  onLog?: (line: string) => void;
}

export interface Share {
  dir: string;
  /** What the desktop calls the share (its mount point there): the ticket of POST /open. */
  ticket: string;
  /** Resolves when the share ends (the desktop unmounted it, or the session ended). */
  ended: Promise<void>;
  stop(): void;
}

/** Top-level paths that are symlinks into /usr on merged-/usr systems, or directories to bind read-only. */
const SYSTEM_DIRS = ["/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"];

/** Whether bwrap works here (installed, and user namespaces allowed); the reason when not. */
export function bwrapUsable(bwrap: string): string | undefined {
  const r = spawnSync(
    bwrap,
    ["--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr", ...systemDirArgs(), "--", "/usr/bin/true"],
    {
      stdio: ["ignore", "ignore", "pipe"],
      timeout: 10_000,
    },
  );
  if (r.error)
    return (r.error as NodeJS.ErrnoException).code === "ENOENT"
      ? `${bwrap} is not installed (package bubblewrap)`
      : r.error.message;
  if (r.status !== 0)
    return `${bwrap} does not work here: ${r.stderr.toString().trim().split("\n")[0] || `exit ${r.status}`}`;
  return undefined;
}

function systemDirArgs(): string[] {
  const args: string[] = [];
  for (const d of SYSTEM_DIRS) {
    const st = lstatSync(d, { throwIfNoEntry: false });
    if (!st) continue;
    if (st.isSymbolicLink()) args.push("--symlink", readlinkSync(d), d);
    else if (st.isDirectory()) args.push("--ro-bind", d, d);
  }
  return args;
}

/**
 * The argv that serves `dir` over SFTP on stdin/stdout. Confined (bwrap): the desktop sees the
 * folder at its own path, read-only system files (/usr), a passwd/group with only this user, and
 * nothing else of this machine; no network, own pid namespace, no capabilities.
 */
export function sftpArgv(dir: string, sftpServer: string, bwrap: string | undefined, workDir: string): string[] {
  if (!bwrap) return [sftpServer, "-e"];
  const real = realpathSync(dir);
  const u = userInfo();
  const uid = process.getuid?.() ?? u.uid;
  const gid = process.getgid?.() ?? u.gid;
  // sftp-server looks its user up; it gets this user only, not the machine's list of accounts.
  const passwd = join(workDir, "passwd");
  const group = join(workDir, "group");
  if (!existsSync(passwd)) {
    const clean = (s: string) => s.replace(/[:\n]/g, "_");
    writeFileSync(passwd, `${clean(u.username)}:x:${uid}:${gid}::${real}:/usr/sbin/nologin\n`, { mode: 0o644 });
    writeFileSync(group, `${clean(u.username)}:x:${gid}:\n`, { mode: 0o644 });
  }
  return [
    bwrap,
    "--unshare-all",
    "--die-with-parent",
    "--new-session",
    "--cap-drop",
    "ALL",
    "--ro-bind",
    "/usr",
    "/usr",
    ...systemDirArgs(),
    "--dev",
    "/dev",
    "--ro-bind",
    passwd,
    "/etc/passwd",
    "--ro-bind",
    group,
    "/etc/group",
    "--bind",
    real,
    real,
    "--chdir",
    real,
    "--",
    sftpServer,
    "-e",
  ];
}

/** Shares `dir` with the desktop: PUT /shares, then sftp-server on the stream until either side ends. */
export async function shareFolder(o: ShareOptions): Promise<Share> {
  const dir = realpathSync(o.dir);
  if (!statSync(dir).isDirectory()) throw new SlaveError(`${o.dir} is not a directory`);
  const argv = sftpArgv(dir, o.sftpServer, o.bwrap, o.workDir);
  const r = await slaveRequest(o.endpoint, "PUT", `/shares${encodePath(dir)}`, [
    ["Authorization", `Basic ${o.key}`],
    ["Connection", "Upgrade"],
    ["Upgrade", "qvd:sftp/1.0"],
  ]);
  if (r.status !== 101) throw new SlaveError(`the desktop refused the share: ${refusal(r)}`);
  const given = r.headers.get("x-qvd-share-ticket");
  // It is printed and sent back in POST /open: no control characters.
  const ticket = given && !/[\x00-\x1f\x7f-\x9f]/.test(given) && given.length <= 4096 ? given : undefined;
  const sock = r.sock;
  let child: ChildProcess;
  try {
    child = spawn(argv[0]!, argv.slice(1), { cwd: dir, stdio: ["pipe", "pipe", "pipe"] });
  } catch (e) {
    sock.destroy();
    throw new SlaveError(`cannot start ${argv[0]}: ${(e as Error).message}`);
  }
  const ended = new Promise<void>((resolve) => {
    let left = 2;
    const one = () => --left === 0 && resolve();
    child.once("close", () => {
      sock.destroy();
      one();
    });
    child.once("error", (e) => {
      o.onLog?.(`${argv[0]}: ${e.message}`);
      sock.destroy();
    });
    sock.once("close", () => {
      child.kill("SIGTERM");
      one();
    });
  });
  child.stderr!.setEncoding("utf8");
  child.stderr!.on("data", (t: string) => {
    for (const l of t.split("\n").filter(Boolean)) o.onLog?.(l);
  });
  if (r.rest.length) child.stdin!.write(r.rest);
  sock.on("error", () => sock.destroy());
  child.stdin!.on("error", () => sock.destroy());
  sock.pipe(child.stdin!);
  child.stdout!.pipe(sock);
  sock.resume();
  return {
    dir,
    ticket: ticket ?? "",
    ended,
    stop: () => {
      child.kill("SIGTERM");
      sock.destroy();
    },
  };
}

// --- Open a file ---

/** Asks the desktop to open `rel` (a path inside the share `ticket`); retries on 404 while the mount appears. */
export async function openFile(
  ep: SlaveEndpoint,
  key: string,
  ticket: string,
  rel: string,
  waitMs = 10_000,
): Promise<void> {
  const end = Date.now() + waitMs;
  for (;;) {
    const r = await slaveRequest(ep, "POST", `/open/${encodePath(rel)}`, [
      ["Authorization", `Basic ${key}`],
      ["X-QVD-Share-Ticket", ticket],
    ]);
    if (r.status === 200) return;
    if (r.status !== 404 || Date.now() > end) throw new SlaveError(`the desktop did not open ${rel}: ${refusal(r)}`);
    await Bun.sleep(300);
  }
}

// --- USB/IP ---

export const BUSID = /^\d{1,3}-\d{1,3}(\.\d{1,3}){0,6}$/;

/** Why a USB device cannot be offered, or undefined when it exists here. */
export function usbDeviceMissing(busid: string, sysfs = "/sys/bus/usb"): string | undefined {
  if (!existsSync(sysfs)) return `no USB device ${busid} (this machine has no USB)`;
  if (!existsSync(join(sysfs, "devices", busid))) return `no USB device ${busid} (see \`usbip list -l\`)`;
  return undefined;
}

/**
 * Asks the desktop to attach a USB device over USB/IP (src/client/usbip.ts sends the device on
 * the stream). Returns the stream after the server's 101 and any bytes past it; throws with its refusal.
 */
export async function requestUsbip(ep: SlaveEndpoint, key: string): Promise<{ sock: net.Socket; rest: Buffer }> {
  const r = await slaveRequest(ep, "POST", "/usbip", [
    ["Authorization", `Basic ${key}`],
    ["Connection", "Upgrade"],
    ["Upgrade", "qvd:usbip/1.0"],
  ]);
  if (r.status !== 101) throw new SlaveError(`the desktop refused USB/IP: ${refusal(r)}`);
  return { sock: r.sock, rest: r.rest };
}

/** `usbip bind -b BUSID` (root, module usbip-host); the error line when it fails. */
export function usbipBind(busid: string, usbip = "usbip"): string | undefined {
  const r = spawnSync(usbip, ["bind", "-b", busid], { stdio: ["ignore", "pipe", "pipe"], timeout: 10_000 });
  if (r.error)
    return (r.error as NodeJS.ErrnoException).code === "ENOENT"
      ? `${usbip} is not installed (package usbip)`
      : r.error.message;
  if (r.status !== 0)
    return `usbip bind -b ${busid}: ${(r.stderr.toString() + r.stdout.toString()).trim().split("\n")[0] || `exit ${r.status}`}`;
  return undefined;
}

export function usbipUnbind(busid: string, usbip = "usbip"): void {
  spawnSync(usbip, ["unbind", "-b", busid], { stdio: "ignore", timeout: 10_000 });
}
