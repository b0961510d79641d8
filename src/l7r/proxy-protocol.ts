// PROXY protocol version 2 (the binary header haproxy's `send-proxy-v2` and the demo's relay put
// before the TLS bytes): a relay tells the L7R the address of the client it relays. Parsed
// strictly: the 12-byte signature, version 2, a PROXY or LOCAL command, a known family with a
// stream transport, an address block that fits the declared length, and a bounded length.
// Only sources listed in l7r.proxy_protocol.trusted may send one (see trustedSource).

/** The v2 signature: "\r\n\r\n\0\r\nQUIT\n". */
export const SIGNATURE = Uint8Array.from([0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a]);
/** Longest header accepted: the fixed part, a unix address block (the largest) and some TLVs. */
export const MAX_HEADER = 16 + 216 + 256;

export class ProxyHeaderError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ProxyHeaderError";
  }
}

/** A complete header: the client's address ("" when the relay speaks for itself: LOCAL or UNSPEC), and its length. */
export interface ProxyHeader {
  address: string;
  port: number;
  length: number;
}

/** Whether `b` (so far) is the start of a v2 signature: a v2 header from an untrusted source is refused. */
export function looksLikeProxyHeader(b: Uint8Array): boolean {
  const n = Math.min(b.length, SIGNATURE.length);
  for (let i = 0; i < n; i++) if (b[i] !== SIGNATURE[i]) return false;
  return n > 0;
}

/**
 * Parses the header at the start of `b`: undefined while incomplete; throws ProxyHeaderError when
 * it cannot be a valid v2 header (the connection is then closed).
 */
export function parseProxyHeader(b: Uint8Array): ProxyHeader | undefined {
  const n = Math.min(b.length, SIGNATURE.length);
  for (let i = 0; i < n; i++) if (b[i] !== SIGNATURE[i]) throw new ProxyHeaderError("not a PROXY protocol v2 header");
  if (b.length < 16) return undefined;
  const verCmd = b[12]!;
  if (verCmd >> 4 !== 2) throw new ProxyHeaderError(`PROXY protocol version ${verCmd >> 4} is not supported`);
  const command = verCmd & 0x0f;
  if (command > 1) throw new ProxyHeaderError(`unknown PROXY command ${command}`);
  const family = b[13]! >> 4;
  const transport = b[13]! & 0x0f;
  const len = (b[14]! << 8) | b[15]!;
  const length = 16 + len;
  if (length > MAX_HEADER) throw new ProxyHeaderError("PROXY header too long");
  if (family > 3) throw new ProxyHeaderError(`unknown PROXY address family ${family}`);
  if (transport > 2 || (family !== 0 && transport !== 1))
    throw new ProxyHeaderError("PROXY header for a transport other than a stream");
  const need = [0, 12, 36, 216][family]!;
  if (len < need) throw new ProxyHeaderError("PROXY address block shorter than its family needs");
  if (b.length < length) return undefined;
  // LOCAL (a health check of the relay itself) and UNSPEC keep the connection's own address.
  if (command === 0 || family === 0 || family === 3) return { address: "", port: 0, length };
  const a = b.subarray(16);
  if (family === 1) return { address: `${a[0]}.${a[1]}.${a[2]}.${a[3]}`, port: (a[8]! << 8) | a[9]!, length };
  return { address: formatIpv6(a.subarray(0, 16)), port: (a[32]! << 8) | a[33]!, length };
}

/** A v2 PROXY header for a TCP client (IPv4 or IPv6) to a destination; LOCAL when the source is not an IP address. */
export function proxyHeader(
  src: { address: string; port: number },
  dst: { address: string; port: number },
): Uint8Array {
  const s = parseIp(src.address);
  const d = parseIp(dst.address);
  const fam = s && d && s.length === d.length ? (s.length === 4 ? 1 : 2) : 0;
  const block = fam === 0 ? 0 : fam === 1 ? 12 : 36;
  const out = new Uint8Array(16 + block);
  out.set(SIGNATURE, 0);
  out[12] = fam === 0 ? 0x20 : 0x21;
  out[13] = fam === 0 ? 0 : (fam << 4) | 1;
  out[14] = block >> 8;
  out[15] = block & 0xff;
  if (fam !== 0) {
    const n = s!.length;
    out.set(s!, 16);
    out.set(d!, 16 + n);
    out[16 + 2 * n] = src.port >> 8;
    out[17 + 2 * n] = src.port & 0xff;
    out[18 + 2 * n] = dst.port >> 8;
    out[19 + 2 * n] = dst.port & 0xff;
  }
  return out;
}

/** An address as 4 or 16 bytes (IPv4-mapped IPv6 as IPv4), or undefined. */
export function parseIp(addr: string): Uint8Array | undefined {
  const v4 = /^(?:::ffff:)?(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/i.exec(addr);
  if (v4) {
    const parts = v4.slice(1).map(Number);
    return parts.every((p) => p <= 255) ? Uint8Array.from(parts) : undefined;
  }
  if (!/^[0-9a-f:]+$/i.test(addr) || addr.length > 39) return undefined;
  const halves = addr.split("::");
  if (halves.length > 2) return undefined;
  const groups = (h: string) => (h === "" ? [] : h.split(":"));
  const head = groups(halves[0]!);
  const tail = halves.length === 2 ? groups(halves[1]!) : [];
  const fill = 8 - head.length - tail.length;
  if ((halves.length === 1 && fill !== 0) || (halves.length === 2 && fill < 1)) return undefined;
  const all = [...head, ...Array(halves.length === 2 ? fill : 0).fill("0"), ...tail];
  const out = new Uint8Array(16);
  for (let i = 0; i < 8; i++) {
    if (!/^[0-9a-f]{1,4}$/i.test(all[i]!)) return undefined;
    const v = parseInt(all[i]!, 16);
    out[2 * i] = v >> 8;
    out[2 * i + 1] = v & 0xff;
  }
  return out;
}

/** 16 bytes as the usual text form (longest zero run as ::; IPv4-mapped as dotted IPv4). */
function formatIpv6(a: Uint8Array): string {
  if (a.subarray(0, 10).every((x) => x === 0) && a[10] === 0xff && a[11] === 0xff)
    return `${a[12]}.${a[13]}.${a[14]}.${a[15]}`;
  const g = Array.from({ length: 8 }, (_, i) => (a[2 * i]! << 8) | a[2 * i + 1]!);
  let best = -1;
  let bestLen = 1;
  for (let i = 0; i < 8; ) {
    let j = i;
    while (j < 8 && g[j] === 0) j++;
    if (j - i > bestLen) [best, bestLen] = [i, j - i];
    i = j > i ? j : i + 1;
  }
  const hex = (xs: number[]) => xs.map((x) => x.toString(16)).join(":");
  return best < 0 ? hex(g) : `${hex(g.slice(0, best))}::${hex(g.slice(best + bestLen))}`;
}

/**
 * Trusted sources from l7r.proxy_protocol.trusted: `unix` (the unix socket) and IPv4/IPv6
 * networks in CIDR form. Throws on anything else.
 */
export function trustedSources(spec: string): { unix: boolean; networks: { net: Uint8Array; bits: number }[] } {
  const out = { unix: false, networks: [] as { net: Uint8Array; bits: number }[] };
  for (const item of spec
    .split(",")
    .map((s) => s.trim())
    .filter(Boolean)) {
    if (item === "unix") {
      out.unix = true;
      continue;
    }
    const m = /^([^/]+)\/(\d{1,3})$/.exec(item);
    const net = m && parseIp(m[1]!);
    const bits = m ? Number(m[2]) : -1;
    if (!net || bits > net.length * 8)
      throw new Error(`l7r.proxy_protocol.trusted: "${item}" is neither unix nor a network such as 10.0.0.0/8`);
    out.networks.push({ net, bits });
  }
  return out;
}

/** Whether an address lies in one of the networks. */
export function inNetworks(address: string, networks: { net: Uint8Array; bits: number }[]): boolean {
  const a = parseIp(address);
  if (!a) return false;
  return networks.some(({ net, bits }) => {
    if (net.length !== a.length) return false;
    for (let i = 0; i < bits; i++) {
      const mask = 0x80 >> (i % 8);
      if ((a[i >> 3]! & mask) !== (net[i >> 3]! & mask)) return false;
    }
    return true;
  });
}
