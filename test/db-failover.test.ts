// The database made highly available: libpq multi-host URLs in every role, and a farm that rides
// a failover. A primary and its streaming standby (test/support/pg-pair.ts), the API and a real
// `qvd hkd` (a busybox desktop in LXC) on a multi-host URL; the primary is stopped at once and
// the standby promoted: the API writes again, the HKD heartbeats on, its desktop never stops,
// no node is lost, and a command sent by NOTIFY reaches the HKD. Root only (LXC, namespaces).
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { chmodSync, chownSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { maskUrl } from "../src/cli.ts";
import * as D from "../src/db/index.ts";
import { checkDatabaseTls, connect, parseDatabaseUrl, type Sql } from "../src/db/pool.ts";
import { loadConfig } from "../src/config.ts";
import { LocalCluster } from "../src/db/local-cluster.ts";
import { run } from "../src/run.ts";
import { startTestApi, type ApiClient, type TestApi } from "./support/api.ts";
import { TEST_ADMIN, type TestDatabase } from "./support/db.ts";
import { freePort } from "./support/free.ts";
import { busyboxImage, TestNode } from "./support/node.ts";
import { PgPair } from "./support/pg-pair.ts";
import { until, waitFor } from "./support/wait.ts";
import { selfSignedCert } from "./support/tls.ts";

const isRoot = process.getuid?.() === 0;
const ALL = D.ALL_TENANTS;

describe("multi-host database URLs", () => {
  test("servers from the authority or from ?host= and ?port=, in order; a one-host URL is left as it was", () => {
    const p = parseDatabaseUrl(
      "postgres://qvd:pw@db1:5433,db2,[fd00::2]:6000/qvd?target_session_attrs=read-write&sslmode=require",
    );
    expect(p.targets).toEqual([
      { host: "db1", port: 5433 },
      { host: "db2", port: 5432 },
      { host: "fd00::2", port: 6000 },
    ]);
    expect(p.targetSessionAttrs).toBe("read-write");
    expect(new URL(p.url).searchParams.get("sslmode")).toBe("require");
    const s = parseDatabaseUrl("postgres://postgres@/qvd?host=/run/a,/run/b&port=5433&target_session_attrs=read-write");
    expect(s.targets).toEqual([
      { host: "/run/a", port: 5433, path: "/run/a/.s.PGSQL.5433" },
      { host: "/run/b", port: 5433, path: "/run/b/.s.PGSQL.5433" },
    ]);
    expect(parseDatabaseUrl("postgres://u@/q?host=/run/a,/run/b&port=1,2").targets.map((t) => t.path)).toEqual([
      "/run/a/.s.PGSQL.1",
      "/run/b/.s.PGSQL.2",
    ]);
    expect(parseDatabaseUrl("postgres://qvd:pw@db1:5433/qvd").url).toBe("postgres://qvd:pw@db1:5433/qvd");
    expect(parseDatabaseUrl("postgres://postgres@/qvd?host=/run/pg").path).toBe("/run/pg/.s.PGSQL.5432");
  });

  test("malformed host lists are refused with a one-line reason, and the config check accepts the multi-host form", () => {
    expect(() => parseDatabaseUrl("postgres://u@/q?host=/a,/b,/c&port=1,2")).toThrow("2 ports for 3 hosts");
    expect(() => parseDatabaseUrl("postgres://u@a:99999,b/q")).toThrow("invalid port for host a");
    expect(() => parseDatabaseUrl("postgres://u@a:x,b/q")).toThrow("invalid port");
    expect(() => parseDatabaseUrl("postgres://u@a%zz/q")).toThrow("database.url: expected a URL");
    const url = "postgres://qvd:pw@10.0.0.1:5432,10.0.0.2:5432/qvd?target_session_attrs=read-write&sslmode=verify-full";
    const load = (value: string) =>
      loadConfig({
        env: {},
        defaultFileExists: () => false,
        flags: [{ flag: "--db", key: "database.url", value }],
      }).databaseUrl();
    expect(load(url)).toBe(url);
    expect(() => load(url.replace("read-write", "standby"))).toThrow(
      "target_session_attrs=standby: qvd writes to its database",
    );
  });

  test("each non-loopback server needs TLS; the message names it and never the password", () => {
    expect(() => checkDatabaseTls("postgres://qvd:pw@127.0.0.1:5432,db2.example:5432/qvd")).toThrow(
      /database on db2\.example is reached over the network/,
    );
    expect(() => checkDatabaseTls("postgres://qvd:pw@127.0.0.1:5432,db2.example:5432/qvd")).not.toThrow(/pw/);
    expect(() => checkDatabaseTls("postgres://qvd:pw@/qvd?host=/run/a,db2.example")).toThrow(/db2\.example/);
    expect(() => checkDatabaseTls("postgres://qvd:pw@db1,db2/qvd?sslmode=verify-full")).not.toThrow();
    expect(() => checkDatabaseTls("postgres://qvd:pw@/qvd?host=/run/a,/run/b")).not.toThrow();
    expect(() => connect("postgres://qvd:pw@db1,db2/qvd?sslmode=require&target_session_attrs=standby")).toThrow(
      "use read-write",
    );
  });

  test("a multi-host URL in messages hides its password", () => {
    const m = maskUrl("postgres://qvd:s3cret@db1:5432,db2:5432/qvd?target_session_attrs=read-write");
    expect(m).not.toContain("s3cret");
    expect(m).toContain("db1:5432,db2:5432");
    expect(maskUrl("postgres://qvd@/qvd?host=/run/a,/run/b&password=s3cret")).not.toContain("s3cret");
  });

  test("with every server down a query fails, as with one server, instead of waiting for ever", async () => {
    // postgres.js's own multi-host loop retries without pause and never fails the query: a node
    // would never see the outage (nor fence itself).
    const sql = connect("postgres://qvd@127.0.0.1:1,127.0.0.1:2/qvd?target_session_attrs=read-write", {
      max: 1,
      connectTimeout: 2,
    });
    try {
      for (let i = 0; i < 3; i++) {
        const outcome = await Promise.race([
          sql`SELECT 1`.then(
            () => "answered",
            (e: Error) => `failed: ${e.message}`,
          ),
          Bun.sleep(30_000).then(() => "still waiting"),
        ]);
        expect(outcome).toBe("failed: no database server takes writes (tried 127.0.0.1:1, 127.0.0.1:2)");
      }
    } finally {
      await sql.end({ timeout: 1 });
    }
  }, 120_000);
});

/** A port nothing listens on (taken and given back). */
describe("multi-host over TLS", () => {
  // One server on loopback TCP that takes TLS connections only (hostssl, scram), and a dead
  // port listed before it: the chosen server, and the question asked of it, go over TLS.
  let dir = "";
  const port = freePort();
  const dead = freePort();
  const password = `pw-${Math.random().toString(36).slice(2)}`;
  let pg: LocalCluster;

  beforeAll(async () => {
    dir = mkdtempSync("/tmp/qvd-test-pgtls-");
    chmodSync(dir, 0o755);
    pg = new LocalCluster({
      dir: join(dir, "pg"),
      noSync: true,
      settings: {
        listen_addresses: "127.0.0.1",
        port,
        ssl: "on",
        ssl_cert_file: join(dir, "pg", "server.crt"),
        ssl_key_file: join(dir, "pg", "server.key"),
        password_encryption: "scram-sha-256",
        fsync: "off",
      },
    });
    await pg.init();
    await selfSignedCert(pg.dir, {
      cn: "qvd test db",
      days: 1,
      san: "IP:127.0.0.1",
      names: ["server.crt", "server.key"],
    });
    const owner = statSync(pg.dir);
    for (const f of ["server.key", "server.crt"]) {
      chownSync(join(pg.dir, f), owner.uid, owner.gid);
      chmodSync(join(pg.dir, f), 0o600);
    }
    writeFileSync(join(pg.data, "pg_hba.conf"), `local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n`);
    await pg.start();
    const admin = connect(`postgres://postgres@/postgres?host=${pg.dir}&port=${port}`, { max: 1 });
    try {
      await admin.unsafe(`ALTER ROLE postgres PASSWORD '${password}'`);
    } finally {
      await admin.end({ timeout: 2 });
    }
  }, 120_000);

  afterAll(async () => {
    await pg?.stop("immediate").catch(() => {});
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  const outcome = async (url: string) => {
    const sql = connect(url, { max: 1, connectTimeout: 5 });
    try {
      const [r] = await sql`SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()`;
      return r!.ssl ? "over TLS" : "in clear";
    } catch (err) {
      return `failed: ${(err as Error).message}`;
    } finally {
      await sql.end({ timeout: 1 });
    }
  };

  test("sslmode=require: the server after a dead one is reached over TLS", async () => {
    expect(
      await outcome(
        `postgres://postgres:${password}@127.0.0.1:${dead},127.0.0.1:${port}/postgres?sslmode=require&target_session_attrs=read-write`,
      ),
    ).toBe("over TLS");
  });

  test("sslmode=verify-full with a certificate nobody vouches for: nothing is used", async () => {
    expect(
      await outcome(
        `postgres://postgres:${password}@127.0.0.1:${dead},127.0.0.1:${port}/postgres?sslmode=verify-full&target_session_attrs=read-write`,
      ),
    ).toBe(`failed: no database server takes writes (tried 127.0.0.1:${dead}, 127.0.0.1:${port})`);
  });
});

describe.skipIf(!isRoot)("database failover", () => {
  let pair: PgPair;
  let sql: Sql;
  /** Connected to the first primary, then left alone until it is back as a standby. */
  let early: Sql;
  let db: TestDatabase;
  let api: TestApi;
  let sa: ApiClient;
  let vm: D.VmRow;
  const node = new TestNode(() => db, "failnode");
  const vmState = async (id: number) => (await D.get(sql, D.vms, ALL, id)).vm_state;
  const initPid = async (id: number) =>
    (
      await run([...node.ns.exec, "lxc-info", "-n", `qvd-${id}`, "-P", node.lxcPath, "-p", "-H"], { allowFail: true })
    ).stdout.trim();
  const hostState = async () =>
    ((await sql`SELECT state FROM host_runtimes WHERE host_id = ${node.host.id}`)[0] as { state: string }).state;

  beforeAll(async () => {
    pair = await PgPair.start();
    const url = pair.url();
    sql = connect(url, { max: 4 });
    early = connect(url, { max: 1 });
    expect((await early`SELECT current_setting('data_directory') AS data`)[0]!.data).toBe(pair.a.data);
    db = { name: "qvd", url, sql, cluster: undefined as never };
    await node.setup();
    const user = await D.create(sql, D.users, ALL, { tenant_id: 1, name: "alice" });
    const osf = await D.create(sql, D.osfs, ALL, { tenant_id: 1, name: "busybox", memory_mb: 128 });
    await node.addImage(osf.id, "busybox.tar.gz", busyboxImage);
    vm = await D.createVm(sql, ALL, { user_id: user.id, osf_id: osf.id, name: "desk" }, { range: "198.18.0.0/16" });
    api = await startTestApi(db);
    sa = await api.login(TEST_ADMIN.name, TEST_ADMIN.password);
    // Commands reach the HKD only by NOTIFY here: its fallback poll comes every 10 minutes.
    await node.start({ "hkd.poll_interval": "600", "hkd.fence_after": "120" });
  }, 600_000);

  afterAll(async () => {
    await api?.stop();
    await node.stop();
    await sql?.end({ timeout: 2 });
    await early?.end({ timeout: 2 });
    await pair?.stop();
  }, 120_000);

  test("the primary stops and the standby is promoted: the API writes again, the HKD heartbeats on, its desktop never stops, no node is lost, NOTIFY commands still arrive", async () => {
    expect((await sa.post(`/vms/${vm.id}/start`)).status).toBe(200);
    await until(async () => (await vmState(vm.id)) === "running", "the desktop to run");
    const pid = await initPid(vm.id);
    expect(pid).toMatch(/^\d+$/);
    await pair.caughtUp();

    await pair.stopPrimary();
    const t0 = performance.now();
    const promotion = pair.promote();
    let i = 0;
    const firstWriteMs = await waitFor(
      "an API write after the failover",
      async () => {
        const r = await sa.post("/users", { name: `after-failover-${i++}` }).catch(() => ({ status: 0 }));
        return r.status === 201 && performance.now() - t0;
      },
      120_000,
      50,
    );
    const promoteMs = await promotion;
    console.log(
      `database failover: primary stopped -> first API write ${Math.round(firstWriteMs)} ms (promotion itself ${Math.round(promoteMs)} ms)`,
    );

    // The HKD heartbeats into the new primary.
    const [{ now }] = (await sql`SELECT now() AS now`) as unknown as [{ now: Date }];
    await until(
      async () => {
        const [r] = await sql`SELECT ok_ts FROM host_runtimes WHERE host_id = ${node.host.id}`;
        return (r!.ok_ts as Date) > now;
      },
      "a heartbeat on the new primary",
      30_000,
    );
    expect(await hostState()).toBe("running");
    // The desktop never stopped: same container, same init process, still running in the database.
    expect(await node.containers()).toEqual([`qvd-${vm.id}`]);
    expect(await initPid(vm.id)).toBe(pid);
    expect(await vmState(vm.id)).toBe("running");
    expect(readFileSync(node.logFile, "utf8")).not.toContain("fencing");

    // A stop through the API is a NOTIFY to the HKD, on its connection LISTENing again.
    await until(
      () => readFileSync(node.logFile, "utf8").includes("notifications resumed"),
      "the HKD to listen again",
      30_000,
    );
    expect((await sa.post(`/vms/${vm.id}/stop`)).status).toBe(200);
    await until(
      async () => (await vmState(vm.id)) === "stopped" && (await node.containers()).length === 0,
      "the stop to reach the HKD",
      60_000,
    );
  }, 300_000);

  test("the old primary back as a standby, named first in the URL: new connections skip it and write to the new primary", async () => {
    await pair.rejoinAsStandby();
    const direct = connect(pair.a.url("qvd"), { max: 1 });
    try {
      expect((await direct`SELECT pg_is_in_recovery() AS standby`)[0]!.standby).toBe(true);
    } finally {
      await direct.end({ timeout: 1 });
    }
    const fresh = connect(pair.url(), { max: 2 });
    try {
      const [r] = await fresh`SELECT pg_is_in_recovery() AS standby, current_setting('data_directory') AS data`;
      expect(r!.standby).toBe(false);
      expect(r!.data).toBe(pair.b.data);
      await D.create(fresh, D.users, ALL, { tenant_id: 1, name: "written-after-rejoin" });
    } finally {
      await fresh.end({ timeout: 1 });
    }
    // A pool whose connection went to the old primary reconnects to the primary, not to it.
    const [e] = await early`SELECT current_setting('data_directory') AS data`;
    expect(e!.data).toBe(pair.b.data);
    await D.create(early, D.users, ALL, { tenant_id: 1, name: "written-by-an-early-pool" });
    // The running roles keep going too.
    expect((await sa.post("/users", { name: "after-rejoin" })).status).toBe(201);
    expect(await hostState()).toBe("running");
  }, 180_000);
});
