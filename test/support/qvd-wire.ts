// A raw TLS client of the QVD protocol for tests: sends exactly the bytes given, and reads
// responses the way the original clients do (status line, headers, Content-Length body;
// 102s are separate responses; after a 101 the rest is raw).
import type { Socket } from "bun";

export interface WireResponse {
  status: number;
  reason: string;
  /** Header lines exactly as received (without line ends). */
  lines: string[];
  headers: Map<string, string>;
  body: string;
  /** The whole response as received. */
  raw: string;
}

export class WireClient {
  private buf = Buffer.alloc(0);
  private wake?: () => void;
  closed = false;
  private socket!: Socket<undefined>;

  static async connect(port: number, host = "127.0.0.1"): Promise<WireClient> {
    return WireClient.open({ hostname: host, port });
  }

  /** The same over a unix socket (an L7R's l7r.listen.unix, reachable from any namespace). */
  static async connectUnix(path: string): Promise<WireClient> {
    return WireClient.open({ unix: path });
  }

  private static async open(target: { hostname: string; port: number } | { unix: string }): Promise<WireClient> {
    const c = new WireClient();
    let shaken!: () => void;
    const handshake = new Promise<void>((r) => (shaken = r));
    c.socket = await Bun.connect({
      ...(target as { hostname: string; port: number }),
      tls: { rejectUnauthorized: false },
      socket: {
        // Bytes written before the handshake completes would be lost: wait for it.
        handshake: () => shaken(),
        data: (_s, d) => {
          c.buf = Buffer.concat([c.buf, d]);
          c.wake?.();
        },
        close: () => {
          c.closed = true;
          c.wake?.();
        },
        end: () => {
          c.closed = true;
          c.wake?.();
        },
      },
    });
    await handshake;
    return c;
  }

  send(text: string | Uint8Array): void {
    this.socket.write(text);
  }

  end(): void {
    this.socket.end();
  }

  private async more(deadline: number): Promise<void> {
    if (this.closed) throw new Error(`connection closed; buffered: ${JSON.stringify(this.buf.toString("latin1"))}`);
    const left = deadline - Date.now();
    if (left <= 0)
      throw new Error(`no complete response in time; buffered: ${JSON.stringify(this.buf.toString("latin1"))}`);
    await new Promise<void>((r) => {
      this.wake = r;
      setTimeout(r, Math.min(left, 200));
    });
  }

  async response(timeoutMs = 20_000): Promise<WireResponse> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const end = this.buf.indexOf("\r\n\r\n");
      if (end >= 0) {
        const head = this.buf.subarray(0, end).toString("latin1");
        const [statusLine, ...lines] = head.split("\r\n");
        const m = /^HTTP\/1\.1 (\d{3}) (.*)$/.exec(statusLine!);
        if (!m) throw new Error(`bad status line ${JSON.stringify(statusLine)}`);
        const headers = new Map(
          lines.map(
            (l) => [l.slice(0, l.indexOf(":")).toLowerCase(), l.slice(l.indexOf(":") + 1).trim()] as [string, string],
          ),
        );
        const len = Number(headers.get("content-length") ?? 0);
        if (this.buf.length >= end + 4 + len) {
          const body = this.buf.subarray(end + 4, end + 4 + len).toString("utf8");
          const raw = this.buf.subarray(0, end + 4 + len).toString("latin1");
          this.buf = this.buf.subarray(end + 4 + len);
          return { status: Number(m[1]), reason: m[2]!, lines, headers, body, raw };
        }
      }
      await this.more(deadline);
    }
  }

  /** Reads 102s until a final response; returns both. */
  async final(timeoutMs = 60_000): Promise<{ progress: string[]; res: WireResponse }> {
    const progress: string[] = [];
    for (;;) {
      const r = await this.response(timeoutMs);
      if (r.status !== 102) return { progress, res: r };
      progress.push(r.headers.get("x-qvd-vm-info") ?? "");
    }
  }

  /**
   * connect_to_vm as the Qt client sends it (bare LF); after a 101, the NX handshake: our side's
   * proxy greets first (the exact bytes nxproxy -S sends) and nxagent's first answer is kept.
   */
  async connectToVm(
    vmId: number,
    auth: string,
    timeoutMs = 300_000,
  ): Promise<{
    progress: string[];
    res: WireResponse;
    nx: string /** performance.now() at the final answer, before the NX greeting. */;
    finalAt: number;
  }> {
    this.send(
      `GET /qvd/connect_to_vm?id=${vmId}&qvd.client.os=linux&qvd.client.link=lan&qvd.client.keyboard=pc105%2Fus&qvd.client.geometry=1024x768&qvd.client.fullscreen=0&qvd.client.type=qt HTTP/1.1\n` +
        `Authorization: ${auth}\nConnection: Upgrade\nUpgrade: QVD/1.0\nUser-Agent: QVDClient Qt/0.01 (Linux)\n\n`,
    );
    const { progress, res } = await this.final(timeoutMs);
    const finalAt = performance.now();
    let nx = "";
    if (res.status === 101) {
      this.send("NXPROXY-3.5.0-3.5.99 stream=default,data=default ");
      const deadline = Date.now() + 10_000;
      while (Date.now() < deadline && nx.length === 0 && !this.closed) {
        await Bun.sleep(50);
        nx = this.takeBuffered().toString("latin1");
      }
    }
    return { progress, res, nx, finalAt };
  }

  /** Resolves when the server has closed the connection. */
  async waitClosed(timeoutMs = 10_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!this.closed) {
      if (Date.now() > deadline) throw new Error("the server left the connection open");
      await new Promise<void>((r) => {
        this.wake = r;
        setTimeout(r, 100);
      });
    }
  }

  /** Raw bytes after an upgrade. */
  takeBuffered(): Buffer {
    const b = this.buf;
    this.buf = Buffer.alloc(0);
    return b;
  }
}

export const basic = (login: string, password: string) =>
  `Basic ${Buffer.from(`${login}:${password}`).toString("base64")}`;
