// A raw client of the L7R for the attack tests: TLS over TCP, or over the unix socket after a
// PROXY v2 header (or any bytes) sent in clear; writes with backpressure and keeps what it gets.
import type { Socket } from "bun";

export type Target = { port: number; host?: string } | { unix: string };

export class Peer {
  got = Buffer.alloc(0);
  closed = false;
  shaken = false;
  sent = 0;
  private socket?: Socket<undefined>;
  private waiters: (() => void)[] = [];

  private wake() {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  private handlers() {
    return {
      // A self-signed certificate is fine here; a handshake that failed (EPROTO…) is not.
      handshake: (_s: unknown, _ok: boolean, err: (Error & { code?: string }) | null) => {
        if (!err || /CERT|SIGNED|ISSUER/.test(err.code ?? "")) this.shaken = true;
        else this.closed = true;
        this.wake();
      },
      data: (_s: unknown, d: Uint8Array) => {
        this.got = Buffer.concat([this.got, d]);
        this.wake();
      },
      drain: () => this.wake(),
      close: () => {
        this.closed = true;
        this.wake();
      },
      end: () => {
        this.closed = true;
        this.wake();
      },
      error: () => {
        this.closed = true;
        this.wake();
      },
    };
  }

  /**
   * Connects; `preamble` is written in clear before TLS starts (a PROXY header); `tls: false`
   * leaves the connection raw (nothing but the preamble and what write() sends).
   */
  static async open(target: Target, opts: { preamble?: Uint8Array; tls?: boolean } = {}): Promise<Peer> {
    const p = new Peer();
    const tls = opts.tls ?? true;
    const where =
      "unix" in target ? { unix: target.unix } : { hostname: target.host ?? "127.0.0.1", port: target.port };
    if (tls && !opts.preamble) {
      p.socket = await Bun.connect({ ...where, tls: { rejectUnauthorized: false }, socket: p.handlers() } as any);
      return p;
    }
    const raw: any = await Bun.connect({
      ...where,
      socket: tls ? { data() {}, close: () => p.handlers().close() } : p.handlers(),
    } as any);
    if (opts.preamble) raw.write(opts.preamble);
    if (!tls) {
      p.socket = raw;
      return p;
    }
    const up = raw.upgradeTLS({ tls: { rejectUnauthorized: false }, socket: p.handlers() });
    p.socket = up[1];
    return p;
  }

  /** Resolves when the TLS handshake is done; false when the connection closed first or in `ms`. */
  async handshake(ms = 10_000): Promise<boolean> {
    const end = Date.now() + ms;
    while (!this.shaken && !this.closed && Date.now() < end) await this.wait(Math.min(100, end - Date.now()));
    return this.shaken && !this.closed;
  }

  wait(ms: number): Promise<void> {
    return new Promise((r) => {
      const t = setTimeout(r, ms);
      this.waiters.push(() => {
        clearTimeout(t);
        r();
      });
    });
  }

  /** Writes what the socket takes now; the number of bytes taken. */
  write(bytes: Uint8Array | string): number {
    if (this.closed || !this.socket) return 0;
    const n = Math.max(0, this.socket.write(bytes));
    this.sent += n;
    return n;
  }

  /** Writes `chunk` over and over until `budgetBytes` are sent, `ms` pass or the connection closes. */
  async flood(chunk: Uint8Array, budgetBytes: number, ms: number): Promise<void> {
    const end = Date.now() + ms;
    let off = 0;
    while (!this.closed && this.sent < budgetBytes && Date.now() < end) {
      const n = this.write(chunk.subarray(off));
      off += n;
      if (off >= chunk.length) off = 0;
      if (n === 0) await this.wait(Math.min(50, end - Date.now()));
    }
  }

  /** Status codes of the responses received so far. */
  statuses(): number[] {
    return [...this.got.toString("latin1").matchAll(/HTTP\/1\.1 (\d{3}) /g)].map((m) => Number(m[1]));
  }

  /** Waits for a complete response (status line to the end of its Content-Length body). */
  async response(ms = 20_000): Promise<{ status: number; body: string } | undefined> {
    const end = Date.now() + ms;
    for (;;) {
      const text = this.got.toString("latin1");
      const m = /^HTTP\/1\.1 (\d{3}) [^\r\n]*\r\n([\s\S]*?)\r\n\r\n/.exec(text);
      if (m) {
        const len = Number(/content-length:\s*(\d+)/i.exec(m[2]!)?.[1] ?? 0);
        if (text.length >= m[0].length + len) {
          this.got = this.got.subarray(m[0].length + len);
          return { status: Number(m[1]), body: text.slice(m[0].length, m[0].length + len) };
        }
      }
      if (this.closed || Date.now() >= end) return undefined;
      await this.wait(Math.min(100, end - Date.now()));
    }
  }

  /** True when the server closed the connection within `ms`. */
  async closedWithin(ms: number): Promise<boolean> {
    const end = Date.now() + ms;
    while (!this.closed && Date.now() < end) await this.wait(Math.min(100, end - Date.now()));
    return this.closed;
  }

  end() {
    this.socket?.end();
  }

  destroy() {
    (this.socket as any)?.terminate?.();
    this.socket?.end();
  }
}
