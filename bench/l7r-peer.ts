// The processes bench/l7r.ts runs around the L7R, each in a process of its own so that the
// proxy under test has an event loop to itself:
//   sink CERT KEY      a TCP sink (plain and TLS) and a stand-in VMA; prints its ports as JSON.
//   stream HOST PORT plain|tls|l7r up|down|ping AMOUNT [AUTH VM_ID]
//                      one transfer through a target: prints {"ready":true} once connected, starts
//                      when a line arrives on stdin, then prints its figures as JSON.
//   logins PORT CONCURRENCY SECONDS new|keepalive USERS_PREFIX USERS PASSWORD
//                      list_of_vm with Basic auth from CONCURRENCY parallel clients (ready/go as
//                      stream; keep-alive connections log in before the ready).
//   connect PORT LOGIN PASSWORD VM_ID
//                      connect_to_vm timed to the 101, then the NX greeting and nxagent's answer.
//   pings PORT SECONDS a bystander: /qvd/ping one after the other on one connection (ready/go).
//   attack PORT SECONDS LOGIN
//                      one TLS connection: 40 pipelined bad logins, then junk as fast as the L7R
//                      takes it, answers never read; when the L7R closes it, again (ready/go).
//
// The sink's protocol: the first 9 bytes are a command and a 64-bit count:
//   U n  the client sends n bytes; the sink answers one byte "K" when it has them all;
//   D n  the sink sends n bytes;
//   P n  the sink echoes what it receives (ping-pong, n is ignored).
import type { Socket } from "bun";

const [mode, ...args] = process.argv.slice(2);
const CHUNK = Buffer.alloc(1 << 20, 0x5a);

const out = (o: unknown) => console.log(JSON.stringify(o));

// --- sink and stand-in VMA ----------------------------------------------------------------------

interface SinkConn {
  head: Buffer;
  cmd?: string;
  total: number;
  got: number;
  sent: number;
}

function sinkHandlers() {
  const pump = (s: Socket<SinkConn>) => {
    const d = s.data;
    while (d.sent < d.total) {
      const len = Math.min(CHUNK.length, d.total - d.sent);
      const n = s.write(len === CHUNK.length ? CHUNK : CHUNK.subarray(0, len));
      d.sent += Math.max(0, n);
      if (n < len) {
        // The rest of this chunk is rewritten from the shared buffer on drain (same bytes).
        return;
      }
    }
    s.end();
  };
  const onBytes = (s: Socket<SinkConn>, chunk: Uint8Array) => {
    const d = s.data;
    if (d.cmd === "U") {
      d.got += chunk.length;
      if (d.got >= d.total) s.write("K");
    } else if (d.cmd === "P") s.write(chunk);
  };
  return {
    open(s: Socket<SinkConn>) {
      s.data = { head: Buffer.alloc(0), total: 0, got: 0, sent: 0 };
      s.setNoDelay(true);
    },
    data(s: Socket<SinkConn>, chunk: Uint8Array) {
      const d = s.data;
      if (d.cmd) return onBytes(s, chunk);
      d.head = Buffer.concat([d.head, chunk]);
      // Through the L7R the client greets as nxproxy does (the L7R adds the cookie): skip it.
      if (d.head[0] === 0x4e) {
        const end = d.head.indexOf(0x20, d.head.indexOf(0x20) + 1);
        if (d.head.indexOf(0x20) < 0 || end < 0) return;
        d.head = d.head.subarray(end + 1);
      }
      if (d.head.length < 9) return;
      d.cmd = String.fromCharCode(d.head[0]!);
      d.total = Number(d.head.readBigUInt64BE(1));
      const rest = d.head.subarray(9);
      d.head = Buffer.alloc(0);
      if (d.cmd === "D") pump(s);
      else if (rest.length) onBytes(s, rest);
    },
    drain(s: Socket<SinkConn>) {
      if (s.data.cmd === "D") pump(s);
    },
    end(s: Socket<SinkConn>) {
      s.end();
    },
    error() {},
  };
}

async function sink(cert: string, key: string) {
  const plain = Bun.listen<SinkConn>({ hostname: "127.0.0.1", port: 0, socket: sinkHandlers() });
  const tls = Bun.listen<SinkConn>({
    hostname: "127.0.0.1",
    port: 0,
    tls: { cert: Bun.file(cert), key: Bun.file(key) },
    socket: sinkHandlers(),
  });
  // Stand-in VMA: answers what the L7R asks before it connects to the X port (x_start, then
  // x_state until "listening"). It starts no X session: the sink plays nxagent.
  const vma = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    fetch(req) {
      const path = new URL(req.url).pathname;
      if (path === "/vma/x_start") return Response.json({ state: "starting" });
      if (path === "/vma/x_state")
        return Response.json({ state: "listening", since: new Date().toISOString(), nx_state: "listening" });
      if (path === "/vma/ping") return Response.json({ ok: true, state: "listening" });
      return Response.json({ error: "not found" }, { status: 404 });
    },
  });
  out({ sink: plain.port, tlsSink: tls.port, vma: vma.port });
  process.on("SIGTERM", () => process.exit(0));
}

// --- clients ------------------------------------------------------------------------------------

/** A client connection with an awaitable byte buffer. */
class Conn {
  buf = Buffer.alloc(0);
  closed = false;
  /** When set, bytes go here instead of the buffer (the transfer phase). */
  onData?: (c: Uint8Array) => void;
  private wake?: () => void;
  drained?: () => void;
  s!: Socket<undefined>;

  static async open(host: string, port: number, tls: boolean): Promise<Conn> {
    const c = new Conn();
    let ready!: () => void;
    let failed!: (e: Error) => void;
    const p = new Promise<void>((res, rej) => ((ready = res), (failed = rej)));
    p.catch(() => {}); // when Bun.connect itself throws, nobody awaits p
    c.s = await Bun.connect({
      hostname: host,
      port,
      ...(tls ? { tls: { rejectUnauthorized: false } } : {}),
      socket: {
        open: () => {
          if (!tls) ready();
        },
        handshake: () => ready(),
        data: (_s, d) => {
          if (c.onData) return c.onData(d);
          c.buf = c.buf.length ? Buffer.concat([c.buf, d]) : Buffer.from(d);
          c.wake?.();
        },
        drain: () => c.drained?.(),
        close: () => {
          c.closed = true;
          c.wake?.();
        },
        end: () => {
          c.closed = true;
          c.wake?.();
        },
        error: (_s, e) => failed(e),
        connectError: (_s, e) => failed(e),
      },
    });
    c.s.setNoDelay(true);
    await p;
    return c;
  }

  async more(deadline: number) {
    if (this.closed)
      throw new Error(`connection closed; buffered: ${JSON.stringify(this.buf.toString("latin1").slice(0, 300))}`);
    if (Date.now() > deadline) throw new Error("no answer in time");
    await new Promise<void>((r) => {
      this.wake = r;
      setTimeout(r, 100);
    });
  }

  /** One HTTP response (status and body by Content-Length). */
  async response(timeoutMs = 300_000): Promise<{ status: number; head: string; body: string }> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const end = this.buf.indexOf("\r\n\r\n");
      if (end >= 0) {
        const head = this.buf.subarray(0, end).toString("latin1");
        const len = Number(/\r\ncontent-length:\s*(\d+)/i.exec(head)?.[1] ?? 0);
        if (this.buf.length >= end + 4 + len) {
          const body = this.buf.subarray(end + 4, end + 4 + len).toString("utf8");
          this.buf = this.buf.subarray(end + 4 + len);
          return { status: Number(head.slice(9, 12)), head, body };
        }
      }
      await this.more(deadline);
    }
  }

  /** Sends connect_to_vm and reads 102s up to the final answer; throws unless it is a 101. */
  async connectToVm(auth: string, vmId: string): Promise<string[]> {
    this.s.write(
      `GET /qvd/connect_to_vm?id=${vmId}&qvd.client.os=linux&qvd.client.link=lan HTTP/1.1\r\nAuthorization: ${auth}\r\nConnection: Upgrade\r\nUpgrade: QVD/1.0\r\n\r\n`,
    );
    const progress: string[] = [];
    for (;;) {
      const r = await this.response();
      if (r.status === 102) progress.push(/x-qvd-vm-info:\s*(.*)/i.exec(r.head)?.[1] ?? "");
      else if (r.status === 101) return progress;
      else throw new Error(`connect_to_vm answered ${r.status}: ${r.body.trim()}`);
    }
  }

  async write(bytes: Uint8Array) {
    let off = 0;
    while (off < bytes.length) {
      const n = this.s.write(off ? bytes.subarray(off) : bytes);
      off += Math.max(0, n);
      if (off < bytes.length) await new Promise<void>((r) => (this.drained = r));
    }
  }
}

const cmd = (c: string, n: number) => {
  const b = Buffer.alloc(9);
  b[0] = c.charCodeAt(0);
  b.writeBigUInt64BE(BigInt(n), 1);
  return b;
};

async function stream(
  host: string,
  port: number,
  kind: string,
  dir: string,
  amount: number,
  auth?: string,
  vmId?: string,
) {
  const c = await Conn.open(host, port, kind !== "plain");
  if (kind === "l7r") {
    await c.connectToVm(auth!, vmId!);
    await c.write(Buffer.from("NXPROXY-3.5.0-3.5.99 stream=default,data=default ")); // the L7R wants an NX greeting first
  }
  const cipher = kind === "plain" ? undefined : (c.s as any).getCipher?.()?.name;
  // Connected (and upgraded): the bench samples the proxy's CPU time, then says go.
  out({ ready: true });
  await Bun.stdin.stream().getReader().read();
  if (dir === "up") {
    let done!: () => void;
    const acked = new Promise<void>((r) => (done = r));
    c.onData = (d) => d.length && done();
    const t0 = performance.now();
    await c.write(cmd("U", amount));
    for (let sent = 0; sent < amount; sent += CHUNK.length)
      await c.write(amount - sent >= CHUNK.length ? CHUNK : CHUNK.subarray(0, amount - sent));
    await acked;
    out({ bytes: amount, ms: performance.now() - t0, cipher });
  } else if (dir === "down") {
    let got = 0;
    let done!: () => void;
    const all = new Promise<void>((r) => (done = r));
    c.onData = (d) => {
      got += d.length;
      if (got >= amount) done();
    };
    const t0 = performance.now();
    await c.write(cmd("D", amount));
    await all;
    out({ bytes: got, ms: performance.now() - t0, cipher });
  } else {
    // Ping-pong of 64-byte messages, one in flight; the first 200 warm up.
    const msg = Buffer.alloc(64, 0x61);
    let got = 0;
    let wake!: () => void;
    c.onData = (d) => {
      got += d.length;
      if (got >= msg.length) wake();
    };
    await c.write(cmd("P", 0));
    const rtts: number[] = [];
    for (let i = 0; i < amount + 200; i++) {
      got = 0;
      const back = new Promise<void>((r) => (wake = r));
      const t0 = performance.now();
      c.s.write(msg);
      await back;
      if (i >= 200) rtts.push((performance.now() - t0) * 1000);
    }
    out({ rtts_us: rtts, cipher });
  }
  c.s.end();
  process.exit(0);
}

const basic = (login: string, pw: string) => `Basic ${Buffer.from(`${login}:${pw}`).toString("base64")}`;

async function logins(
  port: number,
  conc: number,
  seconds: number,
  how: string,
  prefix: string,
  users: number,
  password: string,
) {
  const lat: number[] = [];
  let errors = 0;
  let firstError = "";
  const fail = (e: unknown) => {
    errors++;
    firstError ||= (e as Error).message;
  };
  const request = (w: number) =>
    `GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: ${basic(`${prefix}${(w % users) + 1}`, password)}\r\nAccept: application/json\r\n\r\n`;
  const ask = async (c: Conn, w: number) => {
    c.s.write(request(w));
    const r = await c.response(60_000);
    if (r.status !== 200) throw new Error(`status ${r.status}: ${r.body.trim()}`);
  };
  // Keep-alive: every connection logs in once before the clock starts; the timed requests reuse
  // the connection's cached authentication.
  const kept: (Conn | undefined)[] = [];
  if (how === "keepalive")
    await Promise.all(
      Array.from({ length: conc }, async (_, w) => {
        const c = await Conn.open("127.0.0.1", port, true);
        await ask(c, w);
        kept[w] = c;
      }),
    );
  out({ ready: true });
  await Bun.stdin.stream().getReader().read();
  const t0 = performance.now();
  const end = t0 + seconds * 1000;
  const worker = async (w: number) => {
    while (performance.now() < end) {
      const s = performance.now();
      let c: Conn | undefined;
      try {
        c = kept[w] ?? (await Conn.open("127.0.0.1", port, true));
        await ask(c, w);
        lat.push(performance.now() - s);
        if (how !== "keepalive") c.s.end();
      } catch (e) {
        fail(e);
        c?.s.end(); // a failed try must not leave its connection open
        kept[w] = undefined;
        await Bun.sleep(50);
      }
    }
    kept[w]?.s.end();
  };
  await Promise.all(Array.from({ length: conc }, (_, i) => worker(i)));
  out({ count: lat.length, seconds: (performance.now() - t0) / 1000, lat_ms: lat, errors, firstError });
  process.exit(0);
}

async function connect(port: number, login: string, password: string, vmId: string) {
  const c = await Conn.open("127.0.0.1", port, true);
  const auth = basic(login, password);
  // As the clients do: list first (this authenticates the connection), then connect.
  c.s.write(`GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: ${auth}\r\n\r\n`);
  const list = await c.response();
  if (list.status !== 200) throw new Error(`list_of_vm answered ${list.status}`);
  const t0 = performance.now();
  const progress = await c.connectToVm(auth, vmId);
  const ms101 = performance.now() - t0;
  // The greeting of nxproxy -S; nxagent answers with its own version.
  c.s.write("NXPROXY-3.5.0-3.5.99 stream=default,data=default ");
  const deadline = Date.now() + 10_000;
  while (!/^NXPROXY-\d/.test(c.buf.toString("latin1")) && !c.closed && Date.now() < deadline)
    await c.more(deadline).catch(() => {});
  const nx = c.buf.toString("latin1");
  out({ ms101, msNx: /^NXPROXY-\d/.test(nx) ? performance.now() - t0 : null, progress });
  c.s.end();
  process.exit(0);
}

async function pings(port: number, seconds: number) {
  const c = await Conn.open("127.0.0.1", port, true);
  out({ ready: true });
  await Bun.stdin.stream().getReader().read();
  const lat: number[] = [];
  let errors = 0;
  const end = performance.now() + seconds * 1000;
  while (performance.now() < end) {
    const t0 = performance.now();
    c.s.write("GET /qvd/ping HTTP/1.1\r\n\r\n");
    const r = await c.response(30_000);
    if (r.status === 200) lat.push(performance.now() - t0);
    else errors++;
    await Bun.sleep(20);
  }
  out({ lat_ms: lat, errors });
  process.exit(0);
}

async function attack(port: number, seconds: number, login: string) {
  out({ ready: true });
  await Bun.stdin.stream().getReader().read();
  let logins = "";
  for (let i = 0; i < 40; i++)
    logins += `GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: ${basic(login, `wrong-${i}`)}\r\n\r\n`;
  const junk = Buffer.from(`GET /qvd/ping HTTP/1.1\r\nX-Junk: ${"j".repeat(200)}\r\n`.repeat(1000));
  const end = performance.now() + seconds * 1000;
  let sent = 0;
  let connections = 0;
  while (performance.now() < end) {
    const c = await Conn.open("127.0.0.1", port, true);
    connections++;
    c.onData = () => {}; // answers are not read
    c.s.write(logins);
    while (!c.closed && performance.now() < end) {
      const n = Math.max(0, c.s.write(junk));
      sent += n;
      if (n < junk.length) await Promise.race([new Promise<void>((r) => (c.drained = r)), Bun.sleep(50)]);
    }
    c.s.end();
  }
  out({ sent, connections });
  process.exit(0);
}

try {
  if (mode === "sink") await sink(args[0]!, args[1]!);
  else if (mode === "stream")
    await stream(args[0]!, Number(args[1]), args[2]!, args[3]!, Number(args[4]), args[5], args[6]);
  else if (mode === "logins")
    await logins(Number(args[0]), Number(args[1]), Number(args[2]), args[3]!, args[4]!, Number(args[5]), args[6]!);
  else if (mode === "connect") await connect(Number(args[0]), args[1]!, args[2]!, args[3]!);
  else if (mode === "pings") await pings(Number(args[0]), Number(args[1]));
  else if (mode === "attack") await attack(Number(args[0]), Number(args[1]), args[2]!);
  else throw new Error(`unknown mode ${mode}`);
} catch (e) {
  console.error(`l7r-peer ${mode}: ${(e as Error).message}`);
  process.exit(1);
}
