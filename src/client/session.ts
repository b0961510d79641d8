// `qvd client`, the flow: connect to the L7R, list the user's desktops, pick one, optionally
// stop it first, connect with the qvd.client.* parameters, show the 102 progress, and on the
// 101 run nxproxy against a local port spliced with the stream (reference §4).
import { readFileSync } from "node:fs";
import { createInterface } from "node:readline";
import { UserError } from "../errors.ts";
import { logger } from "../log.ts";
import { spawnDaemon, type Daemon } from "../run.ts";
import { bodyLine, EXIT, L7RConnection, type Response } from "./l7r.ts";
import { listenLocal, splice } from "./splice.ts";

const log = logger("client");

export interface ClientOptions {
  host: string;
  port: number;
  tls: boolean;
  /** Basic login (user + password), or a bearer token from /qvd/create_auth_token. */
  user?: string;
  password?: string;
  token?: string;
  /** Log in, print a new bearer token (create_auth_token) and stop there. */
  printToken?: boolean;
  /** A VM id or name. */
  vm?: string;
  link: string;
  geometry: string;
  fullscreen: boolean;
  keyboard: string;
  ca?: string;
  insecure: boolean;
  /** Client certificate and key files (servers that ask for one). */
  cert?: string;
  key?: string;
  /** Stop the desktop before connecting ("restart session"). */
  stop: boolean;
  /** nxproxy and any leading arguments (tests); `-S localhost:<D>` is appended. */
  nxproxy: string[];
  responseTimeoutMs?: number;
  /** How long nxproxy has to connect to the local port. */
  nxproxyTimeoutMs?: number;
  /** Progress and information (stdout by default). */
  say?: (line: string) => void;
}

export interface Desktop {
  id: number;
  name: string;
  state: string;
  blocked: boolean;
}

/** The L7R's booleans come as 0/1, "0"/"1", true/false or null (reference §3.2). */
const truthy = (v: unknown) => v === true || v === 1 || v === "1" || v === "true";

export function parseDesktops(body: Uint8Array, where: string): Desktop[] {
  let data: unknown;
  try {
    data = JSON.parse(new TextDecoder().decode(body));
  } catch {
    throw new UserError(`${where} is not a QVD server (the list of desktops is not JSON)`, EXIT.unreachable);
  }
  if (!Array.isArray(data)) throw new UserError(`${where} is not a QVD server (the list of desktops is not a JSON array)`, EXIT.unreachable);
  return data.map((v: Record<string, unknown>) => ({
    id: Number(v.id),
    name: String(v.name ?? v.id),
    state: String(v.state ?? "unknown"),
    blocked: truthy(v.blocked),
  }));
}

const describeDesktop = (d: Desktop) => `${d.id} ${d.name} (${d.state}${d.blocked ? ", blocked" : ""})`;

/** Errors common to every request: 401, 403, 404, 5xx. */
function failure(r: Response, what: string, where: string, bearer = false): UserError {
  const said = bodyLine(r.body);
  const detail = said ? `: ${said}` : "";
  switch (true) {
    case r.status === 401:
      return new UserError(bearer
        ? `${where} refused the token (expired, unknown, or the account is blocked): log in with the password again`
        : `${where} refused the login (wrong user name or password, or the account is blocked)`, EXIT.auth);
    case r.status === 403:
      return new UserError(`${where} refused ${what} (forbidden)${detail}`, EXIT.forbidden);
    case r.status === 408 || r.status >= 500:
      return new UserError(`${where} could not ${what}: ${r.status} ${r.reason}${detail}`, EXIT.unavailable);
    default:
      return new UserError(`${where} refused ${what}: ${r.status} ${r.reason}${detail}`, EXIT.failed);
  }
}

/** Reads responses, printing each 102's X-QVD-VM-Info, until a final one. */
async function finalResponse(conn: L7RConnection, what: string, say: (l: string) => void): Promise<Response> {
  for (;;) {
    const r = await conn.readResponse(what);
    if (r.status !== 102) return r;
    const info = r.headers.get("x-qvd-vm-info");
    if (info) say(info);
  }
}

async function choose(desktops: Desktop[], user: string, where: string, want?: string): Promise<Desktop> {
  if (want !== undefined) {
    const d = desktops.find((x) => String(x.id) === want) ?? desktops.find((x) => x.name === want);
    if (!d) {
      const list = desktops.length ? `; the user's desktops: ${desktops.map(describeDesktop).join(", ")}` : "; the user has no desktops";
      throw new UserError(`no desktop ${want} for ${user} on ${where}${list}`, EXIT.noDesktop);
    }
    return d;
  }
  if (desktops.length === 0) throw new UserError(`${user} has no desktops on ${where}`, EXIT.noDesktop);
  if (desktops.length === 1) return desktops[0]!;
  if (!process.stdin.isTTY) {
    throw new UserError(
      `${user} has ${desktops.length} desktops, choose one with --vm ID: ${desktops.map(describeDesktop).join(", ")}`, EXIT.usage);
  }
  process.stderr.write(`Desktops of ${user}:\n`);
  desktops.forEach((d, i) => process.stderr.write(`  ${i + 1}) ${describeDesktop(d)}\n`));
  const rl = createInterface({ input: process.stdin, output: process.stderr });
  try {
    for (;;) {
      const answer = (await new Promise<string | null>((resolve) => {
        rl.question(`Connect to which one [1-${desktops.length}]? `, resolve);
        rl.once("close", () => resolve(null));
      }));
      if (answer === null) throw new UserError("no desktop chosen", EXIT.usage);
      const n = Number(answer.trim());
      if (Number.isInteger(n) && n >= 1 && n <= desktops.length) return desktops[n - 1]!;
      const byId = desktops.find((d) => String(d.id) === answer.trim() || d.name === answer.trim());
      if (byId) return byId;
    }
  } finally {
    rl.close();
  }
}

/** The connect_to_vm query: id plus the qvd.client.* keys, percent-encoded (`+` and `/` too). */
export function connectQuery(id: number, o: Pick<ClientOptions, "keyboard" | "link" | "geometry" | "fullscreen">): string {
  const params: [string, string][] = [
    ["id", String(id)],
    ["qvd.client.os", "linux"],
    ["qvd.client.keyboard", o.keyboard],
    ["qvd.client.link", o.link],
    ["qvd.client.geometry", o.geometry],
    ["qvd.client.fullscreen", o.fullscreen ? "1" : "0"],
    ["qvd.client.printing.enabled", "0"],
    ["qvd.client.type", "qvd-bun"],
  ];
  return params.map(([k, v]) => `${k}=${encodeURIComponent(v)}`).join("&");
}

/** Runs a whole session; returns the exit code (0: the session ended normally). */
export async function runClient(o: ClientOptions): Promise<number> {
  const say = o.say ?? ((l: string) => console.log(l));
  if (o.insecure) process.stderr.write("qvd: warning: --insecure: the server's certificate is not verified\n");
  const pem = (flag: string, file: string | undefined, what: string) => {
    if (!file) return undefined;
    try {
      return readFileSync(file, "utf8");
    } catch (err) {
      throw new UserError(`${flag} ${file}: cannot read the ${what} file: ${(err as Error).message}`, EXIT.usage);
    }
  };
  const conn = await L7RConnection.connect({
    host: o.host, port: o.port, tls: o.tls, ca: pem("--ca", o.ca, "certificate"), insecure: o.insecure, responseTimeoutMs: o.responseTimeoutMs,
    cert: pem("--cert", o.cert, "client certificate"), key: pem("--key", o.key, "client key"),
  });
  const where = conn.where;
  const bearer = o.token !== undefined;
  const auth = { Authorization: bearer ? `Bearer ${o.token}` : `Basic ${Buffer.from(`${o.user}:${o.password}`).toString("base64")}` };
  const who = o.user || "the token's user";
  let nx: Daemon | undefined;
  let local: ReturnType<typeof listenLocal> | undefined;
  try {
    // 1. The desktops.
    conn.request("/qvd/list_of_vm", { ...auth, Accept: "application/json" });
    const list = await finalResponse(conn, "the list of desktops", say);
    if (list.status === 404) throw new UserError(`${where} is not a QVD server (404 for /qvd/list_of_vm)`, EXIT.unreachable);
    if (list.status !== 200) throw failure(list, "to list the desktops", where, bearer);
    if (o.printToken) {
      // With --vm the token is good for that desktop only.
      const bound = o.vm === undefined ? "" : `?vm_id=${(await choose(parseDesktops(list.body, where), who, where, o.vm)).id}`;
      conn.request(`/qvd/create_auth_token${bound}`, auth);
      const t = await finalResponse(conn, "a token", say);
      if (t.status !== 200) throw failure(t, "to create a token", where, bearer);
      let token: unknown;
      try {
        token = JSON.parse(new TextDecoder().decode(t.body)).auth_token;
      } catch {}
      if (typeof token !== "string" || !token.trim()) throw new UserError(`${where} is not a QVD server (no auth_token in its answer)`, EXIT.unreachable);
      process.stdout.write(token.trim() + "\n");
      return EXIT.ok;
    }
    const desktops = parseDesktops(list.body, where);
    const vm = await choose(desktops, who, where, o.vm);
    if (vm.blocked) throw new UserError(`desktop ${describeDesktop(vm)} is blocked (under maintenance)`, EXIT.forbidden);

    // 2. Optionally stop it first.
    if (o.stop) {
      say(`Stopping desktop ${vm.name} (${vm.id})`);
      conn.request(`/qvd/stop_vm?id=${vm.id}`, { ...auth, Connection: "Upgrade", Upgrade: "QVD/1.0" });
      const r = await finalResponse(conn, `to stop desktop ${vm.id}`, say);
      if (r.status === 404) throw new UserError(`no desktop ${vm.id} on ${where} (it was removed)`, EXIT.noDesktop);
      if (r.status === 401 || r.status === 403) throw failure(r, `to stop desktop ${vm.id}`, where, bearer);
      if (r.status !== 200) process.stderr.write(`qvd: warning: the desktop was not stopped: ${r.status} ${r.reason}: ${bodyLine(r.body)}\n`);
    }

    // 3. Connect.
    say(`Connecting to desktop ${vm.name} (${vm.id})`);
    conn.request(`/qvd/connect_to_vm?${connectQuery(vm.id, o)}`, { ...auth, Connection: "Upgrade", Upgrade: "QVD/1.0" });
    const r = await finalResponse(conn, `to start desktop ${vm.id}`, say);
    if (r.status !== 101) {
      if (r.status === 404) throw new UserError(`no desktop ${vm.id} on ${where} (it does not exist any more, or it is blocked)`, EXIT.noDesktop);
      if (r.status === 426) throw new UserError(`${where} requires a more up-to-date client (426 Upgrade Required)`, EXIT.failed);
      throw failure(r, `start desktop ${vm.id}`, where, bearer);
    }
    log.debug("101", { slaveKey: r.headers.has("x-qvd-slave-key") });

    // 4. nxproxy on a local port, spliced with the stream.
    local = listenLocal();
    const argv = [...o.nxproxy, "-S", `localhost:${local.display}`];
    // nxproxy exits 0 even when the session fails; its "Error: …" lines say why.
    const stderrTail: string[] = [];
    const nxErrors: string[] = [];
    try {
      nx = spawnDaemon(argv, {
        env: { ...process.env, NX_CLIENT: process.env.NX_CLIENT ?? "/bin/false" },
        onLine: (line) => {
          log.debug("nxproxy", { line });
          const t = line.trim();
          if (!t) return;
          stderrTail.push(t);
          if (stderrTail.length > 5) stderrTail.shift();
          const e = /^Error: (.*)$/.exec(t);
          if (e) nxErrors.push(e[1]!);
        },
      });
    } catch (err) {
      throw new UserError(`cannot start ${o.nxproxy[0]} (is nxproxy installed?): ${(err as Error).message}`, EXIT.failed);
    }
    const nxReason = () => {
      const why = nxErrors.at(-1) ?? stderrTail.at(-1);
      const x = why && /^Connection to '(.*)' failed/.exec(why);
      return x ? `cannot open the X display ${x[1]} (DISPLAY): ${why}` : why;
    };
    const onSignal = (sig: NodeJS.Signals) => {
      proxy0.kill("SIGTERM");
      conn.close();
      process.exit(sig === "SIGINT" ? 130 : 143);
    };
    const proxy0 = nx;
    process.once("SIGINT", onSignal);
    process.once("SIGTERM", onSignal);
    say(`Connected; nxproxy on display localhost:${local.display} (port ${local.port})`);
    const proxy = nx;
    const nxproxyEnded = (code: number) => {
      const why = nxReason();
      return new UserError(`nxproxy ended (exit ${code}) before connecting${why ? `: ${why}` : ""}`, EXIT.failed);
    };
    const timeoutMs = o.nxproxyTimeoutMs ?? 30_000;
    let timer: Timer | undefined;
    const sock = await Promise.race([
      local.accepted,
      proxy.exited.then(async (code) => {
        await proxy.drained;
        throw nxproxyEnded(code);
      }),
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new UserError(`nxproxy did not connect to localhost:${local!.port} within ${timeoutMs / 1000} s`, EXIT.failed)), timeoutMs);
      }),
    ]).finally(() => clearTimeout(timer));
    local.stop();
    const result = await splice(conn.sock, sock, conn.takeRaw(), conn.isClosed);
    log.debug("session ended", { ...result });
    // The server ended the session: give nxproxy a moment to finish, then end it.
    const code = await Promise.race([proxy.exited, Bun.sleep(5000).then(() => undefined)]);
    if (code === undefined) {
      proxy.kill("SIGTERM");
      await proxy.exited;
      return EXIT.ok;
    }
    await proxy.drained;
    if (result.closedBy === "local" && (code !== 0 || nxErrors.length)) {
      const why = nxReason();
      throw new UserError(`the NX session failed${code ? ` (nxproxy exit ${code})` : ""}${why ? `: ${why}` : ""}`, EXIT.failed);
    }
    say("Session ended");
    return EXIT.ok;
  } finally {
    local?.stop();
    nx?.kill("SIGTERM");
    conn.close();
  }
}
