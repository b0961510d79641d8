// `qvd api` as administrators run it: HTTPS with the configured certificate, plain HTTP only
// when asked for, and a clear refusal when neither is set up.
import { afterAll, beforeAll, expect, test } from "bun:test";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { run } from "../src/run.ts";
import { TEST_ADMIN, useTestDatabase } from "./support/db.ts";
import { cleanEnv } from "./support/node.ts";
import { selfSignedCert } from "./support/tls.ts";

const db = useTestDatabase();
const dir = mkdtempSync("/tmp/qvd-api-serve-");
const cert = join(dir, "api.crt");
const key = join(dir, "api.key");
const procs: Bun.Subprocess[] = [];

beforeAll(async () => {
  await selfSignedCert(dir, { san: "IP:127.0.0.1,DNS:localhost", names: ["api.crt", "api.key"] });
});
afterAll(() => {
  for (const p of procs) p.kill("SIGKILL");
  rmSync(dir, { recursive: true, force: true });
});

/** Starts `qvd api` and resolves with the URL it prints. */
async function serve(args: string[]): Promise<string> {
  const p = Bun.spawn([process.execPath, "src/main.ts", "api", "--db", db().url, "--listen", "127.0.0.1:0", ...args], {
    cwd: join(import.meta.dir, ".."),
    stdout: "pipe",
    stderr: "pipe",
    env: cleanEnv(),
  });
  procs.push(p);
  const reader = p.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let out = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`qvd api exited: ${out} ${await new Response(p.stderr).text()}`);
    out += value;
    const m = /listening on (\S+)/.exec(out);
    if (m) return m[1]!;
  }
}

test("HTTPS with the configured certificate; the session cookie is Secure", async () => {
  const base = await serve(["--cert", cert, "--key", key]);
  expect(base).toStartWith("https://127.0.0.1:");
  const tls = { ca: readFileSync(cert, "utf8") };
  const doc = await fetch(`${base}/openapi.json`, { tls });
  expect(doc.status).toBe(200);
  const login = await fetch(`${base}/login`, {
    method: "POST",
    tls,
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ name: TEST_ADMIN.name, password: TEST_ADMIN.password }),
  });
  expect(login.status).toBe(200);
  expect(login.headers.get("set-cookie")).toMatch(/qvd_session=[\w-]+; HttpOnly; SameSite=Strict; Path=\/; Secure/);
  // An untrusted certificate is refused by a client that checks it.
  await expect(fetch(`${base}/openapi.json`)).rejects.toThrow();
});

test("plain HTTP only with --insecure-http; without certificates the API refuses to start", async () => {
  const base = await serve(["--insecure-http"]);
  expect(base).toStartWith("http://127.0.0.1:");
  expect((await fetch(`${base}/openapi.json`)).status).toBe(200);
  const r = await run([process.execPath, "src/main.ts", "api", "--db", db().url, "--listen", "127.0.0.1:0"], {
    allowFail: true,
    cwd: join(import.meta.dir, ".."),
    env: cleanEnv(),
  });
  expect(r.status).not.toBe(0);
  expect(r.stderr.trim()).toBe(
    "qvd: the API serves HTTPS: set api.tls.cert and api.tls.key (or --cert/--key); --insecure-http is for local tests only",
  );
});

test("a port another program holds: one line saying so, exit 69, no stack", async () => {
  const holder = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
  try {
    const r = await run(
      [
        process.execPath,
        "src/main.ts",
        "api",
        "--db",
        db().url,
        "--listen",
        `127.0.0.1:${holder.port}`,
        "--insecure-http",
      ],
      { allowFail: true, cwd: join(import.meta.dir, ".."), env: cleanEnv() },
    );
    expect(r.status).toBe(69);
    const lines = r.stderr.split("\n").filter((l) => l.startsWith("qvd: "));
    expect(lines).toHaveLength(1);
    expect(lines[0]).toStartWith("qvd: an address to listen on is in use by another program: ");
    expect(r.stderr).not.toContain("internal error");
    expect(r.stderr).not.toMatch(/^\s+at /m);
  } finally {
    holder.stop(true);
  }
});
