// KVM disk images on shared storage: a qcow2 under `images/`, used by every VM of its image as
// the read-only backing file of its overlay, and its kernel and initramfs, extracted once into
// `basefs/<di-id>/{vmlinuz,initrd.img}` for QEMU's direct kernel boot (src/virt/README.md "KVM
// images" has the guest contract).
//
// A qcow2 is a tenant's or an administrator's file: it is read as data, never trusted.
//  - The header is read here first (magic, version, backing file, external data file), so that no
//    tool ever opens a path a qcow2 names; `qemu-img` then runs with an explicit format (`-f
//    qcow2`: no probing) and only ever on an absolute path (no `json:` or protocol prefixes).
//  - The kernel and initramfs are read with debugfs from a raw copy (a sparse temporary file
//    beside basefs): nothing is mounted, no kernel filesystem code sees the tenant's bytes. Links
//    are resolved here, one component at a time; absolute links, links that climb above the
//    root, loops, names outside a plain character set and files over 256 MiB are refused.
//  - qemu-img and debugfs run as root without any capability (setpriv: empty bounding set, no
//    new privileges): they read and write files root owns, nothing else.
//  - Publishing is as for tarballs (src/virt/images.ts): a private temporary directory renamed
//    to `basefs/<di-id>` (the rename decides between nodes), a record `.meta-<di-id>.json` with
//    the qcow2's SHA-256 beside it, an flock on `basefs/.lock-<di-id>` to save work.
import {
  closeSync,
  existsSync,
  lstatSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  readSync,
  renameSync,
  rmSync,
  statfsSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { hostname } from "node:os";
import { isAbsolute, join } from "node:path";
import { logger } from "../log.ts";
import { CommandError, run } from "../run.ts";
import { sha256File } from "./image-build.ts";
import { basefsExists, ImageError, imageFileStat, lockFile } from "./images.ts";

const log = logger("kvm-image");

/** The first four bytes of every qcow2 file: "QFI\xfb". */
export const QCOW2_MAGIC = Buffer.from([0x51, 0x46, 0x49, 0xfb]);

/** The kernel and initramfs a guest boots may not be larger than this. */
export const MAX_BOOT_FILE = 256 * 1024 * 1024;

/** Links followed from /vmlinuz or /initrd.img before the image is refused as looping. */
const MAX_LINKS = 8;

function readHead(file: string, bytes: number): Buffer {
  const fd = openSync(file, "r");
  try {
    const buf = Buffer.alloc(bytes);
    const n = readSync(fd, buf, 0, bytes, 0);
    return buf.subarray(0, n);
  } finally {
    closeSync(fd);
  }
}

/** True when the file starts with the qcow2 magic. */
export function isQcow2(file: string): boolean {
  try {
    return readHead(file, 4).equals(QCOW2_MAGIC);
  } catch {
    return false;
  }
}

/** Runs a tool on a tenant's bytes as root without capabilities. */
const unprivileged = (argv: string[]) => [
  "setpriv",
  "--no-new-privs",
  "--inh-caps=-all",
  "--bounding-set=-all",
  "--",
  ...argv,
];

const lastLines = (err: unknown) =>
  err instanceof CommandError
    ? err.stderr
        .trim()
        .split("\n")
        .filter((l) => l.trim())
        .slice(-2)
        .join(" / ") || `exit status ${err.status}`
    : (err as Error).message;

/** What a qcow2's own header says, before any tool opens it. */
function checkHeader(file: string): void {
  const h = readHead(file, 112);
  if (h.length < 72) throw new ImageError(`${file}: not a valid qcow2 image: the header is truncated`);
  const version = h.readUInt32BE(4);
  if (version !== 2 && version !== 3) throw new ImageError(`${file}: not a valid qcow2 image: version ${version}`);
  if (h.readBigUInt64BE(8) !== 0n)
    throw new ImageError(
      `${file}: the qcow2 has a backing file of its own; a KVM image must be whole (qemu-img convert -O qcow2 makes one)`,
    );
  if (version === 3) {
    if (h.length < 104) throw new ImageError(`${file}: not a valid qcow2 image: the header is truncated`);
    const incompatible = h.readBigUInt64BE(72);
    if (incompatible & 4n)
      throw new ImageError(
        `${file}: the qcow2 keeps its data in an external data file; a KVM image must be whole (qemu-img convert -O qcow2 makes one)`,
      );
    if (incompatible & 2n) throw new ImageError(`${file}: the qcow2 is marked corrupt`);
  }
  if (h.readUInt32BE(32) !== 0)
    throw new ImageError(`${file}: the qcow2 is encrypted; a KVM image must be readable by the node`);
}

/**
 * Checks a KVM image: a qcow2 (the magic), no backing file, no external data file, not
 * encrypted, not corrupt (`qemu-img info` and, unless `check: false`, `qemu-img check`). Throws
 * an ImageError saying why; returns the disk's virtual size in bytes.
 */
export async function inspectQcow2(
  file: string,
  o: { qemuImg?: string; check?: boolean } = {},
): Promise<{ virtualSize: number; allocatedBytes: number }> {
  // qemu-img reads "json:{…}" and "proto:…" names as options: only absolute paths reach it.
  if (!isAbsolute(file)) throw new ImageError(`${file}: an image path must be absolute`);
  imageFileStat(file); // a clear error for a missing file or one that is not a regular file
  if (!isQcow2(file)) {
    const h = readHead(file, 512);
    const tarball =
      (h[0] === 0x1f && h[1] === 0x8b) ||
      h.subarray(257, 262).toString("latin1") === "ustar" ||
      (h.length >= 4 && h.readUInt32LE(0) === 0xfd2fb528) ||
      h.subarray(0, 6).toString("latin1") === "\xfd7zXZ\0";
    throw new ImageError(
      `${file}: not a qcow2 disk image${tarball ? " (it looks like a root filesystem tarball: an image for LXC)" : ""}; a KVM image is a qcow2 file (qvd di build --kvm makes one)`,
    );
  }
  checkHeader(file);
  const qemuImg = o.qemuImg ?? "qemu-img";
  // -U: a running VM may hold the image's lock; this only reads it.
  let info: Record<string, unknown>;
  try {
    info = JSON.parse(
      (await run(unprivileged([qemuImg, "info", "--output=json", "-U", "-f", "qcow2", file]), { env: { LC_ALL: "C" } }))
        .stdout,
    );
  } catch (err) {
    throw new ImageError(`${file}: not a valid qcow2 image: ${lastLines(err)}`);
  }
  if (info["backing-filename"] !== undefined)
    throw new ImageError(
      `${file}: the qcow2 has a backing file of its own (${String(info["backing-filename"])}); a KVM image must be whole`,
    );
  const data = ((info["format-specific"] as { data?: Record<string, unknown> } | undefined)?.data ?? {}) as Record<
    string,
    unknown
  >;
  if (data["data-file"] !== undefined)
    throw new ImageError(
      `${file}: the qcow2 keeps its data in an external data file (${String(data["data-file"])}); a KVM image must be whole`,
    );
  if (data.corrupt === true) throw new ImageError(`${file}: the qcow2 is marked corrupt`);
  if (info.encrypted === true)
    throw new ImageError(`${file}: the qcow2 is encrypted; a KVM image must be readable by the node`);
  const virtualSize = Number(info["virtual-size"]);
  if (!Number.isSafeInteger(virtualSize) || virtualSize <= 0) throw new ImageError(`${file}: the qcow2 has no size`);
  const clusterSize = Number(info["cluster-size"]);
  let allocatedBytes = virtualSize;
  if (o.check !== false) {
    // Metadata only (refcounts, L1/L2 tables): about a second for a desktop image.
    const res = await run(unprivileged([qemuImg, "check", "-U", "-f", "qcow2", "--output=json", file]), {
      env: { LC_ALL: "C" },
      allowFail: true,
    });
    let r: { corruptions?: number; "check-errors"?: number; "allocated-clusters"?: number } = {};
    try {
      r = JSON.parse(res.stdout);
    } catch {}
    if (res.status !== 0 && res.status !== 3)
      throw new ImageError(
        `${file}: the qcow2 is damaged: ${res.stderr.trim().split("\n").slice(-2).join(" / ") || `qemu-img check exited with ${res.status}`}`,
      );
    if ((r.corruptions ?? 0) > 0 || (r["check-errors"] ?? 0) > 0)
      throw new ImageError(
        `${file}: the qcow2 is damaged: ${r.corruptions ?? 0} corruptions, ${r["check-errors"] ?? 0} check errors`,
      );
    // An image without data has no "allocated-clusters" at all.
    const allocated = Number(r["allocated-clusters"] ?? 0) * clusterSize;
    if (Number.isSafeInteger(allocated) && allocated >= 0) allocatedBytes = Math.min(allocated, virtualSize);
  }
  return { virtualSize, allocatedBytes };
}

// --- reading files of the image's filesystem ---------------------------------------------------------

interface Stat {
  ino: number;
  type: string;
  size: number;
  link?: string;
}

/** Names followed inside an image: nothing debugfs could read as quoting or a second argument. */
const SAFE_NAME = /^[A-Za-z0-9._+~@-]+$/;

async function debugfs(raw: string, request: string, cwd?: string): Promise<{ out: string; errors: string[] }> {
  const res = await run(unprivileged(["debugfs", "-R", request, raw]), { env: { LC_ALL: "C" }, cwd, allowFail: true });
  // debugfs exits 0 after a failed request; what went wrong is on stderr after its banner.
  const errors = res.stderr.split("\n").filter((l) => l.trim() && !/^debugfs \d/.test(l));
  if (res.status !== 0 && !errors.length) errors.push(`debugfs exited with ${res.status}`);
  return { out: res.stdout, errors };
}

async function statIn(raw: string, path: string, cwd: string): Promise<Stat | undefined> {
  const { out, errors } = await debugfs(raw, `stat ${path}`);
  if (errors.some((e) => /not found|No such file/i.test(e))) return undefined;
  if (errors.length) throw new ImageError(`cannot read ${path} in the image: ${errors.join(" / ")}`);
  const ino = Number(/^Inode: (\d+)/m.exec(out)?.[1]);
  const type = /Type: (\w+)/.exec(out)?.[1] ?? "";
  const size = Number(/\bSize: (\d+)/.exec(out)?.[1]);
  if (!Number.isSafeInteger(ino) || !type || !Number.isSafeInteger(size))
    throw new ImageError(`cannot read ${path} in the image: unexpected debugfs output`);
  const st: Stat = { ino, type, size };
  if (type === "symlink") {
    const fast = /^Fast link dest: "(.*)"$/m.exec(out);
    if (fast) st.link = fast[1];
    else {
      if (size > 4096) throw new ImageError(`${path} in the image is a link of ${size} bytes`);
      const tmp = `.link-${ino}`;
      await debugfs(raw, `dump <${ino}> ${tmp}`, cwd);
      try {
        st.link = readFileSync(join(cwd, tmp), "latin1");
      } catch {
        throw new ImageError(`cannot read the link ${path} in the image`);
      } finally {
        rmSync(join(cwd, tmp), { force: true });
      }
    }
  }
  return st;
}

/**
 * Resolves `path` inside the image's filesystem the way the guest would, but stricter: only
 * relative links, never above the root, at most MAX_LINKS of them; every directory on the way is
 * checked to be a directory before debugfs is given a path through it (so debugfs itself never
 * follows a link). Returns the regular file's inode and size.
 */
async function resolveIn(raw: string, path: string, cwd: string): Promise<{ ino: number; size: number; path: string }> {
  const dir: string[] = [];
  let todo = path.split("/").filter(Boolean);
  let links = 0;
  while (todo.length) {
    const c = todo.shift()!;
    if (c === ".") continue;
    if (c === "..") {
      if (!dir.length) throw new ImageError(`${path} in the image leads above its root`);
      dir.pop();
      continue;
    }
    if (!SAFE_NAME.test(c))
      throw new ImageError(`${path} in the image leads to a name with unusual characters (${JSON.stringify(c)})`);
    const p = "/" + [...dir, c].join("/");
    const st = await statIn(raw, p, cwd);
    if (!st) throw new ImageError(`the image has no ${path}${p !== path ? ` (${p} is missing)` : ""}`);
    if (st.type === "symlink") {
      if (++links > MAX_LINKS) throw new ImageError(`${path} in the image: too many links (a loop?)`);
      const t = st.link ?? "";
      if (t.startsWith("/"))
        throw new ImageError(
          `${path} in the image is an absolute link (${JSON.stringify(t)}); only relative links inside the image are followed`,
        );
      if (!t || t.length > 4095) throw new ImageError(`${path} in the image is an empty or overlong link`);
      todo = [...t.split("/").filter(Boolean), ...todo];
      continue;
    }
    if (todo.length === 0) {
      if (st.type !== "regular") throw new ImageError(`${path} in the image is not a regular file (${p}: ${st.type})`);
      if (st.size > MAX_BOOT_FILE)
        throw new ImageError(`${path} in the image is ${st.size} bytes, more than ${MAX_BOOT_FILE} (256 MiB)`);
      return { ino: st.ino, size: st.size, path: p };
    }
    if (st.type !== "directory")
      throw new ImageError(`${path} in the image leads through ${p}, which is not a directory`);
    dir.push(c);
  }
  throw new ImageError(`${path} in the image leads to its root directory`);
}

/** Copies a regular file (by inode) out of the raw filesystem into `cwd/name`. */
async function dumpFile(
  raw: string,
  f: { ino: number; size: number; path: string },
  cwd: string,
  name: string,
): Promise<void> {
  const { errors } = await debugfs(raw, `dump <${f.ino}> ${name}`, cwd);
  let got = -1;
  try {
    got = lstatSync(join(cwd, name)).size;
  } catch {}
  if (errors.length || got !== f.size)
    throw new ImageError(
      `cannot copy ${f.path} out of the image${errors.length ? `: ${errors.join(" / ")}` : ` (${got} of ${f.size} bytes)`}`,
    );
}

/** A Linux x86 boot image (bzImage): "HdrS" at 0x202. */
function isBzImage(file: string): boolean {
  const h = readHead(file, 0x206);
  return h.length === 0x206 && h.subarray(0x202, 0x206).toString("latin1") === "HdrS";
}

// --- preparing an image on shared storage ---------------------------------------------------------------

export interface PrepareKvmOptions {
  /** The qcow2 (images/<dis.path>), an absolute path. */
  image: string;
  /** `<path.storage.root>/basefs`. */
  basefsDir: string;
  diId: number;
  /** Expected SHA-256 (hex) of the qcow2, from the DB. */
  sha256?: string | null;
  qemuImg?: string;
  /** Stops waiting for another node's preparation of this image. */
  signal?: AbortSignal;
  /** wait: another process prepares it; verify: checksum and qcow2 checks; convert: raw copy; extract: kernel and initramfs. */
  onProgress?: (p: { phase: string }) => void;
  /** Take the lock file (default true). */
  lock?: boolean;
}

export interface PreparedKvmImage {
  /** The qcow2 itself: the backing file of every VM's overlay. */
  image: string;
  kernel: string;
  initrd: string;
  /** True when it was prepared before (by this or another node). */
  skipped: boolean;
}

interface KvmMeta {
  kind: "kvm";
  di_id: number;
  image: string;
  sha256: string;
  bytes: number;
  virtual_size: number;
  kernel: string;
  initrd: string;
  prepared_at: string;
  host: string;
}

const metaFile = (basefsDir: string, diId: number) => join(basefsDir, `.meta-${diId}.json`);
const TMP = (diId: number) => new RegExp(`^\\.tmp-${diId}-kvm-(.+)-(\\d+)-[a-z0-9]+(\\.meta)?$`);
const tmpName = (basefsDir: string, diId: number) =>
  join(basefsDir, `.tmp-${diId}-kvm-${hostname()}-${process.pid}-${Math.random().toString(36).slice(2, 8)}`);

/** What a crashed preparation of this image left: this machine's when its process is gone, anyone's after a day. */
function removeLeftovers(basefsDir: string, diId: number): void {
  const re = TMP(diId);
  for (const n of readdirSync(basefsDir)) {
    const m = re.exec(n);
    if (!m) continue;
    let dead: boolean;
    if (m[1] === hostname()) {
      try {
        process.kill(Number(m[2]), 0);
        dead = false;
      } catch (err) {
        dead = (err as NodeJS.ErrnoException).code !== "EPERM";
      }
    } else {
      try {
        dead = Date.now() - lstatSync(join(basefsDir, n)).ctimeMs > 86_400_000;
      } catch {
        continue;
      }
    }
    if (dead) rmSync(join(basefsDir, n), { recursive: true, force: true });
  }
}

function existing(
  basefsDir: string,
  diId: number,
  image: string,
  expected: string | null,
): PreparedKvmImage | undefined {
  const basefs = join(basefsDir, String(diId));
  if (!basefsExists(basefs)) return undefined;
  let meta: KvmMeta | undefined;
  try {
    meta = JSON.parse(readFileSync(metaFile(basefsDir, diId), "utf8")) as KvmMeta;
  } catch {}
  const kernel = join(basefs, "vmlinuz");
  const initrd = join(basefs, "initrd.img");
  if (!meta) {
    // Published, record not yet moved (its preparer is on it, or died in between): believe a whole pair.
    for (const n of readdirSync(basefsDir)) {
      if (!TMP(diId).test(n) || !n.endsWith(".meta")) continue;
      try {
        const t = JSON.parse(readFileSync(join(basefsDir, n), "utf8")) as KvmMeta;
        if (t.kind === "kvm") meta = t;
      } catch {}
    }
  }
  if (meta?.kind !== "kvm" || !existsSync(kernel) || !existsSync(initrd))
    throw new ImageError(
      `${basefs} does not hold a prepared KVM image (${meta && meta.kind !== "kvm" ? "it is an unpacked LXC image" : "no record, kernel or initramfs"}); remove it while no desktop uses it to prepare the image again`,
    );
  if (expected && meta.sha256 !== expected)
    throw new ImageError(
      `${basefs} was prepared from another file (sha256 ${meta.sha256}, expected ${expected}); remove it while no desktop uses it to prepare the image again`,
    );
  return { image, kernel, initrd, skipped: true };
}

/**
 * Prepares a KVM image once per shared storage (see the top of this file): checks the qcow2
 * (checksum, inspectQcow2) and extracts its /vmlinuz and /initrd.img into basefs/<di-id>/.
 * Returns at once (skipped) when that was done before. Throws an ImageError naming the file.
 */
export async function prepareKvmImage(o: PrepareKvmOptions): Promise<PreparedKvmImage> {
  const { image, basefsDir, diId } = o;
  if (!Number.isSafeInteger(diId) || diId < 0) throw new ImageError(`invalid image id ${diId}`);
  if (!isAbsolute(image)) throw new ImageError(`${image}: an image path must be absolute`);
  const expected = o.sha256?.toLowerCase() ?? null;
  if (expected !== null && !/^[0-9a-f]{64}$/.test(expected))
    throw new ImageError(`invalid expected sha256 for ${image}: ${o.sha256}`);
  mkdirSync(basefsDir, { recursive: true });
  const done = existing(basefsDir, diId, image, expected);
  if (done) return done;

  const lock =
    o.lock === false
      ? { release: () => {}, locked: false }
      : await lockFile(join(basefsDir, `.lock-${diId}`), o.signal, () => {
          log.info("waiting for another preparation of this image", { image, di: diId });
          o.onProgress?.({ phase: "wait" });
        });
  const tmp = tmpName(basefsDir, diId);
  try {
    const again = existing(basefsDir, diId, image, expected);
    if (again) return again;
    removeLeftovers(basefsDir, diId);
    const started = Date.now();
    o.onProgress?.({ phase: "verify" });
    let st;
    try {
      st = statSync(image);
    } catch (err) {
      throw new ImageError(
        `${image}: cannot read image: ${(err as NodeJS.ErrnoException).code === "ENOENT" ? "no such file" : (err as Error).message}`,
      );
    }
    if (!isQcow2(image)) await inspectQcow2(image, { qemuImg: o.qemuImg }); // says what it is instead
    const sha256 = await sha256File(image);
    if (expected !== null && sha256 !== expected)
      throw new ImageError(
        `${image}: checksum mismatch: sha256 is ${sha256}, expected ${expected}; nothing was prepared`,
      );
    const { virtualSize, allocatedBytes } = await inspectQcow2(image, { qemuImg: o.qemuImg });
    // The raw copy holds at most the allocated clusters (zeros stay holes); compressed clusters
    // may inflate far beyond the file's size: never fill the shared storage with them.
    const fsInfo = statfsSync(basefsDir);
    const free = Number(fsInfo.bavail) * Number(fsInfo.bsize);
    if (allocatedBytes + 256 * 1024 * 1024 > free)
      throw new ImageError(
        `${image}: its disk holds ${Math.ceil(allocatedBytes / 1048576)} MiB of data; reading its kernel needs that much free space beside ${basefsDir} (${Math.floor(free / 1048576)} MiB free)`,
      );

    mkdirSync(tmp, { mode: 0o755 });
    const raw = join(tmp, "disk.raw");
    o.onProgress?.({ phase: "convert" });
    try {
      // Sparse: only the filesystem's used blocks are written.
      await run(unprivileged([o.qemuImg ?? "qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", image, raw]), {
        env: { LC_ALL: "C" },
      });
    } catch (err) {
      throw new ImageError(`${image}: cannot read the qcow2: ${lastLines(err)}`);
    }
    o.onProgress?.({ phase: "extract" });
    const probe = await debugfs(raw, "stats");
    if (probe.errors.length)
      throw new ImageError(
        `${image}: the disk does not hold an ext4 filesystem on the whole disk (${probe.errors.slice(0, 2).join(" / ")}); qvd di build --kvm makes such an image`,
      );
    const named = async <T>(p: Promise<T>): Promise<T> => {
      try {
        return await p;
      } catch (err) {
        throw err instanceof ImageError ? new ImageError(`${image}: ${err.message}`) : err;
      }
    };
    const kernelIn = await named(resolveIn(raw, "/vmlinuz", tmp));
    const initrdIn = await named(resolveIn(raw, "/initrd.img", tmp));
    await named(dumpFile(raw, kernelIn, tmp, "vmlinuz"));
    await named(dumpFile(raw, initrdIn, tmp, "initrd.img"));
    rmSync(raw, { force: true });
    if (!isBzImage(join(tmp, "vmlinuz")))
      throw new ImageError(`${image}: /vmlinuz (${kernelIn.path}) is not a Linux kernel (no bzImage header)`);
    const after = statSync(image);
    if (after.size !== st.size || after.mtimeMs !== st.mtimeMs)
      throw new ImageError(`${image} changed while it was being prepared; try again`);

    const basefs = join(basefsDir, String(diId));
    const meta: KvmMeta = {
      kind: "kvm",
      di_id: diId,
      image,
      sha256,
      bytes: st.size,
      virtual_size: virtualSize,
      kernel: kernelIn.path,
      initrd: initrdIn.path,
      prepared_at: new Date().toISOString(),
      host: hostname(),
    };
    writeFileSync(`${tmp}.meta`, JSON.stringify(meta, null, 1) + "\n");
    try {
      renameSync(tmp, basefs);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code !== "ENOTEMPTY" && code !== "EEXIST") throw err;
      const theirs = existing(basefsDir, diId, image, expected); // another node won
      if (theirs) return theirs;
      throw err;
    }
    try {
      renameSync(`${tmp}.meta`, metaFile(basefsDir, diId));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
    }
    log.info("KVM image prepared", {
      image,
      basefs,
      kernel: kernelIn.path,
      initrd: initrdIn.path,
      seconds: ((Date.now() - started) / 1000).toFixed(1),
    });
    return { image, kernel: join(basefs, "vmlinuz"), initrd: join(basefs, "initrd.img"), skipped: false };
  } finally {
    rmSync(tmp, { recursive: true, force: true });
    rmSync(`${tmp}.meta`, { force: true });
    lock.release();
  }
}
