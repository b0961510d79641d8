// Node-side test helpers: the compiled qvd binary (built once per test run), a network
// namespace of the test's own (198.18.0.0/15 only, removed afterwards), a small busybox image
// tarball, and running a qvd role inside the namespace.
import {
  chmodSync,
  copyFileSync,
  createWriteStream,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { dirname, join } from "node:path";
import { createHash, randomBytes } from "node:crypto";
import * as D from "../../src/db/index.ts";
import { buildImage } from "../../src/virt/image-build.ts";
import type { TestDatabase } from "./db.ts";
import { until } from "./wait.ts";
import { run } from "../../src/run.ts";
import { buildBinary } from "../../scripts/build-binaries.ts";
import { createFarmCa, issueNodeCert } from "../../src/farm/certs.ts";
import { builtImageFresh } from "./kvm-image.ts";
import { cleanEnv } from "./spawn.ts";
import { type CertFiles, selfSignedCert } from "./tls.ts";

const shared = ((globalThis as Record<string, unknown>).__qvdTestNode ??= {}) as {
  binary?: Promise<string>;
  farm?: Promise<string>;
  certs?: Map<string, Promise<FarmCert>>;
};

/** The compiled qvd of the current sources, built once per test run into a temp dir. */
export function qvdBinary(): Promise<string> {
  return (shared.binary ??= (async () => {
    const dir = mkdtempSync("/tmp/qvd-test-bin-");
    chmodSync(dir, 0o755);
    return buildBinary(join(dir, "qvd"));
  })());
}

/** Removes the binary built by qvdBinary() and the farm certificates of farmCert() (after the run; a later call makes them anew). */
export async function removeQvdBinary(): Promise<void> {
  const built = shared.binary;
  const farm = shared.farm;
  shared.binary = shared.farm = shared.certs = undefined;
  const path = await built?.catch(() => undefined);
  if (path) rmSync(dirname(path), { recursive: true, force: true });
  const farmDir = await farm?.catch(() => undefined);
  if (farmDir) rmSync(farmDir, { recursive: true, force: true });
}

/** A node's farm TLS files (cluster.tls.ca, cert, key). */
export interface FarmCert {
  ca: string;
  cert: string;
  key: string;
  /** The --set settings that give a node these files. */
  settings: Record<string, string>;
}

/** The test run's farm CA (made once, in a temp dir). */
export function farmCaDir(): Promise<string> {
  return (shared.farm ??= (async () => {
    const dir = mkdtempSync("/tmp/qvd-test-farm-");
    chmodSync(dir, 0o755);
    await createFarmCa(join(dir, "ca"), { name: "QVD test farm CA" });
    return dir;
  })());
}

/** A node certificate of the test run's farm CA for node `name` at `address` (made once per pair). */
export function farmCert(name: string, address: string): Promise<FarmCert> {
  const certs = (shared.certs ??= new Map());
  const k = `${name} ${address}`;
  let c = certs.get(k);
  if (!c)
    certs.set(
      k,
      (c = (async () => {
        const dir = await farmCaDir();
        const out = join(dir, `node-${certs.size}-${name}`);
        const r = await issueNodeCert({ caDir: join(dir, "ca"), name, address, outDir: out });
        const ca = join(dir, "ca", "ca.crt");
        return {
          ca,
          cert: r.cert,
          key: r.key,
          settings: { "cluster.tls.ca": ca, "cluster.tls.cert": r.cert, "cluster.tls.key": r.key },
        };
      })()),
    );
  return c;
}

export interface Netns {
  name: string;
  /** argv prefix that runs a program inside the namespace (nsenter keeps /sys as it is). */
  exec: string[];
  remove(): Promise<void>;
}

export async function createNetns(): Promise<Netns> {
  const name = `qvdt-${randomBytes(3).toString("hex")}`;
  await run(["ip", "netns", "add", name]);
  await run(["ip", "-n", name, "link", "set", "lo", "up"]);
  return {
    name,
    exec: ["nsenter", `--net=/run/netns/${name}`, "--"],
    async remove() {
      await run(["ip", "netns", "del", name], { allowFail: true });
    },
  };
}

/**
 * A tiny root filesystem as an image tarball: static busybox, the directories a container
 * needs, the C libraries the (dynamically linked) qvd binary needs to run as the VMA, and
 * /sbin/init.sh (an init that is not the VMA: sleeps, halts on PWR/TERM).
 */
export async function busyboxImage(file: string): Promise<void> {
  const binary = await qvdBinary();
  const dir = mkdtempSync("/tmp/qvd-test-rootfs-");
  try {
    for (const d of ["bin", "sbin", "etc", "proc", "sys", "dev", "run", "tmp", "home", "root", "usr/local/bin"])
      mkdirSync(join(dir, d), { recursive: true });
    const bb = existsSync("/usr/bin/busybox") ? "/usr/bin/busybox" : "/bin/busybox";
    copyFileSync(bb, join(dir, "bin/busybox"));
    chmodSync(join(dir, "bin/busybox"), 0o755);
    for (const a of ["sh", "ls", "cat", "echo", "sleep", "touch", "test", "mount", "ip", "id", "chown", "mkdir"])
      symlinkSync("busybox", join(dir, "bin", a));
    for (const m of (await run(["ldd", binary])).stdout.matchAll(/(\/\S+\.so[.\d]*)/g)) {
      mkdirSync(join(dir, dirname(m[1]!)), { recursive: true });
      if (!existsSync(join(dir, m[1]!))) copyFileSync(m[1]!, join(dir, m[1]!));
    }
    writeFileSync(join(dir, "etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n");
    writeFileSync(join(dir, "etc/group"), "root:x:0:\n");
    writeFileSync(join(dir, "sbin/init.sh"), "#!/bin/sh\ntrap 'exit 0' PWR TERM\nsleep 100000 &\nwait\n", {
      mode: 0o755,
    });
    await run(["tar", "-C", dir, "--numeric-owner", "-czf", file, "."]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

// `until` lives in ./wait.ts with the other waits, `cleanEnv` in ./spawn.ts; re-exported for the tests that take them from here.
export { cleanEnv, until };

// --- a whole node for end-to-end tests ----------------------------------------------------------

export const DESKTOP_IMAGE = "/var/cache/qvd/test/debian-bookworm-desktop.tar.gz";

export const desktopImageFresh = () => builtImageFresh(DESKTOP_IMAGE);

/** The Debian desktop image of `qvd di build`, cached under /var/cache/qvd (built when stale). */
export async function desktopImage(): Promise<string> {
  if (!desktopImageFresh())
    await buildImage({ output: DESKTOP_IMAGE, cacheDir: "/var/cache/qvd/debootstrap", log: () => {} });
  return DESKTOP_IMAGE;
}

/** Runs a shell command in desktop `vmId` of the LXC path `lxcPath`, from the namespace `exec` enters (as root, unless `user`). */
export function lxcAttach(exec: string[], lxcPath: string, vmId: number, script: string, user?: string) {
  const argv = [
    ...exec,
    "lxc-attach",
    "-n",
    `qvd-${vmId}`,
    "-P",
    lxcPath,
    "--",
    ...(user ? ["setpriv", "--reuid", user, "--regid", user, "--clear-groups"] : []),
    "/bin/sh",
    "-c",
    script,
  ];
  return run(argv, { allowFail: true, timeoutMs: 20_000 });
}

/** How an end-to-end test runs `qvd client`. */
export interface ClientOptions {
  /** The L7R's address (default 127.0.0.1) and port. */
  host?: string;
  port: number;
  user: string;
  password: string;
  /** The X display its nxproxy shows the desktop on. */
  display: number;
  /** More environment (CUPS_SERVER, …). */
  env?: Record<string, string>;
  /** More flags. */
  args?: string[];
}

/**
 * `qvd client` (the compiled `binary`) as a user runs it, inside the namespace `exec` enters: the
 * password from the environment, the L7R's self-signed certificate accepted (--insecure), link lan.
 */
export function spawnClient(exec: string[], binary: string, o: ClientOptions) {
  return Bun.spawn(
    [
      ...exec,
      "env",
      `DISPLAY=:${o.display}`,
      `QVD_PASSWORD=${o.password}`,
      ...Object.entries(o.env ?? {}).map(([k, v]) => `${k}=${v}`),
      binary,
      "client",
      "--host",
      o.host ?? "127.0.0.1",
      "--port",
      String(o.port),
      "--user",
      o.user,
      "--insecure",
      "--link",
      "lan",
      ...(o.args ?? []),
    ],
    { stdout: "pipe", stderr: "pipe" },
  );
}

/**
 * argv that runs ./l7r-probe.ts (list_of_vm, then connect_to_vm of `vmId` as `user`; `mode`:
 * "hold" or "stop", see there) inside the namespace `exec` enters, against the L7R on its
 * 127.0.0.1:`port`.
 */
export const l7rProbeArgv = (exec: string[], port: number, user: string, password: string, vmId: number, mode = "") => [
  ...exec,
  join(import.meta.dir, "../../node_modules/.bin/bun"),
  join(import.meta.dir, "l7r-probe.ts"),
  String(port),
  user,
  password,
  String(vmId),
  mode,
];

/** Runs l7rProbeArgv(…) to its end: what the probe reports (its last line, JSON). */
export async function l7rProbe(...a: Parameters<typeof l7rProbeArgv>): Promise<any> {
  const r = await run(l7rProbeArgv(...a), { timeoutMs: 300_000 });
  return JSON.parse(r.stdout.trim().split("\n").pop()!);
}

/** What TestNode.addDesktop makes. */
export interface Desktop {
  user: D.UserRow;
  osf: D.OsfRow;
  di: D.DiRow;
  vm: D.VmRow;
}

/**
 * A node for tests: a network namespace, storage and run folders in a temp dir, a `hosts` row,
 * and `qvd hkd` (the compiled binary) running inside the namespace. `stop()` removes it all.
 */
export class TestNode {
  ns!: Netns;
  binary!: string;
  root!: string;
  host!: D.HostRow;
  logFile!: string;
  proc?: Bun.Subprocess;

  /** `dbOf`: the test file's database (ready by the time setup() runs). */
  constructor(
    private readonly dbOf: () => TestDatabase,
    readonly name = "testnode",
  ) {}

  get db(): TestDatabase {
    return this.dbOf();
  }

  get lxcPath() {
    return join(this.root, "run", "lxc");
  }

  async setup(): Promise<this> {
    const { ensureDeps } = await import("../../scripts/deps.ts");
    await ensureDeps(["lxc", "iproute2", "nftables", "nsenter", "busybox", "curl"], () => {});
    this.binary = await qvdBinary();
    this.ns = await createNetns();
    this.root = mkdtempSync("/tmp/qvd-test-node-");
    this.l7rFiles = undefined; // l7rCert() makes its files in this root
    chmodSync(this.root, 0o755);
    mkdirSync(join(this.root, "storage", "images"), { recursive: true });
    this.logFile = join(this.root, "hkd.log");
    this.host = await D.create(this.db.sql, D.hosts, D.ALL_TENANTS, { name: this.name, address: "198.18.0.1" });
    return this;
  }

  private l7rFiles?: Promise<CertFiles>;

  /** The L7R's certificate, self-signed (clients take it with --insecure): l7r.crt and l7r.key in the node's folder, made on the first call. */
  l7rCert(cn = "localhost"): Promise<CertFiles> {
    return (this.l7rFiles ??= selfSignedCert(this.root, { cn, names: ["l7r.crt", "l7r.key"] }));
  }

  /**
   * Starts `qvd node` (HKD and L7R) with its L7R on 127.0.0.1:`port` with l7rCert(`cn`), as start()
   * does (`command`: e.g. the binary under setpriv).
   */
  async startNode(
    port: number,
    extra: Record<string, string> = {},
    o: { command?: string[]; cn?: string } = {},
  ): Promise<void> {
    const { cert, key } = await this.l7rCert(o.cn);
    await this.start(extra, {
      role: "node",
      command: o.command,
      args: ["--listen", `127.0.0.1:${port}`, "--cert", cert, "--key", key],
    });
  }

  /** `qvd client` of this node's binary in its namespace (spawnClient). */
  client(o: ClientOptions) {
    return spawnClient(this.ns.exec, this.binary, o);
  }

  /**
   * The desktop of an end-to-end test: user `user` (default alice; with a password only when
   * given), an OSF (default debian, 1024 MB) whose one image is `image` (a file copied in, or
   * written by a function) as `file`, and a VM `vm` of that user on it.
   */
  async addDesktop(
    image: string | ((path: string) => Promise<void>),
    o: { user?: string; password?: string; osf?: Record<string, unknown>; file?: string; vm?: string } = {},
  ): Promise<Desktop> {
    const sql = this.db.sql;
    const user = await D.create(sql, D.users, D.ALL_TENANTS, {
      tenant_id: 1,
      name: o.user ?? "alice",
      ...(o.password !== undefined ? { password: o.password } : {}),
    });
    const osf = await D.create(sql, D.osfs, D.ALL_TENANTS, { tenant_id: 1, name: "debian", memory_mb: 1024, ...o.osf });
    const write = typeof image === "string" ? async (p: string) => copyFileSync(image, p) : image;
    const di = await this.addImage(osf.id, o.file ?? "desktop.tar.gz", write);
    const vm = await D.createVm(
      sql,
      D.ALL_TENANTS,
      { user_id: user.id, osf_id: osf.id, name: o.vm ?? "desktop" },
      { range: "198.18.0.0/16" },
    );
    return { user, osf, di, vm };
  }

  /**
   * Starts `qvd hkd` (or another role running the HKD, e.g. `node`, with its extra arguments)
   * in the namespace and waits until this very process reports the node running.
   */
  async start(
    extra: Record<string, string> = {},
    opts: { role?: "hkd" | "node"; args?: string[]; command?: string[]; env?: Record<string, string> } = {},
  ): Promise<void> {
    // `qvd node` runs the L7R, which needs its farm certificate and serves the node-to-node endpoint.
    const farm =
      opts.role === "node"
        ? {
            ...(await farmCert(this.name, this.host.address)).settings,
            "cluster.peer.listen": "127.0.0.1",
            "cluster.peer.port": "0",
          }
        : {};
    const settings: Record<string, string> = {
      ...farm,
      nodename: this.name,
      "path.run": join(this.root, "run"),
      "path.storage.root": join(this.root, "storage"),
      "vm.network.bridge": "qvdbr0",
      "hkd.poll_interval": "2",
      "hkd.heartbeat_interval": "1",
      "hkd.vma_check_interval": "2",
      "hkd.timeout.vma_start": "30",
      "hkd.qvd_binary": this.binary,
      "log.level": "debug",
      ...extra,
    };
    // `command`: another program in the role's place (test/support/hkd-harness.ts).
    const argv = [
      ...this.ns.exec,
      ...(opts.command ?? [this.binary, opts.role ?? "hkd"]),
      "--db",
      this.db.url,
      ...(opts.args ?? []),
      ...Object.entries(settings).flatMap(([k, v]) => ["--set", `${k}=${v}`]),
    ];
    const out = createWriteStream(this.logFile, { flags: "a" });
    const proc = (this.proc = Bun.spawn(argv, { stdout: "pipe", stderr: "pipe", env: { ...cleanEnv(), ...opts.env } }));
    for (const s of [proc.stdout, proc.stderr] as ReadableStream<Uint8Array>[])
      void (async () => {
        const reader = s.getReader();
        for (let c = await reader.read(); !c.done; c = await reader.read()) out.write(c.value);
      })();
    // `qvd node` runs its HKD as a child process: the running HKD is this process or its child.
    const parentOf = (pid: number) => {
      try {
        return Number(/^PPid:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1]);
      } catch {
        return 0;
      }
    };
    const ready = async () => {
      const [r] = await this.db.sql`SELECT state, pid FROM host_runtimes WHERE host_id = ${this.host.id}`;
      return r!.state === "running" && (r!.pid === proc.pid || (opts.role === "node" && parentOf(r!.pid) === proc.pid));
    };
    await until(async () => (await ready()) || proc.exitCode !== null, "the node to be running");
    if (proc.exitCode !== null)
      throw new Error(`qvd hkd exited with ${proc.exitCode}:\n${readFileSync(this.logFile, "utf8").slice(-3000)}`);
    // `qvd node` reports the node running from its HKD half; its L7R half listens a moment later.
    const listen = opts.args?.[opts.args.indexOf("--listen") + 1];
    if (opts.role === "node" && opts.args?.includes("--listen") && listen) {
      const [host, port] = [listen.slice(0, listen.lastIndexOf(":")), listen.slice(listen.lastIndexOf(":") + 1)];
      const accepts = async () =>
        (await run([...this.ns.exec, "bash", "-c", `exec 3<>/dev/tcp/${host}/${port}`], { allowFail: true })).status ===
        0;
      await until(async () => (await accepts()) || proc.exitCode !== null, "the L7R to listen");
    }
  }

  async kill(signal: "SIGTERM" | "SIGKILL" = "SIGTERM"): Promise<void> {
    if (!this.proc) return;
    this.proc.kill(signal);
    await this.proc.exited;
    this.proc = undefined;
  }

  get kvmPath() {
    return join(this.root, "run", "kvm");
  }

  /** The pids of this node's QEMU processes (from their pid files, checked by process name). */
  qemuPids(): number[] {
    if (!this.root || !existsSync(this.kvmPath)) return [];
    const pids: number[] = [];
    for (const d of readdirSync(this.kvmPath)) {
      if (!/^qvd-\d+$/.test(d)) continue;
      try {
        const pid = Number(readFileSync(join(this.kvmPath, d, "qemu.pid"), "utf8").trim());
        if (readFileSync(`/proc/${pid}/comm`, "utf8").trim() === d) pids.push(pid);
      } catch {}
    }
    return pids;
  }

  /** Running containers, by name. */
  async containers(): Promise<string[]> {
    return (await run([...this.ns.exec, "lxc-ls", "-P", this.lxcPath, "--running", "-1"], { allowFail: true })).stdout
      .split("\n")
      .filter(Boolean);
  }

  /** LXC's cgroup directories of a desktop, in every hierarchy (none once it is stopped). */
  async cgroupsOf(vmId: number): Promise<string[]> {
    const r = await run(["find", "/sys/fs/cgroup", "-maxdepth", "4", "-type", "d", "-name", `lxc.*.qvd-${vmId}`], {
      allowFail: true,
    });
    return r.stdout.split("\n").filter(Boolean);
  }

  async links(): Promise<string> {
    return (await run(["ip", "-n", this.ns.name, "-o", "link", "show"])).stdout;
  }

  /**
   * Calls a desktop's VMA from the node's namespace, as the node does: `url` is its base
   * (http://IP:PORT), `path` e.g. /vma/x_start; POST when there is a body, unless `verb` says.
   */
  async vma(
    url: string,
    secret: string,
    path: string,
    body?: unknown,
    verb?: string,
  ): Promise<{ status: number; json: any }> {
    const args = [
      "curl",
      "-s",
      "--max-time",
      "10",
      "-w",
      "\n%{http_code}",
      ...(verb ? ["-X", verb] : []),
      "-H",
      `x-qvd-vma-secret: ${secret}`,
    ];
    if (body !== undefined) args.push("-H", "content-type: application/json", "-d", JSON.stringify(body));
    const lines = (await run([...this.ns.exec, ...args, url + path], { allowFail: true })).stdout.trimEnd().split("\n");
    const status = Number(lines.pop());
    let json: any = null;
    try {
      json = JSON.parse(lines.join("\n"));
    } catch {}
    return { status, json };
  }

  /** Runs a shell command in a desktop (as root, unless `user`). */
  attach(vmId: number, script: string, user?: string) {
    return lxcAttach(this.ns.exec, this.lxcPath, vmId, script, user);
  }

  /** An image file in the images folder, registered in the database as uploaded. */
  async addImage(osfId: number, file: string, write: (path: string) => Promise<void>): Promise<D.DiRow> {
    const path = join(this.root, "storage", "images", file);
    await write(path);
    const bytes = readFileSync(path);
    const di = await D.create(this.db.sql, D.dis, D.ALL_TENANTS, { osf_id: osfId, path: file });
    await D.finishDiUpload(this.db.sql, di.id, bytes.length, createHash("sha256").update(bytes).digest("hex"));
    return di;
  }

  /** Stops the HKD, any container left, and removes the namespace and the folders. */
  async stop(keepLogs = Boolean(process.env.KEEP_TEST_LOGS)): Promise<void> {
    await this.kill("SIGTERM").catch(() => {});
    // KVM desktops: QEMU outlives the HKD on purpose (it is adopted at the next start).
    for (const pid of this.qemuPids()) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {}
    }
    if (this.ns) {
      for (const c of await this.containers().catch(() => []))
        await run([...this.ns.exec, "lxc-stop", "-k", "-n", c, "-P", this.lxcPath], { allowFail: true });
      await this.ns.remove();
    }
    if (keepLogs) console.log(`hkd log: ${this.logFile}`);
    else if (this.root) rmSync(this.root, { recursive: true, force: true });
  }
}
