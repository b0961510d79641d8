// The hot path: bytes between two Bun sockets (the client's TLS stream and nxagent's TCP
// socket). Received buffers are passed on as they are (no copies, no strings); when a write
// takes less than the chunk, the rest is kept and the source paused until the destination
// drains. A FIN on one side is passed on as a FIN (half-close); when either side closes, or
// both directions have ended, both sockets are closed together.
//
// Bun's socket handlers are fixed when a socket is created, so sockets that may be spliced
// use `ioHandlers`, which dispatch to whatever `Io` is currently set in `socket.data.io`.
import type { Socket, SocketHandler } from "bun";

export interface Io {
  open?(): void;
  data(chunk: Uint8Array): void;
  drain(): void;
  /** The peer sent FIN (or TLS close_notify). */
  end(): void;
  close(error?: Error): void;
  timeout?(): void;
}

export interface IoData {
  io?: Io;
}

export type IoSocket = Socket<IoData>;

/** Socket handlers that forward every event to `socket.data.io`. */
export const ioHandlers: SocketHandler<IoData> = {
  open(s) {
    s.data ??= {};
    s.data.io?.open?.();
  },
  data(s, chunk) {
    s.data.io?.data(chunk);
  },
  drain(s) {
    s.data.io?.drain();
  },
  end(s) {
    s.data.io?.end();
  },
  close(s, err) {
    const io = s.data?.io;
    s.data && (s.data.io = undefined);
    io?.close(err ?? undefined);
  },
  error(s, err) {
    const io = s.data?.io;
    s.data && (s.data.io = undefined);
    io?.close(err);
  },
  timeout(s) {
    s.data.io?.timeout?.();
  },
};

type Pausable = { pause?(): unknown; resume?(): unknown };

export interface SpliceResult {
  /** Bytes written from a to b and from b to a. */
  aToB: number;
  bToA: number;
}

/**
 * Splices `a` and `b` until both directions have ended or either side closes; resolves when
 * both are closed. `initial.toB`/`toA` are bytes already read (e.g. after an HTTP 101).
 */
export function splice(
  a: IoSocket,
  b: IoSocket,
  initial: { toB?: Uint8Array; toA?: Uint8Array } = {},
): Promise<SpliceResult> {
  return new Promise((resolve) => {
    let done = false;
    const result: SpliceResult = { aToB: 0, bToA: 0 };

    class Direction {
      pending: Uint8Array[] = [];
      srcEnded = false;
      finSent = false;
      constructor(
        readonly src: IoSocket,
        readonly dst: IoSocket,
        readonly count: (n: number) => void,
      ) {}
      /** Writes what is queued; false when the destination is full. */
      flush(): boolean {
        while (this.pending.length > 0) {
          const chunk = this.pending[0]!;
          const n = Math.max(0, this.dst.write(chunk));
          this.count(n);
          if (n < chunk.length) {
            this.pending[0] = chunk.subarray(n);
            return false;
          }
          this.pending.shift();
        }
        return true;
      }
      onData(chunk: Uint8Array) {
        if (done || chunk.length === 0) return;
        if (this.pending.length > 0) {
          // Data that arrived while pausing: keep order.
          this.pending.push(chunk);
          return;
        }
        const n = Math.max(0, this.dst.write(chunk));
        this.count(n);
        if (n < chunk.length) {
          this.pending.push(chunk.subarray(n));
          (this.src as unknown as Pausable).pause?.();
        }
      }
      onDrain() {
        if (done || this.pending.length === 0) return;
        if (this.flush()) {
          (this.src as unknown as Pausable).resume?.();
          this.maybeFin();
        }
      }
      onEnd() {
        this.srcEnded = true;
        this.maybeFin();
      }
      maybeFin() {
        if (!this.srcEnded || this.pending.length > 0 || this.finSent) return;
        this.finSent = true;
        // Both directions over: close both; otherwise pass the FIN on.
        if (other(this).finSent) finish();
        else this.dst.shutdown();
      }
    }

    const ab = new Direction(a, b, (n) => (result.aToB += n));
    const ba = new Direction(b, a, (n) => (result.bToA += n));
    const other = (d: Direction) => (d === ab ? ba : ab);

    function finish() {
      if (done) return;
      done = true;
      a.data.io = undefined;
      b.data.io = undefined;
      // What could not be written yet is given to end(), which flushes before closing.
      const rest = (d: Direction) => (d.pending.length ? Buffer.concat(d.pending) : undefined);
      const ra = rest(ba);
      const rb = rest(ab);
      ra ? a.end(ra) : a.end();
      rb ? b.end(rb) : b.end();
      resolve(result);
    }

    const io = (mine: Direction, theirs: Direction): Io => ({
      data: (c) => mine.onData(c),
      drain: () => theirs.onDrain(),
      end: () => mine.onEnd(),
      close: () => finish(),
    });
    a.data.io = io(ab, ba);
    b.data.io = io(ba, ab);
    if (initial.toB?.length) ab.onData(initial.toB);
    if (initial.toA?.length) ba.onData(initial.toA);
  });
}
