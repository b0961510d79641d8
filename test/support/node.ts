// Node-side test helpers: the compiled qvd binary (built once per test run), a network
// namespace of the test's own (198.18.0.0/15 only, removed afterwards), a small busybox image
// tarball, and running a qvd role inside the namespace.
import { chmodSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { randomBytes } from "node:crypto";
import { run } from "../../src/run.ts";
import { buildBinary } from "../../scripts/build-binaries.ts";

const shared = ((globalThis as Record<string, unknown>).__qvdTestNode ??= {}) as { binary?: Promise<string> };

/** The compiled qvd of the current sources, built once per test run into a temp dir. */
export function qvdBinary(): Promise<string> {
  return (shared.binary ??= (async () => {
    const dir = mkdtempSync("/tmp/qvd-test-bin-");
    chmodSync(dir, 0o755);
    return buildBinary(join(dir, "qvd"));
  })());
}

export interface Netns {
  name: string;
  /** argv prefix that runs a program inside the namespace (nsenter keeps /sys as it is). */
  exec: string[];
  remove(): Promise<void>;
}

export async function createNetns(): Promise<Netns> {
  const name = `qvdt-${randomBytes(3).toString("hex")}`;
  await run(["ip", "netns", "add", name]);
  await run(["ip", "-n", name, "link", "set", "lo", "up"]);
  return {
    name,
    exec: ["nsenter", `--net=/run/netns/${name}`, "--"],
    async remove() {
      await run(["ip", "netns", "del", name], { allowFail: true });
    },
  };
}

/**
 * A tiny root filesystem as an image tarball: static busybox, the directories a container
 * needs, the C libraries the (dynamically linked) qvd binary needs to run as the VMA, and
 * /sbin/init.sh (an init that is not the VMA: sleeps, halts on PWR/TERM).
 */
export async function busyboxImage(file: string): Promise<void> {
  const binary = await qvdBinary();
  const dir = mkdtempSync("/tmp/qvd-test-rootfs-");
  try {
    for (const d of ["bin", "sbin", "etc", "proc", "sys", "dev", "run", "tmp", "home", "root", "usr/local/bin"]) mkdirSync(join(dir, d), { recursive: true });
    const bb = existsSync("/usr/bin/busybox") ? "/usr/bin/busybox" : "/bin/busybox";
    copyFileSync(bb, join(dir, "bin/busybox"));
    chmodSync(join(dir, "bin/busybox"), 0o755);
    for (const a of ["sh", "ls", "cat", "echo", "sleep", "touch", "test", "mount", "ip", "id", "chown", "mkdir"]) symlinkSync("busybox", join(dir, "bin", a));
    for (const m of (await run(["ldd", binary])).stdout.matchAll(/(\/\S+\.so[.\d]*)/g)) {
      mkdirSync(join(dir, dirname(m[1]!)), { recursive: true });
      if (!existsSync(join(dir, m[1]!))) copyFileSync(m[1]!, join(dir, m[1]!));
    }
    writeFileSync(join(dir, "etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n");
    writeFileSync(join(dir, "etc/group"), "root:x:0:\n");
    writeFileSync(join(dir, "sbin/init.sh"), "#!/bin/sh\ntrap 'exit 0' PWR TERM\nsleep 100000 &\nwait\n", { mode: 0o755 });
    await run(["tar", "-C", dir, "--numeric-owner", "-czf", file, "."]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Waits until `pred` resolves true; fails with `what` after `ms`. */
export async function until(pred: () => Promise<boolean> | boolean, what: string, ms = 60_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await pred())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(100);
  }
}
