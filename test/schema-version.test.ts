// A role runs only against the schema its binary was built for (src/db/schema.ts
// requireCurrentSchema): during a rolling upgrade a node still on the previous qvd refuses to
// start against the migrated database, and a new qvd refuses a database not yet migrated, each
// with the command that fixes it. The real binary, a real PostgreSQL.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import { MIGRATIONS } from "../src/db/migrations/index.ts";
import { run } from "../src/run.ts";
import { useTestDatabase } from "./support/db.ts";
import { farmCert, qvdBinary } from "./support/node.ts";

const db = useTestDatabase();
const LATEST = Math.max(1, ...MIGRATIONS.map((m) => m.version));

describe("the schema version at a role's start", () => {
  let dir = "";
  beforeAll(() => {
    dir = mkdtempSync("/tmp/qvd-schema-test-");
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  /** Starts a role (it stops on its own: the schema check comes before anything it would serve). */
  async function start(role: "hkd" | "l7r" | "api") {
    const farm =
      role === "l7r"
        ? Object.entries((await farmCert("nowhere", "127.0.0.1")).settings).flatMap(([k, v]) => ["--set", `${k}=${v}`])
        : [];
    const args =
      role === "api"
        ? ["--insecure-http", "--listen", "127.0.0.1:0"]
        : ["--set", `path.run=${join(dir, role)}`, "--set", "nodename=nowhere", ...farm];
    return run([await qvdBinary(), role, "--db", db().url, ...args], {
      allowFail: true,
      timeoutMs: 30_000,
      env: { ...process.env, QVD_LOG_LEVEL: "error" },
    });
  }

  test("a database migrated past this qvd (the previous qvd during a rolling upgrade): every role refuses, naming both versions", async () => {
    await db().sql`INSERT INTO schema_migrations (version, name) VALUES (${LATEST + 1}, 'from a newer qvd')`;
    try {
      for (const role of ["hkd", "l7r", "api"] as const) {
        const r = await start(role);
        expect(r.status, `${role}: ${r.stderr}`).toBe(1);
        expect(r.stderr).toContain(
          `the database's schema is version ${LATEST + 1}, newer than this qvd knows (${LATEST}): install the newer qvd on this machine`,
        );
        expect(r.stderr).not.toMatch(/\bat \S+\.ts:\d+/); // no stack trace
      }
    } finally {
      await db().sql`DELETE FROM schema_migrations WHERE version = ${LATEST + 1}`;
    }
  }, 120_000);

  test("a database behind this qvd: every role refuses and says to run qvd db migrate", async () => {
    // (A fresh database has one row, the version it was created at.)
    await db().sql`UPDATE schema_migrations SET version = ${LATEST - 1} WHERE version = ${LATEST}`;
    try {
      for (const role of ["hkd", "l7r", "api"] as const) {
        const r = await start(role);
        expect(r.status, `${role}: ${r.stderr}`).toBe(1);
        expect(r.stderr).toContain(
          `the database's schema is version ${LATEST - 1} and this qvd needs ${LATEST}: run qvd db migrate with this qvd first`,
        );
      }
    } finally {
      await db().sql`UPDATE schema_migrations SET version = ${LATEST} WHERE version = ${LATEST - 1}`;
    }
  }, 120_000);
});
