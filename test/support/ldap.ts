// A throwaway OpenLDAP server for tests: slapd with a slapd.conf (-f) in a temp directory, a
// small directory loaded with slapadd, listening on free loopback ports (plain LDAP with StartTLS,
// and LDAPS, through a self-signed certificate). Stopped by PID; the directory removed.
//   const ldap = new LdapServer(); await ldap.start(ENTRIES); … await ldap.stop();
import { mkdtempSync, rmSync, writeFileSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { run } from "../../src/run.ts";
import { freePort } from "./free.ts";
import { selfSignedCert } from "./tls.ts";
import { poll } from "./wait.ts";

export const LDAP_SUFFIX = "dc=example,dc=org";
export const LDAP_ROOT_DN = `cn=admin,${LDAP_SUFFIX}`;
export const LDAP_ROOT_PW = "root-secret";

export class LdapServer {
  dir = "";
  port = 0;
  tlsPort = 0;
  /** PEM of the self-signed certificate (also the CA to trust); set when TLS is set up. */
  caFile = "";
  private proc?: Subprocess;

  get url(): string {
    return `ldap://127.0.0.1:${this.port}`;
  }

  get ldapsUrl(): string {
    return `ldaps://127.0.0.1:${this.tlsPort}`;
  }

  async start(ldif: string): Promise<void> {
    this.dir = mkdtempSync(join(tmpdir(), "qvd-slapd-"));
    const data = join(this.dir, "data");
    mkdirSync(data);
    const { cert, key } = await selfSignedCert(this.dir, { cn: "127.0.0.1", san: "IP:127.0.0.1,DNS:localhost" });
    this.caFile = cert;
    const conf = join(this.dir, "slapd.conf");
    writeFileSync(
      conf,
      [
        "include /etc/ldap/schema/core.schema",
        "include /etc/ldap/schema/cosine.schema",
        "include /etc/ldap/schema/nis.schema",
        "include /etc/ldap/schema/inetorgperson.schema",
        "modulepath /usr/lib/ldap",
        "moduleload back_mdb",
        `pidfile ${join(this.dir, "slapd.pid")}`,
        `TLSCertificateFile ${cert}`,
        `TLSCertificateKeyFile ${key}`,
        "database mdb",
        `suffix "${LDAP_SUFFIX}"`,
        `rootdn "${LDAP_ROOT_DN}"`,
        `rootpw ${LDAP_ROOT_PW}`,
        `directory ${data}`,
        "maxsize 33554432",
        "access to attrs=userPassword by self read by anonymous auth by * none",
        "access to * by * read",
        "",
      ].join("\n"),
    );
    const ldifFile = join(this.dir, "data.ldif");
    writeFileSync(ldifFile, ldif);
    await run(["slapadd", "-f", conf, "-l", ldifFile]);
    this.port = freePort();
    this.tlsPort = freePort();
    // -d 0: stay in the foreground (our child, stopped by PID) without debug output.
    this.proc = Bun.spawn(["slapd", "-f", conf, "-h", `${this.url}/ ${this.ldapsUrl}/`, "-d", "0"], {
      stdout: "ignore",
      stderr: Bun.file(join(this.dir, "slapd.log")),
    });
    const proc = this.proc;
    const up = await poll(
      async () =>
        (
          await run(["ldapsearch", "-x", "-H", this.url, "-b", LDAP_SUFFIX, "-s", "base", "(objectClass=*)", "dn"], {
            allowFail: true,
          })
        ).status === 0,
      15_000,
      100,
      { abort: () => proc.exitCode !== null },
    );
    if (!up) {
      const err = await Bun.file(join(this.dir, "slapd.log"))
        .text()
        .catch(() => "");
      await this.stop();
      throw new Error(`slapd did not start: ${err.slice(-2000)}`);
    }
  }

  async stop(): Promise<void> {
    const p = this.proc;
    this.proc = undefined;
    if (p && p.exitCode === null) {
      p.kill("SIGTERM");
      const done = await Promise.race([p.exited.then(() => true), Bun.sleep(5000).then(() => false)]);
      if (!done) {
        p.kill("SIGKILL");
        await p.exited;
      }
    }
    if (this.dir) rmSync(this.dir, { recursive: true, force: true });
    this.dir = "";
  }
}
