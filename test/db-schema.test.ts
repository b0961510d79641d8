// `qvd db init / status / migrate` through the data layer (the CLI is covered by binary.test.ts).
import { expect, test } from "bun:test";
import { verifyAdministrator } from "../src/db/administrators.ts";
import { connect } from "../src/db/pool.ts";
import { initDatabase, migrateDatabase, schemaStatus, SCHEMA_VERSION } from "../src/db/schema.ts";
import { MIGRATIONS } from "../src/db/migrations/index.ts";
import { UserError } from "../src/errors.ts";
import { testDatabase } from "./support/db.ts";

test("init creates the schema, the global scope, a default tenant and a superadmin with a generated password", async () => {
  const db = await testDatabase({ empty: true });
  try {
    expect((await schemaStatus(db.sql)).version).toBeNull();
    const res = await initDatabase(db.sql);
    expect(res.generated).toBe(true);
    expect(res.adminPassword).toHaveLength(20);
    expect(res.version).toBe(SCHEMA_VERSION);
    const tenants = await db.sql`SELECT id, name FROM tenants ORDER BY id`;
    expect(tenants.map((t) => [t.id, t.name])).toEqual([
      [0, "*"],
      [1, "default"],
    ]);
    expect((await verifyAdministrator(db.sql, 0, "superadmin", res.adminPassword))?.roles).toEqual(["Superadmin"]);
    // The generated password differs every time: there is no well-known default.
    const other = await testDatabase({ empty: true });
    try {
      expect((await initDatabase(other.sql)).adminPassword).not.toBe(res.adminPassword);
    } finally {
      await other.sql.end();
    }
    // New tenants get ids after the default one.
    const [t] = await db.sql`INSERT INTO tenants (name) VALUES ('next') RETURNING id`;
    expect(t!.id).toBe(2);
  } finally {
    await db.sql.end();
  }
});

test("init refuses a database that already holds a schema, and changes nothing", async () => {
  const db = await testDatabase({ empty: true });
  try {
    await initDatabase(db.sql, { adminPassword: "first-password" });
    const err = await initDatabase(db.sql, { adminPassword: "second-password" }).catch((e) => e);
    expect(err).toBeInstanceOf(UserError);
    expect(err.message).toContain(`already holds a QVD schema (version ${SCHEMA_VERSION})`);
    expect(await verifyAdministrator(db.sql, 0, "superadmin", "first-password")).toBeDefined();
    const [{ n }] = (await db.sql`SELECT count(*)::int AS n FROM administrators`) as unknown as [{ n: number }];
    expect(n).toBe(1);
  } finally {
    await db.sql.end();
  }
});

test("init refuses a database with other tables, and a short password", async () => {
  const db = await testDatabase({ empty: true });
  try {
    await expect(initDatabase(db.sql, { adminPassword: "short" })).rejects.toThrow("at least 8 characters");
    await db.sql`CREATE TABLE something_else (x int)`;
    await expect(initDatabase(db.sql, { adminPassword: "long-enough" })).rejects.toThrow("not empty (1 tables");
    expect((await schemaStatus(db.sql)).version).toBeNull();
  } finally {
    await db.sql.end();
  }
});

test("migrate applies numbered migrations in order, each atomically, and refuses newer databases", async () => {
  const db = await testDatabase({ empty: true });

  try {
    await initDatabase(db.sql, { adminPassword: "migrate-pw" });
    const v = SCHEMA_VERSION;
    expect(await migrateDatabase(db.sql)).toEqual({ from: v, to: v, applied: [] });

    const m2 = {
      version: v + 1,
      name: "add notes",
      sql: "CREATE TABLE notes (id int PRIMARY KEY, body text NOT NULL)",
    };
    const m3 = { version: v + 2, name: "add notes.author", sql: "ALTER TABLE notes ADD COLUMN author text" };
    const bad4 = {
      version: v + 3,
      name: "broken",
      sql: "ALTER TABLE notes ADD COLUMN x int; ALTER TABLE nope ADD COLUMN y int",
    };
    expect((await schemaStatus(db.sql, [m2, m3])).pending).toEqual([v + 1, v + 2]);
    const res = await migrateDatabase(db.sql, [m3, m2]);
    expect(res.applied.map((m) => m.version)).toEqual([v + 1, v + 2]);
    expect([res.from, res.to]).toEqual([v, v + 2]);
    await db.sql`INSERT INTO notes (id, body, author) VALUES (1, 'hi', 'me')`;

    // A failing migration leaves the database at the last good version.
    await expect(migrateDatabase(db.sql, [m2, m3, bad4])).rejects.toThrow(/nope/);
    const st = await schemaStatus(db.sql, [m2, m3, bad4]);
    expect([st.version, st.pending]).toEqual([v + 2, [v + 3]]);
    const cols = await db.sql`SELECT column_name FROM information_schema.columns WHERE table_name = 'notes' ORDER BY 1`;
    expect(cols.map((c) => c.column_name)).toEqual(["author", "body", "id"]);

    // A binary that knows no migration: the database is newer.
    await expect(migrateDatabase(db.sql, [])).rejects.toThrow("newer than this qvd");
  } finally {
    await db.sql.end();
  }
  // Migrating an empty database is refused.
  const empty = await testDatabase({ empty: true });
  try {
    await expect(migrateDatabase(empty.sql)).rejects.toThrow("run `qvd db init` first");
  } finally {
    await empty.sql.end();
  }
});

test("the real migrations take a version-1 database to the current schema", async () => {
  const db = await testDatabase({ empty: true });
  try {
    await initDatabase(db.sql, { adminPassword: "migrate-pw" });
    // Version 1 as it was released: no user_tokens.auth_params, no session-end announcement.
    await db.sql`ALTER TABLE user_tokens DROP COLUMN auth_params`;
    await db.sql`DROP TRIGGER admin_sessions_end ON admin_sessions`;
    await db.sql`DROP FUNCTION notify_session_end()`;
    await db.sql`DROP TRIGGER vms_ip_guard ON vms`;
    await db.sql`DROP FUNCTION vm_ip_guard()`;
    await db.sql`DROP INDEX vm_runtimes_address`;
    await db.sql`DROP TABLE login_throttle`;
    await db.sql`DROP VIEW host_view`; // as version 5 had it, without the farm's columns
    await db.sql`CREATE VIEW host_view AS
      SELECT h.id, h.name, h.address, h.description, h.frontend, h.backend, h.created_at, h.updated_at,
             r.state, r.state_ts, r.blocked, r.cmd, r.ok_ts, r.usable_ram_mb, r.usable_cpu, r.version,
             (SELECT count(*) FROM vm_runtimes vr WHERE vr.host_id = h.id AND vr.vm_state <> 'stopped')::integer AS vms_running
        FROM hosts h JOIN host_runtimes r ON r.host_id = h.id`;
    await db.sql`ALTER TABLE host_runtimes DROP COLUMN drain, DROP COLUMN lost_ts, DROP COLUMN lost_reason, DROP COLUMN hypervisors, DROP COLUMN hypervisor_notes`;
    await db.sql`DROP VIEW osf_view`; // as version 6 had it, without the KVM columns
    await db.sql`CREATE VIEW osf_view AS
      SELECT o.id, o.tenant_id, t.name AS tenant_name, o.name, o.description, o.memory_mb, o.cpu_shares, o.use_overlay,
             o.persistent, o.user_storage_mb, o.created_at, o.updated_at,
             (SELECT count(*) FROM vms v WHERE v.osf_id = o.id)::integer AS vms,
             (SELECT count(*) FROM dis d WHERE d.osf_id = o.id)::integer AS dis
        FROM osfs o JOIN tenants t ON t.id = o.tenant_id`;
    await db.sql`DROP TRIGGER osfs_hypervisor_guard ON osfs`;
    await db.sql`DROP FUNCTION osf_hypervisor_guard()`;
    await db.sql`ALTER TABLE osfs DROP COLUMN hypervisor, DROP COLUMN vcpus`;
    await db.sql`ALTER TABLE vm_runtimes DROP COLUMN vm_cmd_ts, DROP COLUMN home_key`;
    await db.sql`DROP INDEX vm_runtimes_state_ts`;
    await db.sql`DELETE FROM schema_migrations`;
    await db.sql`INSERT INTO schema_migrations (version, name) VALUES (1, 'initial schema')`;
    expect((await schemaStatus(db.sql)).pending).toEqual(MIGRATIONS.map((m) => m.version));
    const res = await migrateDatabase(db.sql);
    expect([res.from, res.to]).toEqual([1, SCHEMA_VERSION]);
    const cols =
      await db.sql`SELECT data_type FROM information_schema.columns WHERE table_name = 'user_tokens' AND column_name = 'auth_params'`;
    expect(cols.map((c) => c.data_type)).toEqual(["jsonb"]);
    const triggers =
      await db.sql`SELECT tgname FROM pg_trigger WHERE tgname IN ('admin_sessions_end', 'vms_ip_guard') ORDER BY 1`;
    expect(triggers.map((t) => t.tgname)).toEqual(["admin_sessions_end", "vms_ip_guard"]);
    const indexes = await db.sql`SELECT indexdef FROM pg_indexes WHERE indexname = 'vm_runtimes_address'`;
    expect(indexes.map((i) => i.indexdef)).toEqual([
      expect.stringContaining(
        "UNIQUE INDEX vm_runtimes_address ON public.vm_runtimes USING btree (vm_address) WHERE (vm_address IS NOT NULL)",
      ),
    ]);
    const [throttle] = await db.sql`SELECT to_regclass('public.login_throttle') IS NOT NULL AS has`;
    expect(throttle!.has).toBe(true);
    const farm = await db.sql`SELECT table_name || '.' || column_name AS c FROM information_schema.columns
      WHERE column_name IN ('drain', 'lost_ts', 'lost_reason', 'vm_cmd_ts', 'home_key') AND table_name IN ('host_runtimes', 'vm_runtimes') ORDER BY 1`;
    expect(farm.map((r) => r.c)).toEqual([
      "host_runtimes.drain",
      "host_runtimes.lost_reason",
      "host_runtimes.lost_ts",
      "vm_runtimes.home_key",
      "vm_runtimes.vm_cmd_ts",
    ]);
    const view =
      await db.sql`SELECT column_name FROM information_schema.columns WHERE table_name = 'host_view' AND column_name IN ('drain', 'lost_ts', 'lost_reason') ORDER BY 1`;
    expect(view.map((r) => r.column_name)).toEqual(["drain", "lost_reason", "lost_ts"]);
    // What migration 7 adds reads as in a new database: same columns, order, types, defaults and checks.
    const fresh = await testDatabase({ empty: true });
    try {
      await initDatabase(fresh.sql, { adminPassword: "migrate-pw" });
      // Order, not ordinal_position: a dropped column keeps its number.
      const shape = (
        sql: typeof db.sql,
      ) => sql`SELECT table_name, column_name, row_number() OVER (PARTITION BY table_name ORDER BY ordinal_position)::int AS n, data_type, column_default, is_nullable
        FROM information_schema.columns WHERE table_schema = 'public' AND table_name IN ('osfs', 'host_runtimes', 'osf_view', 'host_view')
        ORDER BY table_name, ordinal_position`;
      const checks = (
        sql: typeof db.sql,
      ) => sql`SELECT conrelid::regclass::text AS t, pg_get_constraintdef(oid) AS def FROM pg_constraint
        WHERE conrelid IN ('osfs'::regclass, 'host_runtimes'::regclass) AND contype = 'c' ORDER BY 1, 2`;
      const migrated = await shape(db.sql);
      expect(
        migrated.filter((c) => ["hypervisor", "vcpus", "hypervisors", "hypervisor_notes"].includes(c.column_name))
          .length,
      ).toBe(8);
      expect(migrated).toEqual(await shape(fresh.sql));
      expect(await checks(db.sql)).toEqual(await checks(fresh.sql));
      const triggers = (sql: typeof db.sql) =>
        sql`SELECT tgname, pg_get_triggerdef(oid) AS def FROM pg_trigger WHERE tgrelid = 'osfs'::regclass AND NOT tgisinternal ORDER BY 1`;
      expect((await triggers(db.sql)).map((t) => t.tgname)).toContain("osfs_hypervisor_guard");
      expect(await triggers(db.sql)).toEqual(await triggers(fresh.sql));
    } finally {
      await fresh.sql.end();
    }
  } finally {
    await db.sql.end();
  }
});

test("concurrent inits: exactly one wins", async () => {
  const db = await testDatabase({ empty: true });
  const second = connect(db.url, { max: 1 });
  try {
    const results = await Promise.allSettled([
      initDatabase(db.sql, { adminPassword: "racer-one-pw" }),
      initDatabase(second, { adminPassword: "racer-two-pw" }),
    ]);
    expect(results.filter((r) => r.status === "fulfilled")).toHaveLength(1);
    const failed = results.find((r) => r.status === "rejected") as PromiseRejectedResult;
    expect(failed.reason.message).toContain("already holds a QVD schema");
  } finally {
    await second.end();
    await db.sql.end();
  }
});

test("migration 4 refuses a database where two desktops run with one address, and changes nothing", async () => {
  const db = await testDatabase();
  try {
    await db.sql`DROP TRIGGER vms_ip_guard ON vms`;
    await db.sql`DROP FUNCTION vm_ip_guard()`;
    await db.sql`DROP INDEX vm_runtimes_address`;
    const [h] = await db.sql`INSERT INTO hosts (name, address) VALUES ('n', '198.18.0.250') RETURNING id`;
    const [u] = await db.sql`INSERT INTO users (tenant_id, name) VALUES (1, 'dup') RETURNING id`;
    const [o] = await db.sql`INSERT INTO osfs (tenant_id, name) VALUES (1, 'dup') RETURNING id`;
    const ids: number[] = [];
    for (const [name, ip] of [
      ["a", "198.18.0.2"],
      ["b", "198.18.0.3"],
    ]) {
      const [v] =
        await db.sql`INSERT INTO vms (tenant_id, user_id, osf_id, name, ip) VALUES (1, ${u!.id}, ${o!.id}, ${name!}, ${ip!}) RETURNING id`;
      ids.push(v!.id);
      await db.sql`UPDATE vm_runtimes SET vm_state = 'running', host_id = ${h!.id}, vm_address = '198.18.0.2' WHERE vm_id = ${v!.id}`;
    }
    const m4 = MIGRATIONS.find((m) => m.version === 4)!;
    await expect(db.sql.begin((tx) => tx.unsafe(m4.sql))).rejects.toThrow(
      `VMs ${ids.join(", ")} run with the same address 198.18.0.2: stop all but one of them, then migrate again`,
    );
    expect((await db.sql`SELECT 1 FROM pg_proc WHERE proname = 'vm_ip_guard'`).length).toBe(0);
  } finally {
    await db.sql.end();
  }
});
