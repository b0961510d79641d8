// The farm's certificates: one CA (ECDSA P-256, kept by the administrator) that signs only
// node certificates; each node's certificate names the node (CN = hosts.name, SANs the name
// and its address) and serves both ends of the node-to-node TLS (src/l7r/peer.ts). Made with
// openssl; checked with node:crypto when a node starts.
import { createPrivateKey, randomBytes, X509Certificate } from "node:crypto";
import {
  chmodSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  renameSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { isIP } from "node:net";
import { join } from "node:path";
import type { Config } from "../config.ts";
import { UserError } from "../errors.ts";
import { run } from "../run.ts";

/** Days a farm CA is valid (ten years: it is replaced with the farm, not routinely). */
export const CA_DAYS = 3650;
/** Days a node certificate is valid by default (two years; `qvd farm cert --days`). */
export const NODE_DAYS = 730;

/** A node name as certificates and hosts.name carry it: a DNS-like label sequence. */
const NODE_NAME = /^[A-Za-z0-9]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9_-]{0,62}))*$/;

async function openssl(args: string[]): Promise<void> {
  if (!Bun.which("openssl"))
    throw new UserError("openssl is missing (apt-get install openssl): farm certificates are made with it");
  await run(["openssl", ...args]);
}

/** Creates DIR/ca.crt and DIR/ca.key (0600); refuses to overwrite either. */
export async function createFarmCa(
  dir: string,
  opts: { days?: number; name?: string } = {},
): Promise<{ cert: string; key: string }> {
  const cert = join(dir, "ca.crt");
  const key = join(dir, "ca.key");
  for (const f of [cert, key])
    if (existsSync(f))
      throw new UserError(`${f} exists: a farm CA is never overwritten (remove it yourself to start a new farm)`);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const tmp = mkdtempSync(join(dir, ".ca-"));
  try {
    await openssl(["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", join(tmp, "ca.key")]);
    chmodSync(join(tmp, "ca.key"), 0o600);
    await openssl([
      "req",
      "-x509",
      "-new",
      "-sha256",
      "-key",
      join(tmp, "ca.key"),
      "-days",
      String(opts.days ?? CA_DAYS),
      "-subj",
      `/CN=${opts.name ?? "QVD farm CA"}`,
      "-set_serial",
      `0x${randomBytes(16).toString("hex")}`,
      "-addext",
      "basicConstraints=critical,CA:TRUE,pathlen:0",
      "-addext",
      "keyUsage=critical,keyCertSign,cRLSign",
      "-out",
      join(tmp, "ca.crt"),
    ]);
    // The key last: a CA certificate without its key is no CA.
    renameSync(join(tmp, "ca.crt"), cert);
    renameSync(join(tmp, "ca.key"), key);
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
  return { cert, key };
}

export interface NodeCertOptions {
  /** The folder of ca.crt and ca.key. */
  caDir: string;
  /** The node's name (hosts.name): the certificate's CN and a DNS SAN. */
  name: string;
  /** The node's address (hosts.address): an IP or DNS SAN. */
  address: string;
  /** Where node.crt and node.key go. */
  outDir: string;
  days?: number;
  /** Replace node.crt/node.key when they exist (renewal). */
  force?: boolean;
}

/** Issues OUT/node.crt and OUT/node.key (0600), signed by the farm CA. */
export async function issueNodeCert(o: NodeCertOptions): Promise<{ cert: string; key: string }> {
  if (!NODE_NAME.test(o.name))
    throw new UserError(`--name ${JSON.stringify(o.name)}: a node name is letters, digits, '-', '_' and dots`);
  const ip = isIP(o.address) !== 0;
  if (!ip && !NODE_NAME.test(o.address))
    throw new UserError(`--address ${JSON.stringify(o.address)}: expected an IP address or a DNS name`);
  const caCert = join(o.caDir, "ca.crt");
  const caKey = join(o.caDir, "ca.key");
  for (const f of [caCert, caKey])
    if (!existsSync(f))
      throw new UserError(`${f} is missing: make the farm CA first with qvd farm ca --dir ${o.caDir}`);
  const cert = join(o.outDir, "node.crt");
  const key = join(o.outDir, "node.key");
  if (!o.force)
    for (const f of [cert, key]) if (existsSync(f)) throw new UserError(`${f} exists (give --force to replace it)`);
  mkdirSync(o.outDir, { recursive: true, mode: 0o755 });
  const tmp = mkdtempSync(join(o.outDir, ".node-"));
  try {
    const ext = join(tmp, "ext.cnf");
    const san = [`DNS:${o.name}`, ...(o.address !== o.name ? [`${ip ? "IP" : "DNS"}:${o.address}`] : [])].join(",");
    writeFileSync(
      ext,
      [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature",
        "extendedKeyUsage=serverAuth,clientAuth",
        `subjectAltName=${san}`,
        "",
      ].join("\n"),
    );
    await openssl(["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", join(tmp, "node.key")]);
    chmodSync(join(tmp, "node.key"), 0o600);
    await openssl([
      "req",
      "-new",
      "-sha256",
      "-key",
      join(tmp, "node.key"),
      "-subj",
      `/CN=${o.name}`,
      "-out",
      join(tmp, "node.csr"),
    ]);
    await openssl([
      "x509",
      "-req",
      "-sha256",
      "-in",
      join(tmp, "node.csr"),
      "-CA",
      caCert,
      "-CAkey",
      caKey,
      "-set_serial",
      `0x${randomBytes(16).toString("hex")}`,
      "-days",
      String(o.days ?? NODE_DAYS),
      "-extfile",
      ext,
      "-out",
      join(tmp, "node.crt"),
    ]);
    renameSync(join(tmp, "node.crt"), cert);
    renameSync(join(tmp, "node.key"), key);
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
  return { cert, key };
}

export interface FarmTls {
  ca: string;
  cert: string;
  key: string;
  /** The certificate's CN: this node's name. */
  name: string;
  /** When the certificate stops being valid. */
  validTo: Date;
}

/** The PEM certificates of a file (a CA file may hold several). */
function certificates(file: string, what: string): X509Certificate[] {
  const text = readFileSync(file, "utf8");
  const pems = text.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
  if (pems.length === 0) throw new UserError(`${what} ${file} holds no PEM certificate`);
  return pems.map((p) => new X509Certificate(p));
}

/** The CN of a subject such as "CN=node1" or "O=x\nCN=node1". */
export function commonName(subject: string): string | undefined {
  return /(?:^|\n)CN=([^\n]*)/.exec(subject)?.[1];
}

/**
 * This node's farm TLS files from cluster.tls.* — refused (one line naming the keys) when one is
 * unset or unreadable, when the certificate is not signed by the CA, not valid now, not this
 * node's (CN ≠ nodename), or not for the key.
 */
export function nodeTls(cfg: Config): FarmTls {
  const ca = cfg.get("cluster.tls.ca");
  const cert = cfg.get("cluster.tls.cert");
  const key = cfg.get("cluster.tls.key");
  const nodename = cfg.get("nodename");
  const howTo = `make them with qvd farm ca and qvd farm cert --name ${nodename} (README "Node certificates")`;
  const missing = (["cluster.tls.ca", "cluster.tls.cert", "cluster.tls.key"] as const).filter((k) => !cfg.get(k));
  if (missing.length) throw new UserError(`a node needs its farm certificate: set ${missing.join(", ")}; ${howTo}`, 78);
  return checkNodeTls({ ca, cert, key, nodename });
}

export function checkNodeTls(f: { ca: string; cert: string; key: string; nodename: string }): FarmTls {
  const bad = (file: string, why: string) => new UserError(`farm certificate ${file}: ${why}`, 78);
  let caCerts: X509Certificate[];
  let leaf: X509Certificate;
  try {
    caCerts = certificates(f.ca, "cluster.tls.ca");
    leaf = certificates(f.cert, "cluster.tls.cert")[0]!;
  } catch (err) {
    if (err instanceof UserError) throw new UserError(err.message, 78);
    const e = err as NodeJS.ErrnoException;
    throw new UserError(
      `cannot read the farm certificates (cluster.tls.ca, cluster.tls.cert): ${e.code === "ENOENT" ? `no such file ${e.path}` : e.message}`,
      78,
    );
  }
  if (!caCerts.some((c) => c.ca && leaf.checkIssued(c) && leaf.verify(c.publicKey)))
    throw bad(f.cert, `not signed by the farm CA ${f.ca}`);
  if (leaf.ca) throw bad(f.cert, "is a CA certificate, not a node's");
  const now = Date.now();
  if (new Date(leaf.validFrom).getTime() > now) throw bad(f.cert, `not valid before ${leaf.validFrom}`);
  const validTo = new Date(leaf.validTo);
  if (validTo.getTime() <= now) throw bad(f.cert, `expired on ${leaf.validTo}; issue a new one with qvd farm cert`);
  const cn = commonName(leaf.subject);
  if (cn !== f.nodename)
    throw bad(
      f.cert,
      `made for node ${JSON.stringify(cn ?? "")}, but this node is ${JSON.stringify(f.nodename)} (nodename)`,
    );
  let keyText: string;
  try {
    keyText = readFileSync(f.key, "utf8");
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    throw new UserError(
      `cannot read cluster.tls.key ${f.key}: ${e.code === "ENOENT" ? "no such file" : e.code === "EACCES" ? "permission denied" : e.message}`,
      78,
    );
  }
  let matches = false;
  try {
    matches = leaf.checkPrivateKey(createPrivateKey(keyText));
  } catch {
    throw bad(f.key, "not a PEM private key");
  }
  if (!matches) throw bad(f.key, `not the key of ${f.cert}`);
  return { ca: f.ca, cert: f.cert, key: f.key, name: cn, validTo };
}
