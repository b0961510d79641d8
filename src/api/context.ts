// What every route handler receives, and how routes are declared. Routes are a plain table so
// that the server, the ACL checks, the audit log and the OpenAPI document all read the same
// declarations.
import type { z } from "zod";
import type { Config } from "../config.ts";
import type { AuditEntry } from "../db/audit.ts";
import type { ObjectKind, Scope } from "../db/objects.ts";
import type { Sql } from "../db/pool.ts";

export interface Admin {
  id: number;
  name: string;
  tenant_id: number;
  tenant_name: string;
  superadmin: boolean;
  acls: Set<string>;
  sessionId: string;
  token: string;
}

export type Source = "api" | "cli" | "wat";

export interface Ctx {
  sql: Sql;
  cfg: Config;
  request: Request;
  url: URL;
  params: Record<string, string>;
  /** The parsed JSON body (routes with a body schema), `{}` when absent. */
  body: unknown;
  /** Undefined only on public routes. */
  admin: Admin;
  /** Tenants the administrator may see: every tenant for a superadmin. */
  scope: Scope;
  address: string | undefined;
  source: Source;
  set: { status: number; headers: Record<string, string> };
  /** Records what a route did (object and arguments) for the audit entry written after it. */
  audited: Partial<AuditEntry>;
}

export type Method = "GET" | "POST" | "PATCH" | "PUT" | "DELETE";

export interface Route {
  method: Method;
  /** Path below /api/v1, with `:id`-style parameters. */
  path: string;
  summary: string;
  tag: string;
  /** Permissions required; a function when they depend on the request (e.g. the fields changed). */
  acl?: string[] | ((ctx: Ctx) => string[]);
  /** No session needed (login, OpenAPI). */
  public?: boolean;
  /**
   * Query parameters the route reads: "list" for a list query (filters, sort, paging, fields),
   * or their names. The pipeline refuses any other parameter.
   */
  query?: "list" | readonly string[];
  /** JSON body schema (documented in OpenAPI; validated by the data layer or the handler). A route without one takes no body. */
  body?: z.ZodType;
  /** Raw body: the handler reads `ctx.request` itself (uploads). */
  rawBody?: boolean;
  /** The JSON answer on success (documented in OpenAPI). */
  response?: z.ZodType;
  /** Writes an audit entry with this action name, for success and failure alike. */
  audit?: { action: string; object?: ObjectKind | "config" | "session" };
  handler: (ctx: Ctx) => Promise<unknown> | unknown;
}
