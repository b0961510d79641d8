// The commands that are not about one kind of object: login, logout, whoami, stats and the
// ACL catalogue.
import { UserError } from "../../errors.ts";
import {
  AdminClient,
  apiBase,
  connection,
  credentialsFile,
  deleteCredentials,
  EXIT,
  loadCredentials,
  saveCredentials,
  usageError,
} from "../client.ts";
import { keyValues, printJson, table } from "../format.ts";
import { readPassword } from "../prompt.ts";
import { leaf } from "./framework.ts";

export const login = leaf(
  "login",
  "Log in and store the session token (mode 0600, in $XDG_CONFIG_HOME/qvd/admin.json). Example: qvd admin login --url https://api.example.com:8443 --name superadmin",
  {
    name: { type: "string", description: "Administrator name (NAME@TENANT names the tenant too)", valueHint: "NAME" },
    tenant: {
      type: "string",
      description: "Tenant of the administrator (default: the global scope, then default)",
      valueHint: "TENANT",
    },
    "password-file": {
      type: "string",
      description:
        "Read the password from this file's first line (else a prompt on the terminal, else the first line of standard input)",
      valueHint: "FILE",
    },
  },
  async (l) => {
    const stored = loadCredentials();
    const url = l.flags.url || process.env.QVD_ADMIN_URL || stored?.url;
    if (!url) throw usageError("give the API's address: qvd admin login --url https://HOST:PORT --name NAME");
    const sameApi = stored && apiBase(stored.url) === apiBase(url);
    const name: string | undefined = l.args.name || (sameApi ? stored!.name : undefined);
    if (!name) throw usageError("give your administrator name: --name NAME");
    const tenant: string | undefined = l.args.tenant ?? (sameApi && !l.args.name ? stored!.tenant : undefined);
    const conn = connection({ ...l.flags, url, token: undefined }, { needToken: false });
    const c = new AdminClient({ ...conn, token: undefined });
    const password = await readPassword(
      l.args["password-file"],
      `Password for ${name}${tenant ? `@${tenant}` : ""} at ${conn.base}: `,
    );
    const res = (
      await c.call<{ token: string; expires_at: string; administrator: { name: string; tenant_name: string } }>(
        "POST",
        "/login",
        {
          body: { name, password, ...(tenant !== undefined && !name.includes("@") ? { tenant } : {}) },
          token: false,
        },
      )
    ).body;
    saveCredentials({
      url: conn.base,
      token: res.token,
      name: res.administrator.name,
      tenant: res.administrator.tenant_name,
      ...(conn.ca ? { ca: conn.ca } : {}),
      ...(conn.insecure ? { insecure: true } : {}),
    });
    if (l.json)
      return printJson({
        url: conn.base,
        administrator: res.administrator,
        expires_at: res.expires_at,
        credentials: credentialsFile(),
      });
    console.log(
      `logged in to ${conn.base} as ${res.administrator.name} (tenant ${res.administrator.tenant_name}); credentials in ${credentialsFile()}`,
    );
  },
  0,
);

export const logout = leaf(
  "logout",
  "End the session on the API and delete the stored credentials. Example: qvd admin logout",
  {},
  async (l) => {
    let conn;
    try {
      conn = connection(l.flags);
    } catch (err) {
      if (err instanceof UserError && err.exitCode === EXIT.unauthenticated) {
        deleteCredentials();
        return console.error("not logged in");
      }
      throw err;
    }
    try {
      await new AdminClient(conn).call("POST", "/logout");
    } catch (err) {
      if (!(err instanceof UserError && err.exitCode === EXIT.unauthenticated)) {
        deleteCredentials();
        console.error(
          `qvd: warning: the session could not be ended on the API (${err instanceof Error ? err.message : String(err)}); the stored credentials are deleted anyway`,
        );
        return;
      }
    }
    deleteCredentials();
    console.log(`logged out of ${conn.base}`);
  },
  0,
);

export const whoami = leaf(
  "whoami",
  "Who you are logged in as, where, and with how many ACLs. Example: qvd admin whoami",
  {},
  async (l) => {
    const res = await l
      .client()
      .get<{ administrator: Record<string, unknown>; acls: string[]; multitenant: boolean }>("/session");
    if (l.json) return printJson(res);
    const a = res.administrator;
    console.log(
      keyValues({
        api: l.client().conn.base,
        name: a.name,
        id: a.id,
        tenant: a.tenant_name,
        superadmin: a.superadmin,
        roles: a.roles,
        acls: res.acls.length,
        multitenant: res.multitenant,
      }),
    );
  },
  0,
);

export const stats = leaf(
  "stats",
  "Dashboard counts: users, VMs, nodes, OSFs, images. Example: qvd admin stats",
  {},
  async (l) => {
    const res = await l.client().get<Record<string, unknown>>("/stats");
    if (l.json) printJson(res);
    else console.log(keyValues(res));
  },
  0,
);

export const aclsCmd = leaf(
  "acls",
  "The ACL catalogue, optionally matching a pattern (% wildcard). Example: qvd admin acls vm.%",
  { pattern: { type: "positional", description: "ACL pattern", required: false } },
  async (l) => {
    const res = await l.client().get<{ items: { name: string; description: string }[] }>("/acls");
    const items = l.pos[0] ? res.items.filter((i) => likePattern(l.pos[0]!).test(i.name)) : res.items;
    if (l.json) return printJson({ items });
    console.log(table(items, ["name", "description"]));
  },
  1,
);

/** `%` any run of characters and `_` any one character, as in SQL LIKE. */
export function likePattern(pattern: string): RegExp {
  const re = pattern
    .replace(/[.*+?^${}()|[\]\\]/g, "\\$&")
    .replace(/%/g, ".*")
    .replace(/_/g, ".");
  return new RegExp(`^${re}$`);
}
