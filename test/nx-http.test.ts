// The QVD HTTP dialect: the tolerant reader and the precise writer.
import { expect, test } from "bun:test";
import {
  type HttpParseError,
  jsonResponse,
  parseQuery,
  RequestReader,
  textResponse,
  writeHead,
} from "../src/nx/http.ts";
import { until } from "./support/wait.ts";

const enc = (s: string) => new TextEncoder().encode(s);
const dec = (b: Uint8Array) => new TextDecoder().decode(b);

test("bare LF and CRLF, blank lines before a request, several requests in one buffer", () => {
  const r = new RequestReader();
  r.push(
    enc(
      "\r\n\nGET /qvd/ping HTTP/1.1\nUser-Agent: QVDClient Qt/0.01 (Linux)\n\nGET /qvd/list_of_vm? HTTP/1.1\r\nAUTHORIZATION: Basic eA==\r\nx-folded: a\r\n  b\r\n\r\n",
    ),
  );
  const a = r.next()!;
  expect([a.method, a.path, a.version, a.headers.get("user-agent")]).toEqual([
    "GET",
    "/qvd/ping",
    "HTTP/1.1",
    "QVDClient Qt/0.01 (Linux)",
  ]);
  const b = r.next()!;
  expect([b.path, b.query, b.headers.get("authorization"), b.headers.get("x-folded")]).toEqual([
    "/qvd/list_of_vm",
    [],
    "Basic eA==",
    "a b",
  ]);
  expect(r.next()).toBeUndefined();
});

test("a request arriving byte by byte; the bytes after it are kept (after a 101 they are NX)", () => {
  const r = new RequestReader();
  const text =
    "GET /qvd/connect_to_vm?id=7&qvd.client.keyboard=pc105%2Fes&custom.x=a+b HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: QVD/1.0\r\n\r\n\x00\x01NX";
  let req;
  for (const ch of enc(text)) {
    r.push(new Uint8Array([ch]));
    req ??= r.next();
  }
  expect(req!.query).toEqual([
    ["id", "7"],
    ["qvd.client.keyboard", "pc105/es"],
    ["custom.x", "a b"],
  ]);
  expect([...r.rest()]).toEqual([0, 1, 78, 88]);
});

test("query strings: first = splits, + is a space, bad escapes are kept", () => {
  expect(parseQuery("a=1=2&b&c=%zz&d=Etc%2FGMT%2B5&e=x+y")).toEqual([
    ["a", "1=2"],
    ["b", ""],
    ["c", "%zz"],
    ["d", "Etc/GMT+5"],
    ["e", "x y"],
  ]);
});

const fails = (text: string, limits = {}) => {
  const r = new RequestReader(limits);
  r.push(enc(text));
  try {
    r.next();
  } catch (e) {
    return (e as HttpParseError).status;
  }
  return undefined;
};

test("errors: malformed line 400, bad header 400, not HTTP/1.1 505, limits 414/431", () => {
  expect(fails("hello\r\n\r\n")).toBe(400);
  expect(fails("GET /x HTTP/1.1 extra\r\n\r\n")).toBe(400);
  expect(fails("GET /x HTTP/1.1\r\nno colon here\r\n\r\n")).toBe(400);
  expect(fails("GET /x HTTP/1.1\r\n continuation first\r\n\r\n")).toBe(400);
  expect(fails("GET /x HTTP/1.0\r\n\r\n")).toBe(505);
  expect(fails("GET /x\r\n\r\n")).toBe(505);
  expect(fails(`GET /${"x".repeat(100)} HTTP/1.1\r\n\r\n`, { maxRequestLine: 50 })).toBe(414);
  expect(fails(`GET /${"x".repeat(100)}`, { maxRequestLine: 50 })).toBe(414);
  expect(fails(`GET / HTTP/1.1\r\nA: ${"x".repeat(100)}`, { maxHeaderBytes: 50 })).toBe(431);
  expect(fails(`GET / HTTP/1.1\r\n${"A: b\r\n".repeat(10)}\r\n`, { maxHeaders: 5 })).toBe(431);
  expect(fails("GET / HTTP/1.1\r\nA: b\r\n")).toBeUndefined(); // incomplete: wait for more
});

test("the writer: CRLF, short reasons, Content-Type and Content-Length on bodies, none on 101/102", () => {
  expect(dec(writeHead(102, [["X-QVD-VM-Info", "Starting virtual machine"]]))).toBe(
    "HTTP/1.1 102 Processing\r\nX-QVD-VM-Info: Starting virtual machine\r\n\r\n",
  );
  expect(dec(writeHead(101, [["X-QVD-Slave-Key", "k"]]))).toBe(
    "HTTP/1.1 101 Switching Protocols\r\nX-QVD-Slave-Key: k\r\n\r\n",
  );
  expect(dec(textResponse(200, "I am alive!\r\n"))).toBe(
    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nI am alive!\r\n",
  );
  expect(dec(jsonResponse(200, [{ name: "é" }]))).toBe(
    'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 36\r\n\r\n[\n   {\n      "name": "\\u00e9"\n   }\n]',
  );
  expect(() => writeHead(102, [["X-QVD-VM-Info", "a\r\nInjected: 1"]])).toThrow();
});

test("over a real socket: requests split across TCP segments are read in order", async () => {
  const got: string[] = [];
  const reader = new RequestReader();
  const server = Bun.listen({
    hostname: "127.0.0.1",
    port: 0,
    socket: {
      data(_s, d) {
        reader.push(d);
        for (let r = reader.next(); r; r = reader.next()) got.push(r.target);
      },
    },
  });
  const c = await Bun.connect({ hostname: "127.0.0.1", port: server.port, socket: { data() {} } });
  const text = "GET /a HTTP/1.1\n\nGET /b?x=1 HTTP/1.1\r\nHost: h\r\n\r\n";
  for (let i = 0; i < text.length; i += 5) {
    c.write(text.slice(i, i + 5));
    await Bun.sleep(2); // pacing: each piece its own packet
  }
  await until(() => got.length >= 2, "both requests at the server", 3000, 10);
  expect(got).toEqual(["/a", "/b?x=1"]);
  c.end();
  server.stop(true);
});
