// `qvd install node|api|l7r`: the compiled binary installs itself, its role's hardened systemd
// unit, a commented configuration file and (node) a logrotate file into scratch roots. The units
// are checked by systemd itself (systemd-analyze verify and security, offline), and the node's
// capability bounding set by running a real node under exactly that set and starting a desktop.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import {
  appendFileSync,
  chmodSync,
  closeSync,
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { join } from "node:path";
import { Config, KEYS, parseValue, readConfigFile, type ConfigKey } from "../src/config.ts";
import * as D from "../src/db/index.ts";
import { REQUIRED, roleKeys } from "../src/install/config-file.ts";
import { run } from "../src/run.ts";
import { useTestDatabase } from "./support/db.ts";
import { busyboxImage, qvdBinary, TestNode, until } from "./support/node.ts";

const isRoot = process.getuid?.() === 0;
const ROLES = ["node", "api", "l7r"] as const;
type Role = (typeof ROLES)[number];
const db = useTestDatabase();

let binary: string;
const scratch: string[] = [];

/** A new empty directory to install into (removed after the file). */
function scratchRoot(): string {
  const d = mkdtempSync("/tmp/qvd-test-install-");
  scratch.push(d);
  return d;
}

/** Runs `argv` (the compiled qvd unless it starts with another program) with no QVD_* settings. */
function qvd(args: string[], opts: { argv0?: string[] } = {}) {
  const env: Record<string, string> = { PATH: process.env.PATH ?? "/usr/sbin:/usr/bin:/sbin:/bin", HOME: "/root" };
  const p = Bun.spawnSync([...(opts.argv0 ?? [binary]), ...args], {
    env,
    stdout: "pipe",
    stderr: "pipe",
    cwd: join(import.meta.dir, ".."),
  });
  return { status: p.exitCode, stdout: p.stdout.toString(), stderr: p.stderr.toString() };
}

const install = (role: string, root: string, ...flags: string[]) => qvd(["install", role, "--root", root, ...flags]);
const unitFile = (root: string, role: Role) => join(root, "etc/systemd/system", `qvd-${role}.service`);
const confFile = (root: string, role: Role) => join(root, "etc/qvd", `${role}.conf`);
const mode = (f: string) => statSync(f).mode & 0o7777;
/** The values of one directive of a unit (every occurrence, in order). */
const directive = (text: string, name: string) =>
  [...text.matchAll(new RegExp(`^${name}=(.*)$`, "gm"))].map((m) => m[1]!);

beforeAll(async () => {
  binary = await qvdBinary();
}, 600_000);

afterAll(() => {
  for (const d of scratch) rmSync(d, { recursive: true, force: true });
});

describe.skipIf(!isRoot)("qvd install", () => {
  test.each(ROLES)(
    "%s: the binary, the unit, the configuration (and logrotate); a second run changes nothing",
    (role) => {
      const root = scratchRoot();
      const first = install(role, root);
      expect(first.stderr).toBe("");
      expect(first.status).toBe(0);
      expect(first.stdout).toContain("Next:");
      expect(first.stdout).toContain(`systemctl enable --now qvd-${role}`);

      const bin = join(root, "usr/local/bin/qvd");
      expect(readFileSync(bin).equals(readFileSync(binary))).toBe(true);
      expect(mode(bin)).toBe(0o755);

      const unit = readFileSync(unitFile(root, role), "utf8");
      expect(mode(unitFile(root, role))).toBe(0o644);
      expect(directive(unit, "ExecStart")).toEqual([`/usr/local/bin/qvd ${role} --config /etc/qvd/${role}.conf`]);
      expect(directive(unit, "Restart")).toEqual(["on-failure"]);
      expect(directive(unit, "After")[0]).toContain("network-online.target");
      expect(directive(unit, "After")[0]).toContain("postgresql.service");
      expect(directive(unit, "Wants")).toEqual(["network-online.target"]);
      expect(directive(unit, "ProtectSystem")).toEqual(["strict"]);
      expect(directive(unit, "NoNewPrivileges")).toEqual(role === "node" ? [] : ["yes"]);
      expect(directive(unit, "User")).toEqual(role === "api" ? ["qvd"] : []);
      expect(directive(unit, "KillMode")).toEqual(role === "api" ? [] : ["mixed"]);
      // The state the role writes is writable in the sandbox, and exists (or the unit cannot start).
      if (role === "node") {
        expect(directive(unit, "RuntimeDirectory")).toEqual(["qvd lxc"]);
        expect(directive(unit, "RuntimeDirectoryPreserve")).toEqual(["yes"]);
        expect(directive(unit, "ReadWritePaths")).toEqual(["/var/lib/qvd/storage"]);
      }
      if (role === "api") expect(directive(unit, "ReadWritePaths")).toEqual(["/var/lib/qvd/storage/images"]);
      if (role === "l7r") expect(directive(unit, "RuntimeDirectory")).toEqual(["qvd"]);
      for (const d of directive(unit, "ReadWritePaths")[0]?.split(" ") ?? [])
        expect(statSync(join(root, d)).isDirectory()).toBe(true);

      const conf = confFile(root, role);
      expect(mode(conf)).toBe(0o640);
      const logrotate = join(root, "etc/logrotate.d/qvd");
      expect(existsSync(logrotate)).toBe(role === "node");
      if (role === "node") {
        expect(mode(logrotate)).toBe(0o644);
        expect(readFileSync(logrotate, "utf8")).toContain("/run/qvd/lxc/logs/*.log /run/qvd/kvm/logs/*.log {");
      }
      // Installing into another root touches no user of this machine: it says what the target needs.
      if (role === "api") expect(first.stdout).toContain("useradd --system");

      const before = [bin, unitFile(root, role), conf].map((f) => [statSync(f).ino, statSync(f).mtimeMs]);
      const again = install(role, root);
      expect(again.status).toBe(0);
      expect(again.stdout).toContain("Nothing to do: everything was already in place.");
      expect(again.stdout).not.toContain("Next:");
      expect(again.stdout).toMatch(/kept \(never overwritten\)\s+\/etc\/qvd\//);
      expect([bin, unitFile(root, role), conf].map((f) => [statSync(f).ino, statSync(f).mtimeMs])).toEqual(before);
    },
    120_000,
  );

  test.each(ROLES)(
    "%s: the configuration file is the schema's: every key of the role with its default, the required ones to fill in",
    (role) => {
      const root = scratchRoot();
      expect(install(role, root).status).toBe(0);
      const file = confFile(root, role);
      const text = readFileSync(file, "utf8");
      const required = new Map(REQUIRED[role]);
      const commented = new Map([...text.matchAll(/^#([a-z][\w.-]*) =(?: (.*))?$/gm)].map((m) => [m[1]!, m[2] ?? ""]));
      // Every node key the role reads, once, commented out with its default (which reads back as it).
      expect([...commented.keys()].sort()).toEqual(
        roleKeys(role)
          .filter((k) => !required.has(k))
          .sort(),
      );
      for (const [k, v] of commented) {
        expect(KEYS[k as ConfigKey].scope).toBe("node");
        expect(parseValue(k as ConfigKey, v, "test")).toEqual(KEYS[k as ConfigKey].default as never);
      }
      // Each key's description is there.
      for (const k of commented.keys())
        expect(text).toContain(KEYS[k as ConfigKey].doc.split(" ").slice(0, 4).join(" "));
      const set = new Map(readConfigFile(file).map((s) => [s.key, s.value]));
      expect([...set.keys()].sort()).toEqual([...required.keys()].sort());
      expect(set.get("database.url")).toBe("");
      if (role !== "api") expect(set.get("cluster.tls.ca")).toBe("/etc/qvd/farm/ca.crt");

      // As written, the role refuses it, naming the line to fill in; filled in, qvd reads it.
      const refused = qvd(["config", "show", "--no-db", "--config", file]);
      expect(refused.status).toBe(78);
      expect(refused.stderr).toMatch(new RegExp(`${file}:\\d+: (nodename|database\\.url): `));
      writeFileSync(
        file,
        text
          .replace(/^nodename =$/m, "nodename = node1")
          .replace(/^database\.url =$/m, "database.url = postgres://qvd:secret-pw@db1:5432/qvd?sslmode=verify-full"),
      );
      const shown = qvd(["config", "show", "--no-db", "--config", file]);
      expect(shown.stderr).toBe("");
      expect(shown.status).toBe(0);
      expect(shown.stdout).toMatch(/^database\.url\s+= \*+/m);
      expect(shown.stdout).not.toContain("secret-pw");
      // Uncommenting every default changes no effective value.
      const all = new Config(readConfigFile(file));
      const uncommented = join(root, "uncommented.conf");
      writeFileSync(uncommented, readFileSync(file, "utf8").replace(/^#([a-z][\w.-]*) =/gm, "$1 ="));
      const every = new Config(readConfigFile(uncommented));
      for (const k of roleKeys(role)) if (k !== "nodename") expect(every.rawOf(k)).toBe(all.rawOf(k));
    },
  );

  test("the configuration file is never replaced; a changed unit or binary only with --force, all or nothing", () => {
    const root = scratchRoot();
    expect(install("node", root).status).toBe(0);
    const unit = unitFile(root, "node");
    const original = readFileSync(unit, "utf8");
    appendFileSync(unit, "# a local edit\n");
    appendFileSync(confFile(root, "node"), "nodename = node7\n");
    chmodSync(join(root, "usr/local/bin/qvd"), 0o700);

    const refused = install("node", root);
    expect(refused.status).toBe(1);
    expect(refused.stderr).toContain(`${root}/usr/local/bin/qvd (mode 0700, not 0755)`);
    expect(refused.stderr).toContain(`${unit} (content)`);
    expect(refused.stderr).toContain("Nothing was changed; run again with --force");
    expect(refused.stderr).not.toContain("node.conf (");
    expect(readFileSync(unit, "utf8")).toEndWith("# a local edit\n");
    expect(mode(join(root, "usr/local/bin/qvd"))).toBe(0o700);

    const forced = install("node", root, "--force");
    expect(forced.status).toBe(0);
    expect(forced.stdout).toMatch(/replaced\s+\/etc\/systemd\/system\/qvd-node\.service/);
    expect(forced.stdout).toMatch(/kept \(never overwritten\)\s+\/etc\/qvd\/node\.conf/);
    expect(readFileSync(unit, "utf8")).toBe(original);
    expect(mode(join(root, "usr/local/bin/qvd"))).toBe(0o755);
    expect(readFileSync(confFile(root, "node"), "utf8")).toEndWith("nodename = node7\n");
    expect(mode(confFile(root, "node"))).toBe(0o640);
    expect(install("node", root).stdout).toContain("Nothing to do");
    // Left as it is even when others may read it, but not in silence.
    chmodSync(confFile(root, "node"), 0o644);
    const warned = install("node", root);
    expect(warned.stdout).toContain("/etc/qvd/node.conf is mode 0644: it holds the database password, make it 0640");
    expect(mode(confFile(root, "node"))).toBe(0o644);
  }, 120_000);

  test("the unit follows the configuration's paths and ports (after --force)", () => {
    const root = scratchRoot();
    expect(install("api", root).status).toBe(0);
    appendFileSync(confFile(root, "api"), "path.storage.images = /srv/qvd-images\napi.listen = 0.0.0.0:443\n");
    const refused = install("api", root);
    expect(refused.status).toBe(1);
    expect(refused.stderr).toContain("qvd-api.service (content)");
    expect(install("api", root, "--force").status).toBe(0);
    const unit = readFileSync(unitFile(root, "api"), "utf8");
    expect(directive(unit, "ReadWritePaths")).toEqual(["/srv/qvd-images"]);
    expect(directive(unit, "RequiresMountsFor")).toEqual(["/srv/qvd-images"]);
    expect(statSync(join(root, "srv/qvd-images")).isDirectory()).toBe(true);
    // Port 443: the one capability, ambient for the user qvd, and no private user namespace (it
    // would make the capability useless on the machine's network).
    expect(directive(unit, "CapabilityBoundingSet")).toEqual(["CAP_NET_BIND_SERVICE"]);
    expect(directive(unit, "AmbientCapabilities")).toEqual(["CAP_NET_BIND_SERVICE"]);
    expect(directive(unit, "PrivateUsers")).toEqual([]);

    const node = scratchRoot();
    mkdirSync(join(node, "etc/qvd"), { recursive: true });
    writeFileSync(
      confFile(node, "node"),
      "path.run = /var/run2/qvd\npath.storage.root = /srv/qvd\npath.storage.overlays = /var/lib/qvd/overlays\nl7r.listen = :443\n",
    );
    expect(install("node", node).status).toBe(0);
    const nodeUnit = readFileSync(unitFile(node, "node"), "utf8");
    expect(directive(nodeUnit, "RuntimeDirectory")).toEqual(["lxc"]);
    expect(directive(nodeUnit, "ReadWritePaths")).toEqual(["/srv/qvd /var/run2/qvd /var/lib/qvd/overlays"]);
    expect(directive(nodeUnit, "CapabilityBoundingSet")[0]).toContain("CAP_NET_BIND_SERVICE");
    expect(readFileSync(join(node, "etc/logrotate.d/qvd"), "utf8")).toContain(
      "/var/run2/qvd/lxc/logs/*.log /var/run2/qvd/kvm/logs/*.log {",
    );
  }, 120_000);

  test("into / (a mount namespace of its own, over copies of /etc, /usr/local, /var/lib): the API's user, group and folder", () => {
    const scratchDir = scratchRoot();
    // Overlays keep every write (useradd's too) in scratchDir; the machine's own files stay as they are.
    const script = `set -e
      for d in /etc /usr/local /var/lib; do
        n=$(echo $d | tr / _); mkdir -p "$1/upper$n" "$1/work$n"
        mount -t overlay overlay -o "lowerdir=$d,upperdir=$1/upper$n,workdir=$1/work$n" $d
      done
      "$2" install api; echo "first=$?"
      getent passwd qvd
      stat -c '%a %U:%G %n' /etc/qvd/api.conf /var/lib/qvd /var/lib/qvd/storage /var/lib/qvd/storage/images /usr/local/bin/qvd
      "$2" install api; echo "second=$?"`;
    const hadQvd = Bun.spawnSync(["getent", "passwd", "qvd"]).exitCode === 0;
    const r = Bun.spawnSync(
      ["unshare", "-m", "--propagation", "private", "bash", "-c", script, "_", scratchDir, binary],
      { stdout: "pipe", stderr: "pipe" },
    );
    const out = r.stdout.toString();
    expect(r.stderr.toString()).toBe("");
    expect(r.exitCode).toBe(0);
    expect(out).toContain("first=0");
    if (!hadQvd) expect(out).toContain("created the system user qvd");
    expect(out).toMatch(/^qvd:x:\d+:\d+:QVD admin API:\/nonexistent:\/usr\/sbin\/nologin$/m);
    expect(out).toContain("640 root:qvd /etc/qvd/api.conf");
    expect(out).toContain("755 root:root /var/lib/qvd\n");
    expect(out).toContain("755 root:root /var/lib/qvd/storage\n");
    expect(out).toContain("750 qvd:qvd /var/lib/qvd/storage/images");
    expect(out).toContain("755 root:root /usr/local/bin/qvd");
    // Not booted with systemd here: no daemon-reload, and it says so.
    expect(out).toContain("systemd is not running here: run `systemctl daemon-reload` once it is");
    expect(out.slice(out.indexOf("second="))).toBe("second=0\n");
    expect(out.slice(out.lastIndexOf("qvd install api:"))).toContain("Nothing to do: everything was already in place.");
    expect(Bun.spawnSync(["getent", "passwd", "qvd"]).exitCode === 0).toBe(hadQvd);
    expect(existsSync("/etc/qvd/api.conf")).toBe(false);
  }, 60_000);

  test("bad input: an unknown role, a missing or unwritable root, bun running the sources", () => {
    const root = scratchRoot();
    const unknown = install("desktop", root);
    expect([unknown.status, unknown.stderr.trim()]).toEqual([
      2,
      'qvd: unknown role "desktop": expected one of node, api, l7r',
    ]);
    const missing = install("node", join(root, "nope"));
    expect([missing.status, missing.stderr.trim()]).toEqual([
      2,
      `qvd: --root ${join(root, "nope")}: no such directory`,
    ]);
    // Not root: the first file it cannot write is named, and nothing is left behind.
    chmodSync(root, 0o755);
    const asNobody = qvd(["install", "node", "--root", root], {
      argv0: ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", binary],
    });
    expect(asNobody.status).toBe(1);
    expect(asNobody.stderr.trim()).toBe(`qvd: cannot write ${root}/usr/local/bin/qvd: permission denied`);
    const fromSources = qvd(["src/main.ts", "install", "node", "--root", root], { argv0: [process.execPath] });
    expect(fromSources.status).toBe(1);
    expect(fromSources.stderr).toContain("build the binary first (bun scripts/build-binaries.ts");
    expect(Bun.spawnSync(["find", root, "-mindepth", "1"]).stdout.toString()).toBe("");
    expect(install("node", root).status).toBe(0);
  }, 60_000);

  describe("systemd's own checks", () => {
    let root: string;

    beforeAll(() => {
      root = scratchRoot();
      for (const role of ROLES) expect(install(role, root).status).toBe(0);
      // The targets the units name (network-online.target, multi-user.target…) as the root's own.
      cpSync("/usr/lib/systemd/system", join(root, "usr/lib/systemd/system"), { recursive: true });
    });

    const verify = (unit: string) =>
      Bun.spawnSync(["systemd-analyze", "verify", `--root=${root}`, unit], {
        stdout: "pipe",
        stderr: "pipe",
        cwd: root,
      });

    test.each(ROLES)("systemd-analyze verify accepts qvd-%s.service without a warning", (role) => {
      const r = verify(`qvd-${role}.service`);
      expect(r.stderr.toString()).toBe("");
      expect(r.exitCode).toBe(0);
    });

    test("systemd-analyze verify would say so: a bad setting, a missing binary", () => {
      const bad = join(root, "etc/systemd/system/qvd-bad.service");
      writeFileSync(bad, readFileSync(unitFile(root, "node"), "utf8").replace("KillMode=mixed", "KillMode=sometimes"));
      expect(verify("qvd-bad.service").stderr.toString()).toContain("Failed to parse kill mode");
      rmSync(bad);
      const bin = join(root, "usr/local/bin/qvd");
      const moved = join(root, "qvd.moved");
      renameSync(bin, moved);
      try {
        const r = verify("qvd-api.service");
        expect(r.exitCode).not.toBe(0);
        expect(r.stderr.toString()).toContain("/usr/local/bin/qvd is not executable");
      } finally {
        renameSync(moved, bin);
      }
    });

    // Measured with systemd 252: api 1.1 OK, l7r 2.6 OK, node 6.1 MEDIUM (root with ten
    // capabilities, and no seccomp allow list: desktops would inherit it). The bounds catch a
    // unit that loses a few of its settings.
    test.each([
      ["api", 1.5],
      ["l7r", 3.0],
      ["node", 6.5],
    ] as const)("systemd-analyze security: qvd-%s.service scores below %s", (role, bound) => {
      const r = Bun.spawnSync(
        ["systemd-analyze", "security", "--offline=yes", `--root=${root}`, `qvd-${role}.service`],
        { stdout: "pipe", stderr: "pipe" },
      );
      const m = /Overall exposure level for qvd-\w+\.service: (\d+\.\d) (\w+)/.exec(r.stdout.toString());
      expect(m).not.toBeNull();
      console.log(`qvd-${role}.service: exposure ${m![1]} ${m![2]}`);
      expect(Number(m![1])).toBeLessThan(bound);
      expect(m![2]).not.toBe("UNSAFE");
    });

    test("logrotate takes the node's file, and rotates a grown console log that is still open", async () => {
      if (!Bun.which("logrotate"))
        await run(["apt-get", "install", "-y", "--no-install-recommends", "logrotate"], {
          env: { ...process.env, DEBIAN_FRONTEND: "noninteractive" },
        });
      const file = join(root, "etc/logrotate.d/qvd");
      const dry = await run(["logrotate", "--debug", "--state", join(root, "dry.state"), file], { allowFail: true });
      expect(dry.stderr).not.toMatch(/error/i);
      expect(dry.status).toBe(0);
      expect(dry.stderr).toContain(
        "rotating pattern: /run/qvd/lxc/logs/*.log /run/qvd/kvm/logs/*.log  10485760 bytes (2 rotations)",
      );
      // The same rules on a scratch copy of path.run: a console log past 10 MB, held open by its
      // writer (as LXC holds it), is copied away and emptied in place; a small one is left alone.
      const logs = join(root, "run/qvd/lxc/logs");
      mkdirSync(logs, { recursive: true });
      const big = join(logs, "qvd-1.console.log");
      writeFileSync(big, "x".repeat(11 * 1024 * 1024));
      writeFileSync(join(logs, "qvd-2.log"), "small\n");
      const writer = openSync(big, "a");
      const rules = join(root, "rules");
      writeFileSync(rules, readFileSync(file, "utf8").replaceAll("/run/qvd/", `${root}/run/qvd/`));
      try {
        const r = await run(["logrotate", "--state", join(root, "real.state"), rules], { allowFail: true });
        expect(r.stderr).toBe("");
        expect(r.status).toBe(0);
        writeSync(writer, "after\n");
      } finally {
        closeSync(writer);
      }
      expect(readFileSync(big, "utf8")).toBe("after\n");
      expect(statSync(`${big}.1.gz`).size).toBeGreaterThan(0);
      expect(readFileSync(join(logs, "qvd-2.log"), "utf8")).toBe("small\n");
      expect(existsSync(join(logs, "qvd-2.log.1.gz"))).toBe(false);
    }, 120_000);
  });
});

describe.skipIf(!isRoot)("the node unit's capabilities", () => {
  const node = new TestNode(db, "capnode");
  let caps: string[];

  beforeAll(async () => {
    const root = scratchRoot();
    expect(install("node", root).status).toBe(0);
    caps = directive(readFileSync(unitFile(root, "node"), "utf8"), "CapabilityBoundingSet")[0]!.split(" ");
    await node.setup();
  }, 600_000);

  afterAll(async () => {
    await node.stop();
  }, 120_000);

  test("a node under exactly the unit's bounding set unpacks an image, starts a desktop and stops it", async () => {
    const sql = db().sql;
    const bset = `--bounding-set=-all,${caps.map((c) => "+" + c.slice(4).toLowerCase()).join(",")}`;
    await node.startNode(
      8443,
      { "hkd.timeout.vma_start": "60" },
      { command: ["setpriv", bset, "--inh-caps=-all", node.binary, "node"] },
    );
    // The node's HKD really runs with that set, and nothing more.
    const [{ pid }] = (await sql`SELECT pid FROM host_runtimes WHERE host_id = ${node.host.id}`) as unknown as [
      { pid: number },
    ];
    const bnd = BigInt("0x" + /^CapBnd:\s+([0-9a-f]+)/m.exec(readFileSync(`/proc/${pid}/status`, "utf8"))![1]);
    const names = (await run(["capsh", `--decode=${bnd.toString(16)}`])).stdout
      .trim()
      .split("=")[1]!
      .split(",")
      .map((c) => c.toUpperCase())
      .sort();
    expect(names).toEqual([...caps].sort());

    const osf = await D.create(sql, D.osfs, D.ALL_TENANTS, { tenant_id: 1, name: "busybox", memory_mb: 128 });
    await node.addImage(osf.id, "busybox.tar.gz", busyboxImage);
    const user = await D.create(sql, D.users, D.ALL_TENANTS, { tenant_id: 1, name: "carol" });
    const vm = await D.createVm(
      sql,
      D.ALL_TENANTS,
      { user_id: user.id, osf_id: osf.id, name: "desk" },
      { range: "198.18.0.0/16" },
    );
    const row = async () => (await sql`SELECT vm_state, vma_secret FROM vm_runtimes WHERE vm_id = ${vm.id}`)[0]!;
    const blocked = async () => {
      const v = await D.get(sql, D.vms, D.ALL_TENANTS, vm.id);
      return v.blocked ? String(v.blocked_reason) : null;
    };
    expect(await D.requestStart(sql, vm.id, node.host.id)).toBe(true);
    // A start the capabilities do not allow fails, and blocks the VM with the reason.
    await until(
      async () => (await row()).vm_state === "running" || (await blocked()) !== null,
      "the desktop to run",
      120_000,
    );
    expect(await blocked()).toBeNull();
    expect((await row()).vm_state).toBe("running");
    expect(await node.containers()).toEqual([`qvd-${vm.id}`]);
    expect((await node.vma(`http://${vm.ip}:3030`, (await row()).vma_secret, "/vma/ping")).status).toBe(200);
    await D.stopVm(sql, D.ALL_TENANTS, vm.id);
    await until(async () => (await row()).vm_state === "stopped", "the desktop to stop", 60_000);
    expect(await node.containers()).toEqual([]);
  }, 300_000);
});
