// Disk image upload through the API: streamed to disk with a checksum, progress visible
// meanwhile, limits and failures leave no partial file and a readable reason.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { createHash } from "node:crypto";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { run } from "../src/run.ts";
import { useTestApi } from "./support/api.ts";
import { useTestDatabase } from "./support/db.ts";

const db = useTestDatabase();
const images = mkdtempSync("/tmp/qvd-images-");
const { api, sa: admin } = useTestApi(db, {
  "path.storage.images": images,
  "api.upload.max_bytes": String(8 * 1024 * 1024),
});
let osfId: number;

beforeAll(async () => {
  osfId = (await admin.post("/osfs", { name: "upload-osf" })).body.id;
});
afterAll(() => {
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
  return admin.request(`/dis/${diId}/image`, {
    method: "PUT",
    headers: { "content-type": "application/octet-stream", ...headers },
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
  let res = await admin.request(`/dis/${id}/image`, {
    method: "PUT",
    headers: { "content-type": "application/octet-stream" },
    body: new Blob([chunk(9 * 1024 * 1024, 1)]),
  });
  expect(res.status).toBe(413);
  expect((await admin.get(`/dis/${id}`)).body.state).toBe("new");
  // Without a length announced, the limit stops the stream itself.
  res = await putImage(
    id,
    Array.from({ length: 9 }, () => chunk(1 << 20, 5)),
  );
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

describe("an image is of its OSF's hypervisor's kind", () => {
  let kvmOsf: number;
  const work = mkdtempSync("/tmp/qvd-qcow2-");
  const qemuImg = (...args: string[]) => run(["qemu-img", ...args]);
  /** A real qcow2 file made by qemu-img (extra: its create options). */
  async function qcow2(name: string, ...extra: string[]): Promise<Uint8Array> {
    await qemuImg("create", "-q", "-f", "qcow2", ...extra, join(work, name), "16M");
    return readFileSync(join(work, name));
  }
  const newKvmDi = async (path: string) => {
    const r = await admin.post("/dis", { osf_id: kvmOsf, path });
    expect(r.status).toBe(201);
    return r.body.id as number;
  };
  /** The upload is refused with 422 and `message`, the image is failed with it, and no file is left. */
  async function refused(id: number, path: string, bytes: Uint8Array, message: string | RegExp) {
    const res = await putImage(id, [bytes]);
    const body = await res.json();
    expect([res.status, body.error.message]).toEqual([422, expect.stringMatching(message)]);
    const di = (await admin.get(`/dis/${id}`)).body;
    expect([di.state, di.state_message]).toEqual(["failed", expect.stringMatching(message)]);
    expect([existsSync(join(images, path)), existsSync(join(images, `${path}.part`))]).toEqual([false, false]);
  }

  beforeAll(async () => {
    kvmOsf = (await admin.post("/osfs", { name: "kvm-osf", hypervisor: "kvm", vcpus: 2 })).body.id;
  });
  afterAll(() => rmSync(work, { recursive: true, force: true }));

  test("a kvm OSF takes a qcow2: uploaded, checked and ready", async () => {
    const id = await newKvmDi("desk.qcow2");
    const file = await qcow2("whole.qcow2");
    const res = await putImage(id, [file.subarray(0, 3), file.subarray(3)]); // the magic split over two chunks
    expect(res.status).toBe(200);
    expect((await res.json()).state).toBe("ready");
    expect(readFileSync(join(images, "desk.qcow2")).equals(file)).toBe(true);
  });

  test("a kvm OSF refuses a tarball, a short file and other disk formats, naming what it got", async () => {
    const di = async (path: string) => [await newKvmDi(path), path] as const;
    const tgz = new Uint8Array([0x1f, 0x8b, 0x08, 0, ...new Uint8Array(2000)]);
    let [id, path] = await di("tarball.qcow2");
    await refused(
      id,
      path,
      tgz,
      /^disk image "[\d-]+" is for a kvm OSF \("kvm-osf"\): expected a qcow2 image, got a gzip file \(a tarball\?\)$/,
    );
    const tar = new Uint8Array(1024);
    tar.set(Buffer.from("ustar"), 257);
    [id, path] = await di("tar.qcow2");
    await refused(id, path, tar, /expected a qcow2 image, got a tar archive$/);
    // Fewer bytes than the magic: checked at the end of the upload.
    [id, path] = await di("short.qcow2");
    await refused(
      id,
      path,
      new Uint8Array([0x51, 0x46, 0x49]),
      /expected a qcow2 image, got a file starting with the bytes 51 46 49$/,
    );
    [id, path] = await di("vmdk.qcow2");
    await refused(
      id,
      path,
      new Uint8Array([...Buffer.from("KDMV"), ...new Uint8Array(600)]),
      /expected a qcow2 image, got a VMDK image$/,
    );
    // A refused image takes a good file afterwards.
    const ok = await putImage(id, [await qcow2("again.qcow2")]);
    expect([ok.status, (await ok.json()).state]).toEqual([200, "ready"]);
  });

  test("an lxc OSF refuses a qcow2", async () => {
    const id = await newDi("not-a-tarball.tar.gz");
    await refused(
      id,
      "not-a-tarball.tar.gz",
      await qcow2("for-lxc.qcow2"),
      /^disk image "[\d-]+" is for an lxc OSF \("upload-osf"\): expected a root filesystem tarball, got a qcow2 image/,
    );
  });

  test("a qcow2 with a backing file or an external data file is refused", async () => {
    const base = join(work, "base.qcow2");
    await qemuImg("create", "-q", "-f", "qcow2", base, "16M");
    let id = await newKvmDi("backed.qcow2");
    await refused(
      id,
      "backed.qcow2",
      await qcow2("backed.qcow2", "-b", base, "-F", "qcow2"),
      /^disk image "[\d-]+": the qcow2 has a backing file of its own/,
    );
    id = await newKvmDi("external.qcow2");
    await refused(
      id,
      "external.qcow2",
      await qcow2("external.qcow2", "-o", `data_file=${join(work, "external.raw")}`),
      /^disk image "[\d-]+": the qcow2 keeps its data in an external data file/,
    );
    // The messages never show where the API keeps its images.
    const di = (await admin.get(`/dis/${id}`)).body;
    expect(di.state_message).not.toContain(images);
  });

  test("a file with the magic but no valid qcow2 behind it is refused", async () => {
    const id = await newKvmDi("fake.qcow2");
    const fake = new Uint8Array(4096).fill(0xff);
    fake.set([0x51, 0x46, 0x49, 0xfb]);
    await refused(id, "fake.qcow2", fake, /^disk image "[\d-]+": not a valid qcow2 image/);
  });
});
