// The server side of WebSocket (RFC 6455) for the browser sessions (src/web/desktop/README.md).
// The L7R reads its own TLS sockets with its own HTTP reader (src/nx/http.ts), so Bun's
// WebSocket server cannot take the connection over: this module answers the upgrade, decodes
// the client's frames incrementally and strictly (every violation is a WebSocketProtocolError
// with the close code to send), and encodes the server's frames. No subprotocols and no
// extensions: an offered permessage-deflate is simply not accepted.

import type { HeaderList, HttpRequest } from "../nx/http.ts";

export const OPCODE = {
  CONTINUATION: 0x0,
  TEXT: 0x1,
  BINARY: 0x2,
  CLOSE: 0x8,
  PING: 0x9,
  PONG: 0xa,
} as const;
export type Opcode = (typeof OPCODE)[keyof typeof OPCODE];

/** The GUID every server appends to the client's key. */
export const ACCEPT_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/** Longest control frame payload; a close reason gets what the 2-byte code leaves. */
export const MAX_CONTROL_PAYLOAD = 125;
export const MAX_CLOSE_REASON = MAX_CONTROL_PAYLOAD - 2;

/** A violation by the client: the connection is closed with `code` (1002, 1007 or 1009). */
export class WebSocketProtocolError extends Error {
  constructor(
    readonly code: 1002 | 1007 | 1009,
    message: string,
  ) {
    super(message);
    this.name = "WebSocketProtocolError";
  }
}

// --- the upgrade ------------------------------------------------------------------------------

export type UpgradeAnswer =
  | { ok: true; headers: HeaderList; accept: string }
  /** `headers` go into the refusal (426 names the version spoken). */
  | { ok: false; status: number; message: string; headers: HeaderList };

/** Sec-WebSocket-Accept for a client's Sec-WebSocket-Key. */
export function acceptKey(key: string): string {
  return new Bun.CryptoHasher("sha1").update(key + ACCEPT_GUID).digest("base64");
}

/** Comma-separated header tokens, trimmed and lower-cased. */
function tokens(value: string | undefined): string[] {
  return (value ?? "").split(",").map((t) => t.trim().toLowerCase());
}

/**
 * Checks a WebSocket upgrade request; on success, the headers of the 101 answer. The Origin is
 * checked apart (originAllowed), as the caller answers it with its own 403.
 */
export function upgradeAnswer(req: HttpRequest): UpgradeAnswer {
  const h = req.headers;
  if (req.method !== "GET")
    return { ok: false, status: 405, message: "a WebSocket upgrade is a GET", headers: [["Allow", "GET"]] };
  if (!tokens(h.get("connection")).includes("upgrade") || h.get("upgrade")?.trim().toLowerCase() !== "websocket")
    return { ok: false, status: 400, message: "not a WebSocket upgrade request", headers: [] };
  if (h.get("sec-websocket-version")?.trim() !== "13")
    return {
      ok: false,
      status: 426,
      message: "only WebSocket version 13 is spoken",
      headers: [["Sec-WebSocket-Version", "13"]],
    };
  // The key is 16 bytes in base64: 22 characters and the padding.
  const key = h.get("sec-websocket-key")?.trim() ?? "";
  if (!/^[A-Za-z0-9+/]{22}==$/.test(key))
    return { ok: false, status: 400, message: "invalid Sec-WebSocket-Key", headers: [] };
  const accept = acceptKey(key);
  return {
    ok: true,
    accept,
    headers: [
      ["Upgrade", "websocket"],
      ["Connection", "Upgrade"],
      ["Sec-WebSocket-Accept", accept],
    ],
  };
}

/** Host and port of an authority ("host", "host:port", "[v6]:port"), the port 443 when omitted. */
function authority(s: string): { host: string; port: number } | undefined {
  const m = /^([A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::(\d{1,5}))?$/.exec(s);
  if (!m) return undefined;
  const port = m[2] === undefined ? 443 : Number(m[2]);
  return port > 65535 ? undefined : { host: m[1]!.toLowerCase(), port };
}

/**
 * Whether the Origin is the page's own: `https://` + the Host header (the default port written
 * or not). Any page may open a WebSocket to any host; the Origin a browser sets is what tells
 * the L7R's own page from another site's.
 */
export function originAllowed(req: HttpRequest): boolean {
  const origin = req.headers.get("origin");
  const hostHeader = req.headers.get("host");
  if (origin === undefined || hostHeader === undefined) return false;
  const m = /^https:\/\/(.*)$/i.exec(origin);
  const o = m ? authority(m[1]!) : undefined;
  const h = authority(hostHeader);
  return o !== undefined && h !== undefined && o.host === h.host && o.port === h.port;
}

// --- the client's frames ------------------------------------------------------------------

/** A whole message (fragments joined) or a control frame. */
export type Message =
  | { type: "text"; text: string }
  | { type: "binary"; data: Uint8Array }
  | { type: "ping"; data: Uint8Array }
  | { type: "pong"; data: Uint8Array }
  /** `code` undefined: the close frame had no payload. */
  | { type: "close"; code: number | undefined; reason: string };

/** Whether a close code may be sent in a close frame (1005, 1006 and 1015 are only reported locally). */
export function validCloseCode(code: number): boolean {
  return (
    (code >= 1000 && code <= 1014 && code !== 1004 && code !== 1005 && code !== 1006) || (code >= 3000 && code <= 4999)
  );
}

const decodeText = (
  b: Uint8Array,
  decoder = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }),
  stream = false,
): string => {
  try {
    return decoder.decode(b, { stream });
  } catch {
    throw new WebSocketProtocolError(1007, "invalid UTF-8 in a text message");
  }
};

/**
 * Incremental decoder of a client's frames: `push()` the bytes as they arrive, then call
 * `next()` until it returns undefined. Throws WebSocketProtocolError (and keeps throwing it) on
 * a violation. A message larger than `maxMessage` bytes is refused from its frame header, before
 * its payload is buffered: besides what the caller pushed at once, it holds at most one
 * message of `maxMessage` bytes and one frame header. After a close frame nothing more is read.
 */
export class FrameReader {
  private chunks: Uint8Array[] = [];
  /** Bytes consumed of chunks[0]. */
  private offset = 0;
  private size = 0;
  private failed: WebSocketProtocolError | undefined;
  private closed = false;
  /** The fragmented message being read. */
  private frag: { text: boolean; parts: Uint8Array[]; texts: string[]; size: number } | undefined;
  private readonly decoder = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

  constructor(readonly maxMessage: number) {}

  push(chunk: Uint8Array): void {
    if (chunk.length === 0 || this.failed || this.closed) return;
    this.chunks.push(chunk);
    this.size += chunk.length;
  }

  /** Bytes buffered: of frames not complete yet and of fragments of an unfinished message. */
  get buffered(): number {
    return this.size + (this.frag?.size ?? 0);
  }

  next(): Message | undefined {
    if (this.failed) throw this.failed;
    try {
      return this.read();
    } catch (e) {
      if (!(e instanceof WebSocketProtocolError)) throw e;
      this.failed = e;
      this.chunks = [];
      this.size = 0;
      this.frag = undefined;
      throw e;
    }
  }

  private read(): Message | undefined {
    for (;;) {
      if (this.closed || this.size < 2) return undefined;
      const b0 = this.byte(0);
      const b1 = this.byte(1);
      const fin = (b0 & 0x80) !== 0;
      const opcode = b0 & 0x0f;
      let len = b1 & 0x7f;
      // What the first two bytes can tell, checked before waiting for more.
      if (b0 & 0x70) throw new WebSocketProtocolError(1002, "RSV bits set without an extension");
      if (opcode > 0xa || (opcode > 0x2 && opcode < 0x8))
        throw new WebSocketProtocolError(1002, `unknown opcode ${opcode}`);
      if (!(b1 & 0x80)) throw new WebSocketProtocolError(1002, "unmasked client frame");
      const control = opcode >= 0x8;
      if (control && !fin) throw new WebSocketProtocolError(1002, "fragmented control frame");
      if (control && len > MAX_CONTROL_PAYLOAD)
        throw new WebSocketProtocolError(1002, "control frame payload over 125 bytes");
      if (opcode === OPCODE.CONTINUATION && !this.frag)
        throw new WebSocketProtocolError(1002, "continuation frame without a message");
      if ((opcode === OPCODE.TEXT || opcode === OPCODE.BINARY) && this.frag)
        throw new WebSocketProtocolError(1002, "new message inside a fragmented one");
      let head = 2;
      if (len === 126) {
        if (this.size < 4) return undefined;
        len = (this.byte(2) << 8) | this.byte(3);
        head = 4;
      } else if (len === 127) {
        if (this.size < 10) return undefined;
        const hi = ((this.byte(2) << 24) | (this.byte(3) << 16) | (this.byte(4) << 8) | this.byte(5)) >>> 0;
        const lo = ((this.byte(6) << 24) | (this.byte(7) << 16) | (this.byte(8) << 8) | this.byte(9)) >>> 0;
        if (hi & 0x80000000) throw new WebSocketProtocolError(1002, "64-bit length with the top bit set");
        len = hi * 2 ** 32 + lo;
        head = 10;
      }
      if (!control && (this.frag?.size ?? 0) + len > this.maxMessage)
        throw new WebSocketProtocolError(1009, `message over ${this.maxMessage} bytes`);
      if (this.size < head + 4 + len) return undefined;
      const key = Uint8Array.of(this.byte(head), this.byte(head + 1), this.byte(head + 2), this.byte(head + 3));
      this.skip(head + 4);
      const payload = this.take(len, key);
      const m = this.frame(fin, opcode, payload);
      if (m) return m;
    }
  }

  /** A complete frame: a message, or undefined for a fragment of an unfinished one. */
  private frame(fin: boolean, opcode: number, payload: Uint8Array): Message | undefined {
    switch (opcode) {
      case OPCODE.PING:
        return { type: "ping", data: payload };
      case OPCODE.PONG:
        return { type: "pong", data: payload };
      case OPCODE.CLOSE:
        this.closed = true;
        this.chunks = [];
        this.size = 0;
        return closeMessage(payload);
      case OPCODE.CONTINUATION: {
        const f = this.frag!;
        f.size += payload.length;
        if (f.text) f.texts.push(decodeText(payload, this.decoder, !fin));
        else f.parts.push(payload);
        if (!fin) return undefined;
        this.frag = undefined;
        return f.text ? { type: "text", text: f.texts.join("") } : { type: "binary", data: concat(f.parts, f.size) };
      }
      default: {
        const text = opcode === OPCODE.TEXT;
        if (fin) return text ? { type: "text", text: decodeText(payload) } : { type: "binary", data: payload };
        // Text fragments are decoded as they come, so that invalid UTF-8 fails at once.
        this.frag = {
          text,
          parts: text ? [] : [payload],
          texts: text ? [decodeText(payload, this.decoder, true)] : [],
          size: payload.length,
        };
        return undefined;
      }
    }
  }

  /** The byte at `i` of the buffered bytes (i < size). */
  private byte(i: number): number {
    i += this.offset;
    for (const c of this.chunks) {
      if (i < c.length) return c[i]!;
      i -= c.length;
    }
    throw new RangeError("beyond the buffered bytes");
  }

  private skip(n: number): void {
    this.size -= n;
    n += this.offset;
    while (n > 0 && n >= this.chunks[0]!.length) n -= this.chunks.shift()!.length;
    this.offset = n;
  }

  /** The next `n` bytes, copied out of the chunks and unmasked in the copy (the chunks are the caller's). */
  private take(n: number, key: Uint8Array): Uint8Array {
    const out = new Uint8Array(n);
    let filled = 0;
    while (filled < n) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length - this.offset, n - filled);
      out.set(c.subarray(this.offset, this.offset + k), filled);
      filled += k;
      this.offset += k;
      if (this.offset === c.length) {
        this.chunks.shift();
        this.offset = 0;
      }
    }
    this.size -= n;
    for (let i = 0; i < n; i++) out[i] = out[i]! ^ key[i & 3]!;
    return out;
  }
}

function closeMessage(p: Uint8Array): Message {
  if (p.length === 0) return { type: "close", code: undefined, reason: "" };
  if (p.length === 1) throw new WebSocketProtocolError(1002, "close frame with a 1-byte payload");
  const code = (p[0]! << 8) | p[1]!;
  if (!validCloseCode(code)) throw new WebSocketProtocolError(1002, `close code ${code} is not allowed`);
  let reason: string;
  try {
    reason = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(p.subarray(2));
  } catch {
    throw new WebSocketProtocolError(1007, "invalid UTF-8 in a close reason");
  }
  return { type: "close", code, reason };
}

function concat(parts: Uint8Array[], size: number): Uint8Array {
  const out = new Uint8Array(size);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

// --- the server's frames --------------------------------------------------------------------

const enc = new TextEncoder();

/** One unfragmented, unmasked frame (a server never masks). */
export function encodeFrame(opcode: Opcode, payload: Uint8Array): Uint8Array {
  const n = payload.length;
  if (opcode >= 0x8 && n > MAX_CONTROL_PAYLOAD) throw new RangeError("control frame payload over 125 bytes");
  const head = n < 126 ? 2 : n < 0x10000 ? 4 : 10;
  const out = new Uint8Array(head + n);
  out[0] = 0x80 | opcode;
  if (head === 2) out[1] = n;
  else if (head === 4) {
    out[1] = 126;
    out[2] = n >> 8;
    out[3] = n & 0xff;
  } else {
    out[1] = 127;
    const v = new DataView(out.buffer);
    v.setUint32(2, Math.floor(n / 2 ** 32));
    v.setUint32(6, n >>> 0);
  }
  out.set(payload, head);
  return out;
}

export const textFrame = (text: string): Uint8Array => encodeFrame(OPCODE.TEXT, enc.encode(text));
export const binaryFrame = (data: Uint8Array): Uint8Array => encodeFrame(OPCODE.BINARY, data);
export const pingFrame = (data: Uint8Array = new Uint8Array(0)): Uint8Array => encodeFrame(OPCODE.PING, data);
export const pongFrame = (data: Uint8Array = new Uint8Array(0)): Uint8Array => encodeFrame(OPCODE.PONG, data);

/**
 * A close frame; without a code, an empty one. The reason is cut to 123 bytes of UTF-8 at a
 * character boundary. Throws on a code that may not be sent.
 */
export function closeFrame(code?: number, reason = ""): Uint8Array {
  if (code === undefined) return encodeFrame(OPCODE.CLOSE, new Uint8Array(0));
  if (!validCloseCode(code)) throw new RangeError(`close code ${code} may not be sent`);
  let r = enc.encode(reason);
  if (r.length > MAX_CLOSE_REASON) {
    let end = MAX_CLOSE_REASON;
    // Back off continuation bytes (10xxxxxx) to the start of the character cut in two.
    while (end > 0 && (r[end]! & 0xc0) === 0x80) end--;
    r = r.subarray(0, end);
  }
  const p = new Uint8Array(2 + r.length);
  p[0] = code >> 8;
  p[1] = code & 0xff;
  p.set(r, 2);
  return encodeFrame(OPCODE.CLOSE, p);
}
