// LISTEN/NOTIFY survives a real PostgreSQL restart and reports the gap.
import { expect, test } from "bun:test";
import { listen, notify } from "../src/db/listen.ts";
import { connect } from "../src/db/pool.ts";
import { useTestDatabase } from "./support/db.ts";
import { until } from "./support/wait.ts";

const db = useTestDatabase();

test("notifications arrive, survive pg_ctl restart, and the gap is reported", async () => {
  const got: string[] = [];
  const ready: boolean[] = [];
  let disconnects = 0;
  const l = await listen(db().url, ["qvd_events", "qvd_host_7"], {
    onNotify: (ch, p) => got.push(`${ch}:${p}`),
    onReady: ({ reconnected }) => ready.push(reconnected),
    onDisconnect: () => disconnects++,
  });
  try {
    expect(ready).toEqual([false]);
    expect(l.connected).toBe(true);
    await notify(db().sql, "qvd_host_7", "hello");
    await until(() => got.length === 1, "first notification", 30_000, 50);
    expect(got).toEqual(["qvd_host_7:hello"]);

    await db().cluster.restart();
    await until(() => ready.length === 2, "the listener to reconnect", 30_000, 50);
    expect(ready).toEqual([false, true]);
    expect(disconnects).toBe(1);
    expect(l.connected).toBe(true);

    // Both channels are listened to again after the restart.
    const sql = connect(db().url, { max: 1 });
    try {
      await notify(sql, "qvd_events", "after");
      await notify(sql, "qvd_host_7", "again");
    } finally {
      await sql.end();
    }
    await until(() => got.length === 3, "notifications after the restart", 30_000, 50);
    expect(got.slice(1).sort()).toEqual(["qvd_events:after", "qvd_host_7:again"]);
  } finally {
    await l.close();
  }
});

test("a command written to vm_runtimes notifies its node's channel", async () => {
  const got: string[] = [];
  const sql = connect(db().url, { max: 2 });
  const l = await listen(db().url, ["qvd_host_10000"], { onNotify: (_c, p) => got.push(p) });
  try {
    const [t] = await sql`INSERT INTO tenants (name) VALUES ('listen') RETURNING id`;
    const [u] = await sql`INSERT INTO users (tenant_id, name) VALUES (${t!.id}, 'lu') RETURNING id`;
    const [o] = await sql`INSERT INTO osfs (tenant_id, name) VALUES (${t!.id}, 'lo') RETURNING id`;
    const [h] = await sql`INSERT INTO hosts (id, name, address) VALUES (10000, 'n1', '198.18.0.1') RETURNING id`;
    const [v] =
      await sql`INSERT INTO vms (tenant_id, user_id, osf_id, name) VALUES (${t!.id}, ${u!.id}, ${o!.id}, 'lv') RETURNING id`;
    await sql`UPDATE vm_runtimes SET host_id = ${h!.id}, vm_cmd = 'start' WHERE vm_id = ${v!.id}`;
    await until(() => got.length === 1, "the command notification", 30_000, 50);
    expect(JSON.parse(got[0]!)).toEqual({ vm_id: v!.id, cmd: "start" });
  } finally {
    await l.close();
    await sql.end();
  }
});
