// L7R benchmark (issue 5). Prints, on this machine:
//   1. splice throughput (MB/s, each direction) and ping-pong round trips through
//      - a direct TCP connection to a sink, and a direct TLS connection to a TLS sink (the TLS ceiling);
//      - haproxy as a TLS-terminating TCP proxy (same certificate) in front of the sink;
//      - the real `qvd l7r` (compiled binary): connect_to_vm → 101 → the splice of src/nx/splice.ts.
//      Stand-in VMA: the L7R asks a small HTTP responder (x_start, x_state "listening") and then
//      connects to the sink as if it were nxagent, so these rows measure the splice only.
//   2. logins per second (Basic auth, argon2id verification) from 50 concurrent clients, on new
//      TLS connections and, for comparison, on keep-alive connections (auth cached per connection).
//   2b. an attack: one TLS connection with 40 pipelined bad logins and then junk as fast as the L7R
//      takes it (again whenever the L7R closes it): the L7R's RSS peak, and the /qvd/ping latency
//      of a bystander (another process) during the attack and without it.
//   3. connect_to_vm → 101 through a real `qvd node` in a network namespace with the real desktop
//      image: a running desktop whose X session is stopped, one whose session is suspended (left
//      by a real `qvd client` + nxproxy on an Xvfb of ours), and a stopped desktop.
// Every client, sink and proxy is a process of its own (bench/l7r-peer.ts). Prints figures;
// asserts nothing. Run as root:
//   bun bench/l7r.ts [--mib 1024] [--rounds 5] [--pings 5000] [--login-seconds 15] [--connects 5]
//                    [--attack-seconds 10] [--skip-splice] [--skip-logins] [--skip-attack] [--skip-node]
import { appendFileSync, chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { cpus, loadavg } from "node:os";
import { join } from "node:path";
import * as D from "../src/db/index.ts";
import { LocalCluster } from "../src/db/local-cluster.ts";
import { connect, type Sql } from "../src/db/pool.ts";
import { hashPassword, initDatabase } from "../src/db/schema.ts";
import { setLogLevel } from "../src/log.ts";
import { run } from "../src/run.ts";
import { ensureDeps } from "../scripts/deps.ts";
import { cleanEnv, desktopImage, farmCert, qvdBinary, removeQvdBinary, TestNode } from "../test/support/node.ts";
import { selfSignedCert } from "../test/support/tls.ts";
import { cleaningUp, cleanup, cleanups, untrack } from "./cleanups.ts";

setLogLevel("warn");
const opt = (name: string, dflt: number) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) || dflt : dflt;
};
const MIB = opt("mib", 1024);
const ROUNDS = opt("rounds", 5);
const PINGS = opt("pings", 5000);
const LOGIN_S = opt("login-seconds", 15);
const CONNECTS = opt("connects", 5);
const SKIP_NODE = process.argv.includes("--skip-node");
const SKIP_LOGINS = process.argv.includes("--skip-logins");
const SKIP_SPLICE = process.argv.includes("--skip-splice");
const SKIP_ATTACK = process.argv.includes("--skip-attack");
const ATTACK_S = opt("attack-seconds", 10);
const CONCURRENCY = 50;
const ALL = D.ALL_TENANTS;
const BUN = process.execPath;
const PEER = join(import.meta.dir, "l7r-peer.ts");

/** Spawns a process that is killed (by its PID) at cleanup if still running. */
function spawn(argv: string[], logFile?: string, stdout: "pipe" | "ignore" = "pipe") {
  if (cleaningUp()) throw new Error("interrupted");
  const p = Bun.spawn(argv, { stdin: "pipe", stdout, stderr: "pipe", env: cleanEnv() });
  const stop = async () => {
    if (p.exitCode !== null || p.signalCode) return;
    p.kill("SIGTERM");
    if (await Promise.race([p.exited.then(() => true), Bun.sleep(5000).then(() => false)])) return;
    p.kill("SIGKILL");
    await p.exited;
  };
  cleanups.push(stop);
  if (logFile)
    void (async () => {
      const r = (p.stderr as ReadableStream<Uint8Array>).getReader();
      for (let c = await r.read(); !c.done; c = await r.read()) appendFileSync(logFile, c.value);
    })();
  return { p, stop };
}

/** Reads stdout lines until `match` returns something (or the process exits). */
async function waitLine<T>(p: Bun.Subprocess, match: (line: string) => T | undefined, what: string): Promise<T> {
  const reader = (p.stdout as ReadableStream<Uint8Array>).getReader();
  const dec = new TextDecoder();
  let text = "";
  const timer = setTimeout(() => p.kill("SIGTERM"), 60_000);
  try {
    for (;;) {
      const c = await reader.read();
      if (c.done) throw new Error(`${what}: exited before it was ready`);
      text += dec.decode(c.value, { stream: true });
      let nl;
      while ((nl = text.indexOf("\n")) >= 0) {
        const line = text.slice(0, nl);
        text = text.slice(nl + 1);
        const r = match(line);
        if (r !== undefined) return r;
      }
    }
  } finally {
    clearTimeout(timer);
    reader.releaseLock();
  }
}

/** Runs a one-shot peer to its end; returns its JSON result. */
async function peer<T>(argv: string[], timeoutMs = 600_000): Promise<T> {
  const { p, stop } = spawn(argv);
  const timer = setTimeout(() => void stop(), timeoutMs);
  const [stdout, stderr] = await Promise.all([
    new Response(p.stdout as ReadableStream).text(),
    new Response(p.stderr as ReadableStream).text(),
    p.exited,
  ]);
  clearTimeout(timer);
  untrack(stop);
  if (p.exitCode !== 0) throw new Error(stderr.trim() || `peer exited with ${p.exitCode ?? p.signalCode}`);
  return JSON.parse(stdout.trim().split("\n").pop()!) as T;
}

/** CPU time (user + system, all threads) a process has used, in ms. */
const CLK_TCK = Number((await run(["getconf", "CLK_TCK"])).stdout.trim()) || 100;
const cpuMs = (pid: number) => {
  const f = readFileSync(`/proc/${pid}/stat`, "utf8")
    .slice(readFileSync(`/proc/${pid}/stat`, "utf8").lastIndexOf(")") + 2)
    .split(" ");
  return ((Number(f[11]) + Number(f[12])) * 1000) / CLK_TCK;
};

/**
 * Runs a peer that prints {"ready":true} when set up and starts on a line on stdin; returns its
 * JSON result and the CPU ms process `pid` used between the start and the result.
 */
/** Reads a peer's stdout one JSON line at a time; `ended` says why when it ends first. */
function jsonLines(p: Bun.Subprocess, ended: () => Promise<string>): () => Promise<any> {
  const reader = (p.stdout as ReadableStream<Uint8Array>).getReader();
  const dec = new TextDecoder();
  let buf = "";
  return async () => {
    for (;;) {
      const nl = buf.indexOf("\n");
      if (nl >= 0) {
        const l = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        return JSON.parse(l);
      }
      const c = await reader.read();
      if (c.done) throw new Error(await ended());
      buf += dec.decode(c.value, { stream: true });
    }
  };
}

async function measured(argv: string[], pid: number | undefined, what: string): Promise<any> {
  const { p, stop } = spawn(argv);
  const timer = setTimeout(() => void stop(), 600_000);
  const errText = new Response(p.stderr as ReadableStream).text();
  try {
    const line = jsonLines(p, async () => `${what}: ${(await errText).trim() || "the client exited"}`);
    await line(); // ready
    const c0 = pid ? cpuMs(pid) : 0;
    const stdin = p.stdin as import("bun").FileSink;
    stdin.write("go\n");
    stdin.flush();
    const r = await line();
    await p.exited;
    return { ...r, cpu: pid ? cpuMs(pid) - c0 : undefined };
  } finally {
    clearTimeout(timer);
    untrack(stop);
    await stop();
  }
}

const freePort = () => {
  const l = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
  const port = l.port;
  l.stop(true);
  return port;
};
const sorted = (xs: number[]) => [...xs].sort((a, b) => a - b);
const q = (xs: number[], p: number) => sorted(xs)[Math.min(xs.length - 1, Math.floor(p * xs.length))]!;
const poll = async (pred: () => Promise<boolean>, what: string, ms = 60_000) => {
  const end = Date.now() + ms;
  while (!(await pred())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(20);
  }
};
const med = (xs: number[]) => q(xs, 0.5);
const pad = (s: string, n: number) => s.padEnd(n);
const lpad = (s: string, n: number) => s.padStart(n);

// --- setup --------------------------------------------------------------------------------------
const dir = mkdtempSync("/tmp/qvd-bench-l7r-");
chmodSync(dir, 0o755);
cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
const cert = join(dir, "cert.pem");
const key = join(dir, "key.pem");
let sql: Sql | undefined;

try {
  console.log(
    `L7R benchmark — ${cpus().length} cores (${cpus()[0]?.model.trim()}), load average ${loadavg()
      .map((l) => l.toFixed(2))
      .join(" ")} at start`,
  );
  await ensureDeps(["haproxy"], () => {});
  await selfSignedCert(dir);
  writeFileSync(join(dir, "haproxy.pem"), readFileSync(cert, "utf8") + readFileSync(key, "utf8"));

  const cluster = new LocalCluster({
    dir: join(dir, "pg"),
    noSync: true,
    settings: { fsync: "off", synchronous_commit: "off" },
  });
  await cluster.init();
  await cluster.start();
  cleanups.push(() => cluster.stop("immediate"));
  await cluster.createDatabase("bench");
  const url = cluster.url("bench");
  sql = connect(url, { max: 4 });
  const db = sql;
  cleanups.push(() => db.end({ timeout: 5 }));
  await initDatabase(db, { adminPassword: "bench-admin-pw" });

  cleanups.push(() => removeQvdBinary());
  const binary = await qvdBinary();

  // The sink and the stand-in VMA.
  const sinkProc = spawn([BUN, PEER, "sink", cert, key], join(dir, "sink.log"));
  const ports = await waitLine(
    sinkProc.p,
    (l) => (l.startsWith("{") ? (JSON.parse(l) as { sink: number; tlsSink: number; vma: number }) : undefined),
    "the sink",
  );

  // The L7R's database: its node, a user with a desktop "running" at the sink, and the login users.
  const host = await D.create(db, D.hosts, ALL, { name: "bench-l7r", address: "127.0.0.1" });
  await db`UPDATE host_runtimes SET state = 'running', ok_ts = now() WHERE host_id = ${host.id}`;
  const owner = await D.create(db, D.users, ALL, { tenant_id: 1, name: "bench", password: "bench-pw-1" });
  const osf = await D.create(db, D.osfs, ALL, { tenant_id: 1, name: "sink", memory_mb: 128 });
  const vm = await D.createVm(db, ALL, { user_id: owner.id, osf_id: osf.id, name: "sink" }, { range: "198.18.0.0/16" });
  await db`UPDATE vm_runtimes SET vm_state = 'running', host_id = ${host.id}, vm_address = '127.0.0.1',
      vma_port = ${ports.vma}, x_port = ${ports.sink}, vma_secret = 'bench-secret' WHERE vm_id = ${vm.id}`;
  const loginHash = await hashPassword("login-pw-1");
  for (let i = 1; i <= CONCURRENCY; i++)
    await db`INSERT INTO users (tenant_id, name, password_hash) VALUES (1, ${`login${i}`}, ${await hashPassword("login-pw-1")})`;

  const l7rPort = freePort();
  const l7rLog = join(dir, "l7r.log");
  const l7r = spawn(
    [
      binary,
      "l7r",
      "--db",
      url,
      "--listen",
      `127.0.0.1:${l7rPort}`,
      "--cert",
      cert,
      "--key",
      key,
      "--set",
      "nodename=bench-l7r",
      "--set",
      "log.level=warn",
      // The node's farm certificate; its node-to-node endpoint on any free port (a lone node).
      ...Object.entries({ ...(await farmCert("bench-l7r", "127.0.0.1")).settings, "cluster.peer.port": "0" }).flatMap(
        ([k, v]) => ["--set", `${k}=${v}`],
      ),
      // Every bench client comes from 127.0.0.1: the per-address bounds on requests in progress
      // (32) and on parallel login tries (20) would turn the 50 concurrent logins into 429s.
      "--set",
      "l7r.limit.requests_per_address=1000",
      "--set",
      "auth.throttle.address.tries=100000",
    ],
    l7rLog,
  );
  await waitLine(l7r.p, (l) => (l.includes("listening") ? true : undefined), "qvd l7r").catch((e) => {
    throw new Error(`${e.message}\n${readFileSync(l7rLog, "utf8").slice(-2000)}`);
  });

  const haPort = freePort();
  writeFileSync(
    join(dir, "haproxy.cfg"),
    `global
  maxconn 1000
defaults
  mode tcp
  timeout connect 5s
  timeout client 10m
  timeout server 10m
frontend tls
  bind 127.0.0.1:${haPort} ssl crt ${join(dir, "haproxy.pem")} ssl-min-ver TLSv1.2 ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256
  default_backend sink
backend sink
  server sink 127.0.0.1:${ports.sink}
`,
  );
  const ha = spawn(["/usr/sbin/haproxy", "-db", "-f", join(dir, "haproxy.cfg")], join(dir, "haproxy.log"));
  const haVersion = (await run(["/usr/sbin/haproxy", "-v"])).stdout.split("\n")[0]!.replace(/ - https.*/, "");
  await poll(async () => {
    if (ha.p.exitCode !== null)
      throw new Error(`haproxy exited: ${readFileSync(join(dir, "haproxy.log"), "utf8").slice(-1000)}`);
    return (await run(["bash", "-c", `exec 3<>/dev/tcp/127.0.0.1/${haPort}`], { allowFail: true })).status === 0;
  }, "haproxy to listen");

  // --- 1. splice --------------------------------------------------------------------------------
  const bytes = MIB * 1024 * 1024;
  const ALICE = `Basic ${Buffer.from("bench:bench-pw-1").toString("base64")}`;
  const targets = [
    { name: "direct TCP to the sink", args: ["127.0.0.1", String(ports.sink), "plain"] },
    { name: "direct TLS to a TLS sink", args: ["127.0.0.1", String(ports.tlsSink), "tls"] },
    { name: "haproxy (TLS → TCP)", args: ["127.0.0.1", String(haPort), "tls"], proxyPid: () => ha.p.pid },
    {
      name: "qvd l7r (TLS → 101 → splice)",
      args: ["127.0.0.1", String(l7rPort), "l7r"],
      l7r: true,
      proxyPid: () => l7r.p.pid,
    },
  ] as { name: string; args: string[]; l7r?: boolean; proxyPid?: () => number }[];
  type Fig = { up: number[]; down: number[]; rtt: number[]; cpuUp: number[]; cpuDown: number[]; cipher?: string };
  const figs = new Map<string, Fig>(
    targets.map((t) => [t.name, { up: [], down: [], rtt: [], cpuUp: [], cpuDown: [] }]),
  );
  const sessionFree = () =>
    poll(
      async () =>
        (await db`SELECT user_state FROM vm_runtimes WHERE vm_id = ${vm.id}`)[0]!.user_state === "disconnected",
      "the L7R session to be released",
    );
  /** One transfer; `cpu`: the proxy's CPU ms during the transfer only (after the connect/101). */
  const once = async (t: (typeof targets)[number], dirn: string, amount: number) => {
    if (t.l7r) await sessionFree();
    return measured(
      [BUN, PEER, "stream", ...t.args, dirn, String(amount), ...(t.l7r ? [ALICE, String(vm.id)] : [])],
      t.proxyPid?.(),
      `${t.name} ${dirn}`,
    );
  };
  if (!SKIP_SPLICE) {
    console.log(
      `\n1. splice: ${MIB} MiB each direction, ${PINGS} ping-pongs of 64 bytes, ${ROUNDS} rounds (targets interleaved)…`,
    );
    // One warm-up transfer each way per path (connections, JIT), not counted.
    for (const t of targets) for (const d of ["up", "down"]) await once(t, d, Math.min(bytes, 64 << 20));
    for (let r = 0; r < ROUNDS; r++)
      for (const t of targets) {
        const f = figs.get(t.name)!;
        const up = await once(t, "up", bytes);
        const down = await once(t, "down", bytes);
        const ping = await once(t, "ping", PINGS);
        f.up.push(bytes / 1e6 / (up.ms / 1000));
        f.down.push(bytes / 1e6 / (down.ms / 1000));
        f.rtt.push(...ping.rtts_us);
        if (up.cpu !== undefined) f.cpuUp.push((up.cpu * 1e8) / bytes);
        if (down.cpu !== undefined) f.cpuDown.push((down.cpu * 1e8) / bytes);
        f.cipher ??= up.cipher;
      }
    const direct = figs.get(targets[0]!.name)!;
    const haproxy = figs.get(targets[2]!.name)!;
    const mine = figs.get(targets[3]!.name)!;
    console.log(
      `\n   upload = client → sink, download = sink → client: MB/s (10^6 bytes/s), median of ${ROUNDS} (min–max);`,
    );
    console.log(
      `   proxy CPU = user + system time of the proxy process per 100 MB spliced, median (less sensitive to other load);`,
    );
    console.log(
      `   RTT = 64-byte ping-pong, one in flight, µs over ${ROUNDS}×${PINGS}; added = median − direct TCP's median.`,
    );
    console.log(
      `   ${pad("path", 40)}${lpad("upload MB/s", 17)}${lpad("download MB/s", 17)}${lpad("proxy CPU ms up/down", 22)}${lpad("RTT µs", 8)}${lpad("p99", 7)}${lpad("added", 7)}`,
    );
    for (const t of targets) {
      const f = figs.get(t.name)!;
      const mb = (xs: number[]) =>
        `${med(xs).toFixed(0)} (${Math.min(...xs).toFixed(0)}–${Math.max(...xs).toFixed(0)})`;
      const cpu = f.cpuUp.length ? `${med(f.cpuUp).toFixed(0)} / ${med(f.cpuDown).toFixed(0)}` : "-";
      console.log(
        `   ${pad(t.name, 40)}${lpad(mb(f.up), 17)}${lpad(mb(f.down), 17)}${lpad(cpu, 22)}${lpad(med(f.rtt).toFixed(0), 8)}${lpad(q(f.rtt, 0.99).toFixed(0), 7)}${lpad((med(f.rtt) - med(direct.rtt)).toFixed(0), 7)}`,
      );
    }
    console.log(
      `   TLS: ${[...new Set(targets.map((t) => figs.get(t.name)!.cipher).filter(Boolean))].join(", ")} (client: Bun; haproxy told to prefer the same suite as the L7R).`,
    );
    const pct = (a: number[], b: number[]) => ((100 * med(a)) / med(b)).toFixed(0);
    console.log(
      `   qvd l7r / haproxy throughput: upload ${pct(mine.up, haproxy.up)} %, download ${pct(mine.down, haproxy.down)} % (aim: ≥ 90 %);`,
    );
    console.log(
      `   qvd l7r / haproxy CPU per byte: upload ${pct(mine.cpuUp, haproxy.cpuUp)} %, download ${pct(mine.cpuDown, haproxy.cpuDown)} %.`,
    );
    console.log(
      `   ${haVersion}, default threads; the L7R is one Bun process (one event loop). Stand-in VMA: measures the splice only.`,
    );
  }

  // --- 2. logins --------------------------------------------------------------------------------
  if (!SKIP_LOGINS) {
    const params = /^\$argon2id\$v=(\d+)\$([^$]+)\$/.exec(loginHash);
    const verifies: number[] = [];
    const verifyCpu: number[] = [];
    for (let i = 0; i < 10; i++) {
      const t0 = performance.now();
      const c0 = process.cpuUsage();
      await Bun.password.verify("login-pw-1", loginHash);
      verifies.push(performance.now() - t0);
      const c = process.cpuUsage(c0);
      verifyCpu.push((c.user + c.system) / 1000);
    }
    console.log(
      `\n2. logins: GET /qvd/list_of_vm with Basic auth, ${CONCURRENCY} concurrent clients (${CONCURRENCY} distinct users), ${LOGIN_S} s each…`,
    );
    const loginRows: [
      string,
      { count: number; seconds: number; lat_ms: number[]; errors: number; firstError: string; cpu: number },
    ][] = [];
    for (const [label, how] of [
      ["new TLS connection per login (handshake + argon2id + DB)", "new"],
      ["keep-alive, auth cached per connection (no argon2)", "keepalive"],
    ] as const)
      loginRows.push([
        label,
        await measured(
          [
            BUN,
            PEER,
            "logins",
            String(l7rPort),
            String(CONCURRENCY),
            String(LOGIN_S),
            how,
            "login",
            String(CONCURRENCY),
            "login-pw-1",
          ],
          l7r.p.pid,
          label,
        ),
      ]);
    console.log(
      `   ${pad("mode", 60)}${lpad("req/s", 8)}${lpad("median ms", 11)}${lpad("p99 ms", 9)}${lpad("L7R CPU ms/req", 16)}${lpad("errors", 8)}`,
    );
    for (const [label, r] of loginRows)
      console.log(
        `   ${pad(label, 60)}${lpad((r.count / r.seconds).toFixed(1), 8)}${lpad(q(r.lat_ms, 0.5).toFixed(1), 11)}${lpad(q(r.lat_ms, 0.99).toFixed(1), 9)}${lpad((r.cpu / r.count).toFixed(2), 16)}${lpad(String(r.errors), 8)}${r.firstError ? `  (${r.firstError})` : ""}`,
      );
    console.log(
      `   argon2id v=${params?.[1]} ${params?.[2]} (Bun.password defaults; m in KiB); one verify in this process: median ${med(verifies).toFixed(0)} ms, ${med(verifyCpu).toFixed(0)} ms of CPU.`,
    );
    const perLogin = loginRows[0]![1].cpu / loginRows[0]![1].count;
    console.log(
      `   Estimate, not a measurement: ${cpus().length} idle cores for the L7R at ${perLogin.toFixed(0)} ms of CPU per login would allow about ${((cpus().length * 1000) / perLogin).toFixed(0)} logins/s.`,
    );
    console.log(
      `   Latency includes queueing: 50 clients in a closed loop. L7R CPU: the qvd l7r process only (PostgreSQL not counted);`,
    );
    console.log(
      `   its database pool has 10 connections (database.pool_size default); each login writes an audit row.`,
    );
  }

  // --- 2b. attack ---------------------------------------------------------------------------------
  if (!SKIP_ATTACK) {
    console.log(
      `\n2b. attack: one connection, 40 pipelined bad logins then junk, ${ATTACK_S} s; a bystander pings meanwhile (another process)…`,
    );
    const rss = (pid: number) =>
      Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1] ?? 0) / 1024;
    /** Starts peers together (ready/go), samples the L7R's RSS until they are done. */
    const together = async (argvs: string[][]) => {
      const peers = argvs.map((argv) => {
        const { p, stop } = spawn(argv);
        const line = jsonLines(
          p,
          async () => `peer ${argv[2]} exited: ${await new Response(p.stderr as ReadableStream).text()}`,
        );
        return { p, stop, line };
      });
      for (const x of peers) await x.line();
      let peak = rss(l7r.p.pid);
      const start = peak;
      const sampler = setInterval(() => (peak = Math.max(peak, rss(l7r.p.pid))), 50);
      for (const x of peers) {
        (x.p.stdin as import("bun").FileSink).write("go\n");
        (x.p.stdin as import("bun").FileSink).flush();
      }
      const results = await Promise.all(peers.map((x) => x.line()));
      clearInterval(sampler);
      for (const x of peers) {
        untrack(x.stop);
        await x.stop();
      }
      return { results, peak, start };
    };
    const quiet = await together([[BUN, PEER, "pings", String(l7rPort), String(ATTACK_S)]]);
    const storm = await together([
      [BUN, PEER, "pings", String(l7rPort), String(ATTACK_S)],
      [BUN, PEER, "attack", String(l7rPort), String(ATTACK_S), "nobody-here"],
    ]);
    const row = (label: string, r: { lat_ms: number[]; errors: number }, peak: number, start: number, extra = "") =>
      console.log(
        `   ${pad(label, 34)}${lpad(r.lat_ms.length ? q(r.lat_ms, 0.5).toFixed(1) : "-", 12)}${lpad(r.lat_ms.length ? q(r.lat_ms, 0.95).toFixed(1) : "-", 9)}${lpad(String(r.errors), 8)}${lpad(`${start.toFixed(0)} → ${peak.toFixed(0)}`, 16)}${extra}`,
      );
    console.log(
      `   ${pad("", 34)}${lpad("ping median", 12)}${lpad("p95 ms", 9)}${lpad("errors", 8)}${lpad("L7R RSS MiB", 16)}`,
    );
    row("no attack", quiet.results[0], quiet.peak, quiet.start);
    const a = storm.results[1] as { sent: number; connections: number };
    row(
      "during the attack",
      storm.results[0],
      storm.peak,
      storm.start,
      `  (attacker sent ${(a.sent / 2 ** 20).toFixed(1)} MiB over ${a.connections} connection(s))`,
    );
    console.log(
      `   aim: RSS under 256 MiB and the bystander's median under 50 ms (RSS includes what parts 1 and 2 left).`,
    );
  }

  // Parts 1 and 2 are over: free their processes before the node starts.
  await ha.stop();
  await l7r.stop();
  await sinkProc.stop();

  // --- 3. connect_to_vm through a real node ------------------------------------------------------
  if (!SKIP_NODE) {
    console.log(
      `\n3. connect_to_vm → 101 through qvd node (network namespace, real desktop image, LXC), ${CONNECTS} times each…`,
    );
    await cluster.createDatabase("benchnode");
    const nodeUrl = cluster.url("benchnode");
    const nsql = connect(nodeUrl, { max: 4 });
    cleanups.push(() => nsql.end({ timeout: 5 }));
    await initDatabase(nsql, { adminPassword: "bench-admin-pw" });
    const image = await desktopImage();
    const node = new TestNode(
      () => ({ name: "benchnode", url: nodeUrl, sql: nsql, cluster: cluster as never }),
      "benchnode",
    );
    cleanups.push(() => node.stop());
    await node.setup();
    const user = await D.create(nsql, D.users, ALL, { tenant_id: 1, name: "alice", password: "alice-pw-1" });
    const dosf = await D.create(nsql, D.osfs, ALL, { tenant_id: 1, name: "debian", memory_mb: 1024 });
    await node.addImage(dosf.id, "desktop.tar.gz", async (p) => Bun.write(p, Bun.file(image)).then(() => {}));
    const dvm = await D.createVm(
      nsql,
      ALL,
      { user_id: user.id, osf_id: dosf.id, name: "desktop" },
      { range: "198.18.0.0/16" },
    );
    const PORT = 8443;
    await node.start(
      { "hkd.timeout.vma_start": "120", "log.level": "info" },
      { role: "node", args: ["--listen", `127.0.0.1:${PORT}`, "--cert", cert, "--key", key] },
    );

    const vmRow = async () =>
      (
        await nsql`SELECT vm_state, user_state, vma_secret, host(vm_address) AS addr FROM vm_runtimes WHERE vm_id = ${dvm.id}`
      )[0]!;
    const xState = async () => {
      const r = await vmRow();
      if (r.vm_state !== "running") return "-";
      const o = await run(
        [
          ...node.ns.exec,
          "curl",
          "-s",
          "--max-time",
          "5",
          "-H",
          `x-qvd-vma-secret: ${r.vma_secret}`,
          `http://${r.addr}:3030/vma/x_state`,
        ],
        { allowFail: true },
      );
      try {
        return (JSON.parse(o.stdout) as { state: string }).state;
      } catch {
        return "?";
      }
    };
    const probe = async () => {
      await poll(async () => (await vmRow()).user_state === "disconnected", "the session to be released", 30_000);
      return peer<{ ms101: number; msNx: number | null; progress: string[] }>([
        ...node.ns.exec,
        BUN,
        PEER,
        "connect",
        String(PORT),
        "alice",
        "alice-pw-1",
        String(dvm.id),
      ]);
    };
    /** Waits until the X session is in a state a connection can start from (not mid-transition). */
    const xSettled = async () => {
      let s = "";
      await poll(
        async () => ["stopped", "suspended", "listening"].includes((s = await xState())),
        "the X session to settle",
        60_000,
      );
      return s;
    };
    const stopDesktop = async () => {
      await D.stopVm(nsql, ALL, dvm.id);
      await poll(async () => (await vmRow()).vm_state === "stopped", "the desktop to stop", 120_000);
    };

    // A suspended X session needs a real NX client to have been connected: qvd client with
    // nxproxy against an Xvfb of ours, then logged out (nxagent suspends the session).
    await ensureDeps(["xvfb", "nxproxy"], () => {});
    const display = [...Array(40).keys()]
      .map((i) => 140 + i)
      .find((n) => !existsSync(`/tmp/.X${n}-lock`) && !existsSync(`/tmp/.X11-unix/X${n}`))!;
    spawn(["Xvfb", `:${display}`, "-screen", "0", "1024x768x24", "-nolisten", "tcp"], join(dir, "xvfb.log"), "ignore");
    const suspendSession = async () => {
      const client = spawn(
        [
          ...node.ns.exec,
          "env",
          `DISPLAY=:${display}`,
          "QVD_PASSWORD=alice-pw-1",
          node.binary,
          "client",
          "--host",
          "127.0.0.1",
          "--port",
          String(PORT),
          "--user",
          "alice",
          "--insecure",
          "--vm",
          String(dvm.id),
          "--link",
          "lan",
        ],
        join(dir, "client.log"),
        "ignore",
      );
      try {
        await poll(async () => (await xState()) === "connected", "qvd client's session to be connected", 120_000);
      } finally {
        untrack(client.stop);
        await client.stop();
      }
      await poll(async () => (await xState()) === "suspended", "the X session to be suspended", 60_000);
    };

    const warm = await probe(); // the first start unpacks the image: reported apart
    /** Times by case: the desktop's state and its X session's state just before connect_to_vm. */
    const cases = new Map<string, { to101: number[]; toNx: number[] }>();
    const record = (label: string, r: { ms101: number; msNx: number | null }) => {
      const c = cases.get(label) ?? { to101: [], toNx: [] };
      cases.set(label, c);
      c.to101.push(r.ms101);
      if (r.msNx !== null) c.toNx.push(r.msNx - r.ms101);
    };
    const runningLabel = (x: string) =>
      `running, X session ${x}${x === "suspended" ? " (x_start resumes it)" : x === "stopped" ? " (x_start starts nxagent)" : ""}`;
    for (let i = 0; i < CONNECTS; i++) {
      // After our probe's bare NX greeting nxagent gives up the session: it is stopped here.
      let x = await xSettled();
      record(runningLabel(x), await probe());
      await xSettled();
      await suspendSession();
      x = await xSettled();
      record(runningLabel(x), await probe());
      await stopDesktop();
      record("stopped (placed, container + VMA started, x_start)", await probe());
    }
    const secs = (xs: number[]) =>
      xs.length
        ? `${(med(xs) / 1000).toFixed(2)} s (${(Math.min(...xs) / 1000).toFixed(2)}–${(Math.max(...xs) / 1000).toFixed(2)})`
        : "n/a";
    const msr = (xs: number[]) =>
      xs.length ? `${med(xs).toFixed(0)} ms (${Math.min(...xs).toFixed(0)}–${Math.max(...xs).toFixed(0)})` : "n/a";
    console.log(
      `   → 101: from sending connect_to_vm (on a connection already authenticated by list_of_vm) to the 101;`,
    );
    console.log(
      `   → NX: from the 101 to nxagent's answer to the NX greeting sent through the splice. Median (min–max).`,
    );
    console.log(`   ${pad("desktop before connect_to_vm", 58)}${lpad("n", 3)}${lpad("→ 101", 22)}${lpad("→ NX", 18)}`);
    for (const [label, c] of cases)
      console.log(
        `   ${pad(label, 58)}${lpad(String(c.to101.length), 3)}${lpad(secs(c.to101), 22)}${lpad(msr(c.toNx), 18)}`,
      );
    console.log(`   first start (image unpacked on the way): ${(warm.ms101 / 1000).toFixed(2)} s to the 101`);
  }
  console.log(
    `\nload average at the end: ${loadavg()
      .map((l) => l.toFixed(2))
      .join(" ")}`,
  );
} catch (e) {
  if (!cleaningUp()) console.error(`bench failed: ${(e as Error).message}`);
  process.exitCode = 1;
} finally {
  await cleanup();
}
