// The L7R's endpoints (docs/PROTOCOL.md): ping, the desktop lists, logins and tokens, stop_vm,
// connect_to_vm, and the browser page and its WebSocket (src/l7r/web-connect.ts).
import type { AuthenticatedUser } from "../auth/user-auth.ts";
import { stopVm } from "../db/commands.ts";
import { incrementHostCounter } from "../db/hosts.ts";
import * as L from "../db/l7r.ts";
import { tenantScope } from "../db/objects.ts";
import { createUserToken } from "../db/tokens.ts";
import { logger } from "../log.ts";
import { spliceNx } from "../nx/handshake.ts";
import { jsonResponse, textResponse, type HttpRequest } from "../nx/http.ts";
import { desktopPage } from "../web/desktop-assets.ts";
import { DesktopSession } from "./connect-flow.ts";
import type { Connection, Handler } from "./connection.ts";
import type { L7rContext } from "./context.ts";
import { Logins, pluginIdentity } from "./login.ts";
import { isId, mayUse, Status } from "./status.ts";
import { webConnect } from "./web-connect.ts";
import { CLIENT_PARAM } from "./x-start.ts";

const log = logger("l7r");

/** The request handler of one connection (its logins are remembered for its later requests). */
export function routes(ctx: L7rContext, conn: Connection): Handler {
  const { sql, o } = ctx;
  const logins = new Logins(ctx, conn.address);
  const auth = (req: HttpRequest, hostId: number) => logins.user(req.headers.get("authorization") ?? "", hostId);

  return async (req) => {
    if (req.method !== "GET") throw new Status(404);
    // The browser page (no database work: it is static).
    if (o.web && (req.path === "/" || (req.path.startsWith("/qvd/web/") && req.path !== "/qvd/web/connect"))) {
      const page = desktopPage(req.path, req.headers);
      if (!page) throw new Status(404);
      return conn.send(page);
    }
    const host = await L.l7rHost(sql, o.nodename);
    if (!host) throw new Status(503, "Host is not registered in the database");
    await incrementHostCounter(sql, host.id, "http_requests").catch(() => {});
    const serving = () => {
      if (host.blocked) throw new Status(503, "Server is blocked");
      if (host.state !== "running") throw new Status(503, `Server is ${host.state}`);
    };
    switch (req.path) {
      case "/qvd/ping":
        serving();
        return conn.send(textResponse(200, "I am alive!\r\n"));
      case "/qvd/list_of_vm":
      case "/qvd/list_of_applications": {
        const user = await auth(req, host.id);
        serving();
        // No OSF is an application OSF (yet): applications are an empty list.
        const all = req.path === "/qvd/list_of_vm" ? await L.userVms(sql, user.userId) : [];
        const list = all.filter((v) => mayUse(user, user.userId, v.id));
        return conn.send(
          jsonResponse(
            200,
            list.map((v) => ({
              id: v.id,
              name: v.name,
              state: v.state,
              blocked: v.blocked ? 1 : 0,
              is_application: 0,
            })),
          ),
        );
      }
      case "/qvd/authenticate_user":
        await auth(req, host.id);
        return conn.send(jsonResponse(200, {}));
      case "/qvd/create_auth_token": {
        // A token cannot make tokens (a stolen one would renew itself forever); refused before
        // the token is looked at, so a single-use one is not spent on it.
        if (/^\s*bearer\s/i.test(req.headers.get("authorization") ?? ""))
          throw new Status(403, "A token cannot create another token; log in with your password");
        const user = await auth(req, host.id);
        // ?vm_id= makes a token for that VM only; a VM-bound login can only pass its VM on.
        const vmRaw = req.query.find(([k]) => k === "vm_id")?.[1];
        const vmId = vmRaw === undefined ? user.vmId : Number(vmRaw);
        if (vmId !== undefined) {
          if (!isId(vmId)) throw new Status(422, "parameter vm_id is not a VM id");
          const vm = await L.sessionVm(sql, vmId);
          if (!vm) throw new Status(404, "The requested virtual machine does not exist");
          if (!mayUse(user, vm.user_id, vmId))
            throw new Status(403, "You are not allowed to access requested virtual machine");
        }
        const tok = await createUserToken(sql, tenantScope(user.tenantId), {
          userId: user.userId,
          vmId,
          ttlSeconds: 86400,
          multiUse: true,
          authParams: pluginIdentity(user),
        });
        return conn.send(jsonResponse(200, { auth_token: Buffer.from(tok.token).toString("base64") + "\n" }));
      }
      case "/qvd/stop_vm":
        return stopVmRequest(ctx, conn, await auth(req, host.id), req, host);
      case "/qvd/connect_to_vm": {
        const session = new DesktopSession(ctx, conn, "qvd");
        return connectToVm(ctx, conn, session, await auth(req, host.id), req, host);
      }
      case "/qvd/web/connect":
        if (!o.web) throw new Status(404);
        return webConnect(ctx, conn, logins, req, host, o.web);
      default:
        throw new Status(404);
    }
  };
}

async function stopVmRequest(
  ctx: L7rContext,
  conn: Connection,
  user: AuthenticatedUser,
  req: HttpRequest,
  host: L.L7rHost,
) {
  const { sql, t } = ctx;
  if (host.blocked) throw new Status(503, "Server is blocked");
  const id = Number(req.query.find(([k]) => k === "id")?.[1] ?? NaN);
  if (!Number.isInteger(id)) throw new Status(422, "parameter id is missing");
  let vm = isId(id) ? await L.sessionVm(sql, id) : undefined;
  if (!vm) throw new Status(404, "The requested virtual machine does not exist");
  if (!mayUse(user, vm.user_id, id)) throw new Status(403, "You are not allowed to access requested virtual machine");
  if (vm.vm_state === "stopped") return conn.send(textResponse(200, "Machine stopped\r\n"));
  conn.progress("Stopping virtual machine");
  if (["starting", "running", "debugging"].includes(vm.vm_state))
    await stopVm(sql, tenantScope(user.tenantId), id, "l7r").catch(() => {});
  else if (vm.vm_state !== "stopping")
    throw new Status(503, `The requested virtual machine is in an unstoppable state (${vm.vm_state})`);
  const deadline = Date.now() + t.vmStop * 1000;
  for (;;) {
    vm = await L.sessionVm(sql, id);
    if (!vm || vm.vm_state === "stopped") return conn.send(textResponse(200, "Machine stopped\r\n"));
    if (Date.now() >= deadline || conn.closed) throw new Status(408, "VM didn't reach state 'stopped'. Timeout");
    conn.progress("Waiting for VM to reach state 'stopped'");
    await ctx.vmChanged(id, Math.min(2000, deadline - Date.now()));
  }
}

/** A QVD client's connect: the flow, then a 101 and the client's TLS stream spliced with nxagent. */
async function connectToVm(
  ctx: L7rContext,
  conn: Connection,
  session: DesktopSession,
  user: AuthenticatedUser,
  req: HttpRequest,
  host: L.L7rHost,
) {
  const { sql, t } = ctx;
  if (host.blocked) throw new Status(503, "Server is blocked");
  if (
    req.headers.get("connection")?.toLowerCase() !== "upgrade" ||
    req.headers.get("upgrade")?.toLowerCase() !== "qvd/1.0"
  )
    throw new Status(426);
  const idRaw = req.query.find(([k]) => k === "id")?.[1];
  if (idRaw === undefined) throw new Status(422, "parameter id is missing");
  const bad = req.query.filter(([k]) => k !== "id" && !CLIENT_PARAM.test(k)).map(([k]) => k);
  if (bad.length) throw new Status(403, `Invalid parameters ${bad.join(" ")}`);
  const id = Number(idRaw);
  const vm0 = isId(id) ? await L.sessionVm(sql, id) : undefined;
  if (!vm0) throw new Status(404, "The requested virtual machine does not exist");
  if (vm0.blocked) throw new Status(403, "The requested virtual machine is offline for maintenance");
  const params = new Map(req.query.filter(([k]) => k !== "id"));
  const { nx, slaveKey, cookie } = await session.open(user, vm0, params, host);
  conn.progress("Connection established");
  const initial = conn.upgrade([["X-QVD-Slave-Key", slaveKey]]);
  conn.s.timeout(0);
  session.attach(nx);
  session.countSession();
  const started = Date.now();
  const onRefused = (reason: string) => log.warn("NX handshake refused", { vm: id, user: user.login, reason });
  void spliceNx(conn.s, nx, { cookie, initial, timeoutMs: t.nxHandshake * 1000, onRefused }).then(async (r) => {
    log.info("session ended", { vm: id, user: user.login, up: r.aToB, down: r.bToA });
    session.countBytes(r.aToB, r.bToA);
    if (Date.now() - started < 120_000) await incrementHostCounter(sql, host.id, "short_sessions").catch(() => {});
    conn.close(); // counts the connection out and releases the session
  });
}
