// NX and the VM ports, tried as an attacker would, on one real farm for the whole file: `qvd node`
// (HKD + L7R) in a network namespace with two real Debian desktops in LXC, a second namespace as
// "another host" routed to the VM range through the node, and raw NX connections:
// - nxagent takes only the session's cookie (which the L7R adds to the client's greeting): a
//   connection from the node without it, or with a stale one, gets nothing; the rightful client
//   through the L7R then connects;
// - nxagent takes only the node's address (accept=): from inside the desktop, even with the
//   cookie, it refuses and keeps listening;
// - the VMA (3030) and nxagent (4100) are unreachable from another host and from another desktop.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { copyFileSync } from "node:fs";
import { join } from "node:path";
import * as D from "../src/db/index.ts";
import { defaultIdentityRules, defaultUid } from "../src/auth/identity.ts";
import { newNxCookie } from "../src/nx/handshake.ts";
import { run } from "../src/run.ts";
import { useTestDatabase } from "./support/db.ts";
import { createNetns, desktopImage, l7rProbe, TestNode, until, type Netns } from "./support/node.ts";

const isRoot = process.getuid?.() === 0;
const db = useTestDatabase();
const ALL = D.ALL_TENANTS;
const PORT = 8443;
const bun = join(import.meta.dir, "..", "node_modules", ".bin", "bun");
const greeting = (cookie?: string) =>
  `NXPROXY-3.5.0-3.5.99 ${cookie ? `cookie=${cookie},` : ""}stream=default,data=default `;

describe.skipIf(!isRoot)("NX cookie and the NX/VMA port firewall", () => {
  const node = new TestNode(db, "secnx");
  const sql = () => db().sql;
  let other: Netns | undefined;
  const vms: Record<"a" | "b", { row: D.VmRow; userId: number; secret: string }> = {} as any;

  /** Calls a desktop's VMA from the node. */
  const vma = (vm: "a" | "b", method: string, body?: unknown) =>
    node.vma(`http://${vms[vm].row.ip}:3030`, vms[vm].secret, `/vma/${method}`, body);
  const xState = async () => (await vma("a", "x_state")).json?.state as string | undefined;
  /** x_start for alice on desktop A, as the L7R sends it, with `cookie`; waits for nxagent to listen. */
  async function listening(cookie: string) {
    await until(
      async () => ["stopped", "suspended"].includes((await xState()) ?? ""),
      "the X session to be startable",
      60_000,
    );
    const uid = defaultUid(vms.a.userId, defaultIdentityRules());
    const r = await vma("a", "x_start", { user: "alice", uid, gid: uid, geometry: "800x600", cookie });
    expect(r.status, JSON.stringify(r.json)).toBe(200);
    await until(async () => (await xState()) === "listening", "nxagent to listen", 60_000);
  }
  /** A raw NX connection from namespace `ns` (default: the node's). */
  async function raw(host: string, port: number, hello: string, waitMs = 4000, ns: Netns = node.ns) {
    const r = await run(
      [...ns.exec, bun, join(import.meta.dir, "support", "nx-raw.ts"), host, String(port), hello, String(waitMs)],
      { timeoutMs: waitMs * 3 + 10_000 },
    );
    return JSON.parse(r.stdout.trim().split("\n").pop()!) as {
      connected: boolean;
      reply: string;
      closed: boolean;
      error?: string;
    };
  }

  beforeAll(async () => {
    const image = await desktopImage();
    await node.setup();
    const osf = await D.create(sql(), D.osfs, ALL, { tenant_id: 1, name: "debian", memory_mb: 512 });
    await node.addImage(osf.id, "desktop.tar.gz", async (p) => copyFileSync(image, p));
    for (const [k, name] of [
      ["a", "alice"],
      ["b", "bob"],
    ] as const) {
      const user = await D.create(sql(), D.users, ALL, { tenant_id: 1, name, password: `${name}-pw-1` });
      const row = await D.createVm(
        sql(),
        ALL,
        { user_id: user.id, osf_id: osf.id, name: `desk-${name}` },
        { range: "198.18.0.0/16" },
      );
      vms[k] = { row, userId: user.id, secret: "" };
    }
    // The node's defaults: nothing routed into VMs (vm.network.firewall.vm_ports is empty).
    await node.startNode(PORT, { "hkd.timeout.vma_start": "60" });
    for (const k of ["a", "b"] as const) await D.startVm(sql(), ALL, vms[k].row.id, { aliveWithinS: 60 });
    for (const k of ["a", "b"] as const) {
      await until(
        async () => (await D.get(sql(), D.vms, ALL, vms[k].row.id)).vm_state === "running",
        `desktop ${k} to run`,
        180_000,
      );
      vms[k].secret = (await sql()`SELECT vma_secret FROM vm_runtimes WHERE vm_id = ${vms[k].row.id}`)[0]!.vma_secret;
    }
    // Another host: its own namespace, a veth to the node's, and a route to the VM range through it.
    const o = (other = await createNetns());
    const tag = o.name.slice(-6);
    await run([
      ...node.ns.exec,
      "ip",
      "link",
      "add",
      `na${tag}`,
      "type",
      "veth",
      "peer",
      "name",
      `oh${tag}`,
      "netns",
      o.name,
    ]);
    await run([...node.ns.exec, "ip", "addr", "add", "198.19.254.1/30", "dev", `na${tag}`]);
    await run([...node.ns.exec, "ip", "link", "set", `na${tag}`, "up"]);
    await run([...node.ns.exec, "sysctl", "-qw", "net.ipv4.ip_forward=1"]); // the node's namespace only
    await run([...o.exec, "ip", "addr", "add", "198.19.254.2/30", "dev", `oh${tag}`]);
    await run([...o.exec, "ip", "link", "set", `oh${tag}`, "up"]);
    await run([...o.exec, "ip", "route", "add", "198.18.0.0/16", "via", "198.19.254.1"]);
  }, 30 * 60_000);

  afterAll(async () => {
    await other?.remove();
    await node.stop();
  }, 120_000);

  test("from the node, an NX greeting without the session's cookie, or with a stale one, gets nothing; the right one gets nxagent's answer", async () => {
    const ip = vms.a.row.ip!;
    const first = newNxCookie();
    await listening(first);
    // No cookie: what QVD clients' nxproxy sends, straight to nxagent (before this fix, the session's).
    const none = await raw(ip, 4100, greeting());
    expect(none.connected).toBe(true);
    expect(none.reply).toBe("");
    expect(none.closed).toBe(true);
    await until(async () => (await xState()) === "stopped", "nxagent to give the session up", 60_000);

    // The next session's cookie differs; the last one is refused.
    const second = newNxCookie();
    await listening(second);
    expect((await raw(ip, 4100, greeting(first))).reply).toBe("");
    await until(async () => (await xState()) === "stopped", "nxagent to give the session up", 60_000);
    // nxagent printed both cookies; the VMA's log (nxagent.log) has the session's masked.
    const log = (await node.attach(vms.a.row.id, "cat /run/qvd/nxagent.log")).stdout;
    expect(log).toContain("doesn't match '<cookie>'");
    expect(log).not.toContain(second);

    // The control: the right cookie from the node gets nxagent's greeting.
    const third = newNxCookie();
    await listening(third);
    const ok = await raw(ip, 4100, greeting(third));
    expect(ok.reply).toMatch(/^NXPROXY-\d+\.\d+\.\d+/);
  }, 300_000);

  test("the rightful client through the L7R then connects (the L7R adds the cookie to its greeting)", async () => {
    await until(
      async () => ["stopped", "suspended"].includes((await xState()) ?? ""),
      "the X session to be startable",
      60_000,
    );
    const out = await l7rProbe(node.ns.exec, PORT, "alice", "alice-pw-1", vms.a.row.id);
    expect(out.final.status).toBe(101);
    expect(out.nx).toMatch(/^NXPROXY-\d+\.\d+\.\d+/);
    await until(
      async () => (await D.get(sql(), D.vms, ALL, vms.a.row.id)).user_state === "disconnected",
      "the session to be released",
      30_000,
    );
  }, 300_000);

  test("inside the desktop, even with the cookie, nxagent refuses (not the node's address) and keeps listening; its options file is nxagent's to read, no one's to change", async () => {
    const cookie = newNxCookie();
    await listening(cookie);
    const id = vms.a.row.id;
    // The session's user connects from inside with the right cookie: refused (after nxagent's
    // 5 s pause), and the session still waits for its client (the VMA gives it 10 s).
    const inside = await node.attach(
      id,
      `bash -c 'exec 3<>/dev/tcp/127.0.0.1/4100 && printf "%s" "${greeting(cookie)}" >&3 && timeout 7 cat <&3; echo "[end]"'`,
      "alice",
    );
    expect(inside.stdout).toBe("[end]\n");
    // …while the node still gets into the same session (same cookie: it was not given up).
    expect((await raw(vms.a.row.ip!, 4100, greeting(cookie))).reply).toMatch(/^NXPROXY-/);
    expect((await node.attach(id, "cat /run/qvd/nxagent.log")).stdout).toContain(
      "Refusing connection from '127.0.0.1'",
    );
    // The options file: the VMA's, readable by the session's group (nxagent runs as the user).
    expect((await node.attach(id, "stat -c %a:%U /run/qvd/nxagent.conf")).stdout.trim()).toBe("640:root");
    const nobody = await node.attach(
      id,
      "setpriv --reuid 65534 --regid 65534 --clear-groups cat /run/qvd/nxagent.conf",
    );
    expect(nobody.status).not.toBe(0);
    expect(nobody.stderr).toContain("Permission denied");
    expect((await node.attach(id, "cat /run/qvd/nxagent.conf", "alice")).stdout).toContain(
      `cookie=${cookie},accept=198.18.0.1:`,
    );
    expect((await node.attach(id, "echo x >> /run/qvd/nxagent.conf", "alice")).status).not.toBe(0);
    // Nowhere else in the desktop: not in nxagent's session files (~/.nx), logs or command lines.
    // (The script names the cookie in two halves, so that its own command line does not match.)
    const found = await node.attach(
      id,
      `c=${cookie.slice(0, 16)}; c="\${c}${cookie.slice(16)}"; grep -rlsF "$c" /home /tmp /var/tmp /run; ` +
        `cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' '\\n' > /root/.cmdlines; grep -cF "$c" /root/.cmdlines; rm -f /root/.cmdlines`,
    );
    expect(found.stdout.trim().split("\n")).toEqual(["/run/qvd/nxagent.conf", "0"]);
  }, 300_000);

  test("from another host routed to the VM range, the VMA and nxagent ports are unreachable", async () => {
    await listening(newNxCookie());
    const ip = vms.a.row.ip!;
    // The route works: the node answers (a closed port refuses); the desktop's ports answer nothing.
    expect((await raw("198.19.254.1", 9, "", 3000, other!)).error).toBe("ECONNREFUSED");
    for (const port of [3030, 4100]) {
      const r = await raw(ip, port, port === 4100 ? greeting() : "", 3000, other!);
      expect(r, `port ${port}`).toEqual({ connected: false, reply: "", closed: false, error: "timeout" });
    }
    // Nothing reached nxagent.
    expect((await node.attach(vms.a.row.id, "cat /run/qvd/nxagent.log")).stdout).not.toContain(
      "connection from '198.19.254.2'",
    );
    // The node's own calls are untouched.
    expect((await vma("a", "ping")).status).toBe(200);
  }, 300_000);

  test("on the node, only root's processes reach a desktop's VMA and nxagent ports", async () => {
    const ip = vms.a.row.ip!;
    const tryAs = async (user?: string) => {
      const who = user
        ? ["setpriv", "--reuid", user, "--regid", user === "nobody" ? "nogroup" : user, "--clear-groups"]
        : [];
      const r = await run(
        [
          ...node.ns.exec,
          ...who,
          "bash",
          "-c",
          `timeout 3 bash -c 'exec 3<>/dev/tcp/${ip}/3030' 2>/dev/null && echo open || echo closed`,
        ],
        { allowFail: true },
      );
      return r.stdout.trim();
    };
    expect(await tryAs()).toBe("open");
    expect(await tryAs("nobody")).toBe("closed");
    expect(await tryAs("daemon")).toBe("closed");
    expect((await vma("a", "ping")).status).toBe(200);
  }, 60_000);

  test("from another desktop, the VMA and nxagent ports are unreachable", async () => {
    await listening(newNxCookie());
    const [a, b] = [vms.a.row.ip!, vms.b.row.ip!];
    for (const port of [3030, 4100]) {
      const r = await node.attach(
        vms.b.row.id,
        `timeout 3 bash -c 'exec 3<>/dev/tcp/${a}/${port}' && echo open || echo closed`,
      );
      expect(r.stdout.trim(), `port ${port}`).toBe("closed");
    }
    expect((await node.attach(vms.a.row.id, "cat /run/qvd/nxagent.log")).stdout).not.toContain(
      `connection from '${b}'`,
    );
  }, 300_000);
});
