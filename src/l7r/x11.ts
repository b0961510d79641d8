// A minimal X11 protocol client, for the browser desktop (src/web/desktop/README.md): the L7R
// holds the cookie of each session's Xvnc display and uses this to let the session's uid in
// (nxproxy connects to the display with no auth data, so only server-interpreted host access
// `localuser:#uid` can admit it), and to keep nxagent's window the size of the screen when the
// browser resizes it (nxagent resizes its desktop only when its window is resized). Only the
// few requests needed; no libX11, no helper programs.
//
// Requests go out little-endian (byte-order byte 'l'); the server then answers little-endian
// too, so that is the only byte order read here.
import type { Socket } from "bun";
import { logger } from "../log.ts";

const log = logger("x11");

/** The largest message (setup reply, reply) taken from the server: beyond it, the connection is closed. */
const MAX_MESSAGE = 1 << 20;

const ERROR_NAMES = [
  "",
  "BadRequest",
  "BadValue",
  "BadWindow",
  "BadPixmap",
  "BadAtom",
  "BadCursor",
  "BadFont",
  "BadMatch",
  "BadDrawable",
  "BadAccess",
  "BadAlloc",
  "BadColor",
  "BadGC",
  "BadIDChoice",
  "BadName",
  "BadLength",
  "BadImplementation",
];
const BAD_WINDOW = 3;
const BAD_DRAWABLE = 9;

const Op = {
  ChangeWindowAttributes: 2,
  GetWindowAttributes: 3,
  ConfigureWindow: 12,
  GetGeometry: 14,
  QueryTree: 15,
  SendEvent: 25,
  GetInputFocus: 43,
  GetImage: 73,
  ChangeHosts: 109,
} as const;
const OP_NAMES: Record<number, string> = Object.fromEntries(Object.entries(Op).map(([k, v]) => [v, k]));
const CreateNotify = 16;
const MapNotify = 19;
const ConfigureNotify = 22;
const GenericEvent = 35;
const StructureNotifyMask = 0x20000;
const SubstructureNotifyMask = 0x80000;
const Viewable = 2;

/** An error the X server answered a request with; `code` is the X error code (3 = BadWindow, …). */
export class X11Error extends Error {
  constructor(
    readonly code: number,
    readonly opcode: number,
    readonly badValue: number,
  ) {
    super(
      `X error ${ERROR_NAMES[code] ?? `code ${code}`} in ${OP_NAMES[opcode] ?? `request ${opcode}`} (value 0x${badValue.toString(16)})`,
    );
  }
}

export interface Geometry {
  x: number;
  y: number;
  width: number;
  height: number;
}

interface Pending {
  seq: number;
  reply: boolean;
  resolve(b: Buffer): void;
  reject(e: Error): void;
}

const pad4 = (n: number) => (n + 3) & ~3;

export interface ConnectOptions {
  /** The display number: the socket is /tmp/.X11-unix/X<display>, unless `socket` names one. */
  display?: number;
  socket?: string;
  /** The display's MIT-MAGIC-COOKIE-1 (16 bytes); none: connect without auth data. */
  cookie?: Uint8Array;
  /** How long the connection setup may take (default 10 s). */
  timeoutMs?: number;
}

/** Connects to an X server and completes the connection setup (rejects with the server's reason when refused). */
export const connectX11 = (o: ConnectOptions): Promise<X11Client> => X11Client.connect(o);

export class X11Client {
  /** Screen 0's root window and its current size (kept up to date once `watchRoot` ran). */
  root = 0;
  width = 0;
  height = 0;
  /** The resource ids this client may allocate: base | (n & mask). */
  ridBase = 0;
  ridMask = 0;

  private sock?: Socket<undefined>;
  private readonly setup: Promise<void>;
  private setupDone?: { resolve(): void; reject(e: Error): void };
  private inSetup = true;
  private buf: Buffer = Buffer.alloc(0);
  private out: Buffer[] = [];
  private seq = 0;
  private pending: Pending[] = [];
  private isClosed = false;
  private watching?: Promise<void>;
  private resizeCbs = new Set<(w: number, h: number) => void>();
  private topLevelCbs = new Set<(win: number) => void>();
  private closeCbs = new Set<(e?: Error) => void>();

  private constructor() {
    this.setup = new Promise((resolve, reject) => (this.setupDone = { resolve, reject }));
    this.setup.catch(() => {});
  }

  /** When fitAndCheck last nudged a window (its own ConfigureNotify events are not news). */
  private nudgedAt = 0;

  static async connect(o: ConnectOptions): Promise<X11Client> {
    if (o.socket === undefined && o.display === undefined) throw new Error("no X display given");
    const c = new X11Client();
    c.sock = await Bun.connect({
      unix: o.socket ?? `/tmp/.X11-unix/X${o.display}`,
      socket: {
        data: (_s, d) => c.data(d),
        drain: () => c.drain(),
        close: () => c.closed(new Error("X server closed the connection")),
        error: (_s, e) => c.closed(e),
      },
    });
    const name = o.cookie ? Buffer.from("MIT-MAGIC-COOKIE-1") : Buffer.alloc(0);
    const data = Buffer.from(o.cookie ?? []);
    const req = Buffer.alloc(12 + pad4(name.length) + pad4(data.length));
    req[0] = 0x6c; // 'l': little-endian, both ways
    req.writeUInt16LE(11, 2);
    req.writeUInt16LE(name.length, 6);
    req.writeUInt16LE(data.length, 8);
    name.copy(req, 12);
    data.copy(req, 12 + pad4(name.length));
    c.write(req);
    let timer: Timer | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error("X connection setup timed out")), o.timeoutMs ?? 10_000);
    });
    try {
      await Promise.race([c.setup, timeout]);
    } catch (e) {
      c.close();
      throw e;
    } finally {
      clearTimeout(timer);
    }
    return c;
  }

  /** Lets processes of `uid` connect without auth data (ChangeHosts Insert, server-interpreted `localuser:#uid`). */
  async allowLocalUser(uid: number): Promise<void> {
    if (!Number.isInteger(uid) || uid < 0 || uid > 0xffffffff) throw new Error(`invalid uid ${uid}`);
    const addr = Buffer.from(`localuser\0#${uid}`, "latin1");
    const b = Buffer.alloc(4 + pad4(addr.length));
    b[0] = 5; // ServerInterpreted
    b.writeUInt16LE(addr.length, 2);
    addr.copy(b, 4);
    await this.checked(Op.ChangeHosts, 0 /* Insert */, b);
  }

  /** Selects StructureNotify and SubstructureNotify on the root (screen size changes, top-levels mapped). */
  watchRoot(): Promise<void> {
    this.watching ??= this.checked(
      Op.ChangeWindowAttributes,
      0,
      u32(this.root, 0x800 /* event-mask */, StructureNotifyMask | SubstructureNotifyMask),
    );
    return this.watching;
  }

  /** `cb` gets the root's new size whenever the screen is resized (RandR sends a ConfigureNotify on the root); needs `watchRoot`. */
  onRootResize(cb: (w: number, h: number) => void): () => void {
    this.resizeCbs.add(cb);
    return () => this.resizeCbs.delete(cb);
  }

  /** `cb` gets the connection's end (an Error unless `close()` ended it). */
  onClose(cb: (e?: Error) => void): void {
    this.closeCbs.add(cb);
  }

  async queryTree(win: number): Promise<number[]> {
    const r = await this.call(Op.QueryTree, 0, u32(win));
    const n = r.readUInt16LE(16);
    if (32 + 4 * n > r.length) throw new Error("X server sent a short QueryTree reply");
    return Array.from({ length: n }, (_, i) => r.readUInt32LE(32 + 4 * i));
  }

  /** The window's map state: 0 unmapped, 1 unviewable, 2 viewable; and whether it is override-redirect. */
  async getWindowAttributes(win: number): Promise<{ mapState: number; overrideRedirect: boolean; inputOnly: boolean }> {
    const r = await this.call(Op.GetWindowAttributes, 0, u32(win));
    return { mapState: r[26]!, overrideRedirect: r[27] === 1, inputOnly: r.readUInt16LE(12) === 2 };
  }

  async getGeometry(win: number): Promise<Geometry> {
    const r = await this.call(Op.GetGeometry, 0, u32(win));
    return { x: r.readInt16LE(12), y: r.readInt16LE(14), width: r.readUInt16LE(16), height: r.readUInt16LE(18) };
  }

  /**
   * The pixels of a rectangle of `drawable` (GetImage, ZPixmap, all planes): for a depth-24
   * screen 4 bytes a pixel (B, G, R, unused), rows of `w * 4` bytes. Windows include what their
   * children show. The reply must fit MAX_MESSAGE: larger rectangles are refused here (ask in pieces).
   */
  async getImage(
    drawable: number,
    x: number,
    y: number,
    w: number,
    h: number,
  ): Promise<{ depth: number; data: Buffer }> {
    if (4 * w * h > MAX_MESSAGE - 32) throw new Error(`an image of ${w}x${h} is larger than this client takes`);
    const b = Buffer.alloc(16);
    b.writeUInt32LE(drawable, 0);
    b.writeInt16LE(x, 4);
    b.writeInt16LE(y, 6);
    b.writeUInt16LE(w, 8);
    b.writeUInt16LE(h, 10);
    b.writeUInt32LE(0xffffffff, 12); // plane mask
    const r = await this.call(Op.GetImage, 2 /* ZPixmap */, b);
    return { depth: r[1]!, data: Buffer.from(r.subarray(32, 32 + 4 * r.readUInt32LE(4))) };
  }

  configureWindow(win: number, g: Geometry): Promise<void> {
    const b = Buffer.alloc(24);
    b.writeUInt32LE(win, 0);
    b.writeUInt16LE(0xf, 4); // x | y | width | height
    b.writeInt32LE(g.x, 8);
    b.writeInt32LE(g.y, 12);
    b.writeUInt32LE(g.width, 16);
    b.writeUInt32LE(g.height, 20);
    return this.checked(Op.ConfigureWindow, 0, b);
  }

  /**
   * Tells `win`'s owner its geometry again with a synthetic ConfigureNotify (as a window manager
   * does, ICCCM 4.1.5). nxagent acts on a ConfigureNotify of its window only once a later event
   * arrives (seen with nxagent 3.5.99.26 behind a real NX link): this is that later event, and
   * being a copy of the real state it changes nothing by itself.
   */
  notifyGeometry(win: number, g: Geometry): Promise<void> {
    const b = Buffer.alloc(40);
    b.writeUInt32LE(win, 0); // destination
    b.writeUInt32LE(StructureNotifyMask, 4);
    b[8] = ConfigureNotify;
    b.writeUInt32LE(win, 12); // event
    b.writeUInt32LE(win, 16); // window
    b.writeInt16LE(g.x, 24);
    b.writeInt16LE(g.y, 26);
    b.writeUInt16LE(g.width, 28);
    b.writeUInt16LE(g.height, 30);
    return this.checked(Op.SendEvent, 0, b);
  }

  /**
   * Moves every viewable top-level window larger than 2x2 to 0,0 and sizes it w x h: that is
   * nxagent's window (nxagent also keeps 1x1 helper windows, left alone). Returns how many
   * windows were changed. Windows that vanish meanwhile are skipped.
   */
  async fitTopLevels(w: number, h: number): Promise<number> {
    return (await this.fitAndCheck(w, h)).changed;
  }

  /**
   * fitTopLevels, and whether what the top-levels show has followed: nxagent draws its desktop in
   * a child window of its own size, so a drawing child of another size is a desktop that has not
   * taken the new size yet.
   */
  async fitAndCheck(w: number, h: number): Promise<{ changed: number; settled: boolean }> {
    const done = await Promise.all(
      (await this.queryTree(this.root)).map(async (win) => {
        try {
          const [a, g] = await Promise.all([this.getWindowAttributes(win), this.getGeometry(win)]);
          if (a.mapState !== Viewable || g.width <= 2 || g.height <= 2) return { changed: 0, settled: true };
          const fitted = { x: 0, y: 0, width: w, height: h };
          const changed = !(g.x === 0 && g.y === 0 && g.width === w && g.height === h);
          if (changed) await this.configureWindow(win, fitted);
          else if (!(await this.contentFits(win, w, h))) {
            // The window has the size but the desktop in it does not: nxagent believes it has that
            // size already (its geometry option) and ignores a ConfigureNotify of it. A real
            // change, one pixel narrower and back, makes it resize (at most once a second).
            if (Date.now() - this.nudgedAt < 1000) return { changed: 0, settled: false };
            this.nudgedAt = Date.now();
            await this.configureWindow(win, { ...fitted, width: Math.max(3, w - 1) });
            await this.configureWindow(win, fitted);
            await this.notifyGeometry(win, fitted);
            return { changed: 1, settled: false };
          }
          await this.notifyGeometry(win, fitted);
          return { changed: changed ? 1 : 0, settled: !changed };
        } catch (e) {
          if (e instanceof X11Error && (e.code === BAD_WINDOW || e.code === BAD_DRAWABLE))
            return { changed: 0, settled: true };
          throw e;
        }
      }),
    );
    return { changed: done.reduce((n, d) => n + d.changed, 0), settled: done.every((d) => d.settled) };
  }

  /** Whether every viewable drawing child of `win` larger than 2x2 is w x h. */
  private async contentFits(win: number, w: number, h: number): Promise<boolean> {
    for (const child of await this.queryTree(win)) {
      const [a, g] = await Promise.all([this.getWindowAttributes(child), this.getGeometry(child)]);
      if (a.mapState !== Viewable || a.inputOnly || g.width <= 2 || g.height <= 2) continue;
      if (g.width !== w || g.height !== h) return false;
    }
    return true;
  }

  /**
   * Keeps the top-level windows fitted to the screen: now, on every screen resize and whenever
   * a top-level window is created or mapped (nxagent's window is new on every NX reconnect).
   * Bursts of events are debounced; fits never overlap. Errors go to `onError` (default: the
   * log). Returns a function that stops it.
   */
  keepTopLevelsFitted(o: { debounceMs?: number; onError?: (e: Error) => void } = {}): () => void {
    const onError = (e: unknown) => {
      if (!this.isClosed)
        (o.onError ?? ((e) => log.warn("could not fit the windows to the screen", { error: e.message })))(e as Error);
    };
    let timer: Timer | undefined;
    let running = false;
    let again = false;
    let stopped = false;
    // A desktop that has not followed is told again, less and less often (nxagent may still be
    // starting or resuming when its window is fitted); any new event starts over.
    const RECHECK_MS = [100, 250, 500, 1000, 2000, 4000, 8000];
    let recheck = 0;
    const fit = async () => {
      timer = undefined;
      if (running) return void (again = true);
      running = true;
      let settled = true;
      try {
        do {
          again = false;
          settled = (await this.fitAndCheck(this.width, this.height)).settled;
        } while (again && !stopped && !this.isClosed);
      } catch (e) {
        onError(e);
      } finally {
        running = false;
      }
      if (!settled && !stopped && !this.isClosed && recheck < RECHECK_MS.length && !timer)
        timer = setTimeout(fit, RECHECK_MS[recheck++]);
    };
    const schedule = () => {
      if (stopped || this.isClosed) return;
      clearTimeout(timer);
      recheck = 0;
      timer = setTimeout(fit, o.debounceMs ?? 30);
    };
    this.watchRoot().catch(onError);
    const offResize = this.onRootResize(schedule);
    this.topLevelCbs.add(schedule);
    schedule();
    return () => {
      stopped = true;
      clearTimeout(timer);
      offResize();
      this.topLevelCbs.delete(schedule);
    };
  }

  close(): void {
    this.closed();
  }

  // --- the wire ---

  /** Sends a request and gives its reply (32 bytes and more). */
  private call(op: number, data: number, body: Buffer): Promise<Buffer> {
    return this.send(op, data, body, true);
  }

  /** Sends a request without reply, then a GetInputFocus: its reply tells the request succeeded (errors come before it). */
  private async checked(op: number, data: number, body: Buffer): Promise<void> {
    const p = this.send(op, data, body, false);
    this.send(Op.GetInputFocus, 0, Buffer.alloc(0), true).catch(() => {});
    await p;
  }

  private send(op: number, data: number, body: Buffer, reply: boolean): Promise<Buffer> {
    if (this.isClosed || this.inSetup) return Promise.reject(new Error("X connection is not open"));
    const b = Buffer.alloc(4 + pad4(body.length));
    b[0] = op;
    b[1] = data;
    b.writeUInt16LE(b.length / 4, 2);
    body.copy(b, 4);
    const seq = ++this.seq;
    const p = new Promise<Buffer>((resolve, reject) => this.pending.push({ seq, reply, resolve, reject }));
    this.write(b);
    return p;
  }

  private write(b: Buffer): void {
    if (this.isClosed || !this.sock) return;
    if (this.out.length) return void this.out.push(b);
    const n = this.sock.write(b);
    if (n < b.length) this.out.push(b.subarray(Math.max(n, 0)));
  }

  private drain(): void {
    while (this.out.length && this.sock) {
      const b = this.out[0]!;
      const n = this.sock.write(b);
      if (n < b.length) return void (this.out[0] = b.subarray(Math.max(n, 0)));
      this.out.shift();
    }
  }

  private data(d: Buffer): void {
    if (this.isClosed) return;
    this.buf = this.buf.length ? Buffer.concat([this.buf, d]) : d;
    try {
      for (;;) {
        const need = this.inSetup
          ? this.buf.length >= 8 && 8 + 4 * this.buf.readUInt16LE(6)
          : this.buf.length >= 32 &&
            (this.buf[0] === 1 || (this.buf[0]! & 0x7f) === GenericEvent ? 32 + 4 * this.buf.readUInt32LE(4) : 32);
        if (!need) return;
        // Each message is bounded; whatever the server claims, no more than that is buffered.
        if (need > MAX_MESSAGE) throw new Error(`X server sent a message of ${need} bytes (limit ${MAX_MESSAGE})`);
        if (this.buf.length < need) return;
        const m = this.buf.subarray(0, need);
        this.buf = this.buf.subarray(need);
        if (this.inSetup) this.setupReply(m);
        else this.message(m);
      }
    } catch (e) {
      this.closed(e as Error);
    }
  }

  private setupReply(m: Buffer): void {
    const text = (from: number, len: number) =>
      m
        .subarray(from, Math.min(from + len, m.length))
        .toString("latin1")
        .replace(/\0+$/, "")
        .trim();
    if (m[0] === 0) throw new Error(`X server refused the connection: ${text(8, m[1]!)}`);
    if (m[0] === 2) throw new Error(`X server asks for more authentication: ${text(8, m.length - 8)}`);
    if (m[0] !== 1 || m.length < 40) throw new Error("X server sent an invalid setup reply");
    this.ridBase = m.readUInt32LE(12);
    this.ridMask = m.readUInt32LE(16);
    const screens = m[28]!;
    const screen = 40 + pad4(m.readUInt16LE(24)) + 8 * m[29]!;
    if (screens < 1 || screen + 40 > m.length) throw new Error("X server sent a setup reply without screen");
    this.root = m.readUInt32LE(screen);
    this.width = m.readUInt16LE(screen + 20);
    this.height = m.readUInt16LE(screen + 22);
    this.inSetup = false;
    this.setupDone?.resolve();
  }

  private message(m: Buffer): void {
    const kind = m[0]! & 0x7f;
    if (kind > 1) return this.event(kind, m);
    // A reply or an error for the request of this sequence number (low 16 bits): the requests
    // before it are done, those without reply succeeded (their errors would have come first).
    const s = m.readUInt16LE(2);
    for (;;) {
      const p = this.pending[0];
      if (!p) return;
      const d = (s - p.seq) & 0xffff;
      if (d >= 0x8000) return; // older than anything pending: not ours to settle
      this.pending.shift();
      if (d === 0) {
        if (m[0] === 0) p.reject(new X11Error(m[1]!, m[10]!, m.readUInt32LE(4)));
        else p.resolve(m);
        return;
      }
      if (p.reply) p.reject(new Error("X server skipped a reply"));
      else p.resolve(m);
    }
  }

  private event(kind: number, m: Buffer): void {
    if (kind === ConfigureNotify && m.readUInt32LE(8) === this.root) {
      this.width = m.readUInt16LE(20);
      this.height = m.readUInt16LE(22);
      for (const cb of this.resizeCbs) cb(this.width, this.height);
    } else if (kind === ConfigureNotify && m.readUInt32LE(4) === this.root && Date.now() - this.nudgedAt > 500) {
      // A top-level moved or resized itself (nxagent sets its own size once it maps its window):
      // fit it again unless it already fills the screen (our own fit's notify ends here).
      const [x, y, w, h] = [m.readInt16LE(16), m.readInt16LE(18), m.readUInt16LE(20), m.readUInt16LE(22)];
      if (w > 2 && h > 2 && (x !== 0 || y !== 0 || w !== this.width || h !== this.height))
        for (const cb of this.topLevelCbs) cb(m.readUInt32LE(8));
    } else if ((kind === MapNotify || kind === CreateNotify) && m.readUInt32LE(4) === this.root) {
      // MapNotify's event window, CreateNotify's parent: the root, so the window is a top-level.
      for (const cb of this.topLevelCbs) cb(m.readUInt32LE(8));
    }
  }

  private closed(e?: Error): void {
    if (this.isClosed) return;
    this.isClosed = true;
    const err = e ?? new Error("X connection closed");
    this.setupDone?.reject(err);
    for (const p of this.pending.splice(0)) p.reject(err);
    this.out = [];
    this.buf = Buffer.alloc(0);
    this.sock?.end();
    for (const cb of this.closeCbs) cb(e);
  }
}

function u32(...v: number[]): Buffer {
  const b = Buffer.alloc(4 * v.length);
  for (const [i, x] of v.entries()) b.writeUInt32LE(x >>> 0, 4 * i);
  return b;
}
