// Disk image upload: PUT /api/v1/dis/:id/image with the file as the raw body. The body is
// streamed to `<images>/<path>.part` (never held in memory) while its SHA-256 is computed and
// the progress is written to the image row about once a second; at the end the checksum is
// verified (when the client sent `X-QVD-SHA256`) and the file renamed into place. A failed
// upload leaves no file behind and the image in state `failed` with the reason.
import { createHash } from "node:crypto";
import { mkdir, open, rename, rm } from "node:fs/promises";
import { join } from "node:path";
import * as D from "../db/index.ts";
import { DataError } from "../db/errors.ts";
import { logger } from "../log.ts";
import type { Ctx, Route } from "./context.ts";
import { ApiError } from "./http.ts";
import { idParam } from "./resources.ts";

const log = logger("upload");

async function upload(ctx: Ctx) {
  const diId = idParam(ctx);
  const max = ctx.cfg.get("api.upload.max_bytes");
  const lengthHeader = ctx.request.headers.get("content-length");
  const expected = lengthHeader !== null && /^\d+$/.test(lengthHeader) ? Number(lengthHeader) : null;
  if (expected !== null && expected > max) throw new ApiError(`the image is larger than the limit of ${max} bytes (api.upload.max_bytes)`, 413);
  const wantSha = ctx.request.headers.get("x-qvd-sha256")?.toLowerCase();
  if (wantSha !== undefined && !/^[0-9a-f]{64}$/.test(wantSha)) throw new DataError("X-QVD-SHA256: expected 64 hex digits", 422, "sha256");
  if (!ctx.request.body) throw new DataError("the request has no body: send the image file", 422);

  const di = await D.claimDiUpload(ctx.sql, ctx.scope, diId, expected);
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
    if (expected !== null && received !== expected) throw new DataError(`the upload ended after ${received} of ${expected} bytes`, 400);
    const sha = hash.digest("hex");
    if (wantSha && sha !== wantSha) throw new DataError(`checksum mismatch: the file's SHA-256 is ${sha}, not ${wantSha}`, 422, "sha256");
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
    throw new ApiError(`${why} (the image is marked failed; upload it again)`, (err as NodeJS.ErrnoException).code === "ENOSPC" ? 507 : 500);
  }
}

export const UPLOAD_ROUTES: Route[] = [
  {
    method: "PUT", path: "/dis/:id/image", tag: "dis", acl: ["di.create"], rawBody: true,
    summary: "Upload the image file of a new (or failed) disk image as the raw body; optional header X-QVD-SHA256 to verify. GET /dis/:id shows the progress meanwhile.",
    audit: { action: "di.upload", object: "di" },
    handler: upload,
  },
];
