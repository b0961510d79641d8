// Per-test-file databases on the shared throwaway cluster.
//   const db = await testDatabase();           // schema, default tenant and superadmin ready
//   const empty = await testDatabase({ empty: true });
// Each call creates a new database; close it with `db.sql.end()` (done for you by
// `useTestDatabase()` in an afterAll hook).
import { afterAll, beforeAll } from "bun:test";
import { connect, type Sql } from "../../src/db/pool.ts";
import { initDatabase } from "../../src/db/schema.ts";
import { PgCluster } from "./pg.ts";

export const TEST_ADMIN = { name: "superadmin", password: "test-superadmin-pw" };

interface Shared {
  cluster?: Promise<PgCluster>;
  template?: Promise<string>;
}
// Test files share one process; keep the cluster on globalThis so every file reuses it.
const shared: Shared = ((globalThis as Record<string, unknown>).__qvdTestPg ??= {}) as Shared;

export function testCluster(): Promise<PgCluster> {
  return (shared.cluster ??= (async () => {
    const c = new PgCluster();
    await c.start();
    return c;
  })());
}

async function template(): Promise<string> {
  return (shared.template ??= (async () => {
    const c = await testCluster();
    const name = await c.createDatabase();
    const sql = connect(c.url(name), { max: 1 });
    try {
      await initDatabase(sql, { adminName: TEST_ADMIN.name, adminPassword: TEST_ADMIN.password });
    } finally {
      await sql.end();
    }
    return name;
  })());
}

export interface TestDatabase {
  name: string;
  url: string;
  sql: Sql;
  cluster: PgCluster;
}

export async function testDatabase(opts: { empty?: boolean } = {}): Promise<TestDatabase> {
  const cluster = await testCluster();
  const name = await cluster.createDatabase(opts.empty ? undefined : await template());
  const url = cluster.url(name);
  return { name, url, cluster, sql: connect(url, { max: 4 }) };
}

/** Stops the shared cluster (called once, after the last test file). */
export async function stopTestCluster(): Promise<void> {
  if (!shared.cluster) return;
  const c = await shared.cluster.catch(() => undefined);
  shared.cluster = shared.template = undefined;
  await c?.stop();
}

/** A fresh database for this test file, closed after its last test. */
export function useTestDatabase(opts: { empty?: boolean } = {}): () => TestDatabase {
  let db: TestDatabase | undefined;
  beforeAll(async () => {
    db = await testDatabase(opts);
  });
  afterAll(async () => {
    await db?.sql.end({ timeout: 5 });
  });
  return () => {
    if (!db) throw new Error("test database not ready (use it inside a test)");
    return db;
  };
}
