// A browser's WebSocket on an L7R connection after its 101 (src/web/desktop/README.md): text
// frames (JSON) before the session is ready, then binary frames relayed to and from Xvnc's
// RFB socket. Backpressure both ways, never buffering: a browser that does not read pauses
// Xvnc, and an Xvnc that does not read pauses the browser's socket.
import {
  binaryFrame,
  closeFrame,
  FrameReader,
  pingFrame,
  pongFrame,
  textFrame,
  WebSocketProtocolError,
} from "./websocket.ts";
import type { IoSocket } from "../nx/splice.ts";

/** Largest message a browser may send: RFB input, a clipboard paste of up to 1 MiB. */
const MAX_MESSAGE = (1 << 20) + 64;

export interface WebChannelHandlers {
  text(t: string): void;
  binary(b: Uint8Array): void;
  /** The socket ended; `code` is the browser's close code, when it sent one. */
  end(code?: number, reason?: string): void;
}

export class WebChannel {
  private readonly reader = new FrameReader(MAX_MESSAGE);
  private out: Uint8Array[] = [];
  private closed = false;
  private inputPaused = false;
  private pinger?: ReturnType<typeof setInterval>;
  /** Called when everything queued for the browser has been written. */
  onDrained?: () => void;

  constructor(
    private readonly s: IoSocket,
    private readonly h: WebChannelHandlers,
  ) {}

  /** Takes over the socket's events; `initial` are bytes read past the upgrade request, `pending` answers not yet written. */
  start(initial: Uint8Array, pending?: Uint8Array) {
    if (pending?.length) this.out.push(pending);
    this.s.data.io = {
      data: (c) => this.input(c),
      drain: () => this.flush(),
      end: () => this.finish(),
      close: () => this.finish(),
    };
    this.flush();
    if (initial.length) this.input(initial);
  }

  get isClosed() {
    return this.closed;
  }

  private input(c: Uint8Array) {
    if (this.closed) return;
    this.reader.push(c);
    for (;;) {
      let m;
      try {
        m = this.reader.next();
      } catch (err) {
        if (!(err instanceof WebSocketProtocolError)) throw err;
        return this.close(err.code, err.message);
      }
      if (!m || this.closed) return;
      switch (m.type) {
        case "text":
          this.h.text(m.text);
          break;
        case "binary":
          this.h.binary(m.data);
          break;
        case "ping":
          this.write(pongFrame(m.data));
          break;
        case "pong":
          break;
        case "close":
          // The browser ends: answer its close, then end the socket.
          this.write(closeFrame(m.code ?? 1000, ""));
          this.closed = true;
          clearInterval(this.pinger);
          this.s.end();
          this.h.end(m.code, m.reason);
          return;
      }
    }
  }

  sendText(value: unknown): boolean {
    return this.write(textFrame(JSON.stringify(value)));
  }

  /** False when the frame had to be queued: the caller pauses its source until onDrained. */
  sendBinary(b: Uint8Array): boolean {
    return this.write(binaryFrame(b));
  }

  private write(frame: Uint8Array): boolean {
    if (this.closed) return true;
    if (this.out.length === 0) {
      const n = Math.max(0, this.s.write(frame));
      if (n >= frame.length) return true;
      frame = frame.subarray(n);
    }
    this.out.push(frame);
    return false;
  }

  private flush() {
    while (this.out.length > 0) {
      const chunk = this.out[0]!;
      const n = Math.max(0, this.s.write(chunk));
      if (n < chunk.length) {
        this.out[0] = chunk.subarray(n);
        return;
      }
      this.out.shift();
    }
    if (!this.closed) this.onDrained?.();
  }

  /**
   * Pings the browser every `ms` while nothing waits to be sent: an idle desktop sends nothing,
   * and a NAT or proxy on the way would drop a connection silent for minutes.
   */
  keepAlive(ms: number) {
    clearInterval(this.pinger);
    this.pinger = setInterval(() => {
      if (!this.closed && this.out.length === 0) this.write(pingFrame());
    }, ms);
  }

  /** Stops reading the browser (its input waits in the kernel, bounded by TCP). */
  pauseInput() {
    if (this.inputPaused) return;
    this.inputPaused = true;
    (this.s as any).pause?.();
  }

  resumeInput() {
    if (!this.inputPaused) return;
    this.inputPaused = false;
    (this.s as any).resume?.();
  }

  /** Sends a close frame after what is queued and ends the socket. */
  close(code: number, reason: string) {
    if (this.closed) return;
    this.write(closeFrame(code, reason));
    this.closed = true;
    clearInterval(this.pinger);
    const rest = this.out.length ? Buffer.concat(this.out) : undefined;
    this.out = [];
    rest ? this.s.end(rest) : this.s.end();
    this.h.end();
  }

  private finish() {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.pinger);
    this.out = [];
    this.h.end();
  }
}
