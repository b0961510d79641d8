// An unprivileged desktop, tried from inside as an attacker would: one real Debian desktop (the
// image of `qvd di build`, plus what a hostile tenant adds to it: an /etc/qvd/vma.conf that tries
// to change how the VMA runs) started by a real `qvd hkd` in a network namespace of this test,
// shared by every test of the file. From inside (lxc-attach as the container's root) and from
// the node it checks that container root is an unprivileged node uid, that the ways out through
// /proc are closed, which capabilities are left, that the image's setuid files give a node user
// nothing, that the image's settings are not obeyed, and that the desktop still works.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { chownSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import * as D from "../src/db/index.ts";
import { run } from "../src/run.ts";
import { useTestDatabase } from "./support/db.ts";
import { desktopImage, TestNode, until } from "./support/node.ts";

const isRoot = process.getuid?.() === 0;
const db = useTestDatabase();
const ALL = D.ALL_TENANTS;
const BASE = 100000; // vm.lxc.idmap.base (default)
const UID = 10001;

// Capability numbers (linux/capability.h).
const CAP = {
  sys_module: 16,
  sys_rawio: 17,
  sys_ptrace: 19,
  sys_admin: 21,
  sys_time: 25,
  mknod: 27,
  net_admin: 12,
  setuid: 7,
  setgid: 6,
  chown: 0,
};
const hasCap = (hex: string, n: number) => (BigInt("0x" + hex) >> BigInt(n)) & 1n;

describe.skipIf(!isRoot)("an unprivileged desktop, from inside", () => {
  const node = new TestNode(db, "secnode");
  let vm: D.VmRow;
  let secret = "";
  let initPid = 0;
  let basefs = "";
  const sql = () => db().sql;
  const sh = (script: string, user?: string) => node.attach(vm.id, script, user);

  const vma = (method: string, body?: unknown) => node.vma(`http://${vm.ip}:3030`, secret, `/vma/${method}`, body);

  beforeAll(async () => {
    const { ensureDeps } = await import("../scripts/deps.ts");
    await ensureDeps(["debootstrap"], () => {});
    const image = await desktopImage();
    await node.setup();
    const user = await D.create(sql(), D.users, ALL, { tenant_id: 1, name: "alice" });
    const osf = await D.create(sql(), D.osfs, ALL, { tenant_id: 1, name: "debian", memory_mb: 1024 });
    // The tenant's image: the desktop plus a vma.conf that tries to take the VMA over, and a
    // program it would run as the container's root.
    const extra = mkdtempSync("/tmp/qvd-sec-extra-");
    mkdirSync(join(extra, "etc/qvd"), { recursive: true });
    mkdirSync(join(extra, "usr/local/bin"), { recursive: true });
    writeFileSync(join(extra, "usr/local/bin/pwned"), "#!/bin/sh\nid > /tmp/pwned\n", { mode: 0o755 });
    writeFileSync(
      join(extra, "etc/qvd/vma.conf"),
      [
        "vma.provision.root = /tmp/elsewhere",
        "vma.session.as_current_user = 1",
        "vma.on_action.expire = /usr/local/bin/pwned",
        "vma.command.xinit = /usr/local/bin/pwned",
        "vma.user.home.path = /etc",
        "vma.user.shell = /bin/sh", // harmless: an image may choose it
        "",
      ].join("\n"),
    );
    await node.addImage(osf.id, "tenant.tar", async (p) => {
      await run(["sh", "-c", `gzip -dc '${image}' > '${p}'`]);
      await run([
        "tar",
        "--append",
        "-f",
        p,
        "-C",
        extra,
        "--numeric-owner",
        "--owner=0",
        "--group=0",
        "./etc/qvd",
        "./etc/qvd/vma.conf",
        "./usr/local/bin/pwned",
      ]);
    });
    rmSync(extra, { recursive: true, force: true });
    vm = await D.createVm(
      sql(),
      ALL,
      { user_id: user.id, osf_id: osf.id, name: "desktop" },
      { range: "198.18.0.0/16" },
    );
    // A home from before unprivileged desktops: owned by the user's unshifted uid.
    const home = join(node.root, "storage", "homes", "default", "alice");
    mkdirSync(join(home, "old"), { recursive: true });
    writeFileSync(join(home, "old", "letter.txt"), "from before\n", { mode: 0o600 });
    for (const p of [home, join(home, "old"), join(home, "old", "letter.txt")]) chownSync(p, UID, UID);
    await node.start({ "hkd.timeout.vma_start": "60" });
    const t0 = performance.now();
    await D.startVm(sql(), ALL, vm.id, { aliveWithinS: 60 });
    await until(
      async () => (await D.get(sql(), D.vms, ALL, vm.id)).vm_state === "running",
      "the desktop to run",
      300_000,
    );
    console.log(
      `  [timing] start command → running (image unpacked with shifted owners, home shifted) in ${((performance.now() - t0) / 1000).toFixed(1)} s`,
    );
    const [r] = await sql()`SELECT vma_secret FROM vm_runtimes WHERE vm_id = ${vm.id}`;
    secret = r!.vma_secret;
    initPid = Number(
      (await run([...node.ns.exec, "lxc-info", "-n", `qvd-${vm.id}`, "-P", node.lxcPath, "-p", "-H"])).stdout.trim(),
    );
    const [di] = (await D.list(sql(), D.dis, ALL, {})).rows;
    basefs = join(node.root, "storage", "basefs", String(di!.id));
  }, 30 * 60_000);

  afterAll(async () => {
    await node.stop();
  }, 120_000);

  test("container root is an unprivileged uid on the node: uid_map and the init's owner", async () => {
    expect((await sh("cat /proc/1/uid_map")).stdout.trim().split(/\s+/)).toEqual(["0", String(BASE), "65536"]);
    expect((await sh("cat /proc/1/gid_map")).stdout.trim().split(/\s+/)).toEqual(["0", String(BASE), "65536"]);
    expect((await sh("id -u")).stdout.trim()).toBe("0"); // root inside…
    const status = readFileSync(`/proc/${initPid}/status`, "utf8");
    expect(status).toMatch(new RegExp(`^Uid:\\s+${BASE}\\s+${BASE}\\s+${BASE}\\s+${BASE}$`, "m")); // …not on the node
    expect(readFileSync(`/proc/${initPid}/uid_map`, "utf8")).not.toMatch(/^\s*0\s+0\s+4294967295/m);
  });

  test("the ways out through /proc are closed: core_pattern, mount -t proc, the node's sysctls", async () => {
    const before = readFileSync("/proc/sys/kernel/core_pattern", "utf8");
    const w = await sh("echo '|/tmp/pwned' > /proc/sys/kernel/core_pattern");
    expect(w.status).not.toBe(0);
    expect(w.stderr).toMatch(/Read-only file system|Permission denied/);
    const m = await sh("mkdir -p /tmp/p && mount -t proc proc /tmp/p");
    expect(m.status).not.toBe(0);
    expect(m.stderr).toMatch(/permission denied|not permitted/i);
    // Even a fresh proc would not help: sysctls of the node are not the container root's to write.
    for (const sysctl of ["kernel/sysrq", "vm/drop_caches"]) {
      const r = await sh(`echo 1 > /proc/sys/${sysctl}`);
      expect([sysctl, r.status === 0]).toEqual([sysctl, false]);
    }
    expect(readFileSync("/proc/sys/kernel/core_pattern", "utf8")).toBe(before);
  });

  test("capabilities: no sys_admin, sys_module, sys_rawio, sys_time, ptrace, net_admin, mknod; setuid and chown stay", async () => {
    for (const pid of ["1", "self"]) {
      const st = (await sh(`cat /proc/${pid}/status`)).stdout;
      const bnd = /^CapBnd:\s+([0-9a-f]+)$/m.exec(st)![1]!;
      const eff = /^CapEff:\s+([0-9a-f]+)$/m.exec(st)![1]!;
      for (const c of [
        "sys_admin",
        "sys_module",
        "sys_rawio",
        "sys_time",
        "sys_ptrace",
        "net_admin",
        "mknod",
      ] as const) {
        expect([c, hasCap(bnd, CAP[c])]).toEqual([c, 0n]);
        expect([c, hasCap(eff, CAP[c])]).toEqual([c, 0n]);
      }
      for (const c of ["setuid", "setgid", "chown"] as const) expect([c, hasCap(bnd, CAP[c])]).toEqual([c, 1n]);
    }
    expect((await sh("ip link set eth0 down")).status).not.toBe(0); // no net_admin
    expect((await sh("mknod /tmp/sda b 8 0")).status).not.toBe(0); // no mknod
  });

  test("the image's setuid-root files give a node user nothing", async () => {
    const su = statSync(join(basefs, "usr/bin/su"));
    expect(su.mode & 0o4000).toBe(0o4000); // still setuid: for the guest's root only
    expect(su.uid).toBe(BASE); // not node root
    const gate = statSync(join(node.root, "storage", "basefs"));
    expect([gate.uid, gate.gid, gate.mode & 0o777]).toEqual([0, BASE, 0o710]);
    for (const dir of ["overlays", "homes"]) expect(statSync(join(node.root, "storage", dir)).mode & 0o777).toBe(0o710);
    // A node user cannot even reach them. (Through a shell: setpriv's own execve still holds
    // root's capabilities while it resolves the path.)
    const tryAs = (argv: string[]) =>
      run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/bin/sh", "-c", 'exec "$@"', "sh", ...argv],
        { allowFail: true },
      );
    const r = await tryAs([join(basefs, "usr/bin/su"), "-c", "id"]);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/Permission denied/);
    expect((await tryAs(["ls", join(node.root, "storage", "homes")])).status).not.toBe(0);
    // No file capability survived the unpack.
    expect((await run(["getcap", "-r", join(basefs, "usr")], { allowFail: true })).stdout.trim()).toBe("");
  });

  test("the image's vma.conf does not change how the VMA runs", async () => {
    const log = readFileSync(join(node.lxcPath, "logs", `qvd-${vm.id}.console.log`), "utf8");
    for (const k of [
      "vma.provision.root",
      "vma.session.as_current_user",
      "vma.on_action.expire",
      "vma.command.xinit",
      "vma.user.home.path",
    ])
      expect(log).toMatch(new RegExp(`ignoring a setting of the image's vma.conf.*${k.replace(/\./g, "\\.")}`));
    // expire would run the image's program as the container's root: nothing runs.
    expect((await vma("expire", { hard: Math.floor(Date.now() / 1000) + 3600 })).status).toBe(200);
    expect((await sh("test -e /tmp/pwned")).status).not.toBe(0);
  });

  test("the desktop still works: x_start provisions the user, nxagent listens on 4100 as the user", async () => {
    const res = await vma("x_start", {
      user: "alice",
      uid: UID,
      gid: UID,
      cookie: "0123456789abcdef0123456789abcdef",
      geometry: "1024x768",
      keyboard: "pc105/us",
      link: "lan",
      client_os: "linux",
    });
    if (res.status !== 200) console.log("x_start:", res.json);
    expect(res.status).toBe(200);
    await until(async () => (await vma("x_state")).json?.state === "listening", "nxagent to listen", 90_000);
    const ps = (await sh("ps -eo uid,comm")).stdout;
    expect(ps).toMatch(new RegExp(`^\\s*${UID} nxagent$`, "m")); // not as_current_user (root)
    expect(ps).not.toMatch(/^\s*0 nxagent$/m);
    expect((await sh("cat /proc/net/tcp")).stdout).toMatch(/:1004 00000000:0000 0A/); // 4100 listening
    expect((await sh("test -e /tmp/pwned")).status).not.toBe(0); // the image's xinit did not run
    // Provisioned in the guest's own root with the node's home path; the image's shell applies.
    expect((await sh("grep ^alice: /etc/passwd")).stdout.trim()).toBe(`alice:x:${UID}:${UID}::/home/alice:/bin/sh`);
    expect((await sh("test -e /tmp/elsewhere")).status).not.toBe(0);
    // The home from before was shifted once: the user reads their old file, and on the node
    // it belongs to base+uid.
    expect((await sh("cat /home/alice/old/letter.txt", String(UID))).stdout).toBe("from before\n");
    const home = join(node.root, "storage", "homes", "default", "alice");
    for (const p of [home, join(home, "old", "letter.txt")]) expect(statSync(p).uid).toBe(BASE + UID);
    expect((await sh("stat -c %u /home/alice")).stdout.trim()).toBe(String(UID));
  });
});
