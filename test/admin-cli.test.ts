// `qvd admin` as a subprocess against the real admin API (in-process, over a fresh test
// database): login and stored credentials, the verbs on users, OSFs, VMs, images, roles and
// administrators, filters, mass changes, configuration, exit codes and TLS options.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { useTestApi } from "./support/api.ts";
import { TEST_ADMIN, useTestDatabase } from "./support/db.ts";
import { capture, cleanEnv, type Captured } from "./support/spawn.ts";
import { selfSignedCert } from "./support/tls.ts";

const ROOT = join(import.meta.dir, "..");
const dir = mkdtempSync(join(tmpdir(), "qvd-admin-cli-test-"));
const db = useTestDatabase();
// root: the superadmin, straight through the API, to check what the CLI did
const { api, sa: root } = useTestApi(db);
const pwFile = join(dir, "superadmin.pw");

beforeAll(() => {
  writeFileSync(pwFile, TEST_ADMIN.password + "\n");
});
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

/** A home directory (HOME and XDG_CONFIG_HOME) per identity, so logins do not mix. */
function home(name: string): string {
  const h = join(dir, `home-${name}`);
  mkdirSync(h, { recursive: true });
  return h;
}

async function qvd(
  h: string,
  args: string[],
  opts: { stdin?: string; env?: Record<string, string> } = {},
): Promise<Captured> {
  const env = cleanEnv({ HOME: h, XDG_CONFIG_HOME: join(h, ".config"), NO_COLOR: "1", ...opts.env });
  return capture([process.execPath, "src/main.ts", "admin", ...args], { cwd: ROOT, env, stdin: opts.stdin });
}

/** Runs as the logged-in superadmin and expects success. */
let SUPER = "";
async function ok(args: string[]): Promise<string> {
  const r = await qvd(SUPER, args);
  if (r.code !== 0) throw new Error(`qvd admin ${args.join(" ")} → ${r.code}\n${r.stdout}${r.stderr}`);
  return r.stdout;
}
const json = async (args: string[]) => JSON.parse(await ok([...args, "--json"]));
const createdId = (out: string) => Number(/^created \w+ (\d+)/.exec(out)?.[1] ?? NaN);
const baseUrl = () => api.url.replace(/\/api\/v1$/, "");
const credentials = (h: string) => join(h, ".config", "qvd", "admin.json");

describe("login", () => {
  test("with a password file: token stored 0600 in a 0700 directory, whoami works", async () => {
    SUPER = home("super");
    const r = await qvd(SUPER, ["login", "--url", baseUrl(), "--name", TEST_ADMIN.name, "--password-file", pwFile]);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    expect(r.stdout).toContain("logged in");
    const file = credentials(SUPER);
    expect(statSync(file).mode & 0o777).toBe(0o600);
    expect(statSync(join(SUPER, ".config", "qvd")).mode & 0o777).toBe(0o700);
    const stored = JSON.parse(readFileSync(file, "utf8"));
    expect(stored.url).toBe(api.url); // /api/v1 added
    expect(stored.name).toBe(TEST_ADMIN.name);
    expect(stored.token).toMatch(/^[A-Za-z0-9_-]{20,}$/);

    const who = await qvd(SUPER, ["whoami"]);
    expect(who.code).toBe(0);
    expect(who.stdout).toMatch(/^name:\s+superadmin$/m);
    expect(who.stdout).toMatch(/^superadmin:\s+yes$/m);
    const whoJson = await json(["whoami"]);
    expect(whoJson.administrator.name).toBe(TEST_ADMIN.name);
    expect(whoJson.acls).toContain("vm.start");
  });

  test("with the password on standard input; a wrong one is exit 3 and stores nothing", async () => {
    const h = home("stdin");
    const bad = await qvd(h, ["login", "--url", api.url, "--name", TEST_ADMIN.name], { stdin: "not-the-password\n" });
    expect(bad.code).toBe(3);
    expect(bad.stderr).toBe("qvd: wrong tenant, name or password\n");
    expect(existsSync(credentials(h))).toBe(false);

    const good = await qvd(h, ["login", "--url", api.url, "--name", TEST_ADMIN.name], {
      stdin: `${TEST_ADMIN.password}\nignored second line\n`,
    });
    expect(good.code).toBe(0);
    expect(statSync(credentials(h)).mode & 0o777).toBe(0o600);
    const who = await qvd(h, ["whoami", "--json"]);
    expect(JSON.parse(who.stdout).administrator.name).toBe(TEST_ADMIN.name);
  });

  test("requests are marked as coming from the CLI in the audit log", async () => {
    const res = await json(["audit", "list", "--filter", "action=login", "--filter", "source=cli"]);
    expect(res.total).toBeGreaterThanOrEqual(2);
    expect(res.items.every((e: { source: string }) => e.source === "cli")).toBe(true);
  });
});

describe("objects", () => {
  let alice = 0;
  let osf = 0;

  test("users: new, list, get by id and name, set, del", async () => {
    alice = createdId(await ok(["user", "new", "name=alice", "password=alice-secret", "tenant=default"]));
    expect(alice).toBeGreaterThan(0);
    const bob = createdId(await ok(["user", "new", "name=bob", "password=bob-secret"]));
    const temp = createdId(await ok(["user", "new", "name=temp"]));

    const list = await json(["user", "list"]);
    expect(list.items.map((u: { name: string }) => u.name).sort()).toEqual(["alice", "bob", "temp"]);
    const table = await ok(["user", "list", "--sort", "-name"]);
    const lines = table.trim().split("\n");
    expect(lines[0]).toMatch(/^id\s+tenant_name\s+name\s+blocked/);
    expect(lines.slice(1).map((l) => l.split(/\s+/)[2])).toEqual(["temp", "bob", "alice"]);

    expect(await ok(["user", "get", "alice"])).toMatch(/^name:\s+alice$/m);
    expect((await json(["user", "get", String(bob)])).name).toBe("bob");

    const set = await ok(["user", "set", "alice", "description=first user", "blocked=true"]);
    expect(set).toContain(`changed user ${alice} (alice)`);
    const a = (await root.get(`/users/${alice}`)).body;
    expect(a.description).toBe("first user");
    expect(a.blocked).toBe(true); // sent as a JSON boolean
    await ok(["user", "set", String(alice), "blocked=no"]);
    expect((await root.get(`/users/${alice}`)).body.blocked).toBe(false);

    expect(await ok(["user", "del", "temp"])).toBe(`deleted user ${temp} (temp)\n`);
    expect((await root.get(`/users/${temp}`)).status).toBe(404);
  });

  test("osfs: integers for *_mb fields, booleans, lookup by name", async () => {
    osf = createdId(await ok(["osf", "new", "name=desktop", "memory_mb=512", "persistent=true"]));
    let row = await json(["osf", "get", "desktop"]);
    expect(row.id).toBe(osf);
    expect(row.memory_mb).toBe(512);
    expect(row.persistent).toBe(true);
    await ok(["osf", "set", "desktop", "memory_mb=1024", "cpu_shares=2048"]);
    row = (await root.get(`/osfs/${osf}`)).body;
    expect([row.memory_mb, row.cpu_shares]).toEqual([1024, 2048]);
    const bad = await qvd(SUPER, ["osf", "set", "desktop", "memory_mb=lots"]);
    expect(bad.code).toBe(1);
    expect(bad.stderr).toStartWith("qvd: memory_mb: ");
    const dup = await qvd(SUPER, ["osf", "new", "name=desktop"]);
    expect(dup.code).toBe(6);
  });

  test("vms: new with user/osf names, filters with aliases, get/set/del by name and id", async () => {
    const desk = createdId(await ok(["vm", "new", "name=desk-alice", "user=alice", "osf=desktop"]));
    await ok(["vm", "new", "name=desk-bob", "user=bob", `osf_id=${osf}`]);
    const spare = createdId(await ok(["vm", "new", "name=spare", "user=bob", "osf=desktop"]));
    expect((await root.get(`/vms/${desk}`)).body.user_id).toBe(alice);

    const filtered = await json(["vm", "list", "--filter", "state=stopped", "--filter", "user=alice"]);
    expect(filtered.items.map((v: { name: string }) => v.name)).toEqual(["desk-alice"]);
    const text = await ok(["vm", "list", "-f", "user=bob", "--fields", "name,state"]);
    expect(
      text
        .trim()
        .split("\n")
        .map((l) => l.trim().split(/\s+/).slice(1).join(" ")),
    ).toEqual(["name vm_state", "desk-bob stopped", "spare stopped"]);
    const like = await json(["vm", "list", "--filter", "name~desk-%", "--filter", `id!=${desk}`]);
    expect(like.items.map((v: { name: string }) => v.name)).toEqual(["desk-bob"]);
    const some = await json(["vm", "list", "--filter", "name@=spare,desk-alice", "--sort", "-name"]);
    expect(some.items.map((v: { name: string }) => v.name)).toEqual(["spare", "desk-alice"]);
    const none = await qvd(SUPER, ["vm", "list", "--filter", "host="]);
    expect(none.code).toBe(0); // host_name is null for every VM here: all match
    expect(none.stdout.trim().split("\n")).toHaveLength(4);

    expect((await json(["vm", "get", "desk-alice"])).id).toBe(desk);
    await ok(["vm", "set", "desk-alice", "di_tag=testing"]);
    expect((await root.get(`/vms/${desk}`)).body.di_tag).toBe("testing");
    expect(await ok(["vm", "del", String(spare)])).toContain(`deleted vm ${spare} (spare)`);
    expect((await root.get(`/vms/${spare}`)).status).toBe(404);
  });

  test("mass block with a filter; refused without one (exit 2) unless --all", async () => {
    const refused = await qvd(SUPER, ["vm", "block"]);
    expect(refused.code).toBe(2);
    expect(refused.stderr).toContain("--all");
    const refusedSet = await qvd(SUPER, ["user", "set", "blocked=true"]);
    expect(refusedSet.code).toBe(2);
    const vms = (await root.get("/vms")).body.items;
    expect(vms.every((v: { blocked: boolean }) => !v.blocked)).toBe(true);

    const r = await qvd(SUPER, ["vm", "block", "--filter", "user=bob", "--reason", "maintenance"]);
    expect(r.code).toBe(0);
    expect(r.stdout).toContain("1 vm matched, 1 ok, 0 failed");
    const after = (await root.get("/vms?sort=name")).body.items.map(
      (v: { name: string; blocked: boolean; blocked_reason: string }) => [v.name, v.blocked, v.blocked_reason],
    );
    expect(after).toEqual([
      ["desk-alice", false, ""],
      ["desk-bob", true, "maintenance"],
    ]);

    // Every VM fails to start (no node; one blocked): one line each, exit 1.
    const all = await qvd(SUPER, ["vm", "start", "--all"]);
    expect(all.code).toBe(1);
    expect(all.stdout).toContain("2 vms matched, 0 ok, 2 failed");
    expect(all.stdout).toMatch(/failed \(409\): vm "desk-bob" is blocked/);
    await ok(["vm", "unblock", "--all"]);
    expect((await root.get("/vms?blocked=true")).body.total).toBe(0);
  });

  test("vm start without a node: exit 6 with the API's message", async () => {
    const r = await qvd(SUPER, ["vm", "start", "desk-alice"]);
    expect(r.code).toBe(6);
    expect(r.stderr).toBe(
      "qvd: no node is available to run this VM (none running, unblocked, not draining, alive and with enough free memory)\n",
    );
  });

  test("vm expire: the stop and warning times of a running desktop (local time), none clears; a stopped one is exit 6", async () => {
    expect((await qvd(SUPER, ["vm", "expire", "desk-alice", "--stop-at", "2099-01-02T10:00"])).code).toBe(6);
    const [h] = await db().sql`INSERT INTO hosts (name, address) VALUES ('cli-node', '198.18.0.77') RETURNING id`;
    await db()
      .sql`UPDATE vm_runtimes r SET vm_state = 'running', host_id = ${h!.id} FROM vms v WHERE v.id = r.vm_id AND v.name = 'desk-alice'`;
    try {
      const r = await qvd(SUPER, [
        "vm",
        "expire",
        "desk-alice",
        "--warn-at",
        "2099-01-02T09:00",
        "--stop-at",
        "2099-01-02T10:00",
      ]);
      expect([r.code, r.stdout]).toEqual([0, expect.stringContaining("expire ok")]);
      const vm = (await root.get("/vms?name=desk-alice")).body.items[0];
      expect([new Date(vm.expire_soft_at).getTime(), new Date(vm.expire_hard_at).getTime()]).toEqual([
        new Date(2099, 0, 2, 9).getTime(),
        new Date(2099, 0, 2, 10).getTime(),
      ]);
      expect((await qvd(SUPER, ["vm", "expire", "desk-alice", "--warn-at", "none"])).code).toBe(0);
      const after = (await root.get("/vms?name=desk-alice")).body.items[0];
      expect([after.expire_soft_at, new Date(after.expire_hard_at).getTime()]).toEqual([
        null,
        new Date(2099, 0, 2, 10).getTime(),
      ]);
    } finally {
      await db()
        .sql`UPDATE vm_runtimes r SET vm_state = 'stopped', host_id = NULL, expire_soft_at = NULL, expire_hard_at = NULL FROM vms v WHERE v.id = r.vm_id AND v.name = 'desk-alice'`;
      await db().sql`DELETE FROM hosts WHERE id = ${h!.id}`;
    }
  });

  test("host drain, undrain, declare-lost (a reason is required); vm clear-zombie only once the node is lost", async () => {
    const [h] = await db().sql`INSERT INTO hosts (name, address) VALUES ('cli-farm-node', '198.18.0.78') RETURNING id`;
    await db().sql`UPDATE host_runtimes SET state = 'running', ok_ts = now() WHERE host_id = ${h!.id}`;
    const zombie = () =>
      db()
        .sql`UPDATE vm_runtimes r SET vm_state = 'zombie', host_id = ${h!.id} FROM vms v WHERE v.id = r.vm_id AND v.name = 'desk-alice'`;
    const host = async () => (await root.get(`/hosts/${h!.id}`)).body;
    try {
      expect(await ok(["host", "drain", "cli-farm-node"])).toContain("drain ok");
      expect((await host()).drain).toBe(true);
      expect(await ok(["host", "list", "--filter", "name=cli-farm-node"])).toMatch(
        / drain +blocked[^\n]*\n.* running +yes +no /,
      );
      await ok(["host", "undrain", "cli-farm-node"]);
      expect((await host()).drain).toBe(false);
      await zombie();
      const alive = await qvd(SUPER, ["vm", "clear-zombie", "desk-alice"]);
      expect([alive.code, alive.stderr]).toEqual([6, expect.stringContaining("which is alive: stop the VM instead")]);
      const noReason = await qvd(SUPER, ["host", "declare-lost", "cli-farm-node"]);
      expect([noReason.code, noReason.stderr]).toEqual([2, "qvd: host declare-lost needs --reason TEXT\n"]);
      expect((await host()).state).toBe("running");
      expect(await ok(["host", "declare-lost", "cli-farm-node", "--reason", "power supply died"])).toContain(
        "declare-lost ok",
      );
      expect(await host()).toMatchObject({ state: "lost", lost_reason: "power supply died", vms_running: 0 });
      expect((await root.get("/vms?name=desk-alice")).body.items[0]).toMatchObject({
        vm_state: "stopped",
        host_id: null,
      });
      await zombie(); // say its node died while it was being torn down
      expect(await ok(["vm", "clear-zombie", "desk-alice"])).toContain("clear-zombie ok");
      expect((await root.get("/vms?name=desk-alice")).body.items[0]).toMatchObject({
        vm_state: "stopped",
        host_id: null,
      });
      expect((await qvd(SUPER, ["host", "declare-lost", "cli-farm-node", "--reason", "again"])).code).toBe(6);
    } finally {
      await db()
        .sql`UPDATE vm_runtimes r SET vm_state = 'stopped', host_id = NULL FROM vms v WHERE v.id = r.vm_id AND v.name = 'desk-alice'`;
      await db().sql`DELETE FROM hosts WHERE id = ${h!.id}`;
    }
  });

  test("di tag moves a tag between an OSF's images", async () => {
    const first = createdId(await ok(["di", "new", "osf=desktop", "path=first.tar"]));
    const second = createdId(await ok(["di", "new", "osf=desktop", "path=second.tar", "version=v2"]));
    expect((await root.get(`/dis/${first}`)).body.tags).toContain("default");
    const out = await ok(["di", "tag", "v2", "default"]);
    expect(out).toContain(`moved from di ${first}`);
    expect((await root.get(`/dis/${second}`)).body.tags).toContain("default");
    expect((await root.get(`/dis/${first}`)).body.tags).not.toContain("default");
    await ok(["di", "tag", String(first), "stable"]);
    await ok(["di", "untag", String(first), "stable"]);
    expect((await root.get(`/dis/${first}`)).body.tags).not.toContain("stable");
  });

  test("roles and administrators: grant, deny, inherit, assign, can (exit 0 or 1)", async () => {
    await ok(["role", "new", "name=helpdesk"]);
    await ok(["role", "grant", "helpdesk", "vm.start", "config.see"]);
    await ok(["role", "deny", "helpdesk", "vm.stop"]);
    await ok(["role", "inherit", "helpdesk", "Operator"]);
    const acls = (await ok(["role", "acls", "helpdesk"])).trim().split("\n");
    expect(acls).toContain("config.see");
    expect(acls).toContain("user.block"); // inherited from Operator
    expect(acls).not.toContain("vm.stop"); // Operator grants it; the role denies it

    await ok(["admin", "new", "name=carol", "password=carol-secret", "tenant=default"]);
    expect(await ok(["admin", "assign", "carol", "helpdesk"])).toContain("roles: helpdesk");
    const can = await qvd(SUPER, ["admin", "can", "carol", "vm.%"]);
    expect(can.code).toBe(0);
    const lines = can.stdout.trim().split("\n");
    expect(lines).toContain("vm.start");
    expect(lines).not.toContain("vm.stop");
    expect(lines.every((l) => l.startsWith("vm."))).toBe(true);
    const cannot = await qvd(SUPER, ["admin", "can", "carol", "tenant.%"]);
    expect(cannot.code).toBe(1);
    expect(cannot.stdout).toBe("");
    expect((await qvd(SUPER, ["admins", "can", "carol", "vm.stop"])).code).toBe(1);
    await ok(["role", "ungrant", "helpdesk", "vm.stop"]);
    expect((await qvd(SUPER, ["admin", "can", "carol", "vm.stop"])).code).toBe(0);
  });

  test("config set, list, unset", async () => {
    const item = async () =>
      (await json(["config", "list"])).items.find((i: { key: string }) => i.key === "vm.network.range");
    expect((await item()).source).toBe("default");
    await ok(["config", "set", "vm.network.range", "10.9.0.0/16"]);
    expect(await item()).toMatchObject({ value: "10.9.0.0/16", source: "global" });
    expect(await ok(["config", "get", "vm.network.range"])).toBe("10.9.0.0/16\n");
    expect(await ok(["config", "list"])).toMatch(/^vm\.network\.range\s+10\.9\.0\.0\/16\s+global/m);
    await ok(["config", "unset", "vm.network.range"]);
    expect((await item()).source).toBe("default");
    expect((await qvd(SUPER, ["config", "unset", "vm.network.range"])).code).toBe(5);
    expect((await qvd(SUPER, ["config", "set", "no.such.key", "1"])).code).toBe(5);
  });
});

describe("exit codes", () => {
  test("3: after logout (locally and on the server)", async () => {
    const h = home("logout");
    // Code and stderr together, so that a failure shows what the CLI said.
    const said = (r: Captured) => ({ code: r.code, stderr: r.stderr });
    expect(
      said(await qvd(h, ["login", "--url", api.url, "--name", TEST_ADMIN.name, "--password-file", pwFile])),
    ).toMatchObject({ code: 0 });
    const token = JSON.parse(readFileSync(credentials(h), "utf8")).token;
    expect(said(await qvd(h, ["logout"]))).toEqual({ code: 0, stderr: "" });
    expect(existsSync(credentials(h))).toBe(false);
    const r = await qvd(h, ["user", "list"]);
    expect(said(r)).toMatchObject({ code: 3, stderr: expect.stringMatching(/^qvd: not logged in/) });
    // The token no longer works on the API either.
    const old = await qvd(h, ["user", "list", "--url", api.url, "--token", token]);
    expect(said(old)).toMatchObject({ code: 3, stderr: expect.stringContaining("log in again") });
  });

  test("4: an Operator may list users but not create one", async () => {
    const created = await root.post("/administrators", { name: "op", password: "operator-pw", tenant_id: 1 });
    expect(created.status).toBe(201);
    const [operator] = (await root.get("/roles?name=Operator")).body.items;
    expect((await root.post(`/administrators/${created.body.id}/roles`, { role_id: operator.id })).status).toBe(200);
    const h = home("operator");
    expect(
      (await qvd(h, ["login", "--url", api.url, "--name", "op", "--tenant", "default"], { stdin: "operator-pw\n" }))
        .code,
    ).toBe(0);
    expect((await qvd(h, ["user", "list"])).code).toBe(0);
    const r = await qvd(h, ["user", "new", "name=zed"]);
    expect(r.code).toBe(4);
    expect(r.stderr).toBe("qvd: missing permission: user.create\n");
    expect((await root.get("/users?name=zed")).body.total).toBe(0);
  });

  test("5: not found, by id and by name", async () => {
    const r = await qvd(SUPER, ["vm", "get", "999999"]);
    expect(r.code).toBe(5);
    expect(r.stderr).toBe("qvd: vm 999999 not found\n");
    expect((await qvd(SUPER, ["user", "get", "nobody"])).code).toBe(5);
  });

  test("7: nothing listens at the URL", async () => {
    const s = Bun.serve({ hostname: "127.0.0.1", port: 0, fetch: () => new Response("") });
    const port = s.port;
    await s.stop(true);
    const r = await qvd(SUPER, ["user", "list", "--url", `http://127.0.0.1:${port}`, "--token", "a".repeat(43)]);
    expect(r.code).toBe(7);
    expect(r.stderr).toStartWith(`qvd: cannot reach the API at http://127.0.0.1:${port}/api/v1`);
    const env = await qvd(SUPER, ["whoami"], {
      env: { QVD_ADMIN_URL: `http://127.0.0.1:${port}`, QVD_ADMIN_TOKEN: "b".repeat(43) },
    });
    expect(env.code).toBe(7);
  });

  test("2: usage errors; --help everywhere", async () => {
    expect((await qvd(SUPER, ["vm", "frobnicate"])).code).toBe(2);
    expect((await qvd(SUPER, ["vms"])).code).toBe(2);
    expect((await qvd(SUPER, ["vm", "list", "--fitler", "x=1"])).code).toBe(2);
    expect((await qvd(SUPER, ["vm", "list", "--filter", "no-operator"])).code).toBe(2);
    expect((await qvd(SUPER, ["user", "new", "name"])).code).toBe(2);
    expect((await qvd(SUPER, ["vm", "start", "1", "--filter", "user=bob"])).code).toBe(2);
    for (const args of [
      ["--help"],
      ["vm", "--help"],
      ["vm", "list", "--help"],
      ["users", "set", "--help"],
      ["admin", "can", "--help"],
      ["config", "set", "--help"],
      ["login", "--help"],
    ]) {
      const r = await qvd(SUPER, args);
      expect(r.code).toBe(0);
      expect(r.stdout).toContain("USAGE");
    }
    expect((await qvd(SUPER, ["vm", "list", "--help"])).stdout).toContain("--filter");
    expect((await qvd(SUPER, ["users", "set", "--help"])).stdout).toContain("Example: qvd admin user set");
  });
});

const hasOpenssl = Bun.spawnSync(["sh", "-c", "command -v openssl"]).exitCode === 0;

describe.skipIf(!hasOpenssl)("TLS", () => {
  let proxy: ReturnType<typeof Bun.serve> | undefined;
  let url = "";
  const cert = join(dir, "cert.pem");
  const key = join(dir, "key.pem");
  beforeAll(async () => {
    await selfSignedCert(dir, { san: "IP:127.0.0.1" });
    // An HTTPS front for the test API (which serves plain HTTP).
    proxy = Bun.serve({
      hostname: "127.0.0.1",
      port: 0,
      tls: { cert: Bun.file(cert), key: Bun.file(key) },
      fetch: (req) => {
        const u = new URL(req.url);
        return fetch(baseUrl() + u.pathname + u.search, { method: req.method, headers: req.headers, body: req.body });
      },
    });
    url = `https://127.0.0.1:${proxy.port}`;
  });
  afterAll(async () => {
    await proxy?.stop(true);
  });

  test("an untrusted certificate is exit 7; --ca trusts it; --insecure skips the check with a warning", async () => {
    const h = home("tls");
    const login = ["login", "--url", url, "--name", TEST_ADMIN.name, "--password-file", pwFile];
    const untrusted = await qvd(h, login);
    expect(untrusted.code).toBe(7);
    expect(untrusted.stderr).toContain("--ca FILE");

    expect((await qvd(h, [...login, "--ca", cert])).code).toBe(0);
    expect(JSON.parse(readFileSync(credentials(h), "utf8")).ca).toBe(cert);
    const who = await qvd(h, ["whoami"]); // the stored CA is used
    expect(who.code).toBe(0);
    expect(who.stderr).toBe("");

    const insecure = await qvd(home("tls-insecure"), [...login, "--insecure"]);
    expect(insecure.code).toBe(0);
    expect(insecure.stderr).toContain("warning");
  });
});
