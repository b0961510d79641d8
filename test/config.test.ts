// Unit tests of the one configuration schema (src/config.ts) and of the common CLI flags
// that feed it (src/cli.ts): sources and their precedence, error messages, secret masking.
import { afterEach, beforeEach, describe, expect, test } from "bun:test";
import { chmodSync, existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import { configFromArgs } from "../src/cli.ts";
import {
  Config,
  DEFAULT_CONFIG_FILE,
  describeSource,
  envName,
  isConfigKey,
  KEYS,
  loadConfig,
  parseValue,
  readConfigFile,
  type ConfigKey,
  type LoadOptions,
} from "../src/config.ts";
import { ConfigError, UserError } from "../src/errors.ts";
import { setLogLevel } from "../src/log.ts";
import { useConfFiles } from "./support/conf.ts";

const { dir, conf } = useConfFiles("qvd-config-test-");

/** loadConfig with a controlled environment and no default file. */
function load(opts: LoadOptions = {}): Config {
  return loadConfig({ env: {}, defaultFileExists: () => false, ...opts });
}

/** The ConfigError a function throws (fails the test when it throws nothing or another error). */
function configError(fn: () => unknown): ConfigError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    return err as ConfigError;
  }
  throw new Error("expected a ConfigError, nothing was thrown");
}

const flag = (key: string, value: string, f = `--set ${key}`) => ({ flag: f, key, value });
const ALL_KEYS = Object.keys(KEYS) as ConfigKey[];

describe("the schema", () => {
  test("declares a useful number of keys, each with a one-line doc", () => {
    expect(ALL_KEYS.length).toBeGreaterThan(10);
    for (const k of ALL_KEYS) {
      const d = KEYS[k];
      expect(typeof d.doc).toBe("string");
      expect(d.doc.trim().length, k).toBeGreaterThan(0);
      expect(d.doc.includes("\n"), k).toBe(false);
      expect(["node", "cluster"]).toContain(d.scope);
    }
  });

  test("every defined default passes its own type", () => {
    for (const k of ALL_KEYS) {
      const d = KEYS[k] as { type: { safeParse(v: unknown): { success: boolean } }; default: unknown };
      if (d.default === undefined) continue;
      expect(d.type.safeParse(d.default).success, `default of ${k}`).toBe(true);
    }
  });

  test("the string form of every default parses back to the default", () => {
    const cfg = new Config();
    for (const k of ALL_KEYS) {
      if (KEYS[k].default === undefined) continue;
      expect(parseValue(k, cfg.rawOf(k), "test"), k).toEqual(KEYS[k].default as never);
    }
  });

  test("database.url has no default (the classic database.* keys apply)", () => {
    expect(KEYS["database.url"].default).toBeUndefined();
    expect(new Config().get("database.url")).toBeUndefined();
  });

  test("exactly the passwords, database URL and TLS private keys are secret", () => {
    const secret = ALL_KEYS.filter((k) => KEYS[k].secret).sort();
    const expected = ALL_KEYS.filter(
      (k) =>
        k === "database.password" || k === "auth.ldap.bind_password" || k === "database.url" || k.endsWith(".tls.key"),
    ).sort();
    expect(secret).toEqual(expected);
    expect(secret).toContain("api.tls.key");
    expect(secret).toContain("l7r.tls.key");
  });

  test("cluster keys include the fencing and session settings; machine keys are node scope", () => {
    expect(KEYS["hkd.fence_after"].scope).toBe("cluster");
    expect(KEYS["api.session.ttl"].scope).toBe("cluster");
    expect(KEYS.nodename.scope).toBe("node");
    expect(KEYS["database.url"].scope).toBe("node");
    expect(KEYS["vm.network.bridge"].scope).toBe("node");
  });

  test("every key has a distinct QVD_* environment variable", () => {
    const names = ALL_KEYS.map(envName);
    expect(new Set(names).size).toBe(names.length);
    for (const n of names) expect(n).toMatch(/^QVD_[A-Z0-9_]+$/);
    expect(envName("database.url")).toBe("QVD_DATABASE_URL");
    expect(envName("model.user.login.case-sensitive")).toBe("QVD_MODEL_USER_LOGIN_CASE_SENSITIVE");
  });

  test("isConfigKey knows the keys and nothing else", () => {
    expect(isConfigKey("hkd.fence_after")).toBe(true);
    expect(isConfigKey("hkd.fence")).toBe(false);
    expect(isConfigKey("toString")).toBe(false);
    expect(isConfigKey("__proto__")).toBe(false);
  });
});

describe("value types", () => {
  const ok = (k: ConfigKey, raw: string) => parseValue(k, raw, "here");
  const bad = (k: ConfigKey, raw: string) => configError(() => parseValue(k, raw, "here")).message;

  test("integers: decimal, trimmed, within range", () => {
    expect(ok("hkd.fence_after", "77")).toBe(77);
    expect(ok("hkd.fence_after", " 12 ")).toBe(12);
    expect(ok("database.port", "65535")).toBe(65535);
    expect(bad("hkd.fence_after", "soon")).toBe('here: hkd.fence_after: expected an integer, got "soon"');
    expect(bad("hkd.fence_after", "1.5")).toContain("expected an integer");
    expect(bad("hkd.fence_after", "")).toContain("expected an integer");
    expect(bad("hkd.fence_after", "0x10")).toContain("expected an integer");
    expect(bad("hkd.fence_after", "1e2")).toContain("expected an integer");
  });

  test("integer range errors say which bound, not 'expected an integer'", () => {
    expect(bad("hkd.fence_after", "4")).toBe('here: hkd.fence_after: must be at least 5, got "4"');
    expect(bad("database.port", "0")).toContain("must be at least 1");
    expect(bad("database.port", "65536")).toBe('here: database.port: must be at most 65535, got "65536"');
  });

  test("booleans in the spellings administrators use", () => {
    for (const t of ["1", "true", "yes", "on", "TRUE", " Yes "]) expect(ok("wat.multitenant", t), t).toBe(true);
    for (const f of ["0", "false", "no", "off", "Off"]) expect(ok("wat.multitenant", f), f).toBe(false);
    expect(bad("wat.multitenant", "maybe")).toBe(
      'here: wat.multitenant: expected a boolean (1/0, true/false, yes/no, on/off), got "maybe"',
    );
  });

  test("enumerations list the allowed values", () => {
    expect(ok("log.level", "debug")).toBe("debug");
    expect(bad("log.level", "loud")).toBe('here: log.level: expected one of: debug, info, warn, error, got "loud"');
    expect(bad("vm.kvm.accel", "xen")).toContain("expected one of: kvm, tcg, auto");
    // vm.hypervisor is a list of one or both backends.
    expect(bad("vm.hypervisor", "xen")).toContain("expected lxc, kvm or lxc,kvm");
    expect(bad("vm.hypervisor", "lxc;kvm")).toContain("expected lxc, kvm or lxc,kvm");
    expect(ok("vm.hypervisor", "lxc, kvm")).toBe("lxc, kvm");
  });

  test("addresses, networks, MAC prefixes and non-empty strings", () => {
    expect(ok("api.listen", "0.0.0.0:9000")).toBe("0.0.0.0:9000");
    expect(ok("l7r.listen", ":443")).toBe(":443");
    expect(ok("api.listen", "[::1]:8080")).toBe("[::1]:8080");
    expect(bad("api.listen", "8080")).toContain("expected ADDRESS:PORT");
    expect(ok("vm.network.range", "10.1.0.0/16")).toBe("10.1.0.0/16");
    expect(bad("vm.network.range", "10.1.0.0")).toContain("expected an IPv4 network");
    expect(ok("vm.network.mac.prefix", "54:52:0A")).toBe("54:52:0A");
    expect(bad("vm.network.mac.prefix", "54:52")).toContain("vm.network.mac.prefix");
    expect(bad("nodename", "")).toBe('here: nodename: must not be empty, got ""');
  });

  test("database URLs, including libpq's unix-socket form", () => {
    expect(ok("database.url", "postgres://qvd:pw@db:5432/qvd")).toBe("postgres://qvd:pw@db:5432/qvd");
    expect(ok("database.url", "postgres://postgres@/qvd?host=%2Frun%2Fpostgresql")).toBe(
      "postgres://postgres@/qvd?host=%2Frun%2Fpostgresql",
    );
    expect(ok("database.url", "postgresql:///qvd?host=/run/postgresql")).toBe("postgresql:///qvd?host=/run/postgresql");
    expect(bad("database.url", "not a url")).toBe("here: database.url: expected a URL");
  });

  test("a bad secret value is not echoed in the error", () => {
    const msg = bad("database.url", "hunter2 is my password");
    expect(msg).toContain("database.url");
    expect(msg).not.toContain("hunter2");
  });
});

describe("node.conf files", () => {
  test("key = value lines, # comments, blank lines, CRLF and surrounding spaces", () => {
    const f = conf(
      [
        "# QVD node configuration",
        "",
        "nodename = node7",
        "   # indented comment",
        "  hkd.fence_after=60  ",
        "log.level\t=\twarn\r",
        "wat.multitenant = on",
      ].join("\n"),
    );
    const rows = readConfigFile(f);
    expect(rows.map((r) => [r.key, r.value, r.source])).toEqual([
      ["nodename", "node7", { kind: "file", file: f, line: 3 }],
      ["hkd.fence_after", "60", { kind: "file", file: f, line: 5 }],
      ["log.level", "warn", { kind: "file", file: f, line: 6 }],
      ["wat.multitenant", "on", { kind: "file", file: f, line: 7 }],
    ]);
    const cfg = load({ file: f });
    expect(cfg.get("nodename")).toBe("node7");
    expect(cfg.get("hkd.fence_after")).toBe(60);
    expect(cfg.get("log.level")).toBe("warn");
    expect(cfg.get("wat.multitenant")).toBe(true);
    expect(cfg.source("hkd.fence_after")).toEqual({ kind: "file", file: f, line: 5 });
  });

  test("a value may itself contain '='; an empty value is allowed for string keys", () => {
    const f = conf(
      "database.url = postgres://qvd@/qvd?host=/run/postgresql&application_name=x\npath.storage.images =\n",
    );
    const cfg = load({ file: f });
    expect(cfg.get("database.url")).toBe("postgres://qvd@/qvd?host=/run/postgresql&application_name=x");
    expect(cfg.get("path.storage.images")).toBe("");
    expect(cfg.source("path.storage.images")).toEqual({ kind: "file", file: f, line: 2 });
  });

  test("a later line for the same key wins", () => {
    const f = conf("hkd.fence_after = 10\nhkd.fence_after = 20\n");
    const cfg = load({ file: f });
    expect(cfg.get("hkd.fence_after")).toBe(20);
    expect(cfg.source("hkd.fence_after")).toEqual({ kind: "file", file: f, line: 2 });
  });

  test("an empty file leaves every default", () => {
    const cfg = load({ file: conf("") });
    for (const k of ALL_KEYS) expect(cfg.source(k), k).toEqual({ kind: "default" });
  });

  test("unknown key: file, line, key and a did-you-mean hint", () => {
    const f = conf("# comment\nnodename = a\nhkd.fence_aftr = 30\n");
    expect(configError(() => load({ file: f })).message).toBe(
      `${f}:3: unknown key "hkd.fence_aftr" (did you mean "hkd.fence_after"?)`,
    );
  });

  test("unknown key far from every key: no hint", () => {
    const f = conf("completely.unrelated.setting = 1\n");
    expect(configError(() => load({ file: f })).message).toBe(`${f}:1: unknown key "completely.unrelated.setting"`);
  });

  test("bad value: file, line, key, the problem and the value", () => {
    const f = conf("nodename = a\n\nhkd.fence_after = soon\n");
    const err = configError(() => load({ file: f }));
    expect(err.message).toBe(`${f}:3: hkd.fence_after: expected an integer, got "soon"`);
    expect(err.exitCode).toBe(78);
  });

  test("bad secret value in a file: file, line and key, but not the value", () => {
    const f = conf("database.url = hunter2\n");
    const msg = configError(() => load({ file: f })).message;
    expect(msg).toBe(`${f}:1: database.url: expected a URL`);
  });

  test("a line without '=' names the file and line", () => {
    const f = conf("nodename = a\njust some words\n");
    expect(configError(() => load({ file: f })).message).toBe(`${f}:2: expected "key = value", got "just some words"`);
  });

  test("a line with an empty key is malformed", () => {
    const f = conf("= value\n");
    expect(configError(() => load({ file: f })).message).toBe(`${f}:1: expected "key = value", got "= value"`);
  });

  test("missing file", () => {
    const f = join(dir, "does-not-exist.conf");
    expect(configError(() => load({ file: f })).message).toBe(`${f}: cannot read configuration: no such file`);
  });

  test("a directory instead of a file", () => {
    const d = join(dir, "a-directory");
    mkdirSync(d, { recursive: true });
    expect(configError(() => load({ file: d })).message).toBe(`${d}: cannot read configuration: is a directory`);
  });

  // root reads files whatever their mode, so this case needs an unprivileged test run.
  test.skipIf(process.getuid?.() === 0)("a file without read permission", () => {
    const f = conf("nodename = a\n");
    chmodSync(f, 0o000);
    try {
      expect(configError(() => load({ file: f })).message).toBe(`${f}: cannot read configuration: permission denied`);
    } finally {
      chmodSync(f, 0o600);
    }
  });

  test("every file error is one line", () => {
    const cases = [conf("nope = 1\n"), conf("hkd.fence_after = x\n"), conf("garbage\n"), join(dir, "missing.conf")];
    for (const f of cases) expect(configError(() => load({ file: f })).message).not.toContain("\n");
  });
});

describe("which file is read", () => {
  test("--config FILE (opts.file)", () => {
    expect(load({ file: conf("nodename = from-file\n") }).get("nodename")).toBe("from-file");
  });

  test("QVD_CONFIG names the file when --config is absent", () => {
    const f = conf("nodename = from-qvd-config\n");
    const cfg = load({ env: { QVD_CONFIG: f } });
    expect(cfg.get("nodename")).toBe("from-qvd-config");
    expect(cfg.source("nodename")).toEqual({ kind: "file", file: f, line: 1 });
  });

  test("--config wins over QVD_CONFIG", () => {
    const a = conf("nodename = a\n");
    const b = conf("nodename = b\n");
    expect(load({ file: b, env: { QVD_CONFIG: a } }).get("nodename")).toBe("b");
  });

  test("a QVD_CONFIG that does not exist is an error (it was asked for)", () => {
    const f = join(dir, "nope.conf");
    expect(configError(() => load({ env: { QVD_CONFIG: f } })).message).toBe(
      `${f}: cannot read configuration: no such file`,
    );
  });

  test("without --config or QVD_CONFIG, /etc/qvd/node.conf is read only if it exists", () => {
    const asked: string[] = [];
    const cfg = loadConfig({ env: {}, defaultFileExists: (f) => (asked.push(f), false) });
    expect(asked).toEqual([DEFAULT_CONFIG_FILE]);
    expect(DEFAULT_CONFIG_FILE).toBe("/etc/qvd/node.conf");
    expect(cfg.source("nodename")).toEqual({ kind: "default" });
  });

  test.skipIf(existsSync(DEFAULT_CONFIG_FILE))("when /etc/qvd/node.conf is said to exist it is read", () => {
    const msg = configError(() => loadConfig({ env: {}, defaultFileExists: () => true })).message;
    expect(msg).toBe(`${DEFAULT_CONFIG_FILE}: cannot read configuration: no such file`);
  });
});

describe("environment variables", () => {
  test("QVD_* variables set keys, dashes and dots as underscores", () => {
    const cfg = load({
      env: { QVD_HKD_FENCE_AFTER: "45", QVD_MODEL_USER_LOGIN_CASE_SENSITIVE: "yes", PATH: "/bin", HOME: "/root" },
    });
    expect(cfg.get("hkd.fence_after")).toBe(45);
    expect(cfg.source("hkd.fence_after")).toEqual({ kind: "env", name: "QVD_HKD_FENCE_AFTER" });
    expect(cfg.get("model.user.login.case-sensitive")).toBe(true);
    expect(describeSource(cfg.source("hkd.fence_after"))).toBe("environment QVD_HKD_FENCE_AFTER");
  });

  test("QVD_CONFIG and QVD_DEBUG are not keys; unset variables are skipped", () => {
    const cfg = load({ env: { QVD_DEBUG: "1", QVD_CONFIG: "", QVD_NODENAME: undefined } });
    expect(cfg.source("nodename")).toEqual({ kind: "default" });
  });

  test("an unknown QVD_* variable is an error naming it, with a hint", () => {
    expect(configError(() => load({ env: { QVD_HKD_FENCE_AFTR: "1" } })).message).toBe(
      'environment QVD_HKD_FENCE_AFTR: unknown key "hkd.fence.aftr" (did you mean "hkd.fence_after"?)',
    );
    expect(configError(() => load({ env: { QVD_WHATEVER_THING_HERE: "1" } })).message).toMatch(
      /^environment QVD_WHATEVER_THING_HERE: unknown key/,
    );
  });

  test("a bad value names the variable and the key", () => {
    expect(configError(() => load({ env: { QVD_HKD_FENCE_AFTER: "later" } })).message).toBe(
      'environment QVD_HKD_FENCE_AFTER: hkd.fence_after: expected an integer, got "later"',
    );
  });

  test("other variables are ignored", () => {
    expect(() => load({ env: { QVDX: "1", MY_QVD_THING: "2", qvd_nodename: "x" } })).not.toThrow();
  });
});

describe("precedence: default < file < database < environment < flags", () => {
  const file = () => conf("hkd.fence_after = 10\nnodename = file-node\n");
  const dbRows = [{ tenantId: 0, key: "hkd.fence_after", value: "20" }];
  const env = { QVD_HKD_FENCE_AFTER: "30" };
  const flags = [flag("hkd.fence_after", "40")];

  test("each layer over the one below, per key", () => {
    const f = file();
    expect(load().source("hkd.fence_after")).toEqual({ kind: "default" });
    expect(load().get("hkd.fence_after")).toBe(120);

    const fromFile = load({ file: f });
    expect(fromFile.get("hkd.fence_after")).toBe(10);
    expect(fromFile.source("hkd.fence_after")).toEqual({ kind: "file", file: f, line: 1 });

    const fromDb = load({ file: f }).withDatabase(dbRows);
    expect(fromDb.get("hkd.fence_after")).toBe(20);
    expect(fromDb.source("hkd.fence_after")).toEqual({ kind: "db", tenantId: 0 });

    const fromEnv = load({ file: f, env }).withDatabase(dbRows);
    expect(fromEnv.get("hkd.fence_after")).toBe(30);
    expect(fromEnv.source("hkd.fence_after")).toEqual({ kind: "env", name: "QVD_HKD_FENCE_AFTER" });

    const fromFlag = load({ file: f, env, flags }).withDatabase(dbRows);
    expect(fromFlag.get("hkd.fence_after")).toBe(40);
    expect(fromFlag.source("hkd.fence_after")).toEqual({ kind: "flag", flag: "--set hkd.fence_after" });
  });

  test("sources are tracked per key, not per layer", () => {
    const f = file();
    const cfg = load({
      file: f,
      env: { QVD_LOG_LEVEL: "error" },
      flags: [flag("api.session.ttl", "600")],
    }).withDatabase([...dbRows, { tenantId: 0, key: "cluster.lost_after", value: "99" }]);
    expect(cfg.source("nodename")).toEqual({ kind: "file", file: f, line: 2 });
    expect(cfg.source("hkd.fence_after")).toEqual({ kind: "db", tenantId: 0 });
    expect(cfg.source("cluster.lost_after")).toEqual({ kind: "db", tenantId: 0 });
    expect(cfg.source("log.level")).toEqual({ kind: "env", name: "QVD_LOG_LEVEL" });
    expect(cfg.source("api.session.ttl")).toEqual({ kind: "flag", flag: "--set api.session.ttl" });
    expect(cfg.source("hkd.poll_interval")).toEqual({ kind: "default" });
    expect(cfg.get("cluster.lost_after")).toBe(99);
    expect(cfg.get("api.session.ttl")).toBe(600);
  });

  test("a later flag for the same key wins", () => {
    const cfg = load({ flags: [flag("hkd.fence_after", "50"), flag("hkd.fence_after", "60", "--fence")] });
    expect(cfg.get("hkd.fence_after")).toBe(60);
    expect(cfg.source("hkd.fence_after")).toEqual({ kind: "flag", flag: "--fence" });
  });

  test("withDatabase returns a new Config and leaves the original alone", () => {
    const base = load({ file: file() });
    const layered = base.withDatabase(dbRows);
    expect(base.get("hkd.fence_after")).toBe(10);
    expect(layered.get("hkd.fence_after")).toBe(20);
    // Layering again starts from the node sources, not from the previous database values.
    expect(layered.withDatabase([]).get("hkd.fence_after")).toBe(10);
  });

  test("a tenant's own rows win over the global rows, whatever the row order", () => {
    const rows = [
      { tenantId: 7, key: "auth.ldap.timeout", value: "70" },
      { tenantId: 0, key: "auth.ldap.timeout", value: "20" },
      { tenantId: 0, key: "osf.default.memory", value: "2048" },
    ];
    const cfg = load().withDatabase(rows);
    expect(cfg.get("auth.ldap.timeout")).toBe(70);
    expect(cfg.source("auth.ldap.timeout")).toEqual({ kind: "db", tenantId: 7 });
    expect(cfg.get("osf.default.memory")).toBe(2048);
    expect(cfg.source("osf.default.memory")).toEqual({ kind: "db", tenantId: 0 });
    expect(describeSource(cfg.source("auth.ldap.timeout"))).toBe("database (tenant 7)");
    expect(describeSource(cfg.source("osf.default.memory"))).toBe("database (global)");
  });

  test("the environment still wins over a tenant row", () => {
    const cfg = load({ env: { QVD_HKD_FENCE_AFTER: "30" } }).withDatabase([
      { tenantId: 7, key: "hkd.fence_after", value: "70" },
    ]);
    expect(cfg.get("hkd.fence_after")).toBe(30);
  });
});

describe("database rows", () => {
  test("a node-scope key is ignored with a warning", () => {
    const warnings: string[] = [];
    const f = conf("nodename = mine\n");
    const cfg = load({ file: f }).withDatabase(
      [
        { tenantId: 0, key: "nodename", value: "theirs" },
        { tenantId: 0, key: "database.url", value: "postgres://evil/db" },
      ],
      (m) => warnings.push(m),
    );
    expect(cfg.get("nodename")).toBe("mine");
    expect(cfg.source("nodename")).toEqual({ kind: "file", file: f, line: 1 });
    expect(cfg.get("database.url")).toBeUndefined();
    expect(warnings).toEqual([
      "ignoring database config nodename: it is a node setting",
      "ignoring database config database.url: it is a node setting",
    ]);
  });

  test("an unknown key is ignored with a warning (a newer node may know it)", () => {
    const warnings: string[] = [];
    const cfg = load().withDatabase(
      [
        { tenantId: 0, key: "future.key", value: "x" },
        { tenantId: 0, key: "hkd.poll_interval", value: "7" },
      ],
      (m) => warnings.push(m),
    );
    expect(warnings).toEqual(["ignoring database config future.key: unknown key"]);
    expect(cfg.get("hkd.poll_interval")).toBe(7);
  });

  test("a bad value of a cluster key is an error naming the scope and the key", () => {
    expect(
      configError(() => load().withDatabase([{ tenantId: 0, key: "hkd.fence_after", value: "never" }])).message,
    ).toBe('database configs (global): hkd.fence_after: expected an integer, got "never"');
    expect(
      configError(() => load().withDatabase([{ tenantId: 3, key: "auth.autoprovision.enable", value: "perhaps" }]))
        .message,
    ).toMatch(/^database configs \(tenant 3\): auth\.autoprovision\.enable: expected a boolean/);
  });

  test("a bad DB value is an error even when env or a flag overrides the key", () => {
    // Validation happens before precedence: a broken cluster row must not go unnoticed.
    expect(() =>
      load({ env: { QVD_HKD_FENCE_AFTER: "30" } }).withDatabase([{ tenantId: 0, key: "hkd.fence_after", value: "1" }]),
    ).toThrow(ConfigError);
  });

  test("a node key passed directly as a database layer is refused", () => {
    const msg = configError(
      () => new Config([], [], [{ key: "nodename", value: "x", source: { kind: "db", tenantId: 0 } }]),
    ).message;
    expect(msg).toBe("database configs (global): nodename is a node setting and cannot be set in the database");
  });
});

describe("hkd.fence_after must stay below cluster.lost_after", () => {
  test("refused from a file, the environment, a flag and the database, naming both keys and their sources", () => {
    const f = conf("cluster.lost_after = 100\nhkd.fence_after = 100\n");
    expect(configError(() => load({ file: f })).message).toBe(
      `hkd.fence_after (100, ${f}:2) must be less than cluster.lost_after (100, ${f}:1): a node cut off from the database must stop its desktops before other nodes may declare it lost and start them elsewhere`,
    );
    expect(configError(() => load({ env: { QVD_CLUSTER_LOST_AFTER: "60" } })).message).toStartWith(
      "hkd.fence_after (120, default) must be less than cluster.lost_after (60, environment QVD_CLUSTER_LOST_AFTER)",
    );
    expect(configError(() => load({ flags: [flag("hkd.fence_after", "301")] })).message).toStartWith(
      "hkd.fence_after (301, flag --set hkd.fence_after) must be less than cluster.lost_after (300, default)",
    );
    expect(
      configError(() => load().withDatabase([{ tenantId: 0, key: "cluster.lost_after", value: "90" }])).message,
    ).toStartWith("hkd.fence_after (120, default) must be less than cluster.lost_after (90, database (global))");
    // A higher layer can mend what a lower one breaks: only the effective pair counts.
    expect(
      load({ env: { QVD_HKD_FENCE_AFTER: "30" } })
        .withDatabase([{ tenantId: 0, key: "cluster.lost_after", value: "90" }])
        .get("cluster.lost_after"),
    ).toBe(90);
    expect(
      load({ flags: [flag("hkd.fence_after", "5"), flag("cluster.lost_after", "10")] }).get("hkd.fence_after"),
    ).toBe(5);
  });
});

describe("describe() and secrets", () => {
  const secrets = {
    "database.password": "hunter2",
    "database.url": "postgres://qvd:hunter2@db/qvd",
    "api.tls.key": "/etc/qvd/hunter2-api.key",
    "l7r.tls.key": "/etc/qvd/hunter2-l7r.key",
  };
  const cfgWithSecrets = () =>
    load({
      file: conf(
        Object.entries(secrets)
          .map(([k, v]) => `${k} = ${v}`)
          .join("\n") + "\napi.tls.cert = /etc/qvd/api.crt\nnodename = n1\n",
      ),
    });

  test("lists every key once, in schema order, with doc and scope", () => {
    const d = new Config().describe();
    expect(d.map((e) => e.key)).toEqual(ALL_KEYS);
    for (const e of d) {
      expect(e.doc).toBe(KEYS[e.key].doc);
      expect(e.scope).toBe(KEYS[e.key].scope);
    }
  });

  test("secret values are masked, other values are not", () => {
    const d = cfgWithSecrets().describe();
    const byKey = Object.fromEntries(d.map((e) => [e.key, e]));
    for (const k of Object.keys(secrets)) expect(byKey[k]!.value, k).toBe("********");
    expect(byKey["api.tls.cert"]!.value).toBe("/etc/qvd/api.crt");
    expect(byKey.nodename!.value).toBe("n1");
    expect(JSON.stringify(d)).not.toContain("hunter2");
  });

  test("the real secret values are still available to the program", () => {
    const cfg = cfgWithSecrets();
    expect(cfg.get("database.password")).toBe("hunter2");
    expect(cfg.databaseUrl()).toBe("postgres://qvd:hunter2@db/qvd");
  });

  test("unset and empty secrets are shown as such, not masked", () => {
    const byKey = Object.fromEntries(new Config().describe().map((e) => [e.key, e]));
    expect(byKey["database.url"]!.value).toBe("(unset)");
    expect(byKey["database.password"]!.value).toBe("");
    expect(byKey["api.tls.key"]!.value).toBe("");
  });

  test("values in their file form and sources in words", () => {
    const f = conf("wat.multitenant = yes\n");
    const cfg = load({
      file: f,
      env: { QVD_LOG_LEVEL: "debug" },
      flags: [flag("hkd.fence_after", "9", "--set hkd.fence_after")],
    }).withDatabase([
      { tenantId: 0, key: "osf.default.memory", value: "512" },
      { tenantId: 4, key: "auth.ldap.timeout", value: "60" },
    ]);
    const byKey = Object.fromEntries(cfg.describe().map((e) => [e.key, e]));
    expect(byKey["wat.multitenant"]).toMatchObject({ value: "1", source: `${f}:1` });
    expect(byKey["model.user.login.case-sensitive"]).toMatchObject({ value: "0", source: "default" });
    expect(byKey["log.level"]).toMatchObject({ value: "debug", source: "environment QVD_LOG_LEVEL" });
    expect(byKey["hkd.fence_after"]).toMatchObject({ value: "9", source: "flag --set hkd.fence_after" });
    expect(byKey["osf.default.memory"]).toMatchObject({ value: "512", source: "database (global)" });
    expect(byKey["auth.ldap.timeout"]).toMatchObject({ value: "60", source: "database (tenant 4)" });
  });
});

describe("databaseUrl()", () => {
  test("database.url wins when set", () => {
    const cfg = load({ flags: [flag("database.url", "postgres://a@b/c"), flag("database.host", "elsewhere")] });
    expect(cfg.databaseUrl()).toBe("postgres://a@b/c");
  });

  test("built from the classic keys' defaults", () => {
    expect(load().databaseUrl()).toBe("postgres://qvd@localhost:5432/qvd");
  });

  test("built from QVD's classic database.* keys in node.conf", () => {
    const f = conf(
      "database.host = db.example.com\ndatabase.port = 5433\ndatabase.name = qvddb\ndatabase.user = qvdadmin\ndatabase.password = s3cret\n",
    );
    expect(load({ file: f }).databaseUrl()).toBe("postgres://qvdadmin:s3cret@db.example.com:5433/qvddb");
  });

  test("user, password and name are percent-encoded", () => {
    const cfg = load({
      flags: [flag("database.user", "a@b"), flag("database.password", "p:w/@#?"), flag("database.name", "my db")],
    });
    const u = cfg.databaseUrl();
    expect(u).toBe("postgres://a%40b:p%3Aw%2F%40%23%3F@localhost:5432/my%20db");
    const parsed = new URL(u);
    expect(decodeURIComponent(parsed.username)).toBe("a@b");
    expect(decodeURIComponent(parsed.password)).toBe("p:w/@#?");
    expect(parsed.hostname).toBe("localhost");
  });

  test("an IPv6 host is bracketed", () => {
    const u = load({ flags: [flag("database.host", "::1")] }).databaseUrl();
    expect(u).toBe("postgres://qvd@[::1]:5432/qvd");
    expect(URL.canParse(u)).toBe(true);
  });

  test("a unix socket directory as host becomes libpq's ?host= form", () => {
    const u = load({
      flags: [flag("database.host", "/var/run/postgresql"), flag("database.port", "5433")],
    }).databaseUrl();
    expect(u).toBe("postgres://qvd@localhost:5433/qvd?host=%2Fvar%2Frun%2Fpostgresql");
    expect(new URL(u).searchParams.get("host")).toBe("/var/run/postgresql");
  });

  test("the URL comes from QVD_DATABASE_URL too, and the --db flag wins over it", () => {
    expect(load({ env: { QVD_DATABASE_URL: "postgres://env@h/db" } }).databaseUrl()).toBe("postgres://env@h/db");
    const cfg = load({
      env: { QVD_DATABASE_URL: "postgres://env@h/db" },
      flags: [flag("database.url", "postgres://flag@h/db", "--db")],
    });
    expect(cfg.databaseUrl()).toBe("postgres://flag@h/db");
    expect(cfg.source("database.url")).toEqual({ kind: "flag", flag: "--db" });
  });
});

test("storagePath defaults below path.storage.root", () => {
  expect(load().storagePath("path.storage.images")).toBe("/var/lib/qvd/storage/images");
  const cfg = load({ flags: [flag("path.storage.root", "/srv/qvd"), flag("path.storage.homes", "/home/qvd")] });
  expect(cfg.storagePath("path.storage.images")).toBe("/srv/qvd/images");
  expect(cfg.storagePath("path.storage.homes")).toBe("/home/qvd");
});

describe("configFromArgs (--config, --db, --set)", () => {
  // configFromArgs reads process.env: run these with no QVD_* variables.
  let saved: Record<string, string | undefined> = {};
  beforeEach(() => {
    saved = {};
    for (const k of Object.keys(process.env))
      if (k.startsWith("QVD_")) {
        saved[k] = process.env[k];
        delete process.env[k];
      }
  });
  afterEach(() => {
    for (const k of Object.keys(process.env)) if (k.startsWith("QVD_")) delete process.env[k];
    Object.assign(process.env, saved);
    setLogLevel((saved.QVD_LOG_LEVEL as "warn" | undefined) ?? "warn");
  });

  const empty = () => conf("");

  test("--set key=value, repeated, in order, also as --set=key=value", () => {
    const cfg = configFromArgs({ config: empty() }, [
      "config",
      "show",
      "--set",
      "hkd.fence_after=50",
      "--set=log.level=error",
      "--set",
      "hkd.fence_after=60",
    ]);
    expect(cfg.get("hkd.fence_after")).toBe(60);
    expect(cfg.source("hkd.fence_after")).toEqual({ kind: "flag", flag: "--set hkd.fence_after" });
    expect(cfg.get("log.level")).toBe("error");
  });

  test("--set keeps '=' and spaces inside the value", () => {
    const cfg = configFromArgs({ config: empty() }, ["--set", "database.url=postgres://u@/d?host=/x&a=b"]);
    expect(cfg.get("database.url")).toBe("postgres://u@/d?host=/x&a=b");
  });

  test("--db sets database.url, over QVD_DATABASE_URL and the file", () => {
    process.env.QVD_DATABASE_URL = "postgres://env@h/db";
    const f = conf("database.url = postgres://file@h/db\n");
    const cfg = configFromArgs({ config: f, db: "postgres://flag@h/db" }, ["--db", "postgres://flag@h/db"]);
    expect(cfg.databaseUrl()).toBe("postgres://flag@h/db");
    expect(cfg.source("database.url")).toEqual({ kind: "flag", flag: "--db" });
    const noFlag = configFromArgs({ config: f }, []);
    expect(noFlag.source("database.url")).toEqual({ kind: "env", name: "QVD_DATABASE_URL" });
  });

  test("--db is read from the raw arguments, even when citty's --no-db turned args.db into false", () => {
    const cfg = configFromArgs({ config: empty(), db: false as unknown as string }, [
      "config",
      "show",
      "--no-db",
      "--db",
      "postgres://a@h/db",
    ]);
    expect(cfg.get("database.url")).toBe("postgres://a@h/db");
    const eq = configFromArgs({ config: empty() }, ["--db=postgres://b@h/db", "--no-db"]);
    expect(eq.get("database.url")).toBe("postgres://b@h/db");
    expect(configFromArgs({ config: empty() }, ["--no-db"]).source("database.url")).toEqual({ kind: "default" });
  });

  test("--db without a value is an error, not ignored", () => {
    expect(configError(() => configFromArgs({ config: empty(), db: "" }, ["--db"])).message).toBe(
      "--db: database.url: expected a URL",
    );
    expect(configError(() => configFromArgs({ config: empty() }, ["--db="])).message).toBe(
      "--db: database.url: expected a URL",
    );
  });

  test("flags win over the environment", () => {
    process.env.QVD_HKD_FENCE_AFTER = "30";
    const cfg = configFromArgs({ config: empty() }, ["--set", "hkd.fence_after=40"]);
    expect(cfg.get("hkd.fence_after")).toBe(40);
  });

  test("a command's own flags map to keys", () => {
    const cfg = configFromArgs(
      { config: empty() },
      [],
      [
        { flag: "--listen", key: "l7r.listen", value: "0.0.0.0:9443" },
        { flag: "--unused", key: "api.listen", value: undefined },
      ],
    );
    expect(cfg.get("l7r.listen")).toBe("0.0.0.0:9443");
    expect(cfg.source("l7r.listen")).toEqual({ kind: "flag", flag: "--listen" });
    expect(cfg.source("api.listen")).toEqual({ kind: "default" });
  });

  test("bad --set value names the flag and the key", () => {
    const err = configError(() => configFromArgs({ config: empty() }, ["--set", "hkd.fence_after=soon"]));
    expect(err.message).toBe('--set hkd.fence_after: hkd.fence_after: expected an integer, got "soon"');
  });

  test("unknown --set key has a hint", () => {
    const err = configError(() => configFromArgs({ config: empty() }, ["--set", "log.levl=debug"]));
    expect(err.message).toBe('--set log.levl: unknown key "log.levl" (did you mean "log.level"?)');
  });

  test("malformed --set", () => {
    expect(configError(() => configFromArgs({ config: empty() }, ["--set", "hkd.fence_after"])).message).toBe(
      "--set hkd.fence_after: expected KEY=VALUE",
    );
    expect(configError(() => configFromArgs({ config: empty() }, ["--set", "=5"])).message).toBe(
      "--set =5: expected KEY=VALUE",
    );
    expect(configError(() => configFromArgs({ config: empty() }, ["--set"])).message).toBe(
      "--set : expected KEY=VALUE",
    );
    expect(configError(() => configFromArgs({ config: empty() }, ["--set="])).message).toBe(
      "--set : expected KEY=VALUE",
    );
  });

  test("bad --db URL is a config error", () => {
    const err = configError(() => configFromArgs({ config: empty(), db: "nonsense" }, ["--db", "nonsense"]));
    expect(err.message).toBe("--db: database.url: expected a URL");
  });

  test("config errors are UserErrors with exit code 78", () => {
    const err = configError(() => configFromArgs({ config: join(dir, "absent.conf") }, []));
    expect(err).toBeInstanceOf(UserError);
    expect(err.exitCode).toBe(78);
  });
});
