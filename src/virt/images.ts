// Disk images (DIs) on shared storage: a tarball of a root filesystem under `images/`, unpacked
// once per image into `basefs/<di-id>/`, the read-only lower layer of every VM's overlay.
//
// unpackImage() is safe to call from any number of HKDs at once, on one node or many, on
// shared storage (NFS) as well as a local disk:
//  - The archive is unpacked into a private `basefs/.tmp-<di-id>-<owner>-<pid>-<random>`
//    directory and published by one rename to `basefs/<di-id>`. A rename onto an existing,
//    non-empty basefs fails (also on NFS, where the server decides it), so exactly one unpacker
//    wins; the others discard their copy and use the winner's. A basefs is therefore always
//    whole or absent: a crash before the rename leaves only a temporary directory, which is
//    never taken for an image and is removed later (at once when its process is known dead).
//  - The basefs's record (`.meta-<di-id>.json`: checksum, id map, inode) is written under the
//    temporary name first and moved beside the basefs after the publish; a reader that finds
//    the basefs without it takes the temporary record whose inode is the basefs's, so a crash
//    between the two renames loses nothing, and a record left by an older basefs is not
//    believed.
//  - An flock on `basefs/.lock-<di-id>` is an optimisation only (a second caller waits instead
//    of unpacking too); storage where locks do not reach every node stays correct without it.
//  - The archive is read twice: once through SHA-256 and `tar -t` (checksum and listing), and,
//    only when both are good, through SHA-256 and `tar -x`. The second hash must equal the
//    first, so what is extracted is what was checked even if the file changes meanwhile.
//  - Before anything is extracted, every entry is checked (checkEntries): no absolute names,
//    no `..` in names or hard-link targets, no entry below a symlink of the archive, no
//    relative symlink that climbs above the root. Absolute symlinks are allowed: a root
//    filesystem has many (/etc/alternatives/…), and they point into the guest's own root
//    once it runs. Host code must therefore never follow links inside a basefs or rootfs
//    (resolve paths below the root, or check with lstat). Device nodes are skipped with a
//    note (LXC gives the guest its own /dev).
//  - With an id map (the node's vm.lxc.idmap.*, as the HKD passes it), tar runs inside a user
//    namespace with that map (lxc-usernsexec): every file lands owned by base+its id, an owner
//    outside the range is refused, and the extraction itself has no privilege on the node.
//    Setuid bits are kept (they mean the guest's root, i.e. an unprivileged node uid); only
//    `user.*` xattrs are restored, so no file capability, `trusted.*` (overlayfs' own) or
//    security label of an image reaches storage. basefs/ is root:<base gid> 0710: the
//    desktops' mapped root may cross it, node users may not, so nothing on it runs for them.
import {
  chmodSync,
  chownSync,
  closeSync,
  existsSync,
  lstatSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  readSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import type { Stats } from "node:fs";
import { hostname } from "node:os";
import { dirname, join } from "node:path";
import { UserError } from "../errors.ts";
import { logger } from "../log.ts";
import { CommandError, run } from "../run.ts";

const log = logger("images");

/** File name endings of image tarballs (the compression is detected from the content). */
export const IMAGE_SUFFIXES = [
  ".tar",
  ".tar.gz",
  ".tgz",
  ".tar.xz",
  ".txz",
  ".tar.zst",
  ".tzst",
  ".tar.bz2",
  ".tbz2",
  ".tbz",
] as const;

export const isImageFileName = (name: string) => IMAGE_SUFFIXES.some((s) => name.endsWith(s));

/** Storage paths of an image: its tarball and its unpacked base filesystem. */
export function imagePaths(
  storageRoot: string,
  imagesDir: string,
  di: { id: number; path: string },
): { image: string; basefsDir: string; basefs: string } {
  const basefsDir = join(storageRoot, "basefs");
  return { image: join(imagesDir, di.path), basefsDir, basefs: join(basefsDir, String(di.id)) };
}

export class ImageError extends UserError {
  constructor(message: string) {
    super(message);
    this.name = "ImageError";
  }
}

// --- archive listing and checks -----------------------------------------------------------------

export type EntryType = "file" | "dir" | "symlink" | "hardlink" | "fifo" | "chardev" | "blockdev";

export interface TarEntry {
  /** Name as stored in the archive (bytes as latin1 characters, exactly as tar knows it). */
  name: string;
  type: EntryType;
  /** Symlink target or hard-link target (another member's name). */
  link?: string;
  mode: string;
  /** Numeric owner as the archive stores it (absent in hand-made entries). */
  uid?: number;
  gid?: number;
}

/** A node's subordinate id range for desktops: guest id N is node id base+N, for N < size. */
export interface IdMap {
  base: number;
  size: number;
}

const TYPES: Record<string, EntryType> = {
  "-": "file",
  C: "file",
  d: "dir",
  l: "symlink",
  h: "hardlink",
  p: "fifo",
  c: "chardev",
  b: "blockdev",
};

/** Decodes a name printed by tar --quoting-style=c; returns bytes as latin1 characters. */
function unquoteC(q: string): string {
  const s = q.slice(1, -1);
  let out = "";
  for (let i = 0; i < s.length; i++) {
    const ch = s[i]!;
    if (ch !== "\\") {
      out += ch;
      continue;
    }
    const n = s[++i]!;
    const simple: Record<string, string> = {
      a: "\x07",
      b: "\b",
      f: "\f",
      n: "\n",
      r: "\r",
      t: "\t",
      v: "\v",
      "\\": "\\",
      '"': '"',
      "?": "?",
      "'": "'",
    };
    if (n in simple) out += simple[n];
    else if (/[0-7]/.test(n)) {
      let digits = n;
      while (digits.length < 3 && /[0-7]/.test(s[i + 1] ?? "")) digits += s[++i];
      out += String.fromCharCode(parseInt(digits, 8) & 0xff);
    } else out += n;
  }
  return out;
}

/** A name for messages: the archive's bytes read as UTF-8, quoted. */
export const showName = (latin1: string) => JSON.stringify(Buffer.from(latin1, "latin1").toString("utf8"));

const LINE = /^(\S)\S*\s[^"]*?("(?:[^"\\]|\\.)*")(?: (->|link to) ("(?:[^"\\]|\\.)*"))?$/;

/** Parses `LC_ALL=C tar -tv --quoting-style=c --numeric-owner -P` output. */
export function parseListing(text: string): TarEntry[] {
  const out: TarEntry[] = [];
  for (const line of text.split("\n")) {
    if (line === "") continue;
    const m = LINE.exec(line);
    const type = m ? TYPES[m[1]!] : undefined;
    if (!m || !type) throw new ImageError(`unsupported archive entry: ${line.slice(0, 200)}`);
    const e: TarEntry = { name: unquoteC(m[2]!), type, mode: line.slice(0, 10) };
    const owner = /^\S+\s+(\d+)\/(\d+)\s/.exec(line);
    if (owner) [e.uid, e.gid] = [Number(owner[1]), Number(owner[2])];
    if (m[4]) e.link = unquoteC(m[4]);
    if ((type === "symlink" || type === "hardlink") !== (m[4] !== undefined))
      throw new ImageError(`unsupported archive entry: ${line.slice(0, 200)}`);
    out.push(e);
  }
  return out;
}

const components = (p: string) => p.split("/").filter((c) => c !== "" && c !== ".");

/**
 * Refuses an archive that could write outside its root (throws an ImageError naming the
 * entry); returns the entries to skip (device nodes) with the reason.
 */
export function checkEntries(entries: TarEntry[]): { skip: TarEntry[] } {
  const symlinks = new Set<string>();
  const skipped = new Set<string>();
  const skip: TarEntry[] = [];
  const refuse = (e: TarEntry, why: string): never => {
    throw new ImageError(`unsafe archive entry ${showName(e.name)}: ${why}; nothing was extracted`);
  };
  const belowSymlink = (comps: string[]) => {
    for (let i = 1; i < comps.length; i++) {
      const prefix = comps.slice(0, i).join("/");
      if (symlinks.has(prefix)) return prefix;
    }
    return undefined;
  };
  for (const e of entries) {
    if (e.name.includes("\n")) refuse(e, "a newline in the name");
    if (e.name.startsWith("/")) refuse(e, "absolute path");
    const comps = components(e.name);
    if (comps.includes("..")) refuse(e, "'..' in the path");
    const via = belowSymlink(comps);
    if (via !== undefined) refuse(e, `it lies below the symlink ${showName(via)}`);
    if (comps.length === 0 && e.type !== "dir") refuse(e, "the archive root must be a directory");
    switch (e.type) {
      case "file":
      case "dir":
      case "fifo":
        break;
      case "chardev":
      case "blockdev":
        skip.push(e);
        skipped.add(comps.join("/"));
        break;
      case "hardlink": {
        const t = e.link ?? "";
        if (t.startsWith("/")) refuse(e, `hard link to the absolute path ${showName(t)}`);
        const tc = components(t);
        if (tc.length === 0 || tc.includes("..")) refuse(e, `hard link to ${showName(t)} outside the archive`);
        const tvia = belowSymlink(tc);
        if (tvia !== undefined) refuse(e, `hard link through the symlink ${showName(tvia)}`);
        if (skipped.has(tc.join("/"))) {
          skip.push(e); // a second name of a skipped device node
          skipped.add(comps.join("/"));
        }
        break;
      }
      case "symlink": {
        const t = e.link ?? "";
        if (t === "") refuse(e, "empty symlink target");
        if (!t.startsWith("/")) {
          // Resolved from the link's directory; it may not climb above the root.
          let depth = comps.length - 1;
          for (const c of components(t)) {
            depth += c === ".." ? -1 : 1;
            if (depth < 0) refuse(e, `symlink to ${showName(t)} climbs out of the image`);
          }
        }
        symlinks.add(comps.join("/"));
        break;
      }
    }
  }
  return { skip };
}

/** Refuses entries whose owner a desktop with this id map cannot hold (throws an ImageError). */
export function checkOwners(entries: TarEntry[], idmap: IdMap): void {
  for (const e of entries)
    for (const [what, id] of [
      ["uid", e.uid],
      ["gid", e.gid],
    ] as const)
      if (id !== undefined && id >= idmap.size)
        throw new ImageError(
          `archive entry ${showName(e.name)} is owned by ${what} ${id}, outside the desktops' id range 0-${idmap.size - 1} (vm.lxc.idmap.size); nothing was extracted`,
        );
}

/** basefs/, overlays/, homes/: only root and the desktops' mapped root (by group) may cross them. */
export function gateDir(dir: string, idmap: IdMap): void {
  mkdirSync(dirname(dir), { recursive: true }); // parents: as the administrator made them, or 0755
  mkdirSync(dir, { recursive: true, mode: 0o710 });
  chownSync(dir, 0, idmap.base);
  chmodSync(dir, 0o710);
  // Every directory above must let the mapped root through, or LXC and tar fail obscurely.
  for (let p = dirname(dir); ; p = dirname(p)) {
    const st = statSync(p);
    const ok =
      st.mode & 0o001 || (st.gid === idmap.base && st.mode & 0o010) || (st.uid === idmap.base && st.mode & 0o100);
    if (!ok)
      throw new UserError(
        `${p} (mode ${(st.mode & 0o777).toString(8)}) cannot be crossed by the desktops' mapped root (uid ${idmap.base}): give it o+x`,
      );
    if (p === "/") break;
  }
}

// --- streaming the file through the hash and tar ---------------------------------------------

export type Compression = "none" | "gzip" | "xz" | "zstd" | "bzip2";

/** Compression from the first bytes of the file (tar does not detect it on a pipe). */
export function detectCompression(file: string): Compression {
  const fd = openSync(file, "r");
  const head = Buffer.alloc(6);
  try {
    readSync(fd, head, 0, 6, 0);
  } finally {
    closeSync(fd);
  }
  if (head[0] === 0x1f && head[1] === 0x8b) return "gzip";
  if (head.subarray(0, 6).equals(Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]))) return "xz";
  if (head.readUInt32LE(0) === 0xfd2fb528) return "zstd";
  if (head.subarray(0, 3).toString("latin1") === "BZh") return "bzip2";
  return "none";
}

const TAR_DECOMPRESS: Record<Compression, string[]> = {
  none: [],
  gzip: ["-z"],
  xz: ["-J"],
  zstd: ["--zstd"],
  bzip2: ["-j"],
};

export interface UnpackProgress {
  /** wait: another process unpacks this image; verify: checksum and listing; extract: unpacking. */
  phase: "wait" | "verify" | "extract";
  bytes: number;
  total: number;
}

/** The file as a stream that feeds a SHA-256 and reports progress (at most every 1 %). */
function hashedStream(
  file: string,
  total: number,
  onBytes: (bytes: number) => void,
): { stream: ReadableStream<Uint8Array>; digest: () => string } {
  const hasher = new Bun.CryptoHasher("sha256");
  let bytes = 0;
  let shown = -1;
  const step = Math.max(1, Math.floor(total / 100));
  const src = Bun.file(file).stream();
  const stream = src.pipeThrough(
    new TransformStream<Uint8Array, Uint8Array>({
      transform(chunk, ctl) {
        hasher.update(chunk);
        bytes += chunk.byteLength;
        if (bytes - shown >= step || bytes === total) {
          shown = bytes;
          onBytes(bytes);
        }
        ctl.enqueue(chunk);
      },
    }),
  );
  let done: string | undefined;
  // tar stops reading at the archive's end blocks: an uncompressed archive's padding after them
  // may never be pulled through the stream. The checksum is the whole file's: hash the rest.
  const rest = () => {
    const fd = openSync(file, "r");
    try {
      const buf = Buffer.alloc(1 << 20);
      for (let n; (n = readSync(fd, buf, 0, buf.length, bytes)) > 0; bytes += n) hasher.update(buf.subarray(0, n));
    } finally {
      closeSync(fd);
    }
  };
  return { stream, digest: () => (done ??= (rest(), hasher.digest("hex"))) };
}

function tarFailure(file: string, err: unknown): ImageError {
  if (err instanceof CommandError) {
    const msg = err.stderr
      .trim()
      .split("\n")
      .filter((l) => l.trim())
      .slice(-3)
      .join(" / ");
    return new ImageError(`${file}: not a valid image archive: ${msg || `tar exited with ${err.status}`}`);
  }
  return new ImageError(`${file}: ${(err as Error).message}`);
}

export interface Inspection {
  sha256: string;
  bytes: number;
  compression: Compression;
  entries: TarEntry[];
}

/** The image file's stat, or an ImageError that says why it cannot be used. */
export function imageFileStat(file: string): Stats {
  let st;
  try {
    st = statSync(file);
  } catch (err) {
    throw new ImageError(
      `${file}: cannot read image: ${(err as NodeJS.ErrnoException).code === "ENOENT" ? "no such file" : (err as Error).message}`,
    );
  }
  if (!st.isFile()) throw new ImageError(`${file}: not a regular file`);
  return st;
}

/** Reads the whole archive once: its SHA-256 and its listing (the entries are not checked here). */
export async function inspectImage(file: string, onProgress?: (p: UnpackProgress) => void): Promise<Inspection> {
  const st = imageFileStat(file);
  const total = st.size;
  const compression = detectCompression(file);
  const { stream, digest } = hashedStream(file, total, (bytes) => onProgress?.({ phase: "verify", bytes, total }));
  let listing: string;
  try {
    const res = await run(
      ["tar", "-t", "-v", "--quoting-style=c", "--numeric-owner", "-P", ...TAR_DECOMPRESS[compression], "-f", "-"],
      {
        stdin: stream,
        env: { LC_ALL: "C" },
      },
    );
    listing = res.stdout;
  } catch (err) {
    throw tarFailure(file, err);
  }
  return { sha256: digest(), bytes: total, compression, entries: parseListing(listing) };
}

// --- the lock ---------------------------------------------------------------------------------

interface Flock {
  flock(fd: number, op: number): number;
  errno(): number;
}
let flockImpl: Flock | null | undefined;

/** flock(2) through libc; null where it is not available (the rename still keeps basefs whole). */
async function libcFlock(): Promise<Flock | null> {
  if (flockImpl !== undefined) return flockImpl;
  try {
    const { dlopen, FFIType, read } = await import("bun:ffi");
    const lib = dlopen("libc.so.6", {
      flock: { args: [FFIType.i32, FFIType.i32], returns: FFIType.i32 },
      __errno_location: { args: [], returns: FFIType.ptr },
    });
    flockImpl = {
      flock: (fd, op) => lib.symbols.flock(fd, op),
      errno: () => read.i32(lib.symbols.__errno_location()!, 0),
    };
  } catch (err) {
    log.warn("flock unavailable; concurrent unpacks of one image may duplicate work", {
      error: (err as Error).message,
    });
    flockImpl = null;
  }
  return flockImpl;
}

const LOCK_EX = 2,
  LOCK_NB = 4,
  EWOULDBLOCK = 11,
  EINTR = 4;

/**
 * Takes an exclusive flock on `file` (created if missing), polling with backoff; `onWait` is
 * called once when someone else holds it. Returns the release function and whether the lock
 * is real (false where flock does not work: callers must stay correct without it).
 */
export async function lockFile(
  file: string,
  signal: AbortSignal | undefined,
  onWait: () => void,
): Promise<{ release: () => void; locked: boolean }> {
  const fd = openSync(file, "a");
  const release = () => closeSync(fd); // closing the descriptor drops the lock
  const impl = await libcFlock();
  if (!impl) return { release, locked: false };
  let waited = false;
  for (let delay = 100; ; delay = Math.min(2000, delay * 1.5)) {
    if (impl.flock(fd, LOCK_EX | LOCK_NB) === 0) return { release, locked: true };
    const errno = impl.errno();
    if (errno !== EWOULDBLOCK && errno !== EINTR) {
      log.warn("cannot lock; going on without the lock", { file, errno });
      return { release, locked: false };
    }
    if (!waited) {
      waited = true;
      onWait();
    }
    if (signal?.aborted) {
      release();
      throw new ImageError(`gave up waiting for ${file}: ${String(signal.reason ?? "aborted")}`);
    }
    await Bun.sleep(delay * (0.8 + Math.random() * 0.4));
  }
}

// --- unpacking ---------------------------------------------------------------------------------

export interface UnpackOptions {
  /** The image tarball. */
  image: string;
  /** `<path.storage.root>/basefs`. */
  basefsDir: string;
  diId: number;
  /** Expected SHA-256 (hex) of the tarball, from the DB; checked before anything is extracted. */
  sha256?: string | null;
  onProgress?: (p: UnpackProgress) => void;
  /** Stops waiting for another unpacker's lock. */
  signal?: AbortSignal;
  /** Unpack with ownership shifted into this range (unprivileged desktops); see the top of the file. */
  idmap?: IdMap;
  /** Take the lock file (default true). Without it concurrent unpackers each unpack, and one copy wins. */
  lock?: boolean;
}

export interface UnpackResult {
  /** `basefs/<di-id>`. */
  basefs: string;
  /** The root filesystem: the basefs itself, or `basefs/rootfs` for images that carry metadata beside it. */
  rootfs: string;
  /** False when the basefs was already there (unpacked earlier or by another process). */
  unpacked: boolean;
  /** SHA-256 of the tarball it was unpacked from (null when unknown). */
  sha256: string | null;
  /** Notes about entries not extracted (device nodes). */
  skipped: string[];
}

interface BasefsMeta {
  di_id: number;
  image: string;
  sha256: string;
  bytes: number;
  unpacked_at: string;
  host: string;
  skipped: string[];
  /** The id map it was unpacked with (null or absent: ids as in the archive). */
  idmap?: IdMap | null;
  /** Inode of the basefs it describes (absent in records of older versions). */
  ino?: string;
}

const metaFile = (basefsDir: string, diId: number) => join(basefsDir, `.meta-${diId}.json`);

function readJson(file: string): BasefsMeta | undefined {
  try {
    return JSON.parse(readFileSync(file, "utf8")) as BasefsMeta;
  } catch {
    return undefined;
  }
}

/** Inode numbers as text: NFS file ids are 64-bit. */
const inoOf = (p: string): string | undefined => {
  try {
    return lstatSync(p, { bigint: true }).ino.toString();
  } catch {
    return undefined;
  }
};

/**
 * The record of the basefs with inode `ino`: beside it, or still under its unpacker's temporary
 * name (published, record not yet moved, or the unpacker died in between: then moved here).
 * A record of another inode (an older basefs) is not this one's.
 */
function metaFor(basefsDir: string, diId: number, ino: string): BasefsMeta | undefined {
  // The winner moves its record in one rename, between our two looks: a second round sees it.
  for (let round = 0; round < 3; round++) {
    const m = readJson(metaFile(basefsDir, diId));
    if (m && (m.ino === undefined || m.ino === ino)) return m;
    for (const n of readdirSync(basefsDir)) {
      if (!n.startsWith(`.tmp-${diId}-`) || !n.endsWith(".meta")) continue;
      const t = readJson(join(basefsDir, n));
      if (t?.ino !== ino) continue;
      try {
        renameSync(join(basefsDir, n), metaFile(basefsDir, diId));
      } catch {
        /* its unpacker (or another reader) moved it first */
      }
      return t;
    }
  }
  return undefined;
}

// --- temporary names and their leftovers ------------------------------------------------------------

/**
 * Who makes a temporary name: this machine's boot and pid namespace (hashed with the host
 * name), so that "its process is dead" is only ever concluded about our own processes.
 */
const OWNER = (() => {
  const read = (f: () => string) => {
    try {
      return f();
    } catch {
      return "";
    }
  };
  const boot = read(() => readFileSync("/proc/sys/kernel/random/boot_id", "utf8").trim());
  const pidns = read(() => readlinkSync("/proc/self/ns/pid"));
  return new Bun.CryptoHasher("sha256").update(`${hostname()}\n${boot}\n${pidns}`).digest("hex").slice(0, 12);
})();

const tmpName = (basefsDir: string, diId: number) =>
  join(basefsDir, `.tmp-${diId}-${OWNER}-${process.pid}-${Math.random().toString(36).slice(2, 8)}`);
const TMP = /^\.tmp-(\d+)-([0-9a-f]{12})-(\d+)-[a-z0-9]+(?:\.exclude|\.meta)?$/;
/** Another machine's leftovers are removed once nothing could still be writing them. */
const FOREIGN_LEFTOVER_S = 86400;

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/**
 * Removes what crashed unpacks of this image left: ours whose process is gone, anyone's a day
 * old. Never another live unpacker's directory, with or without a working lock.
 */
function removeLeftovers(basefsDir: string, diId: number): void {
  for (const n of readdirSync(basefsDir)) {
    if (!n.startsWith(`.tmp-${diId}-`)) continue;
    const m = TMP.exec(n);
    let dead: boolean;
    if (m && Number(m[1]) === diId && m[2] === OWNER) dead = !alive(Number(m[3]));
    else {
      try {
        dead = Date.now() - lstatSync(join(basefsDir, n)).ctimeMs > FOREIGN_LEFTOVER_S * 1000;
      } catch {
        continue;
      }
    }
    if (dead) rmSync(join(basefsDir, n), { recursive: true, force: true });
  }
}

/** Where the root filesystem of an unpacked image is (basic layout, or extended with rootfs/). */
export function findRootfs(basefs: string): string | undefined {
  const isEntry = (p: string) => {
    try {
      const st = lstatSync(p); // never follow links out of the image
      return st.isDirectory() || st.isSymbolicLink();
    } catch {
      return false;
    }
  };
  const rootfsDir = join(basefs, "rootfs");
  let rootfsIsDir = false;
  try {
    rootfsIsDir = lstatSync(rootfsDir).isDirectory();
  } catch {}
  if (isEntry(join(basefs, "sbin"))) return basefs;
  if (rootfsIsDir && isEntry(join(rootfsDir, "sbin"))) return rootfsDir;
  return undefined;
}

/** Whether an image's basefs directory is there; anything else in its place is an error. */
export function basefsExists(basefs: string): boolean {
  let st;
  try {
    st = lstatSync(basefs);
  } catch {
    return false;
  }
  if (!st.isDirectory()) throw new ImageError(`${basefs} exists and is not a directory`);
  return true;
}

const showMap = (m: IdMap | null | undefined) => (m ? `ids shifted by ${m.base} (range ${m.size})` : "unshifted ids");

function existing(
  basefs: string,
  basefsDir: string,
  diId: number,
  expected: string | null | undefined,
  idmap: IdMap | undefined,
): UnpackResult | undefined {
  if (!basefsExists(basefs)) return undefined;
  const meta = metaFor(basefsDir, diId, inoOf(basefs) ?? "");
  if (expected && meta && meta.sha256 !== expected.toLowerCase())
    throw new ImageError(
      `${basefs} was unpacked from another file (sha256 ${meta.sha256}, expected ${expected}); remove it to unpack the image again`,
    );
  // Another node (or this one before unprivileged desktops) used another id range: the files'
  // owners would be wrong for this node's desktops. Re-unpacking in place would pull the layer
  // from under desktops running on it elsewhere, so an administrator decides.
  if (!meta && idmap)
    throw new ImageError(
      `${basefs} has no record of how it was unpacked (checksum, id map); remove it while no desktop uses it to unpack the image again`,
    );
  const have = meta?.idmap ?? null;
  if ((have?.base ?? null) !== (idmap?.base ?? null) || (have?.size ?? null) !== (idmap?.size ?? null))
    throw new ImageError(
      `${basefs} was unpacked with ${showMap(have)}, this node runs desktops with ${showMap(idmap)} (vm.lxc.idmap.*); remove it while no desktop uses it to unpack the image again`,
    );
  const rootfs = findRootfs(basefs);
  if (!rootfs)
    throw new ImageError(
      `${basefs} holds no root filesystem (no sbin/ nor rootfs/sbin/); remove it to unpack the image again`,
    );
  return { basefs, rootfs, unpacked: false, sha256: meta?.sha256 ?? null, skipped: meta?.skipped ?? [] };
}

/**
 * Unpacks an image into `basefsDir/<diId>` once (see the top of this file); returns at once
 * when it is already there. Throws an ImageError naming the file on a wrong checksum, an unsafe
 * entry or a broken archive, and leaves nothing behind.
 */
export async function unpackImage(opts: UnpackOptions): Promise<UnpackResult> {
  const { image, basefsDir, diId } = opts;
  if (!Number.isSafeInteger(diId) || diId < 0) throw new ImageError(`invalid image id ${diId}`);
  const basefs = join(basefsDir, String(diId));
  const expected = opts.sha256?.toLowerCase() ?? null;
  if (expected !== null && !/^[0-9a-f]{64}$/.test(expected))
    throw new ImageError(`invalid expected sha256 for ${image}: ${opts.sha256}`);
  if (opts.idmap) gateDir(basefsDir, opts.idmap);
  else mkdirSync(basefsDir, { recursive: true });
  const done = existing(basefs, basefsDir, diId, expected, opts.idmap);
  if (done) return done;

  const lock =
    opts.lock === false
      ? { release: () => {}, locked: false }
      : await lockFile(join(basefsDir, `.lock-${diId}`), opts.signal, () => {
          log.info("waiting for another unpack of this image", { image, di: diId });
          opts.onProgress?.({ phase: "wait", bytes: 0, total: 0 });
        });
  const tmp = tmpName(basefsDir, diId);
  const exclude = `${tmp}.exclude`;
  try {
    const again = existing(basefs, basefsDir, diId, expected, opts.idmap);
    if (again) return again;
    removeLeftovers(basefsDir, diId);

    const started = Date.now();
    const info = await inspectImage(image, opts.onProgress);
    if (expected !== null && info.sha256 !== expected)
      throw new ImageError(
        `${image}: checksum mismatch: sha256 is ${info.sha256}, expected ${expected}; nothing was extracted`,
      );
    let skip: TarEntry[];
    try {
      ({ skip } = checkEntries(info.entries));
      if (opts.idmap) checkOwners(info.entries, opts.idmap);
    } catch (err) {
      if (err instanceof ImageError) throw new ImageError(`${image}: ${err.message}`);
      throw err;
    }
    const skipped = skip.map(
      (e) =>
        `${showName(e.name)}: ${e.type === "chardev" ? "character device" : e.type === "blockdev" ? "block device" : "link to a device"} not extracted`,
    );
    for (const s of skipped) log.info("skipping device node", { image, entry: s });

    mkdirSync(tmp, { mode: 0o755 }); // the guest's "/" when the archive has no "./" entry
    if (opts.idmap) chownSync(tmp, opts.idmap.base, opts.idmap.base); // tar runs as the mapped root
    const excludeArgs: string[] = [];
    if (skip.length) {
      writeFileSync(exclude, Buffer.from(skip.map((e) => e.name + "\n").join(""), "latin1"));
      excludeArgs.push("--no-wildcards", "--anchored", "-X", exclude);
    }
    const { stream, digest } = hashedStream(image, info.bytes, (bytes) =>
      opts.onProgress?.({ phase: "extract", bytes, total: info.bytes }),
    );
    try {
      const tar = [
        "tar",
        "-x",
        "-f",
        "-",
        "-C",
        tmp,
        "--numeric-owner",
        "-p",
        "--xattrs",
        "--xattrs-include=user.*",
        "--warning=no-timestamp",
        ...TAR_DECOMPRESS[info.compression],
        ...excludeArgs,
      ];
      const m = opts.idmap;
      await run(
        m ? ["lxc-usernsexec", "-m", `u:0:${m.base}:${m.size}`, "-m", `g:0:${m.base}:${m.size}`, "--", ...tar] : tar,
        { stdin: stream, env: { LC_ALL: "C" } },
      );
    } catch (err) {
      throw tarFailure(image, err);
    }
    if (digest() !== info.sha256) throw new ImageError(`${image} changed while it was being unpacked; try again`);
    const rootfsIn = findRootfs(tmp);
    if (!rootfsIn) throw new ImageError(`${image}: not a root filesystem image (no sbin/ nor rootfs/sbin/ at the top)`);

    const ino = inoOf(tmp)!;
    const meta: BasefsMeta = {
      di_id: diId,
      image,
      sha256: info.sha256,
      bytes: info.bytes,
      unpacked_at: new Date().toISOString(),
      host: hostname(),
      skipped,
      idmap: opts.idmap ?? null,
      ino,
    };
    writeFileSync(`${tmp}.meta`, JSON.stringify(meta, null, 1) + "\n");
    // Publish: this one rename decides which unpacker's copy becomes the image.
    try {
      renameSync(tmp, basefs);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      // NFS: a retransmitted rename that had in fact succeeded answers ENOENT.
      if (!(code === "ENOENT" && inoOf(basefs) === ino)) {
        if (code !== "ENOTEMPTY" && code !== "EEXIST") throw err;
        // Another unpacker won: use its copy; ours goes (finally).
        const theirs = existing(basefs, basefsDir, diId, expected, opts.idmap);
        if (theirs) return theirs;
        throw err;
      }
    }
    try {
      renameSync(`${tmp}.meta`, metaFile(basefsDir, diId));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err; // a reader moved it for us
    }
    log.info("image unpacked", {
      image,
      basefs,
      seconds: ((Date.now() - started) / 1000).toFixed(1),
      skipped: skipped.length,
    });
    return {
      basefs,
      rootfs: rootfsIn === tmp ? basefs : join(basefs, "rootfs"),
      unpacked: true,
      sha256: info.sha256,
      skipped,
    };
  } finally {
    rmSync(tmp, { recursive: true, force: true });
    rmSync(exclude, { force: true });
    rmSync(`${tmp}.meta`, { force: true });
    lock.release();
  }
}

/**
 * Removes an unpacked image (when the image is deleted and no VM uses it any more): renamed
 * away first, so a half-removed basefs is never mistaken for a whole one.
 */
export function removeBasefs(basefsDir: string, diId: number): boolean {
  const basefs = join(basefsDir, String(diId));
  if (!existsSync(basefs)) return false;
  const gone = tmpName(basefsDir, diId);
  renameSync(basefs, gone);
  rmSync(metaFile(basefsDir, diId), { force: true });
  rmSync(gone, { recursive: true, force: true });
  return true;
}
