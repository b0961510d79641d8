// A browser session's display on the L7R node (src/web/desktop/README.md): an Xvnc whose RFB
// socket the browser's WebSocket is relayed to, and an nxproxy showing the desktop's NX
// session on it. Both run as a uid of the session's own (l7r.web.uid_base + slot), in a
// private directory, and die with the L7R (setpriv --pdeathsig). Xvnc's X display takes
// that uid (nxproxy cannot present a cookie: nxagent sends none) and the L7R's own
// connection, which has the display's cookie and keeps nxagent's window the size of the
// screen the browser asked for.
import { randomBytes, randomUUID } from "node:crypto";
import { chmodSync, chownSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { UnixSocketListener } from "bun";
import { logger } from "../log.ts";
import { spawnDaemon, type Daemon } from "../run.ts";
import { ioHandlers, type IoData, type IoSocket } from "../nx/splice.ts";
import { X11Client } from "./x11.ts";

const log = logger("l7r");

export interface WebDisplayOptions {
  /** Where the session's private directory is made (<path.run>/web). */
  runDir: string;
  uid: number;
  width: number;
  height: number;
  xvnc: string;
  nxproxy: string;
  /** Milliseconds for Xvnc to come up and for nxproxy to connect. */
  timeoutMs?: number;
}

/** Screen sizes a browser may ask for (Xvnc's own bounds are wider; these keep memory sane). */
export const MIN_SIZE = 200;
export const MAX_WIDTH = 7680;
export const MAX_HEIGHT = 4320;

export class WebDisplayError extends Error {}

/** One Xauthority entry that any display number matches (FamilyWild), for Xvnc's -auth. */
function xauthority(cookie: Uint8Array): Uint8Array {
  const field = (b: Uint8Array) => Buffer.concat([Buffer.from([b.length >> 8, b.length & 0xff]), b]);
  return Buffer.concat([
    Buffer.from([0xff, 0xff]),
    field(new Uint8Array(0)),
    field(new Uint8Array(0)),
    field(Buffer.from("MIT-MAGIC-COOKIE-1")),
    field(cookie),
  ]);
}

/** Runs `argv` as the session's uid, killed when the L7R dies, with a clean environment. */
function spawnAs(
  uid: number,
  dir: string,
  argv: string[],
  env: Record<string, string>,
  onLine: (l: string, stream: "stdout" | "stderr") => void,
): Daemon {
  return spawnDaemon(
    ["setpriv", `--reuid=${uid}`, `--regid=${uid}`, "--clear-groups", "--pdeathsig", "KILL", "--", ...argv],
    {
      cwd: dir,
      env: { PATH: process.env.PATH ?? "/usr/sbin:/usr/bin:/sbin:/bin", HOME: dir, ...env },
      onLine,
    },
  );
}

export class WebDisplay {
  /** nxproxy's connection: the NX stream to splice with nxagent's. */
  nxSocket!: IoSocket;
  display = 0;
  private xvnc?: Daemon;
  private nxproxy?: Daemon;
  private x?: X11Client;
  private nxListener?: UnixSocketListener<IoData>;
  private stopped = false;
  /** nxproxy's last lines (its "Error: …" say why a session failed). */
  readonly nxLines: string[] = [];

  private constructor(
    readonly dir: string,
    private readonly o: WebDisplayOptions,
  ) {}

  static async start(o: WebDisplayOptions): Promise<WebDisplay> {
    const w = Math.round(o.width),
      h = Math.round(o.height);
    if (!(w >= MIN_SIZE && w <= MAX_WIDTH && h >= MIN_SIZE && h <= MAX_HEIGHT))
      throw new WebDisplayError(`a screen of ${o.width}x${o.height} is not possible`);
    mkdirSync(o.runDir, { recursive: true, mode: 0o711 });
    const dir = join(o.runDir, randomUUID());
    mkdirSync(dir, { mode: 0o700 });
    chownSync(dir, o.uid, o.uid);
    const d = new WebDisplay(dir, o);
    try {
      await d.startXvnc(w, h);
      await d.startNxproxy();
      return d;
    } catch (err) {
      await d.stop();
      throw err;
    }
  }

  /** The path of Xvnc's RFB socket (the browser's WebSocket is relayed to it). */
  get rfbPath(): string {
    return join(this.dir, "rfb");
  }

  private async startXvnc(w: number, h: number) {
    const cookie = randomBytes(16);
    const auth = join(this.dir, "xauth");
    writeFileSync(auth, xauthority(cookie), { mode: 0o600 });
    chownSync(auth, this.o.uid, this.o.uid);
    const lines: string[] = [];
    let announce!: (n: number) => void;
    const announced = new Promise<number>((r) => (announce = r));
    // -displayfd 1: Xvnc picks a free display and says which on stdout. No TCP for X or RFB;
    // RFB only on the private socket, so no password on it (SecurityTypes None). No GLX: its
    // only client is nxproxy, and Mesa's software renderer cost about 50 MB per session.
    this.xvnc = spawnAs(
      this.o.uid,
      this.dir,
      [
        this.o.xvnc,
        "-displayfd",
        "1",
        "-geometry",
        `${w}x${h}`,
        "-depth",
        "24",
        "-nolisten",
        "tcp",
        "-auth",
        auth,
        "-rfbport",
        "-1",
        "-rfbunixpath",
        this.rfbPath,
        "-rfbunixmode",
        "0600",
        "-SecurityTypes",
        "None",
        "-NeverShared",
        "-DisconnectClients",
        "-AcceptSetDesktopSize",
        "-MaxCutText",
        "1048576",
        "-extension",
        "GLX",
      ],
      {},
      (l, stream) => {
        if (stream === "stdout" && /^\d+$/.test(l.trim())) return announce(Number(l.trim()));
        if (l.trim()) log.debug("Xvnc", { line: l.trim() });
        lines.push(l);
        if (lines.length > 8) lines.shift();
      },
    );
    const timeout = this.o.timeoutMs ?? 15_000;
    const display = await Promise.race([
      announced,
      this.xvnc.exited.then(() => {
        throw new WebDisplayError(
          `the browser session's X server (${this.o.xvnc}) ended: ${lines
            .filter((l) => l.trim())
            .slice(-2)
            .join(" / ")}`,
        );
      }),
      Bun.sleep(timeout).then(() => {
        throw new WebDisplayError(
          `the browser session's X server (${this.o.xvnc}) did not start in ${timeout / 1000} s`,
        );
      }),
    ]);
    this.display = display;
    // The abstract socket: Xvnc runs in the L7R's network namespace, and a stray clean-up of
    // /tmp/.X11-unix cannot take it away.
    this.x = await X11Client.connect({ socket: `\0/tmp/.X11-unix/X${display}`, cookie });
    await this.x.allowLocalUser(this.o.uid);
    this.x.keepTopLevelsFitted();
  }

  private async startNxproxy() {
    const sock = join(this.dir, "nx");
    let accept!: (s: IoSocket) => void;
    const accepted = new Promise<IoSocket>((r) => (accept = r));
    let taken = false;
    this.nxListener = Bun.listen<IoData>({
      unix: sock,
      socket: {
        ...ioHandlers,
        open(s) {
          s.data = {};
          if (taken) return void s.end();
          taken = true;
          s.pause(); // until the splice takes it
          accept(s);
        },
      },
    });
    // nxproxy (as the session's uid) must be able to connect; the directory keeps everyone else out.
    chmodSync(sock, 0o666);
    mkdirSync(join(this.dir, "nx-root"), { mode: 0o700 });
    chownSync(join(this.dir, "nx-root"), this.o.uid, this.o.uid);
    // The link (lan: no NX compression to pay for, the desktop is near) is nxagent's to choose:
    // the connect flow asks for it; this side would ignore it.
    const options = `nx/nx,connect=unix:${sock},root=${join(this.dir, "nx-root")}:${this.display}`;
    this.nxproxy = spawnAs(
      this.o.uid,
      this.dir,
      [this.o.nxproxy, "-S", options],
      { DISPLAY: `:${this.display}`, NX_CLIENT: "/bin/false" },
      (l) => {
        const t = l.trim();
        if (!t) return;
        log.debug("nxproxy", { display: this.display, line: t });
        this.nxLines.push(t);
        if (this.nxLines.length > 8) this.nxLines.shift();
      },
    );
    const timeout = this.o.timeoutMs ?? 15_000;
    this.nxSocket = await Promise.race([
      accepted,
      this.nxproxy.exited.then(() => {
        throw new WebDisplayError(
          `the browser session's NX proxy (${this.o.nxproxy}) ended: ${this.nxLines.slice(-2).join(" / ")}`,
        );
      }),
      Bun.sleep(timeout).then(() => {
        throw new WebDisplayError(
          `the browser session's NX proxy (${this.o.nxproxy}) did not connect in ${timeout / 1000} s`,
        );
      }),
    ]);
    this.nxListener.stop(); // not stop(true): that would close the accepted connection too
    this.nxListener = undefined;
  }

  /** A connection to Xvnc's RFB socket, its events going to `socket.data.io`. */
  connectRfb(): Promise<IoSocket> {
    return Bun.connect<IoData>({ unix: this.rfbPath, socket: ioHandlers, data: {} } as any) as Promise<IoSocket>;
  }

  /** Why the NX side failed, from nxproxy's last lines (for the log). */
  nxReason(): string | undefined {
    return [...this.nxLines].reverse().find((l) => /^Error: /.test(l)) ?? this.nxLines.at(-1);
  }

  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    this.nxListener?.stop(true);
    this.x?.close();
    for (const p of [this.nxproxy, this.xvnc]) p?.kill("SIGTERM");
    await Promise.all(
      [this.nxproxy, this.xvnc].map(
        (p) => p && Promise.race([p.exited, Bun.sleep(3000).then(() => p.kill("SIGKILL"))]),
      ),
    );
    rmSync(this.dir, { recursive: true, force: true });
    log.debug("browser display stopped", { display: this.display });
  }
}
