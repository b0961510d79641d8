// `qvd vma`: the agent inside each desktop (src/vma/README.md). It reads the per-start file the
// backend hands the guest (/run/qvd/vma.json: vm_id, secret, node_address, port and optional
// `settings`), serves the VMA API (src/vma/server.ts), runs the NX session (src/vma/session.ts)
// and, as a container's init, does PID 1's duties (src/vma/init.ts).
//
// Configuration keys (vma.*, path.run) come, lowest first, from /etc/qvd/vma.conf in the image,
// QVD_* variables, the `settings` object of vma.json, then `--set KEY=VALUE`; except the keys
// only the node decides (src/vma/node-settings.ts): the image's vma.conf cannot set them, and
// vma.json's values for them win over everything.
import { existsSync, readFileSync } from "node:fs";
import { defineCommand } from "citty";
import { z } from "zod";
import { setFlags } from "../cli.ts";
import { type Config, loadConfig } from "../config.ts";
import { identityRules } from "../auth/identity.ts";
import { ConfigError, UserError } from "../errors.ts";
import { logger, setLogFormat, setLogLevel } from "../log.ts";
import { run } from "../run.ts";
import { isPid1, powerOff, setupInit, type InitOptions } from "../vma/init.ts";
import { startVmaServer } from "../vma/server.ts";
import { kvmGuestSetup } from "../vma/kvm-guest.ts";
import { Session } from "../vma/session.ts";
import { isNodeOnlyVmaKey } from "../vma/node-settings.ts";
import { sharesService } from "../vma/shares.ts";
import { UsbipAttacher } from "../vma/usbip.ts";
import { printingService } from "../vma/printing.ts";
import { audioService } from "../vma/audio.ts";

const log = logger("vma");

export const DEFAULT_VMA_FILE = "/run/qvd/vma.json";
const GUEST_CONFIG = "/etc/qvd/vma.conf";

const vmaFileSchema = z.object({
  vm_id: z.number().int().min(0),
  secret: z.string().min(16, "must be at least 16 characters"),
  node_address: z
    .string()
    .regex(/^$|^[\d.]+$|^[0-9a-fA-F:]+$/, "expected an IP address")
    .default(""),
  port: z.number().int().min(1).max(65535).default(3030),
  settings: z.record(z.string(), z.union([z.string(), z.number(), z.boolean()])).default({}),
});
export type VmaFile = z.infer<typeof vmaFileSchema>;

export function readVmaFile(file: string): VmaFile {
  let raw: unknown;
  try {
    raw = JSON.parse(readFileSync(file, "utf8"));
  } catch (err) {
    throw new ConfigError(`${file}: cannot read the VMA file: ${(err as Error).message}`);
  }
  const r = vmaFileSchema.safeParse(raw);
  if (!r.success) {
    const i = r.error.issues[0]!;
    throw new ConfigError(`${file}: ${i.path.join(".") || "(file)"}: ${i.message}`);
  }
  return r.data;
}

/**
 * The VMA's configuration (see the top of this file). `ignored`: the image's settings that were
 * dropped because only the node sets them (each is logged).
 */
export function loadVmaConfig(
  vf: VmaFile,
  file: string,
  o: {
    guestConfig?: string;
    flags?: { flag: string; key: string; value: string }[];
    env?: Record<string, string | undefined>;
  } = {},
): { cfg: Config; ignored: string[] } {
  const asFlag = ([k, v]: [string, string | number | boolean]) => ({
    flag: `${file} settings`,
    key: k,
    value: typeof v === "boolean" ? (v ? "1" : "0") : String(v),
  });
  const settings = Object.entries(vf.settings);
  const flags = [
    ...settings.filter(([k]) => !isNodeOnlyVmaKey(k)).map(asFlag),
    ...(o.flags ?? []),
    ...settings.filter(([k]) => isNodeOnlyVmaKey(k)).map(asFlag),
  ];
  const guest = o.guestConfig ?? GUEST_CONFIG;
  const ignored: string[] = [];
  const cfg = loadConfig({
    file: existsSync(guest) ? guest : undefined,
    flags,
    env: o.env,
    defaultFileExists: () => false,
    fileFilter: (s) => {
      if (!isNodeOnlyVmaKey(s.key)) return true;
      ignored.push(s.key);
      log.warn("ignoring a setting of the image's vma.conf: only the node sets it", {
        key: s.key,
        where: s.source.kind === "file" ? `${s.source.file}:${s.source.line}` : "",
      });
      return false;
    },
  });
  return { cfg, ignored };
}

export default defineCommand({
  meta: {
    name: "vma",
    description: "Run the agent inside a desktop (VMA): HTTP API on port 3030, NX session, init duties",
  },
  args: {
    config: { type: "string", description: `The per-start VMA file (default ${DEFAULT_VMA_FILE})`, valueHint: "FILE" },
    listen: {
      type: "string",
      description: "ADDRESS:PORT to listen on (default all addresses, the file's port)",
      valueHint: "ADDR:PORT",
    },
    set: { type: "string", description: "Set a configuration key for this run (repeatable)", valueHint: "KEY=VALUE" },
    "kvm-guest": {
      type: "boolean",
      description:
        "In a KVM desktop: take the per-start file from QEMU's fw_cfg, set up the network and the home disk first (src/vma/kvm-guest.ts)",
    },
  },
  async run({ args, rawArgs }) {
    const file = args.config ?? DEFAULT_VMA_FILE;
    if (args["kvm-guest"]) await kvmGuestSetup({ vmaFile: file });
    const vf = readVmaFile(file);
    const { cfg } = loadVmaConfig(vf, file, { flags: setFlags(rawArgs) });
    setLogLevel(cfg.get("log.level"));
    setLogFormat(cfg.get("log.format"));

    let host = "0.0.0.0";
    let port = vf.port;
    if (args.listen) {
      const m = /^(\[[0-9a-fA-F:]+\]|[\w.-]*):(\d{1,5})$/.exec(args.listen);
      if (!m) throw new UserError(`--listen ${args.listen}: expected ADDRESS:PORT`);
      host = m[1]!.replace(/^\[|\]$/g, "") || "0.0.0.0";
      port = Number(m[2]);
    }

    // The node's identity rules (vma.json settings): the session's and x_start's checks alike.
    const identity = identityRules(cfg);
    const sec = (
      k: "vma.timeout.starting" | "vma.timeout.listening" | "vma.timeout.suspending" | "vma.timeout.stopping",
    ) => cfg.get(k) * 1000;
    const split = (s: string) => s.split(/\s+/).filter(Boolean);
    const session = new Session({
      display: cfg.get("vma.display"),
      nxagent: cfg.get("vma.command.nxagent"),
      xinit: cfg.get("vma.command.xinit"),
      nxagentExtraArgs: split(cfg.get("vma.nxagent.args.extra")),
      tolerancechecks: cfg.get("vma.nxagent.tolerancechecks"),
      // A second lock beside the session's cookie: nxagent takes only the node (IPv4 only in nxcomp).
      acceptFrom: /^\d+\.\d+\.\d+\.\d+$/.test(vf.node_address) ? vf.node_address : "",
      sessionCommand: split(cfg.get("vma.session.command")),
      asCurrentUser: cfg.get("vma.session.as_current_user"),
      root: cfg.get("vma.provision.root"),
      homePath: cfg.get("vma.user.home.path"),
      shell: cfg.get("vma.user.shell"),
      groups: cfg
        .get("vma.user.groups")
        .split(",")
        .map((g) => g.trim())
        .filter(Boolean),
      identity,
      defaultLang: cfg.get("vma.default.lang"),
      runDir: cfg.get("path.run"),
      timeouts: {
        starting: sec("vma.timeout.starting"),
        listening: sec("vma.timeout.listening"),
        suspending: sec("vma.timeout.suspending"),
        stopping: sec("vma.timeout.stopping"),
      },
      // The session's side channels (src/vma/services.ts); each checks its own switches.
      services: [
        printingService({
          enable: cfg.get("vma.printing.enable"),
          cupsd: cfg.get("vma.command.cupsd"),
          lpadmin: cfg.get("vma.command.lpadmin"),
          lpstat: cfg.get("vma.command.lpstat"),
        }),
        audioService({
          enable: cfg.get("vma.audio.enable"),
          pulseaudio: cfg.get("vma.command.pulseaudio"),
          pactl: cfg.get("vma.command.pactl"),
          latencyMs: cfg.get("vma.audio.latency_msec"),
        }),
        // process.execPath: this qvd binary, as the guest sees it (nxagent runs `<it> vma-slave`).
        sharesService({
          enabled: cfg.get("vma.slave.enable"),
          qvd: process.execPath,
          asCurrentUser: cfg.get("vma.session.as_current_user"),
          sshfs: cfg.get("vma.command.sshfs"),
          sftpServer: cfg.get("vma.command.sftp_server"),
          xdgOpen: cfg.get("vma.command.xdg_open"),
          // USB devices only where the kernel is the desktop's own.
          usbip: args["kvm-guest"] ? new UsbipAttacher() : undefined,
        }),
      ],
    });
    if (cfg.get("vma.session.as_current_user"))
      log.warn(
        "vma.session.as_current_user is set: no provisioning, the session runs as this process's user (test aid)",
      );

    let server: ReturnType<typeof startVmaServer> | undefined;
    let poweroffRequested = false;
    const init: InitOptions = {
      shutdown: async (reason) => {
        await session.shutdown(sec("vma.timeout.stopping"));
        await server?.stop(true);
        const cmd = cfg.get("vma.poweroff.command");
        if (poweroffRequested && !isPid1() && cmd) {
          log.info("powering off", { cmd, reason });
          await run(split(cmd), { allowFail: true, timeoutMs: 60_000 });
        }
      },
    };
    await setupInit(init);
    server = startVmaServer(
      {
        secret: vf.secret,
        nodeAddress: vf.node_address,
        vmId: vf.vm_id,
        session,
        expireCommand: cfg.get("vma.on_action.expire"),
        expireNotice: cfg.get("vma.command.xmessage"),
        identity,
        powerOff: () => {
          poweroffRequested = true;
          void powerOff(init, "poweroff method");
        },
      },
      host,
      port,
    );
    log.info("listening", {
      address: `${host}:${server.port}`,
      vm_id: vf.vm_id,
      node_address: vf.node_address || "(any)",
      pid1: isPid1(),
    });
    console.log(`qvd vma listening on ${host}:${server.port}`);
    await new Promise(() => {}); // runs until the shutdown path exits the process
  },
});
