// `npm run demo [-- --dir DIR]`: installs the system programs the demo needs, builds dist/qvd,
// then runs `dist/qvd demo` with the given arguments in the foreground (Ctrl-C stops it).
import { constants } from "node:os";
import { join } from "node:path";
import { buildBinary } from "./build-binaries.ts";
import { ensureDeps } from "./deps.ts";

async function main(): Promise<number> {
  try {
    // The farm (database, containers, namespace, firewall, image build, certificate) and the client.
    await ensureDeps([
      "postgresql",
      "runuser",
      "lxc",
      "iproute2",
      "nftables",
      "nsenter",
      "debootstrap",
      "openssl",
      "nxproxy",
      "xvnc",
    ]);
    console.log("Building dist/qvd…");
    const qvd = await buildBinary(join(import.meta.dir, "..", "dist", "qvd"));
    const proc = Bun.spawn([qvd, "demo", ...process.argv.slice(2)], { stdio: ["inherit", "inherit", "inherit"] });
    // The demo stops desktops, node, API and PostgreSQL on SIGINT/SIGTERM: pass them on and wait for it.
    for (const sig of ["SIGINT", "SIGTERM"] as const) process.on(sig, () => proc.kill(sig));
    const code = await proc.exited;
    const sig = proc.signalCode;
    return sig ? 128 + (typeof sig === "number" ? sig : constants.signals[sig]) : code;
  } catch (err) {
    console.error(`demo: ${(err as Error).message}`);
    return 1;
  }
}

process.exit(await main());
