// `qvd node --check` as the compiled binary, as root, against a real throwaway PostgreSQL: a
// configuration that works (every line that does not depend on this machine's kernel is ok,
// exit 0), then one broken requirement at a time, each with its exit status, its line and fix.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { createHash } from "node:crypto";
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import * as D from "../src/db/index.ts";
import { Config } from "../src/config.ts";
import { SCHEMA_VERSION } from "../src/db/schema.ts";
import { CheckContext, runChecks } from "../src/hkd/preflight.ts";
import { acquireNodeLock } from "../src/hkd/lock.ts";
import { run } from "../src/run.ts";
import { testDatabase, useTestDatabase, type TestDatabase } from "./support/db.ts";
import { cleanEnv, farmCert, qvdBinary } from "./support/node.ts";
import { capture } from "./support/spawn.ts";
import { selfSignedCert } from "./support/tls.ts";

const NODE = "check-node";
const PASSWORD = "s3cret-Pw-4711";
const dir = mkdtempSync("/tmp/qvd-node-check-");
const storage = join(dir, "storage");
const runDir = join(dir, "run");
const db = useTestDatabase();
/** A second database (template copy): no hosts row, its schema version changed by the tests. */
let spare: TestDatabase;
let binary: string;
let conf: string;
const certs = { cert: "", key: "", otherKey: "", expired: "", expiredKey: "", soon: "", soonKey: "" };

afterAll(async () => {
  await spare?.sql.end({ timeout: 5 });
  rmSync(dir, { recursive: true, force: true });
});

const openssl = (...args: string[]) => run(["openssl", ...args], { cwd: dir });

/** A self-signed EC certificate (and its key) valid for `days`. */
const selfSigned = (name: string, days: number) =>
  selfSignedCert(dir, { cn: name, days, ec: true, names: [`${name}.crt`, `${name}.key`] });

/** A certificate that expired in 2020: `openssl ca` takes explicit dates in every OpenSSL 3. */
async function expiredCert(): Promise<{ cert: string; key: string }> {
  const ca = join(dir, "oldca");
  mkdirSync(ca);
  writeFileSync(join(ca, "index.txt"), "");
  writeFileSync(
    join(ca, "ca.cnf"),
    `[ca]\ndefault_ca = d\n[d]\ndatabase = ${ca}/index.txt\nnew_certs_dir = ${ca}\nrand_serial = yes\ndefault_md = sha256\npolicy = p\n[p]\ncommonName = supplied\n`,
  );
  const key = join(dir, "expired.key");
  const cert = join(dir, "expired.crt");
  await openssl(
    "req",
    "-new",
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
    "-keyout",
    key,
    "-out",
    join(ca, "r.csr"),
    "-subj",
    "/CN=expired",
  );
  await openssl(
    "ca",
    "-batch",
    "-config",
    join(ca, "ca.cnf"),
    "-selfsign",
    "-keyfile",
    key,
    "-in",
    join(ca, "r.csr"),
    "-startdate",
    "20200101000000Z",
    "-enddate",
    "20200201000000Z",
    "-notext",
    "-out",
    cert,
  );
  return { cert, key };
}

/** A gzip tarball whose one file is `member` (given as tar stores it: "./usr/…" or "usr/…"). */
async function tarball(file: string, member: string): Promise<void> {
  const root = mkdtempSync(join(dir, "rootfs-"));
  const rel = member.replace(/^\.\//, "");
  mkdirSync(join(root, rel, ".."), { recursive: true });
  writeFileSync(join(root, rel), "#!/bin/sh\n", { mode: 0o755 });
  await run(["tar", "-C", root, "-czf", file, member.startsWith("./") ? "." : rel.split("/")[0]!]);
  rmSync(root, { recursive: true, force: true });
}

/** An image file registered as uploaded (ready) in an LXC OSF of `sql`. */
async function addImage(sql: D.Sql, osf: string, file: string): Promise<void> {
  let o = (await D.list(sql, D.osfs, D.ALL_TENANTS, { filters: [{ field: "name", op: "=", value: osf }] })).rows[0];
  o ??= await D.create(sql, D.osfs, D.ALL_TENANTS, { tenant_id: 1, name: osf, memory_mb: 256 });
  const bytes = readFileSync(join(storage, "images", file));
  const di = await D.create(sql, D.dis, D.ALL_TENANTS, { osf_id: o.id, path: file });
  await D.finishDiUpload(sql, di.id, bytes.length, createHash("sha256").update(bytes).digest("hex"));
}

beforeAll(async () => {
  binary = await qvdBinary();
  spare = await testDatabase();
  for (const d of ["images", "homes", "overlays"]) mkdirSync(join(storage, d), { recursive: true });
  mkdirSync(runDir);
  chmodSync(dir, 0o755);
  const l7r = await selfSigned("l7r", 365);
  const soon = await selfSigned("soon", 10);
  const other = await selfSigned("other", 365);
  const old = await expiredCert();
  Object.assign(certs, {
    cert: l7r.cert,
    key: l7r.key,
    otherKey: other.key,
    soon: soon.cert,
    soonKey: soon.key,
    expired: old.cert,
    expiredKey: old.key,
  });
  const farm = await farmCert(NODE, "127.0.0.1");
  await tarball(join(storage, "images", "desktop.tar.gz"), "./usr/bin/nxagent");
  await addImage(db().sql, "check-osf", "desktop.tar.gz");
  await D.registerHost(db().sql, NODE, "127.0.0.1");
  conf = join(dir, "node.conf");
  writeFileSync(
    conf,
    [
      `nodename = ${NODE}`,
      `database.url = ${db().url}`,
      `path.storage.root = ${storage}`,
      `path.run = ${runDir}`,
      `l7r.tls.cert = ${certs.cert}`,
      `l7r.tls.key = ${certs.key}`,
      ...Object.entries(farm.settings).map(([k, v]) => `${k} = ${v}`),
      "vm.hypervisor = lxc",
      "",
    ].join("\n"),
  );
});

interface Line {
  level: string;
  detail: string;
  fix?: string;
}

interface Outcome {
  code: number;
  out: string;
  lines: Map<string, Line>;
}

/** Runs `qvd node --check --config <conf> …args` and parses its aligned lines. */
async function check(...args: string[]): Promise<Outcome> {
  const { stdout, stderr, code } = await capture([binary, "node", "--check", "--config", conf, ...args], {
    env: cleanEnv(),
  });
  const lines = new Map<string, Line>();
  for (const l of stdout.split("\n")) {
    // "LEVEL  WHAT<padding>  DETAIL — fix: FIX": the requirement never holds two spaces in a row.
    const m = /^(ok|warn|fail)\s+(.+?)(?:\s{2,}(.*))?$/.exec(l);
    if (!m) continue;
    const [detail, fix] = (m[3] ?? "").split(" — fix: ");
    lines.set(m[2]!, { level: m[1]!, detail: detail!, fix });
  }
  return { code, out: stdout + stderr, lines };
}

const line = (o: Outcome, what: string): Line => {
  const l = o.lines.get(what);
  if (!l) throw new Error(`no line "${what}" in:\n${o.out}`);
  return l;
};

describe("a configuration that works", () => {
  test("every requirement this test set up is ok, nothing fails, and the exit status is 0", async () => {
    const o = await check();
    for (const what of [
      "running as root",
      "database",
      "schema version",
      "cluster settings (configs)",
      "clock",
      "path.storage.root",
      "path.storage.images",
      "path.storage.homes",
      "path.storage.overlays",
      "path.run",
      "L7R certificate (l7r.tls.*)",
      "farm certificate (cluster.tls.*)",
      "node registered (hosts)",
      "node lock",
      "nxagent in the newest image",
      "qvd binary for desktops",
      "lxc backend",
      "network tools",
    ])
      expect({ what, ...line(o, what) }).toMatchObject({ what, level: "ok" });
    expect(line(o, "schema version").detail).toBe(`version ${SCHEMA_VERSION}`);
    expect(line(o, "nxagent in the newest image").detail).toContain(
      `/usr/bin/nxagent in ${join(storage, "images", "desktop.tar.gz")}`,
    );
    expect(line(o, "path.storage.root").detail).toMatch(/GiB free$/);
    expect(line(o, "node registered (hosts)").detail).toContain(`host "${NODE}"`);
    expect(line(o, "qvd binary for desktops").detail).toBe(binary);
    expect([...o.lines.values()].filter((l) => l.level === "fail")).toEqual([]);
    expect(o.code).toBe(0);
    expect(o.out).toMatch(/\nThis machine can run desktops( \(.*\))?\.\n$/);
    // Nothing left behind: the lock is looked at, not taken; the storage probe files are gone.
    expect(existsSync(join(runDir, "hkd.lock"))).toBe(false);
    expect(Bun.spawnSync(["find", dir, "-name", ".qvd-check-*"]).stdout.toString()).toBe("");
  });

  test("--json gives the same results for machines", async () => {
    const p = Bun.spawn([binary, "node", "--check", "--json", "--config", conf], {
      env: cleanEnv(),
      stdout: "pipe",
      stderr: "pipe",
    });
    const [stdout, code] = await Promise.all([new Response(p.stdout).text(), p.exited]);
    const res = JSON.parse(stdout) as { ok: boolean; failed: number; checks: { level: string; what: string }[] };
    expect(code).toBe(0);
    expect(res.ok).toBe(true);
    expect(res.failed).toBe(0);
    expect(res.checks.find((c) => c.what === "database")!.level).toBe("ok");
  });
});

describe("broken requirements", () => {
  test("a storage root that does not exist fails, with how to make it", async () => {
    const o = await check("--set", `path.storage.root=${dir}/nowhere`);
    expect(o.code).toBe(1);
    expect(line(o, "path.storage.root")).toEqual({
      level: "fail",
      detail: `${dir}/nowhere does not exist`,
      fix: `mount the shared storage there, or create it (mkdir -p ${dir}/nowhere)`,
    });
    expect(line(o, "path.storage.homes")).toMatchObject({
      level: "warn",
      detail: expect.stringContaining("not checked"),
    });
    expect(o.out).toMatch(/cannot run desktops as configured: \d+ failed/);
  });

  test("a refused database fails, and its password is never printed", async () => {
    const url = `postgres://qvd:${PASSWORD}@127.0.0.1:1/qvd`;
    for (const json of [[], ["--json"]]) {
      const o = await check("--db", url, ...json);
      expect(o.code).toBe(1);
      expect(o.out).not.toContain(PASSWORD);
      if (json.length) continue;
      expect(line(o, "database").level).toBe("fail");
      expect(line(o, "database").detail).toStartWith("cannot connect to postgres://qvd:********@127.0.0.1:1/qvd: ");
      expect(line(o, "database").detail).toContain("ECONNREFUSED");
      expect(line(o, "database").fix).toContain("check database.url");
      expect(line(o, "schema version")).toMatchObject({
        level: "warn",
        detail: "not checked: the database cannot be used",
      });
    }
  });

  test("an expired L7R certificate fails", async () => {
    const o = await check("--cert", certs.expired, "--key", certs.expiredKey);
    expect(o.code).toBe(1);
    expect(line(o, "L7R certificate (l7r.tls.*)")).toMatchObject({
      level: "fail",
      detail: `${certs.expired} expired on 2020-02-01`,
    });
    expect(line(o, "L7R certificate (l7r.tls.*)").fix).toStartWith("renew it");
  });

  test("a certificate expiring within 30 days is a warning only: exit 0", async () => {
    const o = await check("--cert", certs.soon, "--key", certs.soonKey);
    expect(line(o, "L7R certificate (l7r.tls.*)").level).toBe("warn");
    expect(line(o, "L7R certificate (l7r.tls.*)").detail).toMatch(/expires on \d{4}-\d\d-\d\d, in (9|10) days$/);
    expect(o.code).toBe(0);
    expect(o.out).toMatch(
      /This machine can run desktops \(1 warning\)\.|This machine can run desktops \(\d+ warnings\)\./,
    );
  });

  test("a key that is not the certificate's fails", async () => {
    const o = await check("--key", certs.otherKey);
    expect(o.code).toBe(1);
    expect(line(o, "L7R certificate (l7r.tls.*)")).toEqual({
      level: "fail",
      detail: `l7r.tls.key ${certs.otherKey} is not the key of ${certs.cert}`,
      fix: "give the key the certificate was made for (or a certificate made for this key)",
    });
  });

  test("a missing l7r.tls.cert file fails", async () => {
    const o = await check("--cert", join(dir, "absent.crt"));
    expect(o.code).toBe(1);
    expect(line(o, "L7R certificate (l7r.tls.*)")).toMatchObject({
      level: "fail",
      detail: `l7r.tls.cert ${join(dir, "absent.crt")}: no such file`,
    });
  });

  test("an unregistered node is a warning; with --register --address it is ok; no image yet is a warning", async () => {
    const o = await check("--db", spare.url);
    expect(line(o, "node registered (hosts)")).toMatchObject({
      level: "warn",
      fix: expect.stringContaining("--register --address ADDR"),
    });
    expect(line(o, "nxagent in the newest image")).toMatchObject({
      level: "warn",
      detail: "no image yet: no usable lxc disk image in the database yet",
    });
    expect(line(o, "nxagent in the newest image").fix).toContain("qvd admin di new");
    expect(o.code).toBe(0);
    const r = await check("--db", spare.url, "--register", "--address", "10.0.0.5");
    expect(line(r, "node registered (hosts)")).toMatchObject({
      level: "ok",
      detail: `no hosts row "${NODE}" yet: --register creates it (address 10.0.0.5)`,
    });
  });

  test("the newest image without nxagent fails", async () => {
    await tarball(join(storage, "images", "bare.tar.gz"), "usr/bin/xterm");
    await addImage(spare.sql, "bare-osf", "bare.tar.gz");
    const o = await check("--db", spare.url);
    expect(o.code).toBe(1);
    expect(line(o, "nxagent in the newest image").level).toBe("fail");
    expect(line(o, "nxagent in the newest image").detail).toContain(
      `${join(storage, "images", "bare.tar.gz")} (disk image `,
    );
    expect(line(o, "nxagent in the newest image").detail).toContain("has no /usr/bin/nxagent");
  });

  test("a schema behind this qvd fails with qvd db migrate; a newer one with upgrade qvd", async () => {
    await spare.sql`UPDATE schema_migrations SET version = ${SCHEMA_VERSION - 1}`;
    const behind = await check("--db", spare.url);
    expect(behind.code).toBe(1);
    expect(line(behind, "schema version")).toEqual({
      level: "fail",
      detail: `version ${SCHEMA_VERSION - 1}, this qvd needs ${SCHEMA_VERSION} (pending migrations: ${SCHEMA_VERSION})`,
      fix: "run qvd db migrate",
    });
    expect(line(behind, "node registered (hosts)").detail).toBe("not checked: the database's schema is not this qvd's");
    await spare.sql`UPDATE schema_migrations SET version = ${SCHEMA_VERSION + 1}`;
    const newer = await check("--db", spare.url);
    expect(newer.code).toBe(1);
    expect(line(newer, "schema version")).toMatchObject({ level: "fail", fix: "upgrade qvd on this node" });
  });

  test("a running HKD (its lock held) is a warning naming its pid", async () => {
    const release = acquireNodeLock(join(runDir, "hkd.lock"));
    try {
      const o = await check();
      expect(line(o, "node lock").level).toBe("warn");
      expect(line(o, "node lock").detail).toStartWith(
        `an HKD already runs on this node (pid ${process.pid} holds ${join(runDir, "hkd.lock")})`,
      );
      expect(o.code).toBe(0);
    } finally {
      release();
    }
  });
});

describe("the runner", () => {
  test("a check that hangs fails at its time limit, one that throws fails with its message, in list order", async () => {
    const seen: string[] = [];
    const res = await runChecks(
      [
        { what: "hangs", timeoutS: 0.05, run: () => new Promise(() => {}) },
        {
          what: "throws",
          run: async () => {
            throw new Error(`boom at postgres://qvd:${PASSWORD}@db/qvd`);
          },
        },
        { what: "fine", run: async () => ({ level: "ok", detail: "yes", fix: "not shown for ok" }) },
      ],
      new CheckContext(new Config()),
      (r) => seen.push(r.what),
    );
    expect(seen).toEqual(["hangs", "throws", "fine"]);
    expect(res).toEqual([
      {
        level: "fail",
        what: "hangs",
        detail: "no answer within 0.05 s",
        fix: "see what blocks it (a hung mount, a database that does not answer)",
      },
      {
        level: "fail",
        what: "throws",
        detail: "internal error: boom at postgres://qvd:********@db/qvd",
        fix: "report this if the message does not say what to do",
      },
      { level: "ok", what: "fine", detail: "yes" },
    ]);
  });
});
