// LISTEN/NOTIFY on a dedicated connection that reconnects and re-listens by itself after the
// server restarts or the network drops. Notifications sent while the connection was down are
// lost (PostgreSQL does not queue them), so after every reconnection the caller is told
// `onReady({ reconnected: true })` and must re-read the state it cares about.
// (postgres.js's own sql.listen gives up on a channel when the first re-LISTEN fails while
// the server is still down, so the reconnection loop is ours.)
import { logger } from "../log.ts";
import { connect, type Db, type Sql } from "./pool.ts";

const log = logger("listen");

export interface ListenHandlers {
  onNotify: (channel: string, payload: string) => void;
  /** After the first LISTEN (reconnected false) and after each recovery (true: a gap). */
  onReady?: (info: { reconnected: boolean }) => void;
  /** The connection was lost; reconnection attempts follow until `close()`. */
  onDisconnect?: () => void;
}

export interface Listener {
  readonly connected: boolean;
  close(): Promise<void>;
}

/** PostgreSQL channel names are identifiers: keep ours simple so they need no quoting. */
const CHANNEL = /^[a-z_][a-z0-9_]{0,62}$/;

export async function listen(
  url: string,
  channels: string[],
  h: ListenHandlers,
  opts: { retryMs?: { min: number; max: number } } = {},
): Promise<Listener> {
  for (const c of channels) if (!CHANNEL.test(c)) throw new Error(`invalid channel name ${JSON.stringify(c)}`);
  // At most a second between attempts: a promoted standby is listened on soon after it is up.
  const retry = opts.retryMs ?? { min: 200, max: 1000 };
  let connected = false;
  let closed = false;
  let reconnecting: Promise<void> | undefined;

  const open = (): Sql =>
    connect(url, {
      max: 1,
      applicationName: "qvd-listen",
      listener: {
        onnotify: (channel, payload) => {
          if (channels.includes(channel)) h.onNotify(channel, payload);
        },
        onclose: () => {
          if (closed || !connected) return;
          connected = false;
          log.warn("database connection for notifications lost; reconnecting");
          h.onDisconnect?.();
          reconnecting ??= reconnect().finally(() => (reconnecting = undefined));
        },
      },
    });
  let sql = open();

  const listenAll = async () => {
    for (const c of channels) await sql.unsafe(`LISTEN ${c}`);
  };

  async function reconnect(): Promise<void> {
    let delay = retry.min;
    while (!closed) {
      await Bun.sleep(delay);
      if (closed) return;
      try {
        // A fresh connection each time: nothing of the lost one's state is carried over (and,
        // with several servers, the one that takes writes is chosen again).
        const old = sql;
        sql = open();
        await old.end({ timeout: 0 }).catch(() => {});
        await listenAll();
        connected = true;
        log.info("notifications resumed; state must be re-read");
        h.onReady?.({ reconnected: true });
        return;
      } catch (err) {
        log.debug("reconnect failed", { error: (err as Error).message });
        delay = Math.min(retry.max, delay * 2);
      }
    }
  }

  await listenAll();
  connected = true;
  h.onReady?.({ reconnected: false });

  return {
    get connected() {
      return connected;
    },
    async close() {
      closed = true;
      await sql.end({ timeout: 2 });
    },
  };
}

/** Sends a notification through any pool or transaction (delivered at commit). */
export async function notify(db: Db, channel: string, payload: string): Promise<void> {
  await db`SELECT pg_notify(${channel}, ${payload})`;
}
