// `qvd l7r` (and the L7R half of `qvd node`): the users' TLS broker.
import { join } from "node:path";
import { roleRegistry, serveRoleMetrics } from "../metrics.ts";
import { defineCommand } from "citty";
import { commonArgs, configFromArgs, layerDatabaseConfig } from "../cli.ts";
import type { Config } from "../config.ts";
import { authenticateUser } from "../auth/chain.ts";
import { throttlePolicy } from "../auth/throttle.ts";
import { aliveWithinS } from "../db/placement.ts";
import { connect, type Sql } from "../db/pool.ts";
import { UserError } from "../errors.ts";
import { startL7r, type L7r } from "../l7r/server.ts";
import { peerNodeByName } from "../db/peer.ts";
import { nodeTls } from "../farm/certs.ts";
import { PeerClient, startPeerServer, type PeerServer } from "../l7r/peer.ts";
import { trustedSources } from "../l7r/proxy-protocol.ts";
import type { Authenticate } from "../auth/chain.ts";
import { logger } from "../log.ts";
import { runUntilSignal } from "./hkd.ts";

const log = logger("l7r");

export const l7rArgs = {
  ...commonArgs,
  listen: { type: "string", description: "ADDRESS:PORT to listen on (l7r.listen)", valueHint: "ADDR:PORT" },
  cert: { type: "string", description: "PEM certificate file (l7r.tls.cert)", valueHint: "FILE" },
  key: { type: "string", description: "PEM private key file (l7r.tls.key)", valueHint: "FILE" },
} as const;

export function l7rConfig(args: Record<string, any>, rawArgs: string[]): Config {
  return configFromArgs(args as any, rawArgs, [
    { flag: "--listen", key: "l7r.listen", value: args.listen },
    { flag: "--cert", key: "l7r.tls.cert", value: args.cert },
    { flag: "--key", key: "l7r.tls.key", value: args.key },
  ]);
}

/** The sources that must send a PROXY v2 header, when l7r.proxy_protocol is v2. */
function proxyProtocol(cfg: Config): ReturnType<typeof trustedSources> | undefined {
  if (cfg.get("l7r.proxy_protocol") !== "v2") return undefined;
  try {
    return trustedSources(cfg.get("l7r.proxy_protocol.trusted"));
  } catch (err) {
    throw new UserError((err as Error).message);
  }
}

/** Starts the L7R over its own pool; resolves with a function that stops it. */
export async function startL7rRole(
  cfg: Config,
  opts: { authenticate?: Authenticate } = {},
): Promise<{ l7r: L7r; sql: Sql; stop: () => Promise<void> }> {
  // A node of the farm proves who it is to the others: no farm certificate, no L7R.
  const farm = nodeTls(cfg);
  const url = cfg.databaseUrl();
  const sql = connect(url, {
    max: cfg.get("database.pool_size"),
    connectTimeout: cfg.get("database.connect_timeout"),
    applicationName: "qvd-l7r",
  });
  let peerServer: PeerServer | undefined;
  let peer: PeerClient | undefined;
  try {
    cfg = await layerDatabaseConfig(sql, url, cfg, (m) => log.warn(m));
    const cert = cfg.get("l7r.tls.cert");
    const key = cfg.get("l7r.tls.key");
    if (!cert || !key) throw new UserError("the L7R serves TLS: set l7r.tls.cert and l7r.tls.key (or --cert/--key)");
    const listen = cfg.get("l7r.listen");
    const colon = listen.lastIndexOf(":");
    const hostname = listen.slice(0, colon).replace(/^\[|\]$/g, "") || "0.0.0.0";
    const port = Number(listen.slice(colon + 1));
    // The node-to-node endpoint (src/l7r/peer.ts), where the other nodes reach this node's address.
    const tls = { ca: farm.ca, cert: farm.cert, key: farm.key };
    const peerPort = cfg.get("cluster.peer.port");
    const peerHost = cfg.get("cluster.peer.listen") || (await peerNodeByName(sql, cfg.get("nodename")))?.address;
    if (!peerHost)
      throw new UserError(
        `node ${cfg.get("nodename")} is not registered (hosts): register it (qvd hkd --register) or set cluster.peer.listen`,
      );
    try {
      peerServer = startPeerServer({
        sql,
        nodename: cfg.get("nodename"),
        hostname: peerHost.replace(/^\[|\]$/g, ""),
        port: peerPort,
        tls,
        maxConnections: cfg.get("cluster.peer.limit.connections"),
        timeouts: {
          handshake: cfg.get("l7r.timeout.handshake"),
          request: cfg.get("l7r.timeout.request"),
          idle: cfg.get("l7r.timeout.idle"),
        },
      });
    } catch (err) {
      throw new UserError(
        `cannot listen on ${peerHost}:${peerPort} for the other nodes (cluster.peer.listen, cluster.peer.port): ${(err as Error).message}`,
      );
    }
    peer = new PeerClient({ tls, port: peerPort });
    const metrics = roleRegistry();
    const l7r = await startL7r({
      metrics,
      peer,
      sql,
      databaseUrl: url,
      identityConfig: cfg,
      nodename: cfg.get("nodename"),
      hostname,
      port,
      tls: { cert, key, clientCa: cfg.get("l7r.tls.client_ca") || undefined },
      unix: cfg.get("l7r.listen.unix") || undefined,
      // The tenant's plugin chain (src/auth/chain.ts: l7r.auth.plugins, local by default).
      authenticate: opts.authenticate ?? ((db, attempt) => authenticateUser(db, cfg, attempt)),
      aliveWithinS: aliveWithinS(cfg),
      throttle: throttlePolicy(cfg),
      timeouts: {
        vmStart: cfg.get("l7r.timeout.vm_start"),
        vmStop: cfg.get("l7r.timeout.vm_stop"),
        xStart: cfg.get("l7r.timeout.x_start"),
        nxHandshake: cfg.get("l7r.timeout.nx_handshake"),
        takeover: cfg.get("l7r.timeout.takeover"),
        request: cfg.get("l7r.timeout.request"),
        idle: cfg.get("l7r.timeout.idle"),
        handshake: cfg.get("l7r.timeout.handshake"),
        firstRequest: cfg.get("l7r.timeout.first_request"),
      },
      bounds: {
        connections: cfg.get("l7r.limit.connections"),
        connectionsPerAddress: cfg.get("l7r.limit.connections_per_address"),
        requestsPerAddress: cfg.get("l7r.limit.requests_per_address"),
        inputBytes: cfg.get("l7r.limit.input_bytes"),
        outputBytes: cfg.get("l7r.limit.output_bytes"),
      },
      proxyProtocol: proxyProtocol(cfg),
      web: cfg.get("l7r.web")
        ? {
            runDir: join(cfg.get("path.run"), "web"),
            uidBase: cfg.get("l7r.web.uid_base"),
            maxSessions: cfg.get("l7r.web.max_sessions"),
            xvnc: cfg.get("l7r.web.xvnc"),
            nxproxy: cfg.get("l7r.web.nxproxy"),
          }
        : undefined,
    });
    console.log(`qvd l7r listening on ${hostname}:${l7r.port}`);
    const metricsServer = (() => {
      try {
        return serveRoleMetrics(cfg, "l7r.metrics.listen", metrics);
      } catch (err) {
        void l7r.stop();
        throw err;
      }
    })();
    return {
      l7r,
      sql,
      stop: async () => {
        metricsServer?.stop();
        peerServer?.stop();
        peer?.close();
        await l7r.stop();
        await sql.end({ timeout: 5 });
      },
    };
  } catch (err) {
    peerServer?.stop();
    peer?.close();
    await sql.end({ timeout: 1 });
    throw err;
  }
}

export default defineCommand({
  meta: { name: "l7r", description: "Run the user broker (L7R): the QVD client protocol over TLS" },
  args: l7rArgs,
  async run({ args, rawArgs }) {
    const cfg = l7rConfig(args, rawArgs);
    const { stop } = await startL7rRole(cfg);
    await runUntilSignal(stop);
  },
});
