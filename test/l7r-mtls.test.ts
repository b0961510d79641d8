// Mutual TLS (l7r.tls.client_ca): the L7R takes only clients whose certificate its CA signed,
// and `qvd client --cert/--key` presents one.
import { afterAll, beforeAll, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import * as D from "../src/db/index.ts";
import { startL7r, type L7r } from "../src/l7r/server.ts";
import { run } from "../src/run.ts";
import { useTestDatabase } from "./support/db.ts";
import { capture } from "./support/spawn.ts";
import { selfSignedCert, signedCert } from "./support/tls.ts";

const db = useTestDatabase();
const dir = mkdtempSync("/tmp/qvd-l7r-mtls-");
const f = (n: string) => join(dir, n);
let l7r: L7r;

/** A key and a certificate for `cn` (NAME.key, NAME.pem), signed by the client CA (or self-signed). */
const certificate = (name: string, cn: string, signed = false) => {
  const o = { cn, names: [`${name}.pem`, `${name}.key`] as [string, string] };
  return signed ? signedCert(dir, { cert: f("ca.pem"), key: f("ca.key") }, o) : selfSignedCert(dir, o);
};

beforeAll(async () => {
  await selfSignedCert(dir, { cn: "qvd test client CA", names: ["ca.pem", "ca.key"] });
  await certificate("server", "localhost");
  await certificate("alice", "alice", true);
  await certificate("stranger", "stranger");
  const sql = db().sql;
  const host = await D.create(sql, D.hosts, D.ALL_TENANTS, { name: "mtls-node", address: "127.0.0.1" });
  await sql`UPDATE host_runtimes SET state = 'running' WHERE host_id = ${host.id}`;
  const alice = await D.create(sql, D.users, D.ALL_TENANTS, { tenant_id: 1, name: "alice", password: "alice-pw-1" });
  const osf = await D.create(sql, D.osfs, D.ALL_TENANTS, { tenant_id: 1, name: "desk" });
  await D.createVm(
    sql,
    D.ALL_TENANTS,
    { user_id: alice.id, osf_id: osf.id, name: "alice-1" },
    { range: "198.18.0.0/16" },
  );
  l7r = await startL7r({
    sql,
    databaseUrl: db().url,
    nodename: "mtls-node",
    hostname: "127.0.0.1",
    port: 0,
    tls: { cert: f("server.pem"), key: f("server.key"), clientCa: f("ca.pem") },
  });
});

afterAll(async () => {
  await l7r?.stop();
  rmSync(dir, { recursive: true, force: true });
});

const ping = async (args: string) =>
  (
    await run(
      [
        "sh",
        "-c",
        `printf 'GET /qvd/ping HTTP/1.1\\r\\n\\r\\n' | timeout 4 openssl s_client -quiet -connect 127.0.0.1:${l7r.port} ${args} 2>&1`,
      ],
      { allowFail: true },
    )
  ).stdout;

test("a client certificate signed by the CA is let in; none, or another one, is refused in the handshake", async () => {
  expect(await ping(`-cert ${f("alice.pem")} -key ${f("alice.key")}`)).toContain("I am alive!");
  expect(await ping("")).not.toContain("I am alive!");
  expect(await ping(`-cert ${f("stranger.pem")} -key ${f("stranger.key")}`)).not.toContain("I am alive!");
});

async function qvdClient(args: string[]) {
  return capture(
    [
      process.execPath,
      "src/main.ts",
      "client",
      "--host",
      "127.0.0.1",
      "--port",
      String(l7r.port),
      "--insecure",
      "--user",
      "alice",
      "--print-token",
      ...args,
    ],
    { env: { PATH: process.env.PATH!, HOME: dir, QVD_PASSWORD: "alice-pw-1" } },
  );
}

test("qvd client --cert/--key logs in; without them it says the server wants a client certificate", async () => {
  const ok = await qvdClient(["--cert", f("alice.pem"), "--key", f("alice.key")]);
  expect(ok.code).toBe(0);
  expect(ok.stdout.trim()).toMatch(/^[A-Za-z0-9+/=]+$/);
  const refused = await qvdClient([]);
  expect(refused.code).toBe(3);
  expect(refused.stderr).toContain("requires a client certificate: give it with --cert FILE --key FILE");
  const stranger = await qvdClient(["--cert", f("stranger.pem"), "--key", f("stranger.key")]);
  // The server's refusal of a certificate it cannot verify may come without a reason.
  expect(stranger.code).not.toBe(0);
  expect(stranger.stderr).toMatch(/refused the client certificate|may have refused the one given with --cert/);
  const half = await qvdClient(["--cert", f("alice.pem")]);
  expect(half.code).toBe(2);
});
