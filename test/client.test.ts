// `qvd client` against a scripted L7R: a TLS server in this file that speaks the server side
// of the wire protocol as docs/PROTOCOL.md describes it (bare-LF 102s, a 101 followed in the same
// packet by the first NX bytes, then raw bytes both ways). The client runs as a real process;
// the program it starts instead of nxproxy (--nxproxy-command) is a small real program that
// connects to the client's local port like nxproxy -S does, and checks the bytes.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import type { Socket, TCPSocketListener } from "bun";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import net from "node:net";
import { waitFor } from "./support/wait.ts";
import { freeDisplay } from "./support/free.ts";
import { capture, stopAll } from "./support/spawn.ts";
import { selfSignedCert } from "./support/tls.ts";

const dir = mkdtempSync(join(tmpdir(), "qvd-client-test-"));
const cert = join(dir, "cert.pem");
const key = join(dir, "key.pem");
const otherCert = join(dir, "other.pem");

const USER = "alice@acme";
const PASSWORD = "s3cr:et";
const FIRST = "NX-FIRST-BYTES-AFTER-101\u0000\u0001\u00ff";
const PAYLOAD_SIZE = 1 << 20;

interface Recorded {
  requests: { line: string; headers: string[] }[];
  /** Raw bytes received after the 101. */
  up: number;
  upOk: boolean;
}

/** connect: "ok" echoes after the 101; "relay" relays to nxagent at relayPort; "503" fails. */
type Script = { vms: unknown[]; connect?: "ok" | "503" | "relay"; relayPort?: number; flood?: number };

interface Conn {
  buf: Buffer;
  raw: boolean;
  out: Buffer[];
  rec: Recorded;
  script: Script;
  expectUp: number;
  relay?: net.Socket;
}

function write(s: Socket<Conn>, data: Buffer): void {
  const c = s.data;
  if (c.out.length) return void c.out.push(data);
  const n = s.write(data);
  if (n < data.length) c.out.push(data.subarray(Math.max(n, 0)));
}

function flush(s: Socket<Conn>): void {
  const c = s.data;
  while (c.out.length) {
    const d = c.out[0]!;
    const n = s.write(d);
    if (n < d.length) {
      c.out[0] = d.subarray(Math.max(n, 0));
      return;
    }
    c.out.shift();
  }
}

function pattern(n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 7) % 251;
  return b;
}

const respond = (status: string, headers: string[], body = "", eol = "\r\n") =>
  Buffer.from(
    `HTTP/1.1 ${status}${eol}${headers.map((h) => h + eol).join("")}${body ? `Content-Length: ${Buffer.byteLength(body)}${eol}` : ""}${eol}${body}`,
  );

function handleRequest(s: Socket<Conn>, head: string): void {
  const c = s.data;
  const lines = head.split(/\r?\n/).filter(Boolean);
  const line = lines[0]!;
  c.rec.requests.push({ line, headers: lines.slice(1) });
  const auth = lines.find((l) => l.startsWith("Authorization: "));
  const good = `Authorization: Basic ${Buffer.from(`${USER}:${PASSWORD}`).toString("base64")}`;
  if (auth !== good) {
    return write(
      s,
      respond(
        "401 Unauthorized",
        ['WWW-Authenticate: Basic realm="QVD"', "Content-Type: text/plain"],
        "The request requires user authentication.\r\nLong text.\r\n",
      ),
    );
  }
  const path = line.split(" ")[1]!;
  if (path.startsWith("/qvd/list_of_vm")) {
    return write(s, respond("200 OK", ["Content-Type: application/json"], JSON.stringify(c.script.vms, null, 3)));
  }
  if (path.startsWith("/qvd/stop_vm")) {
    write(s, respond("102 Processing", ["X-QVD-VM-Info: Stopping virtual machine"], "", "\n"));
    return write(s, respond("200 OK", ["Content-Type: text/plain"], "Machine stopped\r\n"));
  }
  if (path.startsWith("/qvd/connect_to_vm")) {
    const id = new URL(path, "http://x").searchParams.get("id");
    if (!c.script.vms.some((v) => String((v as { id: number }).id) === id)) {
      return write(
        s,
        respond("404 Not Found", ["Content-Type: text/plain"], "The requested virtual machine does not exist"),
      );
    }
    // Bare LF, as the Qt client writes them; a reimplemented server may do the same.
    let out = respond("102 Processing", [`X-QVD-VM-Info: Session acquired for VM_ID: ${id}`], "", "\n");
    out = Buffer.concat([out, respond("102 Processing", ["X-QVD-VM-Info: Starting virtual machine"])]);
    if (c.script.connect === "503") {
      out = Buffer.concat([
        out,
        respond(
          "503 Service Unavailable",
          ["Content-Type: text/plain"],
          `The requested virtual machine is not available: VM didn't reach state 'running'. Timeout, retry later.`,
        ),
      ]);
      return write(s, out);
    }
    if (c.script.connect === "relay") {
      // As the L7R does: connect to nxagent, then 101, then shuttle bytes.
      write(s, out);
      const relay = net.connect(c.script.relayPort!, "127.0.0.1", () => {
        c.relay = relay;
        c.raw = true;
        write(s, respond("101 Switching Protocols", [`X-QVD-Slave-Key: ${"k".repeat(64)}`]));
      });
      relay.on("data", (d: Buffer) => write(s, d));
      relay.on("close", () => s.end());
      relay.on("error", () => s.end());
      return;
    }
    out = Buffer.concat([
      out,
      respond("102 Processing", ["X-QVD-VM-Info: Connection established"]),
      respond("101 Switching Protocols", [`X-QVD-Slave-Key: ${"k".repeat(64)}`]),
      Buffer.from(FIRST, "latin1"),
    ]);
    c.raw = true;
    write(s, out); // one write: the first NX bytes travel with the 101
    if (c.script.flood) write(s, pattern(c.script.flood));
    return;
  }
  write(s, respond("404 Not Found", ["Content-Type: text/plain"], "Not found"));
}

let server: TCPSocketListener<Conn>;
let plainServer: TCPSocketListener<Conn>;
const script: Script = { vms: [] };
let last: Recorded;
let lastConn: Conn | undefined;

function startServer(tls = true): TCPSocketListener<Conn> {
  return Bun.listen<Conn>({
    hostname: "127.0.0.1",
    port: 0,
    tls: tls ? { cert: Bun.file(cert), key: Bun.file(key) } : undefined,
    socket: {
      open(s) {
        last = { requests: [], up: 0, upOk: true };
        s.data = lastConn = { buf: Buffer.alloc(0), raw: false, out: [], rec: last, script, expectUp: PAYLOAD_SIZE };
      },
      data(s, d) {
        const c = s.data;
        if (c.relay) return void c.relay.write(Buffer.from(d));
        if (c.raw) {
          // Echo, and check the payload pattern of the fake nxproxy.
          for (let i = 0; i < d.length; i++) if (d[i] !== ((c.rec.up + i) * 7) % 251) c.rec.upOk = false;
          c.rec.up += d.length;
          return write(s, Buffer.from(d));
        }
        c.buf = Buffer.concat([c.buf, d]);
        for (;;) {
          const m = /\r?\n\r?\n/.exec(c.buf.toString("latin1"));
          if (!m) return;
          const head = c.buf.subarray(0, m.index).toString("latin1");
          c.buf = c.buf.subarray(m.index + m[0].length);
          handleRequest(s, head);
          if (c.raw || (c.script.connect === "relay" && c.rec.requests.at(-1)?.line.includes("connect_to_vm"))) return;
        }
      },
      drain: flush,
      end(s) {
        if (s.data?.relay) s.data.relay.end();
        else s.end();
      },
      close(s) {
        s.data?.relay?.destroy();
      },
    },
  });
}

const fake = join(dir, "fake-nxproxy.ts");
writeFileSync(
  fake,
  `
import net from "node:net";
const d = Number(process.argv.at(-1)!.split(":")[1]);
if (!process.argv.includes("-S") || !(d > 0)) { console.error("bad args", process.argv.slice(2)); process.exit(9); }
const first = Buffer.from(process.env.FAKE_FIRST!, "hex");
const size = Number(process.env.FAKE_SIZE);
const pattern = (n: number) => { const b = Buffer.alloc(n); for (let i = 0; i < n; i++) b[i] = (i * 7) % 251; return b; };
const payload = pattern(size);
// What comes back: the echo of the payload, or FAKE_EXPECT bytes of the pattern (a flood).
const want = Buffer.concat([first, pattern(Number(process.env.FAKE_EXPECT ?? size))]);
let got = 0, ok = true;
const s = net.connect(4000 + d, "127.0.0.1", () => {
  s.write(payload);
  // A slow reader: nothing is read for a while, so the client must hold the server back.
  const delay = Number(process.env.FAKE_DELAY ?? 0);
  if (delay) { s.pause(); setTimeout(() => s.resume(), delay); }
});
s.on("data", (c) => {
  for (let i = 0; i < c.length; i++) if (c[i] !== want[got + i]) ok = false;
  got += c.length;
  if (got >= want.length) s.end();
});
s.on("close", () => { console.error("fake: got", got, "ok", ok); process.exit(ok && got === want.length ? 0 : 1); });
s.on("error", (e) => { console.error("fake:", e.message); process.exit(3); });
`,
);

async function client(args: string[], env: Record<string, string> = {}) {
  return capture([process.execPath, "src/main.ts", "client", ...args], {
    env: {
      PATH: process.env.PATH!,
      HOME: dir,
      QVD_PASSWORD: PASSWORD,
      FAKE_FIRST: Buffer.from(FIRST, "latin1").toString("hex"),
      FAKE_SIZE: String(PAYLOAD_SIZE),
      ...env,
    },
  });
}

// This machine's printing and sound are test/client-services.test.ts's subject: not asked for here.
const QUIET = ["--no-printing", "--no-audio"];
const base = () => [
  "--host",
  "127.0.0.1",
  "--port",
  String(server.port),
  "--user",
  USER,
  "--nxproxy-command",
  `${process.execPath} ${fake}`,
  ...QUIET,
];
const VMS = [
  { id: 10, name: "alice-1", state: "stopped", blocked: 0, is_application: 0 },
  { id: 11, name: "alice-2", state: "running", blocked: "0", is_application: null },
];

beforeAll(async () => {
  // Two unrelated certificates for the same names: the L7R's, and one that is not its.
  const san = "DNS:localhost,IP:127.0.0.1";
  await selfSignedCert(dir, { san });
  await selfSignedCert(dir, { san, names: ["other.pem", "other.key"] });
  server = startServer();
  plainServer = startServer(false);
});

afterAll(() => {
  server?.stop(true);
  plainServer?.stop(true);
  rmSync(dir, { recursive: true, force: true });
});

describe("qvd client against a scripted L7R", () => {
  test("lists, connects, prints progress, splices 1 MiB each way; the bytes after the 101 come first", async () => {
    script.vms = VMS;
    script.connect = "ok";
    const r = await client([
      ...base(),
      "--ca",
      cert,
      "--vm",
      "11",
      "--geometry",
      "800x600",
      "--link",
      "lan",
      "--fullscreen",
      "--keyboard",
      "pc105/es",
    ]);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    expect(r.stdout).toContain("Session acquired for VM_ID: 11\nStarting virtual machine\nConnection established\n");
    expect(r.stdout).toMatch(/nxproxy on display localhost:\d+/);
    const [list, connect] = last.requests;
    expect(list!.line).toBe("GET /qvd/list_of_vm HTTP/1.1");
    expect(list!.headers).toContain(`Authorization: Basic ${Buffer.from(`${USER}:${PASSWORD}`).toString("base64")}`);
    expect(connect!.line).toBe(
      "GET /qvd/connect_to_vm?id=11&qvd.client.os=linux&qvd.client.keyboard=pc105%2Fes&qvd.client.link=lan&qvd.client.geometry=800x600" +
        "&qvd.client.fullscreen=1&qvd.client.printing.enabled=0&qvd.client.audio.enabled=0&qvd.client.type=qvd-bun HTTP/1.1",
    );
    expect(connect!.headers).toContain("Connection: Upgrade");
    expect(connect!.headers).toContain("Upgrade: QVD/1.0");
    expect(last.up).toBe(PAYLOAD_SIZE);
    expect(last.upOk).toBe(true);
  });

  test("backpressure: 32 MiB from the server to an nxproxy that does not read for a while arrive complete and in order", async () => {
    script.vms = [VMS[0]];
    script.flood = 32 << 20;
    try {
      const run = client([...base(), "--ca", cert], {
        FAKE_SIZE: "0",
        FAKE_EXPECT: String(32 << 20),
        FAKE_DELAY: "2000",
      });
      // While nxproxy does not read, the client stops reading too: most of the flood is still
      // queued at the server (the kernel's socket buffers hold a few MiB at most). A check that
      // the queue stays: 1.2 s into nxproxy's 2 s pause it must not have drained.
      await Bun.sleep(1200);
      const queued = lastConn!.out.reduce((n, b) => n + b.length, 0);
      expect(queued).toBeGreaterThan(12 << 20);
      const r = await run;
      expect(r.stderr).toBe("");
      expect(r.code).toBe(0);
    } finally {
      script.flood = undefined;
    }
  });

  test("--no-tls: plain TCP (l7r.use_ssl=0)", async () => {
    script.vms = [VMS[0]];
    const r = await client([
      "--host",
      `127.0.0.1:${plainServer.port}`,
      "--user",
      USER,
      "--no-tls",
      "--nxproxy-command",
      `${process.execPath} ${fake}`,
      ...QUIET,
    ]);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    expect(last.up).toBe(PAYLOAD_SIZE);
  });

  test("--stop stops the desktop first on the same connection; a single desktop needs no --vm; password from a file", async () => {
    script.vms = [VMS[0]];
    const pw = join(dir, "pw");
    writeFileSync(pw, `${PASSWORD}\n`);
    const r = await client([...base(), "--ca", cert, "--stop", "--password-file", pw], { QVD_PASSWORD: "" });
    expect(r.code).toBe(0);
    expect(last.requests.map((q) => q.line.split("?")[0])).toEqual([
      "GET /qvd/list_of_vm HTTP/1.1",
      "GET /qvd/stop_vm",
      "GET /qvd/connect_to_vm",
    ]);
    expect(last.requests[1]!.line).toBe("GET /qvd/stop_vm?id=10 HTTP/1.1");
    expect(r.stdout).toContain("Stopping virtual machine\n");
  });

  test("several desktops, no --vm, no terminal: a clear error listing them (exit 2)", async () => {
    script.vms = VMS;
    const r = await client([...base(), "--ca", cert]);
    expect(r.code).toBe(2);
    expect(r.stderr).toBe(
      "qvd: alice@acme has 2 desktops, choose one with --vm ID: 10 alice-1 (stopped), 11 alice-2 (running)\n",
    );
  });

  test("an unknown --vm: exit 5", async () => {
    script.vms = VMS;
    const r = await client([...base(), "--ca", cert, "--vm", "99"]);
    expect(r.code).toBe(5);
    expect(r.stderr).toStartWith("qvd: no desktop 99 for alice@acme on 127.0.0.1:");
  });

  test.skipIf(!Bun.which("script"))(
    "on a terminal: the password is prompted without echo, the desktop chosen from a numbered list",
    async () => {
      script.vms = VMS;
      const cmd = [process.execPath, "src/main.ts", "client", ...base(), "--ca", cert].map((a) => `'${a}'`).join(" ");
      const p = Bun.spawn(["script", "-qfec", cmd, "/dev/null"], {
        env: {
          PATH: process.env.PATH!,
          HOME: dir,
          FAKE_FIRST: Buffer.from(FIRST, "latin1").toString("hex"),
          FAKE_SIZE: "1000",
          TERM: "dumb",
        },
        stdin: "pipe",
        stdout: "pipe",
        stderr: "pipe",
      });
      let out = "";
      void (async () => {
        const r = p.stdout.getReader();
        for (;;) {
          const { done, value } = await r.read();
          if (done) break;
          out += new TextDecoder().decode(value);
        }
      })();
      await waitFor(`the password prompt (${out})`, () =>
        out.includes("Password for alice@acme@127.0.0.1: ") ? true : undefined,
      );
      p.stdin.write(`${PASSWORD}\r`);
      p.stdin.flush();
      await waitFor(`the choice (${out})`, () => (out.includes("Connect to which one [1-2]? ") ? true : undefined));
      p.stdin.write("2\r");
      p.stdin.flush();
      expect(await p.exited).toBe(0);
      expect(out).not.toContain(PASSWORD);
      expect(out).toContain("  1) 10 alice-1 (stopped)");
      expect(out).toContain("  2) 11 alice-2 (running)");
      expect(last.requests[1]!.line).toStartWith("GET /qvd/connect_to_vm?id=11&");
    },
  );

  test("a blocked desktop: exit 4", async () => {
    script.vms = [{ id: 12, name: "alice-3", state: "running", blocked: "1", is_application: 0 }];
    const r = await client([...base(), "--ca", cert, "--vm", "alice-3"]);
    expect(r.code).toBe(4);
    expect(r.stderr).toBe("qvd: desktop 12 alice-3 (running, blocked) is blocked (under maintenance)\n");
    expect(last.requests.length).toBe(1);
  });

  test("a wrong password: exit 3", async () => {
    const r = await client([...base(), "--ca", cert], { QVD_PASSWORD: "wrong" });
    expect(r.code).toBe(3);
    expect(r.stderr).toMatch(
      /^qvd: 127\.0\.0\.1:\d+ refused the login \(wrong user name or password, or the account is blocked\)\n$/,
    );
  });

  test("the server cannot start the desktop (503): exit 6 with the server's reason; --insecure warns", async () => {
    script.vms = [VMS[0]];
    script.connect = "503";
    const r = await client([...base(), "--insecure"]);
    script.connect = "ok";
    expect(r.code).toBe(6);
    expect(r.stdout).toContain("Starting virtual machine\n");
    expect(r.stderr).toContain("qvd: warning: --insecure");
    expect(r.stderr).toContain(
      "could not start desktop 10: 503 Service Unavailable: The requested virtual machine is not available: VM didn't reach state 'running'. Timeout, retry later.\n",
    );
  });

  test("an untrusted certificate without --ca: exit 7 with a hint; another --ca: exit 7", async () => {
    let r = await client(base());
    expect(r.code).toBe(7);
    expect(r.stderr).toMatch(
      /^qvd: cannot reach the server 127\.0\.0\.1:\d+: its certificate is not trusted \(.+\); trust its CA with --ca FILE, or use --insecure/,
    );
    r = await client([...base(), "--ca", otherCert]);
    expect(r.code).toBe(7);
    expect(r.stderr).toContain("not signed by the --ca given");
  });

  test("an unreachable server: exit 7", async () => {
    const l = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
    const port = l.port;
    l.stop(true);
    const r = await client(["--host", `127.0.0.1:${port}`, "--user", USER, "--nxproxy-command", "true"]);
    expect(r.code).toBe(7);
    expect(r.stderr).toStartWith(`qvd: cannot reach the server 127.0.0.1:${port}: `);
    expect(r.stderr.split("\n").length).toBe(2);
  });

  test("nxproxy cannot be started: exit 1", async () => {
    script.vms = [VMS[0]];
    const r = await client([
      "--host",
      `127.0.0.1:${server.port}`,
      "--user",
      USER,
      "--ca",
      cert,
      "--nxproxy-command",
      join(dir, "no-such-nxproxy"),
      ...QUIET,
    ]);
    expect(r.code).toBe(1);
    expect(r.stderr).toStartWith(`qvd: cannot start ${join(dir, "no-such-nxproxy")} (is nxproxy installed?): `);
    expect(r.stderr.split("\n").length).toBe(2);
  });

  test("usage errors: exit 2", async () => {
    const r = await client([...base(), "--geometry", "big"]);
    expect(r.code).toBe(2);
    expect(r.stderr).toBe("qvd: --geometry big: expected WIDTHxHEIGHT, e.g. 1024x768\n");
  });
});

// The real thing on the client side: nxproxy -S against the client's local port, drawing on a
// test Xvfb; the scripted server relays to a real nxagent on loopback, as the L7R does.
const haveNx = ["nxproxy", "nxagent", "Xvfb", "xsetroot", "xwd", "convert"].every((p) => Bun.which(p));

async function pixel(display: number, x: number, y: number): Promise<string> {
  const sh = `xwd -root -silent -display :${display} | convert xwd:- -format '%[pixel:p{${x},${y}}]' info:-`;
  const p = Bun.spawn(["sh", "-c", sh], { stdout: "pipe", stderr: "pipe" });
  const [o] = await Promise.all([new Response(p.stdout).text(), p.exited]);
  return o.trim();
}

describe.skipIf(!haveNx)("qvd client with a real nxproxy and nxagent", () => {
  const procs: Bun.Subprocess[] = [];
  afterAll(() => stopAll(procs));

  async function startAgent(from: number) {
    const nd = freeDisplay(from);
    const a = { nd, log: "", proc: undefined as unknown as Bun.Subprocess<"ignore", "ignore", "pipe"> };
    const agent = (a.proc = Bun.spawn(
      [
        "nxagent",
        `:${nd}`,
        "-ac",
        "-name",
        "QVD",
        "-nolisten",
        "tcp",
        "-display",
        `nx/nx,link=lan,geometry=800x600,client=linux,tolerancechecks=risky:${nd}`,
      ],
      { stdout: "ignore", stderr: "pipe", env: { ...process.env, DISPLAY: "" } },
    ));
    procs.push(agent);
    void (async () => {
      const r = agent.stderr.getReader();
      for (;;) {
        const { done, value } = await r.read();
        if (done) break;
        a.log += new TextDecoder().decode(value);
      }
    })();
    await waitFor(`nxagent waiting (${a.log})`, () => (/Waiting for connection/.test(a.log) ? true : undefined));
    return a;
  }

  test("the desktop's pixels arrive on the client's X display; the session ends when nxagent goes", async () => {
    const xd = freeDisplay(67);
    const xvfb = Bun.spawn(["Xvfb", `:${xd}`, "-screen", "0", "1024x768x24", "-nolisten", "tcp", "-noreset"], {
      stdout: "ignore",
      stderr: "ignore",
    });
    procs.push(xvfb);
    await waitFor("Xvfb", () => existsSync(`/tmp/.X11-unix/X${xd}`) || undefined);
    const ag = await startAgent(Math.max(xd + 1, 120));
    const nd = ag.nd;
    const agent = ag.proc;

    script.vms = [VMS[1]];
    script.connect = "relay";
    script.relayPort = 4000 + nd;
    const p = Bun.spawn(
      [
        process.execPath,
        "src/main.ts",
        "client",
        "--host",
        "127.0.0.1",
        "--port",
        String(server.port),
        "--user",
        USER,
        "--ca",
        cert,
        "--link",
        "lan",
        "--geometry",
        "800x600",
        ...QUIET,
      ],
      {
        env: { PATH: process.env.PATH!, HOME: dir, QVD_PASSWORD: PASSWORD, DISPLAY: `:${xd}` },
        stdin: "ignore",
        stdout: "pipe",
        stderr: "pipe",
      },
    );
    procs.push(p);
    const out = new Response(p.stdout).text();
    const err = new Response(p.stderr).text();
    try {
      await waitFor(
        `the session (agent: ${ag.log.split("\n").slice(-5).join(" / ")})`,
        () => (/Session: Session (started|resumed)/.test(ag.log) ? true : undefined),
        20_000,
      );
      const xs = Bun.spawn(["xsetroot", "-display", `:${nd}`, "-solid", "#ff0000"], { stderr: "ignore" });
      expect(await xs.exited).toBe(0);
      expect(
        await waitFor(
          "red pixels on the client's Xvfb",
          async () => ((await pixel(xd, 100, 100)) === "srgb(255,0,0)" ? true : undefined),
          15_000,
          300,
        ),
      ).toBe(true);
      // The desktop goes away: the client ends with the session.
      agent.kill("SIGTERM");
      const code = await Promise.race([p.exited, Bun.sleep(20_000).then(() => "timeout")]);
      expect({ code, err: await Promise.race([err, Bun.sleep(100).then(() => "")]) }).toEqual({ code: 0, err: "" });
      expect(await out).toContain("Session ended\n");
    } finally {
      script.connect = "ok";
    }
  }, 60_000);

  test("no X server at $DISPLAY: exit 1 with nxproxy's reason", async () => {
    const ag = await startAgent(130);
    script.vms = [VMS[1]];
    script.connect = "relay";
    script.relayPort = 4000 + ag.nd;
    try {
      const xd = freeDisplay(ag.nd + 1);
      const r = await client(
        ["--host", "127.0.0.1", "--port", String(server.port), "--user", USER, "--ca", cert, ...QUIET],
        { DISPLAY: `:${xd}` },
      );
      expect(r.code).toBe(1);
      expect(r.stderr).toStartWith(
        `qvd: the NX session failed: cannot open the X display :${xd} (DISPLAY): Connection to ':${xd}' failed.`,
      );
      expect(r.stderr.split("\n").length).toBe(2);
    } finally {
      script.connect = "ok";
    }
  }, 60_000);

  test("nxproxy fails (the other end is not an NX agent): exit 1 with nxproxy's reason", async () => {
    script.vms = [VMS[0]];
    const r = await client(
      ["--host", "127.0.0.1", "--port", String(server.port), "--user", USER, "--ca", cert, ...QUIET],
      { DISPLAY: ":1" },
    );
    expect(r.code).toBe(1);
    expect(r.stderr).toBe("qvd: the NX session failed: Wrong version or invalid session authentication cookie.\n");
  }, 60_000);
});
