// The client side of the L7R wire protocol (docs/PROTOCOL.md):
// one TLS (or plain) connection, HTTP/1.1 requests written with CRLF and exactly-cased
// headers, responses parsed leniently (CRLF or bare LF), any number of `102 Processing`
// (progress in X-QVD-VM-Info) before a final status, and on `101` the rest of the stream is
// raw NX bytes: whatever was already read past the 101 header block is handed over first.
import type { Socket, SocketHandler } from "bun";
import { isIP } from "node:net";
import { UserError } from "../errors.ts";
import { VERSION } from "../version.ts";

/** Exit codes of `qvd client`. */
export const EXIT = {
  ok: 0,
  failed: 1,
  usage: 2,
  auth: 3,
  forbidden: 4,
  noDesktop: 5,
  unavailable: 6,
  unreachable: 7,
} as const;

/** What a socket's events go to; a socket's `data` is swapped when the splice takes over. */
export interface Endpoint {
  onData(chunk: Uint8Array): void;
  onDrain(): void;
  onEnd(): void;
  onClose(err?: Error): void;
}

export const dispatch: SocketHandler<Endpoint> = {
  data: (s, d) => s.data.onData(d),
  drain: (s) => s.data.onDrain(),
  end: (s) => s.data.onEnd(),
  close: (s, err) => s.data.onClose(err),
  error: (s, err) => s.data.onClose(err),
};

export interface ConnectOptions {
  host: string;
  port: number;
  /** false: plain TCP (servers with l7r.use_ssl=0). */
  tls: boolean;
  /** PEM text of a CA or certificate to trust. */
  ca?: string;
  /** Do not verify the server's certificate. */
  insecure?: boolean;
  /** PEM text of a client certificate and its key (servers with l7r.tls.client_ca). */
  cert?: string;
  key?: string;
  /** Connect + TLS handshake limit. */
  connectTimeoutMs?: number;
  /** Longest wait for the next response (or the next 102) from the server. */
  responseTimeoutMs?: number;
}

export interface Response {
  status: number;
  reason: string;
  /** Header names in lower case; repeated headers joined with ", ". */
  headers: Map<string, string>;
  body: Uint8Array;
}

const LF = 10;
const CR = 13;

/** Index just past the blank line ending a header block (CRLF or bare LF), or -1. */
function headerEnd(buf: Uint8Array): number {
  for (let i = buf.indexOf(LF); i >= 0; i = buf.indexOf(LF, i + 1)) {
    if (buf[i + 1] === LF) return i + 2;
    if (buf[i + 1] === CR && buf[i + 2] === LF) return i + 3;
  }
  return -1;
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  if (a.length === 0) return b;
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

/** One line of a response body for a message (the L7R's long default descriptions are cut). */
export function bodyLine(body: Uint8Array): string {
  const text = new TextDecoder().decode(body).trim();
  const first = text.split(/\r?\n/)[0] ?? "";
  return first.length > 300 ? first.slice(0, 300) + "…" : first;
}

export class L7RConnection implements Endpoint {
  sock!: Socket<Endpoint>;
  private buf: Uint8Array = new Uint8Array(0);
  private outQueue: Uint8Array[] = [];
  private wake?: () => void;
  private closed = false;
  private closeError?: Error;
  /** After the 101: the stream is raw; data is held (and reading paused) until the splice. */
  private raw = false;
  readonly where: string;

  private constructor(private readonly opts: ConnectOptions) {
    this.where = `${opts.host}:${opts.port}`;
  }

  /** Connects (and completes the TLS handshake); failures are exit code 7. */
  static async connect(opts: ConnectOptions): Promise<L7RConnection> {
    const conn = new L7RConnection(opts);
    let settle!: { resolve: () => void; reject: (e: Error) => void };
    const handshake = new Promise<void>((resolve, reject) => (settle = { resolve, reject }));
    const unreachable = (msg: string) =>
      new UserError(`cannot reach the server ${conn.where}: ${msg}`, EXIT.unreachable);
    const timeoutMs = opts.connectTimeoutMs ?? 20_000;
    const timer = setTimeout(() => settle.reject(unreachable(`no answer within ${timeoutMs / 1000} s`)), timeoutMs);
    try {
      conn.sock = await Bun.connect<Endpoint>({
        hostname: opts.host,
        port: opts.port,
        data: conn,
        allowHalfOpen: true,
        socket: {
          ...dispatch,
          handshake(s, success, authErr) {
            if (authErr && !opts.insecure) {
              const hint = /altname|hostname/i.test(authErr.message)
                ? `it was issued for another name than ${opts.host}`
                : opts.ca
                  ? "it is not signed by the --ca given"
                  : "trust its CA with --ca FILE, or use --insecure (not verified)";
              settle.reject(
                new UserError(
                  `cannot reach the server ${conn.where}: its certificate is not trusted (${authErr.message}); ${hint}`,
                  EXIT.unreachable,
                ),
              );
              return s.terminate();
            }
            if (!success && !opts.insecure) {
              settle.reject(unreachable("TLS handshake failed"));
              return s.terminate();
            }
            settle.resolve();
          },
        },
        tls: opts.tls
          ? {
              // Verified here, in `handshake`, for a clear message and exit code.
              rejectUnauthorized: false,
              ca: opts.ca,
              ...(opts.cert ? { cert: opts.cert, key: opts.key } : {}),
              serverName: isIP(opts.host) ? undefined : opts.host,
            }
          : undefined,
      });
      if (!opts.tls) settle.resolve();
      // A close before the handshake completed.
      void handshake.catch(() => {});
      conn.onCloseHook = () =>
        settle.reject(unreachable(conn.closeError?.message ?? "the connection was closed during the TLS handshake"));
      await handshake;
    } catch (err) {
      if (err instanceof UserError) throw err;
      const code = (err as { code?: string }).code;
      const known: Record<string, string> = {
        ECONNREFUSED: "connection refused",
        ENOTFOUND: "unknown host",
        EAI_NONAME: "unknown host",
        EHOSTUNREACH: "no route to host",
        ENETUNREACH: "network unreachable",
        ETIMEDOUT: "timed out",
        ECONNRESET: "connection reset",
      };
      throw unreachable(code && known[code] ? known[code] : `${(err as Error).message}${code ? ` (${code})` : ""}`);
    } finally {
      clearTimeout(timer);
      conn.onCloseHook = undefined;
    }
    conn.sock.setNoDelay(true);
    return conn;
  }

  private onCloseHook?: () => void;

  // --- Endpoint (until the splice takes the socket over) ---

  onData(chunk: Uint8Array): void {
    this.buf = concat(this.buf, chunk);
    this.wake?.();
  }
  onDrain(): void {
    this.flush();
  }
  onEnd(): void {
    this.closed = true;
    this.wake?.();
  }
  onClose(err?: Error): void {
    this.closed = true;
    if (err && !this.closeError) this.closeError = err;
    this.onCloseHook?.();
    this.wake?.();
  }

  private flush(): void {
    while (this.outQueue.length) {
      const c = this.outQueue[0]!;
      const n = this.sock.write(c);
      if (n < 0) return;
      if (n < c.length) {
        this.outQueue[0] = c.subarray(n);
        return;
      }
      this.outQueue.shift();
    }
  }

  private send(text: string): void {
    this.outQueue.push(new TextEncoder().encode(text));
    this.flush();
  }

  /** Writes one request. `Authorization`, `Connection`, `Upgrade` are spelled as the L7R wants. */
  request(target: string, headers: Record<string, string>): void {
    let text = `GET ${target} HTTP/1.1\r\n`;
    for (const [k, v] of Object.entries({ ...headers, "User-Agent": `qvd-client/${VERSION} (linux)` }))
      text += `${k}: ${v}\r\n`;
    this.send(text + "\r\n");
  }

  private waitData(deadline: number, what: string): Promise<void> {
    return new Promise((resolve, reject) => {
      const left = deadline - Date.now();
      const timer = setTimeout(
        () => {
          this.wake = undefined;
          reject(
            new UserError(
              `${this.where} did not answer ${what} within ${Math.round((this.opts.responseTimeoutMs ?? 300_000) / 1000)} s`,
              EXIT.unavailable,
            ),
          );
        },
        Math.max(left, 0),
      );
      this.wake = () => {
        clearTimeout(timer);
        this.wake = undefined;
        resolve();
      };
    });
  }

  /** Reads the next response (a 102 is a response too); `what` names the request in messages. */
  async readResponse(what: string): Promise<Response> {
    const deadline = Date.now() + (this.opts.responseTimeoutMs ?? 300_000);
    let end: number;
    while ((end = headerEnd(this.buf)) < 0) {
      if (this.closed) throw this.closedError(what);
      await this.waitData(deadline, what);
    }
    const head = new TextDecoder("latin1").decode(this.buf.subarray(0, end));
    const lines = head.split(/\r?\n/);
    while (lines[0] === "") lines.shift(); // blank lines before a status line
    const m = /^HTTP\/1\.[01] (\d{3})(?: (.*))?$/.exec(lines.shift() ?? "");
    if (!m)
      throw new UserError(
        `${this.where} is not a QVD server (bad response to ${what}: ${JSON.stringify(head.slice(0, 60))})`,
        EXIT.unreachable,
      );
    const status = Number(m[1]);
    const headers = new Map<string, string>();
    for (const line of lines) {
      if (line === "") continue;
      const i = line.indexOf(":");
      if (i <= 0) continue; // tolerated: the L7R's broken 404 carries junk lines (docs/PROTOCOL.md, "The HTTP dialect")
      const name = line.slice(0, i).trim().toLowerCase();
      const value = line.slice(i + 1).trim();
      headers.set(name, headers.has(name) ? `${headers.get(name)}, ${value}` : value);
    }
    this.buf = this.buf.subarray(end);
    let body: Uint8Array = new Uint8Array(0);
    if (status >= 200 && status !== 204 && status !== 304) {
      const cl = headers.get("content-length");
      if (cl !== undefined) {
        const len = Number(cl);
        while (this.buf.length < len) {
          if (this.closed) break;
          await this.waitData(deadline, what);
        }
        body = this.buf.subarray(0, len);
        this.buf = this.buf.subarray(Math.min(len, this.buf.length));
      } else {
        // No length: the body runs to the end of the connection.
        while (!this.closed) await this.waitData(deadline, what);
        body = this.buf;
        this.buf = new Uint8Array(0);
      }
    }
    if (status === 101) {
      this.raw = true;
      this.sock.pause();
    }
    return { status, reason: m[2] ?? "", headers, body };
  }

  private closedError(what: string): UserError {
    const detail = this.closeError ? `: ${this.closeError.message}` : "";
    // With TLS 1.3 a server that wants a client certificate says so only after the handshake.
    if (/CERTIFICATE_REQUIRED|BAD_CERTIFICATE|UNKNOWN_CA|CERTIFICATE_UNKNOWN/i.test(this.closeError?.message ?? ""))
      return new UserError(
        this.opts.cert
          ? `${this.where} refused the client certificate given with --cert${detail}`
          : `${this.where} requires a client certificate: give it with --cert FILE --key FILE${detail}`,
        EXIT.auth,
      );
    // A refused client certificate may also end the connection without saying why.
    const hint =
      this.opts.cert && !this.closeError
        ? " (if it checks client certificates, it may have refused the one given with --cert)"
        : "";
    return new UserError(
      `${this.where} closed the connection before answering ${what}${detail}${hint}`,
      EXIT.unavailable,
    );
  }

  /** After a 101: the bytes already read past its header block (the first NX bytes). */
  takeRaw(): Uint8Array {
    if (!this.raw) throw new Error("takeRaw before a 101");
    const rest = this.buf;
    this.buf = new Uint8Array(0);
    return rest;
  }

  /** Whether the server already closed (or half-closed) the connection. */
  get isClosed(): boolean {
    return this.closed;
  }

  close(): void {
    try {
      this.sock.end();
    } catch {}
  }
}
