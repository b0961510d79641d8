// The KVM desktop image of `qvd di build --kvm`, cached under /var/cache/qvd/test and built again
// when the build code is newer (the build cache under /var/cache/qvd/debootstrap then makes an
// unchanged recipe a copy). Tests copy it if they may change it: others use it at the same time.
import { existsSync, statSync } from "node:fs";
import { join } from "node:path";
import { buildImage } from "../../src/virt/image-build.ts";

export const KVM_TEST_IMAGE = "/var/cache/qvd/test/debian-bookworm-desktop.qcow2";
const SOURCES = [
  join(import.meta.dir, "../../src/roles/di.ts"),
  join(import.meta.dir, "../../src/virt/image-build.ts"),
];

/** Whether `file`, an image of `qvd di build` (this one or the LXC one of node.ts), is newer than the build code. */
export const builtImageFresh = (file: string) =>
  existsSync(file) && SOURCES.every((s) => statSync(s).mtimeMs < statSync(file).mtimeMs);

export const kvmTestImageFresh = () => builtImageFresh(KVM_TEST_IMAGE);

/** The built KVM test image (a qcow2), built first when missing or stale (about 2–3 minutes). */
export async function kvmTestImage(): Promise<string> {
  if (!kvmTestImageFresh()) {
    const { ensureDeps } = await import("../../scripts/deps.ts");
    await ensureDeps(["debootstrap", "qemu-img", "e2fsprogs"], () => {});
    await buildImage({ output: KVM_TEST_IMAGE, cacheDir: "/var/cache/qvd/debootstrap", kvm: true, log: () => {} });
  }
  return KVM_TEST_IMAGE;
}
