// The NX session cookie, put into the client's NX handshake by the L7R.
//
// nxagent (nxcomp in "client" mode, listening) takes a connection only when the proxy that
// connects sends `cookie=<its cookie>` among its options (nxcomp, the NX transport library both link).
// The client's `nxproxy -S` (nxcomp in "server" mode) speaks first, one write:
//
//     NXPROXY-3.5.0-3.5.99 stream=default,data=default␠          (no cookie given to nxproxy)
//     NXPROXY-3.5.0-3.5.99 cookie=<hex>,stream=default,data=default␠
//
// two tokens, each ended by a space: its version, then its options (`name=value`, comma
// separated). nxcomp reads each token a byte at a time into a 512-byte buffer (511 characters
// with the space), turns unprintable bytes into spaces without ending the token there, and
// compares the cookie case-insensitively as a prefix of the value sent. nxagent then answers
// with its own options, which never carry the cookie. QVD clients give nxproxy no cookie, so
// the L7R, which knows the session's cookie (it chose it for x_start), rewrites the options
// token: any cookie the client sent is dropped and the session's put first. Everything after
// the two tokens is spliced unchanged (src/nx/splice.ts). The parser is strict (printable
// ASCII only, the version's shape, `name=value` entries) and bounded: nothing it does not
// understand reaches nxagent.
import { randomBytes } from "node:crypto";
import { splice, type IoSocket, type SpliceResult } from "./splice.ts";

/** A session cookie: 128 random bits as 32 lower-case hex digits (nxcomp's own cookie length). */
export const NX_COOKIE = /^[0-9a-f]{32}$/;

export function newNxCookie(): string {
  return randomBytes(16).toString("hex");
}

/** nxcomp's limit per handshake token, the ending space included (its 512-byte buffer less the NUL). */
export const NX_TOKEN_MAX = 511;
const VERSION_MAX = 64;
const VERSION = /^NXPROXY-\d{1,5}(\.\d{1,5}){0,2}(-\d{1,5}(\.\d{1,5}){0,2})?$/;
const OPTION = /^[A-Za-z_]{1,32}=[^=,]{1,255}$/;
const SPACE = 0x20;

export class NxHandshakeError extends Error {}

/**
 * The client's handshake, fed in chunks as they arrive. `push` answers undefined while the two
 * tokens are incomplete, then the rewritten tokens (`head`) and what followed them in the last
 * chunk (`rest`); it throws NxHandshakeError for anything else. At most VERSION_MAX + 1 +
 * NX_TOKEN_MAX bytes are ever held.
 */
export class NxGreeting {
  private held = new Uint8Array(VERSION_MAX + 1 + NX_TOKEN_MAX);
  private n = 0;
  private versionEnd = -1;
  private finished = false;

  constructor(private readonly cookie: string) {
    if (!NX_COOKIE.test(cookie)) throw new Error("bad NX cookie");
  }

  push(chunk: Uint8Array): { head: Uint8Array; rest: Uint8Array } | undefined {
    if (this.finished) throw new Error("the NX handshake is complete");
    for (let i = 0; i < chunk.length; i++) {
      const b = chunk[i]!;
      if (b === SPACE) {
        if (this.versionEnd < 0) {
          this.versionEnd = this.n;
          this.checkVersion();
        } else {
          this.finished = true;
          return { head: this.rewrite(), rest: chunk.subarray(i + 1) };
        }
      } else if (b < 0x21 || b > 0x7e) {
        throw new NxHandshakeError(`unprintable byte 0x${b.toString(16).padStart(2, "0")} in the NX handshake`);
      }
      if (this.versionEnd < 0 ? this.n >= VERSION_MAX : this.n - this.versionEnd - 1 >= NX_TOKEN_MAX - 1)
        throw new NxHandshakeError(this.versionEnd < 0 ? "the NX version is too long" : "the NX options are too long");
      this.held[this.n++] = b;
    }
    // An early check, so that a client that is not an NX proxy is refused at once.
    if (this.versionEnd < 0 && !"NXPROXY-".startsWith(this.text(0, Math.min(this.n, 8))))
      throw new NxHandshakeError("not an NX proxy (its greeting does not begin with NXPROXY-)");
    return undefined;
  }

  private text(from: number, to: number): string {
    return Buffer.from(this.held.buffer, from, to - from).toString("latin1");
  }

  private checkVersion(): void {
    if (!VERSION.test(this.text(0, this.versionEnd))) throw new NxHandshakeError("not an NX proxy version");
  }

  private rewrite(): Uint8Array {
    const version = this.text(0, this.versionEnd);
    const options = this.text(this.versionEnd, this.n).slice(1);
    const entries = options === "" ? [] : options.split(",");
    for (const e of entries) if (!OPTION.test(e)) throw new NxHandshakeError("malformed NX options");
    const kept = entries.filter((e) => e.slice(0, e.indexOf("=")).toLowerCase() !== "cookie");
    const out = [`cookie=${this.cookie}`, ...kept].join(",");
    if (out.length + 1 > NX_TOKEN_MAX) throw new NxHandshakeError("the NX options are too long");
    return Buffer.from(`${version} ${out} `, "latin1");
  }
}

export interface NxSpliceOptions {
  cookie: string;
  /** Bytes already read from the client (after the HTTP 101), and bytes still to send it (the 101 itself). */
  initial?: { toB?: Uint8Array; toA?: Uint8Array };
  /** Milliseconds the client has to complete its handshake. */
  timeoutMs: number;
  /** Why a handshake was refused (both sockets are closed then). */
  onRefused?: (reason: string) => void;
}

/**
 * Reads the client's NX greeting, passes it to nxagent with the session's cookie, then splices
 * the two sockets (src/nx/splice.ts). Resolves when both are closed; a refused greeting closes
 * both at once (nothing of it reaches nxagent).
 */
export function spliceNx(client: IoSocket, agent: IoSocket, o: NxSpliceOptions): Promise<SpliceResult> {
  return new Promise((resolve) => {
    const greeting = new NxGreeting(o.cookie);
    // For the client: what the caller had not sent yet (written now: the client waits for its
    // 101 before it greets), then anything nxagent says early (it should say nothing).
    let toClient: Uint8Array = o.initial?.toA ?? new Uint8Array(0);
    const fromAgent: Uint8Array[] = [];
    let over = false;
    const fail = (reason?: string) => {
      if (over) return;
      over = true;
      clearTimeout(timer);
      client.data.io = undefined;
      agent.data.io = undefined;
      if (reason) o.onRefused?.(reason);
      client.end();
      agent.end();
      resolve({ aToB: 0, bToA: 0 });
    };
    const timer = setTimeout(() => fail("the client sent no NX handshake in time"), o.timeoutMs);
    const writeClient = () => {
      if (toClient.length) toClient = toClient.subarray(Math.max(0, client.write(toClient)));
    };
    const feed = (chunk: Uint8Array) => {
      if (over) return;
      let done;
      try {
        done = greeting.push(chunk);
      } catch (err) {
        if (!(err instanceof NxHandshakeError)) throw err;
        return fail(err.message);
      }
      if (!done) return;
      over = true;
      clearTimeout(timer);
      const toB = done.rest.length ? Buffer.concat([done.head, done.rest]) : done.head;
      const toA = toClient.length || fromAgent.length ? Buffer.concat([toClient, ...fromAgent]) : undefined;
      resolve(splice(client, agent, { toB, ...(toA ? { toA } : {}) }));
    };
    client.data.io = { data: feed, drain: writeClient, end: () => fail(), close: () => fail() };
    agent.data.io = {
      data: (c) => {
        fromAgent.push(c);
        if (fromAgent.reduce((n, x) => n + x.length, 0) > 4 * NX_TOKEN_MAX)
          fail("nxagent spoke before the client's handshake");
      },
      drain() {},
      end: () => fail(),
      close: () => fail(),
    };
    writeClient();
    if (o.initial?.toB?.length) feed(o.initial.toB);
  });
}
