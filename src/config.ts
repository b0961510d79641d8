// The one configuration schema. Every key the product reads is declared here once, with its
// type, default and a line of documentation. Sources, lowest to highest precedence:
//   built-in default < node.conf (or --config FILE) < DB `configs` (cluster keys only:
//   global scope, then the tenant's) < QVD_* environment < command-line flags.
// Node keys describe one machine and never come from the database; cluster keys should be
// the same on every node and are normally set through the API (the `configs` table).
import { isIP } from "node:net";
import { hostname } from "node:os";
import { existsSync, readFileSync } from "node:fs";
import { z } from "zod";
import { ConfigError } from "./errors.ts";
import { parseDatabaseUrl } from "./db/url.ts";

export type KeyScope = "node" | "cluster";

interface KeyDef<T> {
  type: z.ZodType<T>;
  default: T | undefined;
  doc: string;
  scope: KeyScope;
  secret: boolean;
  /** A tenant may override it in `configs` (cluster keys only; default false: farm-wide). */
  tenant: boolean;
  /**
   * Resolved from the same scope as that key (the farm's, or one tenant's), never mixed: a
   * credential goes only where the scope that chose the destination sends it.
   */
  sameScopeAs?: string;
}

// --- value types: each parses the string form used in files, env and flags -----------------

const str = z.string();
const nonEmpty = z.string().min(1, "must not be empty");
// Decimal digits only ("0x10", "1e2" and "" are not integers here); range errors say so.
const int = (min = 0, max = Number.MAX_SAFE_INTEGER) =>
  z.preprocess(
    (v) => (typeof v === "string" && /^\s*-?\d+\s*$/.test(v) ? Number(v) : v),
    z
      .number({ error: "expected an integer" })
      .int("expected an integer")
      .min(min, `must be at least ${min}`)
      .max(max, `must be at most ${max}`),
  );
const bool = z.preprocess(
  (v) => {
    if (typeof v !== "string") return v;
    const s = v.trim().toLowerCase();
    if (["1", "true", "yes", "on"].includes(s)) return true;
    if (["0", "false", "no", "off"].includes(s)) return false;
    return v;
  },
  z.boolean({ error: "expected a boolean (1/0, true/false, yes/no, on/off)" }),
);
const oneOf = <const T extends readonly [string, ...string[]]>(values: T) =>
  z.enum(values, { error: `expected one of: ${values.join(", ")}` });
/** libpq's URL forms, several hosts included (postgres://a:5432,b:5432/qvd?target_session_attrs=read-write). */
const dbUrl = z.string().superRefine((s, ctx) => {
  try {
    parseDatabaseUrl(s);
  } catch (err) {
    ctx.addIssue({ code: "custom", message: (err as Error).message.replace(/^database\.url: /, "") });
  }
});
const hostPort = z
  .string()
  .regex(/^(\[[0-9a-fA-F:]+\]|[\w.-]*):\d{1,5}$/, "expected ADDRESS:PORT (an empty address means all)");
const cidr = z
  .string()
  .regex(/^(\d{1,3})(\.\d{1,3}){3}\/(\d|[12]\d|3[0-2])$/, "expected an IPv4 network such as 198.18.0.0/16");

// "3030,4100/tcp,53/udp": TCP unless a protocol is given; empty means none.
const portList = z
  .string()
  .regex(/^\s*$|^\s*\d{1,5}(\/(tcp|udp))?(\s*,\s*\d{1,5}(\/(tcp|udp))?)*\s*$/, "expected ports such as 8443,53/udp");
/** Groups that give root or the node's secrets: never a desktop user's, whatever identity.groups.allowed says. */
export const PRIVILEGED_GROUPS = new Set([
  "root",
  "wheel",
  "sudo",
  "admin",
  "adm",
  "shadow",
  "disk",
  "kmem",
  "mem",
  "tty",
  "staff",
  "src",
  "sys",
  "lxd",
  "docker",
  "libvirt",
  "kvm",
  "systemd-journal",
  "utmp",
  "operator",
  "lpadmin",
  "sambashare",
  "netdev",
  "_ssh",
]);

function key<T>(
  type: z.ZodType<T>,
  def: T | undefined,
  doc: string,
  opts: { scope?: KeyScope; secret?: boolean; tenant?: boolean; sameScopeAs?: string } = {},
): KeyDef<T> {
  return {
    type,
    default: def,
    doc,
    scope: opts.scope ?? "node",
    secret: opts.secret ?? false,
    tenant: opts.tenant ?? false,
    ...(opts.sameScopeAs ? { sameScopeAs: opts.sameScopeAs } : {}),
  };
}

// --- the keys ---------------------------------------------------------------------------------

export const KEYS = {
  nodename: key(nonEmpty, hostname(), "Name of this node; the HKD finds its `hosts` row by it."),
  "log.level": key(oneOf(["debug", "info", "warn", "error"]), "info", "Lowest level of log lines written to stderr."),
  "metrics.tls.cert": key(
    str,
    "",
    "PEM certificate of the roles' metrics endpoints (HTTPS); needed when one listens off the loopback.",
  ),
  "metrics.tls.key": key(str, "", "PEM private key of the metrics endpoints.", { secret: true }),
  "l7r.metrics.listen": key(
    str,
    "",
    "host:port of the L7R's Prometheus metrics (GET /metrics; docs/METRICS.md); empty: off. Off the loopback it needs metrics.tls.*.",
  ),
  "hkd.metrics.listen": key(
    str,
    "",
    "host:port of the HKD's Prometheus metrics (GET /metrics; docs/METRICS.md); empty: off. Off the loopback it needs metrics.tls.*.",
  ),
  "api.metrics.listen": key(
    str,
    "",
    "host:port of the API's Prometheus metrics (GET /metrics; docs/METRICS.md); empty: off. Off the loopback it needs metrics.tls.*.",
  ),
  "log.format": key(
    oneOf(["text", "json"]),
    "text",
    "Log lines on stderr: text (`<time> LEVEL [scope] message key=value…`) or json (one object per line: time, level, scope, msg and the line's fields), for log shippers.",
  ),

  "database.url": key(
    dbUrl.optional(),
    undefined,
    "PostgreSQL URL (postgres://user:pass@host:port/db, or ?host=/socket/dir for a unix socket); several hosts for a replicated database: postgres://user:pass@a:5432,b:5432/db?target_session_attrs=read-write.",
    { secret: true },
  ),
  "database.host": key(str, "localhost", "Database host, used when database.url is not set (QVD's classic keys)."),
  "database.port": key(int(1, 65535), 5432, "Database port, used when database.url is not set."),
  "database.name": key(str, "qvd", "Database name, used when database.url is not set."),
  "database.user": key(str, "qvd", "Database user, used when database.url is not set."),
  "database.password": key(str, "", "Database password, used when database.url is not set.", { secret: true }),
  "database.pool_size": key(int(1, 200), 10, "Connections in this process's pool."),
  "database.connect_timeout": key(int(1, 600), 10, "Seconds to wait for a database connection."),

  "path.storage.root": key(
    nonEmpty,
    "/var/lib/qvd/storage",
    "Shared storage: images, basefs, homes, overlays live below it.",
  ),
  "path.storage.images": key(str, "", "Disk image files (default: <root>/images)."),
  "path.storage.homes": key(str, "", "Persistent user homes (default: <root>/homes)."),
  "path.storage.overlays": key(
    str,
    "",
    "Desktops' writable layers (default: <root>/overlays). Overlayfs cannot write to NFS: with a shared root, point this at a local filesystem.",
  ),
  "path.run": key(nonEmpty, "/run/qvd", "Node-local runtime state (locks, sockets, container configs)."),

  "api.listen": key(hostPort, "127.0.0.1:8080", "Address and port the admin API (and the WAT) listen on."),
  "api.tls.cert": key(str, "", "PEM certificate file of the admin API."),
  "api.tls.key": key(str, "", "PEM private key file of the admin API.", { secret: true }),
  "api.session.ttl": key(int(60), 3600, "Seconds of inactivity after which an admin session expires.", {
    scope: "cluster",
  }),
  "api.upload.max_bytes": key(int(1), 64 * 1024 ** 3, "Largest disk image the API accepts in one upload, in bytes."),
  "api.timeout.idle": key(
    int(4, 255),
    60,
    "Seconds a client connection to the API may stay silent before it is closed (event streams send keep-alives more often).",
  ),
  "api.events.max_streams": key(
    int(1, 100000),
    1000,
    "Event streams (GET /events) this API process serves at once; more are answered 503.",
  ),
  "api.events.max_streams_per_admin": key(
    int(1, 10000),
    16,
    "Event streams one administrator may hold open at once (every session and browser tab counts); more are answered 429.",
  ),
  "api.trusted_proxies": key(
    z
      .string()
      .refine(
        (v) =>
          v.trim() === "" ||
          v.split(",").every((x) => isIP(x.trim().split("/")[0]!) !== 0 && /^[^/]+(\/\d{1,3})?$/.test(x.trim())),
        "expected addresses or networks such as 10.0.0.5, 10.1.0.0/16, ::1, comma-separated",
      ),
    "",
    "Reverse proxies in front of the API (addresses or networks, comma-separated): from them the client's address is taken from X-Forwarded-For (the rightmost address that is not a trusted proxy); empty: the socket's address.",
  ),

  "l7r.listen": key(hostPort, ":8443", "Address and port the L7R (user broker) listens on, over TLS."),
  "l7r.listen.unix": key(
    str,
    "",
    "A unix socket the L7R listens on as well, also TLS (empty: none); `qvd demo` relays 127.0.0.1:8443 to it across network namespaces.",
  ),
  "l7r.tls.cert": key(str, "", "PEM certificate file of the L7R."),
  "l7r.tls.key": key(str, "", "PEM private key file of the L7R.", { secret: true }),
  "l7r.tls.client_ca": key(
    str,
    "",
    "PEM CA file: when set, clients must present a certificate signed by it (mutual TLS); empty: no client certificates.",
  ),
  "l7r.timeout.vm_start": key(int(1), 270, "Seconds connect_to_vm waits for a stopped desktop to be running.", {
    scope: "cluster",
  }),
  "l7r.timeout.vm_stop": key(int(1), 270, "Seconds stop_vm waits for the desktop to be stopped.", { scope: "cluster" }),
  "l7r.timeout.x_start": key(
    int(1),
    10,
    "Seconds connect_to_vm waits for nxagent to listen after x_start (not counted while the VMA provisions the user).",
    { scope: "cluster" },
  ),
  "l7r.timeout.nx_handshake": key(
    int(1),
    30,
    "Seconds a client has, after connect_to_vm's 101, to send its NX proxy's greeting (the L7R adds the session's cookie to it before nxagent sees it).",
    { scope: "cluster" },
  ),
  "l7r.timeout.takeover": key(
    int(1),
    30,
    "Seconds a new connection waits for the previous holder of a desktop's session to let it go.",
    { scope: "cluster" },
  ),
  "l7r.timeout.request": key(int(1), 30, "Seconds a client has to send a complete request once it began one."),
  "l7r.timeout.idle": key(int(1), 300, "Seconds an idle client connection (between requests) is kept open."),
  "l7r.timeout.handshake": key(
    int(1),
    10,
    "Seconds a new connection has to complete its TLS handshake (and to send its PROXY header, when one is expected).",
  ),
  "l7r.timeout.first_request": key(
    int(1),
    30,
    "Seconds a new connection has, after its TLS handshake, to send its first complete request.",
  ),
  "l7r.limit.connections": key(int(1), 4096, "Client connections the L7R holds at once (more are closed at once)."),
  "l7r.limit.connections_per_address": key(
    int(1),
    128,
    "Client connections from one address at once (more are closed at once; a NAT puts a whole office behind one address).",
  ),
  "l7r.limit.requests_per_address": key(
    int(1),
    32,
    "Requests from one address being handled at once; more are answered 429.",
  ),
  "l7r.limit.input_bytes": key(
    int(1024),
    65536,
    "Bytes of unhandled input a connection may hold; the socket is not read while a request is being handled, so only a misbehaving client reaches this (it is closed).",
  ),
  "l7r.limit.output_bytes": key(
    int(1024),
    262144,
    "Bytes of answers a connection may hold unsent (a client that does not read); more closes it.",
  ),
  "l7r.web": key(
    bool,
    true,
    "The desktop in a web browser: the L7R serves its page at `/` and browser sessions at `/qvd/web/connect` (src/web/desktop/README.md). Off: both answer 404.",
  ),
  "l7r.web.max_sessions": key(
    int(1, 65536),
    100,
    "Browser sessions this L7R holds at once (each runs an Xvnc and an nxproxy on this node); more are refused with 503.",
  ),
  "l7r.web.uid_base": key(
    int(1000, 2 ** 31 - 65537),
    1600000000,
    "First of the uids browser sessions run as (one per session, base + slot, up to l7r.web.max_sessions): none of them may be a node account's.",
  ),
  "l7r.web.xvnc": key(
    nonEmpty,
    "Xvnc",
    "The X server browser sessions are shown on (TigerVNC's Xvnc: package tigervnc-standalone-server).",
  ),
  "l7r.web.nxproxy": key(nonEmpty, "nxproxy", "The NX proxy that shows a browser session's desktop on its Xvnc."),
  "l7r.proxy_protocol": key(
    oneOf(["off", "v2"]),
    "off",
    "PROXY protocol: v2 makes connections from l7r.proxy_protocol.trusted sources begin with a v2 header naming the real client (a relay or load balancer in front); from any other source a header is refused.",
  ),
  "l7r.proxy_protocol.trusted": key(
    z
      .string()
      .regex(
        /^\s*(unix|[0-9a-fA-F.:]+\/\d{1,3})(\s*,\s*(unix|[0-9a-fA-F.:]+\/\d{1,3}))*\s*$/,
        "expected unix and/or networks such as 10.0.0.0/8, comma-separated",
      ),
    "unix",
    "Sources that must send a PROXY v2 header when l7r.proxy_protocol is v2: `unix` (the l7r.listen.unix socket) and networks in CIDR form, comma-separated.",
  ),

  // User authentication (src/auth/): a tenant's own business, so a tenant may override these
  // (except the login split, used before the tenant is known). LDAP credentials and TLS follow
  // auth.ldap.url's scope: a tenant with its own directory gives its own bind account, the
  // farm's account is never sent to a tenant's server, and a tenant cannot turn off StartTLS
  // towards the farm's.
  "l7r.auth.plugins": key(
    z.string().regex(/^\s*(local|ldap)(\s*,\s*(local|ldap))*\s*$/, "expected a comma-separated list of: local, ldap"),
    "local",
    "Authentication chain of a tenant, in order (e.g. `local,ldap`). The first plugin that knows the user decides; a refusal stops the chain.",
    { scope: "cluster", tenant: true },
  ),
  "l7r.auth.plugin.default.separators": key(
    nonEmpty,
    "@#",
    "Characters that separate the login from the tenant (`alice@acme`); the login is split at the first one found.",
    { scope: "cluster" },
  ),
  "l7r.auth.plugin.default.tenant": key(nonEmpty, "default", "Tenant of a login that names none (multitenant mode).", {
    scope: "cluster",
  }),
  "auth.totp.issuer": key(nonEmpty, "QVD", "Issuer shown by authenticator apps for enrolled TOTP secrets.", {
    scope: "cluster",
    tenant: true,
  }),
  "auth.ldap.url": key(
    str,
    "",
    "LDAP server URL: ldap://host:389 or ldaps://host:636 (empty: the ldap plugin refuses everyone).",
    { scope: "cluster", tenant: true },
  ),
  "auth.ldap.starttls": key(bool, false, "Upgrade an ldap:// connection with StartTLS before binding.", {
    scope: "cluster",
    tenant: true,
    sameScopeAs: "auth.ldap.url",
  }),
  // A file path is the farm's own: a tenant naming node files would make the L7R read them.
  "auth.ldap.ca_file": key(
    str,
    "",
    "PEM file of CA certificate(s) to verify the LDAP server with (default: the system CAs); farm-wide, tenants give auth.ldap.ca.",
    { scope: "cluster", sameScopeAs: "auth.ldap.url" },
  ),
  "auth.ldap.ca": key(
    z
      .string()
      .refine(
        (s) => s === "" || /-----BEGIN CERTIFICATE-----[\s\S]+-----END CERTIFICATE-----/.test(s.replace(/\\n/g, "\n")),
        "expected PEM certificates (-----BEGIN CERTIFICATE----- …)",
      ),
    "",
    "PEM text of CA certificate(s) to verify the LDAP server with, instead of auth.ldap.ca_file (`\\n` may stand for line breaks); what a tenant with its own directory sets.",
    { scope: "cluster", tenant: true, sameScopeAs: "auth.ldap.url" },
  ),
  "auth.ldap.timeout": key(int(1, 600), 10, "Seconds an LDAP connection or operation may take.", {
    scope: "cluster",
    tenant: true,
  }),
  "auth.ldap.bind_dn_template": key(
    str,
    "",
    "Direct bind: the user's DN with %u for the login, e.g. `uid=%u,ou=people,dc=example,dc=org` (takes precedence over the search).",
    { scope: "cluster", tenant: true },
  ),
  "auth.ldap.search_base": key(str, "", "Search-then-bind: where to look for the user's entry.", {
    scope: "cluster",
    tenant: true,
  }),
  "auth.ldap.search_filter": key(
    str,
    "(uid=%u)",
    "Search-then-bind: filter for the user's entry (%u: the login, escaped).",
    { scope: "cluster", tenant: true },
  ),
  "auth.ldap.search_scope": key(
    oneOf(["base", "one", "sub"]),
    "sub",
    "Search-then-bind: scope of the search below auth.ldap.search_base.",
    { scope: "cluster", tenant: true },
  ),
  "auth.ldap.bind_dn": key(str, "", "Search-then-bind: service account DN for the search (empty: anonymous).", {
    scope: "cluster",
    tenant: true,
    sameScopeAs: "auth.ldap.url",
  }),
  "auth.ldap.bind_password": key(str, "", "Search-then-bind: password of auth.ldap.bind_dn.", {
    scope: "cluster",
    secret: true,
    tenant: true,
    sameScopeAs: "auth.ldap.url",
  }),
  "auth.ldap.group_filter": key(
    str,
    "",
    "Users must match this group search to log in, e.g. `(&(cn=vdi)(member=%d))` (%d: the user's DN, %u: the login); empty: no group check.",
    { scope: "cluster", tenant: true },
  ),
  "auth.ldap.group_base": key(
    str,
    "",
    "Base of the group search (default: the dc= suffix of the user's DN, else auth.ldap.search_base).",
    { scope: "cluster", tenant: true },
  ),
  "auth.ldap.attr.uid": key(
    str,
    "uidNumber",
    "Attribute holding the user's numeric uid, passed to the VMA (empty: none).",
    { scope: "cluster", tenant: true },
  ),
  "auth.ldap.attr.gid": key(
    str,
    "gidNumber",
    "Attribute holding the user's numeric gid, passed to the VMA (empty: none).",
    { scope: "cluster", tenant: true },
  ),
  "auth.ldap.attr.home": key(
    str,
    "homeDirectory",
    "Attribute holding the user's home directory, passed to the VMA (empty: none).",
    { scope: "cluster", tenant: true },
  ),
  "auth.autoprovision.enable": key(
    bool,
    false,
    "After a successful external (LDAP) login of a user QVD does not know, create the user (without a password) and a VM.",
    { scope: "cluster", tenant: true },
  ),
  "auth.autoprovision.osf": key(
    str,
    "",
    "Name of the tenant's OSF for auto-provisioned VMs (empty: create the user only).",
    { scope: "cluster", tenant: true },
  ),
  "auth.autoprovision.vm_name": key(
    z.string().min(1).max(60),
    "%u",
    "Name of an auto-provisioned VM (%u: the login).",
    { scope: "cluster", tenant: true },
  ),
  "auth.autoprovision.di_tag": key(
    z.string().regex(/^[^\s,]{1,128}$/, "1 to 128 characters, no spaces or commas"),
    "default",
    "Image tag of auto-provisioned VMs.",
    { scope: "cluster", tenant: true },
  ),
  // Failed-login throttling of the API and the L7R (src/auth/throttle.ts): farm-wide, as a
  // tenant's administrator must not loosen what protects every account.
  "auth.throttle.account.tries": key(
    int(1, 1000),
    5,
    "Failed logins of one account (from any address) before its next tries must wait (from addresses it has not logged in from lately).",
    { scope: "cluster" },
  ),
  "auth.throttle.address.tries": key(
    int(1, 100000),
    20,
    "Failed logins from one client address (any accounts) before its next tries must wait.",
    { scope: "cluster" },
  ),
  "auth.throttle.delay": key(
    int(1, 3600),
    2,
    "Seconds of the first wait (announced as Retry-After); each further failure doubles it.",
    { scope: "cluster" },
  ),
  "auth.throttle.max_delay": key(int(1, 86400), 600, "Longest wait, in seconds, after any number of failures.", {
    scope: "cluster",
  }),
  "auth.throttle.forget": key(
    int(60),
    86400,
    "Seconds without a failure after which an account's or address's failures are forgotten.",
    { scope: "cluster" },
  ),
  "auth.throttle.known_for": key(
    int(0),
    30 * 86400,
    "Seconds an address an account logged in from is not held back by that account's failures (0: never).",
    { scope: "cluster" },
  ),
  // Identity of desktop users (qvd.vm.user.* properties, LDAP attributes), checked by the API, the
  // L7R and the VMA (src/auth/identity.ts). Global only: a tenant's own value is never used.
  "identity.home.base": key(
    z
      .string()
      .regex(/^(\/[A-Za-z0-9_-][A-Za-z0-9_.-]*)+$/, "expected an absolute directory such as /home (not /)")
      .refine((p) => !p.split("/").some((c) => c === "." || c === ".."), "must not contain . or .."),
    "/home",
    "Homes of desktop users must be below this directory.",
    { scope: "cluster" },
  ),
  "identity.uid.min": key(
    int(1000, 4294967294),
    10000,
    "Lowest uid a desktop user may get (never below 1000: system accounts).",
    { scope: "cluster" },
  ),
  "identity.uid.max": key(int(1000, 4294967294), 60000, "Highest uid a desktop user may get.", { scope: "cluster" }),
  "identity.gid.min": key(
    int(1000, 4294967294),
    10000,
    "Lowest primary gid a desktop user may get (never below 1000).",
    { scope: "cluster" },
  ),
  "identity.gid.max": key(int(1000, 4294967294), 60000, "Highest primary gid a desktop user may get.", {
    scope: "cluster",
  }),
  "identity.groups.allowed": key(
    z
      .string()
      .regex(/^\s*([a-z_][a-z0-9_-]{0,31}(\s*,\s*|\s*$))*$/, "expected group names separated by commas")
      .refine(
        (s) => !s.split(",").some((g) => PRIVILEGED_GROUPS.has(g.trim())),
        "names a privileged group (root, shadow, sudo, adm, disk…), which desktop users never get",
      ),
    "audio,video,plugdev,users",
    "Supplementary groups qvd.vm.user.groups may name (privileged groups such as root, shadow, sudo, adm, disk are refused).",
    { scope: "cluster" },
  ),

  "hkd.max_starting": key(
    int(1, 1000),
    4,
    "Desktops a node starts at once; further start commands wait in order (their users are told their place in the queue).",
  ),
  "hkd.fence_after": key(
    int(5),
    120,
    "Seconds without the database after which a node stops its own VMs; must be less than cluster.lost_after.",
    { scope: "cluster" },
  ),
  "hkd.poll_interval": key(
    int(1),
    30,
    "Seconds between fallback polls for commands (notifications are the fast path).",
    { scope: "cluster" },
  ),
  "hkd.heartbeat_interval": key(
    int(1, 3600),
    10,
    "Seconds between heartbeats of a node (also how often it reports free RAM and CPU).",
  ),
  "hkd.timeout.vma_start": key(
    int(1),
    90,
    "Seconds a started desktop has for its VMA to answer before the start fails.",
    { scope: "cluster" },
  ),
  "hkd.timeout.poweroff": key(
    int(1),
    30,
    "Seconds a desktop has to power off when asked, before it is stopped by force.",
    { scope: "cluster" },
  ),
  "hkd.timeout.kill": key(int(1), 15, "Seconds the backend's stop may take before the desktop is killed.", {
    scope: "cluster",
  }),
  "hkd.vma_check_interval": key(int(1), 30, "Seconds between checks that a running desktop's VMA answers.", {
    scope: "cluster",
  }),
  "hkd.vma_failures": key(int(1), 4, "Consecutive failed VMA checks after which a running desktop is stopped.", {
    scope: "cluster",
  }),
  "hkd.zombie_retry": key(
    int(1, 3600),
    30,
    "Seconds before a node retries the teardown of a desktop whose stop failed (a zombie); each further failure doubles the wait, up to an hour.",
    { scope: "cluster" },
  ),
  "hkd.on_shutdown": key(
    oneOf(["stop", "leave"]),
    "stop",
    "What a node does with its desktops when its HKD stops: stop them, or leave them running (adopted at the next start).",
  ),
  "hkd.qvd_binary": key(
    str,
    "",
    "The qvd binary bind-mounted into desktops (default: this binary, when it is the compiled qvd).",
  ),
  "vm.vma.port": key(int(1, 65535), 3030, "Port the VMA listens on in each desktop.", { scope: "cluster" }),
  "cluster.lost_after": key(
    int(10),
    300,
    "Seconds without a heartbeat after which another node declares a node lost and releases its VMs (a node declares nothing until its own database connection has worked this long); must be more than hkd.fence_after.",
    { scope: "cluster" },
  ),
  "cluster.alive_within": key(
    int(5, 3600),
    30,
    "Seconds since its last heartbeat within which a node counts as alive and is given new desktops (every caller of placement uses this one window); keep it above a few hkd.heartbeat_interval.",
    { scope: "cluster" },
  ),
  "cluster.tls.ca": key(
    str,
    "",
    "PEM file of the farm CA (`qvd farm ca`): node certificates are checked against it, both ways, on the node-to-node TLS endpoint. `qvd node` and `qvd l7r` refuse to run without it.",
  ),
  "cluster.tls.cert": key(
    str,
    "",
    "PEM file of this node's farm certificate (`qvd farm cert`: CN = nodename, signed by cluster.tls.ca).",
  ),
  "cluster.tls.key": key(str, "", "PEM file of the private key of cluster.tls.cert.", { secret: true }),
  "cluster.peer.port": key(
    int(0, 65535),
    8442,
    "Port of the node-to-node TLS endpoint, through which another node's L7R reaches this node's desktops (the VMA calls and the NX stream); 0 takes any free port (a lone node's tests: no other node could find it).",
    { scope: "cluster" },
  ),
  "cluster.peer.listen": key(
    z
      .string()
      .refine(
        (v) => v === "" || isIP(v.replace(/^\[|\]$/g, "")) !== 0,
        "expected an IP address (empty: the node's hosts.address)",
      ),
    "",
    "Address the node-to-node endpoint listens on (default: this node's hosts.address, where other nodes reach it).",
  ),
  "cluster.peer.limit.connections": key(
    int(1),
    1024,
    "Connections from other nodes the node-to-node endpoint holds at once (more are closed at once).",
  ),

  "wat.multitenant": key(bool, false, "Multitenant mode: tenants and per-tenant administrators.", { scope: "cluster" }),
  "model.user.login.case-sensitive": key(bool, false, "Whether user and administrator names are case-sensitive.", {
    scope: "cluster",
  }),

  // Farm-wide unless marked `tenant: true` (the L7R's and HKD's timeouts, the network, the
  // cluster's timing): a node reads them once for every tenant, and they shape shared resources.
  "osf.default.memory": key(int(16), 1024, "RAM in MiB of a new OSF when none is given.", {
    scope: "cluster",
    tenant: true,
  }),
  "vm.network.range": key(cidr, "198.18.0.0/16", "Network from which VM addresses are allocated.", {
    scope: "cluster",
  }),
  "vm.network.gateway": key(str, "", "Gateway address given to VMs (default: the first address of the range).", {
    scope: "cluster",
  }),
  "vm.network.bridge": key(nonEmpty, "qvdnet0", "Bridge the VMs' network devices are attached to.", { scope: "node" }),
  "vm.network.mac.prefix": key(
    z.string().regex(/^[0-9a-f]{2}:[0-9a-f]{2}:[0-9a-f]{2}$/i, "expected three hex octets such as 54:52:00"),
    "54:52:00",
    "First three octets of VM MAC addresses (the rest comes from the IP).",
    { scope: "cluster" },
  ),
  "vm.network.bridge.create": key(
    bool,
    true,
    "Create the bridge when it is missing and give it the gateway address (off: it must already exist, and is left as it is).",
    { scope: "node" },
  ),
  "vm.network.firewall.enable": key(
    bool,
    true,
    "Install the nftables rules (tables `inet qvd` and `bridge qvd`) that confine VMs.",
    { scope: "node" },
  ),
  "vm.network.firewall.node_ports": key(
    portList,
    "",
    "Ports on this node that VMs may open connections to, e.g. `8443,53/udp` (default: none; replies to the node's own connections always pass).",
  ),
  "vm.network.firewall.vm_ports": key(
    portList,
    "",
    "Ports of VMs that other hosts may reach, routed through this node and masqueraded to its bridge address (default: none; the node itself reaches VMs, and nxagent takes only the node's address). Another node's L7R reaches this node's desktops through its node-to-node TLS endpoint (cluster.peer.*), so a farm leaves this empty.",
  ),
  "vm.network.firewall.outbound": key(
    bool,
    true,
    "Let VMs open connections beyond the node (routed by the node; NAT is the administrator's business). Never to other VMs or to the node.",
  ),
  "vm.lxc.path": key(str, "", "Directory of the LXC container configurations (default: <path.run>/lxc)."),
  "vm.lxc.vma_init": key(
    bool,
    true,
    "The VMA is the container's init (the bind-mounted qvd binary runs `vma`). Off: the image's own init (vm.lxc.init) runs and must start `qvd vma` itself.",
  ),
  "vm.lxc.init": key(nonEmpty, "/sbin/init", "The image's init, used when vm.lxc.vma_init is off."),
  "vm.lxc.guest_qvd_path": key(
    z.string().regex(/^\/[^\s]+$/, "expected an absolute path without spaces"),
    "/usr/local/bin/qvd",
    "Where the qvd binary appears (read-only) inside LXC guests.",
  ),
  "vm.lxc.halt_signal": key(
    str,
    "",
    "Signal lxc-stop sends to the container's init to shut it down (default: SIGTERM when the VMA is init, SIGRTMIN+3 for an image's own init such as systemd).",
  ),
  "vm.lxc.apparmor.profile": key(
    str,
    "",
    "AppArmor profile of containers (default: `generated` where AppArmor is enabled, else `unconfined`).",
  ),
  "vm.lxc.conf.extra": key(str, "", "Extra lines appended to every container configuration (`\\n` separates lines)."),
  "vm.lxc.idmap.base": key(
    int(1),
    100000,
    "First node uid/gid of the subordinate range desktops run in: container root is this uid on the node, guest uid N is base+N. Image files (basefs), overlays and homes on shared storage are owned by shifted ids, so every node sharing that storage must use the same base and size. At least vm.lxc.idmap.size, and not a range used by node accounts.",
  ),
  "vm.lxc.idmap.size": key(
    int(65536, 1 << 30),
    65536,
    "Number of ids in the desktops' range (guest uids and gids 0 … size-1; 65536 covers nobody/nogroup).",
  ),
  "di.build.mirror": key(
    str,
    "",
    "Debian mirror `qvd di build` installs from (default: the first Debian mirror of this machine's apt sources, else http://deb.debian.org/debian).",
  ),
  "di.build.cache": key(
    nonEmpty,
    "/var/cache/qvd/debootstrap",
    "Where `qvd di build` keeps downloaded packages and finished images between builds.",
  ),
  "vm.hypervisor": key(
    z.string().regex(/^\s*(lxc|kvm)(\s*,\s*(lxc|kvm))?\s*$/, "expected lxc, kvm or lxc,kvm"),
    "lxc",
    "Backends this node runs desktops with: lxc, kvm, or both (`lxc,kvm`). A backend that cannot run here (its probe fails) is left out with a warning; the node refuses to start when none is left. Placement gives a node only desktops of an OSF whose hypervisor it runs.",
    { scope: "node" },
  ),
  "vm.kvm.accel": key(
    oneOf(["kvm", "tcg", "auto"]),
    "auto",
    "QEMU acceleration: kvm, tcg (software emulation, slow), or auto: kvm when a short real run under /dev/kvm works, else tcg (the node's log and its hosts row say which and why).",
    { scope: "node" },
  ),
  "vm.kvm.path": key(
    str,
    "",
    "Directory of the VMs' node-local state: QMP sockets, pid files, the guests' serial consoles under logs/ (default: <path.run>/kvm).",
  ),
  "vm.kvm.qemu": key(nonEmpty, "qemu-system-x86_64", "The QEMU system emulator.", { scope: "node" }),
  "vm.kvm.qemu_img": key(nonEmpty, "qemu-img", "qemu-img, for overlays, home disks and image checks.", {
    scope: "node",
  }),
  "vm.kvm.uid_base": key(
    int(1),
    200000,
    "QEMU drops to uid and gid base+<vm id> once the VM's devices are open (-runas), so no two desktops' QEMUs share an id. Keep the range clear of node accounts and of vm.lxc.idmap.*.",
    { scope: "node" },
  ),
  "vm.kvm.machine": key(nonEmpty, "q35", "QEMU machine type.", { scope: "node" }),
  "vm.kvm.cmdline": key(
    str,
    "console=ttyS0 quiet",
    "Kernel command line of the guests, after root=/dev/vda rw (QEMU boots the image's /vmlinuz and /initrd.img directly).",
  ),
  "vm.kvm.args.extra": key(str, "", "Extra QEMU arguments for every VM, split on spaces."),

  // The VMA (`qvd vma`, inside the guest). It reads no database: these come from /etc/qvd/vma.conf
  // in the image, QVD_VMA_* variables, `--set`, or the `settings` object of /run/qvd/vma.json.
  "vma.display": key(
    int(1, 999),
    100,
    "X display number of the NX session; nxagent listens for the client's NX proxy on TCP 4000 + display.",
  ),
  "vma.command.nxagent": key(nonEmpty, "/usr/bin/nxagent", "The nxagent binary (the X server of the session)."),
  "vma.command.xinit": key(nonEmpty, "xinit", "The xinit binary that starts the session under nxagent."),
  "vma.nxagent.args.extra": key(str, "", "Extra nxagent arguments, split on spaces, appended after the standard ones."),
  "vma.nxagent.tolerancechecks": key(
    oneOf(["strict", "safe", "risky", "bypass"]),
    "risky",
    "nxagent `tolerancechecks=` option (how strictly it checks the client proxy version).",
  ),
  "vma.session.command": key(
    str,
    "",
    "The session xinit runs as the user (default: /usr/local/bin/qvd-session if it exists, else /etc/X11/Xsession).",
  ),
  "vma.session.as_current_user": key(
    bool,
    false,
    "TEST AID: no provisioning; run the session as the VMA's own user (host tests without root's consent to new accounts).",
  ),
  "vma.provision.root": key(
    nonEmpty,
    "/",
    'Filesystem root for user provisioning and homes (useradd/groupadd --root); not "/" only in tests.',
  ),
  "vma.user.home.path": key(nonEmpty, "/home", "Directory under which users' homes are (a home is <path>/<user>)."),
  "vma.user.shell": key(nonEmpty, "/bin/bash", "Login shell of provisioned users."),
  "vma.user.groups": key(
    str,
    "",
    "Comma-separated supplementary groups for provisioned users (must exist in the image; the original used qvduser).",
  ),
  "vma.default.lang": key(str, "en_US.UTF-8", "LANG of the session when the image's locale files set none."),
  "vma.timeout.starting": key(
    int(1),
    20,
    "Seconds nxagent may take from x_start to listening before it is terminated (the original's nxagent `initiating` timeout, which it never applied).",
  ),
  "vma.timeout.listening": key(
    int(1),
    10,
    "Seconds the client's NX proxy has to connect once nxagent listens; then the session is terminated.",
  ),
  "vma.timeout.suspending": key(int(1), 20, "Seconds nxagent may stay suspending before it is terminated."),
  "vma.timeout.stopping": key(
    int(1),
    20,
    "Seconds nxagent may take to terminate after SIGTERM before it (and the session) get SIGKILL.",
  ),
  "vma.poweroff.command": key(
    str,
    "",
    "Command the poweroff method runs after stopping the session when the VMA is not PID 1 (e.g. `poweroff` when the image's own init started the VMA); empty: the VMA just exits (as PID 1 that stops the container).",
  ),
  "vma.on_action.expire": key(
    str,
    "",
    "Program run on the expire method, after the built-in notice and once per expiry setting (arguments: vm.expiration.soft <ISO time> vm.expiration.hard <ISO time or empty> qvd.vm.session.state <state> qvd.hook.on_action expire).",
  ),
  "vma.command.pulseaudio": key(
    nonEmpty,
    "/usr/bin/pulseaudio",
    "The PulseAudio daemon the VMA starts as the user for the session's sound (tunnel sink to the client through nxagent's multimedia channel).",
  ),
  "vma.command.pactl": key(
    nonEmpty,
    "/usr/bin/pactl",
    "pactl, which the VMA runs as the user to load and unload the sound tunnel in a running PulseAudio.",
  ),
  // Session services (src/vma/services.ts). Each also needs the administrator's property (qvd.vm.printing.enable,
  // qvd.vm.audio.enable, qvd.vm.shares.enable / qvd.vm.usb.enable) not off and the client to ask.
  "vma.printing.enable": key(
    bool,
    true,
    "Printing to the client's printers through nxagent's CUPS channel (cups=<display+2000>), as QVD-<name> queues of a per-session CUPS run as the user.",
  ),
  "vma.audio.enable": key(
    bool,
    true,
    "Sound to the client through nxagent's multimedia channel (media=1): a PulseAudio run as the user with a tunnel sink.",
  ),
  "vma.audio.latency_msec": key(
    int(10, 2000),
    60,
    "Milliseconds of sound the session's tunnel keeps queued toward the client: lower is more immediate, higher survives a jittery link without gaps (PulseAudio's own default, about 200).",
  ),
  "vma.slave.enable": key(
    bool,
    true,
    "nxagent's slave channel (slave=1) for shared folders, opening a client's file and USB/IP (qvd vma-slave).",
  ),
  "vma.command.sshfs": key(
    nonEmpty,
    "sshfs",
    "sshfs, which the VMA runs as the user on a FUSE mount it made, for a client's shared folder (src/vma/shares.ts).",
  ),
  "vma.command.sftp_server": key(
    nonEmpty,
    "/usr/lib/openssh/sftp-server",
    "sftp-server, run as the user for a desktop folder the client asks for (the slave channel's GET /shares).",
  ),
  "vma.command.xdg_open": key(
    nonEmpty,
    "xdg-open",
    "The program that opens a client's file in the session (the slave channel's POST /open).",
  ),
  "vma.command.cupsd": key(
    nonEmpty,
    "/usr/sbin/cupsd",
    "The CUPS scheduler the VMA starts as the user for the session's printers.",
  ),
  "vma.command.lpadmin": key(
    nonEmpty,
    "/usr/sbin/lpadmin",
    "lpadmin, run as the user to add and delete the session's QVD-* printers.",
  ),
  "vma.command.lpstat": key(
    nonEmpty,
    "/usr/bin/lpstat",
    "lpstat, run as the user to list the client's printers through the CUPS channel and the session's own.",
  ),
  "vma.command.xmessage": key(
    str,
    "/usr/bin/xmessage",
    "The program that shows the user the soft-expiry notice in the X session (xmessage's options); empty: no built-in notice, only vma.on_action.expire.",
  ),
} as const satisfies Record<string, KeyDef<any>>;

export type ConfigKey = keyof typeof KEYS;
export type ConfigValues = { [K in ConfigKey]: (typeof KEYS)[K] extends KeyDef<infer T> ? T : never };

export const isConfigKey = (k: string): k is ConfigKey => Object.hasOwn(KEYS, k);

/** Where an effective value came from, for `qvd config show` and error messages. */
export type Source =
  | { kind: "default" }
  | { kind: "file"; file: string; line: number }
  | { kind: "db"; tenantId: number }
  | { kind: "env"; name: string }
  | { kind: "flag"; flag: string };

export function describeSource(s: Source): string {
  switch (s.kind) {
    case "default":
      return "default";
    case "file":
      return `${s.file}:${s.line}`;
    case "db":
      return s.tenantId === 0 ? "database (global)" : `database (tenant ${s.tenantId})`;
    case "env":
      return `environment ${s.name}`;
    case "flag":
      return `flag ${s.flag}`;
  }
}

// --- parsing ------------------------------------------------------------------------------------

/** Environment variable for a key: QVD_ + upper case, dots and dashes as underscores. */
export const envName = (k: string) => "QVD_" + k.toUpperCase().replace(/[.-]/g, "_");
const ENV_TO_KEY = new Map<string, ConfigKey>(Object.keys(KEYS).map((k) => [envName(k), k as ConfigKey]));
/**
 * The QVD_* variables that are not configuration keys: the client's and the admin CLI's, and a
 * few of the processes' own. Every other QVD_* variable names a key (and a misspelt one is an
 * error), so a user who exports their client's variables can still run `qvd node` in that shell.
 * No key may take one of these names (checked below, at load).
 */
export const NON_KEY_ENV: Readonly<Record<string, string>> = {
  QVD_CONFIG: "the configuration file (every role)",
  QVD_DEBUG: "stack traces of internal errors (every role)",
  QVD_PASSWORD: "qvd client: the user's password",
  QVD_TOKEN: "qvd client: an authentication token instead of a password",
  QVD_ADMIN_URL: "qvd admin: the API's URL",
  QVD_ADMIN_TOKEN: "qvd admin: the administrator's token",
  QVD_ADMIN_CA: "qvd admin: the CA that signed the API's certificate",
  QVD_ADMIN_INSECURE: "qvd admin: do not verify the API's certificate",
  QVD_PARENT_PID: "set by qvd node for its children",
  QVD_SLAVE_CMD: "set by the VMA in desktop sessions (nxagent's slave handler)",
};
const ENV_NOT_KEYS = new Set(Object.keys(NON_KEY_ENV));
for (const name of ENV_NOT_KEYS)
  if (ENV_TO_KEY.has(name))
    throw new Error(`configuration key ${ENV_TO_KEY.get(name)} clashes with the variable ${name}`);

function closestKey(k: string): string | undefined {
  let best: string | undefined;
  let bestD = Infinity;
  for (const cand of Object.keys(KEYS)) {
    const d = editDistance(k, cand);
    if (d < bestD) [best, bestD] = [cand, d];
  }
  return bestD <= Math.max(2, Math.floor(k.length / 4)) ? best : undefined;
}

function editDistance(a: string, b: string): number {
  const row = Array.from({ length: b.length + 1 }, (_, i) => i);
  for (let i = 1; i <= a.length; i++) {
    let prev = row[0]!;
    row[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const tmp = row[j]!;
      row[j] = Math.min(row[j]! + 1, row[j - 1]! + 1, prev + (a[i - 1] === b[j - 1] ? 0 : 1));
      prev = tmp;
    }
  }
  return row[b.length]!;
}

function unknownKey(where: string, k: string): ConfigError {
  const hint = closestKey(k);
  return new ConfigError(`${where}: unknown key "${k}"${hint ? ` (did you mean "${hint}"?)` : ""}`);
}

/** Parses one raw string value for a key, or throws a one-line error prefixed with `where`. */
export function parseValue<K extends ConfigKey>(k: K, raw: string, where: string): ConfigValues[K] {
  const res = KEYS[k].type.safeParse(raw);
  if (!res.success) {
    const issue = res.error.issues[0];
    const shown = KEYS[k].secret ? "" : `, got ${JSON.stringify(raw)}`;
    throw new ConfigError(`${where}: ${k}: ${issue?.message ?? "invalid value"}${shown}`);
  }
  return res.data as ConfigValues[K];
}

export interface RawSetting {
  key: string;
  value: string;
  source: Source;
}

/** Reads a node.conf file: `key = value` lines, `#` comments, blank lines. */
export function readConfigFile(file: string): RawSetting[] {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const why =
      code === "ENOENT"
        ? "no such file"
        : code === "EACCES"
          ? "permission denied"
          : code === "EISDIR"
            ? "is a directory"
            : (err as Error).message;
    throw new ConfigError(`${file}: cannot read configuration: ${why}`);
  }
  const out: RawSetting[] = [];
  text.split(/\r?\n/).forEach((rawLine, i) => {
    const line = rawLine.trim();
    if (line === "" || line.startsWith("#")) return;
    const eq = line.indexOf("=");
    if (eq <= 0)
      throw new ConfigError(`${file}:${i + 1}: expected "key = value", got ${JSON.stringify(line.slice(0, 60))}`);
    out.push({
      key: line.slice(0, eq).trim(),
      value: line.slice(eq + 1).trim(),
      source: { kind: "file", file, line: i + 1 },
    });
  });
  return out;
}

function whereOf(s: Source): string {
  switch (s.kind) {
    case "file":
      return `${s.file}:${s.line}`;
    case "env":
      return `environment ${s.name}`;
    case "flag":
      return s.flag;
    case "db":
      return s.tenantId === 0 ? "database configs (global)" : `database configs (tenant ${s.tenantId})`;
    case "default":
      return "default";
  }
}

// --- relations between keys -------------------------------------------------------------------

/**
 * Pairs of keys whose values must keep an order, checked wherever an effective configuration
 * is built (files, environment, flags, the database) and when the API stores a value.
 */
export const KEY_RELATIONS: { less: ConfigKey; than: ConfigKey; why: string }[] = [
  // Other nodes may start a lost node's desktops: it must have stopped them itself by then.
  {
    less: "hkd.fence_after",
    than: "cluster.lost_after",
    why: "a node cut off from the database must stop its desktops before other nodes may declare it lost and start them elsewhere",
  },
];

/** The first broken relation of `cfg`, as a one-line message naming both keys and their sources. */
export function relationProblem(cfg: Pick<Config, "get" | "source">): string | undefined {
  for (const r of KEY_RELATIONS) {
    const [a, b] = [cfg.get(r.less) as number, cfg.get(r.than) as number];
    if (a < b) continue;
    return `${r.less} (${a}, ${describeSource(cfg.source(r.less))}) must be less than ${r.than} (${b}, ${describeSource(cfg.source(r.than))}): ${r.why}`;
  }
  return undefined;
}

// --- the effective configuration ---------------------------------------------------------------

export class Config {
  private readonly values = new Map<ConfigKey, unknown>();
  private readonly sources = new Map<ConfigKey, Source>();

  /**
   * @param base settings from the config file (below the database)
   * @param top settings from the environment and flags (above the database)
   */
  constructor(
    private readonly base: RawSetting[] = [],
    private readonly top: RawSetting[] = [],
    db: RawSetting[] = [],
    /** Off only to show stored values as they are (GET /configs), so a bad pair can be fixed. */
    checkRelations = true,
  ) {
    for (const [k, d] of Object.entries(KEYS) as [ConfigKey, KeyDef<unknown>][]) {
      this.values.set(k, d.default);
      this.sources.set(k, { kind: "default" });
    }
    const all = [...base, ...db, ...top];
    for (const s of all) this.apply(s);
    for (const [k, d] of Object.entries(KEYS) as [ConfigKey, KeyDef<unknown>][])
      if (d.sameScopeAs) this.followScope(k, d.sameScopeAs as ConfigKey, all);
    if (checkRelations) {
      const problem = relationProblem(this);
      if (problem) throw new ConfigError(problem);
    }
  }

  /**
   * Re-resolves `k` from only the settings of the scope that decided `anchor`: that tenant's
   * rows when a tenant's row won, else the farm's layers (file, global rows, env, flags); the
   * default when that scope has none.
   */
  private followScope(k: ConfigKey, anchor: ConfigKey, all: RawSetting[]): void {
    const tenantOf = (s: Source) => (s.kind === "db" ? s.tenantId : 0);
    const scope = tenantOf(this.sources.get(anchor)!);
    const own = all.filter((s) => s.key === k && tenantOf(s.source) === scope).pop();
    this.values.set(k, own ? parseValue(k, own.value, whereOf(own.source)) : KEYS[k].default);
    this.sources.set(k, own ? own.source : { kind: "default" });
  }

  private apply(s: RawSetting): void {
    const where = whereOf(s.source);
    if (!isConfigKey(s.key)) throw unknownKey(where, s.key);
    if (s.source.kind === "db" && KEYS[s.key].scope !== "cluster")
      throw new ConfigError(`${where}: ${s.key} is a node setting and cannot be set in the database`);
    this.values.set(s.key, parseValue(s.key, s.value, where));
    this.sources.set(s.key, s.source);
  }

  get<K extends ConfigKey>(k: K): ConfigValues[K] {
    return this.values.get(k) as ConfigValues[K];
  }

  source(k: ConfigKey): Source {
    return this.sources.get(k)!;
  }

  /**
   * A copy with rows of the `configs` table layered in, below env and flags and above the
   * file. Rows of tenant 0 are the global scope; a tenant's own rows win over them. Unknown
   * keys and node keys in the table are skipped with a warning (a newer node may know them),
   * and so are a tenant's rows of keys a tenant may not override.
   */
  withDatabase(
    rows: { tenantId: number; key: string; value: string }[],
    warn: (msg: string) => void = () => {},
    opts: { checkRelations?: boolean } = {},
  ): Config {
    const ordered = [...rows].sort((a, b) => Number(a.tenantId !== 0) - Number(b.tenantId !== 0));
    const db: RawSetting[] = [];
    for (const r of ordered) {
      if (!isConfigKey(r.key) || KEYS[r.key].scope !== "cluster") {
        warn(`ignoring database config ${r.key}: ${isConfigKey(r.key) ? "it is a node setting" : "unknown key"}`);
        continue;
      }
      if (r.tenantId !== 0 && !KEYS[r.key].tenant) {
        warn(`ignoring database config ${r.key} of tenant ${r.tenantId}: tenants may not override it`);
        continue;
      }
      db.push({ key: r.key, value: r.value, source: { kind: "db", tenantId: r.tenantId } });
    }
    return new Config(this.base, this.top, db, opts.checkRelations ?? true);
  }

  /** The string form of an effective value (as a file would hold it). */
  rawOf(k: ConfigKey): string {
    const v = this.values.get(k);
    if (v === undefined) return "";
    return typeof v === "boolean" ? (v ? "1" : "0") : String(v);
  }

  /** Every key with its effective value (secrets masked) and its source. */
  describe(): { key: ConfigKey; value: string; source: string; doc: string; scope: KeyScope; tenant: boolean }[] {
    return (Object.keys(KEYS) as ConfigKey[]).map((k) => {
      const d = KEYS[k] as KeyDef<unknown>;
      const v = this.values.get(k);
      const value = v === undefined ? "(unset)" : d.secret && this.rawOf(k) !== "" ? "********" : this.rawOf(k);
      return {
        key: k,
        value,
        source: describeSource(this.sources.get(k)!),
        doc: d.doc,
        scope: d.scope,
        tenant: d.tenant,
      };
    });
  }

  /** The database URL: `database.url`, else built from QVD's classic `database.*` keys. */
  databaseUrl(): string {
    const u = this.get("database.url");
    if (u) return u;
    const enc = encodeURIComponent;
    const pass = this.get("database.password");
    const host = this.get("database.host");
    // A socket directory goes into ?host= (libpq's form); an IPv6 address needs brackets.
    const [h, query] = host.startsWith("/")
      ? ["localhost", `?host=${enc(host)}`]
      : [host.includes(":") && !host.startsWith("[") ? `[${host}]` : host, ""];
    return `postgres://${enc(this.get("database.user"))}${pass ? ":" + enc(pass) : ""}@${h}:${this.get("database.port")}/${enc(this.get("database.name"))}${query}`;
  }

  /** A storage sub-path, defaulting to a folder below path.storage.root. */
  storagePath(k: "path.storage.images" | "path.storage.homes" | "path.storage.overlays"): string {
    return this.get(k) || `${this.get("path.storage.root")}/${k.split(".").pop()}`;
  }
}

export const DEFAULT_CONFIG_FILE = "/etc/qvd/node.conf";

export interface LoadOptions {
  /** --config FILE; when absent, QVD_CONFIG or /etc/qvd/node.conf if it exists. */
  file?: string;
  env?: Record<string, string | undefined>;
  /** Flag settings, in command-line order: the flag as typed and the key it sets. */
  flags?: { flag: string; key: string; value: string }[];
  /** Test hook: whether the default file exists (default: checks the filesystem). */
  defaultFileExists?: (f: string) => boolean;
  /** Keeps only the file's settings it returns true for (the VMA: keys an image may not set). */
  fileFilter?: (s: RawSetting) => boolean;
}

/** Builds the node-side configuration (without database values). */
export function loadConfig(opts: LoadOptions = {}): Config {
  const env = opts.env ?? process.env;
  const explicit = opts.file ?? env.QVD_CONFIG;
  const exists = opts.defaultFileExists ?? existsSync;
  const fileLayer = (
    explicit ? readConfigFile(explicit) : exists(DEFAULT_CONFIG_FILE) ? readConfigFile(DEFAULT_CONFIG_FILE) : []
  ).filter(opts.fileFilter ?? (() => true));

  const envLayer: RawSetting[] = [];
  for (const [name, value] of Object.entries(env)) {
    if (!name.startsWith("QVD_") || ENV_NOT_KEYS.has(name) || value === undefined) continue;
    const k = ENV_TO_KEY.get(name);
    if (!k) {
      const guess = name.slice(4).toLowerCase().replace(/_/g, ".");
      throw unknownKey(`environment ${name}`, guess);
    }
    envLayer.push({ key: k, value, source: { kind: "env", name } });
  }
  const flagLayer: RawSetting[] = (opts.flags ?? []).map((f) => ({
    key: f.key,
    value: f.value,
    source: { kind: "flag", flag: f.flag },
  }));
  return new Config(fileLayer, [...envLayer, ...flagLayer]);
}
