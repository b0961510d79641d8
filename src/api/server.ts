// The admin API server (Elysia on Bun): every route of the route table under /api/v1, one
// request pipeline for all of them: read the body, authenticate, check ACLs and tenancy, run
// the handler, write the audit entry, and answer JSON (errors included, never a stack trace).
import { Registry } from "../metrics.ts";
import { Elysia } from "elysia";
import type { Config } from "../config.ts";
import { audit as writeAudit, type AuditEntry } from "../db/audit.ts";
import { DataError } from "../db/errors.ts";
import { sessionAlive } from "../db/sessions.ts";
import { ALL_TENANTS, find, tenantScope, type ObjectDef } from "../db/objects.ts";
import type { Sql } from "../db/pool.ts";
import { logger } from "../log.ts";
import { ACTION_ROUTES } from "./actions.ts";
import { AUTH_ROUTES, authenticate, SESSION_COOKIE, tokenOf } from "./auth.ts";
import { clientAddress, trustedProxies } from "./client-address.ts";
import type { Ctx, Route, Source } from "./context.ts";
import { EventHub } from "./events.ts";
import { ApiError, checkInput, errorBody, forbidden, readJson } from "./http.ts";
import { openApiDocument } from "./openapi.ts";
import { RESOURCES, resourceRoutes } from "./resources.ts";
import { UPLOAD_ROUTES } from "./uploads.ts";
import { watResponse } from "../web/assets.ts";

const log = logger("api");

export interface ApiOptions {
  sql: Sql;
  cfg: Config;
  /** URL of the database, for the event stream's own LISTEN connection. */
  databaseUrl: string;
  /** Where the API's metrics go (the role serves it on api.metrics.listen). */
  metrics?: Registry;
}

/**
 * @param keepOpen lifts the idle timeout of an accepted event stream's connection (Bun counts
 *   only what the client sends as activity; the stream has its own keep-alives and limits)
 */
export function apiRoutes(hub: EventHub, keepOpen: (request: Request) => void = () => {}): Route[] {
  return [
    ...AUTH_ROUTES,
    ...RESOURCES.flatMap(resourceRoutes),
    ...ACTION_ROUTES,
    ...UPLOAD_ROUTES,
    {
      method: "GET",
      path: "/events",
      tag: "events",
      acl: [],
      summary: "Server-sent events of object changes you can see (change, resync, ping)",
      handler: (ctx) => {
        // A refused stream (too many) is retried by EventSource: not before a few seconds.
        ctx.set.headers["retry-after"] = "5";
        return hub.subscribe(
          ctx.admin,
          ctx.request.signal,
          () => sessionAlive(ctx.sql, ctx.admin.token),
          () => keepOpen(ctx.request),
        );
      },
    },
  ];
}

const json = (status: number, body: unknown, headers: Record<string, string> = {}) =>
  new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json; charset=utf-8", "cache-control": "no-store", ...headers },
  });

const SAFE_METHODS = new Set(["GET", "HEAD", "OPTIONS"]);
const SESSION_IN_COOKIE = new RegExp(`(^|;)\\s*${SESSION_COOKIE}=`);

/**
 * CSRF: why a change a browser could send on its own (a form, an <img>, a no-cors fetch from
 * another site) is refused, or undefined. It applies to requests the session cookie would
 * authenticate, and to public ones (login); a bearer token is never added by a browser. Such a
 * request needs Sec-Fetch-Site same-origin, else an Origin of this host, else (clients that
 * send neither) Content-Type: application/json, which no cross-site page can send unasked.
 */
function crossSiteRefusal(request: Request, url: URL, isPublic: boolean): string | undefined {
  if (SAFE_METHODS.has(request.method)) return undefined;
  if (/^Bearer\s/i.test(request.headers.get("authorization") ?? "")) return undefined;
  if (!isPublic && !SESSION_IN_COOKIE.test(request.headers.get("cookie") ?? "")) return undefined; // then 401
  const crossSite = "cross-site request refused: changes come from the WAT's own pages or with a bearer token";
  const site = request.headers.get("sec-fetch-site");
  if (site !== null) return site === "same-origin" ? undefined : crossSite;
  const origin = request.headers.get("origin");
  if (origin !== null) return URL.canParse(origin) && new URL(origin).host === url.host ? undefined : crossSite;
  return /^application\/(.+\+)?json\s*(;|$)/i.test(request.headers.get("content-type") ?? "")
    ? undefined
    : "a change authenticated by the session cookie needs Content-Type: application/json (or the WAT's own Origin)";
}

const sourceOf = (req: Request): Source => {
  const s = req.headers.get("x-qvd-source")?.toLowerCase();
  return s === "cli" || s === "wat" ? s : "api";
};

export function createApi(opts: ApiOptions) {
  const hub = new EventHub(opts.databaseUrl, {
    maxStreams: opts.cfg.get("api.events.max_streams"),
    maxPerAdmin: opts.cfg.get("api.events.max_streams_per_admin"),
    idleTimeoutS: opts.cfg.get("api.timeout.idle"),
  });
  const servers = new WeakMap<Request, { timeout?(r: Request, seconds: number): void }>();
  const idleTimeout = opts.cfg.get("api.timeout.idle");
  // Bun also counts a handler's own time as idle: an administrator's request (a mass change of
  // thousands of objects) runs without the timeout, which is then restored for the connection.
  // An event stream keeps it lifted (it has its own keep-alives and limits).
  const streaming = new WeakSet<Request>();
  const setTimeoutOf = (r: Request, seconds: number) => servers.get(r)?.timeout?.(r, seconds);
  const routes = apiRoutes(hub, (r) => {
    streaming.add(r);
    setTimeoutOf(r, 0);
  });
  const openapi = openApiDocument(routes);

  async function handle(
    route: Route,
    request: Request,
    params: Record<string, string>,
    address: string | undefined,
  ): Promise<Response> {
    const ctx: Ctx = {
      sql: opts.sql,
      cfg: opts.cfg,
      request,
      url: new URL(request.url),
      params,
      body: {},
      admin: undefined as unknown as Ctx["admin"],
      scope: ALL_TENANTS,
      address,
      source: sourceOf(request),
      set: { status: 200, headers: {} },
      audited: {},
    };
    let result: unknown;
    let failure: DataError | undefined;
    try {
      const refusal = crossSiteRefusal(request, ctx.url, !!route.public);
      if (refusal) throw new ApiError(refusal, 403);
      if (!route.rawBody && request.method !== "GET") ctx.body = await readJson(request);
      if (!route.public) {
        ctx.admin = await authenticate(ctx, tokenOf(request));
        ctx.scope = ctx.admin.superadmin ? ALL_TENANTS : tenantScope(ctx.admin.tenant_id);
        const needed = typeof route.acl === "function" ? route.acl(ctx) : (route.acl ?? []);
        const missing = needed.filter((a) => !ctx.admin.acls.has(a));
        if (missing.length) throw forbidden(missing);
      }
      checkInput(route, ctx.url, params, ctx.body);
      if (ctx.admin) setTimeoutOf(request, 0);
      try {
        result = await route.handler(ctx);
      } finally {
        if (ctx.admin && !streaming.has(request)) setTimeoutOf(request, idleTimeout);
      }
    } catch (err) {
      if (err instanceof DataError) failure = err;
      else {
        log.error("request failed", {
          route: `${route.method} ${route.path}`,
          error: (err as Error)?.message ?? String(err),
        });
        failure = new ApiError("internal error; the server log has the details", 500);
      }
    }
    if (route.audit && (ctx.admin || route.public)) await recordAudit(ctx, route, failure);
    if (failure) return json(failure.status, errorBody(failure), ctx.set.headers);
    if (result instanceof Response) return result;
    return json(ctx.set.status, result ?? { ok: true }, ctx.set.headers);
  }

  const defs = new Map<string, ObjectDef<any>>(RESOURCES.map((r) => [r.def.kind, r.def]));

  async function recordAudit(ctx: Ctx, route: Route, failure: DataError | undefined): Promise<void> {
    // An unauthenticated request to a protected route is not an administrator's action.
    if (!route.public && failure?.status === 401) return;
    const a = ctx.audited;
    // Arguments are an object in the log, whatever the body was (an array, a number…).
    const args = a.arguments ?? ctx.body;
    try {
      // An entry about an object belongs to the object's tenant (so that tenant's administrators
      // see it), also when the handler failed before saying so. Looked up within the caller's
      // scope: another tenant's object is not named in an entry of the caller's tenant.
      const def = defs.get(route.audit!.object ?? "");
      if (
        def &&
        typeof a.object_id === "number" &&
        (a.tenant_id === undefined || a.tenant_name === undefined || a.object_name === undefined)
      ) {
        const row = await find(opts.sql, def, ctx.scope, a.object_id).catch(() => undefined);
        if (row && (a.tenant_id === undefined || a.tenant_id === row.tenant_id)) {
          a.object_name ??= (row.name ?? row.key ?? row.version) as string | undefined;
          if (typeof row.tenant_id === "number") {
            a.tenant_id = row.tenant_id;
            a.tenant_name ??= row.tenant_name as string | undefined;
          }
        }
      }
      await writeAudit(opts.sql, {
        action: route.audit!.action,
        object_type: (route.audit!.object ?? null) as AuditEntry["object_type"],
        object_id: a.object_id ?? null,
        object_name: a.object_name ?? null,
        administrator_id: a.administrator_id ?? ctx.admin?.id ?? null,
        administrator_name: a.administrator_name ?? ctx.admin?.name ?? null,
        superadmin: a.superadmin ?? ctx.admin?.superadmin ?? false,
        tenant_id: a.tenant_id ?? ctx.admin?.tenant_id ?? null,
        tenant_name: a.tenant_name ?? (a.tenant_id === undefined ? ctx.admin?.tenant_name : undefined) ?? null,
        arguments: (args && typeof args === "object" && !Array.isArray(args)
          ? args
          : args === undefined || args === null
            ? {}
            : { body: args }) as Record<string, unknown>,
        ok: !failure,
        error: failure?.message ?? null,
        source: ctx.source,
        address: ctx.address ?? null,
      });
    } catch (err) {
      log.error("could not write the audit log", { action: route.audit!.action, error: (err as Error).message });
    }
  }

  // Elysia knows the server (and so the client's address) only when it starts the server
  // itself; served with Bun.serve({ fetch }), the address comes through `fetch` below.
  const addresses = new WeakMap<Request, string>();
  const trusted = trustedProxies(opts.cfg.get("api.trusted_proxies"));
  const addressOf = (request: Request, peer: string | undefined) =>
    clientAddress(peer, request.headers.get("x-forwarded-for"), trusted);
  const app = new Elysia({ normalize: false });
  for (const route of routes) {
    app.route(
      route.method,
      "/api/v1" + route.path,
      ({ request, params, server }) =>
        handle(
          route,
          request,
          (params ?? {}) as Record<string, string>,
          addresses.get(request) ?? addressOf(request, server?.requestIP(request)?.address),
        ),
      { parse: "none" },
    );
  }
  app.get("/api/v1/openapi.json", () => json(200, openapi));
  // The WAT: its assets are inside the binary; every other path under /wat/ is the app's own.
  app.get("/", () => Response.redirect("/wat/", 302));
  app.get("/wat", ({ request }) =>
    new URL(request.url).pathname === "/wat/" ? watResponse("", request) : Response.redirect("/wat/", 301),
  );
  app.get("/wat/*", ({ request, params }) => watResponse((params as Record<string, string>)["*"] ?? "", request));
  app.onError(({ code, error }) => {
    if (code === "NOT_FOUND") return json(404, { error: { status: 404, message: "no such route" } });
    log.error("unhandled", { code: String(code), error: (error as Error)?.message });
    return json(500, { error: { status: 500, message: "internal error; the server log has the details" } });
  });
  // The API's metrics (docs/METRICS.md): by method and status only, so that ids in paths cannot
  // make a series each.
  const reg = opts.metrics ?? new Registry();
  const requests = reg.counter("qvd_api_requests_total", "Admin API requests, by method and status.");
  const requestSeconds = reg.histogram(
    "qvd_api_request_seconds",
    "Seconds to answer an admin API request (to its first byte; an event stream counts until it opens), by method.",
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
  );
  const logins = reg.counter("qvd_api_logins_total", "Administrator logins, by result (ok, failed, throttled).");
  const counted = (request: Request, t0: number) => (res: Response) => {
    requests.inc({ method: request.method, status: String(res.status) });
    requestSeconds.observe({ method: request.method }, (performance.now() - t0) / 1000);
    if (request.method === "POST" && new URL(request.url).pathname === "/api/v1/login")
      logins.inc({ result: res.status === 200 ? "ok" : res.status === 429 ? "throttled" : "failed" });
    return res;
  };
  /** The handler to serve: `Bun.serve({ fetch })` (it records the client's address for the audit log and throttling). */
  const fetch = (
    request: Request,
    server?: { requestIP(r: Request): { address: string } | null; timeout?(r: Request, seconds: number): void },
  ): Response | Promise<Response> => {
    if (server) servers.set(request, server);
    const ip = addressOf(request, server?.requestIP(request)?.address);
    if (ip) addresses.set(request, ip);
    const done = counted(request, performance.now());
    const res = app.fetch(request);
    return res instanceof Promise ? res.then(done) : done(res);
  };
  /** Bun.serve's idle timeout: silent connections are closed (event streams send keep-alives). */
  return { app, fetch, routes, hub, openapi, idleTimeout };
}
