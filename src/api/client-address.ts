// The client's address of an API request: the socket's, or behind trusted reverse proxies
// (api.trusted_proxies) the rightmost X-Forwarded-For hop that is not one of them. Hops left
// of it were written by the client and prove nothing; a peer that is not trusted cannot name
// another address at all. The audit log and login throttling use this address.
import { BlockList, isIP } from "node:net";

const plain = (a: string) =>
  a
    .trim()
    .replace(/^\[(.*)\]$/, "$1")
    .replace(/^::ffff:(?=\d+\.\d+\.\d+\.\d+$)/i, "");
const family = (a: string) => (isIP(a) === 6 ? "ipv6" : "ipv4");

/** A matcher for a comma-separated list of addresses and networks (as api.trusted_proxies). */
export function trustedProxies(list: string): (address: string) => boolean {
  const entries = list
    .split(",")
    .map((x) => x.trim())
    .filter(Boolean);
  if (!entries.length) return () => false;
  const bl = new BlockList();
  for (const e of entries) {
    const [addr, bits] = e.split("/") as [string, string | undefined];
    const a = plain(addr);
    if (!isIP(a)) continue;
    if (bits === undefined) bl.addAddress(a, family(a));
    else bl.addSubnet(a, Number(bits), family(a));
  }
  return (address) => {
    const a = plain(address);
    return isIP(a) !== 0 && bl.check(a, family(a));
  };
}

/** The client's address, given the socket's peer and the request's X-Forwarded-For header. */
export function clientAddress(
  peer: string | undefined,
  forwardedFor: string | null,
  trusted: (a: string) => boolean,
): string | undefined {
  if (peer === undefined) return undefined;
  let client = plain(peer);
  if (!forwardedFor || !trusted(client)) return client;
  // Several headers arrive joined by ", "; walk from the hop our proxy added, leftwards.
  const hops = forwardedFor.split(",").map(plain).slice(-64);
  for (let i = hops.length - 1; i >= 0; i--) {
    const hop = hops[i]!;
    if (!isIP(hop)) break; // garbage a proxy passed along: keep the last hop we could trust
    client = hop;
    if (!trusted(hop)) break;
  }
  return client;
}
