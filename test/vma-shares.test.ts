// The slave channel's VMA side for real (as root on the host, no LXC): sharesService makes the
// session's nested user+mount namespace, nxagent's NX_SLAVE_CMD wrapper runs `qvd vma-slave` as
// the user inside it, a PUT /shares goes to the VMA's mount socket, the VMA mounts FUSE with a real
// sshfs, and a real sftp-server stands for the client's folder. Then what a user may try against
// the mount helper: symlinked mount points, names that leave ~/Redirected, a wrong key.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import {
  chmodSync,
  chownSync,
  existsSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { connect } from "node:net";
import { join } from "node:path";
import { qvdBinary } from "./support/node.ts";
import { poll } from "./support/wait.ts";
import { nestedIdMap, fuseMountsBelow, sharesService, type SharesService } from "../src/vma/shares.ts";
import type { ServiceContext } from "../src/vma/services.ts";

const UID = 4242;
const KEY = "Zq8xW3vR5tY7uI9oP1aS2dF4gH6jK8lZ0xC2vB4nM6qW8eR0tY2uI4oP6aS8dF0g";
const SFTP = "/usr/lib/openssh/sftp-server";
let work: string;
let home: string;
let runDir: string;
let client: string;
let svc: SharesService;
let ctx: ServiceContext;
let wrap: string[];
let slaveCmd: string;

function context(props: Record<string, string>): ServiceContext {
  return {
    account: { user: "sharer", uid: UID, gid: UID, home, shell: "/bin/sh", groups: [] },
    properties: props,
    display: 100,
    runDir,
    homeOnDisk: home,
    env: { HOME: home, PATH: "/usr/sbin:/usr/bin:/sbin:/bin" },
    runAsUser: () => undefined,
    execAsUser: async () => ({ status: 1, stdout: "", stderr: "" }),
  } as ServiceContext;
}

/** Runs argv as the session's user inside the session's namespace (as the Session does). */
async function asUser(argv: string[], w = wrap): Promise<{ status: number; out: string }> {
  const p = Bun.spawn([...w, "setpriv", `--reuid=${UID}`, `--regid=${UID}`, "--clear-groups", "--", ...argv], {
    env: { HOME: home, PATH: "/usr/sbin:/usr/bin:/sbin:/bin" },
    stdout: "pipe",
    stderr: "pipe",
    timeout: 10_000,
  });
  const out = (await new Response(p.stdout).text()) + (await new Response(p.stderr).text());
  return { status: await p.exited, out };
}

/** A slave connection as nxagent makes it: the wrapper run as the user; the request written, the answer head read. */
async function slave(request: string) {
  const p = Bun.spawn([...wrap, "setpriv", `--reuid=${UID}`, `--regid=${UID}`, "--clear-groups", "--", slaveCmd], {
    env: { HOME: home, PATH: "/usr/sbin:/usr/bin:/sbin:/bin" },
    stdin: "pipe",
    stdout: "pipe",
    stderr: "pipe",
  });
  p.stdin.write(request);
  await p.stdin.flush();
  const reader = p.stdout.getReader();
  let buf = Buffer.alloc(0);
  while (buf.indexOf("\r\n\r\n") < 0) {
    const r = await reader.read();
    if (r.done) break;
    buf = Buffer.concat([buf, Buffer.from(r.value)]);
  }
  const end = buf.indexOf("\r\n\r\n");
  return {
    proc: p,
    reader,
    head: buf.subarray(0, end < 0 ? buf.length : end).toString("latin1"),
    rest: end < 0 ? Buffer.alloc(0) : buf.subarray(end + 4),
  };
}

const put = (path: string, key = KEY) =>
  `PUT ${path} HTTP/1.1\r\nAuthorization: Basic ${key}\r\nConnection: Upgrade\r\nUpgrade: qvd:sftp/1.0\r\n\r\n`;

/** Wires a slave connection that answered 101 to a real sftp-server serving `dir` (the client's side). */
function serveClientFolder(s: Awaited<ReturnType<typeof slave>>, dir: string) {
  const sftp = Bun.spawn([SFTP, "-e"], { cwd: dir, stdin: "pipe", stdout: "pipe", stderr: "ignore" });
  void (async () => {
    try {
      if (s.rest.length) sftp.stdin.write(s.rest);
      for (let r = await s.reader.read(); !r.done; r = await s.reader.read()) {
        sftp.stdin.write(r.value);
        await sftp.stdin.flush();
      }
      await sftp.stdin.end();
    } catch {} // the client's side is gone
  })();
  void (async () => {
    try {
      const out = sftp.stdout.getReader();
      for (let r = await out.read(); !r.done; r = await out.read()) {
        s.proc.stdin.write(r.value);
        await s.proc.stdin.flush();
      }
      // The client's side ended: so does the slave connection (as nxagent closes it).
      await s.proc.stdin.end();
    } catch {}
  })();
  return sftp;
}

/** One request on the VMA's mount socket; the first answer line. */
async function askSocket(req: unknown): Promise<{ status: number; error?: string; ticket?: string }> {
  return await new Promise((res, rej) => {
    const sock = connect(join(runDir, "slave.sock"));
    let buf = "";
    sock.on("data", (d) => {
      buf += d.toString();
      const nl = buf.indexOf("\n");
      if (nl >= 0) {
        sock.destroy();
        res(JSON.parse(buf.slice(0, nl)));
      }
    });
    sock.on("error", rej);
    sock.write(JSON.stringify(req) + "\n");
  });
}

const mountsInSession = () => fuseMountsBelow(readFileSync(`/proc/${svc.holderPid}/mountinfo`, "utf8"), work);

beforeAll(async () => {
  if (process.getuid!() !== 0) throw new Error("this test runs as root");
  // The distributions' default; a node whose /dev/fuse is root's alone cannot give FUSE to containers.
  if ((lstatSync("/dev/fuse").mode & 0o666) !== 0o666) chmodSync("/dev/fuse", 0o666);
  const qvd = await qvdBinary();
  work = mkdtempSync("/tmp/qvd-shares-");
  chmodSync(work, 0o711);
  home = join(work, "home");
  runDir = join(work, "run");
  client = join(work, "client");
  mkdirSync(home, { mode: 0o700 });
  chownSync(home, UID, UID);
  mkdirSync(runDir, { mode: 0o711 });
  mkdirSync(client);
  writeFileSync(join(client, "from-client.txt"), "bytes from the client's disk\n");
  svc = sharesService({ enabled: true, qvd, fuse: true });
  ctx = context({ "qvd.slave.key": KEY });
  const p = await svc.prepare(ctx);
  expect(p.options).toEqual(["slave=1"]);
  slaveCmd = p.env!.NX_SLAVE_CMD!;
  wrap = p.wrap!;
  expect(wrap[0]).toBe("nsenter");
}, 180_000);

afterAll(async () => {
  if (svc && ctx) await svc.stopped(ctx);
  if (work) rmSync(work, { recursive: true, force: true });
});

describe("prepare", () => {
  test("the key file is the user's alone; the wrapper is root's and runs qvd vma-slave with the socket (and USB unavailable: not a KVM desktop)", () => {
    const k = lstatSync(join(runDir, "slave.conf"));
    expect([k.uid, k.mode & 0o777]).toEqual([UID, 0o600]);
    expect(readFileSync(join(runDir, "slave.conf"), "utf8")).toBe(KEY + "\n");
    const w = lstatSync(slaveCmd);
    expect([w.uid, w.mode & 0o777]).toEqual([0, 0o755]);
    expect(readFileSync(slaveCmd, "utf8")).toMatch(
      /^#!\/bin\/sh\n\/\S+ vma-slave --key-file=\S+slave\.conf --socket=\S+slave\.sock --display=:100 --usb-unavailable\nrc=\$\?\n/,
    );
    const s = lstatSync(join(runDir, "slave.sock"));
    expect([s.uid, s.mode & 0o777]).toEqual([UID, 0o600]);
  });

  test("the nested id map: root to the last id, the rest to themselves, container root unmapped", () => {
    expect(nestedIdMap("         0     100000      65536\n")).toBe("0 65535 1\n1 1 65534\n");
    expect(nestedIdMap("0 0 4294967295")).toBe("0 65535 1\n1 1 65534\n");
    expect(nestedIdMap("1000 100000 1")).toBeUndefined();
    expect(
      readFileSync(`/proc/${svc.holderPid}/uid_map`, "utf8")
        .trim()
        .split("\n")
        .map((l) => l.trim().split(/\s+/).join(" ")),
    ).toEqual(["0 65535 1", "1 1 65534"]);
  });

  test("in the session: no capabilities, no_new_privs, and no mounting", async () => {
    const r = await asUser([
      "sh",
      "-c",
      "grep -E '^(CapBnd|CapEff|NoNewPrivs)' /proc/self/status; mount -t tmpfs x /tmp 2>&1; echo rc=$?",
    ]);
    expect(r.out).toContain("CapEff:\t0000000000000000");
    // The bounding set keeps at most setuid and setgid (the session's setpriv needs them); with
    // no_new_privs and container root unmapped nothing can raise them.
    expect(BigInt("0x" + /CapBnd:\t([0-9a-f]+)/.exec(r.out)![1]) & ~0xc0n).toBe(0n);
    expect(r.out).toContain("NoNewPrivs:\t1");
    expect(r.out).toMatch(/rc=[1-9]/);
  });

  test("administrator properties: shares off → no namespace and a wrapper with --no-shares; shares and USB off → no slave channel", async () => {
    const other = sharesService({ enabled: true, qvd: await qvdBinary(), fuse: true });
    const dir = mkdtempSync(join(work, "r-"));
    const c = { ...context({ "qvd.slave.key": KEY, "qvd.vm.shares.enable": "0" }), runDir: dir };
    const p = await other.prepare(c);
    expect(p.options).toEqual(["slave=1"]);
    expect(p.wrap).toBeUndefined();
    expect(readFileSync(p.env!.NX_SLAVE_CMD!, "utf8")).toContain(" --no-shares");
    expect(existsSync(join(dir, "slave.sock"))).toBe(false);
    // The original client's requests then get 403 (shares, open), USB still its 501.
    chmodSync(dir, 0o711);
    const run403 = Bun.spawn(
      ["setpriv", `--reuid=${UID}`, `--regid=${UID}`, "--clear-groups", "--", p.env!.NX_SLAVE_CMD!],
      { env: { HOME: home }, stdin: "pipe", stdout: "pipe" },
    );
    run403.stdin.write(
      `${put("/shares/tmp/x")}POST /open/a.txt HTTP/1.1\r\nAuthorization: Basic ${KEY}\r\nX-QVD-Share-Ticket: ${home}/Redirected/x\r\n\r\nPOST /usbip HTTP/1.1\r\nAuthorization: Basic ${KEY}\r\n\r\n`,
    );
    await run403.stdin.end();
    const answers = await new Response(run403.stdout).text();
    expect([...answers.matchAll(/HTTP\/1\.1 (\d{3})/g)].map((m) => m[1])).toEqual(["403", "403", "501"]);
    const q = await other.prepare({
      ...c,
      properties: { "qvd.slave.key": KEY, "qvd.vm.shares.enable": "no", "qvd.vm.usb.enable": "false" },
    });
    expect(q.options).toEqual([]);
    expect(existsSync(join(dir, "slave.conf"))).toBe(false);
    expect((await other.prepare({ ...c, properties: {} })).options).toEqual([]);
    expect(
      (
        await sharesService({ enabled: false, qvd: "/usr/local/bin/qvd" }).prepare({
          ...c,
          properties: { "qvd.slave.key": KEY },
        })
      ).options,
    ).toEqual([]);
    await other.stopped(c);
  });
});

describe("a shared folder, end to end", () => {
  let sftp: ReturnType<typeof Bun.spawn> | undefined;

  test("PUT /shares/<client dir> (the original's request): 101 with the ticket, and the folder is in ~/Redirected", async () => {
    const t0 = performance.now();
    const s = await slave(put(`/shares${client}`));
    const ms = performance.now() - t0;
    console.log(`shared folder mounted (wrapper start to 101) in ${ms.toFixed(0)} ms`);
    expect(ms).toBeLessThan(5000);
    const mp = join(home, "Redirected", "client");
    expect(s.head).toBe(`HTTP/1.1 101 Switching Protocols\r\nX-QVD-Share-Ticket: ${mp}`);
    sftp = serveClientFolder(s, client);
    const r = await asUser(["cat", join(mp, "from-client.txt")]);
    expect(r).toEqual({ status: 0, out: "bytes from the client's disk\n" });
    // Written in the desktop, lands on the client's disk with the same bytes.
    const bytes = Buffer.from(Array.from({ length: 70_000 }, (_, i) => (i * 7919) & 0xff));
    writeFileSync(join(work, "payload"), bytes);
    chmodSync(join(work, "payload"), 0o644);
    expect((await asUser(["cp", join(work, "payload"), join(mp, "saved.bin")])).status).toBe(0);
    expect(readFileSync(join(client, "saved.bin")).equals(bytes)).toBe(true);
    // Only in the session's namespace: the VMA's own (here the host's) has no such mount.
    expect(mountsInSession()).toContain(mp);
    expect(readFileSync("/proc/self/mountinfo", "utf8")).not.toContain(mp);
    const line = readFileSync(`/proc/${svc.holderPid}/mountinfo`, "utf8")
      .split("\n")
      .find((l) => l.includes(` ${mp} `))!;
    expect(line).toMatch(/nosuid,nodev/);
    expect(line).toContain(`user_id=${UID},group_id=${UID}`);
  }, 60_000);

  test("the same name twice: 409; a client that goes away takes its share with it", async () => {
    expect((await askSocket({ key: KEY, name: "client" })).status).toBe(409);
    const other = join(work, "other");
    mkdirSync(other);
    writeFileSync(join(other, "x.txt"), "x");
    const s = await slave(put(`/shares${other}`));
    expect(s.head).toStartWith("HTTP/1.1 101 ");
    const sftp2 = serveClientFolder(s, other);
    const mp = join(home, "Redirected", "other");
    expect((await asUser(["cat", join(mp, "x.txt")])).out).toBe("x");
    sftp2.kill("SIGKILL");
    await poll(() => !mountsInSession().includes(mp) && !existsSync(mp), 10_000, 50);
    expect(mountsInSession()).toEqual([join(home, "Redirected", "client")]);
    expect(existsSync(mp)).toBe(false);
  }, 30_000);

  test("suspend: the share is unmounted, its mount point removed, sshfs gone", async () => {
    await svc.suspended(ctx);
    expect(mountsInSession()).toEqual([]);
    expect(existsSync(join(home, "Redirected", "client"))).toBe(false);
    expect(readFileSync(join(client, "from-client.txt"), "utf8")).toBe("bytes from the client's disk\n");
    sftp?.kill();
  }, 30_000);
});

describe("what the user may try", () => {
  test("a wrong key: 401 from the slave server and from the VMA's socket", async () => {
    const s = await slave(put(`/shares${client}`, KEY.slice(0, -1) + "x"));
    expect(s.head).toStartWith("HTTP/1.1 401 ");
    s.proc.kill();
    expect((await askSocket({ key: "nope", name: "client" })).status).toBe(401);
    expect((await askSocket({ name: "client" })).status).toBe(401);
    expect(mountsInSession()).toEqual([]);
  });

  test("the mount socket is the session user's: another uid cannot connect", async () => {
    const js = `require("net").connect(${JSON.stringify(join(runDir, "slave.sock"))}).on("connect", () => { console.log("connected"); process.exit(0); }).on("error", (e) => console.log(e.code));`;
    const r = Bun.spawn(
      ["setpriv", "--reuid=4243", "--regid=4243", "--clear-groups", "--", process.execPath, "-e", js],
      { stdout: "pipe", stderr: "pipe", env: { HOME: "/tmp" } },
    );
    const out = await new Response(r.stdout).text();
    expect(out.trim()).toBe("EACCES");
    const c = Bun.spawn(
      ["setpriv", "--reuid=4243", "--regid=4243", "--clear-groups", "--", "cat", join(runDir, "slave.conf")],
      { stdout: "pipe", stderr: "pipe" },
    );
    expect(await c.exited).not.toBe(0);
    expect(await new Response(c.stdout).text()).not.toContain(KEY);
  });

  test("names that leave ~/Redirected: 400 at the socket", async () => {
    for (const name of ["..", ".", "a/b", "../etc", "", "x\n", "a".repeat(256)]) {
      expect((await askSocket({ key: KEY, name })).status).toBe(400);
    }
    expect((await askSocket({ key: KEY, name: "ok", charset: "utf-8; rm -rf /" })).status).toBe(400);
    expect(mountsInSession()).toEqual([]);
  });

  test("~/Redirected a symlink to /etc: the slave server refuses, nothing is mounted", async () => {
    await asUser(["sh", "-c", `rm -rf "$HOME/Redirected" && ln -s /etc "$HOME/Redirected"`]);
    const s = await slave(put("/shares/etc"));
    expect(s.head).toMatch(/^HTTP\/1\.1 (409|500) /);
    s.proc.kill();
    expect((await askSocket({ key: KEY, name: "passwd" })).status).toBe(409);
    expect(mountsInSession()).toEqual([]);
    await asUser(["rm", "-f", join(home, "Redirected")]);
  });

  test("a mount point swapped for a symlink (to the user's own dir elsewhere, to a root dir): refused, nothing mounted", async () => {
    const elsewhere = join(work, "elsewhere");
    mkdirSync(elsewhere);
    chownSync(elsewhere, UID, UID);
    await asUser([
      "sh",
      "-c",
      `mkdir -p "$HOME/Redirected" && ln -s ${elsewhere} "$HOME/Redirected/swap" && ln -s /usr "$HOME/Redirected/rootdir" && ln -s ../Redirected "$HOME/Redirected/loop"`,
    ]);
    for (const name of ["swap", "rootdir", "loop"]) expect((await askSocket({ key: KEY, name })).status).toBe(409);
    // A file, a fifo, or nothing at all where the directory should be.
    await asUser(["sh", "-c", `touch "$HOME/Redirected/file" && mkfifo "$HOME/Redirected/fifo"`]);
    for (const name of ["file", "fifo", "absent"]) expect((await askSocket({ key: KEY, name })).status).toBe(409);
    // A directory in ~/Redirected that is not the user's (root's): refused too.
    mkdirSync(join(home, "Redirected", "roots"));
    expect((await askSocket({ key: KEY, name: "roots" })).status).toBe(409);
    expect(mountsInSession()).toEqual([]);
    rmSync(join(home, "Redirected"), { recursive: true, force: true });
  }, 60_000);

  test("USB: 501 naming vhci_hcd through the real wrapper", async () => {
    const s = await slave(
      `POST /usbip HTTP/1.1\r\nAuthorization: Basic ${KEY}\r\nConnection: Upgrade\r\nUpgrade: qvd:usbip/1.0\r\n\r\n`,
    );
    expect(s.head).toStartWith("HTTP/1.1 501 ");
    let body = s.rest.toString();
    while (!body.includes("\n")) {
      const r = await s.reader.read();
      if (r.done) break;
      body += Buffer.from(r.value).toString();
    }
    expect(body).toContain("vhci_hcd");
    s.proc.kill();
  });
});
