// What the node-to-node hop (src/l7r/peer.ts) adds to a connect, on loopback: the VMA calls
// of the connect path (x_state, polled; x_start once) straight to a real VMA server
// (src/vma/server.ts) against the same call relayed by node A's endpoint over mutual TLS, on a
// kept connection and on a new one (TLS handshake included), and opening the NX stream (TCP
// connect to a listener standing in for nxagent, against the relayed 101). Caller, endpoint and
// VMA share this one process, so each figure carries both ends' CPU. Prints figures; asserts
// nothing. bun bench/peer-hop.ts [--calls 300]
import { chmodSync, mkdtempSync, rmSync } from "node:fs";
import { cpus, loadavg } from "node:os";
import { join } from "node:path";
import * as D from "../src/db/index.ts";
import { LocalCluster } from "../src/db/local-cluster.ts";
import { connect } from "../src/db/pool.ts";
import { initDatabase } from "../src/db/schema.ts";
import { createFarmCa, issueNodeCert } from "../src/farm/certs.ts";
import { vmaCall } from "../src/hkd/vma-client.ts";
import { PeerClient, startPeerServer } from "../src/l7r/peer.ts";
import { setLogLevel } from "../src/log.ts";
import type { IoSocket } from "../src/nx/splice.ts";
import { startVmaServer } from "../src/vma/server.ts";
import { testSession } from "../test/support/vma-session.ts";

setLogLevel("warn");
const CALLS = process.argv.includes("--calls") ? Number(process.argv[process.argv.indexOf("--calls") + 1]) : 300;
const ALL = D.ALL_TENANTS;
const SESSION = "0b6f3a44-7a51-4c1e-9d55-1f7f4b8a0001";
const q = (xs: number[], p: number) =>
  [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(p * xs.length))]!;
const fmt = (xs: number[]) => `median ${q(xs, 0.5).toFixed(2)} ms, p90 ${q(xs, 0.9).toFixed(2)} ms`;

async function timed(n: number, f: () => Promise<unknown>): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    await f();
    out.push(performance.now() - t0);
  }
  return out;
}

const dir = mkdtempSync("/tmp/qvd-bench-peer-");
chmodSync(dir, 0o755);
const cluster = new LocalCluster({
  dir: join(dir, "pg"),
  noSync: true,
  settings: { fsync: "off", synchronous_commit: "off" },
});
try {
  console.log(
    `node-to-node hop — ${cpus().length} cores, load average ${loadavg()
      .map((l) => l.toFixed(2))
      .join(" ")} at start`,
  );
  await cluster.init();
  await cluster.start();
  await cluster.createDatabase("bench");
  const sql = connect(cluster.url("bench"), { max: 4 });
  await initDatabase(sql, { adminPassword: "bench-admin-pw" });
  await createFarmCa(join(dir, "ca"));
  const [a, b] = [
    await issueNodeCert({ caDir: join(dir, "ca"), name: "hop-a", address: "127.0.0.1", outDir: join(dir, "a") }),
    await issueNodeCert({ caDir: join(dir, "ca"), name: "hop-b", address: "127.0.0.3", outDir: join(dir, "b") }),
  ];
  const ca = join(dir, "ca", "ca.crt");
  const hostA = await D.create(sql, D.hosts, ALL, { name: "hop-a", address: "127.0.0.1" });
  const hostB = await D.create(sql, D.hosts, ALL, { name: "hop-b", address: "127.0.0.3" });

  const secret = "bench-vma-secret-0123456789abcdef";
  const session = testSession({
    display: 99,
    tolerancechecks: "strict",
    sessionCommand: [],
    asCurrentUser: true,
    root: "/",
    homePath: dir,
    runDir: join(dir, "vma-run"),
    timeouts: { starting: 10_000, listening: 10_000, suspending: 10_000, stopping: 10_000 },
  });
  const vma = startVmaServer(
    { secret, nodeAddress: "127.0.0.1", vmId: 1, session, expireCommand: "", powerOff: () => {} },
    "127.0.0.1",
    0,
  );
  const agent = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
  const user = await D.create(sql, D.users, ALL, { tenant_id: 1, name: "hop", password: "hop-pw-1" });
  const osf = await D.create(sql, D.osfs, ALL, { tenant_id: 1, name: "hop" });
  const vm = await D.createVm(sql, ALL, { user_id: user.id, osf_id: osf.id, name: "hop" }, { range: "198.18.0.0/16" });
  await sql`UPDATE vm_runtimes SET host_id = ${hostA.id}, vm_state = 'running', vm_address = '127.0.0.1', vma_port = ${vma.port!}, x_port = ${agent.port},
      vma_secret = ${secret}, user_state = 'connecting', l7r_host_id = ${hostB.id}, l7r_session = ${SESSION}::uuid WHERE vm_id = ${vm.id}`;
  const server = startPeerServer({ sql, nodename: "hop-a", hostname: "127.0.0.1", port: 0, tls: { ca, ...a } });
  const tls = { ca, ...b };
  const nodeA = { name: "hop-a", address: "127.0.0.1" };
  const target = { address: "127.0.0.1", port: vma.port!, secret };

  const pooled = new PeerClient({ tls, port: server.port });
  await pooled.vma(nodeA, vm.id, SESSION, "x_state", undefined, 4000); // warm up
  await vmaCall(target, "x_state", undefined, 4000);
  const direct = await timed(CALLS, () => vmaCall(target, "x_state", undefined, 4000));
  const relayed = await timed(CALLS, () => pooled.vma(nodeA, vm.id, SESSION, "x_state", undefined, 4000));
  const fresh = await timed(Math.min(50, CALLS), async () => {
    const c = new PeerClient({ tls, port: server.port });
    await c.vma(nodeA, vm.id, SESSION, "x_state", undefined, 4000);
    c.close();
  });
  const nxDirect = await timed(Math.min(100, CALLS), async () => {
    const s = await Bun.connect({ hostname: "127.0.0.1", port: agent.port, socket: { data() {} } });
    s.end();
  });
  const nxOnly: number[] = [];
  for (let i = 0; i < Math.min(100, CALLS); i++) {
    // A kept connection serves the 101 (the connect's x_state polls leave one in the pool).
    await pooled.vma(nodeA, vm.id, SESSION, "x_state", undefined, 4000);
    const t0 = performance.now();
    const s: IoSocket = await pooled.nx(nodeA, vm.id, SESSION, 4000);
    nxOnly.push(performance.now() - t0);
    s.end();
  }
  console.log(`x_state straight to the VMA:                 ${fmt(direct)}`);
  console.log(
    `x_state relayed, kept TLS connection:         ${fmt(relayed)}  (+${(q(relayed, 0.5) - q(direct, 0.5)).toFixed(2)} ms a call)`,
  );
  console.log(`x_state relayed, new TLS connection:          ${fmt(fresh)}`);
  console.log(`NX stream: TCP connect to nxagent's port:     ${fmt(nxDirect)}`);
  console.log(`NX stream: relayed 101 on a kept connection:  ${fmt(nxOnly)}`);
  console.log(
    `A connect to a running desktop makes x_start, about 3 x_state polls and the stream: the hop adds about ${((q(relayed, 0.5) - q(direct, 0.5)) * 4 + q(nxOnly, 0.5) - q(nxDirect, 0.5)).toFixed(1)} ms.`,
  );
  pooled.close();
  server.stop();
  vma.stop(true);
  agent.stop(true);
  await sql.end({ timeout: 5 });
} finally {
  await cluster.stop("immediate").catch(() => {});
  rmSync(dir, { recursive: true, force: true });
}
process.exit(0);
