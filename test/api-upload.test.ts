// Disk image upload through the API: streamed to disk with a checksum, progress visible
// meanwhile, limits and failures leave no partial file and a readable reason.
import { afterAll, beforeAll, expect, test } from "bun:test";
import { createHash } from "node:crypto";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { startTestApi, type ApiClient, type TestApi } from "./support/api.ts";
import { TEST_ADMIN, useTestDatabase } from "./support/db.ts";

const db = useTestDatabase();
const images = mkdtempSync("/tmp/qvd-images-");
let api: TestApi;
let admin: ApiClient;
let osfId: number;

beforeAll(async () => {
  api = await startTestApi(db(), { "path.storage.images": images, "api.upload.max_bytes": String(8 * 1024 * 1024) });
  admin = await api.login(TEST_ADMIN.name, TEST_ADMIN.password);
  osfId = (await admin.post("/osfs", { name: "upload-osf" })).body.id;
});
afterAll(async () => {
  await api.stop();
  rmSync(images, { recursive: true, force: true });
});

async function newDi(path: string): Promise<number> {
  const r = await admin.post("/dis", { osf_id: osfId, path });
  expect(r.status).toBe(201);
  expect(r.body.state).toBe("new");
  return r.body.id;
}

/** PUTs `chunks` as a streamed body, pausing `pauseMs` between chunks. */
function putImage(diId: number, chunks: Uint8Array[], headers: Record<string, string> = {}, pauseMs = 0) {
  const body = new ReadableStream<Uint8Array>({
    async start(c) {
      for (const ch of chunks) {
        c.enqueue(ch);
        if (pauseMs) await Bun.sleep(pauseMs);
      }
      c.close();
    },
  });
  return fetch(`${api.url}/dis/${diId}/image`, {
    method: "PUT",
    headers: { authorization: `Bearer ${admin.token}`, "content-type": "application/octet-stream", ...headers },
    body,
  });
}

const chunk = (n: number, fill: number) => new Uint8Array(n).fill(fill);

test("an upload streams to the images folder, with its checksum, and the image becomes ready", async () => {
  const id = await newDi("desktop-1.tar");
  const chunks = [chunk(1 << 20, 1), chunk(1 << 20, 2), chunk(123, 3)];
  const all = Buffer.concat(chunks);
  const sha = createHash("sha256").update(all).digest("hex");
  const total = String(all.byteLength);

  // Watch the image while the upload runs: it is `uploading`, with progress.
  const seen: { state: string; progress: number }[] = [];
  let done = false;
  const watcher = (async () => {
    while (!done) {
      const r = await admin.get(`/dis/${id}`);
      seen.push({ state: r.body.state, progress: r.body.progress });
      await Bun.sleep(200);
    }
  })();
  const res = await putImage(id, chunks, { "x-qvd-sha256": sha, "content-length": total }, 1300);
  done = true;
  await watcher;
  const body = await res.json();
  expect(res.status).toBe(200);
  expect(body).toMatchObject({ state: "ready", progress: 1, sha256: sha, size_bytes: all.byteLength });
  expect(seen.some((s) => s.state === "uploading" && s.progress > 0 && s.progress < 1)).toBe(true);
  expect(readFileSync(join(images, "desktop-1.tar")).equals(all)).toBe(true);
  expect(readdirSync(images).filter((f) => f.endsWith(".part"))).toEqual([]);

  // A ready image does not take another file.
  const again = await putImage(id, [chunk(10, 9)]);
  expect(again.status).toBe(409);
  expect(readFileSync(join(images, "desktop-1.tar")).equals(all)).toBe(true);

  const audit = await admin.get(`/audit?action=di.upload&object_id=${id}`);
  expect(audit.body.items[0]).toMatchObject({ ok: true, object_type: "di" });
});

test("a checksum mismatch fails the image, keeps no file, and a new upload can follow", async () => {
  const id = await newDi("desktop-2.tar");
  const res = await putImage(id, [chunk(1000, 7)], { "x-qvd-sha256": "0".repeat(64) });
  expect(res.status).toBe(422);
  expect((await res.json()).error.message).toContain("checksum mismatch");
  const di = (await admin.get(`/dis/${id}`)).body;
  expect(di.state).toBe("failed");
  expect(di.state_message).toContain("checksum mismatch");
  expect(existsSync(join(images, "desktop-2.tar"))).toBe(false);
  expect(existsSync(join(images, "desktop-2.tar.part"))).toBe(false);

  const ok = await putImage(id, [chunk(1000, 7)]);
  expect(ok.status).toBe(200);
  expect((await ok.json()).state).toBe("ready");
});

test("an image over the size limit is refused, before or during the upload", async () => {
  const id = await newDi("too-big.tar");
  // Announced too large: refused before the body is read.
  let res = await fetch(`${api.url}/dis/${id}/image`, {
    method: "PUT",
    headers: { authorization: `Bearer ${admin.token}`, "content-type": "application/octet-stream" },
    body: new Blob([chunk(9 * 1024 * 1024, 1)]),
  });
  expect(res.status).toBe(413);
  expect((await admin.get(`/dis/${id}`)).body.state).toBe("new");
  // Without a length announced, the limit stops the stream itself.
  res = await putImage(id, Array.from({ length: 9 }, () => chunk(1 << 20, 5)));
  expect(res.status).toBe(413);
  expect((await admin.get(`/dis/${id}`)).body.state).toBe("failed");
  expect(existsSync(join(images, "too-big.tar.part"))).toBe(false);
});

test("uploads need di.create, and bad checksum headers are rejected", async () => {
  const id = await newDi("acl.tar");
  const anon = await fetch(`${api.url}/dis/${id}/image`, { method: "PUT", body: "x" });
  expect(anon.status).toBe(401);
  const bad = await putImage(id, [chunk(10, 1)], { "x-qvd-sha256": "xyz" });
  expect(bad.status).toBe(422);
  expect((await admin.get(`/dis/${id}`)).body.state).toBe("new");
  expect((await putImage(999999, [chunk(1, 1)])).status).toBe(404);
});
