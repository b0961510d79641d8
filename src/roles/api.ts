// `qvd api`: the REST admin API (and, later, the WAT at /wat), over HTTPS.
import { defineCommand } from "citty";
import { commonArgs, configFromArgs, layerDatabaseConfig, maskUrl } from "../cli.ts";
import { createApi } from "../api/server.ts";
import { roleRegistry, serveRoleMetrics } from "../metrics.ts";
import { connect } from "../db/pool.ts";
import { deleteExpiredSessions } from "../db/sessions.ts";
import { UserError } from "../errors.ts";
import { logger } from "../log.ts";

const log = logger("api");

export default defineCommand({
  meta: { name: "api", description: "Run the admin API (HTTPS; the web tool is served at /wat)" },
  args: {
    ...commonArgs,
    listen: { type: "string", description: "ADDRESS:PORT to listen on (api.listen)", valueHint: "ADDR:PORT" },
    cert: { type: "string", description: "PEM certificate file (api.tls.cert)", valueHint: "FILE" },
    key: { type: "string", description: "PEM private key file (api.tls.key)", valueHint: "FILE" },
    "insecure-http": {
      type: "boolean",
      description: "Serve plain HTTP (local testing only: passwords and tokens travel in clear)",
    },
  },
  async run({ args, rawArgs }) {
    let cfg = configFromArgs(args, rawArgs, [
      { flag: "--listen", key: "api.listen", value: args.listen },
      { flag: "--cert", key: "api.tls.cert", value: args.cert },
      { flag: "--key", key: "api.tls.key", value: args.key },
    ]);
    const url = cfg.databaseUrl();
    const sql = connect(url, {
      max: cfg.get("database.pool_size"),
      connectTimeout: cfg.get("database.connect_timeout"),
      applicationName: "qvd-api",
    });
    try {
      cfg = await layerDatabaseConfig(sql, url, cfg, (m) => log.warn(m));
    } catch (err) {
      await sql.end({ timeout: 1 });
      if (err instanceof UserError) throw err;
      throw new UserError(`cannot use the database ${maskUrl(url)}: ${(err as Error).message}`);
    }
    const [host, portText] = splitListen(cfg.get("api.listen"));
    const insecure = Boolean(args["insecure-http"]);
    const cert = cfg.get("api.tls.cert");
    const key = cfg.get("api.tls.key");
    if (!insecure && (!cert || !key))
      throw new UserError(
        "the API serves HTTPS: set api.tls.cert and api.tls.key (or --cert/--key); --insecure-http is for local tests only",
      );
    const metrics = roleRegistry();
    const { fetch, hub, idleTimeout } = createApi({ sql, cfg, databaseUrl: url, metrics });
    const server = Bun.serve({
      hostname: host || "0.0.0.0",
      port: Number(portText),
      fetch,
      maxRequestBodySize: 64 * 1024 * 1024 * 1024,
      idleTimeout, // api.timeout.idle; event streams send keep-alives more often
      ...(insecure ? {} : { tls: { cert: Bun.file(cert), key: Bun.file(key) } }),
    });
    console.log(`qvd api listening on ${insecure ? "http" : "https"}://${host || "0.0.0.0"}:${server.port}/api/v1`);
    if (insecure) log.warn("serving plain HTTP: use only for local testing");
    let metricsServer;
    try {
      metricsServer = serveRoleMetrics(cfg, "api.metrics.listen", metrics);
    } catch (err) {
      await server.stop(true);
      throw err;
    }
    const sweeper = setInterval(() => deleteExpiredSessions(sql).catch(() => {}), 300_000);
    await new Promise<void>((resolve) => {
      process.once("SIGINT", () => resolve());
      process.once("SIGTERM", () => resolve());
    });
    clearInterval(sweeper);
    metricsServer?.stop();
    await server.stop(true);
    await hub.close();
    await sql.end({ timeout: 5 });
  },
});

function splitListen(s: string): [string, string] {
  const i = s.lastIndexOf(":");
  return [s.slice(0, i).replace(/^\[|\]$/g, ""), s.slice(i + 1)];
}
