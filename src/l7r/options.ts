// What the L7R is started with (src/roles/l7r.ts maps the l7r.* configuration keys onto it).
import type { Authenticate } from "../auth/chain.ts";
import type { ThrottlePolicy } from "../auth/throttle.ts";
import type { Config } from "../config.ts";
import type { Sql } from "../db/pool.ts";
import type { Registry } from "../metrics.ts";
import type { ReaderLimits } from "../nx/http.ts";
import type { PeerClient } from "./peer.ts";
import type { trustedSources } from "./proxy-protocol.ts";

export interface L7rTimeouts {
  /** Seconds a client has to send a complete request once it started one. */
  request: number;
  /** Seconds an idle connection (between requests) is kept. */
  idle: number;
  /** Seconds for the TLS handshake (and a PROXY header before it) from the connection's accept. */
  handshake: number;
  /** Seconds from the handshake to the first complete request. */
  firstRequest: number;
  vmStart: number;
  vmStop: number;
  takeover: number;
  /** Seconds for nxagent to listen after x_start (unbounded while provisioning). */
  xStart: number;
  /** x_start attempts. */
  xStartAttempts: number;
  /** Seconds the client has, after the 101, to send its NX greeting. */
  nxHandshake: number;
  /** Seconds of each VMA call. */
  vma: number;
}

export const DEFAULT_TIMEOUTS: L7rTimeouts = {
  request: 30,
  idle: 300,
  handshake: 10,
  firstRequest: 30,
  vmStart: 270,
  vmStop: 270,
  takeover: 30,
  xStart: 10,
  xStartAttempts: 21,
  nxHandshake: 30,
  vma: 4,
};

/** Bounds on what clients may hold (l7r.limit.*). */
export interface L7rBounds {
  connections: number;
  connectionsPerAddress: number;
  requestsPerAddress: number;
  /** Unhandled input bytes per connection. */
  inputBytes: number;
  /** Unsent output bytes per connection. */
  outputBytes: number;
}

export const DEFAULT_BOUNDS: L7rBounds = {
  connections: 4096,
  connectionsPerAddress: 128,
  requestsPerAddress: 32,
  inputBytes: 65536,
  outputBytes: 262144,
};

export interface L7rOptions {
  sql: Sql;
  databaseUrl: string;
  /** This node's name (hosts.name). */
  nodename: string;
  hostname: string;
  port: number;
  /** clientCa: clients must present a certificate signed by this CA (PEM file). */
  tls: { cert: string; key: string; clientCa?: string };
  /** A unix socket to listen on as well (TLS too), e.g. for a relay from another network namespace. */
  unix?: string;
  /** The login check (default: the tenant's plugin chain, src/auth/chain.ts). */
  authenticate?: Authenticate;
  timeouts?: Partial<L7rTimeouts>;
  limits?: Partial<ReaderLimits>;
  /** What one client may hold (connections, requests in progress, unread input, unsent output). */
  bounds?: Partial<L7rBounds>;
  /** PROXY protocol v2 from these sources (l7r.proxy_protocol.trusted); none when undefined. */
  proxyProtocol?: ReturnType<typeof trustedSources>;
  /** Seconds of heartbeat freshness a node needs to be given a VM (cluster.alive_within). */
  aliveWithinS?: number;
  /** The node's configuration, which the database's global and tenant rows are layered over (auth, identity). */
  identityConfig?: Config;
  /** Failed-login throttling (src/auth/throttle.ts: auth.throttle.*). */
  throttle?: Partial<ThrottlePolicy>;
  /** The farm's node-to-node TLS, to reach desktops on other nodes (src/l7r/peer.ts); without it only this node's. */
  peer?: PeerClient;
  /** Where the L7R's metrics go (the role serves it on l7r.metrics.listen). */
  metrics?: Registry;
  /** The desktop in a web browser (l7r.web.*; src/web/desktop/README.md); off when undefined. */
  web?: WebOptions;
}

export interface WebOptions {
  /** Browser sessions' private directories go below it (<path.run>/web). */
  runDir: string;
  uidBase: number;
  maxSessions: number;
  xvnc: string;
  nxproxy: string;
}
