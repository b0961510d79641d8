import { expect, test } from "bun:test";
import { useTestDatabase } from "./support/db.ts";
const db = useTestDatabase();
test("smoke", async () => {
  const rows = await db().sql`SELECT name FROM tenants ORDER BY id`;
  expect(rows.map((r) => r.name)).toEqual(["*", "default"]);
});
