// A browser session (src/web/desktop/README.md): the WebSocket on /qvd/web/connect, the page's
// one message (token, desktop, screen size), the connect flow while the session's display
// starts (src/l7r/web-display.ts), then RFB relayed between the browser and the display.
import type { AuthenticatedUser } from "../auth/user-auth.ts";
import { incrementHostCounter } from "../db/hosts.ts";
import * as L from "../db/l7r.ts";
import { logger } from "../log.ts";
import { spliceNx } from "../nx/handshake.ts";
import type { HttpRequest } from "../nx/http.ts";
import type { IoSocket } from "../nx/splice.ts";
import { DesktopSession } from "./connect-flow.ts";
import type { Connection } from "./connection.ts";
import type { L7rContext } from "./context.ts";
import type { Logins } from "./login.ts";
import type { WebOptions } from "./options.ts";
import { isId, mayUse, Status } from "./status.ts";
import { WebChannel } from "./web-channel.ts";
import { MAX_HEIGHT, MAX_WIDTH, MIN_SIZE, WebDisplay } from "./web-display.ts";
import { originAllowed, upgradeAnswer } from "./websocket.ts";

const log = logger("l7r");

/**
 * Upgrades to a WebSocket and serves the browser session on it. After the 101 every failure
 * is told in frames, never as HTTP.
 */
export async function webConnect(
  ctx: L7rContext,
  conn: Connection,
  logins: Logins,
  req: HttpRequest,
  host: L.L7rHost,
  web: WebOptions,
) {
  const { sql, t } = ctx;
  if (!originAllowed(req)) throw new Status(403, "A page of another origin may not open desktops here\r\n");
  const up = upgradeAnswer(req);
  if (!up.ok) throw new Status(up.status, `${up.message}\r\n`, up.headers);
  const { toB, toA } = conn.upgrade(up.headers);
  let state: "hello" | "connecting" | "relay" = "hello";
  let hello!: (text: string) => void;
  const said = new Promise<string>((r) => (hello = r));
  const toRfb: Uint8Array[] = [];
  let rfb: IoSocket | undefined;
  const ch = (conn.web = new WebChannel(conn.s, {
    text: (text) => {
      if (state !== "hello" || text.length > 4096) return conn.close(1008, "unexpected message");
      state = "connecting";
      hello(text);
    },
    binary: (b) => {
      if (state !== "relay" || !rfb) return conn.close(1008, "unexpected message");
      if (toRfb.length) return void toRfb.push(b);
      const n = Math.max(0, rfb.write(b));
      if (n < b.length) {
        toRfb.push(b.subarray(n));
        ch.pauseInput(); // Xvnc is not reading: neither do we
      }
    },
    // A socket that ends before its hello also ends the wait for it (nothing is kept waiting).
    end: () => (conn.close(), hello("")),
  }));
  ch.start(toB, toA);
  const fail = (status: number, message: string) => {
    ch.sendText({ type: "error", status, message });
    conn.close(4000 + status, message.slice(0, 100));
  };
  try {
    const timer = setTimeout(() => (conn.close(1008, "no request in time"), hello("")), t.request * 1000);
    const text = await said.finally(() => clearTimeout(timer));
    if (conn.closed) return;
    const session = new DesktopSession(ctx, conn, "browser");
    let m: { token?: unknown; id?: unknown; width?: unknown; height?: unknown };
    try {
      m = JSON.parse(text);
    } catch {
      return conn.close(1008, "the request is not JSON");
    }
    const { token, id, width, height } = m ?? {};
    if (typeof token !== "string" || !/^[A-Za-z0-9+/=]{1,1024}$/.test(token))
      return fail(401, "Your login has expired; log in again");
    if (typeof id !== "number" || !isId(id)) return fail(404, "The requested virtual machine does not exist");
    const sized = (v: unknown, max: number) =>
      typeof v === "number" && Number.isInteger(v) && v >= MIN_SIZE && v <= max ? v : undefined;
    const w = sized(width, MAX_WIDTH),
      h = sized(height, MAX_HEIGHT);
    if (!w || !h)
      return conn.close(1008, `the screen size must be ${MIN_SIZE}x${MIN_SIZE} to ${MAX_WIDTH}x${MAX_HEIGHT}`);
    let user: AuthenticatedUser;
    try {
      user = await logins.user(`Bearer ${token}`, host.id);
    } catch (err) {
      if (err instanceof Status && err.status === 401) return fail(401, "Your login has expired; log in again");
      throw err;
    }
    if (host.blocked) return fail(503, "Server is blocked");
    const vm0 = await L.sessionVm(sql, id);
    if (!vm0 || !mayUse(user, vm0.user_id, id)) return fail(404, "The requested virtual machine does not exist");
    if (vm0.blocked) return fail(403, "The requested virtual machine is offline for maintenance");
    let slot = 0;
    while (ctx.webSlots.has(slot)) slot++;
    if (slot >= web.maxSessions)
      return fail(503, "This node holds as many browser sessions as it may; try again later");
    if (conn.closed) return;
    ctx.webSlots.add(slot);
    // The display starts while the desktop does (the connection's end stops it, started or not).
    const display = WebDisplay.start({
      runDir: web.runDir,
      uid: web.uidBase + slot,
      width: w,
      height: h,
      xvnc: web.xvnc,
      nxproxy: web.nxproxy,
    });
    display.catch(() => {}); // told in the connect flow
    // The slot (its uid) is free again only when nothing of the display runs as it any more.
    conn.onClose(
      () =>
        void display
          .then(
            (d) => d.stop(),
            () => {},
          )
          .finally(() => ctx.webSlots.delete(slot)),
    );
    // What a QVD client would ask for, with no keyboard (nxagent then takes Xvnc's own map),
    // and neither sound nor printing: a browser has no sound server or CUPS for the desktop
    // to reach (the desktop's services would wait for them at each connect).
    const params = new Map([
      ["qvd.client.link", "lan"],
      ["qvd.client.geometry", `${w}x${h}`],
      ["qvd.client.os", "linux"],
      ["qvd.client.audio.enabled", "0"],
      ["qvd.client.printing.enabled", "0"],
    ]);
    const { nx, cookie } = await session.open(user, vm0, params, host, async () => {
      await display.catch((err) => {
        log.error("browser session display failed", { vm: id, error: (err as Error).message });
        throw new Status(503, "This node cannot show desktops in a browser now; try again later");
      });
    });
    const d = await display;
    session.attach(nx);
    const started = Date.now();
    const onRefused = (reason: string) =>
      log.warn("NX handshake refused", { vm: id, user: user.login, reason, nxproxy: d.nxReason() });
    void spliceNx(d.nxSocket, nx, { cookie, timeoutMs: t.nxHandshake * 1000, onRefused }).then(async (r) => {
      log.info("browser session ended", { vm: id, user: user.login, up: r.aToB, down: r.bToA });
      session.countBytes(r.aToB, r.bToA);
      if (Date.now() - started < 120_000) await incrementHostCounter(sql, host.id, "short_sessions").catch(() => {});
      conn.close(4002, "the desktop session ended");
    });
    (d.nxSocket as any).resume();
    rfb = await d.connectRfb();
    const r = rfb;
    r.data.io = {
      data: (c) => {
        if (!ch.sendBinary(c)) (r as any).pause(); // the browser is not reading: neither do we
      },
      drain: () => {
        while (toRfb.length) {
          const b = toRfb[0]!;
          const n = Math.max(0, r.write(b));
          if (n < b.length) return void (toRfb[0] = b.subarray(n));
          toRfb.shift();
        }
        ch.resumeInput();
      },
      end: () => conn.close(1011, "the display server ended"),
      close: () => conn.close(1011, "the display server ended"),
    };
    ch.onDrained = () => (r as any).resume();
    if (conn.closed) return;
    state = "relay";
    ch.keepAlive(30_000);
    conn.progress("Connection established");
    ch.sendText({ type: "ready", width: w, height: h });
    session.countSession();
    log.info("browser session started", { vm: id, user: user.login, display: d.display, size: `${w}x${h}` });
  } catch (err) {
    if (conn.closed) return;
    if (err instanceof Status) return fail(err.status, err.message.trim() || "Refused");
    log.error("browser session failed", { error: String((err as Error)?.stack ?? err) });
    fail(500, "Internal error; try again later");
  }
}
