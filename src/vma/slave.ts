// The VMA's slave server: one instance per slave connection, HTTP/1.1 on a byte stream (nxagent
// runs it with the connection on stdin/stdout). Endpoints and answers follow the original QVD's
// slave channel; unlike the original, every endpoint (GET /shares included) needs the slave key.
// See src/vma/README.md, "Slave channel".
import { createHash, timingSafeEqual } from "node:crypto";
import { existsSync, lstatSync, mkdirSync, readFileSync, realpathSync, statSync } from "node:fs";
import { connect } from "node:net";
import { isAbsolute, join, normalize, resolve, sep } from "node:path";
import { REASONS } from "../nx/http.ts";

/** A program to run: argv (never through a shell), working directory and environment. */
export interface SlaveCommand {
  argv: string[];
  cwd?: string;
  env?: Record<string, string>;
}

export interface SlaveExec {
  /** Hands the connection over to a program (after a 101): it reads `rest` and writes `output`. Resolves with its exit code. */
  handOver(cmd: SlaveCommand, rest: AsyncIterable<Uint8Array>, output: SlaveOutput): Promise<number>;
  /** Starts a program and does not wait for it (xdg-open). */
  launch(cmd: SlaveCommand): void;
}

export interface SlaveOutput {
  write(chunk: Uint8Array): unknown;
  end(): unknown;
}

export interface SlaveOptions {
  /** The file holding the per-session slave key (its contents, one trailing newline ignored). */
  keyFile: string;
  /** Where shares are mounted (the original's vma.user.shares.path, ~/Redirected). */
  sharesDir: string;
  /** uid= given to sshfs. */
  uid: number;
  sshfs?: string;
  sshfsExtraArgs?: string[];
  sftpServer?: string;
  xdgOpen?: string;
  /** DISPLAY for xdg-open (":100", the NX display). */
  display?: string;
  /** Environment given to launched programs (DISPLAY is set on top). */
  env?: Record<string, string>;
  exec?: SlaveExec;
  /**
   * The VMA's mount socket (src/vma/shares.ts): PUT /shares asks the VMA to mount and relays the
   * stream to it. Without it, sshfs is run here and mounts itself (a host with fusermount3).
   */
  socket?: string;
  /** Shared folders and open-file are off (qvd.vm.shares.enable): 403. */
  noShares?: boolean;
  /** USB/IP is off (qvd.vm.usb.enable): 403. */
  noUsb?: boolean;
  /** This desktop cannot attach USB devices (an LXC desktop): 501. */
  usbUnavailable?: boolean;
}

export const MAX_HEADER_BYTES = 8192;
export const MAX_HEADERS = 64;
export const MAX_BODY_BYTES = 65536;
/** A share's name: one path component (NAME_MAX bytes). */
export const MAX_NAME_BYTES = 255;
export const MAX_PATH_BYTES = 4096;

const enc = new TextEncoder();

/** The default exec: Bun.spawn, the connection piped through the child's stdin/stdout. */
export const spawnExec: SlaveExec = {
  async handOver(cmd, rest, output) {
    const child = Bun.spawn(cmd.argv, { cwd: cmd.cwd, env: cmd.env, stdin: "pipe", stdout: "pipe", stderr: "inherit" });
    void (async () => {
      try {
        for await (const chunk of rest) {
          child.stdin.write(chunk);
          await child.stdin.flush();
        }
      } catch {
        /* the connection went away */
      }
      try {
        await child.stdin.end();
      } catch {
        /* child gone */
      }
    })();
    const out = child.stdout.getReader();
    for (let r = await out.read(); !r.done; r = await out.read()) output.write(r.value);
    return await child.exited;
  },
  launch(cmd) {
    const child = Bun.spawn(cmd.argv, {
      cwd: cmd.cwd,
      env: cmd.env,
      stdin: "ignore",
      stdout: "ignore",
      stderr: "inherit",
    });
    child.unref();
  },
};

class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

interface Request {
  method: string;
  target: string;
  headers: Map<string, string>;
}

/** Reads the key; an empty or unreadable file means no key, and then nothing is accepted. */
function readKey(file: string): string | undefined {
  try {
    const key = readFileSync(file, "utf8").replace(/\r?\n$/, "");
    return key.length > 0 ? key : undefined;
  } catch {
    return undefined;
  }
}

/** Constant time in the contents and in the lengths: both sides are hashed first. */
export function keyMatches(given: string | undefined, key: string | undefined): boolean {
  if (given === undefined || key === undefined) return false;
  const a = createHash("sha256").update(given).digest();
  const b = createHash("sha256").update(key).digest();
  return timingSafeEqual(a, b);
}

/** A share's name, checked: one path component, no NUL or control characters, not "." or "..", at most 255 bytes. */
export function shareName(path: string): string {
  const parts = path.split("/").filter((p) => p.length > 0);
  const name = parts.length ? parts[parts.length - 1]! : "Root";
  if (
    name === "." ||
    name === ".." ||
    /[\x00-\x1f\x7f]/.test(name) ||
    name.includes("/") ||
    enc.encode(name).length > MAX_NAME_BYTES
  ) {
    throw new HttpError(400, "invalid share name");
  }
  return name;
}

function decodePath(raw: string): string {
  let s: string;
  try {
    s = decodeURIComponent(raw);
  } catch {
    throw new HttpError(400, "invalid percent-encoding");
  }
  if (/[\x00-\x1f\x7f]/.test(s)) throw new HttpError(400, "control character in path");
  if (enc.encode(s).length > MAX_PATH_BYTES) throw new HttpError(400, "path too long");
  return s;
}

function noDotDot(path: string): void {
  if (path.split("/").some((p) => p === "..")) throw new HttpError(400, "'..' in path");
}

function response(status: number, headers: [string, string][] = [], body = ""): Uint8Array {
  const b = enc.encode(body);
  const lines = [`HTTP/1.1 ${status} ${REASONS[status] ?? "Error"}`];
  for (const [k, v] of headers) lines.push(`${k}: ${v}`);
  if (status !== 101) {
    if (b.length) lines.push("Content-Type: text/plain; charset=utf-8");
    lines.push(`Content-Length: ${b.length}`);
  }
  const head = enc.encode(lines.join("\r\n") + "\r\n\r\n");
  const out = new Uint8Array(head.length + b.length);
  out.set(head);
  out.set(b, head.length);
  return out;
}

function parseHead(head: string): Request {
  const lines = head.split("\r\n");
  const m = /^([A-Z]{1,16}) (\/[\x21-\x7e]*) (HTTP\/\d\.\d)$/.exec(lines[0]!);
  if (!m) throw new HttpError(400, "malformed request line");
  if (m[3] !== "HTTP/1.1" && m[3] !== "HTTP/1.0") throw new HttpError(505, "this server speaks HTTP/1.x");
  if (lines.length - 1 > MAX_HEADERS) throw new HttpError(431, "too many header fields");
  const headers = new Map<string, string>();
  for (const line of lines.slice(1)) {
    const h = /^([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*$/.exec(line);
    if (!h) throw new HttpError(400, "malformed header line");
    const name = h[1]!.toLowerCase();
    if (headers.has(name)) throw new HttpError(400, `repeated header ${h[1]}`);
    headers.set(name, h[2]!);
  }
  return { method: m[1]!, target: m[2]!, headers };
}

/** Reads the request heads from a byte stream, keeping what follows. */
class Reader {
  private buf = new Uint8Array(0);
  private done = false;
  constructor(private readonly it: AsyncIterator<Uint8Array>) {}

  private async more(): Promise<boolean> {
    if (this.done) return false;
    const r = await this.it.next();
    if (r.done) {
      this.done = true;
      return false;
    }
    const c = r.value instanceof Uint8Array ? r.value : enc.encode(String(r.value));
    const n = new Uint8Array(this.buf.length + c.length);
    n.set(this.buf);
    n.set(c, this.buf.length);
    this.buf = n;
    return true;
  }

  /** The next head (without its blank line), undefined at a clean end of stream. */
  async head(): Promise<string | undefined> {
    for (;;) {
      const end = findCrlfCrlf(this.buf);
      if (end >= 0) {
        if (end + 4 > MAX_HEADER_BYTES) throw new HttpError(431, "header too large");
        const head = this.buf.subarray(0, end);
        this.buf = this.buf.slice(end + 4);
        for (const b of head) if (b > 0x7e && b !== 0x09) throw new HttpError(400, "non-ASCII byte in header");
        return new TextDecoder().decode(head);
      }
      if (this.buf.length > MAX_HEADER_BYTES) throw new HttpError(431, "header too large");
      if (!(await this.more())) {
        if (this.buf.length === 0) return undefined;
        throw new HttpError(400, "incomplete request");
      }
    }
  }

  async skipBody(length: number): Promise<void> {
    while (this.buf.length < length) if (!(await this.more())) throw new HttpError(400, "incomplete body");
    this.buf = this.buf.slice(length);
  }

  /** Everything not read yet: the buffered bytes, then the rest of the stream. */
  rest(): AsyncIterable<Uint8Array> {
    const self = this;
    return {
      async *[Symbol.asyncIterator]() {
        if (self.buf.length) yield self.buf;
        self.buf = new Uint8Array(0);
        while (!self.done) {
          const r = await self.it.next();
          if (r.done) break;
          yield r.value;
        }
      },
    };
  }
}

function findCrlfCrlf(b: Uint8Array): number {
  for (let i = 0; i + 3 < b.length; i++)
    if (b[i] === 13 && b[i + 1] === 10 && b[i + 2] === 13 && b[i + 3] === 10) return i;
  return -1;
}

function bodyLength(req: Request): number {
  if (req.headers.has("transfer-encoding")) throw new HttpError(400, "Transfer-Encoding is not accepted");
  const cl = req.headers.get("content-length");
  if (cl === undefined) return 0;
  if (!/^\d{1,8}$/.test(cl)) throw new HttpError(400, "invalid Content-Length");
  const n = Number(cl);
  if (n > MAX_BODY_BYTES) throw new HttpError(400, "body too large");
  return n;
}

const SFTP_UPGRADE = /^qvd:sftp\/1\.0(?:;charset=([A-Za-z0-9._:+-]{1,40}))?$/;

function upgrade(req: Request): { charset?: string } {
  const conn = (req.headers.get("connection") ?? "").split(",").map((s) => s.trim().toLowerCase());
  const m = SFTP_UPGRADE.exec(req.headers.get("upgrade") ?? "");
  if (!conn.includes("upgrade") || !m)
    throw new HttpError(426, "expected Connection: Upgrade and Upgrade: qvd:sftp/1.0");
  return { charset: m[1] };
}

/** The program-side answer to one request. */
type Outcome =
  | { kind: "reply"; bytes: Uint8Array; close?: boolean }
  | { kind: "handover"; bytes: Uint8Array; cmd: SlaveCommand }
  | { kind: "mount"; name: string; charset?: string }
  | { kind: "usbip" };

function isDir(p: string): boolean {
  try {
    return statSync(p).isDirectory();
  } catch {
    return false;
  }
}

function within(child: string, parent: string): boolean {
  return child.startsWith(parent.endsWith(sep) ? parent : parent + sep);
}

/** Answers one authenticated request. */
type Resolved = Required<
  Pick<SlaveOptions, "keyFile" | "sharesDir" | "uid" | "sshfs" | "sftpServer" | "xdgOpen" | "display" | "exec">
> &
  SlaveOptions;

function route(req: Request, o: Resolved): Outcome {
  const q = req.target.indexOf("?");
  const rawPath = q >= 0 ? req.target.slice(0, q) : req.target;
  const sharesDir = resolve(o.sharesDir);

  if (rawPath === "/shares" || rawPath.startsWith("/shares/") || rawPath.startsWith("/open/")) {
    if (o.noShares) throw new HttpError(403, "shared folders are disabled for this desktop");
  }
  if (rawPath === "/shares" || rawPath.startsWith("/shares/")) {
    const path = decodePath(rawPath.slice("/shares".length));
    if (req.method === "PUT") {
      const { charset } = upgrade(req);
      const mountpoint = join(sharesDir, shareName(path));
      if (!within(mountpoint, sharesDir)) throw new HttpError(400, "invalid share name");
      try {
        mkdirSync(sharesDir, { recursive: true, mode: 0o700 });
        const st = lstatSync(mountpoint, { throwIfNoEntry: false });
        if (st && !st.isDirectory()) throw new HttpError(409, "the mount point exists and is not a directory");
        if (!st) mkdirSync(mountpoint, { mode: 0o700 });
        if (realpathSync(mountpoint) !== join(realpathSync(sharesDir), shareName(path)))
          throw new HttpError(409, "the mount point is not in the shares directory");
      } catch (e) {
        if (e instanceof HttpError) throw e;
        throw new HttpError(500, `cannot create the mount point: ${(e as Error).message}`);
      }
      if (o.socket) return { kind: "mount", name: shareName(path), charset };
      // sshfs 3 (libfuse 3) has no atomic_o_trunc, which the original passed to sshfs 2.
      const argv = [
        o.sshfs,
        "qvd-client:",
        mountpoint,
        "-o",
        "slave",
        "-o",
        `uid=${o.uid}`,
        ...(o.sshfsExtraArgs ?? []),
      ];
      if (charset) argv.push("-o", `modules=iconv,from_code=${charset},to_code=utf-8`);
      return {
        kind: "handover",
        bytes: response(101, [["X-QVD-Share-Ticket", mountpoint]]),
        cmd: { argv, env: o.env },
      };
    }
    if (req.method === "GET") {
      upgrade(req);
      const dir = normalize(path.length ? path : "/");
      noDotDot(path);
      if (!isAbsolute(dir) || !isDir(dir)) throw new HttpError(404, "no such directory");
      return { kind: "handover", bytes: response(101), cmd: { argv: [o.sftpServer, "-e"], cwd: dir, env: o.env } };
    }
    throw new HttpError(405, "PUT or GET");
  }

  if (rawPath.startsWith("/open/")) {
    if (req.method !== "POST") throw new HttpError(405, "POST");
    const rel = decodePath(rawPath.slice("/open/".length));
    noDotDot(rel);
    if (rel.length === 0) throw new HttpError(400, "no file named");
    const ticket = req.headers.get("x-qvd-share-ticket");
    if (!ticket) throw new HttpError(400, "X-QVD-Share-Ticket missing");
    if (/[\x00-\x1f\x7f]/.test(ticket)) throw new HttpError(400, "invalid ticket");
    noDotDot(ticket);
    const share = resolve(ticket);
    // The ticket names a share: a directory directly in the shares directory.
    if (!within(share, sharesDir) || share.slice(sharesDir.length + 1).includes("/"))
      throw new HttpError(400, "invalid ticket");
    shareName(share.slice(sharesDir.length + 1));
    if (!isDir(share)) throw new HttpError(404, "no such share");
    const file = resolve(share, rel.replace(/^\/+/, ""));
    if (!within(file, share)) throw new HttpError(400, "the file is not in the share");
    let real: string;
    try {
      real = realpathSync(file);
    } catch {
      throw new HttpError(404, "no such file");
    }
    if (!within(real, realpathSync(share))) throw new HttpError(400, "the file is not in the share");
    o.exec!.launch({ argv: [o.xdgOpen, file], env: { ...(o.env ?? {}), DISPLAY: o.display } });
    return { kind: "reply", bytes: response(200) };
  }

  if (rawPath === "/usbip") {
    if (req.method !== "POST") throw new HttpError(405, "POST");
    if (o.noUsb) throw new HttpError(403, "USB/IP is disabled for this desktop");
    if (o.usbUnavailable || !o.socket) throw new HttpError(501, USBIP_UNAVAILABLE);
    const conn = (req.headers.get("connection") ?? "").split(",").map((s) => s.trim().toLowerCase());
    if (!conn.includes("upgrade") || req.headers.get("upgrade") !== "qvd:usbip/1.0")
      throw new HttpError(426, "expected Connection: Upgrade and Upgrade: qvd:usbip/1.0");
    return { kind: "usbip" };
  }
  throw new HttpError(404, "not found");
}

/**
 * Why a desktop cannot attach a USB device: the device goes to the vhci_hcd driver of the kernel
 * the desktop runs on, and an LXC desktop's kernel is the node's (src/vma/usbip.ts).
 */
export const USBIP_UNAVAILABLE =
  "USB devices need a KVM desktop: attaching one needs the desktop's own kernel and its vhci_hcd driver, and an LXC desktop shares its node's kernel";

/** The VMA's answer to a mount or USB request (src/vma/shares.ts), then the stream. */
async function askMount(
  socketPath: string,
  req: { key: string; name?: string; charset?: string; usbip?: boolean },
): Promise<{ status: number; ticket?: string; error?: string; sock?: import("node:net").Socket; rest?: Buffer }> {
  const what = req.usbip ? "USB devices are" : "shared folders are";
  if (!existsSync(socketPath)) return { status: 503, error: `${what} not available in this session` };
  return await new Promise((res) => {
    const sock = connect(socketPath);
    let buf = Buffer.alloc(0);
    const done = (r: {
      status: number;
      ticket?: string;
      error?: string;
      sock?: import("node:net").Socket;
      rest?: Buffer;
    }) => {
      sock.off("data", onData);
      clearTimeout(timer);
      res(r);
    };
    const onData = (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      const nl = buf.indexOf(10);
      if (nl < 0) return;
      sock.pause();
      try {
        const a = JSON.parse(buf.subarray(0, nl).toString("utf8")) as {
          status: number;
          ticket?: string;
          error?: string;
        };
        if (a.status === 200 && (req.usbip || typeof a.ticket === "string"))
          return done({ status: 200, ticket: a.ticket, sock, rest: buf.subarray(nl + 1) });
        sock.destroy();
        done({
          status: typeof a.status === "number" && a.status >= 200 && REASONS[a.status] ? a.status : 500,
          error: String(a.error ?? (req.usbip ? "USB device refused" : "mount refused")),
        });
      } catch {
        sock.destroy();
        done({ status: 500, error: "bad answer from the VMA" });
      }
    };
    const timer = setTimeout(() => {
      sock.destroy();
      done({ status: 503, error: "the VMA did not answer" });
    }, 20_000);
    sock.on("data", onData);
    sock.on("error", () => done({ status: 503, error: `${what} not available in this session` }));
    sock.write(JSON.stringify(req) + "\n");
  });
}

/**
 * Serves one slave connection: requests one after another until a 101 hands the connection to
 * a program, an error closes it, or the peer ends it. Resolves when done (after the handed-over
 * program exits).
 */
export async function serveSlave(
  input: AsyncIterable<Uint8Array>,
  output: SlaveOutput,
  options: SlaveOptions,
): Promise<void> {
  const o: Resolved = {
    sshfs: "sshfs",
    sftpServer: "/usr/lib/openssh/sftp-server",
    xdgOpen: "xdg-open",
    display: ":100",
    ...options,
    exec: options.exec ?? spawnExec,
  };
  const reader = new Reader(input[Symbol.asyncIterator]());
  for (;;) {
    let outcome: Outcome;
    try {
      const head = await reader.head();
      if (head === undefined) break;
      const req = parseHead(head);
      const auth = /^Basic (.+)$/.exec(req.headers.get("authorization") ?? "");
      if (!keyMatches(auth?.[1], readKey(o.keyFile))) {
        output.write(
          response(
            401,
            [
              ["WWW-Authenticate", 'Basic realm="QVD"'],
              ["Connection", "close"],
            ],
            "Unauthorized\n",
          ),
        );
        break;
      }
      await reader.skipBody(bodyLength(req));
      outcome = route(req, o);
    } catch (e) {
      const status = e instanceof HttpError ? e.status : 500;
      const msg = e instanceof HttpError ? e.message : "internal error";
      const close = status === 400 || status === 431 || status === 505 || status === 500;
      output.write(response(status, close ? [["Connection", "close"]] : [], msg + "\n"));
      if (close) break;
      continue;
    }
    if (outcome.kind === "mount") {
      const a = await askMount(o.socket!, {
        key: readKey(o.keyFile) ?? "",
        name: outcome.name,
        charset: outcome.charset,
      });
      if (a.status !== 200 || !a.sock) {
        output.write(response(a.status, [["Connection", "close"]], (a.error ?? "error") + "\n"));
        break;
      }
      output.write(response(101, [["X-QVD-Share-Ticket", a.ticket!]]));
      await relay(reader.rest(), output, a.sock, a.rest!);
      break;
    }
    if (outcome.kind === "usbip") {
      const a = await askMount(o.socket!, { key: readKey(o.keyFile) ?? "", usbip: true });
      if (a.status !== 200 || !a.sock) {
        output.write(response(a.status, [["Connection", "close"]], (a.error ?? "error") + "\n"));
        break;
      }
      output.write(response(101));
      await relay(reader.rest(), output, a.sock, a.rest!);
      break;
    }
    output.write(outcome.bytes);
    if (outcome.kind === "handover") {
      await o.exec.handOver(outcome.cmd, reader.rest(), output);
      break;
    }
    if (outcome.close) break;
  }
  output.end();
}

/** Copies the client's stream to the VMA's socket and back until either side ends. */
async function relay(
  input: AsyncIterable<Uint8Array>,
  output: SlaveOutput,
  sock: import("node:net").Socket,
  first: Buffer,
): Promise<void> {
  const closed = new Promise<void>((res) => {
    sock.on("close", () => res());
    sock.on("error", () => res());
  });
  if (first.length) output.write(first);
  sock.on("data", (d: Buffer) => {
    output.write(d);
  });
  sock.resume();
  void (async () => {
    try {
      for await (const chunk of input) if (!sock.write(chunk)) await new Promise((r) => sock.once("drain", r));
    } catch {}
    sock.end();
  })();
  await closed;
}
