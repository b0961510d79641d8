// GET /api/v1/events: server-sent events of object changes. One LISTEN connection per API
// process fans out to every subscriber, each filtered by its tenant and `<object>.see` ACL.
// After a database reconnection subscribers get a `resync` event: changes may have been
// missed, so a client should reload what it shows.
import { listen, type Listener } from "../db/listen.ts";
import { logger } from "../log.ts";
import type { Admin } from "./context.ts";

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

export class EventHub {
  private subs = new Set<Subscriber>();
  private listener?: Promise<Listener>;

  constructor(private readonly url: string) {}

  private start(): Promise<Listener> {
    return (this.listener ??= listen(this.url, ["qvd_events", "qvd_sessions"], {
      onNotify: (channel, payload) => (channel === "qvd_sessions" ? this.sessionEnded(payload) : this.dispatch(payload)),
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
  async subscribe(admin: Admin, signal: AbortSignal, sessionAlive: () => Promise<boolean> = async () => true): Promise<Response> {
    await this.start();
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
          try {
            controller.close();
          } catch {}
        };
        keepalive = setInterval(() => {
          void sessionAlive().then((alive) => {
            if (alive) return sub!.send("ping", "{}");
            sub!.logout();
          }, () => sub!.send("ping", "{}"));
        }, KEEPALIVE_MS);
        signal.addEventListener("abort", end);
      },
      cancel: () => {
        clearInterval(keepalive);
        if (sub) this.subs.delete(sub);
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
