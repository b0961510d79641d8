// GET /api/v1/events: server-sent events of object changes. One LISTEN connection per API
// process fans out to every subscriber, each filtered by its tenant and `<object>.see` ACL.
// After a database reconnection subscribers get a `resync` event: changes may have been
// missed, so a client should reload what it shows. Streams are limited per process and per
// administrator: each holds a connection and a timer, and one account must not take them all.
import { listen, type Listener } from "../db/listen.ts";
import { logger } from "../log.ts";
import type { Admin } from "./context.ts";
import { ApiError } from "./http.ts";

const log = logger("events");

export interface ObjectEvent {
  object: string;
  op: "create" | "update" | "delete";
  id: number;
  tenant_id: number | null;
}

interface Subscriber {
  admin: Admin;
  send: (event: string, data: string) => void;
  /** Sends `logout` and ends the stream. */
  logout: () => void;
}

/** Keep-alive period of event streams (also how soon a stream notices its session ended). */
export let KEEPALIVE_MS = 15_000;
/** Test hook: shorter keep-alives. */
export const setKeepAlive = (ms: number) => void (KEEPALIVE_MS = ms);

export interface EventLimits {
  /** Streams of this process at once (api.events.max_streams). */
  maxStreams: number;
  /** Streams of one administrator at once (api.events.max_streams_per_admin). */
  maxPerAdmin: number;
  /** The API's idle timeout in seconds: keep-alives come at least twice within it. */
  idleTimeoutS: number;
}

export class EventHub {
  private subs = new Set<Subscriber>();
  private listener?: Promise<Listener>;
  /** Open streams (reserved before the first await, so parallel requests cannot overshoot). */
  private open = 0;
  private perAdmin = new Map<number, number>();

  constructor(
    private readonly url: string,
    private readonly limits: EventLimits = { maxStreams: Infinity, maxPerAdmin: Infinity, idleTimeoutS: 255 },
  ) {}

  /** Takes a stream slot for `admin`, or refuses; the returned function gives it back (once). */
  private reserve(admin: Admin): () => void {
    const mine = this.perAdmin.get(admin.id) ?? 0;
    if (mine >= this.limits.maxPerAdmin)
      throw new ApiError(`too many event streams: you already have ${mine} open (close another tab or session)`, 429);
    if (this.open >= this.limits.maxStreams)
      throw new ApiError("the API serves as many event streams as it may; try again later", 503);
    this.open++;
    this.perAdmin.set(admin.id, mine + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.open--;
      const n = (this.perAdmin.get(admin.id) ?? 1) - 1;
      if (n > 0) this.perAdmin.set(admin.id, n);
      else this.perAdmin.delete(admin.id);
    };
  }

  /** Streams open now (total, and of one administrator). */
  streams(adminId?: number): number {
    return adminId === undefined ? this.open : (this.perAdmin.get(adminId) ?? 0);
  }

  private start(): Promise<Listener> {
    return (this.listener ??= listen(this.url, ["qvd_events", "qvd_sessions"], {
      onNotify: (channel, payload) =>
        channel === "qvd_sessions" ? this.sessionEnded(payload) : this.dispatch(payload),
      onReady: ({ reconnected }) => {
        if (reconnected) for (const s of this.subs) s.send("resync", "{}");
      },
    }));
  }

  /** Whether an administrator may learn of this event. */
  static visible(admin: Admin, e: ObjectEvent): boolean {
    if (!admin.acls.has(`${e.object}.see`)) return false;
    if (admin.superadmin) return true;
    return e.tenant_id === null ? e.object === "host" : e.tenant_id === admin.tenant_id;
  }

  /** A session ended (logout, ended by an administrator, expired): its streams end now. */
  private sessionEnded(sessionId: string): void {
    for (const s of this.subs) if (s.admin.sessionId === sessionId) s.logout();
  }

  private dispatch(payload: string): void {
    let e: ObjectEvent;
    try {
      e = JSON.parse(payload);
    } catch {
      log.warn("ignoring a malformed event", { payload: payload.slice(0, 200) });
      return;
    }
    for (const s of this.subs) if (EventHub.visible(s.admin, e)) s.send("change", payload);
  }

  /**
   * A text/event-stream response that lasts until the client goes away, or until its session
   * ends (announced on qvd_sessions, and checked with `sessionAlive` at every keep-alive for
   * what is not announced, such as a blocked administrator): then it gets `event: logout`.
   */
  async subscribe(
    admin: Admin,
    signal: AbortSignal,
    sessionAlive: () => Promise<boolean> = async () => true,
    onOpen: () => void = () => {},
  ): Promise<Response> {
    const release = this.reserve(admin);
    try {
      await this.start();
    } catch (err) {
      release();
      throw err;
    }
    onOpen();
    const enc = new TextEncoder();
    let sub: Subscriber | undefined;
    let keepalive: ReturnType<typeof setInterval> | undefined;
    const stream = new ReadableStream<Uint8Array>({
      start: (controller) => {
        sub = {
          admin,
          send: (event, data) => {
            try {
              controller.enqueue(enc.encode(`event: ${event}\ndata: ${data}\n\n`));
            } catch {
              this.subs.delete(sub!);
              clearInterval(keepalive);
              release();
            }
          },
          logout: () => {
            sub!.send("logout", "{}");
            end();
          },
        };
        this.subs.add(sub);
        controller.enqueue(enc.encode(`retry: 2000\nevent: ready\ndata: {}\n\n`));
        const end = () => {
          clearInterval(keepalive);
          this.subs.delete(sub!);
          release();
          try {
            controller.close();
          } catch {}
        };
        keepalive = setInterval(
          () => {
            void sessionAlive().then(
              (alive) => {
                if (alive) return sub!.send("ping", "{}");
                sub!.logout();
              },
              () => sub!.send("ping", "{}"),
            );
          },
          Math.min(KEEPALIVE_MS, (this.limits.idleTimeoutS * 1000) / 2),
        );
        if (signal.aborted) end();
        else signal.addEventListener("abort", end);
      },
      cancel: () => {
        clearInterval(keepalive);
        if (sub) this.subs.delete(sub);
        release();
      },
    });
    return new Response(stream, {
      headers: { "content-type": "text/event-stream", "cache-control": "no-store", "x-accel-buffering": "no" },
    });
  }

  async close(): Promise<void> {
    for (const s of this.subs) this.subs.delete(s);
    if (this.listener) await (await this.listener).close();
  }
}
