// What strangers may hold of the L7R (l7r.limit.*): connections in all and per client address,
// and requests in progress per address. The address is the socket's, or the one a trusted
// relay's PROXY header gave.
import { logger } from "../log.ts";
import type { IoSocket } from "../nx/splice.ts";
import type { L7rBounds } from "./options.ts";

const log = logger("l7r");

export class Admission {
  private readonly perAddress = new Map<string, { connections: number; requests: number }>();
  private connections = 0;
  private refusedLogged = 0;

  constructor(private readonly bounds: L7rBounds) {}

  /** Closes a connection that may not be served. */
  refuse(s: IoSocket, address: string, why: string) {
    // One line a second at most: a flood must not become a flood of log lines.
    if (Date.now() - this.refusedLogged > 1000) {
      this.refusedLogged = Date.now();
      log.warn("connection refused", { address, reason: why });
    }
    s.data = {};
    s.terminate?.();
    s.end();
  }

  /** Counts a connection whose address is not known yet (a PROXY header is awaited); false when full. */
  reserve(): boolean {
    if (this.connections >= this.bounds.connections) return false;
    this.connections++;
    return true;
  }

  unreserve() {
    this.connections--;
  }

  /** Counts a client connection in; false (and the socket closed) when a limit is reached. */
  admit(s: IoSocket, address: string): boolean {
    const a = this.perAddress.get(address) ?? { connections: 0, requests: 0 };
    if (this.connections >= this.bounds.connections) return (this.refuse(s, address, "too many connections"), false);
    if (a.connections >= this.bounds.connectionsPerAddress)
      return (this.refuse(s, address, "too many connections from this address"), false);
    a.connections++;
    this.connections++;
    this.perAddress.set(address, a);
    return true;
  }

  leave(address: string) {
    this.connections--;
    const a = this.perAddress.get(address);
    if (a && --a.connections <= 0 && a.requests <= 0) this.perAddress.delete(address);
  }

  /**
   * Counts a request in: the function that counts it out, or undefined when the address has as
   * many in progress as it may.
   */
  beginRequest(address: string): (() => void) | undefined {
    const a = this.perAddress.get(address);
    if (!a) return () => {}; // a connection being closed: nothing to count against
    if (a.requests >= this.bounds.requestsPerAddress) return undefined;
    a.requests++;
    return () => {
      a.requests--;
      if (a.connections <= 0 && a.requests <= 0 && this.perAddress.get(address) === a) this.perAddress.delete(address);
    };
  }

  load() {
    return {
      connections: this.connections,
      byAddress: Object.fromEntries([...this.perAddress].map(([k, v]) => [k, { ...v }])),
    };
  }
}
