// The L7R's WebSocket (src/l7r/websocket.ts): the upgrade and the Origin check, the strict
// incremental decoder of client frames (every refusal with its close code), the server's
// encoders, and a real client (Bun's WebSocket) against a plain TCP server built on the module.
import { describe, expect, test } from "bun:test";
import {
  acceptKey,
  binaryFrame,
  closeFrame,
  encodeFrame,
  FrameReader,
  type Message,
  OPCODE,
  originAllowed,
  pingFrame,
  pongFrame,
  textFrame,
  upgradeAnswer,
  WebSocketProtocolError,
} from "../src/l7r/websocket.ts";
import { type HttpRequest, RequestReader, textResponse, writeHead } from "../src/nx/http.ts";

const enc = (s: string) => new TextEncoder().encode(s);
const bytes = (...xs: number[]) => Uint8Array.from(xs);

const request = (headers: Record<string, string>, method = "GET"): HttpRequest => ({
  method,
  target: "/qvd/web/connect",
  path: "/qvd/web/connect",
  query: [],
  version: "HTTP/1.1",
  headers: new Map(Object.entries(headers).map(([k, v]) => [k.toLowerCase(), v])),
});

const UPGRADE = {
  Host: "node1.example.com:8443",
  Connection: "Upgrade",
  Upgrade: "websocket",
  "Sec-WebSocket-Version": "13",
  "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
};

/** A client frame as a browser sends it: masked (unless told), with the length form `len` forces. */
function clientFrame(
  opcode: number,
  payload: Uint8Array | string,
  o: { fin?: boolean; mask?: boolean; rsv?: number; len?: 7 | 16 | 64; key?: number[] } = {},
): Uint8Array {
  const p = typeof payload === "string" ? enc(payload) : payload;
  const n = p.length;
  const form = o.len ?? (n < 126 ? 7 : n < 0x10000 ? 16 : 64);
  const mask = o.mask ?? true;
  const key = o.key ?? [0x37, 0xfa, 0x21, 0x3d];
  const head: number[] = [((o.fin ?? true) ? 0x80 : 0) | ((o.rsv ?? 0) << 4) | opcode];
  const m = mask ? 0x80 : 0;
  if (form === 7) head.push(m | n);
  else if (form === 16) head.push(m | 126, n >> 8, n & 0xff);
  else head.push(m | 127, 0, 0, 0, 0, (n >>> 24) & 0xff, (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff);
  if (mask) head.push(...key);
  const out = new Uint8Array(head.length + n);
  out.set(head, 0);
  for (let i = 0; i < n; i++) out[head.length + i] = mask ? p[i]! ^ key[i & 3]! : p[i]!;
  return out;
}

/** A server frame as the client would send it: the same frame, masked. */
function maskServerFrame(f: Uint8Array): Uint8Array {
  expect(f[1]! & 0x80).toBe(0); // a server never masks
  const len7 = f[1]! & 0x7f;
  const head = len7 < 126 ? 2 : len7 === 126 ? 4 : 10;
  const n = f.length - head;
  const form = head === 2 ? 7 : head === 4 ? 16 : 64;
  return clientFrame(f[0]! & 0x0f, f.subarray(head), {
    fin: (f[0]! & 0x80) !== 0,
    len: form as 7 | 16 | 64,
    key: [n & 0xff, 0x9c, 0x01, 0xe4],
  });
}

/** All the messages of the frames, pushed at once. */
function read(frames: Uint8Array[], max = 1 << 20): Message[] {
  const r = new FrameReader(max);
  for (const f of frames) r.push(f);
  const out: Message[] = [];
  for (let m; (m = r.next()); ) out.push(m);
  return out;
}

/** The close code of the refusal of these frames (undefined: none). */
function refusal(frames: Uint8Array[], max = 1 << 20): number | undefined {
  try {
    read(frames, max);
  } catch (e) {
    if (e instanceof WebSocketProtocolError) return e.code;
    throw e;
  }
  return undefined;
}

describe("the upgrade", () => {
  test("the example key of RFC 6455 and the 101 headers", () => {
    // The value the RFC's example gives (and `openssl sha1 -binary | base64` agrees).
    expect(acceptKey("dGhlIHNhbXBsZSBub25jZQ==")).toBe("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    expect(upgradeAnswer(request(UPGRADE))).toEqual({
      ok: true,
      accept: "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
      headers: [
        ["Upgrade", "websocket"],
        ["Connection", "Upgrade"],
        ["Sec-WebSocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="],
      ],
    });
  });

  test("tokens in a list and any case; extensions and subprotocols offered are not taken", () => {
    const a = upgradeAnswer(
      request({
        ...UPGRADE,
        Connection: "keep-alive, UPGRADE",
        Upgrade: "WebSocket",
        "Sec-WebSocket-Extensions": "permessage-deflate",
        "Sec-WebSocket-Protocol": "binary",
      }),
    );
    expect(a.ok).toBe(true);
    expect(a.headers.map(([k]) => k.toLowerCase())).toEqual(["upgrade", "connection", "sec-websocket-accept"]);
  });

  test("refusals: method, Connection, Upgrade, version (426 naming 13), key", () => {
    const status = (h: Record<string, string>, method = "GET") => {
      const a = upgradeAnswer(request(h, method));
      return a.ok ? 101 : a.status;
    };
    expect(status(UPGRADE, "POST")).toBe(405);
    expect(status({ ...UPGRADE, Connection: "keep-alive" })).toBe(400);
    expect(status({ ...UPGRADE, Connection: "upgraded" })).toBe(400);
    const { Connection: _c, ...noConnection } = UPGRADE;
    expect(status(noConnection)).toBe(400);
    expect(status({ ...UPGRADE, Upgrade: "h2c" })).toBe(400);
    expect(status({ ...UPGRADE, Upgrade: "websocket2" })).toBe(400);
    expect(status({ ...UPGRADE, "Sec-WebSocket-Version": "8" })).toBe(426);
    expect(status({ ...UPGRADE, "Sec-WebSocket-Version": "13, 8" })).toBe(426);
    const { "Sec-WebSocket-Version": _v, ...noVersion } = UPGRADE;
    const a = upgradeAnswer(request(noVersion));
    expect(a.ok ? undefined : [a.status, a.headers]).toEqual([426, [["Sec-WebSocket-Version", "13"]]]);
    // 16 bytes exactly: 15 or 17 bytes, not base64, missing.
    expect(status({ ...UPGRADE, "Sec-WebSocket-Key": Buffer.alloc(15).toString("base64") })).toBe(400);
    expect(status({ ...UPGRADE, "Sec-WebSocket-Key": Buffer.alloc(17).toString("base64") })).toBe(400);
    expect(status({ ...UPGRADE, "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ" })).toBe(400);
    expect(status({ ...UPGRADE, "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25j*Q==" })).toBe(400);
    const { "Sec-WebSocket-Key": _k, ...noKey } = UPGRADE;
    expect(status(noKey)).toBe(400);
    expect(status({ ...UPGRADE, "Sec-WebSocket-Key": Buffer.alloc(16, 7).toString("base64") })).toBe(101);
  });
});

describe("originAllowed", () => {
  const allowed = (origin: string | undefined, host: string | null = "node1.example.com:8443") => {
    const h: Record<string, string> = {};
    if (origin !== undefined) h.Origin = origin;
    if (host !== null) h.Host = host;
    return originAllowed(request(h));
  };

  test("the page's own origin, in any case, the default port written or not", () => {
    expect(allowed("https://node1.example.com:8443")).toBe(true);
    expect(allowed("HTTPS://NODE1.Example.COM:8443")).toBe(true);
    expect(allowed("https://node1.example.com:8443", "NODE1.EXAMPLE.COM:8443")).toBe(true);
    expect(allowed("https://node1.example.com", "node1.example.com:443")).toBe(true);
    expect(allowed("https://node1.example.com:443", "node1.example.com")).toBe(true);
    expect(allowed("https://[::1]:8443", "[::1]:8443")).toBe(true);
  });

  test("anything else: other hosts, ports, schemes, paths, null, missing headers", () => {
    expect(allowed("https://node1.example.com:8443.evil")).toBe(false);
    expect(allowed("https://node1.example.com.evil:8443")).toBe(false);
    expect(allowed("https://evil.node1.example.com:8443")).toBe(false);
    expect(allowed("https://node1.example.com:8443@evil.com")).toBe(false);
    expect(allowed("https://evil.com#node1.example.com:8443")).toBe(false);
    expect(allowed("https://node1.example.com:8443/")).toBe(false);
    expect(allowed("http://node1.example.com:8443")).toBe(false);
    expect(allowed("wss://node1.example.com:8443")).toBe(false);
    expect(allowed("https://node1.example.com:9443")).toBe(false);
    expect(allowed("https://node1.example.com")).toBe(false);
    expect(allowed("https://node1.example.com:443", "node1.example.com:8443")).toBe(false);
    expect(allowed("https://node1.example.com:80", "node1.example.com")).toBe(false);
    expect(allowed("null")).toBe(false);
    expect(allowed("")).toBe(false);
    expect(allowed(undefined)).toBe(false);
    expect(allowed("https://node1.example.com:8443", null)).toBe(false);
    expect(allowed("https://", "")).toBe(false);
    expect(allowed("https://a,b", "a,b")).toBe(false);
  });
});

describe("FrameReader", () => {
  test("text, binary, ping, pong and close; several frames in one push", () => {
    expect(
      read([
        clientFrame(OPCODE.TEXT, "héllo ☃"),
        clientFrame(OPCODE.BINARY, bytes(0, 1, 255)),
        clientFrame(OPCODE.PING, "p"),
        clientFrame(OPCODE.PONG, ""),
        clientFrame(OPCODE.TEXT, ""),
        clientFrame(OPCODE.CLOSE, bytes(0x03, 0xe8, ...enc("bye"))),
      ]),
    ).toEqual([
      { type: "text", text: "héllo ☃" },
      { type: "binary", data: bytes(0, 1, 255) },
      { type: "ping", data: enc("p") },
      { type: "pong", data: new Uint8Array(0) },
      { type: "text", text: "" },
      { type: "close", code: 1000, reason: "bye" },
    ]);
  });

  test("a byte-order mark is kept; an empty close has no code; nothing is read after a close", () => {
    expect(read([clientFrame(OPCODE.TEXT, "\ufeffx")])).toEqual([{ type: "text", text: "\ufeffx" }]);
    expect(read([clientFrame(OPCODE.TEXT, "\ufeff", { fin: false }), clientFrame(OPCODE.CONTINUATION, "y")])).toEqual([
      { type: "text", text: "\ufeffy" },
    ]);
    expect(read([clientFrame(OPCODE.CLOSE, ""), clientFrame(OPCODE.TEXT, "late"), bytes(0xff, 0xff)])).toEqual([
      { type: "close", code: undefined, reason: "" },
    ]);
  });

  test("fragments joined, with a ping between them; a character split across fragments", () => {
    const snow = enc("☃"); // 3 bytes
    expect(
      read([
        clientFrame(OPCODE.TEXT, bytes(...enc("a"), snow[0]!), { fin: false }),
        clientFrame(OPCODE.PING, "mid"),
        clientFrame(OPCODE.CONTINUATION, snow.subarray(1), { fin: false }),
        clientFrame(OPCODE.CONTINUATION, "", { fin: false }),
        clientFrame(OPCODE.CONTINUATION, "b"),
        clientFrame(OPCODE.BINARY, bytes(1, 2), { fin: false }),
        clientFrame(OPCODE.PONG, ""),
        clientFrame(OPCODE.CONTINUATION, bytes(3)),
      ]),
    ).toEqual([
      { type: "ping", data: enc("mid") },
      { type: "text", text: "a☃b" },
      { type: "pong", data: new Uint8Array(0) },
      { type: "binary", data: bytes(1, 2, 3) },
    ]);
  });

  test("a frame pushed one byte at a time: nothing until its last byte", () => {
    const r = new FrameReader(1 << 20);
    const frames = [
      clientFrame(
        OPCODE.BINARY,
        new Uint8Array(300).map((_, i) => i),
      ),
      clientFrame(OPCODE.TEXT, "done"),
    ];
    const all = Uint8Array.from(frames.flatMap((f) => [...f]));
    const got: Message[] = [];
    const at: number[] = [];
    all.forEach((b, i) => {
      r.push(bytes(b));
      for (let m; (m = r.next()); ) {
        got.push(m);
        at.push(i + 1);
      }
    });
    expect(at).toEqual([frames[0]!.length, all.length]);
    expect(got).toEqual([
      { type: "binary", data: new Uint8Array(300).map((_, i) => i) },
      { type: "text", text: "done" },
    ]);
    expect(r.buffered).toBe(0);
  });

  test("length forms: 7-bit up to 125, 16-bit, 64-bit beyond 64 KiB", () => {
    const big = new Uint8Array(70_000).map((_, i) => (i * 31) & 0xff);
    const mid = new Uint8Array(200).fill(9);
    expect(clientFrame(OPCODE.BINARY, big)[1]).toBe(0x80 | 127);
    expect(clientFrame(OPCODE.BINARY, mid)[1]).toBe(0x80 | 126);
    expect(read([clientFrame(OPCODE.BINARY, big)])).toEqual([{ type: "binary", data: big }]);
    expect(read([clientFrame(OPCODE.BINARY, mid)])).toEqual([{ type: "binary", data: mid }]);
    // Longer forms than needed are accepted.
    expect(read([clientFrame(OPCODE.TEXT, "x", { len: 64 }), clientFrame(OPCODE.TEXT, "y", { len: 16 })])).toEqual([
      { type: "text", text: "x" },
      { type: "text", text: "y" },
    ]);
  });

  test("refused with 1002: unmasked, RSV bits, unknown opcodes, control frames too long or fragmented", () => {
    expect(refusal([clientFrame(OPCODE.TEXT, "x", { mask: false })])).toBe(1002);
    for (const rsv of [1, 2, 4]) expect(refusal([clientFrame(OPCODE.TEXT, "x", { rsv })])).toBe(1002);
    for (const op of [3, 4, 5, 6, 7, 0xb, 0xc, 0xd, 0xe, 0xf]) expect(refusal([clientFrame(op, "")])).toBe(1002);
    for (const op of [OPCODE.PING, OPCODE.PONG, OPCODE.CLOSE]) {
      expect(refusal([clientFrame(op, new Uint8Array(126).fill(0x41))])).toBe(1002);
      expect(refusal([clientFrame(op, "", { fin: false })])).toBe(1002);
    }
    expect(refusal([clientFrame(OPCODE.PING, new Uint8Array(125))])).toBeUndefined();
    expect(refusal([clientFrame(OPCODE.PING, "x", { len: 16 })])).toBe(1002);
  });

  test("refused with 1002: continuation without a start, a new message inside a fragmented one", () => {
    expect(refusal([clientFrame(OPCODE.CONTINUATION, "x")])).toBe(1002);
    expect(refusal([clientFrame(OPCODE.TEXT, "a"), clientFrame(OPCODE.CONTINUATION, "x")])).toBe(1002);
    expect(refusal([clientFrame(OPCODE.TEXT, "a", { fin: false }), clientFrame(OPCODE.TEXT, "b")])).toBe(1002);
    expect(refusal([clientFrame(OPCODE.BINARY, "a", { fin: false }), clientFrame(OPCODE.TEXT, "b")])).toBe(1002);
  });

  test("refused with 1002: a 64-bit length with its top bit set, even when the rest is small", () => {
    const f = clientFrame(OPCODE.BINARY, "x", { len: 64 });
    f[2] = 0x80;
    expect(refusal([f.subarray(0, 10)])).toBe(1002);
  });

  test("the size limit (1009) from the header alone, before the payload is buffered", () => {
    // 2^40 bytes declared: only the 10 header bytes are given.
    const huge = bytes(0x82, 0x80 | 127, 0, 0, 0, 1, 0, 0, 0, 0);
    const r = new FrameReader(1 << 20);
    r.push(huge);
    expect(() => r.next()).toThrow(WebSocketProtocolError);
    expect(refusal([huge])).toBe(1009);
    // The 16-bit form, 1001 bytes declared against 1000; exactly 1000 is fine.
    expect(refusal([bytes(0x81, 0x80 | 126, 0x03, 0xe9)], 1000)).toBe(1009);
    expect(refusal([clientFrame(OPCODE.BINARY, new Uint8Array(1000))], 1000)).toBeUndefined();
    // Fragments count together: 600 read, 401 more declared.
    expect(
      refusal(
        [clientFrame(OPCODE.BINARY, new Uint8Array(600), { fin: false }), bytes(0x80, 0x80 | 126, 0x01, 0x91)],
        1000,
      ),
    ).toBe(1009);
    expect(
      refusal(
        [clientFrame(OPCODE.TEXT, "a".repeat(600), { fin: false }), clientFrame(OPCODE.CONTINUATION, "a".repeat(400))],
        1000,
      ),
    ).toBeUndefined();
    // Control frames are not messages: they do not count.
    expect(
      read(
        [
          clientFrame(OPCODE.BINARY, new Uint8Array(10), { fin: false }),
          clientFrame(OPCODE.PING, new Uint8Array(100)),
          clientFrame(OPCODE.CONTINUATION, ""),
        ],
        10,
      ),
    ).toHaveLength(2);
  });

  test("a refusal sticks: the reader throws it again and drops what it held", () => {
    const r = new FrameReader(1000);
    r.push(clientFrame(OPCODE.BINARY, new Uint8Array(100), { fin: false }));
    r.push(clientFrame(OPCODE.TEXT, "x", { mask: false }));
    let first: unknown;
    try {
      r.next();
    } catch (e) {
      first = e;
    }
    expect((first as WebSocketProtocolError).code).toBe(1002);
    expect(() => r.next()).toThrow(first as Error);
    expect(r.buffered).toBe(0);
  });

  test("refused with 1007: invalid UTF-8 in a text message, at once in the fragment that has it", () => {
    expect(refusal([clientFrame(OPCODE.TEXT, bytes(0xc3, 0x28))])).toBe(1007);
    expect(refusal([clientFrame(OPCODE.TEXT, bytes(0xed, 0xa0, 0x80))])).toBe(1007); // a surrogate
    expect(refusal([clientFrame(OPCODE.TEXT, bytes(0xe2, 0x98))])).toBe(1007); // cut short
    expect(
      refusal([clientFrame(OPCODE.TEXT, bytes(0xe2, 0x98), { fin: false }), clientFrame(OPCODE.CONTINUATION, "")]),
    ).toBe(1007);
    // The fragment with the bad byte fails before the message ends.
    expect(
      refusal([
        clientFrame(OPCODE.TEXT, "ok", { fin: false }),
        clientFrame(OPCODE.CONTINUATION, bytes(0xff), { fin: false }),
      ]),
    ).toBe(1007);
    // Binary is not text.
    expect(refusal([clientFrame(OPCODE.BINARY, bytes(0xff))])).toBeUndefined();
  });

  test("close frames: 1-byte payload and codes not allowed on the wire (1002), a bad reason (1007)", () => {
    const close = (code: number, reason: Uint8Array = new Uint8Array(0)) =>
      clientFrame(OPCODE.CLOSE, bytes(code >> 8, code & 0xff, ...reason));
    expect(refusal([clientFrame(OPCODE.CLOSE, bytes(0x03))])).toBe(1002);
    for (const code of [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535])
      expect([code, refusal([close(code)])]).toEqual([code, 1002]);
    for (const code of [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999])
      expect([code, refusal([close(code)])]).toEqual([code, undefined]);
    expect(refusal([close(1000, bytes(0xc3, 0x28))])).toBe(1007);
    expect(read([close(4001, enc("pris en charge ☃"))])).toEqual([
      { type: "close", code: 4001, reason: "pris en charge ☃" },
    ]);
  });
});

describe("the server's frames", () => {
  test("exact bytes: unmasked, FIN set, the shortest length form", () => {
    expect([...textFrame("hi")]).toEqual([0x81, 2, 0x68, 0x69]);
    expect([...pingFrame()]).toEqual([0x89, 0]);
    expect([...closeFrame()]).toEqual([0x88, 0]);
    expect([...closeFrame(1000)]).toEqual([0x88, 2, 0x03, 0xe8]);
    expect([...binaryFrame(new Uint8Array(125)).subarray(0, 2)]).toEqual([0x82, 125]);
    expect([...binaryFrame(new Uint8Array(126)).subarray(0, 4)]).toEqual([0x82, 126, 0, 126]);
    expect([...binaryFrame(new Uint8Array(0xffff)).subarray(0, 4)]).toEqual([0x82, 126, 0xff, 0xff]);
    expect([...binaryFrame(new Uint8Array(0x10000)).subarray(0, 10)]).toEqual([0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
    expect(binaryFrame(new Uint8Array(0x10000)).length).toBe(10 + 0x10000);
  });

  test("round trip through the reader, masked as a client would", () => {
    const sizes = [0, 1, 125, 126, 0xffff, 0x10000, 100_000];
    for (const n of sizes) {
      const data = new Uint8Array(n).map((_, i) => (i * 7 + n) & 0xff);
      expect(read([maskServerFrame(binaryFrame(data))])).toEqual([{ type: "binary", data }]);
    }
    const text = "ünïcödé ☃ 🎉 ".repeat(5000);
    expect(read([maskServerFrame(textFrame(text))])).toEqual([{ type: "text", text: text }]);
    expect(
      read([
        maskServerFrame(pingFrame(enc("p"))),
        maskServerFrame(pongFrame(enc("q"))),
        maskServerFrame(encodeFrame(OPCODE.TEXT, enc("raw"))),
      ]),
    ).toEqual([
      { type: "ping", data: enc("p") },
      { type: "pong", data: enc("q") },
      { type: "text", text: "raw" },
    ]);
    expect(read([maskServerFrame(closeFrame(4401, "log in again"))])).toEqual([
      { type: "close", code: 4401, reason: "log in again" },
    ]);
  });

  test("close reasons cut to 123 bytes without cutting a character; codes not for the wire refused", () => {
    const reasonOf = (f: Uint8Array) => (read([maskServerFrame(f)])[0] as { reason: string }).reason;
    expect(reasonOf(closeFrame(1000, "a".repeat(200)))).toBe("a".repeat(123));
    // "☃" is 3 bytes: 41 of them are 123 bytes, a 42nd would not fit.
    expect(reasonOf(closeFrame(1000, "☃".repeat(50)))).toBe("☃".repeat(41));
    // 122 bytes then a 3-byte character: cut before it.
    expect(reasonOf(closeFrame(1000, `${"a".repeat(122)}☃`))).toBe("a".repeat(122));
    // 4-byte characters: 30 fit (120 bytes).
    expect(reasonOf(closeFrame(1000, "🎉".repeat(40)))).toBe("🎉".repeat(30));
    expect(closeFrame(1000, "☃".repeat(50)).length).toBeLessThanOrEqual(2 + 125);
    for (const code of [1005, 1006, 1015, 999, 5000]) expect(() => closeFrame(code)).toThrow(RangeError);
    expect(() => pingFrame(new Uint8Array(126))).toThrow(RangeError);
  });
});

/** A plain TCP server speaking WebSocket through the module: the upgrade (Origin checked), then `onMessage`. */
function wsServer(onMessage: (s: Bun.Socket<WsState>, m: Message) => void) {
  const refused: number[] = [];
  const failed = Promise.withResolvers<never>();
  const server = Bun.listen<WsState>({
    hostname: "127.0.0.1",
    port: 0,
    socket: {
      open(s) {
        s.data = { http: new RequestReader() };
      },
      data(s, chunk) {
        try {
          const st = s.data;
          if (!st.ws) {
            st.http.push(new Uint8Array(chunk));
            const req = st.http.next();
            if (!req) return;
            const a = upgradeAnswer(req);
            const status = !a.ok ? a.status : originAllowed(req) ? 101 : 403;
            if (!a.ok || status !== 101) {
              refused.push(status);
              s.end(textResponse(status, undefined, a.ok ? [] : a.headers));
              return;
            }
            s.write(writeHead(101, a.headers));
            st.ws = new FrameReader(1 << 20);
            chunk = Buffer.from(st.http.rest());
          }
          st.ws.push(new Uint8Array(chunk));
          for (let m; (m = st.ws.next()); ) onMessage(s, m);
        } catch (e) {
          failed.reject(e);
          s.end();
        }
      },
    },
  });
  return { server, refused, failed: failed.promise };
}
type WsState = { http: RequestReader; ws?: FrameReader };

/** Bun's WebSocket with headers of our choosing (Bun takes them; the DOM types know only protocols). */
const clientWith = (url: string, origin: string) =>
  new WebSocket(url, { headers: { Origin: origin } } as unknown as string[]);

test("end to end: Bun's WebSocket client and a TCP server built on the module", async () => {
  const serverSaw: Message[] = [];
  const serverClosed = Promise.withResolvers<void>();
  const { server, refused, failed } = wsServer((s, m) => {
    serverSaw.push(m);
    if (m.type === "text") s.write(textFrame(`echo: ${m.text}`));
    else if (m.type === "binary") {
      s.write(binaryFrame(m.data.slice().reverse()));
      s.write(pingFrame(enc("p1")));
    } else if (m.type === "pong") s.write(closeFrame(4001, "pris en charge ailleurs ☃"));
    else if (m.type === "close") {
      s.end();
      serverClosed.resolve();
    }
  });
  failed.catch(serverClosed.reject);
  try {
    // Bun's client offers permessage-deflate, which the answer leaves out.
    const ws = clientWith(`ws://127.0.0.1:${server.port}/qvd/web/connect`, `https://127.0.0.1:${server.port}`);
    ws.binaryType = "arraybuffer";
    const got: (string | number[])[] = [];
    const closed = new Promise<CloseEvent>((resolve) => ws.addEventListener("close", resolve));
    ws.addEventListener("open", () => ws.send("hello ☃"));
    ws.addEventListener("message", (e) => {
      if (typeof e.data === "string") {
        got.push(e.data);
        ws.send(bytes(1, 2, 3, 250));
      } else got.push([...new Uint8Array(e.data as ArrayBuffer)]);
    });
    const ev = await closed;
    expect([ev.code, ev.reason]).toEqual([4001, "pris en charge ailleurs ☃"]);
    expect(got).toEqual(["echo: hello ☃", [250, 3, 2, 1]]);
    await serverClosed.promise;
    expect(serverSaw).toEqual([
      { type: "text", text: "hello ☃" },
      { type: "binary", data: bytes(1, 2, 3, 250) },
      { type: "pong", data: enc("p1") },
      // The client answers the close with one of its own.
      { type: "close", code: 4001, reason: expect.any(String) },
    ]);
    expect(refused).toEqual([]);
  } finally {
    server.stop(true);
  }
});

test("end to end: a client from another origin is refused before the upgrade", async () => {
  const { server, refused } = wsServer(() => {
    throw new Error("no message expected");
  });
  try {
    const ws = clientWith(`ws://127.0.0.1:${server.port}/qvd/web/connect`, "https://evil.example");
    let opened = false;
    ws.addEventListener("open", () => (opened = true));
    const ev = await new Promise<CloseEvent>((resolve) => ws.addEventListener("close", resolve));
    expect([opened, ev.wasClean, refused]).toEqual([false, false, [403]]);
  } finally {
    server.stop(true);
  }
});
