// Malformed input on every route of the admin API, generated from the route table: bodies that
// are not JSON or not objects, wrong types for every field, unknown fields, huge strings, SQL
// and path fragments, bad ids, and bad query strings. Every answer is a 4xx with a JSON error
// (or a 2xx where the input happens to be valid), never a 5xx.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import type { z } from "zod";
import type { Route } from "../src/api/context.ts";
import { ApiClient, startTestApi, type ApiResponse, type TestApi } from "./support/api.ts";
import { TEST_ADMIN, useTestDatabase } from "./support/db.ts";
import { Fixtures, fixedTargets, isMassRoute, routeName, routeTable, sampleRequest, type Sample, type Targets } from "./support/api-routes.ts";

const db = useTestDatabase();
// Thousands of requests per test: more than bun's default 5 s on a busy machine.
setDefaultTimeout(120_000);
const sql = () => db().sql;

let api: TestApi;
let storage: string;
let sa: ApiClient;
let targets: Targets;

beforeAll(async () => {
  storage = mkdtempSync(join(tmpdir(), "qvd-fuzz-test-"));
  api = await startTestApi(db(), { "path.storage.root": storage });
  sa = await api.login(TEST_ADMIN.name, TEST_ADMIN.password);
  targets = await fixedTargets(new Fixtures(sql(), 1, "fz"));
});
afterAll(async () => {
  await api?.stop();
  rmSync(storage, { recursive: true, force: true });
});

const HUGE = "x".repeat(100 * 1024);
const SQL_FRAGMENTS = ["' OR 1=1 --", "x'; DROP TABLE users; --"];
const PATH_FRAGMENTS = ["../../etc/passwd", "..", "%00"];
const STRINGS = [...SQL_FRAGMENTS, ...PATH_FRAGMENTS, HUGE, "", "\u0000", "\ud800"];
const WRONG_VALUES: unknown[] = [123, -1, 1.5, 1e300, 99999999999, true, null, {}, [1, "a"], ...STRINGS];
const BAD_IDS = ["-1", "0", "99999999999", "abc", "1e3", "%00", "..%2F..%2Fetc%2Fpasswd", "%27%20OR%201%3D1%20--"];

interface Outcome {
  what: string;
  status: number;
  body: unknown;
}
const outcomes: Outcome[] = [];

/** Checks one answer: never a 5xx, and a 4xx is the JSON error document. */
function check(what: string, r: ApiResponse): void {
  outcomes.push({ what, status: r.status, body: r.body });
  expect([what, r.status < 500]).toEqual([what, true]);
  if (r.status >= 400) {
    const e = (r.body as { error?: { status?: unknown; message?: unknown } })?.error;
    expect([what, e?.status, typeof e?.message]).toEqual([what, r.status, "string"]);
  } else expect([what, r.status >= 200 && r.status < 300]).toEqual([what, true]);
}

/** Runs requests a few at a time. */
async function all(jobs: (() => Promise<void>)[], width = 6): Promise<void> {
  let next = 0;
  await Promise.all(Array.from({ length: Math.max(width, 8) }, async () => {
    while (next < jobs.length) await jobs[next++]!();
  }));
}

const shapeOf = (r: Route): Record<string, z.ZodType> | undefined => (r.body as z.ZodObject | undefined)?.shape as Record<string, z.ZodType> | undefined;
const table = routeTable();
/** The session must survive the fuzzing: never send logout a valid request. */
const send = (what: string, s: { method: string; path: string }, body?: unknown, headers: Record<string, string> = {}) => async () => {
  check(what, await sa.call(s.method, s.path, body, headers));
};

describe("every route, malformed", () => {
  const samples = new Map<Route, Sample>();
  beforeAll(async () => {
    for (const r of table) samples.set(r, await sampleRequest(r, targets));
  });

  test("without a session: 401 (public routes excepted)", async () => {
    await all(table.filter((r) => !r.public).map((r) => async () => {
      const s = samples.get(r)!;
      const res = await api.anonymous.call(s.method, s.path, s.body);
      check(`anonymous ${routeName(r)}`, res);
      expect([routeName(r), res.status]).toEqual([routeName(r), 401]);
    }));
  });

  test("bad ids and fragments in every path parameter", async () => {
    const jobs: (() => Promise<void>)[] = [];
    for (const r of table) {
      const segs = r.path.split("/");
      const s = samples.get(r)!;
      const [path, query = ""] = s.path.split("?");
      const actual = path!.split("/");
      segs.forEach((seg, i) => {
        if (!seg.startsWith(":")) return;
        for (const bad of BAD_IDS) {
          const p = [...actual];
          p[i] = bad;
          jobs.push(send(`${routeName(r)} ${seg}=${bad}`, { method: r.method, path: p.join("/") + (query ? `?${query}` : "") }, s.body));
        }
      });
    }
    expect(jobs.length).toBeGreaterThan(500);
    await all(jobs);
    // None of the bad ids named an object, but 0 is the global scope (tenant *), which can be read.
    const succeeded = outcomes.filter((o) => o.status < 300).map((o) => o.what);
    expect(succeeded).toEqual(["GET /tenants/:id :id=0"]);
  });

  test("bodies that are not JSON objects", async () => {
    const jobs: (() => Promise<void>)[] = [];
    for (const r of table.filter((x) => x.method !== "GET" && !x.rawBody)) {
      const s = samples.get(r)!;
      const n = routeName(r);
      const expectStatus = (want: number[], what: string, body: unknown, headers: Record<string, string> = {}) => jobs.push(async () => {
        const res = await sa.call(s.method, s.path, body, headers);
        check(`${n} ${what}`, res);
        expect([n, what, want.includes(res.status)]).toEqual([n, what, true]);
      });
      expectStatus([400], "not JSON", "{not json");
      expectStatus([400], "deep nesting", "[".repeat(100_000) + "]".repeat(100_000));
      expectStatus([415], "XML", "<user name='x'/>", { "content-type": "application/xml" });
      expectStatus([422], "array", "[{}]");
      expectStatus([422], "unknown field", { ...(s.body as object), bogus_field: 1 });
      if (!r.body) continue; // the rest is about routes that take a body
      expectStatus([400], "truncated JSON", '{"name": "x"');
      expectStatus([415], "form", "name=x&password=y", { "content-type": "application/x-www-form-urlencoded" });
      expectStatus([422], "number", "42");
      expectStatus([422], "string", '"hello"');
      expectStatus([422], "null", "null");
      expectStatus([422], "__proto__", '{"__proto__": {"superadmin": true}}');
      expectStatus([422], "NUL in a key", { "a\u0000b": 1 });
    }
    expect(jobs.length).toBeGreaterThan(400);
    await all(jobs);
    for (const o of outcomes.filter((x) => x.what.endsWith(" unknown field")))
      expect([o.what, (o.body as any).error.field]).toEqual([o.what, "bogus_field"]);
  });

  test("wrong types, huge strings, SQL and path fragments in every field", async () => {
    const jobs: (() => Promise<void>)[] = [];
    let refusedCount = 0;
    // Mass changes validate with the same schema as the single change: their fields are covered there.
    for (const r of table.filter((x) => !isMassRoute(x))) {
      const shape = shapeOf(r);
      if (!shape) continue;
      const s = samples.get(r)!;
      const n = routeName(r);
      const valid = (s.body ?? {}) as Record<string, unknown>;
      for (const [field, schema] of Object.entries(shape)) {
        for (const v of WRONG_VALUES) {
          const typeOk = schema.safeParse(v).success;
          // Valid values of bodies with a password would cost an argon2 hash or check each: only send refused ones there.
          if (typeOk && "password" in shape) continue;
          const what = `${n} ${field}=${typeof v === "string" ? JSON.stringify(v.slice(0, 30)) : JSON.stringify(v)}`;
          jobs.push(async () => {
            const res = await sa.call(s.method, s.path, { ...valid, [field]: v });
            check(what, res);
            // A value the schema refuses is a 422 naming the field (or a 403/404 decided before the body is read).
            if (!typeOk) {
              refusedCount++;
              expect([what, [400, 403, 404, 409, 422].includes(res.status)]).toEqual([what, true]);
              if (res.status === 422) expect([what, String((res.body as any).error.field ?? "")]).toEqual([what, expect.stringContaining(field)]);
            }
          });
        }
      }
    }
    expect(jobs.length).toBeGreaterThan(800);
    await all(jobs);
    expect(refusedCount).toBeGreaterThan(400);
  });

  test("bad query strings", async () => {
    const FEW = ["bogus=1", "limit=abc", "name=%00"];
    const QUERIES = [
      "bogus=1", "name[bogus]=x", "name[]=x", "[x]=1", "limit=abc", "limit=-1", "limit=99999999999999999999", "limit=1e3", "offset=-5",
      "sort=nosuch", "sort=-", "fields=password_hash", "fields=name,nosuch", "id=abc", "id=99999999999", "id[in]=1,abc",
      "id[gt]=", "created_at[lt]=notadate", "name=%00", "name%00=1", "name[like]=%27%20OR%201%3D1%20--", "tenant_id=-1", "tenant_id=abc",
      "name=" + "y".repeat(8000), "a=1&a=2&a=3", "%zz=1",
    ];
    const jobs: (() => Promise<void>)[] = [];
    for (const r of table) {
      const s = samples.get(r)!;
      const [path] = s.path.split("?");
      for (const q of r.query ? QUERIES : FEW) jobs.push(send(`${routeName(r)} ?${q.slice(0, 40)}`, { method: r.method, path: `${path}?${q}` }, s.body));
    }
    await all(jobs);
    // Only a list (or a mass change whose filter names nothing) may accept these.
    const accepted = outcomes.filter((o) => o.what.includes(" ?") && o.status < 300);
    for (const o of accepted) expect([o.what, /^(GET|PATCH|DELETE|POST) \/[a-z]+(\/actions\/[a-z_]+)? \?/.test(o.what)]).toEqual([o.what, true]);
    const routesWithoutQuery = outcomes.filter((o) => o.what.includes("/:") && o.what.includes(" ?bogus=1"));
    expect(routesWithoutQuery.length).toBeGreaterThan(50);
    for (const o of routesWithoutQuery) expect([o.what, o.status]).toEqual([o.what, 422]);
  });
});

describe("limits", () => {
  test("a JSON body over 1 MiB is 413, with or without Content-Length", async () => {
    const big = JSON.stringify({ name: "big", description: "z".repeat(1100 * 1024) });
    const r = await sa.call("POST", "/users", big);
    expect(r.status).toBe(413);
    expect(r.body.error.status).toBe(413);
    const chunks = [big.slice(0, 600_000), big.slice(600_000)];
    const stream = new ReadableStream<Uint8Array>({
      start(c) {
        for (const x of chunks) c.enqueue(new TextEncoder().encode(x));
        c.close();
      },
    });
    const res = await fetch(`${api.url}/users`, { method: "POST", body: stream, headers: { authorization: `Bearer ${sa.token}`, "content-type": "application/json" } });
    expect(res.status).toBe(413);
    expect((await sql()`SELECT count(*)::int AS n FROM users WHERE name = 'big'`)[0]!.n).toBe(0);
  });

  test("a 100 KB string where a short one is expected is a 422 naming the field", async () => {
    for (const [path, body, field] of [
      ["/users", { name: HUGE }, "name"],
      ["/users", { name: "huge-desc", description: HUGE }, "description"],
      ["/login", { name: HUGE, password: "x" }, "name"],
      ["/hosts", { name: "h", address: HUGE }, "address"],
    ] as const) {
      const r = path === "/login" ? await api.anonymous.post(path, body) : await sa.post(path, body);
      expect([path, field, r.status, r.body.error.field]).toEqual([path, field, 422, field]);
    }
  });

  test("NUL characters are refused, not stored or crashed on", async () => {
    for (const [path, body] of [["/users", { name: "a\u0000b" }], ["/osfs", { name: "n", description: "a\u0000b" }]] as const) {
      const r = await sa.post(path, body);
      expect(r.status).toBe(422);
      expect(r.body.error.message).toContain("NUL");
    }
    expect((await sa.get("/users?name=%00")).status).toBe(422);
  });
});

test("SQL and path fragments in valid fields are stored verbatim, and match only themselves in filters", async () => {
  const osf = await targets.osf();
  for (const s of [...SQL_FRAGMENTS, "../../etc/passwd", "%00", "%_\\"]) {
    const r = await sa.patch(`/osfs/${osf}`, { description: s });
    expect(r.status).toBe(200);
    expect(r.body.description).toBe(s);
    const found = await sa.get(`/osfs?description=${encodeURIComponent(s)}`);
    expect(found.body.items.map((o: any) => o.id)).toContain(osf);
    expect(found.body.items.every((o: any) => o.description === s)).toBe(true);
  }
  // The fragment is a value, not a condition: it matches only what holds exactly it.
  const tautology = (await sa.get(`/osfs?description=${encodeURIComponent("' OR 1=1 --")}`)).body.total;
  expect(tautology).toBe((await sql()`SELECT count(*)::int AS n FROM osfs WHERE description = ${"' OR 1=1 --"}`)[0]!.n);
  expect(tautology).toBeLessThan((await sa.get("/osfs")).body.total);
});

describe("afterwards", () => {
  test("no 5xx at all, and the database is intact", async () => {
    expect(outcomes.length).toBeGreaterThan(2500);
    expect(outcomes.filter((o) => o.status >= 500)).toEqual([]);
    const [{ n }] = (await sql()`SELECT count(*)::int AS n FROM pg_tables WHERE schemaname = 'public' AND tablename IN ('users', 'vms', 'administrators', 'audit_log')`) as unknown as [{ n: number }];
    expect(n).toBe(4);
    // The audit log of all this can still be read through the API.
    const audit = await sa.get("/audit?limit=10000&sort=-id");
    expect(audit.status).toBe(200);
    expect(audit.body.total).toBeGreaterThan(1000);
    expect((await sa.get("/session")).status).toBe(200);
  });
});
