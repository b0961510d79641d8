// KVM images with real qemu-img, mkfs.ext4 and debugfs: what a node accepts as a qcow2, and the
// kernel and initramfs it extracts once per image (src/virt/kvm-image.ts). Small ext4 images
// are made here with `mkfs.ext4 -d`; the real desktop image is the cached `qvd di build --kvm`.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  symlinkSync,
  truncateSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { run } from "../src/run.ts";
import { ImageError } from "../src/virt/images.ts";
import { inspectQcow2, isQcow2, prepareKvmImage, QCOW2_MAGIC } from "../src/virt/kvm-image.ts";
import { rejection } from "./support/assert.ts";
import { kvmTestImage } from "./support/kvm-image.ts";

let dir: string;
let n = 0;

beforeAll(async () => {
  const { ensureDeps } = await import("../scripts/deps.ts");
  await ensureDeps(["qemu-img", "e2fsprogs"], () => {});
  dir = mkdtempSync("/tmp/qvd-kvm-image-test-");
});

afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

const sha256 = (file: string) => new Bun.CryptoHasher("sha256").update(readFileSync(file)).digest("hex");

/** A fake kernel: enough of a bzImage header for the node's check. */
function fakeKernel(file: string, bytes = 4096): void {
  const b = Buffer.alloc(bytes);
  b.write("HdrS", 0x202, "latin1");
  writeFileSync(file, b);
}

/** A qcow2 holding one ext4 filesystem on the whole disk, made from a tree `fill` writes. */
async function ext4Image(fill: (root: string) => void, sizeMb = 32): Promise<string> {
  const id = ++n;
  const root = join(dir, `tree-${id}`);
  mkdirSync(root);
  fill(root);
  const raw = join(dir, `disk-${id}.raw`);
  writeFileSync(raw, "");
  truncateSync(raw, sizeMb * 1024 * 1024);
  await run(["mkfs.ext4", "-q", "-F", "-L", "qvd-root", "-d", root, raw]);
  const qcow2 = join(dir, `disk-${id}.qcow2`);
  await run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2]);
  rmSync(raw);
  rmSync(root, { recursive: true });
  return qcow2;
}

/** A Debian-like layout: /vmlinuz and /initrd.img relative links into /boot. */
const debianLike = (root: string) => {
  mkdirSync(join(root, "boot"));
  fakeKernel(join(root, "boot/vmlinuz-6.1.0-test"));
  writeFileSync(join(root, "boot/initrd.img-6.1.0-test"), Buffer.from([0x1f, 0x8b, 8, 0, 1, 2, 3]));
  symlinkSync("boot/vmlinuz-6.1.0-test", join(root, "vmlinuz"));
  symlinkSync("boot/initrd.img-6.1.0-test", join(root, "initrd.img"));
};

/** The message of the ImageError `p` fails with, matching `pattern`. */
const refused = async (p: Promise<unknown>, pattern: RegExp): Promise<string> =>
  (await rejection(p, ImageError, pattern)).message;

/** What a failed preparation may leave in basefs/: the lock, nothing else of this image. */
const leftovers = (basefsDir: string, id: number) =>
  existsSync(basefsDir)
    ? readdirSync(basefsDir).filter((x) => x !== `.lock-${id}` && (x === String(id) || x.includes(`-${id}`)))
    : [];

describe("inspectQcow2: what counts as a KVM image", () => {
  test("a plain qcow2 passes, with its virtual size", async () => {
    const f = join(dir, "plain.qcow2");
    await run(["qemu-img", "create", "-q", "-f", "qcow2", f, "64M"]);
    expect(isQcow2(f)).toBe(true);
    expect(readFileSync(f).subarray(0, 4).equals(QCOW2_MAGIC)).toBe(true);
    expect(await inspectQcow2(f)).toEqual({ virtualSize: 64 * 1024 * 1024, allocatedBytes: 0 });
  });

  test("an LXC tarball is refused as one", async () => {
    const t = join(dir, "rootfs.tar.gz");
    mkdirSync(join(dir, "t/sbin"), { recursive: true });
    await run(["tar", "-czf", t, "-C", join(dir, "t"), "."]);
    expect(isQcow2(t)).toBe(false);
    await refused(
      inspectQcow2(t),
      /not a qcow2 disk image \(it looks like a root filesystem tarball: an image for LXC\)/,
    );
  });

  test("a raw disk, an empty file, a directory and a missing file are refused", async () => {
    const raw = join(dir, "raw.img");
    writeFileSync(raw, "");
    truncateSync(raw, 1024 * 1024);
    await run(["mkfs.ext4", "-q", "-F", raw]);
    await refused(inspectQcow2(raw), /raw\.img: not a qcow2 disk image; a KVM image is a qcow2 file/);
    writeFileSync(join(dir, "empty"), "");
    await refused(inspectQcow2(join(dir, "empty")), /not a qcow2 disk image/);
    await refused(inspectQcow2(dir), /not a regular file/);
    await refused(inspectQcow2(join(dir, "nope.qcow2")), /no such file/);
  });

  test("a qcow2 with a backing file is refused, without the backing file ever being opened", async () => {
    const base = join(dir, "base.qcow2");
    const over = join(dir, "over.qcow2");
    await run(["qemu-img", "create", "-q", "-f", "qcow2", base, "64M"]);
    await run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", over]);
    await refused(inspectQcow2(over), /has a backing file of its own/);
    // A tenant's qcow2 naming a node file: refused from the header alone.
    const evil = join(dir, "evil.qcow2");
    await run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/shadow", "-F", "raw", evil, "64M"]);
    await refused(inspectQcow2(evil), /has a backing file of its own/);
  });

  test("a qcow2 with an external data file is refused", async () => {
    const f = join(dir, "datafile.qcow2");
    await run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", `data_file=${join(dir, "datafile.raw")}`, f, "64M"]);
    await refused(inspectQcow2(f), /keeps its data in an external data file/);
  });

  test("a damaged qcow2 is refused: bad header, unknown version, metadata pointing outside the file", async () => {
    const junk = join(dir, "junk.qcow2");
    writeFileSync(junk, Buffer.concat([QCOW2_MAGIC, Buffer.alloc(12, 0xff)]));
    await refused(inspectQcow2(junk), /not a valid qcow2 image: the header is truncated/);
    const good = join(dir, "good.qcow2");
    await run(["qemu-img", "create", "-q", "-f", "qcow2", good, "64M"]);
    const v9 = Buffer.from(readFileSync(good));
    v9.writeUInt32BE(9, 4);
    writeFileSync(join(dir, "v9.qcow2"), v9);
    await refused(inspectQcow2(join(dir, "v9.qcow2")), /not a valid qcow2 image: version 9/);
    // The L1 table's offset (header bytes 40..47) far beyond the end of the file.
    const l1 = Buffer.from(readFileSync(good));
    l1.writeBigUInt64BE(1n << 40n, 40);
    writeFileSync(join(dir, "l1.qcow2"), l1);
    await refused(inspectQcow2(join(dir, "l1.qcow2")), /not a valid qcow2 image|damaged/);
    // Encrypted images cannot be read by the node.
    const enc = Buffer.from(readFileSync(good));
    enc.writeUInt32BE(1, 32);
    writeFileSync(join(dir, "enc.qcow2"), enc);
    await refused(inspectQcow2(join(dir, "enc.qcow2")), /encrypted/);
  });

  test("only absolute paths reach qemu-img (no json: or protocol names)", async () => {
    await refused(inspectQcow2('json:{"file":{"driver":"file","filename":"/etc/shadow"}}'), /must be absolute/);
    await refused(inspectQcow2("nbd://127.0.0.1/x"), /must be absolute/);
    await refused(
      prepareKvmImage({ image: "images/x.qcow2", basefsDir: join(dir, "basefs-rel"), diId: 1 }),
      /must be absolute/,
    );
  });
});

describe("prepareKvmImage: the kernel and initramfs of small ext4 images", () => {
  test("Debian's relative links are followed, also through a linked directory; a second call is skipped", async () => {
    const img = await ext4Image((r) => {
      mkdirSync(join(r, "realboot"));
      fakeKernel(join(r, "realboot/vmlinuz-x"));
      writeFileSync(join(r, "realboot/initrd.img-x"), "initrd!");
      symlinkSync("realboot", join(r, "boot"));
      symlinkSync("./boot/vmlinuz-x", join(r, "vmlinuz"));
      symlinkSync("boot/../boot/initrd.img-x", join(r, "initrd.img"));
    });
    const basefsDir = join(dir, "basefs-small");
    const phases: string[] = [];
    const res = await prepareKvmImage({
      image: img,
      basefsDir,
      diId: 3,
      sha256: sha256(img),
      onProgress: (p) => phases.push(p.phase),
    });
    expect(res).toEqual({
      image: img,
      kernel: join(basefsDir, "3/vmlinuz"),
      initrd: join(basefsDir, "3/initrd.img"),
      skipped: false,
    });
    expect(phases).toEqual(["verify", "convert", "extract"]);
    expect(readFileSync(res.initrd, "utf8")).toBe("initrd!");
    expect(readFileSync(res.kernel).subarray(0x202, 0x206).toString()).toBe("HdrS");
    // Only the two files and the record: the raw copy is gone.
    expect(readdirSync(join(basefsDir, "3")).sort()).toEqual(["initrd.img", "vmlinuz"]);
    expect(readdirSync(basefsDir).sort()).toEqual([".lock-3", ".meta-3.json", "3"]);
    const meta = JSON.parse(readFileSync(join(basefsDir, ".meta-3.json"), "utf8"));
    expect([meta.kind, meta.sha256, meta.kernel, meta.initrd]).toEqual([
      "kvm",
      sha256(img),
      "/realboot/vmlinuz-x",
      "/realboot/initrd.img-x",
    ]);
    const again = await prepareKvmImage({ image: img, basefsDir, diId: 3, sha256: sha256(img) });
    expect(again.skipped).toBe(true);
    expect(again.kernel).toBe(res.kernel);
    // Prepared from another file: refused, not silently reused.
    await refused(
      prepareKvmImage({ image: img, basefsDir, diId: 3, sha256: "0".repeat(64) }),
      /was prepared from another file/,
    );
  });

  test("links that leave the image, absolute links, loops, odd names, a missing or huge kernel are refused and leave nothing", async () => {
    const basefsDir = join(dir, "basefs-abuse");
    const cases: [string, (r: string) => void, RegExp][] = [
      [
        "escaping",
        (r) => {
          debianLike(r);
          rmSync(join(r, "vmlinuz"));
          symlinkSync("../../../etc/shadow", join(r, "vmlinuz"));
        },
        /\/vmlinuz in the image leads above its root/,
      ],
      [
        "absolute",
        (r) => {
          debianLike(r);
          rmSync(join(r, "vmlinuz"));
          symlinkSync("/etc/shadow", join(r, "vmlinuz"));
        },
        /\/vmlinuz in the image is an absolute link \("\/etc\/shadow"\)/,
      ],
      [
        "escaping through a directory link",
        (r) => {
          debianLike(r);
          mkdirSync(join(r, "a"));
          symlinkSync("../..", join(r, "a/up"));
          rmSync(join(r, "initrd.img"));
          symlinkSync("a/up/etc/shadow", join(r, "initrd.img"));
        },
        /\/initrd\.img in the image leads above its root/,
      ],
      [
        "missing",
        (r) => {
          debianLike(r);
          rmSync(join(r, "vmlinuz"));
        },
        /the image has no \/vmlinuz/,
      ],
      [
        "dangling",
        (r) => {
          debianLike(r);
          rmSync(join(r, "boot/initrd.img-6.1.0-test"));
        },
        /the image has no \/initrd\.img \(\/boot\/initrd\.img-6\.1\.0-test is missing\)/,
      ],
      [
        "looping",
        (r) => {
          debianLike(r);
          rmSync(join(r, "vmlinuz"));
          symlinkSync("loop2", join(r, "vmlinuz"));
          symlinkSync("vmlinuz", join(r, "loop2"));
        },
        /too many links/,
      ],
      [
        "quoting",
        (r) => {
          debianLike(r);
          rmSync(join(r, "vmlinuz"));
          symlinkSync('boot/x" /tmp/owned', join(r, "vmlinuz"));
        },
        /unusual characters/,
      ],
      [
        "a directory",
        (r) => {
          debianLike(r);
          rmSync(join(r, "vmlinuz"));
          mkdirSync(join(r, "vmlinuz"));
        },
        /\/vmlinuz in the image is not a regular file/,
      ],
      [
        "huge",
        (r) => {
          debianLike(r);
          truncateSync(join(r, "boot/initrd.img-6.1.0-test"), 300 * 1024 * 1024);
        },
        /\/initrd\.img in the image is 314572800 bytes, more than 268435456/,
      ],
      [
        "not a kernel",
        (r) => {
          debianLike(r);
          writeFileSync(join(r, "boot/vmlinuz-6.1.0-test"), "#!/bin/sh\n");
        },
        /is not a Linux kernel/,
      ],
    ];
    let id = 10;
    for (const [what, fill, pattern] of cases) {
      const img = await ext4Image(fill);
      const diId = ++id;
      const msg = await refused(prepareKvmImage({ image: img, basefsDir, diId }), pattern);
      expect(msg, what).toContain(img); // the message names the file
      expect(leftovers(basefsDir, diId), what).toEqual([]);
    }
    expect(existsSync("/tmp/owned")).toBe(false);
  }, 120_000);

  test("a qcow2 without an ext4 filesystem on the whole disk, a wrong checksum and a bad id are refused", async () => {
    const basefsDir = join(dir, "basefs-other");
    const blank = join(dir, "blank.qcow2");
    await run(["qemu-img", "create", "-q", "-f", "qcow2", blank, "16M"]);
    await refused(
      prepareKvmImage({ image: blank, basefsDir, diId: 1 }),
      /does not hold an ext4 filesystem on the whole disk/,
    );
    expect(leftovers(basefsDir, 1)).toEqual([]);
    const img = await ext4Image(debianLike);
    await refused(
      prepareKvmImage({ image: img, basefsDir, diId: 2, sha256: "a".repeat(64) }),
      /checksum mismatch: sha256 is [0-9a-f]{64}, expected a{64}; nothing was prepared/,
    );
    expect(leftovers(basefsDir, 2)).toEqual([]);
    await refused(prepareKvmImage({ image: img, basefsDir, diId: 2, sha256: "../x" }), /invalid expected sha256/);
    await refused(prepareKvmImage({ image: img, basefsDir, diId: -1 }), /invalid image id/);
    await refused(
      prepareKvmImage({ image: join(dir, "rootfs.tar.gz"), basefsDir, diId: 4 }),
      /root filesystem tarball/,
    );
    // A compressed qcow2 whose data would not fit beside basefs (a small tmpfs here) is refused before it is inflated.
    const bomb = join(dir, "bomb.qcow2");
    const rawBomb = join(dir, "bomb.raw");
    writeFileSync(rawBomb, Buffer.alloc(64 * 1024 * 1024, 0x5a));
    await run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", rawBomb, bomb]);
    rmSync(rawBomb);
    expect(Bun.file(bomb).size).toBeLessThan(2 * 1024 * 1024);
    const small = join(dir, "small-fs");
    mkdirSync(small);
    await run(["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", small]);
    try {
      await refused(
        prepareKvmImage({ image: bomb, basefsDir: join(small, "basefs"), diId: 6 }),
        /holds 64 MiB of data; reading its kernel needs that much free space beside .* \(\d+ MiB free\)/,
      );
      expect(leftovers(join(small, "basefs"), 6)).toEqual([]);
    } finally {
      await run(["umount", small]);
    }
    // An LXC image unpacked under the same id is not taken for a prepared KVM image.
    mkdirSync(join(basefsDir, "5/sbin"), { recursive: true });
    await refused(prepareKvmImage({ image: img, basefsDir, diId: 5 }), /does not hold a prepared KVM image/);
  });
});

describe("prepareKvmImage: the built desktop image", () => {
  let image: string;
  beforeAll(async () => {
    image = await kvmTestImage();
  }, 20 * 60_000);

  test("extracts a bzImage kernel and a compressed initramfs, once; a wrong checksum is refused", async () => {
    const basefsDir = join(dir, "basefs-real");
    const sha = sha256(image);
    const t = Date.now();
    const res = await prepareKvmImage({ image, basefsDir, diId: 1, sha256: sha });
    const seconds = (Date.now() - t) / 1000;
    expect(res.skipped).toBe(false);
    const kernel = readFileSync(res.kernel);
    expect(kernel.subarray(0x202, 0x206).toString("latin1")).toBe("HdrS");
    expect(kernel.length).toBeGreaterThan(4 * 1024 * 1024);
    const initrd = readFileSync(res.initrd);
    const gzip = initrd[0] === 0x1f && initrd[1] === 0x8b;
    const zstd = initrd.readUInt32LE(0) === 0xfd2fb528;
    expect(gzip || zstd).toBe(true);
    const meta = JSON.parse(readFileSync(join(basefsDir, ".meta-1.json"), "utf8"));
    expect(meta.kernel).toMatch(/^\/boot\/vmlinuz-\d+\.\d+\.\d+-\d+-amd64$/);
    expect(meta.initrd).toMatch(/^\/boot\/initrd\.img-\d+\.\d+\.\d+-\d+-amd64$/);
    console.log(
      `prepared the desktop image (${(meta.bytes / 1048576).toFixed(0)} MiB qcow2) in ${seconds.toFixed(1)} s`,
    );
    const t2 = Date.now();
    expect((await prepareKvmImage({ image, basefsDir, diId: 1, sha256: sha })).skipped).toBe(true);
    expect(Date.now() - t2).toBeLessThan(500);
    await refused(prepareKvmImage({ image, basefsDir, diId: 2, sha256: "f".repeat(64) }), /checksum mismatch/);
    expect(leftovers(basefsDir, 2)).toEqual([]);
  }, 120_000);
});
