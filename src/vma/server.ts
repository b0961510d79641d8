// The VMA's HTTP API (src/virt/README.md): JSON over plain HTTP on the guest network, port
// 3030. Every request must carry `X-QVD-VMA-Secret` (compared in constant time) and come from
// the node's address (when configured): the VMA answers its node only. Another node's L7R
// reaches it through this node's node-to-node endpoint, which makes the call itself
// (src/l7r/peer.ts). Otherwise 403 with no details, before anything else is looked at. Then: unknown path or wrong method 404, bad JSON 400, bad parameters 422
// naming the field, a request the session's state refuses 409.
//
//   GET  /vma/ping       → 200 {"ok":true,"vm_id":N,"state":S}
//   GET  /vma/x_state    → 200 {"state":S,"since":ISO,"nx_state":W[,"user":U][,"error":E]}
//   POST /vma/x_start    {user,uid,gid,cookie,home?,keyboard?,client_os?,link?,geometry?,fullscreen?,properties?}
//                        → 200 {"state":"starting"} | 409 {"error","state"}
//   POST /vma/x_suspend  → 200 {"state":S}
//   POST /vma/x_stop     → 200 {"state":S}
//   POST /vma/poweroff   → 202 {"state":"stopping"}, then the shutdown path
//   POST /vma/expire     {soft?,hard?} → 200 {"ok":true} (src/vma/expiry.ts)
import { createHash, timingSafeEqual } from "node:crypto";
import { z } from "zod";
import { logger } from "../log.ts";
import { run } from "../run.ts";
import { defaultIdentityRules, identityProblem, parseGroups, type IdentityRules } from "../auth/identity.ts";
import { StateError, type Session, type SessionParams } from "./session.ts";
import { ExpiryNotice, parseExpiryTime } from "./expiry.ts";

const log = logger("vma.server");

export const LINKS = ["modem", "isdn", "adsl", "wan", "lan", "local"] as const;
export const CLIENT_OSES = ["linux", "windows", "winnt", "macosx", "darwin", "solaris", "android"] as const;
const MAX_BODY = 64 * 1024;

const id = z
  .number({ error: "expected an integer" })
  .int("expected an integer")
  .min(1, "must be at least 1 (root is never a session user)")
  .max(4294967294);
export const xStartSchema = z
  .object({
    user: z
      .string()
      .regex(/^[a-z_][a-z0-9_.-]{0,31}$/, "expected a user name: lower-case letters, digits, _ . - (at most 32)"),
    uid: id,
    gid: id,
    home: z
      .string()
      .regex(/^(\/[\w.-]+)+$/, "expected an absolute path")
      .refine((p) => !p.split("/").includes(".."), "must not contain ..")
      .optional(),
    keyboard: z
      .string()
      .regex(/^[\w+-]{1,32}\/[\w+-]{1,32}$/, "expected MODEL/LAYOUT such as pc105/us")
      .optional(),
    client_os: z.enum(CLIENT_OSES, { error: `expected one of: ${CLIENT_OSES.join(", ")}` }).optional(),
    link: z.enum(LINKS, { error: `expected one of: ${LINKS.join(", ")}` }).optional(),
    geometry: z
      .string()
      .regex(/^\d{2,5}x\d{2,5}$/, "expected WIDTHxHEIGHT such as 1024x768")
      .optional(),
    fullscreen: z
      .preprocess(
        (v) => (v === "1" || v === 1 ? true : v === "0" || v === 0 || v === "" ? false : v),
        z.boolean({ error: "expected a boolean" }),
      )
      .optional(),
    properties: z
      .record(z.string().max(256), z.union([z.string().max(4096), z.number(), z.boolean()]))
      .refine(
        (p) =>
          p["qvd.vm.user.groups"] === undefined ||
          /^\s*([a-z_][a-z0-9_-]{0,31}([\s,]+|$))*$/.test(String(p["qvd.vm.user.groups"])),
        {
          message: "qvd.vm.user.groups: expected group names separated by commas or spaces",
        },
      )
      .optional(),
    // The NX cookie nxagent demands (src/nx/handshake.ts): chosen per x_start by the L7R.
    cookie: z.string().regex(/^[0-9a-f]{32}$/, "expected the session's NX cookie: 32 lower-case hex digits"),
  })
  .strict();

const expireSchema = z
  .object({
    soft: z
      .union([z.string().max(64), z.number()])
      .nullable()
      .optional(),
    hard: z
      .union([z.string().max(64), z.number()])
      .nullable()
      .optional(),
  })
  .strict();

export interface VmaServerOptions {
  secret: string;
  /** Requests must come from here; empty: from anywhere (the secret alone). */
  nodeAddress: string;
  vmId: number;
  session: Session;
  expireCommand: string;
  /** The program that shows the soft-expiry notice in the X session (xmessage); empty: none. */
  expireNotice?: string;
  /** The poweroff method: starts the shutdown path (does not return when it exits). */
  powerOff: () => void;
  /** Identity rules x_start must keep (the node's identity.* settings); default: the built-in ones. */
  identity?: IdentityRules;
}

/** The field of an x_start whose identity the rules refuse, whatever the L7R checked. */
function xStartIdentityProblem(
  p: z.infer<typeof xStartSchema>,
  r: IdentityRules,
): { field: string; message: string } | undefined {
  const groups = p.properties?.["qvd.vm.user.groups"];
  const bad = identityProblem(
    { uid: p.uid, gid: p.gid, home: p.home, groups: groups !== undefined ? parseGroups(String(groups)) : undefined },
    r,
  );
  return bad && { field: bad.field === "groups" ? "properties.qvd.vm.user.groups" : bad.field, message: bad.message };
}

const json = (status: number, body: unknown) =>
  new Response(JSON.stringify(body), { status, headers: { "content-type": "application/json" } });

function digest(s: string): Buffer {
  return createHash("sha256").update(s).digest();
}

/** IPv4-mapped IPv6 addresses (::ffff:1.2.3.4) compare as their IPv4 form. */
function normalizeAddress(a: string): string {
  return a.replace(/^::ffff:(?=\d+\.\d+\.\d+\.\d+$)/i, "").toLowerCase();
}

async function readJson(req: Request): Promise<{ ok: true; value: unknown } | { ok: false; res: Response }> {
  const text = await req.text();
  if (text.length > MAX_BODY) return { ok: false, res: json(413, { error: "request body too large" }) };
  if (text.trim() === "") return { ok: true, value: {} };
  try {
    return { ok: true, value: JSON.parse(text) };
  } catch {
    return { ok: false, res: json(400, { error: "the body is not valid JSON" }) };
  }
}

function invalid(err: z.ZodError): Response {
  const issue = err.issues[0]!;
  const field =
    issue.code === "unrecognized_keys"
      ? (issue as { keys: string[] }).keys.join(",")
      : issue.path.join(".") || "(body)";
  const message = issue.code === "unrecognized_keys" ? "unknown field" : issue.message;
  return json(422, { error: `${field}: ${message}`, field });
}

type Handler = (req: Request) => Promise<Response> | Response;

export function createVmaHandler(o: VmaServerOptions): (req: Request, ip: string | undefined) => Promise<Response> {
  const secret = digest(o.secret);
  const node = o.nodeAddress ? normalizeAddress(o.nodeAddress) : "";
  const identity = o.identity ?? defaultIdentityRules();
  const s = o.session;
  const notice = new ExpiryNotice(s, o.expireNotice ?? "");
  /** The expiry setting the hook last ran for: like the notice, once per setting. */
  let hookRanFor: string | undefined;

  const routes: Record<string, Record<string, Handler>> = {
    "/vma/ping": { GET: () => json(200, { ok: true, vm_id: o.vmId, state: s.state }) },
    "/vma/x_state": { GET: () => json(200, s.status()) },
    "/vma/x_start": {
      POST: async (req) => {
        const body = await readJson(req);
        if (!body.ok) return body.res;
        const parsed = xStartSchema.safeParse(body.value);
        if (!parsed.success) return invalid(parsed.error);
        const refused = xStartIdentityProblem(parsed.data, identity);
        if (refused) {
          log.warn("x_start refused", { field: refused.field, problem: refused.message });
          return json(422, { error: `${refused.field}: identity refused: ${refused.message}`, field: refused.field });
        }
        try {
          return json(200, s.start(parsed.data as SessionParams));
        } catch (err) {
          if (err instanceof StateError) return json(409, { error: err.message, state: err.state });
          throw err;
        }
      },
    },
    "/vma/x_suspend": { POST: () => json(200, s.suspend()) },
    "/vma/x_stop": { POST: () => json(200, s.stop()) },
    "/vma/poweroff": {
      POST: () => {
        setTimeout(o.powerOff, 50); // after the answer is on its way
        return json(202, { state: "stopping" });
      },
    },
    "/vma/expire": {
      POST: async (req) => {
        const body = await readJson(req);
        if (!body.ok) return body.res;
        const parsed = expireSchema.safeParse(body.value);
        if (!parsed.success) return invalid(parsed.error);
        const times: (Date | null)[] = [];
        for (const f of ["soft", "hard"] as const) {
          const t = parseExpiryTime(parsed.data[f]);
          if (t === "invalid")
            return json(422, { error: `${f}: expected a time (ISO 8601, or seconds since the epoch)`, field: f });
          times.push(t);
        }
        const [soft, hard] = times as [Date | null, Date | null];
        const iso = (d: Date | null) => d?.toISOString() ?? "";
        const key = `${iso(soft)}|${iso(hard)}`;
        log.info("expire", { soft: iso(soft), hard: iso(hard) });
        if (soft) notice.set(soft, hard);
        // The hook comes after the notice, once per setting too (the node repeats the call).
        if (o.expireCommand && hookRanFor !== key) {
          const argv = [
            ...o.expireCommand.split(/\s+/).filter(Boolean),
            "vm.expiration.soft",
            iso(soft),
            "vm.expiration.hard",
            iso(hard),
            "qvd.vm.session.state",
            s.state,
            "qvd.hook.on_action",
            "expire",
          ];
          const r = await run(argv, { allowFail: true, timeoutMs: 30_000 });
          if (r.status !== 0) return json(500, { error: `expire hook failed (exit ${r.status})` });
          hookRanFor = key;
        }
        return json(200, { ok: true });
      },
    },
  };

  return async (req, ip) => {
    const given = req.headers.get("x-qvd-vma-secret");
    const okSecret = given !== null && timingSafeEqual(digest(given), secret);
    const path = new URL(req.url).pathname;
    const okAddr = !node || (ip !== undefined && normalizeAddress(ip) === node);
    if (!okSecret || !okAddr) {
      log.warn("refused", { from: ip ?? "?", reason: okSecret ? "address" : "secret" });
      return json(403, { error: "forbidden" });
    }
    const h = routes[path]?.[req.method];
    if (!h) return json(404, { error: "not found" });
    try {
      return await h(req);
    } catch (err) {
      log.error("request failed", { path, err: (err as Error).message });
      return json(500, { error: (err as Error).message });
    }
  };
}

export function startVmaServer(o: VmaServerOptions, hostname: string, port: number) {
  const handle = createVmaHandler(o);
  return Bun.serve({
    hostname,
    port,
    maxRequestBodySize: MAX_BODY,
    fetch: (req, server) => handle(req, server.requestIP(req)?.address),
  });
}
