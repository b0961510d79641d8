// `qvd hkd` (and the HKD half of `qvd node`): runs this node's desktops.
import { roleRegistry, serveRoleMetrics } from "../metrics.ts";
import { basename, join } from "node:path";
import { defineCommand } from "citty";
import { commonArgs, configFromArgs, layerDatabaseConfig } from "../cli.ts";
import type { Config } from "../config.ts";
import type { DiRow } from "../db/dis.ts";
import { findHostByName, registerHost } from "../db/node.ts";
import { isSafePathComponent } from "../db/objects.ts";
import { connect, type Sql } from "../db/pool.ts";
import { UserError } from "../errors.ts";
import { acquireNodeLock } from "../hkd/lock.ts";
import { Hkd } from "../hkd/hkd.ts";
import { logger } from "../log.ts";
import { imagePaths, unpackImage } from "../virt/images.ts";
import type { Backend, Hypervisor } from "../virt/backend.ts";
import { idmapFromConfig } from "../virt/lxc.ts";
import { prepareKvmImage } from "../virt/kvm-image.ts";
import { nodeBackendsFromConfig } from "../virt/registry.ts";
import { setHostHypervisors } from "../db/hosts.ts";

const log = logger("hkd");

export const hkdArgs = {
  ...commonArgs,
  register: { type: "boolean", description: "Create this node's hosts row if it does not exist (needs --address)" },
  address: { type: "string", description: "The node's address, for --register", valueHint: "ADDR" },
} as const;

/** The qvd binary that guests get: configured, or this very binary when it is the compiled qvd. */
function qvdBinary(cfg: Config): string {
  const configured = cfg.get("hkd.qvd_binary");
  if (configured) return configured;
  if (!["bun", "bun.exe"].includes(basename(process.execPath))) return process.execPath;
  throw new UserError("running from sources: set hkd.qvd_binary to a compiled qvd (npm run build makes dist/qvd)");
}

/** Starts the HKD and resolves with a function that stops it. */
export async function startHkd(
  cfg: Config,
  opts: {
    register?: boolean;
    address?: string /** Tests only: watch the real backend's calls. */;
    wrapBackend?: (b: Backend) => Backend;
  } = {},
): Promise<{ hkd: Hkd; sql: Sql; stop: () => Promise<void> }> {
  const release = acquireNodeLock(join(cfg.get("path.run"), "hkd.lock"));
  const url = cfg.databaseUrl();
  const sql = connect(url, {
    max: cfg.get("database.pool_size"),
    connectTimeout: cfg.get("database.connect_timeout"),
    applicationName: "qvd-hkd",
  });
  try {
    cfg = await layerDatabaseConfig(sql, url, cfg, (m) => log.warn(m));
    const name = cfg.get("nodename");
    let host = await findHostByName(sql, name);
    if (!host && opts.register) {
      if (!opts.address) throw new UserError("--register needs --address: the address other nodes reach this node on");
      host = await registerHost(sql, name, opts.address);
      log.info("registered this node", { name, id: host.id });
    }
    if (!host)
      throw new UserError(
        `no host named "${name}" in the database: add it with the API (or start with --register --address ADDR)`,
      );
    if (!host.backend) throw new UserError(`host "${name}" is not a backend node (hosts.backend is false)`);
    const node = await nodeBackendsFromConfig(cfg);
    const backend = opts.wrapBackend ? opts.wrapBackend(node.backend) : node.backend;
    const hypervisors = node.backend.hypervisors;
    await setHostHypervisors(sql, host.id, hypervisors, node.notes);
    const root = cfg.get("path.storage.root");
    const imagesDir = cfg.storagePath("path.storage.images");
    const metrics = roleRegistry();
    const hkd = new Hkd({
      sql,
      cfg,
      host,
      backend,
      hypervisors,
      databaseUrl: url,
      qvdBinary: qvdBinary(cfg),
      metrics,
      homeOf: (tenant, user, hypervisor) => {
        // Names from before they were checked (".." escaped the homes): refused, not joined.
        if (!isSafePathComponent(tenant) || !isSafePathComponent(user))
          throw new UserError(
            `tenant ${JSON.stringify(tenant)} or user ${JSON.stringify(user)} is not a usable directory name; rename it`,
          );
        const home = join(cfg.storagePath("path.storage.homes"), tenant, user);
        return hypervisor === "kvm" ? `${home}.qcow2` : home;
      },
      images: {
        async imageFor(di: DiRow, hypervisor: Hypervisor) {
          const p = imagePaths(root, imagesDir, di);
          if (hypervisor === "kvm") {
            const k = await prepareKvmImage({
              image: p.image,
              basefsDir: p.basefsDir,
              diId: di.id,
              sha256: di.sha256,
              qemuImg: cfg.get("vm.kvm.qemu_img"),
            });
            return { diId: di.id, path: k.image, kernel: k.kernel, initrd: k.initrd };
          }
          const res = await unpackImage({
            image: p.image,
            basefsDir: p.basefsDir,
            diId: di.id,
            sha256: di.sha256,
            idmap: idmapFromConfig(cfg),
            onProgress: (pr) => log.debug("unpacking image", { di: di.id, ...pr }),
          });
          return { diId: di.id, path: res.rootfs };
        },
      },
    });
    await hkd.start();
    let metricsServer;
    try {
      metricsServer = serveRoleMetrics(cfg, "hkd.metrics.listen", metrics);
    } catch (err) {
      await hkd.stop();
      throw err;
    }
    return {
      hkd,
      sql,
      stop: async () => {
        metricsServer?.stop();
        await hkd.stop();
        await sql.end({ timeout: 5 });
        release();
      },
    };
  } catch (err) {
    await sql.end({ timeout: 1 });
    release();
    throw err;
  }
}

/** Runs until SIGINT/SIGTERM. */
export async function runUntilSignal(stop: () => Promise<void>): Promise<void> {
  // A timer keeps the event loop honest (Bun spins when only signal handlers keep it alive).
  const keepAlive = setInterval(() => {}, 1 << 30);
  // A child of `qvd node` stops as well when that parent is gone (even killed hard).
  const parent = Number(process.env.QVD_PARENT_PID) || 0;
  let orphaned: ReturnType<typeof setInterval> | undefined;
  await new Promise<void>((resolve) => {
    process.once("SIGINT", () => resolve());
    process.once("SIGTERM", () => resolve());
    if (parent > 0) orphaned = setInterval(() => process.ppid !== parent && resolve(), 1000);
  });
  clearInterval(orphaned);
  clearInterval(keepAlive);
  log.info("stopping");
  await stop();
}

export default defineCommand({
  meta: { name: "hkd", description: "Run this node's desktops (the House Keeping Daemon), as root" },
  args: hkdArgs,
  async run({ args, rawArgs }) {
    const cfg = configFromArgs(args, rawArgs);
    const { stop } = await startHkd(cfg, { register: args.register, address: args.address });
    console.log(`qvd hkd running (node ${cfg.get("nodename")})`); // qvd node starts its L7R on this line
    await runUntilSignal(stop);
  },
});
