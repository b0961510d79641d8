// The splice between two real sockets: client C ⇄ [front socket | splice | back socket] ⇄ S.
// Every wait has a deadline well inside the test's timeout, so a broken splice fails an
// expectation ("no … within N s", "timed out waiting for …") instead of timing the test out.
import { afterEach, expect, test } from "bun:test";
import { createHash, randomBytes } from "node:crypto";
import type { Socket, TCPSocketListener } from "bun";
import { ioHandlers, splice, type IoData, type SpliceResult } from "../src/nx/splice.ts";
import { until, within } from "./support/wait.ts";

/** How long any one step may take (the tests' timeout is 20 s). */
const STEP_MS = 10_000;
const TEST_MS = 20_000;

const listeners: TCPSocketListener<any>[] = [];
afterEach(() => {
  for (const l of listeners.splice(0)) l.stop(true);
});

interface Peer {
  received: Uint8Array[];
  opened: Promise<void>;
  ended: Promise<void>;
  closed: Promise<void>;
  socket: () => Socket<any>;
  size: () => number;
  hash: () => string;
}

function peerHandlers(onOpen?: (s: Socket<any>) => void) {
  const received: Uint8Array[] = [];
  let sock: Socket<any> | undefined;
  let openR!: () => void, endR!: () => void, closeR!: () => void;
  const opened = new Promise<void>((r) => (openR = r));
  const ended = new Promise<void>((r) => (endR = r));
  const closed = new Promise<void>((r) => (closeR = r));
  const peer: Peer = {
    received,
    opened,
    ended,
    closed,
    socket: () => sock!,
    size: () => received.reduce((n, c) => n + c.length, 0),
    hash: () => createHash("sha256").update(Buffer.concat(received)).digest("hex"),
  };
  const handlers = {
    open(s: Socket<any>) {
      sock = s;
      onOpen?.(s);
      openR();
    },
    data(_s: Socket<any>, d: Uint8Array) {
      received.push(new Uint8Array(d));
    },
    end() {
      endR();
    },
    close() {
      endR();
      closeR();
    },
    drain(s: Socket<any>) {
      (s.data as any)?.drain?.();
    },
  };
  return { peer, handlers };
}

/** C ⇄ splice ⇄ S; returns both peers and the splice's result. */
async function setup() {
  const back = peerHandlers();
  const server = Bun.listen({ hostname: "127.0.0.1", port: 0, allowHalfOpen: true, socket: back.handlers } as any);
  listeners.push(server as any);
  let spliced!: Promise<SpliceResult>;
  let ready!: () => void;
  const isReady = new Promise<void>((r) => (ready = r));
  const front = Bun.listen<IoData>({
    hostname: "127.0.0.1",
    port: 0,
    allowHalfOpen: true,
    socket: {
      ...ioHandlers,
      open(s: Socket<IoData>) {
        s.data = {};
        void Bun.connect<IoData>({
          hostname: "127.0.0.1",
          port: server.port,
          data: {},
          allowHalfOpen: true,
          socket: ioHandlers,
        } as any).then((b) => {
          spliced = splice(s, b);
          ready();
        });
      },
    },
  } as any);
  listeners.push(front as any);
  const client = peerHandlers();
  await Bun.connect({ hostname: "127.0.0.1", port: front.port, allowHalfOpen: true, socket: client.handlers } as any);
  // Spliced, and both ends' sockets open (the server's may open after the splice's connect resolves).
  await within(Promise.all([isReady, client.peer.opened, back.peer.opened]), STEP_MS, "spliced connection");
  return { c: client.peer, s: back.peer, result: () => within(spliced, STEP_MS, "end of the splice") };
}

/** Writes all of `data`, waiting for drains. */
async function writeAll(s: Socket<any>, data: Uint8Array) {
  let off = 0;
  let wake: (() => void) | undefined;
  s.data = { drain: () => wake?.() };
  while (off < data.length) {
    const n = s.write(data.subarray(off, Math.min(data.length, off + (1 << 20))));
    off += Math.max(0, n);
    if (off < data.length)
      await new Promise<void>((r) => {
        wake = r;
        setTimeout(r, 50);
      });
  }
}

test(
  "bulk data both ways arrives intact, in order",
  async () => {
    const { c, s, result } = await setup();
    const up = randomBytes(8 << 20);
    const down = randomBytes(5 << 20);
    await Promise.all([writeAll(c.socket(), up), writeAll(s.socket(), down)]);
    await until(() => s.size() >= up.length && c.size() >= down.length, "all the bytes at both ends", STEP_MS, 20);
    expect(s.hash()).toBe(createHash("sha256").update(up).digest("hex"));
    expect(c.hash()).toBe(createHash("sha256").update(down).digest("hex"));
    c.socket().end();
    s.socket().end();
    const r = await result();
    expect(r).toEqual({ aToB: up.length, bToA: down.length });
  },
  TEST_MS,
);

test(
  "a slow reader: the splice buffers no more than a chunk and loses nothing",
  async () => {
    const { c, s } = await setup();
    (s.socket() as any).pause();
    const up = randomBytes(16 << 20);
    const writing = writeAll(c.socket(), up);
    // A check that nothing arrives: for 300 ms the paused reader gets no byte; the writer is held
    // back by backpressure, not buffered in memory.
    await Bun.sleep(300);
    expect(s.size()).toBe(0);
    (s.socket() as any).resume();
    await within(writing, STEP_MS, "end of the writes after the reader resumed");
    await until(() => s.size() >= up.length, "all the bytes at the slow reader", STEP_MS, 20);
    expect(s.hash()).toBe(createHash("sha256").update(up).digest("hex"));
    c.socket().end();
  },
  TEST_MS,
);

test(
  "half-close: the client's FIN reaches the server, which still answers",
  async () => {
    const { c, s, result } = await setup();
    c.socket().write("request");
    c.socket().shutdown();
    await within(s.ended, STEP_MS, "FIN at the server");
    expect(Buffer.concat(s.received).toString()).toBe("request");
    s.socket().write("answer after FIN");
    await until(() => Buffer.concat(c.received).length >= 16, "the answer at the half-closed client", STEP_MS, 10);
    expect(Buffer.concat(c.received).toString()).toBe("answer after FIN");
    s.socket().end();
    await within(c.closed, STEP_MS, "close at the client");
    const r = await result();
    expect(r).toEqual({ aToB: 7, bToA: 16 });
  },
  TEST_MS,
);

test(
  "one side closing closes the other",
  async () => {
    const { c, s, result } = await setup();
    s.socket().terminate();
    await within(c.ended, STEP_MS, "end at the client after the server's side went away");
    expect(await result()).toEqual({ aToB: 0, bToA: 0 });
  },
  TEST_MS,
);
