// The demo's TLS certificate: one self-signed certificate for 127.0.0.1 and localhost, made
// with openssl on the first run and kept in the demo directory. The L7R and the API serve it;
// clients trust it with `--ca <dir>/tls/cert.pem`. And the farm's: a CA and the node's certificate.
import { chmodSync, existsSync, mkdirSync, renameSync, rmSync } from "node:fs";
import { join } from "node:path";
import { UserError } from "../errors.ts";
import { createFarmCa, issueNodeCert } from "../farm/certs.ts";
import { run } from "../run.ts";

export interface DemoTls {
  cert: string;
  key: string;
  created: boolean;
}

export async function demoCertificate(dir: string): Promise<DemoTls> {
  const tlsDir = join(dir, "tls");
  const cert = join(tlsDir, "cert.pem");
  const key = join(tlsDir, "key.pem");
  if (existsSync(cert) && existsSync(key)) return { cert, key, created: false };
  if (!Bun.which("openssl"))
    throw new UserError("openssl is missing (apt-get install openssl): the demo makes its TLS certificate with it");
  mkdirSync(tlsDir, { recursive: true, mode: 0o755 });
  const [tmpCert, tmpKey] = [`${cert}.tmp`, `${key}.tmp`];
  try {
    await run([
      "openssl",
      "req",
      "-x509",
      "-newkey",
      "rsa:2048",
      "-nodes",
      "-days",
      "3650",
      "-sha256",
      "-subj",
      "/CN=qvd demo",
      "-addext",
      "subjectAltName=IP:127.0.0.1,DNS:localhost",
      "-keyout",
      tmpKey,
      "-out",
      tmpCert,
    ]);
    chmodSync(tmpKey, 0o600);
    // The key last: a certificate without its key is made anew at the next run.
    renameSync(tmpCert, cert);
    renameSync(tmpKey, key);
  } finally {
    rmSync(tmpCert, { force: true });
    rmSync(tmpKey, { force: true });
  }
  return { cert, key, created: true };
}

/** The demo's farm CA and its node's certificate (src/farm/certs.ts), made on the first run. */
export async function demoFarmCertificate(
  dir: string,
  name: string,
  address: string,
): Promise<{ ca: string; cert: string; key: string; created: boolean }> {
  const farm = join(dir, "farm");
  const ca = join(farm, "ca.crt");
  const nodeDir = join(farm, `node-${name}`);
  const [cert, key] = [join(nodeDir, "node.crt"), join(nodeDir, "node.key")];
  if (existsSync(ca) && existsSync(cert) && existsSync(key)) return { ca, cert, key, created: false };
  if (!existsSync(ca) || !existsSync(join(farm, "ca.key"))) {
    rmSync(farm, { recursive: true, force: true });
    await createFarmCa(farm, { name: "QVD demo farm CA" });
  }
  await issueNodeCert({ caDir: farm, name, address, outDir: nodeDir, force: true });
  return { ca, cert, key, created: true };
}
