// Server-sent events of the admin API: changes made by one session reach the streams of
// others, with the right object, operation and id; a tenant's administrator hears only its
// tenant; an administrator without `<object>.see` hears nothing of those objects.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { setKeepAlive } from "../src/api/events.ts";
import { createAdmin, useTestApi, type ApiClient } from "./support/api.ts";
import { ok } from "./support/assert.ts";
import { useTestDatabase } from "./support/db.ts";

const db = useTestDatabase();

interface Sse {
  event: string;
  data: any;
}

/**
 * A reader of GET /events: collects events; `next` waits for one that matches, woken by each
 * event, for at most `ms` (3 s by default: well inside a test's 5 s, so a missing event fails
 * as "no matching event", not as the test's timeout).
 */
class EventStream {
  readonly events: Sse[] = [];
  private readonly ac = new AbortController();
  private waiters: (() => void)[] = [];
  private consumed = 0;
  status = 0;
  contentType = "";

  static async open(client: ApiClient): Promise<EventStream> {
    const s = new EventStream();
    const res = await client.request("/events", { signal: s.ac.signal });
    s.status = res.status;
    s.contentType = res.headers.get("content-type") ?? "";
    if (res.status !== 200) throw new Error(`GET /events: ${res.status} ${await res.text()}`);
    void s.read(res.body!.getReader());
    await s.next((e) => e.event === "ready");
    return s;
  }

  private async read(reader: ReadableStreamDefaultReader<Uint8Array>): Promise<void> {
    const dec = new TextDecoder();
    let buf = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buf += dec.decode(value, { stream: true });
        let i: number;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const frame = buf.slice(0, i);
          buf = buf.slice(i + 2);
          let event = "message";
          const data: string[] = [];
          for (const line of frame.split("\n")) {
            if (line.startsWith("event: ")) event = line.slice(7);
            else if (line.startsWith("data: ")) data.push(line.slice(6));
          }
          if (data.length === 0) continue;
          this.events.push({ event, data: JSON.parse(data.join("\n")) });
          for (const w of this.waiters.splice(0)) w();
        }
      }
    } catch {
      // aborted
    }
  }

  /** The next not yet consumed event matching `pred` (events before it count as seen). */
  async next(pred: (e: Sse) => boolean, ms = 3000): Promise<Sse> {
    const until = Date.now() + ms;
    for (;;) {
      for (let i = this.consumed; i < this.events.length; i++) {
        if (pred(this.events[i]!)) {
          this.consumed = i + 1;
          return this.events[i]!;
        }
      }
      const left = until - Date.now();
      if (left <= 0)
        throw new Error(`no matching event within ${ms} ms; got ${JSON.stringify(this.events.slice(this.consumed))}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  changes(): any[] {
    return this.events.filter((e) => e.event === "change").map((e) => e.data);
  }

  close(): void {
    this.ac.abort();
  }
}

const change = (object: string, op: string, id: number) => (e: Sse) =>
  e.event === "change" && e.data.object === object && e.data.op === op && e.data.id === id;

// Streams still open are closed before the API stops.
const streams: EventStream[] = [];
afterAll(() => {
  for (const s of streams) s.close();
});
const { api, sa } = useTestApi(db, { "wat.multitenant": "1" });
let other: ApiClient; // a second session of another administrator, making the changes
let tenantAdmin: ApiClient;
let userSeer: ApiClient;
let tA: number;
let tB: number;
let osfA: number;

const open = async (c: ApiClient) => {
  const s = await EventStream.open(c);
  streams.push(s);
  return s;
};

beforeAll(async () => {
  tA = (await ok(sa.post("/tenants", { name: "alpha" }), 201)).id;
  tB = (await ok(sa.post("/tenants", { name: "bravo" }), 201)).id;
  // A superadmin-scoped operator makes the changes; a tenant administrator of A and a global
  // administrator who may only see users listen.
  await createAdmin(sa, "changer", { tenantId: 0, roles: ["Superadmin"] });
  await createAdmin(sa, "boss", { tenantId: tA, roles: ["Tenant administrator"] });
  const usersOnly = await ok(sa.post("/roles", { tenant_id: 0, name: "Users only" }), 201);
  await ok(sa.put(`/roles/${usersOnly.id}/acls`, { acl: "user.see" }));
  await createAdmin(sa, "seer", { tenantId: 0, roles: [usersOnly.id] });
  other = await api.login("changer", "changer-password");
  tenantAdmin = await api.login("boss", "boss-password", "alpha");
  userSeer = await api.login("seer", "seer-password");
  osfA = (await ok(sa.post("/osfs", { tenant_id: tA, name: "desk" }), 201)).id;
});
describe("GET /events", () => {
  test("needs a session, and is an event stream", async () => {
    const r = await api.anonymous.get("/events");
    expect(r.status).toBe(401);
    expect(r.body.error.status).toBe(401);
    const s = await open(sa);
    expect(s.status).toBe(200);
    expect(s.contentType).toStartWith("text/event-stream");
    expect(s.events[0]).toEqual({ event: "ready", data: {} });
  });

  test("changes made by another session arrive with object, op, id and tenant", async () => {
    const s = await open(sa);
    const u = await ok(other.post("/users", { tenant_id: tA, name: "ann" }), 201);
    expect((await s.next(change("user", "create", u.id))).data).toEqual({
      object: "user",
      op: "create",
      id: u.id,
      tenant_id: tA,
    });
    await ok(other.patch(`/users/${u.id}`, { description: "changed" }));
    await s.next(change("user", "update", u.id));
    const vm = await ok(other.post("/vms", { user_id: u.id, osf_id: osfA, name: "ann-desk" }), 201);
    expect((await s.next(change("vm", "create", vm.id))).data.tenant_id).toBe(tA);
    // A runtime change (blocking) is an update of the VM.
    await ok(other.post(`/vms/${vm.id}/block`));
    await s.next(change("vm", "update", vm.id));
    const h = await ok(other.post("/hosts", { name: "node1", address: "10.0.0.1" }), 201);
    expect((await s.next(change("host", "create", h.id))).data.tenant_id).toBeNull();
    await ok(other.post(`/hosts/${h.id}/block`));
    await s.next(change("host", "update", h.id));
    const di = await ok(other.post("/dis", { osf_id: osfA, path: "desk.img" }), 201);
    expect((await s.next(change("di", "create", di.id))).data.tenant_id).toBe(tA);
    await ok(other.del(`/vms/${vm.id}`));
    await s.next(change("vm", "delete", vm.id));
    await ok(other.del(`/users/${u.id}`));
    await s.next(change("user", "delete", u.id));
  });

  test("every open stream hears the change", async () => {
    const s1 = await open(sa);
    const s2 = await open(other);
    const u = await ok(sa.post("/users", { tenant_id: tB, name: "both" }), 201);
    const heard = { object: "user", op: "create", id: u.id, tenant_id: tB };
    expect((await s1.next(change("user", "create", u.id))).data).toEqual(heard);
    expect((await s2.next(change("user", "create", u.id))).data).toEqual(heard);
  });

  test("a tenant's administrator hears only its tenant (and the global nodes)", async () => {
    const t = await open(tenantAdmin);
    const all = await open(sa);
    const inB = await ok(other.post("/users", { tenant_id: tB, name: "bert" }), 201);
    const osfB = await ok(other.post("/osfs", { tenant_id: tB, name: "bdesk" }), 201);
    const vmB = await ok(other.post("/vms", { user_id: inB.id, osf_id: osfB.id, name: "bvm" }), 201);
    await ok(other.post(`/vms/${vmB.id}/block`));
    await ok(other.patch(`/tenants/${tB}`, { description: "changed" }));
    const inA = await ok(other.post("/users", { tenant_id: tA, name: "abe" }), 201);
    // The superadmin hears all of it; by the time A's user arrives, B's events would have too.
    await all.next(change("user", "create", inB.id));
    await all.next(change("vm", "update", vmB.id));
    await all.next(change("tenant", "update", tB));
    await t.next(change("user", "create", inA.id));
    const heard = t.changes();
    expect(heard.filter((e) => e.tenant_id === tB)).toEqual([]);
    expect(heard.every((e) => e.tenant_id === tA || (e.object === "host" && e.tenant_id === null))).toBe(true);
    // Its own tenant's changes do arrive, also the ones made by others.
    await ok(other.patch(`/users/${inA.id}`, { description: "x" }));
    await t.next(change("user", "update", inA.id));
  });

  test("without vm.see, no VM events; with user.see, user events", async () => {
    const s = await open(userSeer);
    const u = await ok(other.post("/users", { tenant_id: tA, name: "cat" }), 201);
    const vm = await ok(other.post("/vms", { user_id: u.id, osf_id: osfA, name: "cat-desk" }), 201);
    await ok(other.post(`/vms/${vm.id}/block`));
    const osf = await ok(other.post("/osfs", { tenant_id: tA, name: "cat-osf" }), 201);
    const marker = await ok(other.post("/users", { tenant_id: tA, name: "cat-marker" }), 201);
    await s.next(change("user", "create", u.id));
    await s.next(change("user", "create", marker.id));
    const objects = new Set(s.changes().map((e) => e.object));
    expect([...objects]).toEqual(["user"]);
    expect(s.changes().some((e) => e.id === vm.id || e.id === osf.id)).toBe(false);
  });

  test("a closed stream stops receiving; the others go on", async () => {
    const gone = await open(sa);
    const stays = await open(sa);
    gone.close();
    const u = await ok(other.post("/users", { tenant_id: tA, name: "dan" }), 201);
    await stays.next(change("user", "create", u.id));
    expect(gone.changes().some((e) => e.id === u.id && e.object === "user")).toBe(false);
  });
});

test("a stream ends with `logout` once its session is over", async () => {
  setKeepAlive(200);
  try {
    const mine = await api.login("seer", "seer-password");
    const s = await open(mine);
    await s.next((e) => e.event === "ping", 3000); // alive while the session is
    expect((await mine.post("/logout")).status).toBe(200);
    await s.next((e) => e.event === "logout", 3000);
  } finally {
    setKeepAlive(15_000);
  }
});

test("a session ended by an administrator ends its streams at once, not at the next keep-alive", async () => {
  // The default keep-alive (15 s) is longer than the wait below: only the announcement can do it.
  const mine = await api.login("seer", "seer-password");
  const s = await open(mine); // open() waits for `ready`
  const sid = (await ok(sa.get("/sessions"))).items.find(
    (x: { administrator_name: string }) => x.administrator_name === "seer",
  ).id;
  expect((await sa.del(`/sessions/${sid}`)).status).toBe(200);
  await s.next((e) => e.event === "logout", 3000);
});
