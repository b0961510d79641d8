// `qvd di build | check | unpack`: disk images. `build` makes a Debian desktop image with
// debootstrap (src/virt/image-build.ts), `--kvm` a bootable qcow2 of it; `check` reads an image
// (tarball or qcow2) as a node would before using it; `unpack` unpacks a tarball into basefs/
// (src/virt/images.ts) or extracts a qcow2's kernel and initramfs (src/virt/kvm-image.ts).
import { dirname, join, resolve } from "node:path";
import { defineCommand } from "citty";
import { commonArgs, configFromArgs } from "../cli.ts";
import { UserError } from "../errors.ts";
import { statSync } from "node:fs";
import {
  buildImage,
  DEFAULT_IMAGE_NAME,
  DEFAULT_KVM_IMAGE_NAME,
  DESKTOP_PACKAGES,
  KVM_PACKAGES,
  sha256File,
  SUITE,
} from "../virt/image-build.ts";
import { checkEntries, ImageError, inspectImage, unpackImage } from "../virt/images.ts";
import { inspectQcow2, isQcow2, prepareKvmImage } from "../virt/kvm-image.ts";
import { idmapFromConfig } from "../virt/lxc.ts";

const MiB = (n: number) => `${(n / 1024 / 1024).toFixed(1)} MiB`;

const build = defineCommand({
  meta: {
    name: "build",
    description: `Build a Debian ${SUITE} desktop image (nxagent, xinit, jwm, xterm, X apps) with debootstrap; --kvm: a bootable qcow2 for KVM desktops; needs root`,
  },
  args: {
    ...commonArgs,
    output: {
      type: "string",
      description: `Image file to write (default <path.storage.images>/${DEFAULT_IMAGE_NAME}, with --kvm ${DEFAULT_KVM_IMAGE_NAME}); .tar.gz, .tar.xz, .tar.zst or .tar; .qcow2 with --kvm`,
      valueHint: "FILE",
    },
    kvm: {
      type: "boolean",
      description:
        "A KVM image: the same desktop with a kernel, systemd and the VMA's service, as a qcow2 disk QEMU boots directly",
    },
    cache: {
      type: "string",
      description: "Cache of packages and finished images (di.build.cache, default /var/cache/qvd/debootstrap)",
      valueHint: "DIR",
    },
    mirror: {
      type: "string",
      description: "Debian mirror (di.build.mirror; default: from this machine's apt sources)",
      valueHint: "URL",
    },
    rebuild: {
      type: "boolean",
      description: "Build anew: ignore cached images and the cached base system (downloads are still reused)",
    },
  },
  async run({ args, rawArgs }) {
    const cfg = configFromArgs(args, rawArgs, [
      { flag: "--cache", key: "di.build.cache", value: args.cache },
      { flag: "--mirror", key: "di.build.mirror", value: args.mirror },
    ]);
    const imagesDir = cfg.storagePath("path.storage.images");
    const kvm = Boolean(args.kvm);
    const output = resolve(args.output ?? join(imagesDir, kvm ? DEFAULT_KVM_IMAGE_NAME : DEFAULT_IMAGE_NAME));
    console.log(`Building ${output}${kvm ? " (KVM)" : ""}`);
    console.log(`Packages: debootstrap minbase + ${[...DESKTOP_PACKAGES, ...(kvm ? KVM_PACKAGES : [])].join(" ")}`);
    const res = await buildImage({
      output,
      cacheDir: cfg.get("di.build.cache"),
      mirror: cfg.get("di.build.mirror"),
      rebuild: Boolean(args.rebuild),
      kvm,
      log: (line) => console.log(line),
    });
    console.log(`${res.cached ? "Copied from the cache" : "Built"} in ${res.seconds.toFixed(0)}s.`);
    console.log(`Image:   ${res.output}`);
    console.log(`Size:    ${MiB(res.bytes)} (${res.bytes} bytes)`);
    if (kvm)
      console.log(`Disk:    ${MiB((await inspectQcow2(res.output)).virtualSize)} virtual (ext4, label qvd-root)`);
    console.log(`SHA-256: ${res.sha256}`);
    if (dirname(res.output) === resolve(imagesDir))
      console.log(
        `Register it: qvd admin di create osf=<${kvm ? "a KVM OSF" : "OSF"}> path=${res.output.slice(resolve(imagesDir).length + 1)}`,
      );
  },
});

const check = defineCommand({
  meta: {
    name: "check",
    description:
      "Check an image as a node does before using it: a tarball's checksum, listing and unsafe entries; a qcow2's header, backing and data files",
  },
  args: {
    file: { type: "positional", description: "Image tarball or qcow2", required: true },
    sha256: { type: "string", description: "Expected SHA-256", valueHint: "HEX" },
  },
  async run({ args }) {
    const file = resolve(String(args.file));
    if (isQcow2(file)) {
      const { virtualSize } = await inspectQcow2(file);
      const sha = await sha256File(file);
      if (args.sha256 && sha !== String(args.sha256).toLowerCase())
        throw new ImageError(`${file}: checksum mismatch: sha256 is ${sha}, expected ${args.sha256}`);
      console.log(`${file}: ok (qcow2, a KVM image)`);
      console.log(
        `Size:        ${MiB(statSync(file).size)} (${statSync(file).size} bytes), ${MiB(virtualSize)} virtual`,
      );
      console.log(`SHA-256:     ${sha}`);
      return;
    }
    const info = await inspectImage(file);
    if (args.sha256 && info.sha256 !== String(args.sha256).toLowerCase())
      throw new ImageError(`${file}: checksum mismatch: sha256 is ${info.sha256}, expected ${args.sha256}`);
    let skip;
    try {
      ({ skip } = checkEntries(info.entries));
    } catch (err) {
      if (err instanceof UserError)
        throw new ImageError(`${file}: ${err.message.replace(/; nothing was extracted$/, "")}`);
      throw err;
    }
    console.log(`${file}: ok`);
    console.log(`Size:        ${MiB(info.bytes)} (${info.bytes} bytes, ${info.compression})`);
    console.log(`SHA-256:     ${info.sha256}`);
    console.log(`Entries:     ${info.entries.length}`);
    if (skip.length)
      console.log(
        `Not unpacked: ${skip.length} device nodes (${skip
          .slice(0, 5)
          .map((e) => e.name)
          .join(", ")}${skip.length > 5 ? ", …" : ""})`,
      );
  },
});

const unpack = defineCommand({
  meta: {
    name: "unpack",
    description:
      "Unpack an image into <path.storage.root>/basefs/<ID> now (a qcow2: its kernel and initramfs), as a node does at the first start of a VM on it",
  },
  args: {
    ...commonArgs,
    file: { type: "positional", description: "Image tarball", required: true },
    id: { type: "string", description: "The image's id (dis.id)", required: true, valueHint: "ID" },
    sha256: { type: "string", description: "Expected SHA-256", valueHint: "HEX" },
  },
  async run({ args, rawArgs }) {
    const cfg = configFromArgs(args, rawArgs);
    const id = Number(args.id);
    if (!/^\d+$/.test(String(args.id))) throw new UserError(`--id ${args.id}: expected an image id`);
    const file = resolve(String(args.file));
    if (isQcow2(file)) {
      const res = await prepareKvmImage({
        image: file,
        basefsDir: join(cfg.get("path.storage.root"), "basefs"),
        diId: id,
        sha256: args.sha256,
        qemuImg: cfg.get("vm.kvm.qemu_img"),
        onProgress: (p) =>
          console.log(p.phase === "wait" ? "waiting for another preparation of this image…" : `${p.phase}…`),
      });
      console.log(`${res.skipped ? "Already prepared:" : "Prepared:"} ${res.kernel}, ${res.initrd}`);
      return;
    }
    let last = -1;
    const res = await unpackImage({
      image: resolve(String(args.file)),
      basefsDir: join(cfg.get("path.storage.root"), "basefs"),
      diId: id,
      sha256: args.sha256,
      idmap: idmapFromConfig(cfg), // as this node's desktops will use it
      onProgress: (p) => {
        if (p.phase === "wait") return console.log("waiting for another unpack of this image…");
        const pct = p.total ? Math.floor((p.bytes / p.total) * 10) * 10 : 100;
        if (pct !== last || p.bytes === p.total) console.log(`${p.phase}: ${pct}%`);
        last = p.bytes === p.total ? -1 : pct;
      },
    });
    for (const s of res.skipped) console.log(`skipped ${s}`);
    console.log(
      `${res.unpacked ? "Unpacked into" : "Already unpacked:"} ${res.basefs}${res.rootfs !== res.basefs ? ` (root filesystem ${res.rootfs})` : ""}`,
    );
  },
});

export default defineCommand({
  meta: { name: "di", description: "Disk images: build a Debian desktop image, check or unpack an image file" },
  subCommands: { build, check, unpack },
});
