// What the L7R sends to the VMA's x_start: the client's parameters, then the properties of the
// OSF, the image, the user and the VM (in that order), then what the authentication plugin
// knows, then the session identity. A real L7R over TLS and a real PostgreSQL; the desktop is
// stood in for by a recording VMA (HTTP) and a TCP listener as nxagent, on loopback.
import { afterAll, beforeAll, expect, test } from "bun:test";
import type { TCPSocketListener } from "bun";
import { mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import * as D from "../src/db/index.ts";
import { authenticateUser } from "../src/auth/chain.ts";
import { Config } from "../src/config.ts";
import { startL7r, type L7r } from "../src/l7r/server.ts";
import { guestUserName, xStartBody } from "../src/l7r/x-start.ts";
import { Registry } from "../src/metrics.ts";
import { useTestDatabase } from "./support/db.ts";
import { basic, WireClient } from "./support/qvd-wire.ts";
import { sample } from "./support/prometheus.ts";
import { poll } from "./support/wait.ts";
import { selfSignedCert } from "./support/tls.ts";

const db = useTestDatabase();
const ALL = D.ALL_TENANTS;
const dir = mkdtempSync("/tmp/qvd-l7r-xstart-");
const SECRET = "vma-secret-of-this-test";
let l7r: L7r;
let vma: ReturnType<typeof Bun.serve>;
let nxagent: TCPSocketListener<undefined>;
// A second VM needs an address of its own (addresses are unique): the same fakes on 127.0.0.2.
let vma2: ReturnType<typeof Bun.serve>;
let nxagent2: TCPSocketListener<undefined>;
const xStarts: any[] = [];
/** x_start calls the fake VMA refuses (422: not retried) before it accepts again. */
let refuseXStarts = 0;
const metrics = new Registry();
let ids: { alice: number; aliceVm: number; osf: number; di: number; lena: number; lenaVm: number };

/** A VM as a node reports it running: on this machine's loopback, with the fake VMA and nxagent. */
async function running(vmId: number, osfId: number, diId: number, hostId: number, second = false) {
  const [address, v, x] = second ? ["127.0.0.2", vma2, nxagent2] : ["127.0.0.1", vma, nxagent];
  await db()
    .sql`UPDATE vm_runtimes SET vm_state = 'running', host_id = ${hostId}, current_osf_id = ${osfId}, current_di_id = ${diId},
    vm_address = ${address}, vma_port = ${v.port!}, x_port = ${x.port}, vma_secret = ${SECRET} WHERE vm_id = ${vmId}`;
}

beforeAll(async () => {
  const sql = db().sql;
  await selfSignedCert(dir);
  const fakeVma = (hostname: string) =>
    Bun.serve({
      hostname,
      port: 0,
      async fetch(req) {
        if (req.headers.get("x-qvd-vma-secret") !== SECRET)
          return Response.json({ error: "forbidden" }, { status: 403 });
        const path = new URL(req.url).pathname;
        if (path === "/vma/x_start") {
          if (refuseXStarts > 0) {
            refuseXStarts--;
            return Response.json({ error: "refused\r\nX-Injected: 1\u0000by this test" }, { status: 422 });
          }
          xStarts.push(await req.json());
          return Response.json({ state: "starting" });
        }
        if (path === "/vma/x_state")
          return Response.json({ state: "listening", since: new Date().toISOString(), nx_state: "starting" });
        return Response.json({ error: "not found" }, { status: 404 });
      },
    });
  vma = fakeVma("127.0.0.1");
  vma2 = fakeVma("127.0.0.2");
  nxagent = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
  nxagent2 = Bun.listen({ hostname: "127.0.0.2", port: 0, socket: { data() {} } });

  const host = await D.create(sql, D.hosts, ALL, { name: "xs-node", address: "198.18.0.7" });
  await sql`UPDATE host_runtimes SET state = 'running' WHERE host_id = ${host.id}`;
  const alice = await D.create(sql, D.users, ALL, { tenant_id: 1, name: "alice", password: "alice-pw-1" });
  const lena = await D.create(sql, D.users, ALL, { tenant_id: 1, name: "lena", password: "lena-pw-1" });
  const osf = await D.create(sql, D.osfs, ALL, { tenant_id: 1, name: "desk", memory_mb: 128 });
  const di = await D.create(sql, D.dis, ALL, { osf_id: osf.id, path: "desk.tar.gz" });
  const aliceVm = await D.createVm(
    sql,
    ALL,
    { user_id: alice.id, osf_id: osf.id, name: "alice-1" },
    { range: "198.18.0.0/16" },
  );
  const lenaVm = await D.createVm(
    sql,
    ALL,
    { user_id: lena.id, osf_id: osf.id, name: "lena-1" },
    { range: "198.18.0.0/16" },
  );
  ids = { alice: alice.id, aliceVm: aliceVm.id, osf: osf.id, di: di.id, lena: lena.id, lenaVm: lenaVm.id };
  await running(aliceVm.id, osf.id, di.id, host.id);
  await running(lenaVm.id, osf.id, di.id, host.id, true);

  // Property definitions (tenant 1) and values on each of the four objects.
  const define = (key: string, applies_to: D.PropertyTarget[]) =>
    D.create(sql, D.properties, ALL, { tenant_id: 1, key, applies_to });
  const all4: D.PropertyTarget[] = ["osf", "di", "user", "vm"];
  for (const k of [
    "site.level",
    "site.osf",
    "site.di",
    "site.user",
    "site.vm",
    "qvd.client.link",
    "qvd.vm.user.uid",
    "qvd.vm.user.gid",
    "qvd.vm.user.name",
    "qvd.vm.user.home",
    "qvd.vm.user.groups",
    "qvd.slave.key",
  ])
    await define(k, all4);
  const set = (t: D.PropertyTarget, id: number, k: string, v: string) => D.setPropertyValue(sql, ALL, t, id, k, v);
  await set("osf", osf.id, "site.level", "osf");
  await set("di", di.id, "site.level", "di");
  await set("user", alice.id, "site.level", "user");
  await set("vm", aliceVm.id, "site.level", "vm");
  await set("osf", osf.id, "site.osf", "from the OSF");
  await set("di", di.id, "site.di", "from the image");
  await set("user", alice.id, "site.user", "from the user");
  await set("vm", aliceVm.id, "site.vm", "from the VM");
  await set("di", di.id, "site.user", "the image's, overridden by the user's");
  await set("osf", osf.id, "qvd.client.link", "lan"); // an administrator forces the link
  await set("user", alice.id, "qvd.vm.user.uid", "20001");
  await set("user", lena.id, "qvd.vm.user.uid", "20002"); // the plugin's uid wins over this
  await set("vm", aliceVm.id, "qvd.vm.user.name", "root"); // never used: the name is the login's
  await set("vm", aliceVm.id, "qvd.vm.user.groups", "audio,video");
  await set("vm", aliceVm.id, "qvd.slave.key", "chosen-by-an-admin"); // never used: made per connection

  l7r = await startL7r({
    sql,
    databaseUrl: db().url,
    nodename: "xs-node",
    hostname: "127.0.0.1",
    port: 0,
    tls: { cert: join(dir, "cert.pem"), key: join(dir, "key.pem") },
    metrics,
    // lena comes from a directory, as the LDAP plugin reports her.
    authenticate: async (d, a) =>
      a.login === "lena"
        ? {
            ok: true,
            user: {
              userId: lena.id,
              tenantId: 1,
              login: "lena",
              uid: 30000,
              gid: 30001,
              home: "/home/ldap/lena",
              params: { "qvd.vm.user.ldap.name": "lena", "site.level": "plugin" },
            },
          }
        : authenticateUser(d, new Config(), a),
  });
});

afterAll(async () => {
  await l7r?.stop();
  vma?.stop(true);
  nxagent?.stop(true);
  vma2?.stop(true);
  nxagent2?.stop(true);
  rmSync(dir, { recursive: true, force: true });
});

async function connect(vmId: number, auth: string, query: string) {
  const c = await WireClient.connect(l7r.port);
  c.send(
    `GET /qvd/connect_to_vm?id=${vmId}&${query} HTTP/1.1\r\nAuthorization: ${auth}\r\nConnection: Upgrade\r\nUpgrade: QVD/1.0\r\n\r\n`,
  );
  const r = await c.final();
  c.end();
  // The session is released once the client has gone; the next test may connect again.
  await poll(
    async () =>
      (await db().sql`SELECT user_state FROM vm_runtimes WHERE vm_id = ${vmId}`)[0]!.user_state === "disconnected",
    10_000,
    50,
  );
  return r;
}

const CLIENT =
  "qvd.client.os=linux&qvd.client.link=adsl&qvd.client.keyboard=pc105%2Fes&qvd.client.geometry=800x600&qvd.client.fullscreen=1&custom.note=hello";

test("x_start gets the client's parameters, then the OSF's, image's, user's and VM's properties, then the identity", async () => {
  xStarts.length = 0;
  const { res } = await connect(ids.aliceVm, basic("alice", "alice-pw-1"), CLIENT);
  expect(res.status).toBe(101);
  expect(xStarts).toHaveLength(1);
  const b = xStarts[0];
  expect(b).toMatchObject({
    user: "alice",
    uid: 20001,
    gid: 20001,
    keyboard: "pc105/es",
    client_os: "linux",
    geometry: "800x600",
    fullscreen: true,
    link: "lan", // the OSF's property overrides the client's adsl
  });
  expect(b.home).toBeUndefined(); // the VMA's default, /home/alice
  const p = b.properties;
  expect(p["site.level"]).toBe("vm");
  expect(p["site.osf"]).toBe("from the OSF");
  expect(p["site.di"]).toBe("from the image");
  expect(p["site.user"]).toBe("from the user");
  expect(p["site.vm"]).toBe("from the VM");
  expect(p["qvd.client.geometry"]).toBe("800x600");
  expect(p["qvd.client.link"]).toBe("lan");
  expect(p["custom.note"]).toBe("hello");
  expect(p.host_address).toBe("198.18.0.7");
  expect(p["qvd.vm.user.name"]).toBe("alice");
  expect(p["qvd.vm.user.uid"]).toBe("20001");
  expect(p["qvd.vm.user.groups"]).toBe("audio,video");
  expect(p["qvd.slave.key"]).toMatch(/^[A-Za-z0-9]{64}$/);
  expect(res.headers.get("x-qvd-slave-key")).toBe(p["qvd.slave.key"]);
  expect(Object.keys(p)).not.toContain("id");
});

test("the plugin's uid, gid and home win over properties; its params over the properties too", async () => {
  xStarts.length = 0;
  const { res } = await connect(ids.lenaVm, basic("lena", "whatever"), "qvd.client.os=linux");
  expect(res.status).toBe(101);
  const b = xStarts[0];
  expect(b).toMatchObject({ user: "lena", uid: 30000, gid: 30001, home: "/home/ldap/lena" });
  expect(b.properties).toMatchObject({
    "qvd.vm.user.uid": "30000",
    "qvd.vm.user.gid": "30001",
    "qvd.vm.user.home": "/home/ldap/lena",
    "qvd.vm.user.ldap.name": "lena",
    "site.level": "plugin",
  });
});

test("a client cannot send identity keys (403 before anything starts), nor override them through custom.*", async () => {
  xStarts.length = 0;
  for (const forged of [
    "qvd.vm.user.uid=0",
    "qvd.vm.user.name=root",
    "qvd.vm.user.home=%2Froot",
    "qvd.slave.key=x",
    "host_address=1.2.3.4",
  ]) {
    const c = await WireClient.connect(l7r.port);
    c.send(
      `GET /qvd/connect_to_vm?id=${ids.aliceVm}&${forged} HTTP/1.1\r\nAuthorization: ${basic("alice", "alice-pw-1")}\r\nConnection: Upgrade\r\nUpgrade: QVD/1.0\r\n\r\n`,
    );
    const r = await c.response();
    expect([r.status, r.body]).toEqual([403, `Invalid parameters ${forged.split("=")[0]}`]);
    c.end();
  }
  expect(xStarts).toHaveLength(0);
  // The builder itself keeps only client keys, whatever it is given.
  const b = xStartBody({
    client: [
      ["qvd.vm.user.uid", "0"],
      ["qvd.vm.user.home", "/root"],
      ["custom.x", "1"],
    ],
    layers: { osf: {}, di: {}, user: {}, vm: {} },
    user: { userId: 5, tenantId: 1, login: "eve" },
    hostAddress: "198.18.0.7",
    slaveKey: "k",
  });
  expect(b).toMatchObject({ user: "eve", uid: 10005, gid: 10005 });
  expect(b.home).toBeUndefined();
  expect(b.properties["qvd.vm.user.uid"]).toBe("10005");
  expect(b.properties["custom.x"]).toBe("1");
  expect(guestUserName("9lives@Example.com")).toBe("_9lives_example.com");
});

test("an administrator's property the VMA cannot use: 503 naming it; nothing is started", async () => {
  await D.setPropertyValue(db().sql, ALL, "user", ids.alice, "qvd.vm.user.uid", "zero");
  xStarts.length = 0;
  const { res } = await connect(ids.aliceVm, basic("alice", "alice-pw-1"), "qvd.client.os=linux");
  expect(res.status).toBe(503);
  expect(res.body).toBe(
    'The requested virtual machine is not available: The desktop is misconfigured (property qvd.vm.user.uid = "zero" is not a valid id (1 or more)), ask an administrator, retry later.',
  );
  expect(xStarts).toHaveLength(0);
  await D.setPropertyValue(db().sql, ALL, "vm", ids.aliceVm, "qvd.vm.user.home", "/home/../etc");
  await D.deletePropertyValue(db().sql, ALL, "user", ids.alice, "qvd.vm.user.uid");
  const again = await connect(ids.aliceVm, basic("alice", "alice-pw-1"), "qvd.client.os=linux");
  expect(again.res.status).toBe(503);
  expect(again.res.body).toContain('qvd.vm.user.home = "/home/../etc" is not an absolute path');
  // Stored values the identity rules refuse (set before them, or in the database): refused here too.
  for (const [target, id, key, value, message] of [
    [
      "vm",
      ids.aliceVm,
      "qvd.vm.user.home",
      "/etc",
      'identity refused: home "/etc" is not a plain directory below /home (identity.home.base)',
    ],
    ["vm", ids.aliceVm, "qvd.vm.user.home", "/home", "is not a plain directory below /home"],
    ["user", ids.alice, "qvd.vm.user.uid", "0", 'property qvd.vm.user.uid = "0" is not a valid id'],
    [
      "user",
      ids.alice,
      "qvd.vm.user.uid",
      "500",
      "identity refused: uid 500 is outside the allowed range 10000-60000 (identity.uid.min/max)",
    ],
    ["user", ids.alice, "qvd.vm.user.gid", "42", "identity refused: gid 42 is outside the allowed range"],
    ["vm", ids.aliceVm, "qvd.vm.user.groups", "audio,shadow", "identity refused: group shadow not allowed"],
  ] as const) {
    await D.setPropertyValue(db().sql, ALL, target, id, key, value);
    const r = await connect(ids.aliceVm, basic("alice", "alice-pw-1"), "qvd.client.os=linux");
    expect(r.res.status, value).toBe(503);
    expect(r.res.body).toContain(message);
    if (target === "user") await D.deletePropertyValue(db().sql, ALL, "user", ids.alice, key);
    if (value === "/home") await D.deletePropertyValue(db().sql, ALL, "vm", ids.aliceVm, key);
  }
  await D.setPropertyValue(db().sql, ALL, "vm", ids.aliceVm, "qvd.vm.user.groups", "audio,video");
  expect(xStarts).toHaveLength(0);
  // The L7R reads the global rules as they are now.
  await D.setPropertyValue(db().sql, ALL, "vm", ids.aliceVm, "qvd.vm.user.home", "/srv/homes/alice");
  expect((await connect(ids.aliceVm, basic("alice", "alice-pw-1"), "qvd.client.os=linux")).res.status).toBe(503);
  await D.setConfig(db().sql, 0, "identity.home.base", "/srv/homes");
  try {
    const ok = await connect(ids.aliceVm, basic("alice", "alice-pw-1"), "qvd.client.os=linux");
    expect(ok.res.status).toBe(101);
    expect(xStarts.at(-1)).toMatchObject({ uid: 10000 + ids.alice, home: "/srv/homes/alice" });
  } finally {
    await D.deleteConfig(db().sql, 0, "identity.home.base");
  }
});

test("a bearer login starts the desktop with the identity of the login that made the token", async () => {
  const c = await WireClient.connect(l7r.port);
  c.send(`GET /qvd/create_auth_token HTTP/1.1\r\nAuthorization: ${basic("lena", "whatever")}\r\n\r\n`);
  const token = JSON.parse((await c.response()).body).auth_token.trim();
  c.end();
  xStarts.length = 0;
  const { res } = await connect(ids.lenaVm, `Bearer ${token}`, "qvd.client.os=linux");
  expect(res.status).toBe(101);
  expect(xStarts[0]).toMatchObject({ user: "lena", uid: 30000, gid: 30001, home: "/home/ldap/lena" });
  expect(xStarts[0].properties["qvd.vm.user.ldap.name"]).toBe("lena");
});

test("each connect_to_vm gives the VMA a new NX cookie (for nxagent), which is in no property the desktop sees", async () => {
  const cookies: string[] = [];
  for (let i = 0; i < 2; i++) {
    xStarts.length = 0;
    const { res } = await connect(ids.lenaVm, basic("lena", "whatever"), "qvd.client.os=linux");
    expect(res.status).toBe(101);
    const b = xStarts[0];
    expect(b.cookie).toMatch(/^[0-9a-f]{32}$/);
    expect(JSON.stringify(b.properties)).not.toContain(b.cookie);
    cookies.push(b.cookie);
  }
  expect(cookies[1]).not.toBe(cookies[0]);
});

test("the metrics count each connect on its own: after a cold connect that failed, the next one on the connection is warm", async () => {
  const sql = db().sql;
  const [host] = await sql`SELECT id FROM hosts WHERE name = 'xs-node'`;
  const hostId = host!.id as number;
  // The node can take a start; the test plays its HKD: a start command makes the desktop run.
  await sql`UPDATE host_runtimes SET ok_ts = now(), usable_ram_mb = 100000, hypervisors = '{lxc}' WHERE host_id = ${hostId}`;
  await sql`UPDATE vm_runtimes SET vm_state = 'stopped', vm_cmd = NULL WHERE vm_id = ${ids.lenaVm}`;
  let hkd = true;
  const playHkd = (async () => {
    while (hkd) {
      const [r] = await sql`SELECT vm_cmd FROM vm_runtimes WHERE vm_id = ${ids.lenaVm}`;
      if (r!.vm_cmd === "start") {
        await running(ids.lenaVm, ids.osf, ids.di, hostId, true);
        await sql`UPDATE vm_runtimes SET vm_cmd = NULL WHERE vm_id = ${ids.lenaVm}`;
      }
      await Bun.sleep(50);
    }
  })();
  const series = async () => {
    const text = await metrics.render();
    const of = (s: string) => sample(text, s) ?? 0;
    return {
      cold: of('qvd_l7r_connect_seconds_count{client="qvd",path="cold"}'),
      warm: of('qvd_l7r_connect_seconds_count{client="qvd",path="warm"}'),
      ok: of('qvd_l7r_connects_total{client="qvd",result="ok"}'),
      failed: of('qvd_l7r_connects_total{client="qvd",result="failed"}'),
    };
  };
  const before = await series();
  refuseXStarts = 1;
  const c = await WireClient.connect(l7r.port);
  try {
    const request = `GET /qvd/connect_to_vm?id=${ids.lenaVm}&qvd.client.os=linux HTTP/1.1\r\nAuthorization: ${basic("lena", "whatever")}\r\nConnection: Upgrade\r\nUpgrade: QVD/1.0\r\n\r\n`;
    // The first connect starts the desktop, then its X session is refused (the VMA's reason
    // reaches the user on one line).
    c.send(request);
    const first = await c.final();
    expect(first.progress).toContain("Starting virtual machine");
    expect([first.res.status, first.res.body]).toEqual([
      503,
      `The requested virtual machine is not available: Unable to start X session on VM ${ids.lenaVm}: VMA x_start failed with 422: refused X-Injected: 1 by this test, retry later.`,
    ]);
    // The second, on the same connection, finds it running: a warm connect.
    c.send(request);
    const second = await c.final();
    expect(second.progress).not.toContain("Starting virtual machine");
    expect(second.res.status).toBe(101);
  } finally {
    c.end();
    hkd = false;
    await playHkd;
  }
  const after = await series();
  expect({
    cold: after.cold - before.cold,
    warm: after.warm - before.warm,
    ok: after.ok - before.ok,
    failed: after.failed - before.failed,
  }).toEqual({ cold: 0, warm: 1, ok: 1, failed: 1 });
});
