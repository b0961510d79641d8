// `qvd config show` as a subprocess: output, sources, masking, exit codes and the one-line
// errors of a bad configuration; and cluster settings read from a real database.
import { beforeAll, describe, expect, test } from "bun:test";
import { chmodSync, existsSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DEFAULT_CONFIG_FILE, envName, KEYS, NON_KEY_ENV } from "../src/config.ts";
import { setConfig } from "../src/db/configs.ts";
import { useTestDatabase } from "./support/db.ts";
import { capture, cleanEnv, type Captured } from "./support/spawn.ts";
import { useConfFiles } from "./support/conf.ts";

const ROOT = join(import.meta.dir, "..");
const { dir, conf } = useConfFiles("qvd-config-cli-test-");

const qvd = (args: string[], env: Record<string, string> = {}, prefix: string[] = []): Promise<Captured> =>
  capture([...prefix, process.execPath, "src/main.ts", ...args], { cwd: ROOT, env: cleanEnv(env) });

/** Parses the text output into key → { value, source }. */
function table(stdout: string): Map<string, { value: string; source: string }> {
  const m = new Map<string, { value: string; source: string }>();
  for (const line of stdout.split("\n")) {
    const r = /^(\S+)\s+= (.*?)\s+# (.+)$/.exec(line);
    if (r) m.set(r[1]!, { value: r[2]!, source: r[3]! });
  }
  return m;
}

interface JsonOut {
  settings: { key: string; value: string; source: string; doc: string; scope: string; tenant: boolean }[];
  notes: string[];
}
const jsonOf = (r: Captured) => JSON.parse(r.stdout) as JsonOut;
const setting = (j: JsonOut, key: string) => j.settings.find((s) => s.key === key)!;

/** A configuration error: exit 78, nothing on stdout, one stderr line `qvd: <message>`. */
function expectConfigError(r: Captured, message: string | RegExp): void {
  expect(r.stdout).toBe("");
  const lines = r.stderr.split("\n").filter((l) => l !== "");
  expect(lines).toHaveLength(1);
  expect(lines[0]!.startsWith("qvd: ")).toBe(true);
  expect(r.stderr).not.toMatch(/^\s+at /m);
  expect(r.stderr).not.toContain("internal error");
  if (typeof message === "string") expect(lines[0]).toBe(`qvd: ${message}`);
  else expect(lines[0]).toMatch(message);
  expect(r.code).toBe(78);
}

const ALL_KEYS = Object.keys(KEYS);

describe("the client's and the admin CLI's variables (NON_KEY_ENV) are not configuration", () => {
  // What a user may have exported in the shell they run a node from: each documented variable.
  const exported: Record<string, string> = {};
  for (const name of Object.keys(NON_KEY_ENV)) exported[name] = name === "QVD_DEBUG" ? "1" : "x";
  delete exported.QVD_CONFIG; // names a file: tested on its own elsewhere

  test("no key's variable is one of them, and every one is documented", () => {
    for (const k of ALL_KEYS) expect(Object.keys(NON_KEY_ENV), k).not.toContain(envName(k));
    for (const [name, what] of Object.entries(NON_KEY_ENV)) expect(what.length, name).toBeGreaterThan(10);
  });

  test("qvd config show works with all of them exported", async () => {
    const r = await qvd(["config", "show", "--no-db"], exported);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
  });

  // Every role loads its configuration first: none stops at these variables. Without a database
  // each then stops (or, for the VMA, waits) for its own reasons, never "unknown key".
  for (const role of ["node", "hkd", "l7r", "api", "vma"]) {
    test(`qvd ${role} with all of them exported: no configuration error about them`, async () => {
      // A database nobody listens on: each role stops quickly whatever this machine runs.
      const env = cleanEnv({ ...exported, QVD_DATABASE_URL: "postgres://qvd@127.0.0.1:1/qvd" });
      const p = Bun.spawn([process.execPath, "src/main.ts", role], {
        cwd: ROOT,
        env,
        stdin: "ignore",
        stdout: "pipe",
        stderr: "pipe",
      });
      const timer = setTimeout(() => p.kill("SIGKILL"), 4000);
      const stderr = await new Response(p.stderr).text();
      await p.exited;
      clearTimeout(timer);
      // It got past its configuration: it stops on something of its own (certificates, the
      // database, the VMA file), said in one clear line.
      expect(stderr).toStartWith("qvd: ");
      expect(stderr).not.toContain("unknown key");
      expect(stderr).not.toMatch(/QVD_(TOKEN|PASSWORD|ADMIN|SLAVE|PARENT)/);
    }, 15_000);
  }

  test("a misspelt configuration variable is still an error", async () => {
    expectConfigError(
      await qvd(["config", "show", "--no-db"], { ...exported, QVD_DATABASE_ULR: "postgres://x" }),
      'environment QVD_DATABASE_ULR: unknown key "database.ulr" (did you mean "database.url"?)',
    );
  });
});

describe("qvd config show without a database", () => {
  test("works with nothing configured", async () => {
    const r = await qvd(["config", "show", "--no-db"]);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    const t = table(r.stdout);
    expect([...t.keys()]).toEqual(ALL_KEYS);
    expect(t.get("hkd.fence_after")).toEqual({ value: "120", source: "default" });
    expect(t.get("database.url")).toEqual({ value: "(unset)", source: "default" });
    for (const [k, e] of t) {
      // The default file is read when it exists: tolerate it on a configured machine.
      if (existsSync(DEFAULT_CONFIG_FILE))
        expect(e.source === "default" || e.source.startsWith(`${DEFAULT_CONFIG_FILE}:`), k).toBe(true);
      else expect(e.source, k).toBe("default");
    }
  });

  test("shows values from the file, environment and flags with their sources", async () => {
    const f = conf("# node.conf\nnodename = node-a\nhkd.fence_after = 10\nlog.level = warn\nwat.multitenant = yes\n");
    const r = await qvd(
      ["config", "show", "--no-db", "--config", f, "--set", "log.level=error", "--set=api.session.ttl=900"],
      {
        QVD_HKD_FENCE_AFTER: "30",
      },
    );
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    const t = table(r.stdout);
    expect(t.get("nodename")).toEqual({ value: "node-a", source: `${f}:2` });
    expect(t.get("hkd.fence_after")).toEqual({ value: "30", source: "environment QVD_HKD_FENCE_AFTER" });
    expect(t.get("log.level")).toEqual({ value: "error", source: "flag --set log.level" });
    expect(t.get("api.session.ttl")).toEqual({ value: "900", source: "flag --set api.session.ttl" });
    expect(t.get("wat.multitenant")).toEqual({ value: "1", source: `${f}:5` });
    expect(t.get("hkd.poll_interval")).toEqual({ value: "30", source: "default" });
  });

  test("QVD_CONFIG names the file", async () => {
    const f = conf("nodename = via-env-file\n");
    const r = await qvd(["config", "show", "--no-db"], { QVD_CONFIG: f });
    expect(r.code).toBe(0);
    expect(table(r.stdout).get("nodename")).toEqual({ value: "via-env-file", source: `${f}:1` });
  });

  test("--config wins over QVD_CONFIG", async () => {
    const a = conf("nodename = a\n");
    const b = conf("nodename = b\n");
    const r = await qvd(["config", "show", "--no-db", "--config", b], { QVD_CONFIG: a });
    expect(table(r.stdout).get("nodename")?.value).toBe("b");
  });

  test("--json prints every setting with value, source, doc, scope and whether a tenant may override it", async () => {
    const f = conf("hkd.fence_after = 15\n");
    const r = await qvd(["config", "show", "--no-db", "--json", "--config", f]);
    expect(r.code).toBe(0);
    const j = jsonOf(r);
    expect(j.notes).toEqual([]);
    expect(j.settings.map((s) => s.key)).toEqual(ALL_KEYS);
    expect(setting(j, "hkd.fence_after")).toEqual({
      key: "hkd.fence_after",
      value: "15",
      source: `${f}:1`,
      doc: KEYS["hkd.fence_after"].doc,
      scope: "cluster",
      tenant: false,
    });
    expect(setting(j, "nodename").scope).toBe("node");
  });

  test("--doc adds each key's documentation", async () => {
    const r = await qvd(["config", "show", "--no-db", "--doc", "--config", conf("")]);
    expect(r.code).toBe(0);
    expect(r.stdout).toContain(`# ${KEYS["hkd.fence_after"].doc} (cluster)\nhkd.fence_after`);
    expect(r.stdout).toContain(`# ${KEYS.nodename.doc} (node)\nnodename`);
  });

  test("secrets are masked in text and JSON, other values are not", async () => {
    const f = conf(
      [
        "database.password = hunter2",
        "database.url = postgres://qvd:hunter2@db.example/qvd",
        "api.tls.key = /etc/qvd/hunter2.key",
        "l7r.tls.key = /etc/qvd/hunter2-l7r.key",
        "api.tls.cert = /etc/qvd/api.crt",
      ].join("\n"),
    );
    for (const extra of [[], ["--json"]]) {
      const r = await qvd(["config", "show", "--no-db", "--config", f, ...extra]);
      expect(r.code).toBe(0);
      expect(r.stdout).not.toContain("hunter2");
      expect(r.stdout).toContain("/etc/qvd/api.crt");
      expect(r.stdout).toContain("********");
    }
    const t = table((await qvd(["config", "show", "--no-db", "--config", f])).stdout);
    for (const k of ["database.password", "database.url", "api.tls.key", "l7r.tls.key"])
      expect(t.get(k)?.value, k).toBe("********");
  });

  test("the database URL comes from --db, else QVD_DATABASE_URL, else database.url", async () => {
    const f = conf("database.url = postgres://file@h/db\n");
    const src = async (args: string[], env: Record<string, string> = {}) =>
      setting(jsonOf(await qvd(["config", "show", "--no-db", "--json", "--config", f, ...args], env)), "database.url")
        .source;
    expect(await src([])).toBe(`${f}:1`);
    expect(await src([], { QVD_DATABASE_URL: "postgres://env@h/db" })).toBe("environment QVD_DATABASE_URL");
    expect(await src(["--db", "postgres://flag@h/db"], { QVD_DATABASE_URL: "postgres://env@h/db" })).toBe("flag --db");
    expect(await src(["--db=postgres://flag@h/db"])).toBe("flag --db");
  });

  test("an unreachable database is a note, not a failure; the URL's password is masked", async () => {
    const r = await qvd(["config", "show", "--config", conf(""), "--db", "postgres://qvd:hunter2@127.0.0.1:1/qvd"]);
    expect(r.code).toBe(0);
    expect(r.stderr).toMatch(
      /^note: cluster settings not read: cannot use the database postgres:\/\/qvd:\*\*\*\*\*\*\*\*@127\.0\.0\.1:1\/qvd: /,
    );
    expect(r.stderr + r.stdout).not.toContain("hunter2");
    expect(table(r.stdout).get("hkd.fence_after")).toEqual({ value: "120", source: "default" });
  });
});

describe("configuration errors: exit 78, one line, no stack trace", () => {
  test("unknown key in the file: file:line and a hint", async () => {
    const f = conf("nodename = a\nhkd.fence_aftr = 3\n");
    expectConfigError(
      await qvd(["config", "show", "--no-db", "--config", f]),
      `${f}:2: unknown key "hkd.fence_aftr" (did you mean "hkd.fence_after"?)`,
    );
  });

  test("bad value in the file: file:line and key", async () => {
    const f = conf("\n\nhkd.fence_after = soon\n");
    expectConfigError(
      await qvd(["config", "show", "--no-db", "--config", f]),
      `${f}:3: hkd.fence_after: expected an integer, got "soon"`,
    );
  });

  test("out-of-range value in the file", async () => {
    const f = conf("database.port = 99999\n");
    expectConfigError(
      await qvd(["config", "show", "--no-db", "--config", f]),
      `${f}:1: database.port: must be at most 65535, got "99999"`,
    );
  });

  test("bad secret value: not echoed", async () => {
    const f = conf("database.url = hunter2\n");
    const r = await qvd(["config", "show", "--no-db", "--config", f]);
    expectConfigError(r, `${f}:1: database.url: expected a URL`);
    expect(r.stderr).not.toContain("hunter2");
  });

  test("a line without '='", async () => {
    const f = conf("nodename\n");
    expectConfigError(
      await qvd(["config", "show", "--no-db", "--config", f]),
      `${f}:1: expected "key = value", got "nodename"`,
    );
  });

  test("missing file", async () => {
    const f = join(dir, "missing.conf");
    expectConfigError(
      await qvd(["config", "show", "--no-db", "--config", f]),
      `${f}: cannot read configuration: no such file`,
    );
  });

  test("missing file named by QVD_CONFIG", async () => {
    const f = join(dir, "missing-env.conf");
    expectConfigError(
      await qvd(["config", "show", "--no-db"], { QVD_CONFIG: f }),
      `${f}: cannot read configuration: no such file`,
    );
  });

  test("a directory as configuration file", async () => {
    const d = join(dir, "conf.d");
    mkdirSync(d, { recursive: true });
    expectConfigError(
      await qvd(["config", "show", "--no-db", "--config", d]),
      `${d}: cannot read configuration: is a directory`,
    );
  });

  // root reads any file whatever its mode: as root, run qvd as `nobody` for this case.
  const isRoot = process.getuid?.() === 0;
  const canDropRoot = isRoot && !!Bun.which("runuser") && Bun.spawnSync(["id", "-u", "nobody"]).exitCode === 0;
  test.skipIf(isRoot && !canDropRoot)("a file without read permission", async () => {
    chmodSync(dir, 0o755); // let `nobody` reach the file, so that its own mode is what denies
    const f = conf("nodename = secret-node\n");
    chmodSync(f, isRoot ? 0o600 : 0o000);
    try {
      const r = await qvd(
        ["config", "show", "--no-db", "--config", f],
        { HOME: tmpdir() },
        isRoot ? ["runuser", "-u", "nobody", "--"] : [],
      );
      expectConfigError(r, `${f}: cannot read configuration: permission denied`);
    } finally {
      chmodSync(f, 0o600);
      chmodSync(dir, 0o700);
    }
  });

  test("unknown QVD_* variable", async () => {
    expectConfigError(
      await qvd(["config", "show", "--no-db", "--config", conf("")], { QVD_LOG_LEVL: "debug" }),
      'environment QVD_LOG_LEVL: unknown key "log.levl" (did you mean "log.level"?)',
    );
  });

  test("bad environment value names the variable", async () => {
    expectConfigError(
      await qvd(["config", "show", "--no-db", "--config", conf("")], { QVD_WAT_MULTITENANT: "perhaps" }),
      /^qvd: environment QVD_WAT_MULTITENANT: wat\.multitenant: expected a boolean/,
    );
  });

  test("bad --set value", async () => {
    expectConfigError(
      await qvd(["config", "show", "--no-db", "--config", conf(""), "--set", "hkd.fence_after=1"]),
      '--set hkd.fence_after: hkd.fence_after: must be at least 5, got "1"',
    );
  });

  test("unknown --set key", async () => {
    expectConfigError(
      await qvd(["config", "show", "--no-db", "--config", conf(""), "--set", "nodenam=x"]),
      '--set nodenam: unknown key "nodenam" (did you mean "nodename"?)',
    );
  });

  test("malformed --set", async () => {
    expectConfigError(
      await qvd(["config", "show", "--no-db", "--config", conf(""), "--set", "hkd.fence_after"]),
      "--set hkd.fence_after: expected KEY=VALUE",
    );
    expectConfigError(
      await qvd(["config", "show", "--no-db", "--config", conf(""), "--set"]),
      "--set : expected KEY=VALUE",
    );
  });

  test("bad --db URL", async () => {
    expectConfigError(
      await qvd(["config", "show", "--config", conf(""), "--db", "not-a-url"]),
      "--db: database.url: expected a URL",
    );
  });

  test("--db without a value", async () => {
    expectConfigError(
      await qvd(["config", "show", "--no-db", "--config", conf(""), "--db"]),
      "--db: database.url: expected a URL",
    );
  });

  test("a configuration error beats --json: nothing on stdout", async () => {
    const f = conf("bogus = 1\n");
    expectConfigError(await qvd(["config", "show", "--no-db", "--json", "--config", f]), `${f}:1: unknown key "bogus"`);
  });
});

describe("qvd config show with a database", () => {
  const db = useTestDatabase();
  let tenantId = 0;

  beforeAll(async () => {
    const { sql } = db();
    await setConfig(sql, 0, "hkd.fence_after", "77");
    await setConfig(sql, 0, "osf.default.memory", "2048");
    const [t] = await sql`SELECT id FROM tenants WHERE name = 'default'`;
    tenantId = t!.id as number;
    await setConfig(sql, tenantId, "osf.default.memory", "4096");
  });

  test("shows a global cluster setting from the configs table", async () => {
    const r = await qvd(["config", "show", "--config", conf(""), "--db", db().url]);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    const t = table(r.stdout);
    expect(t.get("hkd.fence_after")).toEqual({ value: "77", source: "database (global)" });
    expect(t.get("osf.default.memory")).toEqual({ value: "2048", source: "database (global)" });
    expect(t.get("database.url")).toEqual({ value: "********", source: "flag --db" });
  });

  test("the database is found through QVD_DATABASE_URL and through database.url in the file", async () => {
    const viaEnv = await qvd(["config", "show", "--config", conf("")], { QVD_DATABASE_URL: db().url });
    expect(table(viaEnv.stdout).get("hkd.fence_after")).toEqual({ value: "77", source: "database (global)" });
    const viaFile = await qvd(["config", "show", "--config", conf(`database.url = ${db().url}\n`)]);
    expect(table(viaFile.stdout).get("hkd.fence_after")).toEqual({ value: "77", source: "database (global)" });
  });

  test("database values are above the file", async () => {
    const f = conf("hkd.fence_after = 10\n");
    const r = await qvd(["config", "show", "--config", f, "--db", db().url]);
    expect(table(r.stdout).get("hkd.fence_after")).toEqual({ value: "77", source: "database (global)" });
    const noDb = await qvd(["config", "show", "--no-db", "--config", f, "--db", db().url]);
    expect(table(noDb.stdout).get("hkd.fence_after")).toEqual({ value: "10", source: `${f}:1` });
  });

  test("environment and flags are above the database", async () => {
    const viaEnv = await qvd(["config", "show", "--config", conf(""), "--db", db().url], { QVD_HKD_FENCE_AFTER: "99" });
    expect(table(viaEnv.stdout).get("hkd.fence_after")).toEqual({
      value: "99",
      source: "environment QVD_HKD_FENCE_AFTER",
    });
    const viaFlag = await qvd(
      ["config", "show", "--config", conf(""), "--db", db().url, "--set", "hkd.fence_after=88"],
      { QVD_HKD_FENCE_AFTER: "99" },
    );
    expect(table(viaFlag.stdout).get("hkd.fence_after")).toEqual({ value: "88", source: "flag --set hkd.fence_after" });
  });

  test("--tenant applies that tenant's rows over the global ones", async () => {
    const r = await qvd([
      "config",
      "show",
      "--json",
      "--config",
      conf(""),
      "--db",
      db().url,
      "--tenant",
      String(tenantId),
    ]);
    expect(r.code).toBe(0);
    const j = jsonOf(r);
    expect(setting(j, "osf.default.memory")).toMatchObject({ value: "4096", source: `database (tenant ${tenantId})` });
    expect(setting(j, "hkd.fence_after")).toMatchObject({ value: "77", source: "database (global)" });
    const without = jsonOf(await qvd(["config", "show", "--json", "--config", conf(""), "--db", db().url]));
    expect(setting(without, "osf.default.memory")).toMatchObject({ value: "2048", source: "database (global)" });
  });

  describe("rows written behind the data layer's back", () => {
    // setConfig refuses these; a newer qvd or hand-written SQL may still leave them.
    const raw = async (key: string, value: string) => {
      await db().sql`INSERT INTO configs (tenant_id, key, value) VALUES (0, ${key}, ${value})
        ON CONFLICT (tenant_id, key) DO UPDATE SET value = EXCLUDED.value`;
    };
    const drop = async (key: string) => {
      await db().sql`DELETE FROM configs WHERE tenant_id = 0 AND key = ${key}`;
    };

    test("a node-scope key is ignored with a note", async () => {
      await raw("nodename", "from-db");
      try {
        const f = conf("nodename = mine\n");
        const r = await qvd(["config", "show", "--config", f, "--db", db().url]);
        expect(r.code).toBe(0);
        expect(table(r.stdout).get("nodename")).toEqual({ value: "mine", source: `${f}:1` });
        expect(table(r.stdout).get("hkd.fence_after")?.value).toBe("77");
        expect(r.stderr).toBe("note: ignoring database config nodename: it is a node setting\n");
        const j = jsonOf(await qvd(["config", "show", "--json", "--config", f, "--db", db().url]));
        expect(j.notes).toEqual(["ignoring database config nodename: it is a node setting"]);
      } finally {
        await drop("nodename");
      }
    });

    test("a bad value of a cluster key is a configuration error", async () => {
      await raw("cluster.lost_after", "forever");
      try {
        expectConfigError(
          await qvd(["config", "show", "--config", conf(""), "--db", db().url]),
          'database configs (global): cluster.lost_after: expected an integer, got "forever"',
        );
      } finally {
        await drop("cluster.lost_after");
      }
    });
  });
});
