// The compiled binary: built with the documented command, copied alone into an empty
// directory, it answers --version and --help and manages a real database.
import { afterAll, beforeAll, expect, test } from "bun:test";
import { chmodSync, copyFileSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pkg from "../package.json" with { type: "json" };
import { SCHEMA_VERSION } from "../src/db/schema.ts";
import { testDatabase, type TestDatabase } from "./support/db.ts";
import { capture } from "./support/spawn.ts";

const root = join(import.meta.dir, "..");
let work: string;
let qvd: string;
let db: TestDatabase;

beforeAll(async () => {
  work = mkdtempSync(join(tmpdir(), "qvd-binary-"));
  const built = join(work, "build", "qvd");
  const build = Bun.spawn([process.execPath, "scripts/build-binaries.ts", "--outfile", built], {
    cwd: root,
    stdout: "pipe",
    stderr: "pipe",
  });
  const [out, err, code] = await Promise.all([
    new Response(build.stdout).text(),
    new Response(build.stderr).text(),
    build.exited,
  ]);
  if (code !== 0) throw new Error(`build failed (exit ${code}): ${err}${out}`);
  expect(out).toContain(built);
  const alone = join(work, "alone");
  mkdirSync(alone);
  qvd = join(alone, "qvd");
  copyFileSync(built, qvd);
  chmodSync(qvd, 0o755);
  expect(readdirSync(alone)).toEqual(["qvd"]);
  db = await testDatabase({ empty: true });
}, 180_000);

afterAll(async () => {
  await db?.sql.end({ timeout: 5 });
  if (work) rmSync(work, { recursive: true, force: true });
});

/** Runs the binary from its own (otherwise empty) directory, with no QVD_* settings. */
async function runQvd(...args: string[]) {
  const env: Record<string, string> = {
    PATH: process.env.PATH ?? "/usr/bin:/bin",
    HOME: process.env.HOME ?? "/",
    QVD_CONFIG: "/dev/null",
  };
  return capture([qvd, ...args], { cwd: join(work, "alone"), env });
}

test("--version prints the package version", async () => {
  const r = await runQvd("--version");
  expect(r.code).toBe(0);
  expect(r.stdout.trim()).toBe(pkg.version);
});

test("--help lists the roles", async () => {
  const r = await runQvd("--help");
  expect(r.code).toBe(0);
  const text = r.stdout.replace(/\x1b\[[0-9;]*m/g, "");
  expect(text).toContain(`qvd v${pkg.version}`);
  for (const role of ["config", "db", "demo"]) expect(text).toMatch(new RegExp(`^\\s+${role}\\s`, "m"));
});

test("db init, db status, and a second db init that refuses", async () => {
  const pwFile = join(work, "admin-pw");
  writeFileSync(pwFile, "binary-test-password\n", { mode: 0o600 });

  const init = await runQvd("db", "init", "--db", db.url, "--admin-password-file", pwFile);
  if (init.code !== 0) throw new Error(`qvd db init failed (${init.code}): ${init.stderr}`);
  expect(init.stdout).toContain(`schema version ${SCHEMA_VERSION}`);
  expect(init.stdout).not.toContain("binary-test-password");

  const [admin] = await db.sql`SELECT password_hash FROM administrators WHERE name = 'superadmin'`;
  expect(await Bun.password.verify("binary-test-password", admin!.password_hash)).toBe(true);

  const status = await runQvd("db", "status", "--db", db.url);
  expect(status.code).toBe(0);
  expect(status.stdout).toContain(`Schema version ${SCHEMA_VERSION} (this qvd: ${SCHEMA_VERSION})`);

  const again = await runQvd("db", "init", "--db", db.url, "--admin-password-file", pwFile);
  expect(again.code).not.toBe(0);
  const lines = again.stderr.trim().split("\n");
  expect(lines).toHaveLength(1);
  expect(lines[0]).toMatch(/already holds a QVD schema/);
  const [row] = await db.sql`SELECT count(*)::int AS n FROM administrators`;
  expect(row!.n).toBe(1);
});
