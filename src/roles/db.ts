// `qvd db init | status | migrate`: schema management.
import { readFileSync } from "node:fs";
import { defineCommand } from "citty";
import { commonArgs, configFromArgs, withDatabase } from "../cli.ts";
import { initDatabase, migrateDatabase, schemaStatus } from "../db/schema.ts";
import { UserError } from "../errors.ts";

const init = defineCommand({
  meta: { name: "init", description: "Create the schema, the default tenant and a superadmin in an empty database" },
  args: {
    ...commonArgs,
    "admin-name": { type: "string", description: "Name of the superadmin", default: "superadmin" },
    "admin-password": {
      type: "string",
      description: "Superadmin password (visible to other local users; prefer --admin-password-file)",
    },
    "admin-password-file": {
      type: "string",
      description: "File whose first line is the superadmin password",
      valueHint: "FILE",
    },
  },
  async run({ args, rawArgs }) {
    const cfg = configFromArgs(args, rawArgs);
    let password = args["admin-password"];
    if (args["admin-password-file"]) {
      try {
        password = readFileSync(args["admin-password-file"], "utf8").split("\n")[0]!.trim();
      } catch (err) {
        throw new UserError(`${args["admin-password-file"]}: cannot read password file: ${(err as Error).message}`);
      }
    }
    const res = await withDatabase(cfg, (sql) =>
      initDatabase(sql, { adminName: args["admin-name"], adminPassword: password }),
    );
    console.log(`Database initialised at schema version ${res.version}.`);
    console.log(`Superadmin: ${res.adminName} (tenant *)`);
    if (res.generated) {
      console.log(`Password:   ${res.adminPassword}`);
      console.log("This password is shown only once: store it now.");
    }
  },
});

const status = defineCommand({
  meta: { name: "status", description: "Show the schema version and pending migrations" },
  args: { ...commonArgs, json: { type: "boolean", description: "Print JSON" } },
  async run({ args, rawArgs }) {
    const cfg = configFromArgs(args, rawArgs);
    const st = await withDatabase(cfg, (sql) => schemaStatus(sql));
    if (args.json) console.log(JSON.stringify(st));
    else if (st.version === null)
      console.log(
        st.tables > 0
          ? `No QVD schema (the database has ${st.tables} other tables).`
          : "No QVD schema: the database is empty (run qvd db init).",
      );
    else {
      console.log(`Schema version ${st.version} (this qvd: ${st.latest}).`);
      if (st.version > st.latest) console.log("The database is newer than this qvd: upgrade qvd.");
      else
        console.log(
          st.pending.length ? `Pending migrations: ${st.pending.join(", ")} (run qvd db migrate).` : "Up to date.",
        );
    }
    if (st.version === null) process.exitCode = 3;
  },
});

const migrate = defineCommand({
  meta: { name: "migrate", description: "Apply pending numbered migrations" },
  args: { ...commonArgs },
  async run({ args, rawArgs }) {
    const cfg = configFromArgs(args, rawArgs);
    const res = await withDatabase(cfg, (sql) => migrateDatabase(sql));
    if (res.applied.length === 0) console.log(`Schema version ${res.from}: up to date.`);
    else {
      for (const m of res.applied) console.log(`Applied ${m.version}: ${m.name}`);
      console.log(`Schema version ${res.from} → ${res.to}.`);
    }
  },
});

export default defineCommand({
  meta: { name: "db", description: "Database schema: init, status, migrate" },
  subCommands: { init, status, migrate },
});
