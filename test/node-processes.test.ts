// `qvd node` runs its HKD and its L7R as two child processes of the compiled binary: a storm on
// the L7R (many connections flooding pipelined junk) leaves the HKD's heartbeat going; when one
// child dies the node stops the other and exits with the dead child's status.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { useTestDatabase } from "./support/db.ts";
import { Peer } from "./support/l7r-peer.ts";
import { TestNode } from "./support/node.ts";
import { until } from "./support/wait.ts";

const isRoot = process.getuid?.() === 0;
const db = useTestDatabase();

const status = (pid: number) => {
  try {
    return readFileSync(`/proc/${pid}/status`, "utf8");
  } catch {
    return "";
  }
};
const childrenOf = (pid: number) =>
  readdirSync("/proc")
    .filter((d) => /^\d+$/.test(d))
    .map(Number)
    .filter((p) => new RegExp(`^PPid:\\s+${pid}$`, "m").test(status(p)));
const cmdline = (pid: number) => {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0");
  } catch {
    return [];
  }
};

describe.skipIf(!isRoot)("qvd node: the HKD and the L7R in two processes", () => {
  const node = new TestNode(db, "splitnode");
  let sock = "";

  beforeAll(async () => {
    await node.setup();
    sock = join(node.root, "l7r.sock");
    await node.startNode(8443, { "l7r.listen.unix": sock, "log.level": "info" });
    await until(async () => {
      try {
        const p = await Peer.open({ unix: sock });
        const ok = await p.handshake(2000);
        p.destroy();
        return ok;
      } catch {
        return false;
      }
    }, "the L7R's unix socket");
  }, 300_000);

  afterAll(async () => {
    await node.stop();
  }, 120_000);

  test("two children of the node: `qvd hkd` (the pid in host_runtimes) and `qvd l7r`; an L7R storm leaves the HKD's heartbeat going", async () => {
    const nodePid = node.proc!.pid;
    const kids = childrenOf(nodePid);
    const roles = kids.map((p) => cmdline(p)[1]).sort();
    expect(roles).toEqual(["hkd", "l7r"]);
    const hkdPid = kids.find((p) => cmdline(p)[1] === "hkd")!;
    const [row] = await db().sql`SELECT pid FROM host_runtimes WHERE host_id = ${node.host.id}`;
    expect(row!.pid).toBe(hkdPid);

    // The storm: 30 connections, each pipelining junk as fast as the L7R takes it.
    const heartbeat = async () =>
      (await db().sql`SELECT ok_ts FROM host_runtimes WHERE host_id = ${node.host.id}`)[0]!.ok_ts as Date;
    const peers = await Promise.all(Array.from({ length: 30 }, () => Peer.open({ unix: sock })));
    const junk = Buffer.from("GET /qvd/ping HTTP/1.1\r\n\r\n".repeat(2000));
    const storm = peers.map((p) => p.flood(junk, 64 * 1024 * 1024, 6000));
    await Bun.sleep(1500); // 1.5 s into the storm (its load is the point; no event marks it)
    const before = await heartbeat();
    // The HKD beats every second (hkd.heartbeat_interval = 1 in TestNode) while the storm goes on.
    await until(async () => (await heartbeat()).getTime() > before.getTime(), "a heartbeat during the storm", 15_000);
    await Promise.all(storm);
    for (const p of peers) p.destroy();
  }, 120_000);

  test("the L7R killed: the node stops its HKD and exits with the L7R's status (128 + 9)", async () => {
    const nodePid = node.proc!.pid;
    const kids = childrenOf(nodePid);
    const l7rPid = kids.find((p) => cmdline(p)[1] === "l7r")!;
    const hkdPid = kids.find((p) => cmdline(p)[1] === "hkd")!;
    process.kill(l7rPid, "SIGKILL");
    const code = await node.proc!.exited;
    expect(code).toBe(137);
    expect(status(hkdPid)).toBe(""); // gone, and reaped
    node.proc = undefined;
  }, 120_000);
});
