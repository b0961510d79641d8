// Image unpacking with real GNU tar: checksum, progress, refusal of unsafe or broken archives
// before anything is extracted, and concurrent unpacks of one image.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import {
  chmodSync,
  chownSync,
  existsSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
  statSync,
  symlinkSync,
  truncateSync,
  writeFileSync,
  linkSync,
} from "node:fs";
import { join } from "node:path";
import { run } from "../src/run.ts";
import { copyFileSync } from "node:fs";
import {
  checkEntries,
  ImageError,
  inspectImage,
  parseListing,
  unpackImage,
  type UnpackProgress,
} from "../src/virt/images.ts";
import { rejection } from "./support/assert.ts";
import { until } from "./support/wait.ts";

let dir: string;
let src: string; // a tiny root filesystem
let basefsDir: string;

/** Sets an extended attribute (setfattr is not installed everywhere; python's os is). */
const setXattr = (file: string, name: string, value: string) =>
  run([
    "python3",
    "-c",
    "import os,sys; os.setxattr(sys.argv[1], sys.argv[2], sys.argv[3].encode())",
    file,
    name,
    value,
  ]);

const sha256 = (file: string) => new Bun.CryptoHasher("sha256").update(readFileSync(file)).digest("hex");

/** Nothing but lock and nothing half-made: no basefs, no temp dirs, no metadata. */
function leftovers(id: number): string[] {
  if (!existsSync(basefsDir)) return [];
  return readdirSync(basefsDir).filter((n) => n !== `.lock-${id}` && (n === String(id) || n.includes(`-${id}`)));
}

/** The message of the ImageError `p` fails with, matching `pattern`; nothing of image `id` is left. */
async function expectRefused(p: Promise<unknown>, pattern: RegExp, id: number): Promise<string> {
  const msg = (await rejection(p, ImageError, pattern)).message;
  expect(leftovers(id)).toEqual([]);
  return msg;
}

beforeAll(async () => {
  dir = mkdtempSync("/tmp/qvd-images-test-");
  basefsDir = join(dir, "storage", "basefs");
  src = join(dir, "src");
  mkdirSync(join(src, "usr/sbin"), { recursive: true });
  mkdirSync(join(src, "etc/alternatives"), { recursive: true });
  mkdirSync(join(src, "usr/bin"), { recursive: true });
  mkdirSync(join(src, "dev"), { recursive: true });
  symlinkSync("usr/sbin", join(src, "sbin"));
  writeFileSync(join(src, "etc/hostname"), "guest\n");
  writeFileSync(join(src, "usr/bin/tool"), "#!/bin/sh\necho tool\n", { mode: 0o4755 });
  linkSync(join(src, "usr/bin/tool"), join(src, "usr/bin/tool2"));
  symlinkSync("/usr/bin/tool", join(src, "etc/alternatives/tool")); // absolute: fine inside a rootfs
  symlinkSync("../../usr/bin/tool", join(src, "etc/alternatives/rel")); // relative, stays inside
  // Some content so that progress has several steps.
  writeFileSync(join(src, "usr/bin/blob"), Buffer.alloc(3 * 1024 * 1024, 7));
  await run(["mknod", join(src, "dev/null"), "c", "1", "3"]);
  linkSync(join(src, "dev/null"), join(src, "dev/null2")); // GNU tar stores it as a second device
  await run(["tar", "-C", src, "--numeric-owner", "-czf", join(dir, "good.tar.gz"), "."]);
  await run(["tar", "-C", src, "--numeric-owner", "-cf", join(dir, "good.tar"), "."]);
});

afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

describe("unpackImage", () => {
  test("unpacks a good tarball once, with progress and checksum", async () => {
    const image = join(dir, "good.tar.gz");
    const events: UnpackProgress[] = [];
    const res = await unpackImage({
      image,
      basefsDir,
      diId: 1,
      sha256: sha256(image).toUpperCase(),
      onProgress: (p) => events.push(p),
    });
    expect(res.unpacked).toBe(true);
    expect(res.basefs).toBe(join(basefsDir, "1"));
    expect(res.rootfs).toBe(res.basefs);
    expect(res.sha256).toBe(sha256(image));
    expect(readFileSync(join(res.rootfs, "etc/hostname"), "utf8")).toBe("guest\n");
    expect(readlinkSync(join(res.rootfs, "etc/alternatives/tool"))).toBe("/usr/bin/tool");
    expect(readlinkSync(join(res.rootfs, "sbin"))).toBe("usr/sbin");
    const tool = statSync(join(res.rootfs, "usr/bin/tool"));
    expect(tool.mode & 0o7777).toBe(0o4755); // setuid kept
    expect(tool.ino).toBe(statSync(join(res.rootfs, "usr/bin/tool2")).ino); // hard link kept
    // The device node is skipped with a note.
    expect(existsSync(join(res.rootfs, "dev/null"))).toBe(false);
    expect(existsSync(join(res.rootfs, "dev"))).toBe(true);
    expect(existsSync(join(res.rootfs, "dev/null2"))).toBe(false);
    expect(res.skipped.sort()).toEqual([
      expect.stringMatching(/dev\/null": character device not extracted/),
      expect.stringMatching(/dev\/null2": character device not extracted/),
    ]);
    // Progress: both phases, non-decreasing, ending at the file size.
    const size = statSync(image).size;
    for (const phase of ["verify", "extract"] as const) {
      const ev = events.filter((e) => e.phase === phase);
      expect(ev.length).toBeGreaterThan(0);
      expect(ev.at(-1)).toEqual({ phase, bytes: size, total: size });
      for (let i = 1; i < ev.length; i++) expect(ev[i]!.bytes).toBeGreaterThanOrEqual(ev[i - 1]!.bytes);
    }
    // Nothing left beside the result but its lock and metadata.
    expect(readdirSync(basefsDir).sort()).toEqual([".lock-1", ".meta-1.json", "1"]);

    // A second call reuses it.
    const again = await unpackImage({ image, basefsDir, diId: 1, sha256: sha256(image) });
    expect(again).toMatchObject({ unpacked: false, basefs: res.basefs, rootfs: res.rootfs, sha256: sha256(image) });
  });

  test("an uncompressed tarball without a checksum", async () => {
    const res = await unpackImage({ image: join(dir, "good.tar"), basefsDir, diId: 2 });
    expect(res.unpacked).toBe(true);
    expect(existsSync(join(res.rootfs, "usr/bin/blob"))).toBe(true);
  });

  test('an archive without a "./" entry gets a usable root directory', async () => {
    const image = join(dir, "noroot-entry.tar");
    await run(["tar", "-C", src, "-cf", image, "sbin", "usr", "etc"]);
    const res = await unpackImage({ image, basefsDir, diId: 4 });
    expect(statSync(res.rootfs).mode & 0o777).toBe(0o755);
    expect(existsSync(join(res.rootfs, "etc/hostname"))).toBe(true);
  });

  test.if(Bun.which("zstd") !== null)("a .tar.zst", async () => {
    const image = join(dir, "good.tar.zst");
    await run(["tar", "-C", src, "--zstd", "-cf", image, "."]);
    const res = await unpackImage({ image, basefsDir, diId: 6, sha256: sha256(image) });
    expect(readFileSync(join(res.rootfs, "etc/hostname"), "utf8")).toBe("guest\n");
  });

  test("an image with metadata beside its root filesystem (rootfs/)", async () => {
    const work = mkdtempSync(join(dir, "extended-"));
    mkdirSync(join(work, "rootfs/sbin"), { recursive: true });
    mkdirSync(join(work, "hooks"));
    const image = join(dir, "extended.tar.xz");
    await run(["tar", "-C", work, "-cJf", image, "."]);
    const res = await unpackImage({ image, basefsDir, diId: 5 });
    expect(res.rootfs).toBe(join(basefsDir, "5", "rootfs"));
  });

  test("an uncompressed archive with padding after its end blocks (tar --append output): the whole file's checksum", async () => {
    const image = join(dir, "padded.tar");
    writeFileSync(image, Buffer.concat([readFileSync(join(dir, "good.tar")), Buffer.alloc(2 * 1024 * 1024)]));
    const res = await unpackImage({ image, basefsDir, diId: 7, sha256: sha256(image) });
    expect(readFileSync(join(res.rootfs, "etc/hostname"), "utf8")).toBe("guest\n");
  });

  test("a wrong checksum is refused and nothing is left", async () => {
    const image = join(dir, "good.tar.gz");
    const msg = await expectRefused(
      unpackImage({ image, basefsDir, diId: 3, sha256: "0".repeat(64) }),
      /checksum mismatch/,
      3,
    );
    expect(msg).toContain(image);
    expect(msg).toContain(sha256(image));
  });

  test("a stale basefs from another file is reported, not reused", async () => {
    await expectRefused(
      unpackImage({ image: join(dir, "good.tar"), basefsDir, diId: 1, sha256: sha256(join(dir, "good.tar")) }),
      /unpacked from another file/,
      999,
    );
  });

  describe("unsafe archives are refused before anything is extracted", () => {
    // Each archive also holds a harmless file first, which must not appear anywhere either.
    async function evil(name: string, build: (work: string) => Promise<string[]>): Promise<string> {
      const work = mkdtempSync(join(dir, "evil-"));
      mkdirSync(join(work, "r/sbin"), { recursive: true });
      writeFileSync(join(work, "r/canary"), "x");
      const tarArgs = await build(work);
      const file = join(dir, name);
      await run(["tar", "-cPzf", file, ...tarArgs], { cwd: join(work, "r") });
      return file;
    }
    let id = 10;
    const cases: [string, string, (work: string) => Promise<string[]>, RegExp][] = [
      [
        "dotdot.tar.gz",
        "../x",
        async (w) => {
          writeFileSync(join(w, "x"), "outside");
          return ["canary", "sbin", "../x"];
        },
        /"\.\.\/x": '\.\.' in the path/,
      ],
      [
        "absolute.tar.gz",
        "/etc/passwd",
        async () => ["canary", "sbin", "/etc/passwd"],
        /"\/etc\/passwd": absolute path/,
      ],
      [
        "hardlink.tar.gz",
        "hard link to ../../x",
        async (w) => {
          writeFileSync(join(w, "r/f"), "f");
          linkSync(join(w, "r/f"), join(w, "r/g"));
          return ["--transform", "s,^f$,../../x,RSh", "canary", "sbin", "f", "g"];
        },
        /"g": hard link to "\.\.\/\.\.\/x" outside the archive/,
      ],
      [
        "symlink.tar.gz",
        "symlink ../../../etc",
        async (w) => {
          mkdirSync(join(w, "r/a"));
          symlinkSync("../../../etc", join(w, "r/a/etc"));
          return ["canary", "sbin", "a", "a/etc"];
        },
        /"a\/etc": symlink to "\.\.\/\.\.\/\.\.\/etc" climbs out of the image/,
      ],
      [
        "through-symlink.tar.gz",
        "a file below a symlink of the archive",
        async (w) => {
          symlinkSync("/", join(w, "r/root"));
          writeFileSync(join(w, "r/canary2"), "y");
          return ["--transform", "s,^canary2$,root/pwned,", "canary", "sbin", "root", "canary2"];
        },
        /"root\/pwned": it lies below the symlink "root"/,
      ],
    ];
    for (const [file, what, build, pattern] of cases) {
      const myId = ++id;
      test(what, async () => {
        const image = await evil(file, build);
        const msg = await expectRefused(unpackImage({ image, basefsDir, diId: myId }), pattern, myId);
        expect(msg).toContain(image);
        expect(msg).toContain("nothing was extracted");
        expect(existsSync(join(basefsDir, "x"))).toBe(false);
        expect(existsSync(join(basefsDir, "canary"))).toBe(false);
        expect(existsSync("/pwned")).toBe(false);
      });
    }
  });

  test("a truncated .tar.gz is refused with tar's message and nothing is left", async () => {
    const image = join(dir, "truncated.tar.gz");
    writeFileSync(image, readFileSync(join(dir, "good.tar.gz")));
    truncateSync(image, Math.floor(statSync(image).size / 2));
    const msg = await expectRefused(
      unpackImage({ image, basefsDir, diId: 20 }),
      /not a valid image archive: .*(unexpected end|Unexpected EOF)/i,
      20,
    );
    expect(msg).toContain(image);
  });

  test("a file that is no archive, and a missing file", async () => {
    const junk = join(dir, "junk.tar.gz");
    writeFileSync(junk, Buffer.concat([Buffer.from([0x1f, 0x8b]), Buffer.alloc(2000, 1)]));
    await expectRefused(
      unpackImage({ image: junk, basefsDir, diId: 21 }),
      /junk\.tar\.gz: not a valid image archive/,
      21,
    );
    const text = join(dir, "text.tar");
    writeFileSync(text, "hello\n".repeat(1000));
    await expectRefused(
      unpackImage({ image: text, basefsDir, diId: 22 }),
      /text\.tar: not a valid image archive: .*does not look like a tar archive/,
      22,
    );
    await expectRefused(
      unpackImage({ image: join(dir, "missing.tar"), basefsDir, diId: 23 }),
      /missing\.tar: cannot read image: no such file/,
      23,
    );
  });

  test("an archive without a root filesystem is refused", async () => {
    const work = mkdtempSync(join(dir, "norootfs-"));
    writeFileSync(join(work, "readme"), "no OS here");
    const image = join(dir, "norootfs.tar");
    await run(["tar", "-C", work, "-cf", image, "."]);
    await expectRefused(unpackImage({ image, basefsDir, diId: 24 }), /not a root filesystem image/, 24);
  });

  test("two concurrent unpacks of one image: one basefs, both succeed", async () => {
    const image = join(dir, "good.tar.gz");
    const phases: string[][] = [[], []];
    const [a, b] = await Promise.all(
      [0, 1].map((i) =>
        unpackImage({ image, basefsDir, diId: 30, sha256: sha256(image), onProgress: (p) => phases[i]!.push(p.phase) }),
      ),
    );
    expect(a!.basefs).toBe(join(basefsDir, "30"));
    expect(b!.basefs).toBe(a!.basefs);
    expect([a!.unpacked, b!.unpacked].sort()).toEqual([false, true]);
    // The second one waited for the first instead of unpacking too.
    const waiter = a!.unpacked ? phases[1]! : phases[0]!;
    expect(waiter).toContain("wait");
    expect(waiter).not.toContain("extract");
    expect(
      readdirSync(basefsDir)
        .filter((n) => n.includes("30"))
        .sort(),
    ).toEqual([".lock-30", ".meta-30.json", "30"]);
    expect(readFileSync(join(a!.rootfs, "etc/hostname"), "utf8")).toBe("guest\n");
  });

  test("concurrent unpacks from separate processes", async () => {
    const image = join(dir, "good.tar");
    const script = `import { unpackImage } from ${JSON.stringify(join(import.meta.dir, "../src/virt/images.ts"))};
      const r = await unpackImage({ image: ${JSON.stringify(image)}, basefsDir: ${JSON.stringify(basefsDir)}, diId: 31 });
      console.log(JSON.stringify(r));`;
    const results = await Promise.all([0, 1, 2].map(() => run([process.execPath, "-e", script])));
    const parsed = results.map((r) => JSON.parse(r.stdout.trim().split("\n").at(-1)!));
    expect(parsed.filter((r) => r.unpacked).length).toBe(1);
    expect(new Set(parsed.map((r) => r.basefs))).toEqual(new Set([join(basefsDir, "31")]));
    expect(lstatSync(join(basefsDir, "31")).isDirectory()).toBe(true);
  });
});

describe("unpacking for unprivileged desktops (id map)", () => {
  const m = { base: 100000, size: 65536 };
  let store: string;
  let image: string;
  beforeAll(async () => {
    chmodSync(dir, 0o711); // storage must be crossable by the desktops' mapped root
    store = join(dir, "mapped", "basefs");
    const w = join(dir, "mapped-src");
    for (const d of ["sbin", "usr/bin", "home/alice"]) mkdirSync(join(w, d), { recursive: true });
    writeFileSync(join(w, "usr/bin/rootshell"), "#!/bin/sh\nid\n");
    chmodSync(join(w, "usr/bin/rootshell"), 0o4755); // setuid root, as a tenant may upload
    writeFileSync(join(w, "usr/bin/capped"), "x", { mode: 0o755 });
    await run(["setcap", "cap_setuid,cap_sys_admin+ep", join(w, "usr/bin/capped")]);
    writeFileSync(join(w, "home/alice/notes"), "n");
    chownSync(join(w, "home/alice/notes"), 2001, 2001);
    await setXattr(join(w, "home/alice/notes"), "user.mime", "text/plain");
    await setXattr(join(w, "home/alice/notes"), "trusted.overlay.redirect", "/etc");
    image = join(dir, "mapped.tar");
    await run(["tar", "-C", w, "--numeric-owner", "--xattrs", "--xattrs-include=*", "-cf", image, "."]);
  });

  test("owners shifted into the range, setuid kept but not node root's, no file capabilities, no trusted xattrs", async () => {
    const res = await unpackImage({ image, basefsDir: store, diId: 1, idmap: m });
    const st = (p: string) => lstatSync(join(res.rootfs, p));
    expect(st(".").uid).toBe(100000);
    expect([st("usr/bin/rootshell").uid, st("usr/bin/rootshell").mode & 0o7777]).toEqual([100000, 0o4755]);
    expect([st("home/alice/notes").uid, st("home/alice/notes").gid]).toEqual([102001, 102001]);
    expect((await run(["getcap", join(res.rootfs, "usr/bin/capped")])).stdout.trim()).toBe("");
    const attrs = (
      await run([
        "python3",
        "-c",
        "import os,sys; print(os.listxattr(sys.argv[1]))",
        join(res.rootfs, "home/alice/notes"),
      ])
    ).stdout;
    expect(attrs).toContain("user.mime");
    expect(attrs).not.toContain("trusted.");
    expect(JSON.parse(readFileSync(join(store, ".meta-1.json"), "utf8")).idmap).toEqual(m);
    // basefs/ is root:<base> 0710: a node user cannot reach, let alone run, anything on it.
    const gate = statSync(store);
    expect([gate.uid, gate.gid, gate.mode & 0o777]).toEqual([0, 100000, 0o710]);
    // Through a shell: setpriv's own execve still holds root's capabilities while it resolves the path.
    const asNobody = await run(
      [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "/bin/sh",
        "-c",
        'exec "$0"',
        join(res.rootfs, "usr/bin/rootshell"),
      ],
      { allowFail: true },
    );
    expect(asNobody.status).not.toBe(0);
    expect(asNobody.stderr).toMatch(/Permission denied/);
  });

  test("a storage path the mapped root cannot cross is named", async () => {
    const closed = mkdtempSync(join(dir, "closed-")); // mode 0700
    await expect(unpackImage({ image, basefsDir: join(closed, "basefs"), diId: 1, idmap: m })).rejects.toThrow(
      /closed-\w+ \(mode 700\) cannot be crossed by the desktops' mapped root \(uid 100000\): give it o\+x/,
    );
  });

  test("an owner outside the range is refused; a basefs unpacked with another map is reported", async () => {
    const w = mkdtempSync(join(dir, "big-uid-"));
    mkdirSync(join(w, "sbin"));
    writeFileSync(join(w, "f"), "x");
    chownSync(join(w, "f"), 70000, 0);
    const big = join(dir, "big-uid.tar");
    await run(["tar", "-C", w, "--numeric-owner", "-cf", big, "."]);
    await expect(unpackImage({ image: big, basefsDir: store, diId: 2, idmap: m })).rejects.toThrow(
      /owned by uid 70000, outside the desktops' id range 0-65535 .*nothing was extracted/,
    );
    expect(readdirSync(store).filter((n) => n === "2" || n.startsWith(".tmp-2") || n === ".meta-2.json")).toEqual([]);
    await expect(
      unpackImage({ image, basefsDir: store, diId: 1, idmap: { base: 200000, size: 65536 } }),
    ).rejects.toThrow(/unpacked with ids shifted by 100000.*remove it while no desktop uses it/);
    await expect(unpackImage({ image, basefsDir: store, diId: 1 })).rejects.toThrow(
      /this node runs desktops with unshifted ids/,
    );
  });
});

describe("checkEntries", () => {
  test("parses tar's C-quoted listing exactly", () => {
    const entries = parseListing(
      [
        'drwxr-xr-x 0/0               0 2026-11-28 11:31 "./"',
        'lrwxrwxrwx 0/0               0 2026-11-28 11:31 "./sub/sp ace -> x" -> "../f"',
        'hrw-r--r-- 0/0               0 2026-11-28 11:31 "./g" link to "./f"',
        '-rw-r--r-- 0/0               1 2026-11-28 11:31 "./nl\\nname\\"q\\303\\251"',
        'crw-r--r-- 0/0             1,3 2026-11-28 11:31 "./null"',
      ].join("\n"),
    );
    expect(entries.map((e) => [e.type, e.name, e.link])).toEqual([
      ["dir", "./", undefined],
      ["symlink", "./sub/sp ace -> x", "../f"],
      ["hardlink", "./g", "./f"],
      ["file", './nl\nname"q\xc3\xa9', undefined],
      ["chardev", "./null", undefined],
    ]);
  });

  test("device nodes and hard links to them are skipped", () => {
    const { skip } = checkEntries([
      { name: "./dev/", type: "dir", mode: "drwxr-xr-x" },
      { name: "./dev/sda", type: "blockdev", mode: "brw-rw----" },
      { name: "./dev/disk", type: "hardlink", link: "dev/sda", mode: "hrw-rw----" },
      { name: "./etc/f", type: "file", mode: "-rw-r--r--" },
      { name: "./etc/g", type: "hardlink", link: "./etc/f", mode: "hrw-r--r--" },
    ]);
    expect(skip.map((e) => e.name)).toEqual(["./dev/sda", "./dev/disk"]);
  });

  test("relative symlinks may go up as long as they stay inside", () => {
    const e = (name: string, link: string) => ({ name, type: "symlink" as const, link, mode: "lrwxrwxrwx" });
    expect(() => checkEntries([e("./usr/lib/x", "../../bin/y")])).not.toThrow();
    expect(() => checkEntries([e("./usr/lib/x", "../../../bin/y")])).toThrow(/climbs out/);
    expect(() => checkEntries([e("./x", "a/../../y")])).toThrow(/climbs out/);
    expect(() => checkEntries([e("./x", "/../../../y")])).not.toThrow(); // absolute: resolved inside the guest
  });
});

// Shared storage (NFS in production): nodes unpack images into one basefs/ without a lock that
// reaches them all. Two processes stand for two nodes; the lock is off, so both really unpack.
describe("shared storage: two nodes unpack the real desktop image at once", () => {
  const m = { base: 100000, size: 65536 };
  let store: string;
  let image: string;
  const IMAGES = join(import.meta.dir, "../src/virt/images.ts");
  /** A child process (a node) unpacking `diId`; prints its result and the phases it went through. */
  const unpacker = (diId: number, sha?: string) => `import { unpackImage } from ${JSON.stringify(IMAGES)};
    const phases = new Set();
    const r = await unpackImage({ image: ${JSON.stringify(image)}, basefsDir: ${JSON.stringify(store)}, diId: ${diId}, sha256: ${JSON.stringify(sha ?? null)},
      idmap: ${JSON.stringify(m)}, lock: false, onProgress: (p) => phases.add(p.phase) });
    console.log(JSON.stringify({ ...r, phases: [...phases] }));`;

  beforeAll(async () => {
    const cached = "/var/cache/qvd/test/debian-bookworm-desktop.tar.gz";
    const { desktopImage } = await import("./support/node.ts");
    chmodSync(dir, 0o711);
    store = join(dir, "shared", "basefs");
    image = join(dir, "desktop.tar.gz");
    // A private copy: the cache may be rebuilt meanwhile by other work on this machine.
    copyFileSync(existsSync(cached) ? cached : await desktopImage(), image);
  });

  test("one good copy: both report the same rootfs, the loser's copy is gone, nothing else is left", async () => {
    const sha = sha256(image);
    const outs = await Promise.all(
      [0, 1].map(() =>
        run([process.execPath, "-e", unpacker(40, sha)], { env: { ...process.env, QVD_LOG_LEVEL: "error" } }),
      ),
    );
    const [a, b] = outs.map((o) => JSON.parse(o.stdout.trim().split("\n").at(-1)!));
    // Both extracted (they raced for real), one copy won.
    expect(a.phases).toContain("extract");
    expect(b.phases).toContain("extract");
    expect([a.unpacked, b.unpacked].sort()).toEqual([false, true]);
    expect(b.rootfs).toBe(a.rootfs);
    expect(a.rootfs).toBe(join(store, "40"));
    expect(
      readdirSync(store)
        .filter((n) => n.includes("40"))
        .sort(),
    ).toEqual([".meta-40.json", "40"]);
    // The copy is whole: every entry of the archive but the skipped device nodes is there.
    const meta = JSON.parse(readFileSync(join(store, ".meta-40.json"), "utf8"));
    expect([meta.sha256, meta.idmap, meta.ino]).toEqual([
      sha,
      m,
      lstatSync(join(store, "40"), { bigint: true }).ino.toString(),
    ]);
    const listed = new Set(
      (await inspectImage(image)).entries.map((e) => e.name.replace(/^\.\/?/, "").replace(/\/$/, "")),
    );
    const found = (await run(["find", ".", "-mindepth", "1"], { cwd: join(store, "40") })).stdout
      .trim()
      .split("\n")
      .map((n) => n.slice(2));
    expect(found.length).toBe(listed.size - 1 - meta.skipped.length); // "" is the root itself
    expect(lstatSync(join(store, "40", "usr/bin/nxagent")).isFile()).toBe(true);
  }, 600_000);

  test("a record not yet moved beside its basefs (the winner died between its two renames) is found; an older basefs's record is not believed", async () => {
    const rec = join(store, ".meta-40.json");
    const good = readFileSync(rec, "utf8");
    // Crashed winner: its record still under its temporary name, a record of an older basefs beside.
    writeFileSync(join(store, ".tmp-40-0123456789ab-999999-zz.meta"), good);
    writeFileSync(rec, JSON.stringify({ ...JSON.parse(good), ino: "1", sha256: "0".repeat(64) }));
    const r = await unpackImage({ image, basefsDir: store, diId: 40, sha256: sha256(image), idmap: m });
    expect([r.unpacked, r.sha256]).toEqual([false, sha256(image)]);
    expect(readFileSync(rec, "utf8")).toBe(good);
    // No record at all: not taken as good.
    rmSync(rec);
    await expect(unpackImage({ image, basefsDir: store, diId: 40, idmap: m })).rejects.toThrow(
      /has no record of how it was unpacked/,
    );
    writeFileSync(rec, good);
  });

  test("an unpacker holding the lock never removes another node's live temporary directory (its lock did not reach that node)", async () => {
    const other = Bun.spawn([process.execPath, "-e", unpacker(42)], { stdout: "pipe", stderr: "pipe" });
    const theirs = () =>
      readdirSync(store).find((n) => n.startsWith(".tmp-42-") && !n.endsWith(".meta") && !n.endsWith(".exclude"));
    await until(
      () => Boolean(theirs() && existsSync(join(store, theirs()!, "usr"))),
      "the other unpacker to start extracting",
      300_000,
      50,
    );
    const mine = await unpackImage({ image, basefsDir: store, diId: 42, idmap: m }); // takes the lock
    const out = await new Response(other.stdout).text();
    expect(await other.exited).toBe(0);
    const r = JSON.parse(out.trim().split("\n").at(-1)!);
    expect([mine.unpacked, r.unpacked].sort()).toEqual([false, true]);
    expect(r.rootfs).toBe(mine.rootfs);
    expect(
      readdirSync(store)
        .filter((n) => n.includes("42"))
        .sort(),
    ).toEqual([".lock-42", ".meta-42.json", "42"]);
  }, 600_000);

  test("an unpack killed mid-way leaves no image; the next unpack makes a whole one and removes the dead one's directory", async () => {
    // setsid: the unpacker, lxc-usernsexec and tar in a process group of their own, killed together.
    const p = Bun.spawn(["setsid", process.execPath, "-e", unpacker(41)], { stdout: "ignore", stderr: "ignore" });
    const tmpDir = () =>
      readdirSync(store).find((n) => n.startsWith(".tmp-41-") && !n.endsWith(".meta") && !n.endsWith(".exclude"));
    await until(
      () => Boolean(tmpDir() && existsSync(join(store, tmpDir()!, "usr"))),
      "the unpacker to start extracting",
      300_000,
      50,
    );
    process.kill(-p.pid, "SIGKILL");
    await p.exited;
    const left = tmpDir()!;
    expect(left).toBeDefined();
    expect(existsSync(join(store, "41"))).toBe(false);
    expect(existsSync(join(store, ".meta-41.json"))).toBe(false);
    const r = await unpackImage({ image, basefsDir: store, diId: 41, idmap: m, lock: false });
    expect(r.unpacked).toBe(true);
    expect(lstatSync(join(r.rootfs, "usr/bin/nxagent")).isFile()).toBe(true);
    expect(
      readdirSync(store)
        .filter((n) => n.includes("41"))
        .sort(),
    ).toEqual([".meta-41.json", "41"]);
  }, 600_000);
});
