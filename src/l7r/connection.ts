// One client connection of the L7R, as HTTP/1.1: requests read one at a time with backpressure,
// a deadline for each stage, answers queued (bounded) while the client does not read, and the
// hand-over of the socket after a 101. What a request means is the handler's (src/l7r/routes.ts).
import { HttpParseError, RequestReader, textResponse, writeHead, type HttpRequest } from "../nx/http.ts";
import type { IoSocket } from "../nx/splice.ts";
import { logger } from "../log.ts";
import type { L7rContext } from "./context.ts";
import type { ConnIo } from "./listeners.ts";
import { Status } from "./status.ts";
import type { WebChannel } from "./web-channel.ts";

const log = logger("l7r");

export type Handler = (req: HttpRequest) => Promise<void>;

export class Connection {
  private readonly reader: RequestReader;
  private busy = false;
  private ended = false;
  private upgradedTo = false;
  private handshaken = false;
  private served = 0;
  private paused = false;
  /** The one deadline of the stage the connection is in (handshake, request, idle, sending). */
  private timer?: ReturnType<typeof setTimeout>;
  private timerStage = "";
  /** Answers the client has not taken yet (written as it drains). */
  private out: Uint8Array[] = [];
  private outBytes = 0;
  private readonly closers = new Set<() => void>();
  private handler: Handler = async () => {};
  /** After a WebSocket upgrade: the channel that owns the socket (the close is a close frame). */
  web?: WebChannel;

  /** `address`: the client's, from the socket or from a trusted relay's PROXY header. */
  constructor(
    private readonly ctx: L7rContext,
    readonly s: IoSocket,
    readonly address: string,
  ) {
    this.reader = new RequestReader(ctx.o.limits);
  }

  get closed() {
    return this.ended;
  }

  get upgraded() {
    return this.upgradedTo;
  }

  start(handler: Handler, handshakeMs = this.ctx.t.handshake * 1000) {
    this.handler = handler;
    const { t, bounds } = this.ctx;
    (this.s as any).setNoDelay?.(true);
    const io: ConnIo = {
      data: (c) => {
        const wasPaused = this.paused;
        this.reader.push(c);
        // Backpressure, not buffering: while a request is handled (or its answer is not yet
        // taken), what was read is kept and the socket is not read any further. More input
        // than the bound after that is a client the pause did not stop: it is closed.
        if (this.busy || this.outBytes > 0) {
          if (wasPaused && this.reader.buffered > bounds.inputBytes) return this.fail(431, "too much input at once");
          return this.pause();
        }
        void this.pump();
      },
      drain: () => this.flush(),
      end: () => this.close(),
      close: () => this.close(),
      timeout: () => this.close(),
      handshake: (ok) => {
        if (this.ended) return;
        if (!ok && this.ctx.o.tls.clientCa) return this.close();
        this.handshaken = true;
        this.arm("first request", t.firstRequest, true);
        void this.pump();
      },
    };
    this.s.data.io = io;
    this.arm("handshake", Math.max(1, handshakeMs) / 1000, false);
  }

  /** Runs `fn` once when the connection ends (at once if it has); the function returned cancels that. */
  onClose(fn: () => void): () => void {
    if (this.ended) {
      fn();
      return () => {};
    }
    this.closers.add(fn);
    return () => this.closers.delete(fn);
  }

  /** (Re)starts the stage's deadline; when it passes the client gets a 408 (when `answer`) and the connection ends. */
  private arm(stage: string, seconds: number, answer: boolean) {
    if (this.timerStage === stage && this.timer) return;
    clearTimeout(this.timer);
    this.timerStage = stage;
    this.timer = setTimeout(() => {
      if (answer) this.fail(408, `request not complete in time (${stage})`);
      else this.close();
    }, seconds * 1000);
  }

  private disarm() {
    clearTimeout(this.timer);
    this.timer = undefined;
    this.timerStage = "";
  }

  private pause() {
    if (this.paused) return;
    this.paused = true;
    (this.s as any).pause?.();
  }

  private resume() {
    if (!this.paused) return;
    this.paused = false;
    (this.s as any).resume?.();
  }

  /** Answers with `status` and ends the connection. */
  private fail(status: number, message: string) {
    this.send(textResponse(status, `${message}\r\n`, [["Connection", "close"]]));
    this.close();
  }

  send(bytes: Uint8Array) {
    if (this.ended) return;
    if (this.outBytes === 0) {
      const n = Math.max(0, this.s.write(bytes));
      if (n >= bytes.length) return;
      bytes = bytes.subarray(n);
    }
    // The client is not reading: keep the rest (bounded) and do no more work for it until it drains.
    this.out.push(bytes);
    this.outBytes += bytes.length;
    if (this.outBytes > this.ctx.bounds.outputBytes) {
      this.out = [];
      this.outBytes = 0;
      return this.close();
    }
    if (!this.busy) this.arm("sending", this.ctx.t.request, false);
  }

  private flush() {
    while (this.out.length > 0 && !this.ended) {
      const chunk = this.out[0]!;
      const n = Math.max(0, this.s.write(chunk));
      this.outBytes -= n;
      if (n < chunk.length) {
        this.out[0] = chunk.subarray(n);
        return;
      }
      this.out.shift();
    }
    if (!this.busy && !this.ended) void this.pump();
  }

  /** A step of a long request: a 102 with X-QVD-VM-Info to a QVD client, a progress frame to a browser. */
  progress(info: string) {
    if (this.web) this.web.sendText({ type: "progress", text: info });
    else this.send(writeHead(102, [["X-QVD-VM-Info", info]]));
  }

  /**
   * Answers 101 and leaves HTTP: no more requests are read, and no deadline runs. Returns the
   * bytes read past the request and the answers not yet sent, for whoever takes the socket.
   */
  upgrade(headers: [string, string][]): { toB: Uint8Array; toA?: Uint8Array } {
    this.send(writeHead(101, headers));
    this.upgradedTo = true;
    this.disarm();
    this.resume();
    const toA = this.outBytes > 0 ? Buffer.concat(this.out) : undefined;
    this.out = [];
    this.outBytes = 0;
    return { toB: this.reader.rest(), toA };
  }

  /** Ends the connection; a browser's WebSocket is told `code` and `reason` in its close frame. */
  close(code = 1000, reason = "") {
    if (this.ended) return;
    // What could not be written yet goes with the end (bounded by l7r.limit.output_bytes).
    const rest = this.outBytes > 0 ? Buffer.concat(this.out) : undefined;
    this.out = [];
    this.outBytes = 0;
    this.ended = true;
    this.disarm();
    this.ctx.admission.leave(this.address);
    if (this.web) this.web.close(code, reason);
    else {
      if (this.s.data) this.s.data.io = undefined;
      rest && !this.upgradedTo ? this.s.end(rest) : this.s.end();
    }
    for (const fn of this.closers) fn();
    this.closers.clear();
  }

  private async pump() {
    const { t } = this.ctx;
    while (!this.busy && !this.ended && !this.upgradedTo && this.handshaken) {
      // Answers the client has not taken yet: no more work for it until it drains (in time).
      if (this.outBytes > 0) {
        this.arm("sending", t.request, false);
        return this.pause();
      }
      let req: HttpRequest | undefined;
      try {
        req = this.reader.next();
      } catch (err) {
        if (!(err instanceof HttpParseError)) throw err;
        return this.fail(err.status, err.message);
      }
      if (!req) {
        // A request has begun: it must be complete within the request timeout; before one,
        // the first request or the idle timeout runs.
        if (this.reader.buffered > 0) this.arm("request", t.request, true);
        else if (this.served === 0) this.arm("first request", t.firstRequest, true);
        else this.arm("idle", t.idle, false);
        this.resume();
        return;
      }
      this.disarm();
      this.served++;
      const done = this.ctx.admission.beginRequest(this.address);
      if (!done) {
        this.send(
          textResponse(429, "Too many requests in progress from your address; retry later\r\n", [["Retry-After", "5"]]),
        );
        continue;
      }
      this.busy = true;
      try {
        await this.handler(req);
      } catch (err) {
        if (err instanceof Status) {
          // The browser page asks without the browser's own password dialog.
          const web = req.headers.get("x-qvd-web") === "1";
          this.send(
            textResponse(
              err.status,
              err.message ? err.message : undefined,
              web ? err.headers.filter(([k]) => k !== "WWW-Authenticate") : err.headers,
            ),
          );
        } else {
          log.error("request failed", { path: req.path, error: String((err as Error)?.stack ?? err) });
          this.send(textResponse(500, "Internal error; try again later\r\n")); // the details are in the log, not for strangers
        }
      } finally {
        this.busy = false;
        done();
      }
      // The client said it sends nothing more: end once its answer is out (RFC 9112 §9.6).
      if (
        !this.upgradedTo &&
        req.headers
          .get("connection")
          ?.toLowerCase()
          .split(/\s*,\s*/)
          .includes("close")
      )
        return this.close();
    }
  }
}
