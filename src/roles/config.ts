// `qvd config show`: the effective configuration and where each value came from.
import { defineCommand } from "citty";
import { commonArgs, configFromArgs, maskUrl } from "../cli.ts";
import { listConfigRows } from "../db/configs.ts";
import { connect } from "../db/pool.ts";

const show = defineCommand({
  meta: { name: "show", description: "Print every key's effective value and its source (secrets masked)" },
  args: {
    ...commonArgs,
    "no-db": { type: "boolean", description: "Do not read cluster settings from the database" },
    tenant: { type: "string", description: "Also apply this tenant's overrides (tenant id)", valueHint: "ID" },
    doc: { type: "boolean", description: "Add each key's documentation" },
    json: { type: "boolean", description: "Print JSON" },
  },
  async run({ args, rawArgs }) {
    let cfg = configFromArgs(args, rawArgs);
    const notes: string[] = [];
    // citty turns --no-db into db=false; accept both spellings.
    const skipDb = args["no-db"] || (args as Record<string, unknown>).db === false;
    if (!skipDb) {
      const url = cfg.databaseUrl();
      const sql = connect(url, { max: 1, connectTimeout: Math.min(5, cfg.get("database.connect_timeout")) });
      let rows: Awaited<ReturnType<typeof listConfigRows>> | undefined;
      try {
        const tenant = args.tenant === undefined ? undefined : Number(args.tenant);
        rows = await listConfigRows(sql, tenant);
      } catch (err) {
        notes.push(`cluster settings not read: cannot use the database ${maskUrl(url)}: ${(err as Error).message}`);
      } finally {
        await sql.end({ timeout: 2 });
      }
      // Outside the try: a bad value of a cluster key in the database is a configuration
      // error (exit 78), not an unreachable database.
      if (rows)
        cfg = cfg.withDatabase(
          rows.map((r) => ({ tenantId: r.tenant_id, key: r.key, value: r.value })),
          (m) => notes.push(m),
        );
    }
    const entries = cfg.describe();
    if (args.json) {
      console.log(JSON.stringify({ settings: entries, notes }, null, 2));
      return;
    }
    const kw = Math.max(...entries.map((e) => e.key.length));
    const vw = Math.min(40, Math.max(...entries.map((e) => e.value.length)));
    for (const e of entries) {
      if (args.doc) console.log(`# ${e.doc} (${e.scope}${e.tenant ? ", a tenant may override it" : ""})`);
      console.log(`${e.key.padEnd(kw)} = ${e.value.padEnd(vw)}  # ${e.source}`);
    }
    for (const n of notes) console.error(`note: ${n}`);
  },
});

export default defineCommand({
  meta: { name: "config", description: "Inspect the configuration" },
  subCommands: { show },
});
