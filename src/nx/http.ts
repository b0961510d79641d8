// The QVD dialect of HTTP/1.1 over a byte stream (docs/PROTOCOL.md, "The HTTP dialect"): a tolerant
// reader (bare LF or CRLF, any header case, blank lines before a request skipped, several
// requests per connection, bodies never read) with limits, and a precise writer (CRLF, the
// short reason phrase, Content-Type + Content-Length on bodies, none on 101/102).

export interface HttpRequest {
  method: string;
  /** The request target as sent. */
  target: string;
  /** The target without its query string. */
  path: string;
  /** Query pairs in order: split on `&`, then on the first `=`; `+` is a space, `%XX` unescaped. */
  query: [string, string][];
  version: string;
  /** Header names lower-cased; a repeated header keeps its first value. */
  headers: Map<string, string>;
}

/** A request that cannot be parsed; the connection is answered with `status` and closed. */
export class HttpParseError extends Error {
  constructor(
    readonly status: 400 | 414 | 431 | 505,
    message: string,
  ) {
    super(message);
    this.name = "HttpParseError";
  }
}

export interface ReaderLimits {
  /** Longest request line, in bytes (without the line end). */
  maxRequestLine: number;
  /** Largest header block (all header lines together), in bytes. */
  maxHeaderBytes: number;
  maxHeaders: number;
}

export const DEFAULT_LIMITS: ReaderLimits = { maxRequestLine: 8192, maxHeaderBytes: 32768, maxHeaders: 100 };

const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
const LF = 10;

/**
 * Incremental request reader: `push()` the bytes as they arrive, then call `next()` until it
 * returns undefined (a request is incomplete). `rest()` hands over the bytes not consumed
 * (after a 101 they belong to the upgraded stream).
 */
export class RequestReader {
  private buf: Uint8Array = new Uint8Array(0);
  private readonly limits: ReaderLimits;

  constructor(limits: Partial<ReaderLimits> = {}) {
    this.limits = { ...DEFAULT_LIMITS, ...limits };
  }

  push(chunk: Uint8Array): void {
    if (chunk.length === 0) return;
    if (this.buf.length === 0) {
      this.buf = chunk;
      return;
    }
    const b = new Uint8Array(this.buf.length + chunk.length);
    b.set(this.buf, 0);
    b.set(chunk, this.buf.length);
    this.buf = b;
  }

  /** Bytes buffered and not yet consumed. */
  get buffered(): number {
    return this.buf.length;
  }

  /** Takes the unconsumed bytes. */
  rest(): Uint8Array {
    const r = this.buf;
    this.buf = new Uint8Array(0);
    return r;
  }

  /** The next complete request, or undefined; throws HttpParseError on a malformed one. */
  next(): HttpRequest | undefined {
    const { maxRequestLine, maxHeaderBytes, maxHeaders } = this.limits;
    const b = this.buf;
    let pos = 0;
    // Blank lines before a request are skipped.
    for (;;) {
      if (pos < b.length && b[pos] === LF) pos++;
      else if (pos + 1 < b.length && b[pos] === 13 && b[pos + 1] === LF) pos += 2;
      else break;
    }
    const lineEnd = b.indexOf(LF, pos);
    if (lineEnd < 0) {
      if (b.length - pos > maxRequestLine + 1) throw new HttpParseError(414, "request line too long");
      this.buf = b.subarray(pos);
      return undefined;
    }
    if (lineEnd - pos > maxRequestLine + 1) throw new HttpParseError(414, "request line too long");
    const requestLine = latin1(b, pos, lineEnd);
    // Header lines up to the empty line.
    const lines: string[] = [];
    let p = lineEnd + 1;
    const headerStart = p;
    for (;;) {
      const e = b.indexOf(LF, p);
      if (e < 0) {
        if (b.length - headerStart > maxHeaderBytes) throw new HttpParseError(431, "request header fields too large");
        this.buf = b.subarray(pos);
        return undefined;
      }
      const line = latin1(b, p, e);
      p = e + 1;
      if (line === "") break;
      if (p - headerStart > maxHeaderBytes) throw new HttpParseError(431, "request header fields too large");
      if (lines.length >= maxHeaders && !/^[ \t]/.test(line)) throw new HttpParseError(431, "too many header fields");
      lines.push(line);
    }
    this.buf = b.subarray(p);
    return parseHead(requestLine, lines);
  }
}

/** Bytes as latin1 text without the line end's CR. */
function latin1(b: Uint8Array, start: number, end: number): string {
  if (end > start && b[end - 1] === 13) end--;
  return Buffer.from(b.buffer, b.byteOffset + start, end - start).toString("latin1");
}

function parseHead(requestLine: string, lines: string[]): HttpRequest {
  const parts = requestLine.split(" ");
  if (parts.length === 2 || (parts.length === 3 && parts[2] === ""))
    throw new HttpParseError(505, "HTTP version missing");
  if (parts.length !== 3 || !TOKEN.test(parts[0]!) || parts[1] === "" || /[\x00-\x20\x7f]/.test(parts[1]!))
    throw new HttpParseError(400, "malformed request line");
  const [method, target, version] = parts as [string, string, string];
  if (!/^HTTP\/\d\.\d$/.test(version)) throw new HttpParseError(400, "malformed request line");
  if (version !== "HTTP/1.1") throw new HttpParseError(505, `${version} is not supported`);
  const headers = new Map<string, string>();
  let last: string | undefined;
  for (const line of lines) {
    if (/^[ \t]/.test(line)) {
      // A folded continuation line joins the previous header.
      if (last === undefined) throw new HttpParseError(400, "continuation line without a header");
      headers.set(last, `${headers.get(last)} ${line.trim()}`.trim());
      continue;
    }
    const colon = line.indexOf(":");
    const name = colon > 0 ? line.slice(0, colon) : "";
    if (!TOKEN.test(name)) throw new HttpParseError(400, "malformed header line");
    const key = name.toLowerCase();
    if (!headers.has(key)) headers.set(key, line.slice(colon + 1).trim());
    last = key;
  }
  const q = target.indexOf("?");
  return {
    method,
    target,
    path: q < 0 ? target : target.slice(0, q),
    query: q < 0 ? [] : parseQuery(target.slice(q + 1)),
    version,
    headers,
  };
}

/** `a=1&b=x+y&c=%2F` → pairs; invalid escapes are kept as they are. */
export function parseQuery(qs: string): [string, string][] {
  const out: [string, string][] = [];
  for (const part of qs.split("&")) {
    if (part === "") continue;
    const eq = part.indexOf("=");
    const k = eq < 0 ? part : part.slice(0, eq);
    const v = eq < 0 ? "" : part.slice(eq + 1);
    out.push([unescapeQuery(k), unescapeQuery(v)]);
  }
  return out;
}

function unescapeQuery(s: string): string {
  s = s.replace(/\+/g, " ");
  try {
    return decodeURIComponent(s);
  } catch {
    return s.replace(/%([0-9a-fA-F]{2})/g, (_, h: string) => String.fromCharCode(parseInt(h, 16)));
  }
}

// --- writer ----------------------------------------------------------------------------------

export const REASONS: Record<number, string> = {
  100: "Continue",
  101: "Switching Protocols",
  102: "Processing",
  200: "OK",
  400: "Bad Request",
  401: "Unauthorized",
  403: "Forbidden",
  404: "Not Found",
  405: "Method Not Allowed",
  408: "Request Timeout",
  409: "Conflict",
  414: "Request-URI Too Long",
  422: "Unprocessable Entity",
  426: "Upgrade Required",
  429: "Too Many Requests",
  431: "Request Header Fields Too Large",
  500: "Internal Server Error",
  501: "Not Implemented",
  502: "Bad Gateway",
  503: "Service Unavailable",
  505: "HTTP Version Not Supported",
};

export type HeaderList = [string, string][];

const enc = new TextEncoder();

function head(status: number, headers: HeaderList): string {
  let s = `HTTP/1.1 ${status} ${REASONS[status] ?? "Unknown"}\r\n`;
  for (const [k, v] of headers) {
    if (/[\r\n]/.test(k) || /[\r\n]/.test(v)) throw new Error(`header ${k} contains a line break`);
    s += `${k}: ${v}\r\n`;
  }
  return s + "\r\n";
}

/** An interim or upgrade response (102, 101): the status line and the headers, no body. */
export function writeHead(status: number, headers: HeaderList = []): Uint8Array {
  return enc.encode(head(status, headers));
}

/** A final response with a body: Content-Type and Content-Length always present. */
export function writeResponse(
  status: number,
  contentType: string,
  body: string | Uint8Array,
  headers: HeaderList = [],
): Uint8Array {
  const bytes = typeof body === "string" ? enc.encode(body) : body;
  const h = enc.encode(
    head(status, [["Content-Type", contentType], ["Content-Length", String(bytes.length)], ...headers]),
  );
  const out = new Uint8Array(h.length + bytes.length);
  out.set(h, 0);
  out.set(bytes, h.length);
  return out;
}

/** `text/plain` error/status answer; without a message, the status text stands in. */
export function textResponse(status: number, message?: string, headers: HeaderList = []): Uint8Array {
  return writeResponse(status, "text/plain", message ?? `${status} ${REASONS[status] ?? ""}\r\n`, headers);
}

/** Pretty-printed, ASCII-escaped JSON as the original sends it. */
export function jsonResponse(status: number, value: unknown): Uint8Array {
  const text = JSON.stringify(value, null, 3).replace(
    /[\u0080-\uffff]/g,
    (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`,
  );
  return writeResponse(status, "application/json", text);
}
