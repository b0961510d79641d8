// The LXC backend against real LXC, in a network namespace this file creates (addresses from
// 198.18.0.0/15 only) and removes. The root filesystem is a static busybox with a small init
// script; the "qvd binary" bind-mounted into the guests is dist/qvd when built, else busybox.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import {
  existsSync,
  mkdirSync,
  readFileSync,
  rmSync,
  statSync,
  lstatSync,
  writeFileSync,
  chmodSync,
  chownSync,
  copyFileSync,
  symlinkSync,
  readdirSync,
} from "node:fs";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import {
  CAPS,
  DEFAULT_IDMAP,
  LxcBackend,
  SECCOMP_DENY,
  detectCgroups,
  idmapFromConfig,
  lxcOptionsFromConfig,
  renderConfig,
  sharesToWeight,
  shiftTree,
  type CgroupInfo,
} from "../src/virt/lxc.ts";
import { NodeNetwork, nodeNetworkFromConfig, nthAddress, parsePorts } from "../src/virt/network.ts";
import { Config } from "../src/config.ts";
import { macFor, type VmSpec } from "../src/virt/backend.ts";
import { run } from "../src/run.ts";
import { ensureDeps } from "../scripts/deps.ts";
import { poll } from "./support/wait.ts";

// --- pure parts -------------------------------------------------------------------------------

const baseSpec = (id: number, over: Partial<VmSpec> = {}): VmSpec => ({
  vmId: id,
  hypervisor: "lxc",
  name: `qvd-${id}`,
  memoryMb: 256,
  cpuShares: 512,
  vcpus: 1,
  image: { diId: 1, path: "/srv/basefs/1" },
  overlay: { enabled: true, persistent: false },
  home: { hostPath: "/srv/homes/t/alice", user: "alice", sizeMb: 0 },
  network: {
    ip: `198.18.0.${id + 1}`,
    prefix: 16,
    gateway: "198.18.0.1",
    mac: macFor(`198.18.0.${id + 1}`, "54:52:00"),
    bridge: "qvdbr0",
  },
  vma: { port: 3030, secret: "s3cret" },
  qvdBinary: "/usr/bin/qvd",
  ...over,
});

const ctx = (cgroups: CgroupInfo) => ({
  vmDir: "/run/qvd/lxc/qvd-7",
  logDir: "/run/qvd/lxc/logs",
  upperDir: "/srv/overlays/7/upper",
  cgroups,
  vmaInit: true,
  init: "/sbin/init",
  guestQvdPath: "/usr/local/bin/qvd",
  haltSignal: "SIGPWR",
  apparmorProfile: "unconfined",
  idmap: DEFAULT_IDMAP,
});

describe("LXC configuration", () => {
  test("cgroup v1 (hybrid host): legacy keys, swap limited with memsw", () => {
    const c = renderConfig(baseSpec(7), ctx({ memory: "v1", cpu: "v1", devices: "v1", memsw: true, swapMax: false }));
    expect(c).toContain("lxc.cgroup.memory.limit_in_bytes = 268435456\n");
    expect(c).toContain("lxc.cgroup.memory.memsw.limit_in_bytes = 268435456\n");
    expect(c).toContain("lxc.cgroup.cpu.shares = 512\n");
    expect(c).toContain("lxc.cgroup.devices.deny = a\n");
    expect(c).not.toContain("lxc.cgroup2.");
    expect(c).toContain("lxc.rootfs.path = overlay:/srv/basefs/1:/srv/overlays/7/upper\n");
    expect(c).toContain("lxc.net.0.hwaddr = 54:52:00:12:00:08\n");
    expect(c).toContain("lxc.net.0.ipv4.address = 198.18.0.8/16\n");
    expect(c).toContain("lxc.net.0.ipv4.gateway = 198.18.0.1\n");
    expect(c).toContain("lxc.init.cmd = /usr/local/bin/qvd vma\n");
    expect(c).toContain("lxc.mount.entry = /usr/bin/qvd usr/local/bin/qvd none bind,ro,create=file 0 0\n");
    expect(c).toContain("lxc.mount.entry = /srv/homes/t/alice home/alice none bind,create=dir 0 0\n");
    expect(c).toContain(
      "lxc.mount.entry = /run/qvd/lxc/qvd-7/vma.json run/qvd/vma.json none bind,ro,create=file 0 0\n",
    );
    expect(c).not.toContain("lxc.net.0.link"); // attached by script.up (see lxc.ts)
  });

  test("cgroup v2: unified keys, cpu.weight from shares", () => {
    const c = renderConfig(
      baseSpec(7, { cpuShares: 1024 }),
      ctx({ memory: "v2", cpu: "v2", devices: "v2", memsw: false, swapMax: true }),
    );
    expect(c).toContain("lxc.cgroup2.memory.max = 268435456\n");
    expect(c).toContain("lxc.cgroup2.memory.swap.max = 0\n");
    expect(c).toContain(`lxc.cgroup2.cpu.weight = ${sharesToWeight(1024)}\n`);
    expect(c).toContain("lxc.cgroup2.devices.deny = a\n");
    expect(c).not.toMatch(/lxc\.cgroup\.[a-z]/);
    expect(sharesToWeight(1024)).toBe(39);
    expect(sharesToWeight(2)).toBe(1);
    expect(sharesToWeight(262144)).toBe(10000);
  });

  test("no overlay: read-only image, paths with spaces escaped, own init", () => {
    const spec = baseSpec(7, {
      overlay: { enabled: false, persistent: false },
      home: { hostPath: "/srv/my homes/alice", user: "alice", sizeMb: 0 },
    });
    const c = renderConfig(spec, {
      ...ctx({ memory: null, cpu: null, devices: null, memsw: false, swapMax: false }),
      vmaInit: false,
    });
    expect(c).toContain("lxc.rootfs.path = dir:/srv/basefs/1\nlxc.rootfs.options = ro\n");
    expect(c).toContain("lxc.mount.entry = /srv/my\\040homes/alice home/alice");
    expect(c).toContain("lxc.init.cmd = /sbin/init\n");
    expect(() =>
      renderConfig(
        baseSpec(7, { home: { hostPath: "/h", user: "../x", sizeMb: 0 } }),
        ctx({ memory: null, cpu: null, devices: null, memsw: false, swapMax: false }),
      ),
    ).toThrow();
  });

  test("unprivileged: id map, a capability allow-list, AppArmor only where the kernel has it", () => {
    const none = { memory: null, cpu: null, devices: null, memsw: false, swapMax: false } as const;
    const c = renderConfig(baseSpec(7), { ...ctx(none), idmap: { base: 200000, size: 65536 } });
    expect(c).toContain("lxc.idmap = u 0 200000 65536\nlxc.idmap = g 0 200000 65536\n");
    // An allow-list: what the VMA needs, nothing that reaches mounts, modules, raw I/O or the clock.
    expect(c).toContain(`lxc.cap.keep = ${CAPS.join(" ")}\n`);
    expect(c).not.toContain("lxc.cap.drop");
    for (const cap of [
      "sys_admin",
      "sys_module",
      "sys_rawio",
      "sys_time",
      "sys_ptrace",
      "net_admin",
      "mknod",
      "mac_admin",
      "syslog",
    ])
      expect(CAPS).not.toContain(cap);
    for (const cap of ["setuid", "setgid", "chown", "kill"]) expect(CAPS).toContain(cap);
    // No AppArmor on the node (this machine): unconfined, and nothing pretends otherwise.
    expect(c).toContain("lxc.apparmor.profile = unconfined\n");
    expect(c).not.toContain("allow_nesting");
    // AppArmor present: LXC's generated profile without nesting.
    const a = renderConfig(baseSpec(7), { ...ctx(none), apparmorProfile: "generated" });
    expect(a).toContain("lxc.apparmor.profile = generated\nlxc.apparmor.allow_nesting = 0\n");
    for (const sc of [
      "keyctl",
      "bpf",
      "perf_event_open",
      "userfaultfd",
      "open_by_handle_at",
      "kexec_load",
      "init_module",
    ])
      expect(SECCOMP_DENY).toContain(sc);
    expect(SECCOMP_DENY).not.toContain("unshare"); // Chromium's sandbox
    expect(SECCOMP_DENY).not.toContain("clone");
    // The range: ids shifted once must never look unshifted.
    const cfg = (base: string) =>
      new Config([], [{ key: "vm.lxc.idmap.base", value: base, source: { kind: "default" } }]);
    expect(idmapFromConfig(cfg("300000"))).toEqual({ base: 300000, size: 65536 });
    expect(() => idmapFromConfig(cfg("1000"))).toThrow(/must be at least vm.lxc.idmap.size/);
  });

  test("shiftTree: ids below the range move by base once; links are not followed; modes kept", () => {
    const dir = `/tmp/qvdt-shift-${randomBytes(3).toString("hex")}`;
    try {
      mkdirSync(join(dir, "sub"), { recursive: true });
      writeFileSync(join(dir, "sub/f"), "x");
      writeFileSync("/tmp/qvdt-shift-outside", "y");
      symlinkSync("/tmp/qvdt-shift-outside", join(dir, "link"));
      for (const p of [dir, join(dir, "sub"), join(dir, "sub/f")]) chownSync(p, 2001, 2001);
      chmodSync(join(dir, "sub/f"), 0o4755); // chown clears setuid: shiftTree must restore it
      const m = { base: 100000, size: 65536 };
      expect(shiftTree(dir, m)).toBe(4);
      expect([statSync(dir).uid, statSync(join(dir, "sub/f")).uid, statSync(join(dir, "sub/f")).gid]).toEqual([
        102001, 102001, 102001,
      ]);
      expect(statSync(join(dir, "sub/f")).mode & 0o7777).toBe(0o4755);
      expect(lstatSync(join(dir, "link")).uid).toBe(100000);
      expect(statSync("/tmp/qvdt-shift-outside").uid).toBe(0); // the link's target is not touched
      expect(shiftTree(dir, m)).toBe(0); // idempotent
    } finally {
      rmSync(dir, { recursive: true, force: true });
      rmSync("/tmp/qvdt-shift-outside", { force: true });
    }
  });

  test("cgroup detection from mountinfo", () => {
    const hybrid = [
      "30 25 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755",
      "33 30 0:29 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory",
      "34 30 0:30 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct",
      "31 30 0:27 / /nonexistent/unified rw - cgroup2 cgroup2 rw",
    ].join("\n");
    const h = detectCgroups(hybrid);
    expect(h.memory).toBe("v1");
    expect(h.cpu).toBe("v1");
    expect(h.devices).toBe("v2");
    expect(detectCgroups("").memory).toBeNull();
    expect(parsePorts("8443, 53/udp")).toEqual([
      { port: 8443, proto: "tcp" },
      { port: 53, proto: "udp" },
    ]);
    expect(nthAddress("198.18.0.0", 1)).toBe("198.18.0.1");
    expect(nthAddress("198.18.0.0", 256)).toBe("198.18.1.0");
  });

  test("options from the configuration", () => {
    const cfg = new Config(
      [],
      [{ key: "vm.network.firewall.node_ports", value: "8443,53/udp", source: { kind: "default" } }],
    );
    const net = nodeNetworkFromConfig(cfg);
    expect(net.o).toMatchObject({
      bridge: "qvdnet0",
      gateway: "198.18.0.1",
      range: "198.18.0.0/16",
      createBridge: true,
      firewall: true,
      outbound: true,
    });
    expect(net.o.nodePorts).toEqual([
      { port: 8443, proto: "tcp" },
      { port: 53, proto: "udp" },
    ]);
    const rules = net.firewallRuleset();
    expect(rules).toContain("ct state new tcp dport { 8443 } accept");
    expect(rules).toContain("udp dport { 53 } accept");
    // By default nothing routed reaches a VM (its VMA and nxagent are the node's); vm_ports opens
    // ports, masqueraded so that the VM still sees only the node's address.
    expect(net.o.vmPorts).toEqual([]);
    expect(rules).not.toMatch(/tcp dport \{ 3030|masquerade/);
    const routed = nodeNetworkFromConfig(
      new Config([], [{ key: "vm.network.firewall.vm_ports", value: "3030,4100", source: { kind: "default" } }]),
    ).firewallRuleset();
    expect(routed).toContain("tcp dport { 3030, 4100 } accept");
    expect(routed).toContain('oifname "qvdnet0" ip daddr 198.18.0.0/16 tcp dport { 3030, 4100 } masquerade');
    const o = lxcOptionsFromConfig(cfg, net);
    expect(o).toMatchObject({
      lxcPath: "/run/qvd/lxc",
      storageRoot: "/var/lib/qvd/storage",
      overlaysRoot: "/var/lib/qvd/storage/overlays",
      vmaInit: true,
      init: "/sbin/init",
      guestQvdPath: "/usr/local/bin/qvd",
    });
    expect(o.haltSignal).toBeUndefined();
    // A shared root with the writable layers on a local disk (overlayfs cannot write to NFS).
    const local = new LxcBackend(
      lxcOptionsFromConfig(
        new Config([], [{ key: "path.storage.overlays", value: "/srv/local/overlays", source: { kind: "default" } }]),
        net,
      ),
    );
    expect(local.overlayDir(7)).toBe("/srv/local/overlays/7");
    expect(new LxcBackend(o).overlayDir(7)).toBe("/var/lib/qvd/storage/overlays/7");
  });
});

// --- real containers --------------------------------------------------------------------------

const isRoot = process.getuid?.() === 0;
const hasNetns = isRoot && (await run(["ip", "netns", "list"], { allowFail: true })).status === 0;

describe.skipIf(!hasNetns)("LXC backend (real lxc, own netns)", () => {
  const tag = randomBytes(3).toString("hex");
  const ns = `qvdt-${tag}`;
  const root = `/tmp/qvdt-lxc-${tag}`;
  const storage = join(root, "storage");
  const rootfs = join(storage, "basefs", "1");
  let qvdBinary = "";
  let net!: NodeNetwork;
  let lxc!: LxcBackend;
  const started = new Set<number>();

  const sh = (vmId: number, script: string, allowFail = false) =>
    net.run(["lxc-attach", "-n", `qvd-${vmId}`, "-P", lxc.lxcPath, "--", "/bin/sh", "-c", script], {
      allowFail,
      timeoutMs: 20_000,
    });
  const inNs = (argv: string[], allowFail = false) =>
    run(["ip", "netns", "exec", ns, ...argv], { allowFail, timeoutMs: 20_000 });
  const ping = async (ip: string) => (await inNs(["busybox", "ping", "-c", "1", "-W", "2", ip], true)).status === 0;
  const spec = (id: number, over: Partial<VmSpec> = {}): VmSpec =>
    baseSpec(id, {
      image: { diId: 1, path: rootfs },
      home: { hostPath: join(storage, "homes", "t1", `user${id}`), user: `user${id}`, sizeMb: 0 },
      qvdBinary,
      vma: { port: 3030, secret: `secret-${id}-${tag}` },
      ...over,
    });
  const start = async (s: VmSpec) => {
    started.add(s.vmId);
    await lxc.prepare(s);
    const t0 = performance.now();
    const r = await lxc.start(s);
    console.log(`  [timing] qvd-${s.vmId}: start → RUNNING in ${(performance.now() - t0).toFixed(0)} ms`);
    return r;
  };
  /** The cgroup directories (memory controller, v1 or v2) of a running container's init. */
  const memoryCgroupDir = (pid: number): string => {
    const lines = readFileSync(`/proc/${pid}/cgroup`, "utf8").trim().split("\n");
    const v1 = lines.find((l) => l.split(":")[1]!.split(",").includes("memory"));
    if (v1) return `/sys/fs/cgroup/memory${v1.split(":")[2]}`;
    return `/sys/fs/cgroup${lines.find((l) => l.startsWith("0::"))!.slice(3)}`;
  };

  /** LXC cgroup directories of a container anywhere in the cgroup hierarchies. */
  const leftoverCgroups = (name: string): string[] => {
    const found: string[] = [];
    const walk = (dir: string, depth: number) => {
      if (depth > 4) return;
      let ents: string[] = [];
      try {
        ents = readdirSync(dir, { withFileTypes: true })
          .filter((e) => e.isDirectory())
          .map((e) => e.name);
      } catch {}
      for (const e of ents) {
        if (e === `lxc.monitor.${name}` || e === `lxc.payload.${name}`) found.push(join(dir, e));
        else if (!e.startsWith("lxc.")) walk(join(dir, e), depth + 1);
      }
    };
    walk("/sys/fs/cgroup", 0);
    return found;
  };

  beforeAll(async () => {
    await ensureDeps(["lxc", "iproute2", "nftables", "nsenter", "busybox"], () => {});
    // A busybox root filesystem. init.sh stands in for the VMA: it powers off on SIGPWR.
    for (const d of ["bin", "sbin", "etc", "proc", "sys", "dev", "run", "tmp", "home", "root", "usr/local/bin"])
      mkdirSync(join(rootfs, d), { recursive: true });
    const bb = existsSync("/usr/bin/busybox") ? "/usr/bin/busybox" : "/bin/busybox";
    copyFileSync(bb, join(rootfs, "bin/busybox"));
    chmodSync(join(rootfs, "bin/busybox"), 0o755);
    for (const a of [
      "sh",
      "ls",
      "cat",
      "echo",
      "sleep",
      "ping",
      "touch",
      "test",
      "stat",
      "mount",
      "ip",
      "grep",
      "id",
      "nc",
    ])
      symlinkSync("busybox", join(rootfs, "bin", a));
    writeFileSync(join(rootfs, "etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n");
    writeFileSync(
      join(rootfs, "sbin/init.sh"),
      "#!/bin/sh\ntrap 'echo bye > /run/bye; exit 0' PWR TERM\necho ready > /run/ok\nsleep 100000 &\nwait\n",
      { mode: 0o755 },
    );
    // An init that ignores the halt signal (for stop → false → kill).
    writeFileSync(join(rootfs, "sbin/stubborn.sh"), "#!/bin/sh\ntrap '' PWR TERM\nwhile :; do sleep 1; done\n", {
      mode: 0o755,
    });
    qvdBinary = existsSync("dist/qvd") ? join(process.cwd(), "dist/qvd") : bb;
    // Owned as images.ts unpacks it for unprivileged desktops (guest root = the range's base).
    shiftTree(rootfs, DEFAULT_IDMAP);

    await run(["ip", "netns", "add", ns]);
    await run(["ip", "-n", ns, "link", "set", "lo", "up"]);
    net = new NodeNetwork({
      bridge: "qvdbr0",
      gateway: "198.18.0.1",
      range: "198.18.0.0/16",
      createBridge: true,
      firewall: true,
      nodePorts: parsePorts("8443"),
      vmPorts: parsePorts("3030,4100"),
      outbound: true,
      netns: ns,
    });
    await net.setup();
    lxc = new LxcBackend({
      lxcPath: join(root, "lxc"),
      storageRoot: storage,
      network: net,
      vmaInit: false,
      init: "/sbin/init.sh",
      haltSignal: "SIGPWR",
    });
  }, 600_000);

  afterAll(async () => {
    // Everything this file created, whatever happened.
    for (const id of started) await lxc?.cleanup(id).catch((e) => console.error(`cleanup ${id}: ${e}`));
    await net?.teardown({ removeBridge: true }).catch(() => {});
    await run(["ip", "netns", "del", ns], { allowFail: true });
    rmSync(root, { recursive: true, force: true });
  }, 120_000);

  test("two containers: network, isolation, firewall, home, binary, vma.json, limits, ptys", async () => {
    const a = spec(1);
    const b = spec(2, { overlay: { enabled: true, persistent: true }, memoryMb: 192 });
    const { pid } = await start(a);
    await start(b);
    expect(pid).toBeGreaterThan(0);
    expect(await lxc.status(1)).toBe("running");
    expect(await lxc.running()).toEqual([1, 2]);

    // The node reaches both; the veths are isolated bridge ports with the VM's MAC on the far end.
    expect(await ping("198.18.0.2")).toBe(true);
    expect(await ping("198.18.0.3")).toBe(true);
    const link = (await run(["ip", "-n", ns, "-d", "link", "show", "qvd1"])).stdout;
    expect(link).toContain("master qvdbr0");
    expect(link).toContain("isolated on");
    expect((await sh(1, "cat /sys/class/net/eth0/address")).stdout.trim()).toBe(a.network.mac);
    // VM → VM: nothing passes. VM → node: not even ping (only listed ports; none listen here).
    expect((await sh(1, "ping -c 1 -W 2 198.18.0.3", true)).status).not.toBe(0);
    expect((await sh(2, "ping -c 1 -W 2 198.18.0.2", true)).status).not.toBe(0);
    expect((await sh(1, "ping -c 1 -W 2 198.18.0.1", true)).status).not.toBe(0);
    // VM → node: a listed port (8443) answers, another one (9999) does not.
    const listener = Bun.spawn(
      [
        "ip",
        "netns",
        "exec",
        ns,
        process.execPath,
        "-e",
        `for (const port of [8443, 9999]) Bun.listen({ hostname: "198.18.0.1", port, socket: { open(s) { s.end("hi" + port + "\\n"); }, data() {} } }); console.log("up");`,
      ],
      { stdout: "pipe", stderr: "inherit" },
    );
    try {
      await listener.stdout.getReader().read(); // "up"
      expect((await sh(1, "nc -w 2 198.18.0.1 8443 </dev/null", true)).stdout).toBe("hi8443\n");
      expect((await sh(1, "nc -w 2 198.18.0.1 9999 </dev/null", true)).stdout).toBe("");
      expect((await inNs(["busybox", "nc", "-w", "2", "198.18.0.1", "9999"], true)).stdout).toBe("hi9999\n"); // it does listen
    } finally {
      listener.kill();
      await listener.exited;
    }
    // A spoofed source address: the container's root may not even set one (no net_admin), and
    // the bridge's rules would drop it anyway.
    expect((await sh(1, "ip addr add 198.18.0.99/16 dev eth0", true)).stderr).toMatch(/not permitted/i);
    expect(await ping("198.18.0.99")).toBe(false);

    // Home on shared storage, bind-mounted.
    await sh(1, "echo hello > /home/user1/hello.txt");
    expect(readFileSync(join(a.home.hostPath, "hello.txt"), "utf8")).toBe("hello\n");
    // The qvd binary, read-only.
    expect((await sh(1, "test -x /usr/local/bin/qvd")).status).toBe(0);
    expect((await sh(1, "echo x > /usr/local/bin/qvd", true)).status).not.toBe(0);
    expect(statSync(qvdBinary).size).toBeGreaterThan(1000); // untouched
    // The VMA's secret.
    const vma = JSON.parse((await sh(1, "cat /run/qvd/vma.json")).stdout);
    expect(vma).toEqual({ vm_id: 1, secret: a.vma.secret, node_address: "198.18.0.1", port: 3030, settings: {} });
    expect((await sh(1, "stat -c %a:%u /run/qvd/vma.json")).stdout.trim()).toBe("400:0"); // the guest's root
    expect(statSync(join(lxc.vmDir(1), "vma.json")).uid).toBe(DEFAULT_IDMAP.base); // an unprivileged uid on the node
    expect((await sh(1, "echo x > /run/qvd/vma.json", true)).status).not.toBe(0);
    // Memory limit in the container's cgroup.
    const cg = memoryCgroupDir(pid!);
    const limitFile = existsSync(join(cg, "memory.limit_in_bytes")) ? "memory.limit_in_bytes" : "memory.max";
    expect(readFileSync(join(cg, limitFile), "utf8").trim()).toBe(String(256 * 1024 * 1024));
    // devpts: a pty can be opened.
    const pts = await sh(1, "exec 3<>/dev/ptmx && ls /dev/pts");
    expect(pts.stdout.split(/\s+/)).toContain("0");
    // The image's root is writable through the overlay (upper dir), the image stays untouched.
    await sh(2, "echo kept > /root/persistent.txt");
    await sh(1, "echo gone > /root/scratch.txt");
    expect(existsSync(join(rootfs, "root/scratch.txt"))).toBe(false);
    expect(existsSync(join(storage, "overlays/1/upper/root/scratch.txt"))).toBe(true);

    // Clean stop: init gets SIGPWR and exits.
    let t0 = performance.now();
    expect(await lxc.stop(1, 10_000)).toBe(true);
    console.log(`  [timing] qvd-1: stop (SIGPWR to init) in ${(performance.now() - t0).toFixed(0)} ms`);
    t0 = performance.now();
    expect(await lxc.stop(2, 10_000)).toBe(true);
    console.log(`  [timing] qvd-2: stop in ${(performance.now() - t0).toFixed(0)} ms`);
    expect(await lxc.status(1)).toBe("stopped");
    t0 = performance.now();
    await lxc.cleanup(1);
    await lxc.cleanup(2);
    console.log(`  [timing] cleanup of both in ${(performance.now() - t0).toFixed(0)} ms`);
    await lxc.cleanup(2); // idempotent

    // Nothing left: container, mounts, veths, cgroups, firewall chains, config; upper dirs by persistence.
    expect(await lxc.running()).toEqual([]);
    expect(readFileSync("/proc/self/mounts", "utf8")).not.toContain(root);
    const links = (await run(["ip", "-n", ns, "link"])).stdout;
    expect(links).not.toContain("qvd1");
    expect(links).not.toContain("qvd2");
    expect(existsSync(cg)).toBe(false);
    expect(leftoverCgroups("qvd-1")).toEqual([]);
    expect((await net.run(["nft", "list", "table", "bridge", "qvd"])).stdout).not.toMatch(/chain vm[12]\b/);
    expect(existsSync(lxc.vmDir(1))).toBe(false);
    expect(existsSync(join(storage, "overlays/1"))).toBe(false);
    expect(readFileSync(join(storage, "overlays/2/upper/root/persistent.txt"), "utf8")).toBe("kept\n");
    expect(readdirSync(join(storage, "overlays"))).toEqual(["2"]); // no .deleteme-* left
    expect(readFileSync(join(a.home.hostPath, "hello.txt"), "utf8")).toBe("hello\n");

    // Restart: the home and the persistent layer are back, the scratch layer is fresh.
    await start(a);
    await start(b);
    expect((await sh(1, "cat /home/user1/hello.txt")).stdout).toBe("hello\n");
    expect((await sh(1, "test -e /root/scratch.txt", true)).status).not.toBe(0);
    expect((await sh(2, "cat /root/persistent.txt")).stdout).toBe("kept\n");
    expect(await ping("198.18.0.2")).toBe(true);
    // The node's own address as the VMA's caller: the guest sees the gateway.
    expect((await sh(2, "ip route")).stdout).toContain("default via 198.18.0.1");
    for (const id of [1, 2]) {
      expect(await lxc.stop(id, 10_000)).toBe(true);
      await lxc.cleanup(id);
    }
    expect(await lxc.running()).toEqual([]);
  }, 180_000);

  test("an init that ignores the halt signal: stop reports false, kill ends it, cleanup leaves nothing", async () => {
    const stub = new LxcBackend({
      lxcPath: lxc.lxcPath,
      storageRoot: storage,
      network: net,
      vmaInit: false,
      init: "/sbin/stubborn.sh",
    });
    const s = spec(3);
    started.add(3);
    await stub.prepare(s);
    const { pid } = await stub.start(s);
    const cg = memoryCgroupDir(pid!);
    let t0 = performance.now();
    expect(await stub.stop(3, 1000)).toBe(false);
    console.log(`  [timing] qvd-3: stop gave up after ${(performance.now() - t0).toFixed(0)} ms`);
    expect(await stub.status(3)).toBe("running");
    t0 = performance.now();
    await stub.kill(3);
    console.log(`  [timing] qvd-3: kill in ${(performance.now() - t0).toFixed(0)} ms`);
    expect(await stub.status(3)).toBe("stopped");
    await stub.kill(3); // idempotent
    await stub.cleanup(3);
    expect(existsSync(cg)).toBe(false);
    expect((await run(["ip", "-n", ns, "link"])).stdout).not.toContain("qvd3");
    expect(existsSync(join(storage, "overlays/3"))).toBe(false);
  }, 120_000);

  test("the VMA as the container's init (qvd binary built from this tree)", async () => {
    const bin = join(root, "bin", "qvd");
    const built = await run(["node_modules/.bin/bun", "scripts/build-binaries.ts", "--outfile", bin], {
      allowFail: true,
      timeoutMs: 300_000,
    });
    if (built.status !== 0 || (await run([bin, "vma", "--help"], { allowFail: true })).status !== 0) {
      console.log(
        `  [skip] no qvd binary with a vma command: ${(built.stderr || built.stdout).trim().split("\n").pop()}`,
      );
      return;
    }
    // The binary is dynamically linked against glibc: give the busybox image its libraries.
    for (const m of (await run(["ldd", bin])).stdout.matchAll(/(\/\S+\.so[.\d]*)/g)) {
      const lib = m[1]!;
      mkdirSync(join(rootfs, lib, ".."), { recursive: true });
      if (!existsSync(join(rootfs, lib))) copyFileSync(lib, join(rootfs, lib));
    }
    const vmaLxc = new LxcBackend({ lxcPath: lxc.lxcPath, storageRoot: storage, network: net }); // defaults: VMA is init
    const s = spec(7, { qvdBinary: bin, vma: { port: 3030, secret: randomBytes(24).toString("base64url") } });
    started.add(7);
    await vmaLxc.prepare(s);
    let t0 = performance.now();
    await vmaLxc.start(s);
    // HTTP from the node's namespace (a bun one-liner: the test process itself is outside it).
    const get = (secret?: string) =>
      inNs(
        [
          process.execPath,
          "-e",
          `const r = await fetch("http://198.18.0.8:3030/vma/ping", { headers: ${JSON.stringify(secret ? { "X-QVD-VMA-Secret": secret } : {})}, signal: AbortSignal.timeout(2000) }); console.log(r.status, await r.text())`,
        ],
        true,
      );
    const answer =
      (await poll(async () => {
        const r = await get(s.vma.secret);
        return r.status === 0 && r.stdout.startsWith("200 ") && r.stdout;
      }, 30_000)) ?? "";
    console.log(
      `  [timing] qvd-7: start → VMA answers in ${(performance.now() - t0).toFixed(0)} ms: ${answer.trim().slice(0, 80)}`,
    );
    if (!answer) console.log(readFileSync(vmaLxc.consoleLog(7), "utf8").slice(-2000));
    expect(JSON.parse(answer.slice(4))).toMatchObject({ ok: true, vm_id: 7 });
    // Without the secret: refused.
    expect((await get()).stdout).toStartWith("403 ");
    t0 = performance.now();
    const stopped = await vmaLxc.stop(7, 20_000);
    if (!stopped) console.log(readFileSync(vmaLxc.consoleLog(7), "utf8").slice(-3000));
    expect(stopped).toBe(true);
    console.log(`  [timing] qvd-7: VMA powered off on SIGTERM in ${(performance.now() - t0).toFixed(0)} ms`);
    await vmaLxc.cleanup(7);
    expect(await lxc.running()).toEqual([]);
  }, 400_000);

  test("without an overlay: the image is read-only, home and binary still mounted", async () => {
    const s = spec(6, { overlay: { enabled: false, persistent: false } });
    await start(s);
    expect((await sh(6, "touch /root/x", true)).status).not.toBe(0); // read-only image
    await sh(6, "echo ro-home > /home/user6/f.txt");
    expect(readFileSync(join(s.home.hostPath, "f.txt"), "utf8")).toBe("ro-home\n");
    expect((await sh(6, "test -x /run/qvd/bin/qvd && cat /run/qvd/vma.json")).stdout).toContain('"vm_id":6');
    expect(await lxc.stop(6, 10_000)).toBe(true);
    await lxc.cleanup(6);
    // The image is untouched: no mount points or files were created in it.
    expect(readdirSync(join(rootfs, "home"))).toEqual([]);
    expect(readdirSync(join(rootfs, "run"))).toEqual([]);
    expect(existsSync(join(rootfs, "usr/local/bin/qvd"))).toBe(false);
  }, 120_000);

  test("a persistent layer and a home from before (unshifted owners) are shifted once at prepare; new ones belong to the mapped root", async () => {
    const s = spec(9, { overlay: { enabled: true, persistent: true } });
    const upper = lxc.upperDir(9);
    mkdirSync(join(upper, "root"), { recursive: true });
    writeFileSync(join(upper, "root/kept.txt"), "old layer\n");
    mkdirSync(s.home.hostPath, { recursive: true });
    writeFileSync(join(s.home.hostPath, "old.txt"), "old home\n");
    for (const p of [s.home.hostPath, join(s.home.hostPath, "old.txt")]) chownSync(p, 2001, 2001);
    started.add(9);
    await lxc.prepare(s);
    const B = DEFAULT_IDMAP.base;
    expect([statSync(upper).uid, statSync(join(upper, "root/kept.txt")).uid]).toEqual([B, B]);
    expect([statSync(s.home.hostPath).uid, statSync(join(s.home.hostPath, "old.txt")).gid]).toEqual([
      B + 2001,
      B + 2001,
    ]);
    // Gates: the mapped root crosses them by group, nobody else.
    for (const d of [join(storage, "overlays"), join(storage, "homes"), join(storage, "homes", "t1"), lxc.vmDir(9)])
      expect([d, statSync(d).uid, statSync(d).gid, statSync(d).mode & 0o777]).toEqual([d, 0, B, 0o710]);
    expect(statSync(join(lxc.vmDir(9), "vma.json")).uid).toBe(B);
    await lxc.cleanup(9);
    rmSync(lxc.overlayDir(9), { recursive: true, force: true });
  }, 60_000);

  test("cleanup of a running container kills it first; start failures name the reason", async () => {
    const s = spec(4);
    await start(s);
    await lxc.cleanup(4);
    expect(await lxc.running()).toEqual([]);
    expect((await run(["ip", "-n", ns, "link"])).stdout).not.toContain("qvd4");

    const bad = new LxcBackend({
      lxcPath: lxc.lxcPath,
      storageRoot: storage,
      network: net,
      vmaInit: false,
      init: "/sbin/missing-init",
    });
    started.add(5);
    await bad.prepare(spec(5));
    const err = await bad.start(spec(5)).then(
      () => undefined,
      (e: Error) => e,
    );
    // Either LXC refuses to start, or the init fails at once and the container stops.
    console.log(`  [start failure] ${err?.message ?? "(started, init exited)"}`);
    if (err) expect(err.message).toContain(`Failed to exec "/sbin/missing-init"`);
    await bad.cleanup(5);
    expect(await bad.status(5)).toBe("stopped");
    expect(leftoverCgroups("qvd-5")).toEqual([]);
    expect(await lxc.running()).toEqual([]);
  }, 120_000);
});
