// Disk image upload: PUT /api/v1/dis/:id/image with the file as the raw body. The body is
// streamed to `<images>/<path>.part` (never held in memory) while its SHA-256 is computed and
// the progress is written to the image row about once a second; at the end the checksum is
// verified (when the client sent `X-QVD-SHA256`) and the file renamed into place. A failed
// upload leaves no file behind and the image in state `failed` with the reason.
//
// An image is of its OSF's hypervisor's kind: a kvm OSF takes only a qcow2 (checked on the first
// bytes, then with qemu-img: no backing file, no external data file, not encrypted or damaged),
// an lxc OSF takes a root filesystem tarball and never a qcow2.
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdir, open, rename, rm } from "node:fs/promises";
import { isAbsolute, join } from "node:path";
import * as D from "../db/index.ts";
import { DataError } from "../db/errors.ts";
import { logger } from "../log.ts";
import { ImageError } from "../virt/images.ts";
import { inspectQcow2, QCOW2_MAGIC } from "../virt/kvm-image.ts";
import type { Ctx, Route } from "./context.ts";
import { ApiError } from "./http.ts";
import { idParam } from "./resources.ts";

const log = logger("upload");

/** Enough of the file's start to tell a tar archive (its "ustar" mark sits at byte 257). */
const HEAD_BYTES = 512;

const startsWith = (b: Buffer, magic: number[] | Buffer) =>
  b.length >= magic.length && magic.every((x, i) => b[i] === x);

/** What a file's first bytes say it is, for messages ("a gzip file", "a qcow2 image"). */
export function describeHead(b: Buffer): string {
  if (b.length === 0) return "an empty file";
  if (startsWith(b, QCOW2_MAGIC)) return "a qcow2 image";
  if (startsWith(b, [0x1f, 0x8b])) return "a gzip file (a tarball?)";
  if (startsWith(b, [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00])) return "an xz file (a tarball?)";
  if (startsWith(b, [0x28, 0xb5, 0x2f, 0xfd])) return "a zstd file (a tarball?)";
  if (startsWith(b, [0x42, 0x5a, 0x68])) return "a bzip2 file (a tarball?)";
  if (b.length >= 262 && b.subarray(257, 262).toString("latin1") === "ustar") return "a tar archive";
  if (startsWith(b, Buffer.from("KDMV"))) return "a VMDK image";
  if (startsWith(b, Buffer.from("vhdxfile"))) return "a VHDX image";
  return `a file starting with the bytes ${[...b.subarray(0, 8)].map((x) => x.toString(16).padStart(2, "0")).join(" ")}`;
}

/**
 * A qcow2 that reads a file of its own elsewhere (a backing file, an external data file), or is
 * encrypted or damaged, is refused (src/virt/kvm-image.ts inspectQcow2, with cfg vm.kvm.qemu_img).
 * Without qemu-img here the header check of the node's image preparation is all there is.
 */
async function checkQcow2(file: string, di: { version: string }, qemuImg: string): Promise<void> {
  if (!(isAbsolute(qemuImg) ? existsSync(qemuImg) : Bun.which(qemuImg))) {
    log.warn("qemu-img is not installed here: an uploaded qcow2 is checked by the node that prepares it", {
      di: di.version,
      qemu_img: qemuImg,
    });
    return;
  }
  try {
    await inspectQcow2(file, { qemuImg });
  } catch (err) {
    if (!(err instanceof ImageError)) throw err;
    // Its messages name the file: the user knows the image by its version.
    throw new DataError(
      `disk image ${JSON.stringify(di.version)}: ${err.message
        .split(file)
        .join("the file")
        .replace(/^the file: /, "")}`,
      422,
    );
  }
}

/** Refuses a file whose first bytes are not of the OSF's hypervisor's kind (422). */
function checkKind(head: Buffer, di: { version: string }, osf: { name: string; hypervisor: string }): void {
  const isQcow2 = startsWith(head, QCOW2_MAGIC);
  const what = `disk image ${JSON.stringify(di.version)} is for ${osf.hypervisor === "lxc" ? "an" : "a"} ${osf.hypervisor} OSF (${JSON.stringify(osf.name)})`;
  if (osf.hypervisor === "kvm" && !isQcow2)
    throw new DataError(`${what}: expected a qcow2 image, got ${describeHead(head)}`, 422);
  if (osf.hypervisor !== "kvm" && isQcow2)
    throw new DataError(
      `${what}: expected a root filesystem tarball, got a qcow2 image (KVM images belong to an OSF with hypervisor kvm)`,
      422,
    );
}

async function upload(ctx: Ctx) {
  const diId = idParam(ctx);
  const max = ctx.cfg.get("api.upload.max_bytes");
  const lengthHeader = ctx.request.headers.get("content-length");
  const expected = lengthHeader !== null && /^\d+$/.test(lengthHeader) ? Number(lengthHeader) : null;
  if (expected !== null && expected > max)
    throw new ApiError(`the image is larger than the limit of ${max} bytes (api.upload.max_bytes)`, 413);
  const wantSha = ctx.request.headers.get("x-qvd-sha256")?.toLowerCase();
  if (wantSha !== undefined && !/^[0-9a-f]{64}$/.test(wantSha))
    throw new DataError("X-QVD-SHA256: expected 64 hex digits", 422, "sha256");
  if (!ctx.request.body) throw new DataError("the request has no body: send the image file", 422);

  const di = await D.claimDiUpload(ctx.sql, ctx.scope, diId, expected);
  // The OSF's hypervisor cannot change now: the OSF has this image (src/db/osfs.ts).
  const osf = await D.get(ctx.sql, D.osfs, ctx.scope, di.osf_id);
  ctx.audited.object_id = diId;
  ctx.audited.object_name = di.version;
  ctx.audited.tenant_id = di.tenant_id;
  ctx.audited.arguments = { path: di.path, bytes: expected, sha256: wantSha ?? null };
  const dir = ctx.cfg.storagePath("path.storage.images");
  const final = join(dir, di.path);
  const part = `${final}.part`;
  let received = 0;
  try {
    await mkdir(dir, { recursive: true });
    const fh = await open(part, "w", 0o640);
    const hash = createHash("sha256");
    let lastReport = Date.now();
    // The file's first bytes, until they are checked against the OSF's hypervisor.
    let head: Buffer | undefined = Buffer.alloc(0);
    try {
      const reader = ctx.request.body.getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        received += value.byteLength;
        if (received > max) {
          await reader.cancel();
          throw new ApiError(`the image is larger than the limit of ${max} bytes (api.upload.max_bytes)`, 413);
        }
        if (head) {
          head = Buffer.concat([head, value.subarray(0, HEAD_BYTES - head.length)]);
          if (head.length >= HEAD_BYTES) {
            try {
              checkKind(head, di, osf);
            } catch (err) {
              await reader.cancel(); // a wrong kind is known now: the rest is not read
              throw err;
            }
            head = undefined;
          }
        }
        hash.update(value);
        // Awaiting each write keeps memory flat: the socket is not read while the disk is busy.
        await fh.write(value);
        if (Date.now() - lastReport > 1000) {
          lastReport = Date.now();
          await D.setDiProgress(ctx.sql, diId, expected ? received / expected : 0, `${received} bytes received`);
        }
      }
      await fh.sync();
    } finally {
      await fh.close();
    }
    if (expected !== null && received !== expected)
      throw new DataError(`the upload ended after ${received} of ${expected} bytes`, 400);
    if (head) checkKind(head, di, osf); // a file shorter than HEAD_BYTES
    if (osf.hypervisor === "kvm") await checkQcow2(part, di, ctx.cfg.get("vm.kvm.qemu_img"));
    const sha = hash.digest("hex");
    if (wantSha && sha !== wantSha)
      throw new DataError(`checksum mismatch: the file's SHA-256 is ${sha}, not ${wantSha}`, 422, "sha256");
    await rename(part, final);
    await D.finishDiUpload(ctx.sql, diId, received, sha);
    log.info("image uploaded", { di: diId, bytes: received, sha256: sha });
    return D.get(ctx.sql, D.dis, ctx.scope, diId);
  } catch (err) {
    await rm(part, { force: true }).catch(() => {});
    const why = err instanceof DataError ? err.message : `the upload failed: ${(err as Error).message}`;
    await D.failDiUpload(ctx.sql, diId, why).catch(() => {});
    if (err instanceof DataError) throw err;
    log.error("upload failed", { di: diId, error: (err as Error).message });
    throw new ApiError(
      `${why} (the image is marked failed; upload it again)`,
      (err as NodeJS.ErrnoException).code === "ENOSPC" ? 507 : 500,
    );
  }
}

export const UPLOAD_ROUTES: Route[] = [
  {
    method: "PUT",
    path: "/dis/:id/image",
    tag: "dis",
    acl: ["di.create"],
    rawBody: true,
    summary:
      "Upload the image file of a new (or failed) disk image as the raw body; optional header X-QVD-SHA256 to verify. GET /dis/:id shows the progress meanwhile.",
    audit: { action: "di.upload", object: "di" },
    handler: upload,
  },
];
