// `qvd client`: connect to a desktop through the L7R and show it with nxproxy on $DISPLAY.
// Exit codes: 0 the session ended normally, 1 other failure (nxproxy), 2 usage, 3 login
// refused, 4 forbidden or blocked, 5 no such desktop, 6 the server could not start the
// desktop, 7 cannot reach the server (connection, TLS, not a QVD server).
import { defineCommand } from "citty";
import { readFileSync } from "node:fs";
import { passwordFromFile, readPassword } from "../admin/prompt.ts";
import { UserError } from "../errors.ts";
import { setLogLevel } from "../log.ts";
import { EXIT } from "../client/l7r.ts";
import { checkServiceOptions, runClient } from "../client/session.ts";
import { BUSID } from "../client/slave.ts";

const usage = (m: string) => new UserError(m, EXIT.usage);

/** A token file: its first non-empty line (the auth_token of /qvd/create_auth_token, newline included, is fine). */
function tokenFromFile(file: string): string {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (err) {
    throw usage(`--token-file ${file}: cannot read it: ${(err as Error).message}`);
  }
  const line = text
    .split(/\r?\n/)
    .map((l) => l.trim())
    .find(Boolean);
  if (!line) throw usage(`--token-file ${file}: the file is empty`);
  return line;
}

/** Every value of a repeatable string flag (citty keeps only the last): `--flag V` and `--flag=V`. */
export function repeated(rawArgs: string[], flag: string): string[] {
  const out: string[] = [];
  for (let i = 0; i < rawArgs.length; i++) {
    const a = rawArgs[i]!;
    if (a === "--") break;
    if (a === `--${flag}`) {
      const v = rawArgs[i + 1];
      if (v === undefined || v.startsWith("--")) throw usage(`--${flag} needs a value`);
      out.push(v);
      i++;
    } else if (a.startsWith(`--${flag}=`)) out.push(a.slice(flag.length + 3));
  }
  return out;
}

const LINKS = new Set(["modem", "isdn", "adsl", "wan", "lan", "local"]);

export default defineCommand({
  meta: { name: "client", description: "Connect to a QVD desktop (nxproxy on $DISPLAY)" },
  args: {
    host: { type: "string", description: "The QVD server (HOST or HOST:PORT)", valueHint: "HOST", required: true },
    port: { type: "string", description: "Its port (default 8443)", valueHint: "PORT" },
    user: { type: "string", description: "User name, or user@tenant (not needed with a token)", valueHint: "USER" },
    "password-file": {
      type: "string",
      description:
        "Read the password from the first line of FILE (else QVD_PASSWORD, else a prompt, else standard input)",
      valueHint: "FILE",
    },
    // Never the token itself on the command line: argv is visible to every user of the machine.
    "token-file": {
      type: "string",
      description:
        "Log in with a bearer token (from /qvd/create_auth_token, see --print-token) read from FILE (else QVD_TOKEN)",
      valueHint: "FILE",
    },
    "print-token": {
      type: "boolean",
      description:
        "Log in with the password, print a bearer token for later logins (valid 24 h; with --vm, for that desktop only) and exit",
    },
    vm: {
      type: "string",
      description: "The desktop (id or name); needed when there are several and no terminal",
      valueHint: "ID",
    },
    link: {
      type: "string",
      description: "Link type: modem, isdn, adsl, wan, lan, local (default adsl)",
      valueHint: "LINK",
    },
    geometry: { type: "string", description: "Desktop size WxH (default 1024x768)", valueHint: "WxH" },
    fullscreen: { type: "boolean", description: "Full screen" },
    keyboard: { type: "string", description: "Keyboard model/layout (default pc105/us)", valueHint: "MODEL/LAYOUT" },
    insecure: { type: "boolean", description: "Do not verify the server's certificate (a warning is printed)" },
    ca: { type: "string", description: "Trust this CA or certificate (PEM) for the server's TLS", valueHint: "FILE" },
    cert: {
      type: "string",
      description: "Present this client certificate (PEM; servers with l7r.tls.client_ca), with --key",
      valueHint: "FILE",
    },
    key: { type: "string", description: "The client certificate's private key (PEM)", valueHint: "FILE" },
    stop: { type: "boolean", description: "Stop the desktop first (restart the session)" },
    tls: { type: "boolean", default: true, description: "TLS (--no-tls: plain TCP, for servers with l7r.use_ssl=0)" },
    printing: {
      type: "boolean",
      default: true,
      description:
        "Print from the desktop on this machine's printers (CUPS_SERVER, else localhost:631); --no-printing: do not",
    },
    audio: {
      type: "boolean",
      default: true,
      description: "Play the desktop's sound on this machine's PulseAudio; --no-audio: do not",
    },
    share: {
      type: "string",
      description: "Share this folder with the desktop (~/Redirected/<name> there); repeatable",
      valueHint: "DIR",
    },
    file: { type: "string", description: "Open this file in the desktop (its folder is shared)", valueHint: "PATH" },
    usb: {
      type: "string",
      description:
        "Forward this USB device (bus id, see `usbip list -l`) with USB/IP; repeatable (needs usbipd: see README)",
      valueHint: "BUSID",
    },
    usbipd: {
      type: "string",
      description: "The usbipd that exports the --usb devices (default 127.0.0.1:3240)",
      valueHint: "HOST:PORT",
    },
    "share-unconfined": {
      type: "boolean",
      description: "Serve shared folders without the bubblewrap sandbox (the desktop can then read every file you can)",
    },
    verbose: { type: "boolean", description: "Log the protocol and nxproxy's output on stderr" },
    // For tests: the program run instead of nxproxy (split on spaces; `-S localhost:D` is appended).
    "nxproxy-command": { type: "string", description: "(testing) nxproxy command", valueHint: "CMD" },
  },
  async run({ args, rawArgs }) {
    setLogLevel(args.verbose ? "debug" : "warn");
    let host = String(args.host);
    let port = args.port !== undefined ? Number(args.port) : 8443;
    const hp = /^(\[[^\]]+\]|[^:]+):(\d+)$/.exec(host);
    if (hp) {
      if (args.port !== undefined) throw usage(`--host ${host} has a port and --port is given too`);
      host = hp[1]!.replace(/^\[|\]$/g, "");
      port = Number(hp[2]);
    }
    if (!host) throw usage("--host is empty");
    if (!Number.isInteger(port) || port < 1 || port > 65535) throw usage(`--port ${args.port}: not a port number`);
    const token =
      args["token-file"] !== undefined
        ? tokenFromFile(String(args["token-file"]))
        : process.env.QVD_TOKEN?.trim() || undefined;
    if (token !== undefined && !/^[A-Za-z0-9+/=_-]+$/.test(token))
      throw usage(
        `${args["token-file"] ? `--token-file ${args["token-file"]}` : "QVD_TOKEN"}: not a token (expected the auth_token text of /qvd/create_auth_token)`,
      );
    if (args["token-file"] !== undefined && args["password-file"] !== undefined)
      throw usage("--token-file and --password-file exclude each other");
    if (token !== undefined && args["print-token"])
      throw usage("--print-token logs in with a password: it excludes a token");
    const user = args.user !== undefined ? String(args.user) : "";
    if (token === undefined && !user) throw usage("--user is required (or a token: --token-file FILE or QVD_TOKEN)");
    if (user.includes(":")) throw usage(`--user ${JSON.stringify(user)}: a user name must be without ':'`);
    const link = args.link ?? "adsl";
    if (!LINKS.has(link) && !/^\d+[kmg]?$/.test(link))
      throw usage(`--link ${link}: one of ${[...LINKS].join(", ")} (or a bandwidth like 1m)`);
    const geometry = args.geometry ?? "1024x768";
    if (!/^[1-9]\d{1,4}x[1-9]\d{1,4}$/.test(geometry))
      throw usage(`--geometry ${geometry}: expected WIDTHxHEIGHT, e.g. 1024x768`);
    const keyboard = args.keyboard ?? "pc105/us";
    if (!/^[\w+-]+\/[\w+-]+$/.test(keyboard))
      throw usage(`--keyboard ${keyboard}: expected MODEL/LAYOUT, e.g. pc105/us`);
    if (args.insecure && args.ca) throw usage("--insecure and --ca exclude each other");
    if (!args.cert !== !args.key) throw usage("--cert and --key go together");
    if (args.tls === false && (args.insecure || args.ca)) throw usage("--no-tls excludes --insecure and --ca");
    const shares = repeated(rawArgs, "share");
    const usb = repeated(rawArgs, "usb");
    const files = repeated(rawArgs, "file");
    if (files.length > 1) throw usage("--file: one file per session");
    for (const b of usb)
      if (!BUSID.test(b))
        throw usage(`--usb ${JSON.stringify(b)}: not a USB bus id (like 1-1 or 2-1.4, see \`usbip list -l\`)`);
    for (const v of [...shares, ...files])
      if (!v || /[\x00-\x1f]/.test(v)) throw usage(`--share/--file ${JSON.stringify(v)}: not a path`);
    if (args["print-token"] && (shares.length || files.length || usb.length))
      throw usage("--print-token excludes --share, --file and --usb");
    let usbipd: { host: string; port: number } | undefined;
    if (args.usbipd !== undefined) {
      const m = /^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]{1,253}):(\d{1,5})$/.exec(String(args.usbipd));
      if (!m || Number(m[2]) < 1 || Number(m[2]) > 65535)
        throw usage(`--usbipd ${JSON.stringify(args.usbipd)}: not HOST:PORT`);
      usbipd = { host: m[1]!.replace(/^\[|\]$/g, ""), port: Number(m[2]) };
    }
    const nxproxy = args["nxproxy-command"]
      ? String(args["nxproxy-command"]).split(/\s+/).filter(Boolean)
      : ["nxproxy"];
    if (!args["print-token"] && !args["nxproxy-command"] && !process.env.DISPLAY)
      throw usage("DISPLAY is not set: nxproxy needs an X display to show the desktop on");
    // Before the password prompt: a wrong --share is known now.
    if (!args["print-token"])
      checkServiceOptions({ shares, file: files[0], shareUnconfined: !!args["share-unconfined"] });
    const envPw = process.env.QVD_PASSWORD;
    const credentials =
      token !== undefined
        ? { token }
        : {
            user,
            password: args["password-file"]
              ? passwordFromFile(String(args["password-file"]))
              : envPw
                ? envPw
                : await readPassword(undefined, `Password for ${user}@${host}: `),
          };
    const code = await runClient({
      host,
      port,
      tls: args.tls !== false,
      ...credentials,
      vm: args.vm,
      link,
      geometry,
      fullscreen: !!args.fullscreen,
      keyboard,
      ca: args.ca,
      insecure: !!args.insecure,
      cert: args.cert,
      key: args.key,
      stop: !!args.stop,
      nxproxy,
      printToken: !!args["print-token"],
      printing: args.printing !== false,
      audio: args.audio !== false,
      shares,
      file: files[0],
      usb,
      usbipd,
      shareUnconfined: !!args["share-unconfined"],
    });
    process.exitCode = code;
  },
});
