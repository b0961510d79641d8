// `qvd demo`: creates a persistent PostgreSQL cluster and the qvd database on the first run,
// stops PostgreSQL cleanly on SIGTERM, and reuses everything on the next run.
import { afterAll, expect, test } from "bun:test";
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { LocalCluster } from "../src/db/local-cluster.ts";
import { connect } from "../src/db/pool.ts";

const root = join(import.meta.dir, "..");
const work = mkdtempSync(join(tmpdir(), "qvd-demo-"));
chmodSync(work, 0o755); // the server's unprivileged user must reach the demo dir
const dir = join(work, "demo");
const running = new Set<Bun.Subprocess>();

afterAll(async () => {
  for (const p of running) p.kill("SIGKILL");
  const cluster = new LocalCluster({ dir });
  if (await cluster.running()) await cluster.stop("immediate").catch(() => {});
  rmSync(work, { recursive: true, force: true });
});

interface Demo {
  proc: Bun.Subprocess<"ignore", "pipe", "pipe">;
  url: string;
  /** Everything printed so far (stdout). */
  output: () => string;
  stderr: () => string;
}

/** Starts `qvd demo` and resolves once it is ready (it has printed "Running;"). */
async function startDemo(): Promise<Demo> {
  const proc = Bun.spawn([process.execPath, "src/main.ts", "demo", "--dir", dir], { cwd: root, stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  running.add(proc);
  let out = "";
  let err = "";
  void (async () => {
    const r = proc.stderr.pipeThrough(new TextDecoderStream()).getReader();
    for (let c = await r.read(); !c.done; c = await r.read()) err += c.value;
  })();
  const reader = proc.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let url: string | undefined;
  while (!url || !/^Running; /m.test(out)) {
    const { value, done } = await reader.read();
    if (done) {
      await proc.exited;
      throw new Error(`qvd demo exited (${proc.exitCode}) before it was ready:\n${out}\n${err}`);
    }
    out += value;
    url = /^Database URL: (\S+)$/m.exec(out)?.[1];
  }
  void (async () => {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      out += value;
    }
  })();
  return { proc, url, output: () => out, stderr: () => err };
}

async function stopDemo(demo: Demo): Promise<number> {
  demo.proc.kill("SIGTERM");
  const code = await demo.proc.exited;
  running.delete(demo.proc);
  return code;
}

const passwordFile = join(dir, "superadmin-password");

test("first run: creates the cluster and database, prints the password once, stops on SIGTERM", async () => {
  const demo = await startDemo();
  expect(demo.url).toContain(`host=${dir}`);

  const password = readFileSync(passwordFile, "utf8").trim();
  expect(password.length).toBeGreaterThanOrEqual(16);
  expect(statSync(passwordFile).mode & 0o777).toBe(0o600);
  expect(demo.output()).toContain(`Password:   ${password}`);
  expect(demo.output()).toContain(`qvd db status --db '${demo.url}'`);

  const sql = connect(demo.url, { max: 1 });
  try {
    const [admin] = await sql`SELECT a.password_hash FROM administrators a JOIN administrator_roles ar ON ar.administrator_id = a.id
      JOIN roles r ON r.id = ar.role_id WHERE a.name = 'superadmin' AND a.tenant_id = 0 AND r.name = 'Superadmin'`;
    expect(admin).toBeDefined();
    expect(await Bun.password.verify(password, admin!.password_hash)).toBe(true);
  } finally {
    await sql.end({ timeout: 5 });
  }

  expect(await stopDemo(demo)).toBe(0);
  expect(demo.output()).toContain("Stopped.");
  // A clean shutdown removes postmaster.pid; pg_ctl agrees that nothing runs.
  expect(existsSync(join(dir, "data", "postmaster.pid"))).toBe(false);
  expect(await new LocalCluster({ dir }).running()).toBe(false);
  const probe = connect(demo.url, { max: 1, connectTimeout: 2 });
  await expect(probe`SELECT 1`).rejects.toThrow();
  await probe.end({ timeout: 1 });
});

test("second run: reuses the cluster and database without re-initialising", async () => {
  const before = readFileSync(passwordFile, "utf8");
  const demo = await startDemo();
  expect(demo.output()).not.toContain("Password:");
  expect(demo.output()).not.toContain("Creating");
  expect(readFileSync(passwordFile, "utf8")).toBe(before);

  const sql = connect(demo.url, { max: 1 });
  try {
    const rows = await sql`SELECT password_hash FROM administrators`;
    expect(rows).toHaveLength(1);
    expect(await Bun.password.verify(before.trim(), rows[0]!.password_hash)).toBe(true);
    const [row] = await sql`SELECT count(*)::int AS n FROM audit_log WHERE action = 'db.init'`;
    expect(row!.n).toBe(1);
  } finally {
    await sql.end({ timeout: 5 });
  }

  expect(await stopDemo(demo)).toBe(0);
  expect(existsSync(join(dir, "data", "postmaster.pid"))).toBe(false);
});
