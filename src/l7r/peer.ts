// The node-to-node endpoint: how an L7R reaches a desktop that runs on another node. VM
// networks stay node-local; the desktop's node relays, over mutually authenticated TLS (farm
// certificates, src/farm/certs.ts), exactly what the L7R's connect path needs:
//
//   POST /vma/x_start?vm=N&session=S   (JSON body)   → the VMA's status and body
//   GET  /vma/x_state?vm=N&session=S                  → the VMA's status and body
//   GET  /nx?vm=N&session=S  (Upgrade: qvd-nx)        → 101, then the bytes of nxagent's port
//
// The caller never sends or learns the VMA secret: this node reads the desktop's address,
// ports and secret from the database itself, and only for a VM that runs here whose session
// `S` is held by the calling node (its certificate's CN names a host, src/db/peer.ts). No other
// method, port or address can be asked for. Requests are HTTP/1.1 (src/nx/http.ts's reader,
// with small limits), one at a time per connection, kept alive: the caller pools connections
// per node, so the x_state polls of a connect cost one round trip each, not a handshake.
import type { Socket } from "bun";
import type { Sql } from "../db/pool.ts";
import { peerDesktop, peerNodeByName, type PeerNode } from "../db/peer.ts";
import { vmaCall, VmaError } from "../hkd/vma-client.ts";
import { logger } from "../log.ts";
import { HttpParseError, RequestReader, textResponse, writeHead, writeResponse, type HttpRequest } from "../nx/http.ts";
import { ioHandlers, splice, type Io, type IoData, type IoSocket } from "../nx/splice.ts";

const log = logger("peer");

/** The VMA methods another node's L7R may have relayed, with their HTTP method. */
export const PEER_VMA_METHODS: Record<string, "GET" | "POST"> = { x_start: "POST", x_state: "GET" };

const UPGRADE = "qvd-nx";
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
/** Small limits: a peer's requests are short and of known shape. */
const READER_LIMITS = { maxRequestLine: 1024, maxHeaderBytes: 4096, maxHeaders: 16 };
/** Largest request body (an x_start's parameters). */
const MAX_BODY = 256 * 1024;
/**
 * Connections from one address that have not yet shown a node's certificate: a stranger on the
 * farm network cannot take every slot (cluster.peer.limit.connections) from the nodes.
 */
export const UNPROVEN_PER_ADDRESS = 32;
/** Largest answer a caller reads (a VMA's answers are small). */
const MAX_ANSWER = 1024 * 1024;

export interface PeerTls {
  ca: string;
  cert: string;
  key: string;
}

const tlsOf = (t: PeerTls) => ({
  ca: Bun.file(t.ca),
  cert: Bun.file(t.cert),
  key: Bun.file(t.key),
  minVersion: 0x0303 /* TLS 1.2 */,
});

// --- the endpoint --------------------------------------------------------------------------------

export interface PeerServerOptions {
  sql: Sql;
  /** This node's name (hosts.name). */
  nodename: string;
  hostname: string;
  port: number;
  tls: PeerTls;
  /** Seconds: the TLS handshake, a request once begun, an idle connection, each VMA call. */
  timeouts?: Partial<{ handshake: number; request: number; idle: number; vma: number; connect: number }>;
  /** Connections held at once (cluster.peer.limit.connections). */
  maxConnections?: number;
}

export interface PeerServer {
  port: number;
  /** Connections held now. */
  connections(): number;
  stop(): void;
}

type PeerData = IoData & { hs?: (ok: boolean) => void };

class Answer extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

export function startPeerServer(o: PeerServerOptions): PeerServer {
  const t = { handshake: 10, request: 30, idle: 300, vma: 4, connect: 5, ...o.timeouts };
  const maxConnections = o.maxConnections ?? 1024;
  const sql = o.sql;
  let connections = 0;
  /** Connections not yet proven a node's, by address. */
  const unproven = new Map<string, number>();
  const proven = (address: string) => {
    const n = (unproven.get(address) ?? 1) - 1;
    if (n > 0) unproven.set(address, n);
    else unproven.delete(address);
  };
  let refusedLogged = 0;
  const warn = (msg: string, fields: Record<string, unknown>) => {
    // One line a second at most: a flood must not become a flood of log lines.
    if (Date.now() - refusedLogged < 1000) return;
    refusedLogged = Date.now();
    log.warn(msg, fields);
  };
  let me: PeerNode | undefined;
  const self = async () => (me ??= await peerNodeByName(sql, o.nodename));

  class Conn {
    private readonly reader = new RequestReader(READER_LIMITS);
    private caller?: PeerNode;
    private readonly address: string;
    private busy = false;
    private closed = false;
    private upgraded = false;
    private timer?: ReturnType<typeof setTimeout>;

    constructor(private readonly s: Socket<PeerData>) {
      this.address = s.remoteAddress;
    }

    start() {
      const io: Io = {
        data: (c) => {
          this.reader.push(c);
          // Backpressure: nothing more is read while a request is handled; a peer that sends
          // more than a request's worth at once is closed.
          if (this.reader.buffered > MAX_BODY + READER_LIMITS.maxHeaderBytes + READER_LIMITS.maxRequestLine)
            return this.close("too much input");
          if (this.busy || !this.caller) return void (this.s as any).pause?.();
          void this.pump();
        },
        drain: () => this.flush(),
        end: () => this.close(),
        close: () => this.close(),
      };
      this.s.data.io = io;
      this.s.data.hs = (ok) => void this.authenticate(ok);
      this.arm(t.handshake, "handshake");
    }

    private arm(seconds: number, stage: string) {
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.close(`${stage} not complete in time`), seconds * 1000);
    }

    private async authenticate(ok: boolean) {
      if (this.closed) return;
      // rejectUnauthorized already refused anything the farm CA did not sign; the CN says which node it is.
      const subject = ok ? (this.s as any).getPeerCertificate?.()?.subject : undefined;
      const cn = typeof subject?.CN === "string" ? (subject.CN as string) : undefined;
      if (!cn) return this.close("no farm certificate");
      let node: PeerNode | undefined;
      try {
        node = await peerNodeByName(sql, cn);
      } catch (err) {
        return this.close(`cannot check the peer: ${(err as Error).message}`);
      }
      if (!node) return this.close(`certificate of ${JSON.stringify(cn)}, which is no node of the farm`);
      if (node.state === "lost") return this.close(`node ${cn} is declared lost; it must rejoin first`);
      this.caller = node;
      proven(this.address);
      this.arm(t.idle, "idle");
      (this.s as any).resume?.();
      void this.pump();
    }

    close(why?: string) {
      if (this.closed) return;
      this.closed = true;
      clearTimeout(this.timer);
      connections--;
      if (!this.caller) proven(this.address);
      if (why) warn("peer connection closed", { peer: this.caller?.name ?? this.s.remoteAddress, reason: why });
      if (this.s.data) this.s.data.io = undefined;
      if (!this.upgraded) this.s.end();
    }

    /** Answer bytes the socket did not take yet (written on drain). */
    private out: Uint8Array = new Uint8Array(0);

    private send(bytes: Uint8Array) {
      if (this.closed) return;
      this.out = this.out.length ? Buffer.concat([this.out, bytes]) : bytes;
      this.flush();
    }

    private flush() {
      if (this.out.length && !this.closed) this.out = this.out.subarray(Math.max(0, this.s.write(this.out)));
    }

    /** A request whose body has not all arrived yet. */
    private pending?: { req: HttpRequest; length: number };

    private async pump() {
      while (!this.busy && !this.closed && !this.upgraded && this.caller) {
        let req = this.pending?.req;
        let length = this.pending?.length ?? 0;
        if (!req) {
          try {
            req = this.reader.next();
          } catch (err) {
            if (!(err instanceof HttpParseError)) throw err;
            this.send(textResponse(err.status, `${err.message}\r\n`, [["Connection", "close"]]));
            return this.close(err.message);
          }
          if (!req) {
            this.arm(this.reader.buffered > 0 ? t.request : t.idle, this.reader.buffered > 0 ? "request" : "idle");
            (this.s as any).resume?.();
            return;
          }
          // A body follows the head (bounded).
          length = Number(req.headers.get("content-length") ?? "0");
          if (!Number.isSafeInteger(length) || length < 0 || length > MAX_BODY) {
            this.send(textResponse(413, "request body too large\r\n", [["Connection", "close"]]));
            return this.close("request body too large");
          }
        }
        if (this.reader.buffered < length) {
          if (!this.pending) this.arm(t.request, "request");
          this.pending = { req, length };
          (this.s as any).resume?.();
          return;
        }
        this.pending = undefined;
        const rest = this.reader.rest();
        this.reader.push(rest.subarray(length));
        const body = rest.subarray(0, length);
        clearTimeout(this.timer);
        this.busy = true;
        (this.s as any).pause?.();
        try {
          await this.handle(req, body);
        } catch (err) {
          if (err instanceof Answer) this.send(textResponse(err.status, `${err.message}\r\n`));
          else {
            log.error("peer request failed", { path: req.path, error: String((err as Error)?.message ?? err) });
            this.send(textResponse(500, "internal error\r\n"));
          }
        } finally {
          this.busy = false;
        }
      }
    }

    private async handle(req: HttpRequest, body: Uint8Array) {
      const q = new Map(req.query);
      const vmId = Number(q.get("vm"));
      const session = q.get("session") ?? "";
      if (!Number.isInteger(vmId) || vmId < 1 || vmId > 0x7fffffff || !UUID.test(session))
        throw new Answer(400, "vm and session are required");
      let method: string | undefined;
      if (req.path.startsWith("/vma/")) {
        method = req.path.slice(5);
        const verb = Object.hasOwn(PEER_VMA_METHODS, method) ? PEER_VMA_METHODS[method] : undefined;
        if (!verb) throw new Answer(403, `the VMA method ${JSON.stringify(method.slice(0, 40))} is not relayed`);
        if (req.method !== verb) throw new Answer(405, `${method} is ${verb}`);
      } else if (req.path !== "/nx") throw new Answer(404, "no such endpoint");
      const here = await self();
      if (!here) throw new Answer(503, "this node is not registered");
      const desk = await peerDesktop(sql, { vmId, hostId: here.id, callerId: this.caller!.id, session });
      if (!desk) throw new Answer(404, `VM ${vmId} does not run on ${o.nodename} in a session of ${this.caller!.name}`);
      if (method) return this.vma(method, desk, body);
      if (req.headers.get("upgrade")?.toLowerCase() !== UPGRADE)
        throw new Answer(426, `Upgrade: ${UPGRADE} is required`);
      return this.nx(desk.vm_address, desk.x_port ?? 4100, vmId);
    }

    private async vma(
      method: string,
      desk: { vm_address: string; vma_port: number; vma_secret: string },
      body: Uint8Array,
    ) {
      let parsed: unknown;
      if (PEER_VMA_METHODS[method] === "POST") {
        try {
          parsed = JSON.parse(Buffer.from(body).toString("utf8"));
        } catch {
          throw new Answer(400, "the body is not JSON");
        }
      }
      try {
        const r = await vmaCall(
          { address: desk.vm_address, port: desk.vma_port, secret: desk.vma_secret },
          method,
          parsed,
          t.vma * 1000,
        );
        this.send(writeResponse(200, "application/json", JSON.stringify(r)));
      } catch (err) {
        if (!(err instanceof VmaError)) throw err;
        // The VMA's own refusal is passed on; no answer at all is a 502 (the caller retries).
        this.send(
          textResponse(err.status ?? 502, `${err.message.slice(0, 400)}\r\n`, [
            ["X-QVD-Peer", err.status ? "vma" : "unreachable"],
          ]),
        );
      }
    }

    private async nx(address: string, port: number, vmId: number) {
      let agent: IoSocket;
      try {
        agent = (await Promise.race([
          Bun.connect<IoData>({ hostname: address, port, data: {}, socket: ioHandlers } as any),
          Bun.sleep(t.connect * 1000).then(() => Promise.reject(new Error("timed out"))),
        ])) as IoSocket;
      } catch (err) {
        throw new Answer(502, `cannot reach nxagent of VM ${vmId}: ${(err as Error).message}`);
      }
      if (this.closed) return void agent.end();
      (agent as any).setNoDelay?.(true);
      this.upgraded = true;
      clearTimeout(this.timer);
      this.send(
        writeHead(101, [
          ["Connection", "Upgrade"],
          ["Upgrade", UPGRADE],
        ]),
      );
      (this.s as any).resume?.();
      const peer = this.caller!.name;
      void splice(this.s as unknown as IoSocket, agent, { toB: this.reader.rest() }).then((r) => {
        connections--;
        log.debug("relayed NX stream ended", { vm: vmId, peer, up: r.aToB, down: r.bToA });
      });
    }
  }

  const server = Bun.listen<PeerData>({
    hostname: o.hostname,
    port: o.port,
    tls: { ...tlsOf(o.tls), requestCert: true, rejectUnauthorized: true },
    socket: {
      ...(ioHandlers as any),
      open(s: Socket<PeerData>) {
        s.data = {};
        if (connections >= maxConnections) {
          warn("peer connection refused", { address: s.remoteAddress, reason: "too many connections" });
          s.terminate?.();
          return;
        }
        const mine = unproven.get(s.remoteAddress) ?? 0;
        if (mine >= UNPROVEN_PER_ADDRESS) {
          warn("peer connection refused", {
            address: s.remoteAddress,
            reason: "too many connections without a node's certificate",
          });
          s.terminate?.();
          return;
        }
        unproven.set(s.remoteAddress, mine + 1);
        connections++;
        (s as any).setNoDelay?.(true);
        new Conn(s).start();
      },
      handshake(s: Socket<PeerData>, ok: boolean) {
        s.data?.hs?.(ok);
      },
    },
  } as any);
  log.info("peer endpoint listening", { address: `${o.hostname}:${server.port}`, node: o.nodename });
  return {
    port: server.port,
    connections: () => connections,
    stop: () => server.stop(true),
  };
}

// --- the caller's side ------------------------------------------------------------------------

export interface PeerClientOptions {
  tls: PeerTls;
  /** cluster.peer.port of the farm. */
  port: number;
  /** Idle connections kept per node, and for how long (seconds). */
  idlePerNode?: number;
  idleS?: number;
  /** Seconds for the TCP connect and TLS handshake. */
  connectS?: number;
}

/** Where another node is reached: its name (checked against its certificate) and address. */
export interface PeerAddress {
  name: string;
  address: string;
}

interface Response {
  status: number;
  headers: Map<string, string>;
  body: Uint8Array;
}

/** Reads one HTTP/1.1 answer (status, headers, Content-Length body), bounded. */
class AnswerReader {
  private buf: Uint8Array = new Uint8Array(0);
  push(c: Uint8Array) {
    this.buf = this.buf.length ? Buffer.concat([this.buf, c]) : c;
  }
  rest(): Uint8Array {
    const r = this.buf;
    this.buf = new Uint8Array(0);
    return r;
  }
  next(): Response | undefined {
    const b = Buffer.from(this.buf.buffer, this.buf.byteOffset, this.buf.length);
    const end = b.indexOf("\r\n\r\n");
    if (end < 0) {
      if (b.length > 16384) throw new Error("the peer's answer head is too long");
      return undefined;
    }
    const lines = b.subarray(0, end).toString("latin1").split("\r\n");
    const m = /^HTTP\/1\.1 (\d{3})(?: |$)/.exec(lines[0]!);
    if (!m) throw new Error("the peer's answer is not HTTP/1.1");
    const headers = new Map<string, string>();
    for (const l of lines.slice(1)) {
      const c = l.indexOf(":");
      if (c > 0) headers.set(l.slice(0, c).trim().toLowerCase(), l.slice(c + 1).trim());
    }
    const status = Number(m[1]);
    const length = status === 101 ? 0 : Number(headers.get("content-length") ?? "0");
    if (!Number.isSafeInteger(length) || length < 0 || length > MAX_ANSWER)
      throw new Error("the peer's answer is too large");
    if (b.length < end + 4 + length) return undefined;
    const body = this.buf.subarray(end + 4, end + 4 + length);
    this.buf = this.buf.subarray(end + 4 + length);
    return { status, headers, body };
  }
}

/** One TLS connection to a peer node, used for one request at a time. */
class PeerConn {
  private readonly reader = new AnswerReader();
  private waiting?: { resolve: (r: Response) => void; reject: (e: Error) => void };
  closed = false;
  idleTimer?: ReturnType<typeof setTimeout>;

  constructor(readonly s: Socket<PeerData>) {
    s.data.io = {
      data: (c) => {
        this.reader.push(c);
        this.deliver();
      },
      drain: () => this.flush(),
      end: () => this.fail(new Error("the peer closed the connection")),
      close: (e) => this.fail(e ?? new Error("the peer closed the connection")),
    };
  }

  private deliver() {
    if (!this.waiting) return;
    let r;
    try {
      r = this.reader.next();
    } catch (err) {
      return this.fail(err as Error);
    }
    if (!r) return;
    const w = this.waiting;
    this.waiting = undefined;
    w.resolve(r);
  }

  private fail(e: Error) {
    if (!this.closed) {
      this.closed = true;
      if (this.s.data) this.s.data.io = undefined;
      this.s.end();
    }
    const w = this.waiting;
    this.waiting = undefined;
    w?.reject(e);
  }

  close() {
    this.fail(new Error("closed"));
  }

  /** Request bytes the socket did not take yet (an x_start's body), written on drain. */
  private out: Uint8Array = new Uint8Array(0);

  private flush() {
    if (this.out.length && !this.closed) this.out = this.out.subarray(Math.max(0, this.s.write(this.out)));
  }

  request(bytes: Uint8Array, timeoutMs: number): Promise<Response> {
    return new Promise<Response>((resolve, reject) => {
      const timer = setTimeout(() => this.fail(new Error(`no answer within ${timeoutMs} ms`)), timeoutMs);
      this.waiting = {
        resolve: (r) => (clearTimeout(timer), resolve(r)),
        reject: (e) => (clearTimeout(timer), reject(e)),
      };
      this.out = bytes;
      this.flush();
    });
  }

  /** After a 101: the socket, for a splice, with what was read past the answer. */
  handOver(): { socket: IoSocket; initial: Uint8Array } {
    this.closed = true;
    this.s.data.io = undefined;
    return { socket: this.s as unknown as IoSocket, initial: this.reader.rest() };
  }
}

/** Thrown when a peer refuses a request (its status and message) or cannot be reached. */
export class PeerError extends Error {
  constructor(
    message: string,
    readonly status?: number,
  ) {
    super(message);
    this.name = "PeerError";
  }
}

/** The caller's side: a small pool of kept-alive connections per node. */
export class PeerClient {
  private readonly idle = new Map<string, PeerConn[]>();
  private readonly o: Required<PeerClientOptions>;

  constructor(o: PeerClientOptions) {
    this.o = { idlePerNode: 4, idleS: 30, connectS: 5, ...o };
  }

  private keyOf(p: PeerAddress) {
    return `${p.name}@${p.address}`;
  }

  private async open(p: PeerAddress): Promise<PeerConn> {
    let onHandshake!: (ok: boolean, err?: Error) => void;
    const shaken = new Promise<void>(
      (resolve, reject) =>
        (onHandshake = (ok, err) => (ok ? resolve() : reject(err ?? new Error("TLS handshake failed")))),
    );
    const data: PeerData = { hs: (ok) => onHandshake(ok) };
    const connecting = Bun.connect<PeerData>({
      hostname: p.address.replace(/^\[|\]$/g, ""),
      port: this.o.port,
      data,
      // The peer must prove it is node `name` of this farm (CA and name), and we prove who we are.
      tls: { ...tlsOf(this.o.tls), rejectUnauthorized: true, serverName: p.name },
      socket: {
        ...(ioHandlers as any),
        handshake(_s: Socket<PeerData>, ok: boolean, err: Error | null) {
          onHandshake(ok, err ?? undefined);
        },
        close(s: Socket<PeerData>, err?: Error) {
          onHandshake(false, err ?? new Error("closed during the TLS handshake"));
          (ioHandlers.close as any)(s, err);
        },
      },
    } as any);
    let timer: ReturnType<typeof setTimeout> | undefined;
    const deadline = new Promise<never>(
      (_, reject) =>
        (timer = setTimeout(
          () => reject(new Error(`no TLS connection within ${this.o.connectS} s`)),
          this.o.connectS * 1000,
        )),
    );
    let s: Socket<PeerData> | undefined;
    try {
      s = (await Promise.race([connecting, deadline])) as Socket<PeerData>;
      await Promise.race([shaken, deadline]);
    } catch (err) {
      s?.end();
      void connecting.then(
        (x) => x.end(),
        () => {},
      );
      throw new PeerError(`cannot reach node ${p.name} at ${p.address}:${this.o.port}: ${(err as Error).message}`);
    } finally {
      clearTimeout(timer);
    }
    const cert = (s as any).getPeerCertificate?.();
    if (cert?.subject?.CN !== p.name) {
      s.end();
      throw new PeerError(
        `node ${p.name} at ${p.address} presented the certificate of ${JSON.stringify(cert?.subject?.CN ?? "")}`,
      );
    }
    (s as any).setNoDelay?.(true);
    return new PeerConn(s);
  }

  private take(p: PeerAddress): PeerConn | undefined {
    const list = this.idle.get(this.keyOf(p));
    while (list?.length) {
      const c = list.pop()!;
      clearTimeout(c.idleTimer);
      if (!c.closed) return c;
    }
    return undefined;
  }

  private give(p: PeerAddress, c: PeerConn) {
    const k = this.keyOf(p);
    const list = this.idle.get(k) ?? [];
    if (c.closed || list.length >= this.o.idlePerNode) return c.close();
    c.idleTimer = setTimeout(() => {
      c.close();
      const l = this.idle.get(k);
      if (l) {
        const i = l.indexOf(c);
        if (i >= 0) l.splice(i, 1);
        if (l.length === 0) this.idle.delete(k);
      }
    }, this.o.idleS * 1000);
    list.push(c);
    this.idle.set(k, list);
  }

  /** One request on a pooled connection; a kept connection the peer had closed is retried once on a new one. */
  private async exchange(
    p: PeerAddress,
    bytes: Uint8Array,
    timeoutMs: number,
  ): Promise<{ conn: PeerConn; answer: Response }> {
    const pooled = this.take(p);
    if (pooled) {
      try {
        return { conn: pooled, answer: await pooled.request(bytes, timeoutMs) };
      } catch {
        pooled.close(); // the peer may have closed it while it was idle
      }
    }
    const conn = await this.open(p);
    try {
      return { conn, answer: await conn.request(bytes, timeoutMs) };
    } catch (err) {
      conn.close();
      throw new PeerError(`node ${p.name} did not answer: ${(err as Error).message}`);
    }
  }

  /** A VMA call relayed by node `p` for VM `vmId` of session `session`; answers as vmaCall does. */
  async vma<T>(
    p: PeerAddress,
    vmId: number,
    session: string,
    method: string,
    body: unknown,
    timeoutMs: number,
  ): Promise<T> {
    const verb = PEER_VMA_METHODS[method];
    if (!verb) throw new PeerError(`${method} is not relayed between nodes`);
    const payload = verb === "POST" ? Buffer.from(JSON.stringify(body ?? {})) : undefined;
    const head = `${verb} /vma/${method}?vm=${vmId}&session=${session} HTTP/1.1\r\nHost: ${p.name}\r\n${payload ? `Content-Type: application/json\r\nContent-Length: ${payload.length}\r\n` : ""}\r\n`;
    const bytes = payload ? Buffer.concat([Buffer.from(head, "latin1"), payload]) : Buffer.from(head, "latin1");
    // The peer's own VMA call is bounded by the same timeout; give it time to answer that.
    let r;
    try {
      r = await this.exchange(p, bytes, timeoutMs + 2000);
    } catch (err) {
      throw new VmaError(`VMA of VM ${vmId} through node ${p.name}: ${(err as Error).message}`);
    }
    const text = Buffer.from(r.answer.body).toString("utf8");
    this.give(p, r.conn);
    if (r.answer.status === 200) {
      try {
        return (text ? JSON.parse(text) : {}) as T;
      } catch {
        throw new VmaError(`VMA ${method} answered something that is not JSON`);
      }
    }
    // What the VMA said keeps its status (a 409 is retried as locally); the relay's own refusals
    // and an unreachable VMA say so.
    const fromVma = r.answer.headers.get("x-qvd-peer");
    const why = text.trim().slice(0, 300);
    if (fromVma === "vma") throw new VmaError(why, r.answer.status);
    if (fromVma === "unreachable") throw new VmaError(why);
    throw new VmaError(`node ${p.name} refused ${method} for VM ${vmId}: ${r.answer.status} ${why}`, r.answer.status);
  }

  /** A stream to VM `vmId`'s nxagent, relayed by node `p`: a socket ready to splice. */
  async nx(p: PeerAddress, vmId: number, session: string, timeoutMs: number): Promise<IoSocket> {
    const head = `GET /nx?vm=${vmId}&session=${session} HTTP/1.1\r\nHost: ${p.name}\r\nConnection: Upgrade\r\nUpgrade: ${UPGRADE}\r\n\r\n`;
    const r = await this.exchange(p, Buffer.from(head, "latin1"), timeoutMs);
    if (r.answer.status !== 101) {
      this.give(p, r.conn);
      throw new PeerError(
        `node ${p.name} refused the NX stream: ${r.answer.status} ${Buffer.from(r.answer.body).toString("utf8").trim().slice(0, 300)}`,
        r.answer.status,
      );
    }
    const { socket, initial } = r.conn.handOver();
    // nxagent speaks only after the client's greeting: nothing should have come yet.
    if (initial.length) {
      socket.end();
      throw new PeerError(`node ${p.name} sent bytes before the NX greeting`);
    }
    return socket;
  }

  /** Closes the idle connections. */
  close() {
    for (const list of this.idle.values()) for (const c of list) clearTimeout(c.idleTimer), c.close();
    this.idle.clear();
  }
}
