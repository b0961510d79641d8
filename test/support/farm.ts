// A farm of three nodes for tests and benchmarks (test/farm.test.ts, bench/cluster.ts):
//   - a farm network: a bridge inside a namespace of the farm's own (198.19.0.0/24), joined by
//     a veth to each member's namespace: the database .2 (and a replica .3), nodes A B C
//     .11 .12 .13, a client .100;
//   - PostgreSQL running inside the database namespace, on TCP 198.19.0.2 with TLS (a server
//     certificate from the farm CA) and scram passwords, and on a unix socket for the test;
//   - three `qvd node` processes (the compiled binary), each in its own namespace with its own
//     VM bridge (the same gateway everywhere: VM networks are node-local), registered with its
//     farm address, with node certificates, and one shared storage directory;
//   - each node's L7R on its farm address and on a unix socket (reachable from the test's own
//     namespace: filesystem sockets cross namespaces).
// `stop()` removes everything, and a watchdog does so if the test process dies without it.
import {
  appendFileSync,
  chmodSync,
  chownSync,
  closeSync,
  copyFileSync,
  existsSync,
  openSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { createHash, randomBytes } from "node:crypto";
import { isConfigKey } from "../../src/config.ts";
import { createFarmCa, issueNodeCert } from "../../src/farm/certs.ts";
import * as D from "../../src/db/index.ts";
import { LocalCluster } from "../../src/db/local-cluster.ts";
import { connect, type Sql } from "../../src/db/pool.ts";
import { initDatabase } from "../../src/db/schema.ts";
import { run } from "../../src/run.ts";
import { cleanEnv, createNetns, lxcAttach, qvdBinary, type Netns } from "./node.ts";
import { selfSignedCert, signedCert } from "./tls.ts";
import { until } from "./wait.ts";
import { WireClient, basic } from "./qvd-wire.ts";

export const FARM_NET = "198.19.0";
export const DB_ADDR = `${FARM_NET}.2`;
export const REPLICA_ADDR = `${FARM_NET}.3`;
export const CLIENT_ADDR = `${FARM_NET}.100`;
export const L7R_PORT = 8443;
export const PEER_PORT = 8442;
export const ADMIN = { name: "superadmin", password: "farm-superadmin-pw" };

/** `ip netns` namespaces hold the inode of their network namespace. */
const nsInode = (ns: Netns) => statSync(`/run/netns/${ns.name}`).ino;
const netnsOf = (pid: number) => {
  try {
    return readlinkSync(`/proc/${pid}/ns/net`);
  } catch {
    return "";
  }
};
const pidsWhere = (pred: (pid: number) => boolean) =>
  readdirSync("/proc")
    .filter((p) => /^\d+$/.test(p))
    .map(Number)
    .filter((p) => p !== process.pid && pred(p));

export class FarmNode {
  proc?: Bun.Subprocess;
  host?: D.HostRow;
  readonly root: string;
  readonly logFile: string;
  readonly socket: string;
  /** The veth end on the farm bridge (in the farm namespace): down cuts the node off. */
  readonly farmIf: string;

  constructor(
    readonly farm: TestFarm,
    readonly name: string,
    readonly address: string,
    readonly ns: Netns,
  ) {
    this.root = join(farm.root, name);
    this.logFile = join(this.root, "node.log");
    this.socket = join(this.root, "l7r.sock");
    this.farmIf = `v-${name}`;
  }

  get lxcPath() {
    return join(this.root, "run", "lxc");
  }

  get running() {
    return this.proc !== undefined && this.proc.exitCode === null;
  }

  /** Starts `qvd node` in the namespace; resolves when its HKD reports running and its L7R socket is there. */
  async start(extra: Record<string, string> = {}): Promise<void> {
    const f = this.farm;
    const settings: Record<string, string> = {
      nodename: this.name,
      "path.run": join(this.root, "run"),
      "path.storage.root": f.storage,
      "vm.network.bridge": "qvdbr0",
      "l7r.listen.unix": this.socket,
      "hkd.qvd_binary": f.binary,
      "log.level": "debug",
      "cluster.tls.ca": f.farmCa,
      "cluster.tls.cert": join(f.root, "certs", this.name, "node.crt"),
      "cluster.tls.key": join(f.root, "certs", this.name, "node.key"),
      ...f.settings,
      ...extra,
    };
    // Keys other parts of the farm work add (certificates, fencing, placement) only once they exist.
    const known = Object.entries(settings).filter(([k]) => isConfigKey(k));
    rmSync(this.socket, { force: true });
    // The database URL (with its password) in a file of mode 0600, as on a real node: not on a
    // command line, where every process list (and a child's spawn line) shows it.
    const conf = join(this.root, "node.conf");
    writeFileSync(conf, `database.url = ${f.nodeUrl}\n`, { mode: 0o600 });
    const argv = [
      ...this.ns.exec,
      f.binary,
      "node",
      "--config",
      conf,
      "--register",
      "--address",
      this.address,
      "--listen",
      `${this.address}:${L7R_PORT}`,
      "--cert",
      f.l7rCert,
      "--key",
      f.l7rKey,
      ...known.flatMap(([k, v]) => ["--set", `${k}=${v}`]),
    ];
    // The log file is the node's own stdout and stderr: no pipe through the test process, which
    // could hold the node up while it is busy.
    appendFileSync(this.logFile, `--- start ${new Date().toISOString()}\n`);
    const fd = openSync(this.logFile, "a");
    let proc: Bun.Subprocess;
    try {
      // The database's certificate is checked against its own CA (the farm CA signs only nodes).
      proc = this.proc = Bun.spawn(argv, {
        stdin: "ignore",
        stdout: fd,
        stderr: fd,
        env: { ...cleanEnv(), NODE_EXTRA_CA_CERTS: f.dbCa },
      });
    } finally {
      closeSync(fd);
    }
    const ready = async () => {
      this.host ??= (await f.sql`SELECT * FROM hosts WHERE name = ${this.name}`)[0] as D.HostRow | undefined;
      if (!this.host) return false;
      const [r] = await f.sql`SELECT state, pid FROM host_runtimes WHERE host_id = ${this.host.id}`;
      return r?.state === "running" && existsSync(this.socket) && (await this.accepts());
    };
    await until(async () => (await ready()) || proc.exitCode !== null, `node ${this.name} to be running`, 120_000);
    if (proc.exitCode !== null) {
      this.proc = undefined;
      throw new Error(`qvd node ${this.name} exited with ${proc.exitCode}:\n${this.logTail()}`);
    }
  }

  /** Whether the L7R takes connections on its unix socket. */
  async accepts(): Promise<boolean> {
    try {
      const s = await Bun.connect({ unix: this.socket, socket: { data() {} } });
      s.end();
      return true;
    } catch {
      return false;
    }
  }

  logTail(n = 4000): string {
    try {
      return readFileSync(this.logFile, "utf8").slice(-n);
    } catch {
      return "";
    }
  }

  /** Running desktops (LXC containers) of this node, by name. */
  async containers(): Promise<string[]> {
    return (await run([...this.ns.exec, "lxc-ls", "-P", this.lxcPath, "--running", "-1"], { allowFail: true })).stdout
      .split("\n")
      .filter(Boolean);
  }

  /** Every container this node's LXC path knows (running or not): what a dead node leaves. */
  async knownContainers(): Promise<string[]> {
    return (await run([...this.ns.exec, "lxc-ls", "-P", this.lxcPath, "-1"], { allowFail: true })).stdout
      .split("\n")
      .filter(Boolean);
  }

  /** Runs a shell command in one of this node's desktops (as root, unless `user`). */
  attach(vmId: number, script: string, user?: string) {
    return lxcAttach(this.ns.exec, this.lxcPath, vmId, script, user);
  }

  /**
   * The node dies: SIGKILL to every process of it at once: `qvd node`, its HKD and L7R, the
   * LXC monitors (everything in its network namespace), and every process of its desktops
   * (each desktop's pid namespace).
   */
  async kill(): Promise<void> {
    const pidNs = new Set<string>();
    for (const c of await this.containers()) {
      const pid = Number(
        (
          await run([...this.ns.exec, "lxc-info", "-P", this.lxcPath, "-n", c, "-pH"], { allowFail: true })
        ).stdout.trim(),
      );
      if (pid > 0) pidNs.add(readlinkSync(`/proc/${pid}/ns/pid`));
    }
    const net = `net:[${nsInode(this.ns)}]`;
    const mine = (pid: number) => {
      if (netnsOf(pid) === net) return true;
      try {
        return pidNs.has(readlinkSync(`/proc/${pid}/ns/pid`));
      } catch {
        return false;
      }
    };
    for (let round = 0; round < 20; round++) {
      const pids = pidsWhere(mine);
      if (pids.length === 0) break;
      for (const p of pids) {
        try {
          process.kill(p, "SIGKILL");
        } catch {}
      }
      await Bun.sleep(100);
    }
    if (this.proc) await this.proc.exited;
    this.proc = undefined;
  }

  /** Cuts the node off the farm network (its veth on the farm bridge down), or joins it again. */
  async cut(off = true): Promise<void> {
    await run(["ip", "-n", this.farm.farmNs.name, "link", "set", this.farmIf, off ? "down" : "up"]);
  }

  /** A clean stop (SIGTERM; desktops stopped as hkd.on_shutdown says). */
  async stop(): Promise<void> {
    if (!this.proc) return;
    this.proc.kill("SIGTERM");
    const done = await Promise.race([this.proc.exited.then(() => true), Bun.sleep(60_000).then(() => false)]);
    if (!done) await this.kill();
    this.proc = undefined;
  }
}

export interface FarmOptions {
  /** Settings of every node (--set), e.g. short timers. Keys not (yet) in src/config.ts are left out. */
  settings?: Record<string, string>;
  /** Nodes by name (default a, b, c). */
  nodes?: string[];
}

export class TestFarm {
  readonly root: string;
  readonly storage: string;
  binary = "";
  farmNs!: Netns;
  dbNs!: Netns;
  clientNs!: Netns;
  nodes: FarmNode[] = [];
  /** The test's own connection (unix socket) to the current primary. */
  sql!: Sql;
  /** The URL nodes use: TCP over the farm network, TLS verified against the farm CA. */
  nodeUrl = "";
  /** The test's URL (unix socket) of the current primary. */
  url = "";
  readonly settings: Record<string, string>;
  /** The farm CA (`qvd farm ca`): it signs the node certificates, nothing else. */
  readonly farmCa: string;
  /** The database server's CA (its certificate is no node's). */
  readonly dbCa: string;
  readonly l7rCert: string;
  readonly l7rKey: string;
  /** The database password the nodes use (no log may show it). */
  readonly dbPassword = randomBytes(12).toString("hex");
  private pg?: LocalCluster;
  private replica?: LocalCluster;
  private watchdog?: Bun.Subprocess;
  private nsList: Netns[] = [];

  constructor(private readonly opts: FarmOptions = {}) {
    this.root = mkdtempSync("/tmp/qvd-farm-");
    chmodSync(this.root, 0o755);
    this.storage = join(this.root, "storage");
    this.farmCa = join(this.root, "farm-ca", "ca.crt");
    this.dbCa = join(this.root, "certs", "db-ca.crt");
    this.l7rCert = join(this.root, "certs", "l7r.crt");
    this.l7rKey = join(this.root, "certs", "l7r.key");
    this.settings = opts.settings ?? {};
  }

  node(name: string): FarmNode {
    const n = this.nodes.find((x) => x.name === name);
    if (!n) throw new Error(`no node ${name}`);
    return n;
  }

  /** Builds the whole farm; on a failure, removes what was made and throws. */
  async start(o: { replica?: boolean } = {}): Promise<this> {
    try {
      await this.build(o);
      return this;
    } catch (err) {
      await this.stop();
      throw err;
    }
  }

  private async build(o: { replica?: boolean }): Promise<void> {
    const { ensureDeps } = await import("../../scripts/deps.ts");
    await ensureDeps(
      ["lxc", "iproute2", "nftables", "nsenter", "busybox", "curl", "openssl", "postgresql", "runuser", "tcpdump"],
      () => {},
    );
    this.binary = await qvdBinary();
    mkdirSync(join(this.root, "certs"), { recursive: true });
    mkdirSync(join(this.storage, "images"), { recursive: true });
    chmodSync(this.storage, 0o755);

    this.startWatchdog();
    // The farm network.
    this.farmNs = await this.netns();
    await run([...this.farmNs.exec, "ip", "link", "add", "farmbr", "type", "bridge"]);
    await run([...this.farmNs.exec, "ip", "link", "set", "farmbr", "up"]);
    this.dbNs = await this.netns();
    await this.join(this.dbNs, "v-db", [DB_ADDR, REPLICA_ADDR]);
    this.clientNs = await this.netns();
    await this.join(this.clientNs, "v-client", [CLIENT_ADDR]);

    // The farm CA (as `qvd farm ca` makes it); the database's own CA and server certificate;
    // the users' L7R certificate (self-signed: clients connect with --insecure).
    await createFarmCa(join(this.root, "farm-ca"), { name: "QVD test farm CA" });
    await this.makeDbCa();
    await this.issue("db", [DB_ADDR, REPLICA_ADDR]);
    await selfSignedCert(join(this.root, "certs"), { cn: "qvd-farm-l7r", names: ["l7r.crt", "l7r.key"] });

    await this.startDatabase();
    if (o.replica) await this.addReplica();

    const names = this.opts.nodes ?? ["a", "b", "c"];
    for (const [i, name] of names.entries()) {
      const ns = await this.netns();
      const addr = `${FARM_NET}.${11 + i}`;
      const node = new FarmNode(this, name, addr, ns);
      mkdirSync(node.root, { recursive: true });
      chmodSync(node.root, 0o755);
      await this.join(ns, node.farmIf, [addr]);
      await issueNodeCert({
        caDir: join(this.root, "farm-ca"),
        name,
        address: addr,
        outDir: join(this.root, "certs", name),
      });
      this.nodes.push(node);
      // For the watchdog: desktops run in network namespaces of their own, stopped through LXC.
      appendFileSync(join(this.root, "lxc-paths"), `${ns.name} ${node.lxcPath}\n`);
    }
    // One at a time: the first registers and prepares the shared storage.
    for (const n of this.nodes) await n.start();
  }

  private async netns(): Promise<Netns> {
    const ns = await createNetns();
    this.nsList.push(ns);
    writeFileSync(join(this.root, "netns"), this.nsList.map((n) => n.name).join(" "));
    return ns;
  }

  /** A veth from `ns` (its end named farm0) to the farm bridge, with these addresses. */
  private async join(ns: Netns, farmIf: string, addrs: string[]): Promise<void> {
    await run([
      "ip",
      "-n",
      this.farmNs.name,
      "link",
      "add",
      farmIf,
      "type",
      "veth",
      "peer",
      "name",
      "farm0",
      "netns",
      ns.name,
    ]);
    await run(["ip", "-n", this.farmNs.name, "link", "set", farmIf, "master", "farmbr", "up"]);
    for (const a of addrs) await run(["ip", "-n", ns.name, "addr", "add", `${a}/24`, "dev", "farm0"]);
    await run(["ip", "-n", ns.name, "link", "set", "farm0", "up"]);
  }

  // --- certificates ---------------------------------------------------------------------------

  private async makeDbCa(): Promise<void> {
    await selfSignedCert(join(this.root, "certs"), {
      cn: "qvd test database CA",
      names: ["db-ca.crt", "db-ca.key"],
      ext: ["basicConstraints=critical,CA:TRUE", "keyUsage=critical,keyCertSign,cRLSign"],
    });
  }

  /** The database server's certificate, signed by the database CA: SANs its addresses. */
  private async issue(file: string, addrs: string[], name?: string): Promise<void> {
    const dir = join(this.root, "certs");
    const ca = { cert: this.dbCa, key: join(dir, "db-ca.key") };
    const { key } = await signedCert(dir, ca, {
      cn: name ?? addrs[0],
      names: [`${file}.crt`, `${file}.key`],
      san: [...(name ? [`DNS:${name}`] : []), ...addrs.map((a) => `IP:${a}`)].join(","),
      ext: [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
        "extendedKeyUsage=serverAuth,clientAuth",
      ],
    });
    chmodSync(key, 0o600);
  }

  // --- PostgreSQL inside the database namespace ----------------------------------------------

  private pgSettings(cluster: LocalCluster, listen: string): string {
    const s: Record<string, string | number> = {
      listen_addresses: listen,
      port: 5432,
      unix_socket_directories: cluster.dir,
      unix_socket_permissions: "0700",
      ssl: "on",
      ssl_cert_file: join(cluster.dir, "server.crt"),
      ssl_key_file: join(cluster.dir, "server.key"),
      password_encryption: "scram-sha-256",
      fsync: "off",
      synchronous_commit: "off",
      max_connections: 300,
      wal_level: "replica",
      max_wal_senders: 4,
      wal_keep_size: "256MB",
      hot_standby: "on",
    };
    return Object.entries(s)
      .map(([k, v]) => `-c ${k}='${String(v)}'`)
      .join(" ");
  }

  private pgCtl(cluster: LocalCluster, args: string[], inNs = true) {
    const asUser = cluster.user ? ["runuser", "-u", cluster.user, "--"] : [];
    return run([...(inNs ? this.dbNs.exec : []), ...asUser, `${cluster.bin}/${args[0]}`, ...args.slice(1)], {
      cwd: cluster.dir,
      timeoutMs: 120_000,
    });
  }

  /** Certificates and client rules a cluster in the farm needs, owned by the server's user. */
  private prepareServerFiles(cluster: LocalCluster): void {
    const owner = statSync(cluster.dir);
    for (const [from, to] of [
      ["db.crt", "server.crt"],
      ["db.key", "server.key"],
    ] as const) {
      const dest = join(cluster.dir, to);
      copyFileSync(join(this.root, "certs", from), dest);
      chownSync(dest, owner.uid, owner.gid);
      chmodSync(dest, 0o600);
    }
  }

  private async startPg(cluster: LocalCluster, listen: string): Promise<void> {
    await this.pgCtl(cluster, [
      "pg_ctl",
      "-D",
      cluster.data,
      "-l",
      cluster.log,
      "-w",
      "-t",
      "60",
      "-o",
      this.pgSettings(cluster, listen),
      "start",
    ]);
  }

  private async startDatabase(): Promise<void> {
    const pg = (this.pg = new LocalCluster({ dir: join(this.root, "pg"), noSync: true }));
    await pg.init();
    this.prepareServerFiles(pg);
    // Over the farm network: TLS only, passwords (scram); the unix socket stays trusted.
    writeFileSync(
      join(pg.data, "pg_hba.conf"),
      [
        "local all all trust",
        "local replication all trust",
        `hostssl all all ${FARM_NET}.0/24 scram-sha-256`,
        `hostssl replication all ${FARM_NET}.0/24 scram-sha-256`,
        "",
      ].join("\n"),
    );
    await this.startPg(pg, DB_ADDR);
    const admin = connect(pg.url(), { max: 1 });
    try {
      await admin.unsafe(`ALTER ROLE postgres PASSWORD '${this.dbPassword}'`);
      await admin.unsafe("CREATE DATABASE qvd");
    } finally {
      await admin.end({ timeout: 5 });
    }
    this.url = pg.url("qvd");
    this.sql = connect(this.url, { max: 8 });
    await initDatabase(this.sql, { adminName: ADMIN.name, adminPassword: ADMIN.password });
    this.nodeUrl = `postgres://postgres:${this.dbPassword}@${DB_ADDR}:5432/qvd?sslmode=verify-full`;
  }

  /**
   * A streaming replica of the database (pg_basebackup), on 198.19.0.3; from then on nodes
   * get both hosts in their URL when they start (target_session_attrs=read-write).
   */
  async addReplica(): Promise<void> {
    const rep = (this.replica = new LocalCluster({ dir: join(this.root, "pg-replica"), noSync: true }));
    mkdirSync(rep.dir, { recursive: true });
    const owner = statSync(this.pg!.dir);
    chownSync(rep.dir, owner.uid, owner.gid);
    chmodSync(rep.dir, 0o755);
    await this.pgCtl(
      rep,
      ["pg_basebackup", "-D", rep.data, "-R", "-X", "stream", "-h", this.pg!.dir, "-U", "postgres"],
      false,
    );
    this.prepareServerFiles(rep);
    await this.startPg(rep, REPLICA_ADDR);
    const r = connect(rep.url("qvd"), { max: 1 });
    try {
      await until(
        async () => (await r`SELECT pg_is_in_recovery() AS rec`)[0]!.rec === true,
        "the replica to stream",
        30_000,
      );
    } finally {
      await r.end({ timeout: 5 });
    }
    this.nodeUrl = `postgres://postgres:${this.dbPassword}@${DB_ADDR}:5432,${REPLICA_ADDR}:5432/qvd?sslmode=verify-full&target_session_attrs=read-write`;
  }

  /** The primary stops (fast); the replica is promoted; the test's connection follows it. Resolves with the ms the promotion took. */
  async failover(): Promise<{ stoppedAt: number; promotedAt: number }> {
    if (!this.replica) throw new Error("no replica (addReplica first)");
    await this.pgCtl(this.pg!, ["pg_ctl", "-D", this.pg!.data, "-m", "fast", "-w", "-t", "60", "stop"], false);
    const stoppedAt = performance.now();
    await this.pgCtl(this.replica, ["pg_ctl", "-D", this.replica.data, "-w", "-t", "60", "promote"], false);
    const promotedAt = performance.now();
    await this.sql.end({ timeout: 5 }).catch(() => {});
    this.url = this.replica.url("qvd");
    this.sql = connect(this.url, { max: 8 });
    return { stoppedAt, promotedAt };
  }

  private startWatchdog(): void {
    // If this process dies without stop(): the farm's processes, namespaces and files go too.
    const script = `cd /; while kill -0 ${process.pid} 2>/dev/null; do sleep 1; done;
      [ -f ${this.root}/lxc-paths ] && while read ns path; do for c in $(ip netns exec $ns lxc-ls -P $path --running -1 2>/dev/null); do ip netns exec $ns lxc-stop -k -P $path -n $c; done; done < ${this.root}/lxc-paths;
      for d in ${this.root}/pg/data ${this.root}/pg-replica/data; do [ -f $d/postmaster.pid ] && kill -9 $(head -1 $d/postmaster.pid) 2>/dev/null; done;
      for ns in $(cat ${this.root}/netns 2>/dev/null); do for p in $(ip netns pids $ns 2>/dev/null); do kill -9 $p 2>/dev/null; done; ip netns del $ns 2>/dev/null; done;
      sleep 1; rm -rf ${this.root}`;
    this.watchdog = Bun.spawn(["sh", "-c", script], { stdio: ["ignore", "ignore", "ignore"] });
    this.watchdog.unref();
  }

  // --- objects ----------------------------------------------------------------------------------

  /** An image in the shared images folder, registered as uploaded. */
  async addImage(osfId: number, file: string, write: (path: string) => Promise<void>): Promise<D.DiRow> {
    const path = join(this.storage, "images", file);
    await write(path);
    const bytes = readFileSync(path);
    const di = await D.create(this.sql, D.dis, D.ALL_TENANTS, { osf_id: osfId, path: file });
    await D.finishDiUpload(this.sql, di.id, bytes.length, createHash("sha256").update(bytes).digest("hex"));
    return di;
  }

  /** Where a VM runs now: the node's name from the database (undefined: nowhere). */
  async nodeOfVm(vmId: number): Promise<FarmNode | undefined> {
    const [r] = await this
      .sql`SELECT h.name FROM vm_runtimes r JOIN hosts h ON h.id = r.host_id WHERE r.vm_id = ${vmId}`;
    return r ? this.nodes.find((n) => n.name === r.name) : undefined;
  }

  /** For every node with a running namespace: its running containers (lxc-ls). */
  async containersByNode(): Promise<Record<string, string[]>> {
    const out: Record<string, string[]> = {};
    await Promise.all(this.nodes.map(async (n) => (out[n.name] = await n.containers())));
    return out;
  }

  // --- clients ----------------------------------------------------------------------------------

  /**
   * connect_to_vm through a node's L7R (its unix socket), as the Qt client sends it; after a
   * 101, the NX greeting and nxagent's answer. `hold` keeps the connection open (close() ends it).
   */
  async connect(node: FarmNode, login: string, password: string, vmId: number, o: { timeoutMs?: number } = {}) {
    const t0 = performance.now();
    const c = await WireClient.connectUnix(node.socket);
    const auth = basic(login, password);
    const { progress, res, nx, finalAt } = await c.connectToVm(vmId, auth, o.timeoutMs ?? 300_000);
    const ms101 = finalAt - t0;
    return { status: res.status, body: res.body, progress, nx, ms101, client: c, close: () => c.end() };
  }

  /** Removes everything: nodes (and their desktops), PostgreSQL, namespaces, files. */
  async stop(keepLogs = Boolean(process.env.KEEP_TEST_LOGS)): Promise<void> {
    await this.sql?.end({ timeout: 5 }).catch(() => {});
    for (const n of this.nodes) await n.kill().catch(() => {});
    for (const c of [this.replica, this.pg]) {
      if (c && existsSync(join(c.data, "postmaster.pid")))
        await this.pgCtl(c, ["pg_ctl", "-D", c.data, "-m", "immediate", "-w", "-t", "60", "stop"], false).catch(
          () => {},
        );
    }
    // Whatever else still runs in the farm's namespaces (tcpdump, clients), then the namespaces.
    for (const ns of this.nsList) {
      if (!existsSync(`/run/netns/${ns.name}`)) continue;
      const net = `net:[${nsInode(ns)}]`;
      for (const p of pidsWhere((pid) => netnsOf(pid) === net)) {
        try {
          process.kill(p, "SIGKILL");
        } catch {}
      }
    }
    await Bun.sleep(200);
    for (const ns of this.nsList.reverse()) await ns.remove();
    this.nsList = [];
    this.watchdog?.kill();
    if (keepLogs) console.log(`farm logs kept in ${this.root}`);
    else {
      // Desktops' files are owned by the shifted ids; a mount left by a killed desktop would stop rm.
      await run(["sh", "-c", `grep -o ' ${this.root}[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l`], {
        allowFail: true,
      });
      rmSync(this.root, { recursive: true, force: true });
    }
  }
}
