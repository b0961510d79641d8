// The L7R: the users' TLS entry point (docs/PROTOCOL.md). One connection serves
// any number of requests in order; connect_to_vm ends HTTP with a 101 and splices the client's
// TLS stream with nxagent's TCP socket. Session bookkeeping lives in vm_runtimes (src/db/l7r.ts);
// an abort for one of this node's sessions arrives on the node's channel and closes it here.
import { randomBytes, randomUUID } from "node:crypto";
import { chmodSync, rmSync } from "node:fs";
import type { TCPSocketListener } from "bun";
import { beginLogin, DEFAULT_POLICY, type ThrottlePolicy } from "../auth/throttle.ts";
import { currentIdentityRules } from "../auth/identity.ts";
import type { AuthenticatedUser } from "../auth/user-auth.ts";
import { Config } from "../config.ts";
import { audit } from "../db/audit.ts";
import { HomeInUseError, NoNodeAvailableError, startVm, stopVm, VmBlockedError } from "../db/commands.ts";
import { incrementHostCounter } from "../db/hosts.ts";
import * as L from "../db/l7r.ts";
import { listen, type Listener } from "../db/listen.ts";
import { aliveWithinS, startQueuePlace, withdrawStaleStart } from "../db/placement.ts";
import { tenantScope } from "../db/objects.ts";
import type { Sql } from "../db/pool.ts";
import { createUserToken, useUserToken } from "../db/tokens.ts";
import { VmaError } from "../hkd/vma-client.ts";
import { logger } from "../log.ts";
import { HttpParseError, jsonResponse, RequestReader, textResponse, writeHead, type HttpRequest, type ReaderLimits } from "../nx/http.ts";
import { newNxCookie, spliceNx } from "../nx/handshake.ts";
import { ioHandlers, type Io, type IoData, type IoSocket } from "../nx/splice.ts";
import { desktopLink, LinkError, type DesktopLink } from "./link.ts";
import { authenticateUser, loginRules, resolveLogin, splitLogin, type Authenticate, type ResolvedLogin } from "../auth/chain.ts";
import { verifyUserPassword } from "../db/users.ts";
import { leaveDrainingNode } from "../db/cluster.ts";
import type { PeerClient } from "./peer.ts";
import { inNetworks, looksLikeProxyHeader, parseProxyHeader, ProxyHeaderError, MAX_HEADER, type trustedSources } from "./proxy-protocol.ts";
import { CLIENT_PARAM, xStartBody, XStartParamError } from "./x-start.ts";
import { desktopPage } from "../web/desktop-assets.ts";
import { Registry } from "../metrics.ts";
import { WebChannel } from "./web-channel.ts";
import { MAX_HEIGHT, MAX_WIDTH, MIN_SIZE, WebDisplay } from "./web-display.ts";
import { originAllowed, upgradeAnswer } from "./websocket.ts";

const log = logger("l7r");

export interface L7rTimeouts {
  /** Seconds a client has to send a complete request once it started one. */
  request: number;
  /** Seconds an idle connection (between requests) is kept. */
  idle: number;
  /** Seconds for the TLS handshake (and a PROXY header before it) from the connection's accept. */
  handshake: number;
  /** Seconds from the handshake to the first complete request. */
  firstRequest: number;
  vmStart: number;
  vmStop: number;
  takeover: number;
  /** Seconds for nxagent to listen after x_start (unbounded while provisioning). */
  xStart: number;
  /** x_start attempts. */
  xStartAttempts: number;
  /** Seconds the client has, after the 101, to send its NX greeting. */
  nxHandshake: number;
  /** Seconds of each VMA call. */
  vma: number;
}

export const DEFAULT_TIMEOUTS: L7rTimeouts = { request: 30, idle: 300, handshake: 10, firstRequest: 30, vmStart: 270, vmStop: 270, takeover: 30, xStart: 10, xStartAttempts: 21, nxHandshake: 30, vma: 4 };

export interface L7rOptions {
  sql: Sql;
  databaseUrl: string;
  /** This node's name (hosts.name). */
  nodename: string;
  hostname: string;
  port: number;
  /** clientCa: clients must present a certificate signed by this CA (PEM file). */
  tls: { cert: string; key: string; clientCa?: string };
  /** A unix socket to listen on as well (TLS too), e.g. for a relay from another network namespace. */
  unix?: string;
  /** The login check (default: the tenant's plugin chain, src/auth/chain.ts). */
  authenticate?: Authenticate;
  timeouts?: Partial<L7rTimeouts>;
  limits?: Partial<ReaderLimits>;
  /** What one client may hold (connections, requests in progress, unread input, unsent output). */
  bounds?: Partial<L7rBounds>;
  /** PROXY protocol v2 from these sources (l7r.proxy_protocol.trusted); none when undefined. */
  proxyProtocol?: ReturnType<typeof trustedSources>;
  /** Seconds of heartbeat freshness a node needs to be given a VM (cluster.alive_within). */
  aliveWithinS?: number;
  /** The node's configuration, which the database's global and tenant rows are layered over (auth, identity). */
  identityConfig?: Config;
  /** Failed-login throttling (src/auth/throttle.ts: auth.throttle.*). */
  throttle?: Partial<ThrottlePolicy>;
  /** The farm's node-to-node TLS, to reach desktops on other nodes (src/l7r/peer.ts); without it only this node's. */
  peer?: PeerClient;
  /** Where the L7R's metrics go (the role serves it on l7r.metrics.listen). */
  metrics?: Registry;
  /** The desktop in a web browser (l7r.web.*; src/web/desktop/README.md); off when undefined. */
  web?: WebOptions;
}

export interface WebOptions {
  /** Browser sessions' private directories go below it (<path.run>/web). */
  runDir: string;
  uidBase: number;
  maxSessions: number;
  xvnc: string;
  nxproxy: string;
}

export interface L7r {
  port: number;
  /** Client connections held now, in all and by address (with their requests in progress). */
  load(): { connections: number; byAddress: Record<string, { connections: number; requests: number }> };
  stop(): Promise<void>;
}

/** Bounds on what clients may hold (l7r.limit.*). */
export interface L7rBounds {
  connections: number;
  connectionsPerAddress: number;
  requestsPerAddress: number;
  /** Unhandled input bytes per connection. */
  inputBytes: number;
  /** Unsent output bytes per connection. */
  outputBytes: number;
}

export const DEFAULT_BOUNDS: L7rBounds = { connections: 4096, connectionsPerAddress: 128, requestsPerAddress: 32, inputBytes: 65536, outputBytes: 262144 };

class Status extends Error {
  constructor(
    readonly status: number,
    message?: string,
    readonly headers: [string, string][] = [],
  ) {
    super(message ?? "");
  }
}

/** What a token keeps of its login's plugin result (see pluginIdentityFrom). */
const pluginIdentity = (u: AuthenticatedUser) => ({ uid: u.uid, gid: u.gid, home: u.home, params: u.params });

function pluginIdentityFrom(p: Record<string, unknown> | null): Partial<AuthenticatedUser> {
  if (!p) return {};
  const id = (v: unknown) => (typeof v === "number" && Number.isInteger(v) && v > 0 ? v : undefined);
  const params = p.params && typeof p.params === "object" ? Object.fromEntries(Object.entries(p.params).filter(([, v]) => typeof v === "string")) as Record<string, string> : undefined;
  return { uid: id(p.uid), gid: id(p.gid), home: typeof p.home === "string" ? p.home : undefined, params };
}

/** Whether a login may use a VM: its own, and only the one its token was made for, if any. */
const mayUse = (user: AuthenticatedUser, ownerId: number, vmId: number) => ownerId === user.userId && (user.vmId === undefined || user.vmId === vmId);

/** A VM id a client may name: an integer the database's integer column can hold (else it is no VM). */
const isId = (n: number) => Number.isInteger(n) && n >= 1 && n <= 0x7fffffff;

const unavailable = (reason: string) => new Status(503, `The requested virtual machine is not available: ${reason}, retry later.`);

export async function startL7r(o: L7rOptions): Promise<L7r> {
  const t = { ...DEFAULT_TIMEOUTS, ...o.timeouts };
  const aliveWithin = o.aliveWithinS ?? aliveWithinS(new Config()); // the key's default
  const authConfig = o.identityConfig ?? new Config();
  const authenticate: Authenticate = o.authenticate ?? ((db, attempt) => authenticateUser(db, authConfig, attempt));
  const throttle: ThrottlePolicy = { ...DEFAULT_POLICY, ...o.throttle };
  const sql = o.sql;
  const host0 = await L.l7rHost(sql, o.nodename);
  if (host0) await L.releaseNodeSessions(sql, host0.id);

  // Waiters for VM changes (qvd_events) and the sessions of this node (for aborts).
  const vmWaiters = new Map<number, Set<() => void>>();
  // The L7R's metrics (docs/METRICS.md), on the role's registry when it serves one.
  const reg = o.metrics ?? new Registry();
  const metric = {
    logins: reg.counter("qvd_l7r_logins_total", "User logins on this L7R, by kind (password, token) and result (ok, failed, throttled)."),
    connects: reg.counter("qvd_l7r_connects_total", "Connects to a desktop, by client (qvd: a QVD client's connect_to_vm; browser) and result (ok, failed)."),
    connectSeconds: reg.histogram("qvd_l7r_connect_seconds", "Seconds from a connect request to the desktop's NX session, by client and path: cold (the desktop had to start), resumed (its X session was suspended), warm (a new X session on a running desktop)."),
    sessions: reg.gauge("qvd_l7r_sessions", "Desktop sessions this L7R holds now, by client."),
    spliceBytes: reg.counter("qvd_l7r_splice_bytes_total", "NX bytes this L7R spliced, by client and direction (up: from the user), counted when a session ends."),
  };
  /** Slots of the browser sessions held (each one's uid is l7r.web.uid_base + slot). */
  const webSlots = new Set<number>();
  const sessions = new Map<string, () => void>();
  const checkAborts = async () => {
    if (!host0) return;
    for (const a of await L.abortedSessions(sql, host0.id)) sessions.get(a.l7r_session)?.();
  };
  const channels = ["qvd_events", ...(host0 ? [`qvd_host_${host0.id}`] : [])];
  const listener: Listener = await listen(o.databaseUrl, channels, {
    onNotify(channel, payload) {
      let p: any;
      try {
        p = JSON.parse(payload);
      } catch {
        return;
      }
      if (channel === "qvd_events" && p.object === "vm") for (const w of vmWaiters.get(p.id) ?? []) w();
      else if (p.user_cmd === "abort") void checkAborts().catch((e) => log.warn("abort check failed", { error: String(e) }));
    },
    onReady() {
      for (const ws of vmWaiters.values()) for (const w of ws) w();
      void checkAborts().catch(() => {});
    },
  });

  /** Resolves on the VM's next change notification, or after `ms`. */
  function vmChanged(vmId: number, ms: number): Promise<void> {
    return new Promise((resolve) => {
      let set = vmWaiters.get(vmId);
      if (!set) vmWaiters.set(vmId, (set = new Set()));
      const done = () => {
        clearTimeout(timer);
        set!.delete(done);
        if (set!.size === 0) vmWaiters.delete(vmId);
        resolve();
      };
      const timer = setTimeout(done, ms);
      set.add(done);
    });
  }

  const bounds = { ...DEFAULT_BOUNDS, ...o.bounds };
  const tlsOptions = {
    cert: Bun.file(o.tls.cert), key: Bun.file(o.tls.key), minVersion: 0x0303 /* TLS 1.2 */,
    ...(o.tls.clientCa ? { ca: Bun.file(o.tls.clientCa), requestCert: true, rejectUnauthorized: true } : {}),
  };
  // Connections by client address (the PROXY header's, when a trusted relay sent one), and the
  // requests of each address being handled: a stranger's share of the L7R is bounded.
  const perAddress = new Map<string, { connections: number; requests: number }>();
  let connections = 0;
  let refusedLogged = 0;
  const refuse = (s: IoSocket, address: string, why: string) => {
    // One line a second at most: a flood must not become a flood of log lines.
    if (Date.now() - refusedLogged > 1000) {
      refusedLogged = Date.now();
      log.warn("connection refused", { address, reason: why });
    }
    s.data = {};
    s.terminate?.();
    s.end();
  };
  /** Counts a client connection in; false (and the socket closed) when a limit is reached. */
  const admit = (s: IoSocket, address: string): boolean => {
    const a = perAddress.get(address) ?? { connections: 0, requests: 0 };
    if (connections >= bounds.connections) return (refuse(s, address, "too many connections"), false);
    if (a.connections >= bounds.connectionsPerAddress) return (refuse(s, address, "too many connections from this address"), false);
    a.connections++;
    connections++;
    perAddress.set(address, a);
    return true;
  };
  const leave = (address: string) => {
    connections--;
    const a = perAddress.get(address);
    if (a && --a.connections <= 0 && a.requests <= 0) perAddress.delete(address);
  };

  // A TLS listener: `open` comes at the accept (there is a handshake handler), so the handshake is timed too.
  const tlsHandlers = {
    ...ioHandlers,
    open(s: IoSocket) {
      s.data = {};
      if (admit(s, s.remoteAddress)) new Connection(s, s.remoteAddress).start();
    },
    handshake(s: IoSocket, ok: boolean) {
      (s.data?.io as ConnIo | undefined)?.handshake?.(ok);
    },
  };
  const served = { tls: tlsOptions, socket: tlsHandlers };
  /**
   * A listener whose trusted sources send a PROXY v2 header before TLS: the header is read in
   * clear, then the socket is upgraded to TLS with the bytes that came after it. A connection
   * from any other source must not begin with a header (refused), and is upgraded as it is.
   */
  const proxied = (trusted: (remote: string) => boolean) => ({
    socket: {
      ...ioHandlers,
      open(raw: IoSocket) {
        raw.data = {};
        const remote = raw.remoteAddress ?? "";
        if (connections >= bounds.connections) return refuse(raw, remote, "too many connections");
        connections++; // the preamble counts against the total; the address is counted once known
        const opened = Date.now();
        const mustHave = trusted(remote);
        let buf = new Uint8Array(0);
        let done = false;
        const timer = setTimeout(() => fail("no PROXY header in time"), t.handshake * 1000);
        const fail = (why: string) => {
          if (done) return;
          done = true;
          clearTimeout(timer);
          connections--;
          refuse(raw, remote, why);
        };
        raw.data.io = {
          data: (c) => {
            if (done) return;
            buf = buf.length ? Buffer.concat([buf, c]) : Buffer.from(c);
            let address = remote;
            let rest = buf;
            if (mustHave) {
              let h;
              try {
                h = parseProxyHeader(buf);
              } catch (err) {
                return fail((err as ProxyHeaderError).message);
              }
              if (!h) return buf.length > MAX_HEADER ? fail("PROXY header too long") : undefined;
              if (h.address) address = h.address;
              rest = buf.subarray(h.length);
            } else if (looksLikeProxyHeader(buf)) {
              if (buf.length < 12) return; // too short to tell yet
              return fail("PROXY header from an untrusted source");
            }
            done = true;
            clearTimeout(timer);
            connections--;
            raw.data.io = undefined; // the raw side's events are the TLS socket's from here on
            if (!admit(raw, address)) return;
            const up = (raw as any).upgradeTLS({ tls: { ...tlsOptions, isServer: true }, data: {}, initialData: rest, socket: { ...ioHandlers, open() {}, handshake: tlsHandlers.handshake } });
            const s = up?.[1] as IoSocket | undefined;
            if (!s) {
              leave(address);
              return raw.end();
            }
            s.data ??= {};
            new Connection(s, address).start(t.handshake * 1000 - (Date.now() - opened));
          },
          drain: () => {},
          end: () => fail("closed before TLS"),
          close: () => fail("closed before TLS"),
        };
      },
    },
  });
  const pp = o.proxyProtocol;
  const server: TCPSocketListener<IoData> = pp?.networks.length
    ? Bun.listen<IoData>({ hostname: o.hostname, port: o.port, ...proxied((a) => inNetworks(a, pp.networks)) } as any)
    : Bun.listen<IoData>({ hostname: o.hostname, port: o.port, ...served } as any);
  // The same on a unix socket, when asked (qvd demo relays 127.0.0.1:8443 to it from another
  // network namespace); a socket file left by an L7R that died is replaced.
  let unixServer: { stop(closeActive?: boolean): void } | undefined;
  if (o.unix) {
    rmSync(o.unix, { force: true });
    unixServer = Bun.listen<IoData>({ unix: o.unix, ...(pp?.unix ? proxied(() => true) : served) } as any);
    // Whoever can connect to it may speak for any address: only its owner (whatever the umask).
    if (pp?.unix) chmodSync(o.unix, 0o600);
  }

  type ConnIo = Io & { handshake?(ok: boolean): void };

  class Connection {
    private readonly reader = new RequestReader(o.limits);
    private busy = false;
    private closed = false;
    private upgraded = false;
    private handshaken = false;
    private served = 0;
    private paused = false;
    /** The one deadline of the stage the connection is in (handshake, request, idle, sending). */
    private timer?: ReturnType<typeof setTimeout>;
    private timerStage = "";
    /** Answers the client has not taken yet (written as it drains). */
    private out: Uint8Array[] = [];
    private outBytes = 0;
    private readonly authCache = new Map<string, AuthenticatedUser>();
    /** The session this connection holds (vm id and uuid), released when it ends. */
    private session?: { vmId: number; id: string };
    private nx?: IoSocket;
    /** For the metrics: when the connect began, what it had to do, which client, whether its session is counted. */
    private t0 = 0;
    private cold = false;
    private resumed = false;
    private client: "qvd" | "browser" = "qvd";
    private counted = false;
    /** A browser session's WebSocket and display (src/web/desktop/README.md). */
    private web?: WebChannel;
    /** The session's display, starting or started, and its slot (freed once it has stopped). */
    private display?: Promise<WebDisplay>;
    private webSlot?: number;

    /** `address`: the client's, from the socket or from a trusted relay's PROXY header. */
    constructor(
      private readonly s: IoSocket,
      private readonly address: string,
    ) {}

    start(handshakeMs = t.handshake * 1000) {
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
          if (this.closed) return;
          if (!ok && o.tls.clientCa) return this.close();
          this.handshaken = true;
          this.arm("first request", t.firstRequest, true);
          void this.pump();
        },
      };
      this.s.data.io = io;
      this.arm("handshake", Math.max(1, handshakeMs) / 1000, false);
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

    private send(bytes: Uint8Array) {
      if (this.closed) return;
      if (this.outBytes === 0) {
        const n = Math.max(0, this.s.write(bytes));
        if (n >= bytes.length) return;
        bytes = bytes.subarray(n);
      }
      // The client is not reading: keep the rest (bounded) and do no more work for it until it drains.
      this.out.push(bytes);
      this.outBytes += bytes.length;
      if (this.outBytes > bounds.outputBytes) {
        this.out = [];
        this.outBytes = 0;
        return this.close();
      }
      if (!this.busy) this.arm("sending", t.request, false);
    }

    private flush() {
      while (this.out.length > 0 && !this.closed) {
        const chunk = this.out[0]!;
        const n = Math.max(0, this.s.write(chunk));
        this.outBytes -= n;
        if (n < chunk.length) {
          this.out[0] = chunk.subarray(n);
          return;
        }
        this.out.shift();
      }
      if (!this.busy && !this.closed) void this.pump();
    }

    /** For the splice after a 101: the bytes read past the request and the answers not yet sent. */
    private handOver(): { toB: Uint8Array; toA?: Uint8Array } {
      this.disarm();
      this.resume();
      const toA = this.outBytes > 0 ? Buffer.concat(this.out) : undefined;
      this.out = [];
      this.outBytes = 0;
      return { toB: this.reader.rest(), toA };
    }

    private countSession() {
      if (this.counted || this.closed) return;
      this.counted = true;
      metric.sessions.inc({ client: this.client });
    }

    private countBytes(up: number, down: number) {
      metric.spliceBytes.inc({ client: this.client, direction: "up" }, up);
      metric.spliceBytes.inc({ client: this.client, direction: "down" }, down);
    }

    /** Ends the connection; a browser's WebSocket is told `code` and `reason` in its close frame. */
    close(code = 1000, reason = "") {
      if (this.closed) return;
      // What could not be written yet goes with the end (bounded by l7r.limit.output_bytes).
      const rest = this.outBytes > 0 ? Buffer.concat(this.out) : undefined;
      this.out = [];
      this.outBytes = 0;
      this.closed = true;
      this.disarm();
      leave(this.address);
      if (this.web) this.web.close(code, reason);
      else {
        if (this.s.data) this.s.data.io = undefined;
        rest && !this.upgraded ? this.s.end(rest) : this.s.end();
      }
      this.nx?.end();
      if (this.counted) metric.sessions.dec({ client: this.client });
      const slot = this.webSlot;
      // The slot (its uid) is free again only when nothing of the display runs as it any more.
      if (slot !== undefined) void this.display!.then((d) => d.stop(), () => {}).finally(() => webSlots.delete(slot));
      void this.release();
    }

    private async release() {
      const sess = this.session;
      if (!sess) return;
      this.session = undefined;
      sessions.delete(sess.id);
      await L.releaseSession(sql, sess.vmId, sess.id).catch((e) => log.warn("could not release a session", { vm: sess.vmId, error: String(e) }));
    }

    private async pump() {
      while (!this.busy && !this.closed && !this.upgraded && this.handshaken) {
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
        const a = perAddress.get(this.address);
        if (a && a.requests >= bounds.requestsPerAddress) {
          this.send(textResponse(429, "Too many requests in progress from your address; retry later\r\n", [["Retry-After", "5"]]));
          continue;
        }
        this.busy = true;
        if (a) a.requests++;
        try {
          await this.handle(req);
        } catch (err) {
          if (err instanceof Status) {
            const web = req.headers.get("x-qvd-web") === "1";
            this.send(textResponse(err.status, err.message ? err.message : undefined, web ? err.headers.filter(([k]) => k !== "WWW-Authenticate") : err.headers));
          }
          else {
            log.error("request failed", { path: req.path, error: String((err as Error)?.stack ?? err) });
            this.send(textResponse(500, "Internal error; try again later\r\n")); // the details are in the log, not for strangers
          }
        } finally {
          this.busy = false;
          if (a) a.requests--;
          if (a && a.connections <= 0 && a.requests <= 0) perAddress.delete(this.address);
        }
        // The client said it sends nothing more: end once its answer is out (RFC 9112 §9.6).
        if (!this.upgraded && req.headers.get("connection")?.toLowerCase().split(/\s*,\s*/).includes("close")) return this.close();
      }
    }

    private async handle(req: HttpRequest) {
      if (req.method !== "GET") throw new Status(404);
      // The browser page (no database work: it is static).
      if (o.web && (req.path === "/" || (req.path.startsWith("/qvd/web/") && req.path !== "/qvd/web/connect"))) {
        const page = desktopPage(req.path, req.headers);
        if (!page) throw new Status(404);
        return this.send(page);
      }
      const host = await L.l7rHost(sql, o.nodename);
      if (!host) throw new Status(503, "Host is not registered in the database");
      await incrementHostCounter(sql, host.id, "http_requests").catch(() => {});
      switch (req.path) {
        case "/qvd/ping":
          if (host.blocked) throw new Status(503, "Server is blocked");
          if (host.state !== "running") throw new Status(503, `Server is ${host.state}`);
          return this.send(textResponse(200, "I am alive!\r\n"));
        case "/qvd/list_of_vm":
        case "/qvd/list_of_applications": {
          const user = await this.auth(req, host.id);
          if (host.blocked) throw new Status(503, "Server is blocked");
          if (host.state !== "running") throw new Status(503, `Server is ${host.state}`);
          // No OSF is an application OSF (yet): applications are an empty list.
          const all = req.path === "/qvd/list_of_vm" ? await L.userVms(sql, user.userId) : [];
          const list = all.filter((v) => mayUse(user, user.userId, v.id));
          return this.send(jsonResponse(200, list.map((v) => ({ id: v.id, name: v.name, state: v.state, blocked: v.blocked ? 1 : 0, is_application: 0 }))));
        }
        case "/qvd/authenticate_user":
          await this.auth(req, host.id);
          return this.send(jsonResponse(200, {}));
        case "/qvd/create_auth_token": {
          // A token cannot make tokens (a stolen one would renew itself forever); refused before
          // the token is looked at, so a single-use one is not spent on it.
          if (/^\s*bearer\s/i.test(req.headers.get("authorization") ?? "")) throw new Status(403, "A token cannot create another token; log in with your password");
          const user = await this.auth(req, host.id);
          // ?vm_id= makes a token for that VM only; a VM-bound login can only pass its VM on.
          const vmRaw = req.query.find(([k]) => k === "vm_id")?.[1];
          const vmId = vmRaw === undefined ? user.vmId : Number(vmRaw);
          if (vmId !== undefined) {
            if (!isId(vmId)) throw new Status(422, "parameter vm_id is not a VM id");
            const vm = await L.sessionVm(sql, vmId);
            if (!vm) throw new Status(404, "The requested virtual machine does not exist");
            if (!mayUse(user, vm.user_id, vmId)) throw new Status(403, "You are not allowed to access requested virtual machine");
          }
          const tok = await createUserToken(sql, tenantScope(user.tenantId), { userId: user.userId, vmId, ttlSeconds: 86400, multiUse: true, authParams: pluginIdentity(user) });
          return this.send(jsonResponse(200, { auth_token: Buffer.from(tok.token).toString("base64") + "\n" }));
        }
        case "/qvd/stop_vm":
          return this.stopVm(req, host);
        case "/qvd/connect_to_vm":
          return this.connect(req, host);
        case "/qvd/web/connect":
          if (!o.web) throw new Status(404);
          return this.webConnect(req, host, o.web);
        default:
          throw new Status(404);
      }
    }

    // --- authentication ----------------------------------------------------------------------

    /** The user of a request's Authorization header (or of the header's value itself). */
    private async auth(req: HttpRequest | string, hostId: number): Promise<AuthenticatedUser> {
      const h = typeof req === "string" ? req : (req.headers.get("authorization") ?? "");
      const cached = this.authCache.get(h);
      if (cached) return cached;
      const unauthorized = new Status(401, undefined, [["WWW-Authenticate", 'Basic realm="QVD"']]);
      const m = /^(Basic|Bearer)\s+(\S+)$/i.exec(h);
      if (!m) throw unauthorized;
      await incrementHostCounter(sql, hostId, "auth_attempts").catch(() => {});
      const decoded = Buffer.from(m[2]!, "base64").toString("utf8");
      let user: AuthenticatedUser | undefined;
      if (m[1]!.toLowerCase() === "bearer") {
        const tok = await useUserToken(sql, decoded.trim());
        const u = tok && (await L.userForL7r(sql, tok.user_id));
        if (!u || u.blocked || u.tenant_blocked) {
          metric.logins.inc({ kind: "token", result: "failed" });
          throw unauthorized;
        }
        metric.logins.inc({ kind: "token", result: "ok" });
        // The identity the plugin gave at the login that made the token (LDAP uid/gid/home…).
        user = { ...pluginIdentityFrom(tok.auth_params), userId: u.id, tenantId: u.tenant_id, login: u.name, ...(tok.vm_id !== null ? { vmId: tok.vm_id } : {}) };
      } else {
        const colon = decoded.indexOf(":");
        if (colon <= 0) throw unauthorized;
        // Names are lower case; the login is split by the farm's rules (src/auth/chain.ts:
        // l7r.auth.plugin.default.separators and .tenant), as everywhere.
        const full = decoded.slice(0, colon).trim().toLowerCase();
        const password = decoded.slice(colon + 1);
        const rules = await loginRules(sql, authConfig);
        const [login, tenantPart] = splitLogin(full, rules.separators);
        const account = `${tenantPart || rules.defaultTenant}/${login}`; // throttled and audited by this name
        // The try takes its slot before the password is checked (src/auth/throttle.ts).
        const gate = await beginLogin(sql, throttle, { service: "l7r", account, address: this.address });
        if (!gate.ok) metric.logins.inc({ kind: "password", result: "throttled" });
        if (!gate.ok) throw new Status(429, `Too many failed logins; try again in ${gate.retryAfterS} seconds\r\n`, [["Retry-After", String(gate.retryAfterS)]]);
        const failed = async (reason: string, tenantId?: number) => {
          metric.logins.inc({ kind: "password", result: "failed" });
          await gate.done(false);
          await audit(sql, { action: "user.login", source: "l7r", ok: false, error: reason, object_type: "user", object_name: account, tenant_id: tenantId, address: this.address });
          return unauthorized;
        };
        let r: Awaited<ReturnType<Authenticate>>;
        let tenant: ResolvedLogin;
        try {
          tenant = await resolveLogin(sql, full, rules);
          if (!tenant.ok && tenant.reason === "empty login") throw await failed("empty login");
          if (!tenant.ok || tenant.tenantBlocked) {
            // A password check all the same, so that an unknown tenant answers as slowly.
            await verifyUserPassword(sql, -1, login, password);
            throw await failed(tenant.ok ? "tenant blocked" : "unknown tenant");
          }
          r = await authenticate(sql, { tenantId: tenant.tenantId, tenantName: tenant.tenantName, login: tenant.login, password, address: this.address });
        } catch (e) {
          await gate.done(null); // an error (e.g. the directory is down) checked nothing; no-op after failed()
          throw e;
        }
        if (r.ok !== true) throw await failed(r.ok === false ? r.reason : "no plugin knows this user", tenant.tenantId);
        const u = await L.userForL7r(sql, r.user.userId);
        if (!u) throw await failed("no such user", tenant.tenantId);
        if (u.blocked) throw await failed("user blocked", tenant.tenantId);
        await gate.done(true);
        metric.logins.inc({ kind: "password", result: "ok" });
        user = r.user;
        await audit(sql, { action: "user.login", source: "l7r", ok: true, object_type: "user", object_id: u.id, object_name: account, tenant_id: tenant.tenantId, address: this.address });
      }
      await incrementHostCounter(sql, hostId, "auth_ok").catch(() => {});
      this.authCache.set(h, user);
      return user;
    }

    // --- stop_vm -----------------------------------------------------------------------------

    /** A step of a long request: a 102 with X-QVD-VM-Info to a QVD client, a progress frame to a browser. */
    private progress(info: string) {
      if (this.web) this.web.sendText({ type: "progress", text: info });
      else this.send(writeHead(102, [["X-QVD-VM-Info", info]]));
    }

    private async stopVm(req: HttpRequest, host: L.L7rHost) {
      const user = await this.auth(req, host.id);
      if (host.blocked) throw new Status(503, "Server is blocked");
      const id = Number(req.query.find(([k]) => k === "id")?.[1] ?? NaN);
      if (!Number.isInteger(id)) throw new Status(422, "parameter id is missing");
      let vm = isId(id) ? await L.sessionVm(sql, id) : undefined;
      if (!vm) throw new Status(404, "The requested virtual machine does not exist");
      if (!mayUse(user, vm.user_id, id)) throw new Status(403, "You are not allowed to access requested virtual machine");
      if (vm.vm_state === "stopped") return this.send(textResponse(200, "Machine stopped\r\n"));
      this.progress("Stopping virtual machine");
      if (["starting", "running", "debugging"].includes(vm.vm_state)) await stopVm(sql, tenantScope(user.tenantId), id, "l7r").catch(() => {});
      else if (vm.vm_state !== "stopping") throw new Status(503, `The requested virtual machine is in an unstoppable state (${vm.vm_state})`);
      const deadline = Date.now() + t.vmStop * 1000;
      for (;;) {
        vm = await L.sessionVm(sql, id);
        if (!vm || vm.vm_state === "stopped") return this.send(textResponse(200, "Machine stopped\r\n"));
        if (Date.now() >= deadline || this.closed) throw new Status(408, "VM didn't reach state 'stopped'. Timeout");
        this.progress("Waiting for VM to reach state 'stopped'");
        await vmChanged(id, Math.min(2000, deadline - Date.now()));
      }
    }

    // --- connect_to_vm -----------------------------------------------------------------------

    private async connect(req: HttpRequest, host: L.L7rHost) {
      this.t0 = performance.now();
      const user = await this.auth(req, host.id);
      if (host.blocked) throw new Status(503, "Server is blocked");
      if (req.headers.get("connection")?.toLowerCase() !== "upgrade" || req.headers.get("upgrade")?.toLowerCase() !== "qvd/1.0") throw new Status(426);
      const idRaw = req.query.find(([k]) => k === "id")?.[1];
      if (idRaw === undefined) throw new Status(422, "parameter id is missing");
      const bad = req.query.filter(([k]) => k !== "id" && !CLIENT_PARAM.test(k)).map(([k]) => k);
      if (bad.length) throw new Status(403, `Invalid parameters ${bad.join(" ")}`);
      const id = Number(idRaw);
      const vm0 = isId(id) ? await L.sessionVm(sql, id) : undefined;
      if (!vm0) throw new Status(404, "The requested virtual machine does not exist");
      if (vm0.blocked) throw new Status(403, "The requested virtual machine is offline for maintenance");
      const params = new Map(req.query.filter(([k]) => k !== "id"));
      const { nx, slaveKey, cookie } = await this.connectFlow(user, vm0, params, host);
      this.progress("Connection established");
      this.send(writeHead(101, [["X-QVD-Slave-Key", slaveKey]]));
      this.upgraded = true;
      this.s.timeout(0);
      this.nx = nx;
      this.countSession();
      const started = Date.now();
      const onRefused = (reason: string) => log.warn("NX handshake refused", { vm: id, user: user.login, reason });
      void spliceNx(this.s, nx, { cookie, initial: this.handOver(), timeoutMs: t.nxHandshake * 1000, onRefused }).then(async (r) => {
        log.info("session ended", { vm: id, user: user.login, up: r.aToB, down: r.bToA });
        this.countBytes(r.aToB, r.bToA);
        if (Date.now() - started < 120_000) await incrementHostCounter(sql, host.id, "short_sessions").catch(() => {});
        this.close(); // counts the connection out and releases the session
      });
    }

    /**
     * The connect flow of a QVD client and of a browser: takeover, placement and start, x_start,
     * the NX connection to nxagent. `ready` runs before the session is marked connected (a
     * browser's display must be up). Every failure is a 503 with the reason (as the original),
     * and releases the session.
     */
    private async connectFlow(user: AuthenticatedUser, vm: L.SessionVm, params: Map<string, string>, host: L.L7rHost, ready?: () => Promise<void>) {
      const id = vm.vm_id;
      let nx: IoSocket | undefined;
      try {
        if (!mayUse(user, vm.user_id, id)) throw unavailable("You are not allowed to access requested virtual machine");
        await this.takeover(id, host);
        this.progress(`Session acquired for VM_ID: ${id}`);
        const running = await this.startAndWait(id, user);
        const slaveKey = randomBytes(48).toString("base64").replace(/[+/=]/g, "").slice(0, 64).padEnd(64, "A");
        // nxagent takes only a proxy that presents this cookie; the splice adds it to the client's greeting.
        const cookie = newNxCookie();
        // Directly on this node, or through the desktop's node over the farm's TLS (src/l7r/link.ts).
        const link = await desktopLink(sql, { vm: running, hereId: host.id, session: this.session!.id, peer: o.peer }).catch((err) => {
          throw err instanceof LinkError ? unavailable(`Unable to reach VM ${id}: ${err.message}`) : err;
        });
        await this.startX(running, link, user, params, slaveKey, cookie, host);
        this.progress(`Connecting X session for VM_ID: ${id}`);
        await incrementHostCounter(sql, host.id, "nx_attempts").catch(() => {});
        nx = await this.connectNx(running, link);
        await incrementHostCounter(sql, host.id, "nx_ok").catch(() => {});
        await ready?.();
        if (this.closed || !(await L.markConnected(sql, id, this.session!.id))) throw unavailable(`Aborted by contending session VM VM_ID: ${id}`);
        metric.connects.inc({ client: this.client, result: "ok" });
        metric.connectSeconds.observe({ client: this.client, path: this.cold ? "cold" : this.resumed ? "resumed" : "warm" }, (performance.now() - this.t0) / 1000);
        return { nx, slaveKey, cookie };
      } catch (err) {
        metric.connects.inc({ client: this.client, result: "failed" });
        nx?.end();
        // The failed attempt must not hold the session.
        await this.release();
        if (err instanceof Status) throw err;
        throw unavailable((err as Error)?.message ?? String(err));
      }
    }

    // --- a browser session (src/web/desktop/README.md) ----------------------------------------

    /**
     * Upgrades to a WebSocket, reads the page's one message (token, desktop, screen size), runs
     * the connect flow while the session's display starts, then relays RFB between the browser
     * and the display. After the 101 every failure is told in frames, never as HTTP.
     */
    private async webConnect(req: HttpRequest, host: L.L7rHost, web: WebOptions) {
      if (!originAllowed(req)) throw new Status(403, "A page of another origin may not open desktops here\r\n");
      const up = upgradeAnswer(req);
      if (!up.ok) throw new Status(up.status, `${up.message}\r\n`, up.headers);
      this.send(writeHead(101, up.headers));
      this.upgraded = true;
      const { toB, toA } = this.handOver();
      let state: "hello" | "connecting" | "relay" = "hello";
      let hello!: (text: string) => void;
      const said = new Promise<string>((r) => (hello = r));
      let toRfb: Uint8Array[] = [];
      let rfb: IoSocket | undefined;
      const ch = (this.web = new WebChannel(this.s, {
        text: (text) => {
          if (state !== "hello" || text.length > 4096) return this.close(1008, "unexpected message");
          state = "connecting";
          hello(text);
        },
        binary: (b) => {
          if (state !== "relay" || !rfb) return this.close(1008, "unexpected message");
          if (toRfb.length) return void toRfb.push(b);
          const n = Math.max(0, rfb.write(b));
          if (n < b.length) {
            toRfb.push(b.subarray(n));
            ch.pauseInput(); // Xvnc is not reading: neither do we
          }
        },
        // A socket that ends before its hello also ends the wait for it (nothing is kept waiting).
        end: () => (this.close(), hello("")),
      }));
      ch.start(toB, toA);
      const fail = (status: number, message: string) => {
        ch.sendText({ type: "error", status, message });
        this.close(4000 + status, message.slice(0, 100));
      };
      try {
        const timer = setTimeout(() => (this.close(1008, "no request in time"), hello("")), t.request * 1000);
        const text = await said.finally(() => clearTimeout(timer));
        if (this.closed) return;
        this.client = "browser";
        this.t0 = performance.now();
        let m: { token?: unknown; id?: unknown; width?: unknown; height?: unknown };
        try {
          m = JSON.parse(text);
        } catch {
          return this.close(1008, "the request is not JSON");
        }
        const { token, id, width, height } = m ?? {};
        if (typeof token !== "string" || !/^[A-Za-z0-9+/=]{1,1024}$/.test(token)) return fail(401, "Your login has expired; log in again");
        if (typeof id !== "number" || !isId(id)) return fail(404, "The requested virtual machine does not exist");
        const sized = (v: unknown, max: number) => (typeof v === "number" && Number.isInteger(v) && v >= MIN_SIZE && v <= max ? v : undefined);
        const w = sized(width, MAX_WIDTH), h = sized(height, MAX_HEIGHT);
        if (!w || !h) return this.close(1008, `the screen size must be ${MIN_SIZE}x${MIN_SIZE} to ${MAX_WIDTH}x${MAX_HEIGHT}`);
        let user: AuthenticatedUser;
        try {
          user = await this.auth(`Bearer ${token}`, host.id);
        } catch (err) {
          if (err instanceof Status && err.status === 401) return fail(401, "Your login has expired; log in again");
          throw err;
        }
        if (host.blocked) return fail(503, "Server is blocked");
        const vm0 = await L.sessionVm(sql, id);
        if (!vm0 || !mayUse(user, vm0.user_id, id)) return fail(404, "The requested virtual machine does not exist");
        if (vm0.blocked) return fail(403, "The requested virtual machine is offline for maintenance");
        let slot = 0;
        while (webSlots.has(slot)) slot++;
        if (slot >= web.maxSessions) return fail(503, "This node holds as many browser sessions as it may; try again later");
        if (this.closed) return;
        webSlots.add(slot);
        // The display starts while the desktop does (close() stops it, started or not).
        const display = WebDisplay.start({ runDir: web.runDir, uid: web.uidBase + slot, width: w, height: h, xvnc: web.xvnc, nxproxy: web.nxproxy });
        display.catch(() => {}); // told in the connect flow
        this.webSlot = slot;
        this.display = display;
        // What a QVD client would ask for, with no keyboard (nxagent then takes Xvnc's own map),
        // and neither sound nor printing: a browser has no sound server or CUPS for the desktop
        // to reach (the desktop's services would wait for them at each connect).
        const params = new Map([["qvd.client.link", "lan"], ["qvd.client.geometry", `${w}x${h}`], ["qvd.client.os", "linux"],
          ["qvd.client.audio.enabled", "0"], ["qvd.client.printing.enabled", "0"]]);
        const { nx, cookie } = await this.connectFlow(user, vm0, params, host, async () => {
          await display.catch((err) => {
            log.error("browser session display failed", { vm: id, error: (err as Error).message });
            throw new Status(503, "This node cannot show desktops in a browser now; try again later");
          });
        });
        const d = await display;
        this.nx = nx;
        const started = Date.now();
        const onRefused = (reason: string) => log.warn("NX handshake refused", { vm: id, user: user.login, reason, nxproxy: d.nxReason() });
        void spliceNx(d.nxSocket, nx, { cookie, timeoutMs: t.nxHandshake * 1000, onRefused }).then(async (r) => {
          log.info("browser session ended", { vm: id, user: user.login, up: r.aToB, down: r.bToA });
          this.countBytes(r.aToB, r.bToA);
          if (Date.now() - started < 120_000) await incrementHostCounter(sql, host.id, "short_sessions").catch(() => {});
          this.close(4002, "the desktop session ended");
        });
        (d.nxSocket as any).resume();
        rfb = await d.connectRfb();
        const r = rfb;
        r.data.io = {
          data: (c) => {
            if (!ch.sendBinary(c)) (r as any).pause(); // the browser is not reading: neither do we
          },
          drain: () => {
            while (toRfb.length) {
              const b = toRfb[0]!;
              const n = Math.max(0, r.write(b));
              if (n < b.length) return void (toRfb[0] = b.subarray(n));
              toRfb.shift();
            }
            ch.resumeInput();
          },
          end: () => this.close(1011, "the display server ended"),
          close: () => this.close(1011, "the display server ended"),
        };
        ch.onDrained = () => (r as any).resume();
        if (this.closed) return;
        state = "relay";
        ch.keepAlive(30_000);
        this.progress("Connection established");
        ch.sendText({ type: "ready", width: w, height: h });
        this.countSession();
        log.info("browser session started", { vm: id, user: user.login, display: d.display, size: `${w}x${h}` });
      } catch (err) {
        if (this.closed) return;
        if (err instanceof Status) return fail(err.status, err.message.trim() || "Refused");
        log.error("browser session failed", { error: String((err as Error)?.stack ?? err) });
        fail(500, "Internal error; try again later");
      }
    }

    /** Takes the VM's session, asking a holder (on any node) to abort, for up to the takeover timeout. */
    private async takeover(vmId: number, host: L.L7rHost) {
      const id = randomUUID();
      const deadline = Date.now() + t.takeover * 1000;
      for (;;) {
        if (this.closed) throw unavailable("the client went away");
        if (await L.claimSession(sql, vmId, { hostId: host.id, session: id, pid: process.pid, userIp: /^\d+\.\d+\.\d+\.\d+$/.test(this.address) ? this.address : undefined })) {
          this.session = { vmId, id };
          sessions.set(id, () => {
            // Told to abort: a connecting session fails by itself; a connected one is closed.
            if (this.nx) this.close(4001, "taken over by another client");
            else this.abortRequested = true;
          });
          return;
        }
        if (Date.now() >= deadline) throw unavailable("Unable to acquire VM, close other clients");
        this.progress(`Aborting contending session for VM_ID: ${vmId}`);
        await L.abortOtherSession(sql, vmId, id);
        await vmChanged(vmId, Math.min(2000, deadline - Date.now()));
      }
    }

    private abortRequested = false;

    private async checkAbort(vmId: number) {
      if (this.abortRequested || this.closed || !this.session || !(await L.sessionStillMine(sql, vmId, this.session.id)))
        throw unavailable(`Aborted by contending session VM VM_ID: ${vmId}`);
    }

    private async startAndWait(vmId: number, user: AuthenticatedUser): Promise<L.SessionVm> {
      // A desktop on a draining node moves at its user's connect: stopped there, started elsewhere.
      for (const end = Date.now() + t.vmStop * 1000; Date.now() < end && (await leaveDrainingNode(sql, vmId, this.session!.id)); await vmChanged(vmId, 2000)) this.progress("Moving the desktop off a draining node");
      let vm = (await L.sessionVm(sql, vmId))!;
      // Placed on a node that died before taking it: place it again rather than wait for lost_after.
      if (vm.vm_state === "stopped" && vm.vm_cmd === "start" && (await withdrawStaleStart(sql, vmId, aliveWithin))) vm = (await L.sessionVm(sql, vmId))!;
      if (vm.vm_state === "stopped" && !vm.vm_cmd) {
        if (!vm.host_id) this.progress(`Assigning VM ${vmId} to host`);
        try {
          await startVm(sql, tenantScope(user.tenantId), vmId, { aliveWithinS: aliveWithin, by: "l7r" });
        } catch (err) {
          if (err instanceof HomeInUseError) throw unavailable(err.message);
          if (err instanceof NoNodeAvailableError) throw unavailable("Unable to assign vm to host, there is no host available");
          if (err instanceof VmBlockedError) throw new Status(403, "The requested virtual machine is offline for maintenance");
          throw unavailable(`Unable to start VM ${vmId}, state changed unexpectedly`);
        }
        this.progress("Starting virtual machine");
        this.cold = true;
      }
      await this.checkAbort(vmId);
      const deadline = Date.now() + t.vmStart * 1000;
      for (;;) {
        vm = (await L.sessionVm(sql, vmId))!;
        if (vm.vm_state === "running" && vm.vm_address && vm.vma_port && vm.vma_secret) return vm;
        if (vm.blocked) throw unavailable(`Failed to start virtual machine ${vmId}`);
        // Stopped with no command pending: the node gave up on the start.
        if (vm.vm_state === "stopped" && !vm.vm_cmd) throw unavailable(`Failed to start virtual machine ${vmId}`);
        if (["stopping", "zombie"].includes(vm.vm_state)) throw unavailable(`Unable to start VM ${vmId}, state changed unexpectedly`);
        if (Date.now() >= deadline) throw unavailable("VM didn't reach state 'running'. Timeout");
        await this.checkAbort(vmId);
        // Still queued while its node starts others: at hkd.max_starting; say where it stands.
        const queued = vm.vm_state === "stopped" && vm.vm_cmd === "start" ? await startQueuePlace(sql, vmId) : undefined;
        this.progress(queued?.starting ? `Waiting for a free start slot on node ${queued.host_name} (${queued.ahead} ahead)` : "Waiting for VM to reach state 'running'");
        await vmChanged(vmId, Math.min(2000, deadline - Date.now()));
      }
    }

    private async startX(vm: L.SessionVm, link: DesktopLink, user: AuthenticatedUser, params: Map<string, string>, slaveKey: string, cookie: string, host: L.L7rHost) {
      let body;
      try {
        const identity = await currentIdentityRules(sql, o.identityConfig);
        body = { ...xStartBody({ client: params, layers: await L.sessionProperties(sql, vm.vm_id), user, hostAddress: host.address, slaveKey, identity }), cookie };
      } catch (err) {
        if (err instanceof XStartParamError) throw unavailable(`The desktop is misconfigured (${err.message}), ask an administrator`);
        throw err;
      }
      this.progress(`Starting X session at VM ${vm.vm_id}`);
      let lastErr = "";
      for (let attempt = 0; ; attempt++) {
        await this.checkAbort(vm.vm_id);
        try {
          this.resumed = (await link.vma<{ resumed?: boolean }>("x_start", body, t.vma * 1000))?.resumed === true;
          break;
        } catch (err) {
          lastErr = (err as Error).message;
          // A 409 while connected: the VMA suspends the old session; a retry resumes it.
          const retry = err instanceof VmaError && (err.status === undefined || err.status === 409);
          if (!retry || attempt + 1 >= t.xStartAttempts) throw unavailable(`Unable to start X session on VM ${vm.vm_id}: ${lastErr}`);
          await Bun.sleep(1000);
        }
      }
      this.progress(`Waiting for X session to come up on VM ${vm.vm_id}`);
      let deadline = Date.now() + t.xStart * 1000;
      // nxagent is usually listening within a few hundred ms: ask often at first, then less.
      let pause = 20;
      for (;;) {
        let state = "";
        try {
          state = (await link.vma<{ state: string }>("x_state", undefined, t.vma * 1000)).state;
        } catch {
          /* no answer: keep waiting */
        }
        if (state === "listening") return;
        if (state === "provisioning") deadline = Date.now() + t.xStart * 1000;
        else if (state && state !== "starting") throw unavailable(`Unable to start X session on VM ${vm.vm_id}, state went to ${state}`);
        if (Date.now() >= deadline) throw unavailable(`Unable to start X session on VM ${vm.vm_id}, operation timed out!`);
        await this.checkAbort(vm.vm_id);
        await Bun.sleep(pause);
        pause = Math.min(250, Math.round(pause * 1.5));
      }
    }

    private connectNx(vm: L.SessionVm, link: DesktopLink): Promise<IoSocket> {
      return link.nx(t.vma * 1000).catch((err: Error) => {
        throw unavailable(`Unable to connect to X server on VM VM_ID: ${vm.vm_id}: ${err.message}`);
      });
    }
  }

  log.info("L7R listening", { address: `${o.hostname}:${server.port}`, node: o.nodename, ...(o.unix ? { unix: o.unix } : {}) });
  return {
    port: server.port,
    load: () => ({ connections, byAddress: Object.fromEntries([...perAddress].map(([k, v]) => [k, { ...v }])) }),
    async stop() {
      server.stop(true);
      if (unixServer) {
        unixServer.stop(true);
        rmSync(o.unix!, { force: true });
      }
      await listener.close();
    },
  };
}
