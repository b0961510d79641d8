// Schema management: `qvd db init`, `qvd db status`, `qvd db migrate`.
import schemaSql from "../../schema.sql" with { type: "text" };
import { ACLS, BUILTIN_ROLES } from "../auth/acls.ts";
import { UserError } from "../errors.ts";
import { MIGRATIONS, type Migration } from "./migrations/index.ts";
import type { Db, Sql } from "./pool.ts";
import { transaction } from "./pool.ts";

/** The version schema.sql creates: the highest migration, or 1 before any migration. */
export const SCHEMA_VERSION = Math.max(1, ...MIGRATIONS.map((m) => m.version));

/** Serialises schema changes between concurrent `qvd db` runs. */
const SCHEMA_LOCK = 0x71766400; // "qvd\0"

export const GLOBAL_TENANT_ID = 0;
export const GLOBAL_TENANT_NAME = "*";
export const DEFAULT_TENANT_NAME = "default";

export interface SchemaStatus {
  version: number | null; // null: no QVD schema
  latest: number;
  pending: number[];
  tables: number; // tables in the public schema
}

export async function schemaStatus(db: Db, migrations: Migration[] = MIGRATIONS): Promise<SchemaStatus> {
  const latest = Math.max(1, ...migrations.map((m) => m.version));
  const [{ tables }] =
    (await db`SELECT count(*)::int AS tables FROM pg_tables WHERE schemaname = 'public'`) as unknown as [
      { tables: number },
    ];
  const [{ has }] = (await db`SELECT to_regclass('public.schema_migrations') IS NOT NULL AS has`) as unknown as [
    { has: boolean },
  ];
  if (!has) return { version: null, latest, pending: [], tables };
  const [{ v }] = (await db`SELECT max(version)::int AS v FROM schema_migrations`) as unknown as [{ v: number | null }];
  const version = v ?? null;
  return {
    version,
    latest,
    tables,
    pending: migrations.filter((m) => version !== null && m.version > version).map((m) => m.version),
  };
}

/**
 * A role runs only against the schema it was built for: behind, `qvd db migrate` first; ahead (a
 * newer qvd migrated it, e.g. during a rolling upgrade), this machine's qvd is the old one.
 */
export async function requireCurrentSchema(db: Db, migrations: Migration[] = MIGRATIONS): Promise<void> {
  const s = await schemaStatus(db, migrations);
  if (s.version === null)
    throw new UserError("the database has no qvd schema yet: run qvd db init (a new farm) or qvd db migrate");
  if (s.version < s.latest)
    throw new UserError(
      `the database's schema is version ${s.version} and this qvd needs ${s.latest}: run qvd db migrate with this qvd first`,
    );
  if (s.version > s.latest)
    throw new UserError(
      `the database's schema is version ${s.version}, newer than this qvd knows (${s.latest}): install the newer qvd on this machine (docs: README, "Installing on a server")`,
    );
}

export function generatePassword(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(15));
  return Buffer.from(bytes).toString("base64url"); // 20 characters
}

export const hashPassword = (plain: string) => Bun.password.hash(plain, { algorithm: "argon2id" });

let dummyHash: Promise<string> | undefined;

/**
 * Checks a password against a stored hash. Without a hash (no such account, or one with no
 * password) it still verifies against a dummy hash, so timing does not tell which it was.
 */
export async function checkPassword(plain: string, hash: string | null | undefined): Promise<boolean> {
  const ok = await Bun.password.verify(plain, hash ?? (await (dummyHash ??= hashPassword("not a real password"))));
  return ok && Boolean(hash);
}

/** Turns a `password` input field into the `password_hash` column (null clears it). */
export async function passwordColumns(input: Record<string, any>): Promise<Record<string, unknown>> {
  const { password: plain, ...rest } = input;
  if (plain === undefined) return rest;
  return { ...rest, password_hash: plain === null ? null : await hashPassword(plain) };
}

export interface InitOptions {
  adminName?: string;
  /** The superadmin's password; generated when absent. */
  adminPassword?: string;
}

export interface InitResult {
  adminName: string;
  adminPassword: string;
  generated: boolean;
  version: number;
}

/** Creates the schema, the global scope, the default tenant and a superadmin in an empty database. */
export async function initDatabase(sql: Sql, opts: InitOptions = {}): Promise<InitResult> {
  const adminName = opts.adminName ?? "superadmin";
  const generated = !opts.adminPassword;
  const adminPassword = opts.adminPassword ?? generatePassword();
  if (adminPassword.length < 8) throw new UserError("the administrator password must have at least 8 characters");
  const hash = await hashPassword(adminPassword);

  await sql.begin(async (tx) => {
    await tx`SELECT pg_advisory_xact_lock(${SCHEMA_LOCK})`;
    const st = await schemaStatus(tx);
    if (st.version !== null)
      throw new UserError(
        `the database already holds a QVD schema (version ${st.version}); nothing was changed. Use \`qvd db status\` or \`qvd db migrate\``,
      );
    if (st.tables > 0)
      throw new UserError(
        `the database is not empty (${st.tables} tables in schema public); refusing to initialise it. Use an empty database`,
      );
    await tx.unsafe(schemaSql);
    await tx`INSERT INTO schema_migrations (version, name) VALUES (${SCHEMA_VERSION}, 'initial schema')`;
    await tx`INSERT INTO tenants (id, name, description) VALUES
      (${GLOBAL_TENANT_ID}, ${GLOBAL_TENANT_NAME}, 'Global scope: superadministrators and shared roles, settings and properties'),
      (1, ${DEFAULT_TENANT_NAME}, 'Default tenant')`;
    await tx`SELECT setval(pg_get_serial_sequence('tenants', 'id'), 1)`;
    await syncCatalogue(tx);
    const [admin] = await tx`INSERT INTO administrators (tenant_id, name, description, password_hash)
      VALUES (${GLOBAL_TENANT_ID}, ${adminName}, 'Created by qvd db init', ${hash}) RETURNING id`;
    await tx`INSERT INTO administrator_roles (administrator_id, role_id)
      SELECT ${admin!.id}, id FROM roles WHERE tenant_id = ${GLOBAL_TENANT_ID} AND name = 'Superadmin'`;
    await tx`INSERT INTO audit_log (action, object_type, object_id, object_name, ok, source, tenant_id, tenant_name)
      VALUES ('db.init', 'administrator', ${admin!.id}, ${adminName}, true, 'system', ${GLOBAL_TENANT_ID}, ${GLOBAL_TENANT_NAME})`;
  });
  return { adminName, adminPassword, generated, version: SCHEMA_VERSION };
}

/** Applies pending numbered migrations, each in its own transaction. */
export async function migrateDatabase(
  sql: Sql,
  migrations: Migration[] = MIGRATIONS,
): Promise<{ from: number; to: number; applied: Migration[] }> {
  const sorted = [...migrations].sort((a, b) => a.version - b.version);
  const latest = Math.max(1, ...sorted.map((m) => m.version));
  const applied: Migration[] = [];
  let from = 0;
  await sql.begin(async (tx) => {
    await tx`SELECT pg_advisory_xact_lock(${SCHEMA_LOCK})`;
    const st = await schemaStatus(tx, sorted);
    if (st.version === null) throw new UserError("the database holds no QVD schema; run `qvd db init` first");
    if (st.version > latest)
      throw new UserError(
        `the database schema (version ${st.version}) is newer than this qvd (version ${latest}); upgrade qvd`,
      );
    from = st.version;
    for (const m of sorted) {
      if (m.version <= st.version) continue;
      await transaction(tx, async (sp) => {
        await sp.unsafe(m.sql);
        await sp`INSERT INTO schema_migrations (version, name) VALUES (${m.version}, ${m.name})`;
      });
      applied.push(m);
    }
    await syncCatalogue(tx);
  });
  return { from, to: applied.at(-1)?.version ?? from, applied };
}

/** Brings the ACL catalogue and the built-in roles in line with this binary. */
export async function syncCatalogue(tx: Db): Promise<void> {
  const names = Object.keys(ACLS);
  const descs = Object.values(ACLS);
  await tx`INSERT INTO acls (name, description) SELECT * FROM unnest(${names}::text[], ${descs}::text[])
           ON CONFLICT (name) DO UPDATE SET description = EXCLUDED.description`;
  await tx`DELETE FROM acls WHERE name <> ALL(${names}::text[])`;
  for (const [name, role] of Object.entries(BUILTIN_ROLES)) {
    const [r] = await tx`INSERT INTO roles (tenant_id, name, description, builtin)
      VALUES (${GLOBAL_TENANT_ID}, ${name}, ${role.description}, true)
      ON CONFLICT (tenant_id, name) DO UPDATE SET description = EXCLUDED.description, builtin = true
      RETURNING id`;
    await tx`DELETE FROM role_acls WHERE role_id = ${r!.id}`;
    await tx`INSERT INTO role_acls (role_id, acl, positive) SELECT ${r!.id}, unnest(${role.acls}::text[]), true`;
  }
}
