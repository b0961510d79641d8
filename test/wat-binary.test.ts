// The compiled binary serves the WAT from inside itself: `qvd api --insecure-http` run from an
// empty directory answers /wat/ with index.html, the hashed script and stylesheet gzipped and
// cached for ever, the CSP on every answer; and Chromium logs in through it.
import { afterAll, beforeAll, expect, test } from "bun:test";
import { chmodSync, mkdtempSync, readdirSync, rmSync } from "node:fs";
import { useBrowser } from "./support/browser.ts";
import { TEST_ADMIN, useTestDatabase } from "./support/db.ts";
import { cleanEnv, qvdBinary } from "./support/node.ts";

const db = useTestDatabase();
const browser = useBrowser();
let cwd: string;
let proc: Bun.Subprocess<"ignore", "pipe", "pipe"> | undefined;
let origin: string;

beforeAll(async () => {
  const qvd = await qvdBinary();
  cwd = mkdtempSync("/tmp/qvd-wat-binary-");
  chmodSync(cwd, 0o755);
  proc = Bun.spawn([qvd, "api", "--insecure-http", "--db", db().url, "--listen", "127.0.0.1:0"], {
    cwd,
    env: { ...cleanEnv(), QVD_CONFIG: "/dev/null" },
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
  });
  const reader = proc.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let out = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`qvd api exited: ${out} ${await new Response(proc.stderr).text()}`);
    out += value;
    const m = /listening on (http:\/\/[\d.:]+)\/api\/v1/.exec(out);
    if (m) {
      origin = m[1]!;
      break;
    }
  }
  reader.releaseLock();
}, 300_000);

afterAll(async () => {
  proc?.kill("SIGTERM");
  await proc?.exited;
  if (cwd) rmSync(cwd, { recursive: true, force: true });
});

const raw = (path: string, headers: Record<string, string> = { "accept-encoding": "gzip" }) =>
  fetch(origin + path, { headers, decompress: false, redirect: "manual" });

function expectSecurityHeaders(h: Headers) {
  expect(h.get("content-security-policy")).toContain("default-src 'self'");
  expect(h.get("content-security-policy")).not.toContain("unsafe-inline");
  expect(h.get("x-content-type-options")).toBe("nosniff");
}

test("index.html, the script and the stylesheet come gzipped from the binary, with cache headers and the CSP", async () => {
  const index = await raw("/wat/");
  expect(index.status).toBe(200);
  expect(index.headers.get("content-type")).toStartWith("text/html");
  expect(index.headers.get("content-encoding")).toBe("gzip");
  expect(index.headers.get("cache-control")).toBe("no-cache");
  expectSecurityHeaders(index.headers);
  const html = new TextDecoder().decode(Bun.gunzipSync(new Uint8Array(await index.arrayBuffer())));
  const script = /<script type="module" src="(\/wat\/[\w.-]+\.js)">/.exec(html)?.[1];
  const style = /<link rel="stylesheet" href="(\/wat\/[\w.-]+\.css)">/.exec(html)?.[1];
  expect(script).toBeDefined();
  expect(style).toBeDefined();
  expect(html).not.toMatch(/<script>|<style>|\son\w+=/);

  for (const [path, type] of [
    [script!, "text/javascript"],
    [style!, "text/css"],
  ] as const) {
    const r = await raw(path);
    expect(r.status).toBe(200);
    expect(r.headers.get("content-type")).toStartWith(type);
    expect(r.headers.get("content-encoding")).toBe("gzip");
    expect(r.headers.get("cache-control")).toBe("public, max-age=31536000, immutable");
    expectSecurityHeaders(r.headers);
    const gz = new Uint8Array(await r.arrayBuffer());
    const body = Bun.gunzipSync(gz);
    expect(body.byteLength).toBeGreaterThan(gz.byteLength);
    // A client without gzip gets the same bytes uncompressed.
    const plain = await raw(path, {});
    expect(plain.headers.get("content-encoding")).toBeNull();
    expect(new Uint8Array(await plain.arrayBuffer())).toEqual(body);
    // Revalidation by ETag answers 304 with no body.
    const again = await raw(path, { "accept-encoding": "gzip", "if-none-match": r.headers.get("etag")! });
    expect(again.status).toBe(304);
  }

  // The app's own URLs answer index.html (so they reload); /wat redirects to /wat/.
  const deep = await raw("/wat/vms/12");
  expect(deep.status).toBe(200);
  expect(deep.headers.get("etag")).toBe(index.headers.get("etag"));
  expect((await raw("/wat")).headers.get("location")).toBe("/wat/");
  // Nothing was written next to the binary's working directory, nor read from it.
  expect(readdirSync(cwd)).toEqual([]);
});

test("Chromium logs in through the binary and sees the dashboard, with no console errors", async () => {
  const w = await browser().open(origin);
  await w.login(TEST_ADMIN.name, TEST_ADMIN.password);
  await w.page.getByRole("heading", { level: 1, name: "Dashboard" }).waitFor();
  w.assertNoErrors();
});
