// KVM desktops in the admin API: an OSF's hypervisor and vCPUs (create, show, list, filter,
// sort, change, the values a tenant's administrator may send), the hypervisor fixed while the OSF
// has images, the nodes' hypervisors, and the OpenAPI text for these fields.
import { beforeAll, describe, expect, test } from "bun:test";
import { join } from "node:path";
import { setHostHypervisors } from "../src/db/hosts.ts";
import { useTestApi, type ApiClient } from "./support/api.ts";
import { ok } from "./support/assert.ts";
import { useTestDatabase } from "./support/db.ts";
import { until } from "./support/wait.ts";
import { capture, cleanEnv, type Captured } from "./support/spawn.ts";

const db = useTestDatabase();
const sql = () => db().sql;
const live = useTestApi(db, { "wat.multitenant": "1" });
const { api, sa } = live;
let boss: ApiClient; // a tenant's administrator (role "Tenant administrator")

beforeAll(async () => {
  const t = await ok(sa.post("/tenants", { name: "kvmco" }), 201);
  boss = (await live.admin("boss", { tenantId: t.id, tenant: "kvmco", roles: ["Tenant administrator"] })).client;
});

describe("an OSF's hypervisor and vCPUs", () => {
  test("created, shown, listed, filtered, sorted and changed like the other fields", async () => {
    const lxc = await ok(boss.post("/osfs", { name: "plain" }), 201);
    expect([lxc.hypervisor, lxc.vcpus]).toEqual(["lxc", 1]);
    const kvm = await ok(
      boss.post("/osfs", { name: "vm", hypervisor: "kvm", vcpus: 4, memory_mb: 2048, user_storage_mb: 1024 }),
      201,
    );
    expect([kvm.hypervisor, kvm.vcpus, kvm.user_storage_mb]).toEqual(["kvm", 4, 1024]);
    expect((await ok(boss.get(`/osfs/${kvm.id}`))).hypervisor).toBe("kvm");
    expect((await ok(boss.get("/osfs?hypervisor=kvm"))).items.map((o: any) => o.name)).toEqual(["vm"]);
    expect((await ok(boss.get("/osfs?hypervisor[ne]=kvm"))).items.map((o: any) => o.name)).toEqual(["plain"]);
    expect((await ok(boss.get("/osfs?vcpus[gt]=1"))).items.map((o: any) => o.name)).toEqual(["vm"]);
    expect((await ok(boss.get("/osfs?sort=-vcpus&fields=name,hypervisor,vcpus"))).items).toEqual([
      { id: kvm.id, name: "vm", hypervisor: "kvm", vcpus: 4 },
      { id: lxc.id, name: "plain", hypervisor: "lxc", vcpus: 1 },
    ]);
    // No images yet: the hypervisor may change, either way.
    expect(await ok(boss.patch(`/osfs/${lxc.id}`, { hypervisor: "kvm", vcpus: 64 }))).toMatchObject({
      hypervisor: "kvm",
      vcpus: 64,
    });
    expect(await ok(boss.patch(`/osfs/${lxc.id}`, { hypervisor: "lxc", vcpus: 1 }))).toMatchObject({
      hypervisor: "lxc",
      vcpus: 1,
    });
  });

  test("a tenant's administrator can send only lxc or kvm, and 1 to 64 vCPUs (422 naming the field)", async () => {
    const o = await ok(boss.post("/osfs", { name: "abuse" }), 201);
    const badHypervisors: unknown[] = ["KVM", "lxc;drop", "", 0, "kvm ", "xen", null, ["kvm"], { $ne: "lxc" }];
    const badVcpus: unknown[] = [0, 65, -1, "2; x", "2", 1.5, 1e9, null, true];
    for (const [field, values] of [
      ["hypervisor", badHypervisors],
      ["vcpus", badVcpus],
    ] as const) {
      for (const v of values) {
        for (const r of [
          await boss.post("/osfs", { name: `abuse-${field}`, [field]: v }),
          await boss.patch(`/osfs/${o.id}`, { [field]: v }),
        ]) {
          expect([field, v, r.status, r.body.error?.field]).toEqual([field, v, 422, field]);
        }
      }
    }
    // Mass changes check the values once, before any OSF changes.
    const mass = await boss.call("PATCH", "/osfs?all=true", { hypervisor: "vmware" });
    expect([mass.status, mass.body.error?.field]).toEqual([422, "hypervisor"]);
    expect(await ok(boss.get(`/osfs/${o.id}`))).toMatchObject({ hypervisor: "lxc", vcpus: 1 });
    expect((await boss.post("/osfs", { name: "abuse-hypervisor" })).status).toBe(201); // nothing was created by the refused ones
    // Filters take any text: a value that is no hypervisor matches nothing, and is no SQL.
    expect((await ok(boss.get(`/osfs?hypervisor=${encodeURIComponent("lxc' OR '1'='1")}`))).total).toBe(0);
    expect((await boss.get("/osfs?vcpus=abc")).status).toBe(422);
  });

  test("the hypervisor changes only while the OSF has no disk images (409 saying why); other fields change", async () => {
    const o = await ok(boss.post("/osfs", { name: "imaged", hypervisor: "kvm" }), 201);
    const di = await ok(boss.post("/dis", { osf_id: o.id, path: "imaged.qcow2" }), 201);
    const r = await boss.patch(`/osfs/${o.id}`, { hypervisor: "lxc" });
    expect(r.status).toBe(409);
    expect(r.body.error.message).toBe(
      'OSF "imaged" has disk images: the hypervisor decides their kind; delete them or make a new OSF',
    );
    // The same value, as a form sends it with the rest, and the other fields still change.
    expect(await ok(boss.patch(`/osfs/${o.id}`, { hypervisor: "kvm", vcpus: 8, user_storage_mb: 512 }))).toMatchObject({
      hypervisor: "kvm",
      vcpus: 8,
      user_storage_mb: 512,
    });
    // A mass change reports the refusal per OSF.
    const mass = await ok(boss.call("PATCH", `/osfs?name=imaged`, { hypervisor: "lxc" }));
    expect([mass.ok, mass.failed, mass.results[0].status]).toEqual([0, 1, 409]);
    // Without its images it may change again.
    await ok(boss.del(`/dis/${di.id}`));
    expect((await ok(boss.patch(`/osfs/${o.id}`, { hypervisor: "lxc" }))).hypervisor).toBe("lxc");
  });

  test("the database keeps the hypervisor fixed under images, whoever writes", async () => {
    const o = await ok(sa.post("/osfs", { tenant_id: 1, name: "direct", hypervisor: "kvm" }), 201);
    await ok(sa.post("/dis", { osf_id: o.id, path: "direct.qcow2" }), 201);
    await expect(sql()`UPDATE osfs SET hypervisor = 'lxc' WHERE id = ${o.id}`).rejects.toThrow("has disk images");
    const bare = await ok(sa.post("/osfs", { tenant_id: 1, name: "bare" }), 201);
    await expect(sql()`UPDATE osfs SET hypervisor = 'xen' WHERE id = ${bare.id}`).rejects.toThrow(/check constraint/);
    await expect(sql()`UPDATE osfs SET vcpus = 65 WHERE id = ${bare.id}`).rejects.toThrow(/check constraint/);
  });

  test("an image added while the hypervisor changes: the change waits for it, then is refused", async () => {
    const o = await ok(sa.post("/osfs", { tenant_id: 1, name: "racing" }), 201);
    const adder = await sql().reserve();
    try {
      await adder`BEGIN`;
      await adder`INSERT INTO dis (osf_id, version, path) VALUES (${o.id}, 'v1', 'racing.tar.gz')`;
      // Not committed yet: the change cannot see it, so it must wait for it.
      let settled = false;
      const change = sa.patch(`/osfs/${o.id}`, { hypervisor: "kvm" }).finally(() => (settled = true));
      await until(
        async () =>
          (
            await sql()`SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'`
          )[0]!.n > 0,
        "the change to wait on the uncommitted image's lock",
        5000,
        20,
      );
      expect(settled).toBe(false);
      await adder`COMMIT`;
      const r = await change;
      expect([r.status, r.body.error.message]).toEqual([409, expect.stringContaining('OSF "racing" has disk images')]);
      expect((await ok(sa.get(`/osfs/${o.id}`))).hypervisor).toBe("lxc");
    } finally {
      adder.release();
    }
  });
});

describe("nodes", () => {
  test("show the hypervisors they run and what their probes found; filterable", async () => {
    const h = await ok(sa.post("/hosts", { name: "kvm-node", address: "10.1.0.1" }), 201);
    expect([h.hypervisors, h.hypervisor_notes]).toEqual([["lxc"], ""]);
    await setHostHypervisors(sql(), h.id, ["lxc", "kvm"], "kvm: tcg: /dev/kvm missing");
    expect(await ok(sa.get(`/hosts/${h.id}`))).toMatchObject({
      hypervisors: ["kvm", "lxc"],
      hypervisor_notes: "kvm: tcg: /dev/kvm missing",
    });
    expect((await ok(sa.get("/hosts?hypervisors=kvm"))).items.map((x: any) => x.name)).toEqual(["kvm-node"]);
    // Written by the node only: not a field an administrator sets.
    const r = await sa.patch(`/hosts/${h.id}`, { hypervisors: ["kvm"] });
    expect([r.status, r.body.error.field]).toEqual([422, "hypervisors"]);
  });
});

test("the OpenAPI document describes the fields: hypervisor, KVM-only vcpus and user_storage_mb", async () => {
  const doc = (await api.anonymous.get("/openapi.json")).body;
  const create = doc.paths["/api/v1/osfs"].post.requestBody.content["application/json"].schema.properties;
  expect(create.hypervisor.enum).toEqual(["lxc", "kvm"]);
  expect(create.hypervisor.description).toContain("Changes only while the OSF has no disk images");
  expect(create.vcpus).toMatchObject({ minimum: 1, maximum: 64 });
  expect(create.vcpus.description).toStartWith("KVM only");
  expect(create.user_storage_mb.description).toStartWith("KVM only: size of the user's home disk in MB, 0 = none");
  const host = doc.paths["/api/v1/hosts/{id}"].get.responses["200"].content["application/json"].schema.properties;
  expect(host.hypervisors.items.enum).toEqual(["lxc", "kvm"]);
});

describe("qvd admin", () => {
  /** `qvd admin …` as the superadministrator (token and URL from the environment). */
  async function qvd(...args: string[]): Promise<Captured> {
    const env = cleanEnv({
      QVD_ADMIN_URL: api.url.replace(/\/api\/v1$/, ""),
      QVD_ADMIN_TOKEN: sa.token!,
      NO_COLOR: "1",
      HOME: "/nonexistent",
    });
    return capture([process.execPath, "src/main.ts", "admin", ...args], { cwd: join(import.meta.dir, ".."), env });
  }

  test("osf set hypervisor=kvm vcpus=2 through the generic fields; lists show the hypervisor; bad values name the field", async () => {
    const made = await qvd("osf", "new", "name=cli-desk", "tenant=default", "user_storage_mb=2048");
    expect([made.code, made.stderr]).toEqual([0, ""]);
    const set = await qvd("osf", "set", "cli-desk@default", "hypervisor=kvm", "vcpus=2");
    expect([set.code, set.stderr]).toEqual([0, ""]);
    const row = (await ok(sa.get("/osfs?name=cli-desk"))).items[0];
    expect([row.hypervisor, row.vcpus, row.user_storage_mb]).toEqual(["kvm", 2, 2048]);
    const list = await qvd("osf", "list", "--filter", "name=cli-desk");
    const [head, line] = list.stdout.trim().split("\n");
    expect(head!.split(/\s+/)).toEqual(expect.arrayContaining(["hypervisor", "vcpus"]));
    expect(line!.split(/\s+/)[head!.split(/\s+/).indexOf("hypervisor")]).toBe("kvm");
    for (const [arg, field] of [
      ["vcpus=2x", "vcpus"],
      ["vcpus=0", "vcpus"],
      ["hypervisor=KVM", "hypervisor"],
    ] as const) {
      const bad = await qvd("osf", "set", "cli-desk@default", arg);
      expect([arg, bad.code, bad.stderr]).toEqual([arg, 1, expect.stringContaining(field)]);
    }
    expect((await ok(sa.get(`/osfs/${row.id}`))).vcpus).toBe(2);
  });

  test("host list shows the hypervisors each node runs", async () => {
    const h = await ok(sa.post("/hosts", { name: "cli-node", address: "10.1.0.2" }), 201);
    await setHostHypervisors(sql(), h.id, ["kvm"], "kvm: accel kvm");
    const list = await qvd("host", "list", "--filter", "name=cli-node");
    const [head, line] = list.stdout.trim().split("\n");
    expect(line!.split(/\s+/)[head!.split(/\s+/).indexOf("hypervisors")]).toBe("kvm");
  });
});
