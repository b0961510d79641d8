// Certificates for tests, made with openssl: a self-signed one (an L7R's or a server's, which
// clients take with --insecure or -k; also a CA of a test's own), and one signed by such a CA.
//   const { cert, key } = await selfSignedCert(dir);   // dir/cert.pem, dir/key.pem, CN=localhost
//   const l7r = await selfSignedCert(node.root, { names: ["l7r.crt", "l7r.key"] });
//   const ca = await selfSignedCert(dir, { cn: "test CA", names: ["ca.pem", "ca.key"] });
//   const alice = await signedCert(dir, ca, { cn: "alice", names: ["alice.pem", "alice.key"] });
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { run } from "../../src/run.ts";

/** A certificate and its key (PEM files). */
export interface CertFiles {
  cert: string;
  key: string;
}

export interface CertOptions {
  /** The subject's common name (default localhost). */
  cn?: string;
  /** Days of validity (default 2). */
  days?: number;
  /** subjectAltName, e.g. "IP:127.0.0.1,DNS:localhost" (default none). */
  san?: string;
  /** Further extensions (`-addext` values), e.g. a CA's basicConstraints. */
  ext?: string[];
  /** The files' names in the folder: [certificate, key] (default cert.pem, key.pem). */
  names?: [string, string];
  /** An EC key on prime256v1 instead of RSA 2048. */
  ec?: boolean;
}

const keyArgs = (o: CertOptions) =>
  o.ec ? ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"] : ["-newkey", "rsa:2048"];

/** The -addext values, or an -extfile's lines. */
const extensions = (o: CertOptions) => [...(o.san ? [`subjectAltName=${o.san}`] : []), ...(o.ext ?? [])];

const files = (dir: string, o: CertOptions): CertFiles => {
  const [cert, key] = o.names ?? ["cert.pem", "key.pem"];
  return { cert: join(dir, cert), key: join(dir, key) };
};

/** A new key and a self-signed certificate for it in `dir`. */
export async function selfSignedCert(dir: string, o: CertOptions = {}): Promise<CertFiles> {
  const f = files(dir, o);
  await run([
    "openssl",
    "req",
    "-x509",
    ...keyArgs(o),
    "-nodes",
    "-days",
    String(o.days ?? 2),
    "-subj",
    `/CN=${o.cn ?? "localhost"}`,
    ...extensions(o).flatMap((e) => ["-addext", e]),
    "-keyout",
    f.key,
    "-out",
    f.cert,
  ]);
  return f;
}

/** A new key in `dir` and a certificate for it signed by the CA `ca` (its serial file is made next to it). */
export async function signedCert(dir: string, ca: CertFiles, o: CertOptions = {}): Promise<CertFiles> {
  const f = files(dir, o);
  const csr = `${f.key}.csr`;
  await run([
    "openssl",
    "req",
    "-new",
    ...keyArgs(o),
    "-nodes",
    "-subj",
    `/CN=${o.cn ?? "localhost"}`,
    "-keyout",
    f.key,
    "-out",
    csr,
  ]);
  // `openssl x509 -req` takes its extensions from a file (-extfile).
  const ext = extensions(o);
  const extFile = `${f.key}.ext`;
  if (ext.length) writeFileSync(extFile, `${ext.join("\n")}\n`);
  await run([
    "openssl",
    "x509",
    "-req",
    "-in",
    csr,
    "-CA",
    ca.cert,
    "-CAkey",
    ca.key,
    "-CAcreateserial",
    "-days",
    String(o.days ?? 2),
    ...(ext.length ? ["-extfile", extFile] : []),
    "-out",
    f.cert,
  ]);
  return f;
}
