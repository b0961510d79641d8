// The NX session in the guest: nxagent as the X server of `xinit <session>`, run as the user,
// and the state machine driven by nxagent's output (src/vma/README.md, "The session"; the original's VMA.pm).
//
//   xinit /bin/sh -c 'exec "$@" >>"$HOME/.qvd-session.log" 2>&1' qvd-session <session…> --
//         nxagent :100 -ac -name QVD -display nx/nx,options=<run>/nxagent.conf:100 [extra]
//
// prefixed with `setpriv --reuid UID --regid GID --groups|--clear-groups` unless the session
// runs as the VMA's own user (test aid). nxagent listens for the client's NX proxy on TCP
// 4000 + display (4100), and takes only a proxy that presents the session's cookie (x_start's,
// src/nx/handshake.ts) from the node's address (accept=). It is a child of xinit, never PID 1.
//
// nxagent output → NX state → the state the VMA reports (x_state):
//   "Session: Starting session at …"   starting   → starting, then listening once nxagent
//   "Session: Resuming session at …"   resuming     printed "Info: Waiting for connection …"
//   "Session: Session started at …"    started    → connected
//   "Session: Session resumed at …"    resumed    → connected
//   "Session: Suspending session at …" suspending → suspending
//   "Session: Session suspended at …"  suspended  → suspended
//   "Session: Terminating|Aborting session at …" → stopping
//   "Session: Session terminated|aborted at …"   → stopping until xinit has exited, then stopped
// Differences from the original, on purpose:
//   - listening is reported only once nxagent's socket is open ("Waiting for connection"), not
//     at "Starting session", so the L7R never connects before nxagent listens;
//   - timeouts are enforced by timers, not only when somebody polls x_state, and the
//     starting timeout (the original's never-applied `initiating` one) does apply;
//   - a session still stopping after its timeout is killed (SIGKILL), not signalled again;
//   - the session's own output goes to ~/.qvd-session.log, so programs in it cannot print
//     "Session: …" lines that would fake nxagent's state.
import {
  appendFileSync,
  chmodSync,
  chownSync,
  existsSync,
  mkdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { constants as osConstants } from "node:os";
import { join } from "node:path";
import { UserError } from "../errors.ts";
import { logger } from "../log.ts";
import { spawnDaemon, type Daemon, type RunResult } from "../run.ts";
import { defaultIdentityRules, type IdentityRules } from "../auth/identity.ts";
import { checkIdentity, provision, readEnvFiles, readPasswd, underRoot, type Account } from "./provision.ts";
import type { Prepared, ServiceContext, SessionService } from "./services.ts";

const log = logger("vma.session");

/** nxagent's and xinit's lines worth a post-mortem at the default level: session states, errors. */
// Also the slave handlers' (qvd vma-slave, its shell wrapper) failures: they write to nxagent's stderr.
const NOTABLE_LINE =
  /^(Session: |Error|Warning: Signal|xinit: |error: )|PANIC|[Aa]borting|fatal| (WARN|ERROR) \[|execv|^qvd-slave: /;

export const X_STATES = [
  "stopped",
  "starting",
  "provisioning",
  "listening",
  "connected",
  "suspending",
  "suspended",
  "stopping",
] as const;
export type XState = (typeof X_STATES)[number];

export interface SessionParams {
  user: string;
  uid: number;
  gid: number;
  home?: string;
  keyboard?: string;
  client_os?: string;
  link?: string;
  geometry?: string;
  fullscreen?: boolean;
  properties?: Record<string, string | number | boolean>;
  /** The NX cookie nxagent demands of the connecting proxy (src/nx/handshake.ts); x_start requires it. */
  cookie?: string;
}

export interface SessionOptions {
  display: number;
  nxagent: string;
  xinit: string;
  nxagentExtraArgs: string[];
  tolerancechecks: string;
  /** nxagent takes connections from this address only (`accept=`; the node's); empty: any. */
  acceptFrom: string;
  /** The session program and its arguments; empty: qvd-session or Xsession of the image. */
  sessionCommand: string[];
  /** Test aid: no provisioning, no privilege change. */
  asCurrentUser: boolean;
  root: string;
  homePath: string;
  shell: string;
  groups: string[];
  /** What an account may be (the node's identity.* settings); default: the built-in rules. */
  identity?: IdentityRules;
  defaultLang: string;
  runDir: string;
  /** Milliseconds per reported state; past them the session is terminated (stopping: killed). */
  timeouts: { starting: number; listening: number; suspending: number; stopping: number };
  /** Side services (printing, sound, the slave channel: src/vma/services.ts), in this order. */
  services?: SessionService[];
  /** Milliseconds a service's prepare or hook is waited for before the session goes on (default 15 s). */
  serviceTimeoutMs?: number;
}

/** A request the session cannot take in its current state (HTTP 409). */
export class StateError extends UserError {
  constructor(
    message: string,
    readonly state: XState,
  ) {
    super(message);
    this.name = "StateError";
  }
}

/** nxagent's `client=` values; the clients send darwin for macOS. */
const NX_CLIENT_OS: Record<string, string> = {
  linux: "linux",
  android: "linux",
  windows: "windows",
  winnt: "windows",
  macosx: "macosx",
  darwin: "macosx",
  solaris: "solaris",
};

const NX_TO_X: Record<string, XState> = {
  starting: "starting",
  resuming: "starting",
  started: "connected",
  resumed: "connected",
  suspending: "suspending",
  suspended: "suspended",
  terminating: "stopping",
  aborting: "stopping",
  terminated: "stopping",
  aborted: "stopping",
};

/**
 * The one line of the nxagent options file: `nx/nx,keyboard=…,…,cookie=…,accept=…:100`. Values
 * were validated. Without a cookie nxagent would take whoever connects first: none, no session.
 */
export function nxagentOptions(
  p: SessionParams,
  display: number,
  tolerancechecks: string,
  acceptFrom = "",
  extra: string[] = [],
): string {
  if (!p.cookie || !/^[0-9a-f]{32}$/.test(p.cookie)) throw new UserError("x_start needs the session's NX cookie");
  const o: string[] = [];
  if (p.keyboard) o.push(`keyboard=${p.keyboard}`);
  if (p.client_os) o.push(`client=${NX_CLIENT_OS[p.client_os] ?? "linux"}`);
  if (p.link) o.push(`link=${p.link}`);
  if (p.geometry) o.push(`geometry=${p.geometry}`);
  if (p.fullscreen !== undefined) o.push(`fullscreen=${p.fullscreen ? 1 : 0}`);
  // The services' channels (media=, slave=, cups=) before the session's locks, which end the line.
  for (const v of extra) {
    const why = serviceOptionProblem(v, o);
    if (why) throw new UserError(`bad nxagent option ${JSON.stringify(v)}: ${why}`);
    o.push(v);
  }
  o.push(`tolerancechecks=${tolerancechecks}`, `cookie=${p.cookie}`);
  if (acceptFrom) o.push(`accept=${acceptFrom}`);
  for (const v of o) if (!/^[\w]+=[\w/+.-]+$/.test(v)) throw new UserError(`bad nxagent option ${JSON.stringify(v)}`);
  return `nx/nx,${o.join(",")}:${display}`;
}

/** nxagent options a service may not set: the session's own (a service cannot move the cookie or accept=). */
const RESERVED_OPTIONS = new Set([
  "keyboard",
  "client",
  "link",
  "geometry",
  "fullscreen",
  "tolerancechecks",
  "cookie",
  "accept",
  "options",
  "listen",
  "connect",
  "session",
  "id",
]);

/** Why a service's nxagent option is refused (undefined: fine). `taken`: the options already on the line. */
export function serviceOptionProblem(v: string, taken: string[]): string | undefined {
  if (!/^[a-z]\w{0,31}=[\w/+.-]{1,200}$/.test(v)) return "not name=value of letters, digits, _ / + . -";
  const name = v.slice(0, v.indexOf("="));
  if (RESERVED_OPTIONS.has(name)) return `${name}= is the session's own`;
  if (taken.some((t) => t.startsWith(`${name}=`))) return `${name}= given twice`;
  return undefined;
}

/** Environment variables a service may not set for the session (its identity and the loader). */
function serviceEnvProblem(k: string, v: string): string | undefined {
  if (!/^[A-Z_][A-Z0-9_]{0,63}$/.test(k)) return "bad name";
  if (/^(HOME|USER|LOGNAME|SHELL|MAIL|PATH|DISPLAY|XAUTHORITY|IFS|ENV|BASH_ENV)$/.test(k) || k.startsWith("LD_"))
    return "reserved";
  if (v.includes("\0") || v.length > 4096) return "bad value";
  return undefined;
}

/** Supplementary groups of a new account: the qvd.vm.user.groups property (names separated by
 * commas or spaces) when the session has one, else vma.user.groups. */
export function sessionGroups(p: SessionParams, fallback: string[]): string[] {
  const v = p.properties?.["qvd.vm.user.groups"];
  return v === undefined
    ? fallback
    : String(v)
        .split(/[\s,]+/)
        .filter(Boolean);
}

/** Session properties not written for the desktop: secrets of the L7R ↔ VMA channel. */
const PRIVATE_PROPERTIES = new Set(["qvd.slave.key"]);

/**
 * The session's properties as a Java-properties text (`key=value` per line, sorted; `\`,
 * line ends, and in keys `=`, `:` and spaces escaped) for programs in the desktop.
 */
export function sessionPropertiesText(props: Record<string, string | number | boolean>): string {
  const esc = (s: string, key: boolean) => {
    const e = s.replace(/\\/g, "\\\\").replace(/\n/g, "\\n").replace(/\r/g, "\\r");
    return key ? e.replace(/[=: ]/g, (c) => `\\${c}`) : e;
  };
  return Object.keys(props)
    .filter((k) => !PRIVATE_PROPERTIES.has(k))
    .sort()
    .map((k) => `${esc(k, true)}=${esc(String(props[k]), false)}\n`)
    .join("");
}

/** setpriv's prefix that runs a program as the account (none for the as_current_user test aid). */
export function privPrefix(a: Account, asCurrentUser = false): string[] {
  return asCurrentUser
    ? []
    : [
        "setpriv",
        `--reuid=${a.uid}`,
        `--regid=${a.gid}`,
        a.groups.length ? `--groups=${a.groups.join(",")}` : "--clear-groups",
        "--",
      ];
}

export interface ExecAsUserOptions {
  env?: Record<string, string>;
  timeoutMs?: number;
  stdin?: string;
}

/**
 * Runs `prefix + argv` with exactly `env` (not the VMA's), cwd "/", and waits: its output, and
 * its status (128 + signal when killed; 127 when it could not start). SIGKILL after the timeout.
 */
export async function execAs(
  prefix: string[],
  argv: string[],
  env: Record<string, string>,
  o: ExecAsUserOptions = {},
): Promise<RunResult> {
  let proc;
  try {
    proc = Bun.spawn([...prefix, ...argv], {
      cwd: "/",
      env,
      stdin: o.stdin === undefined ? "ignore" : new Blob([o.stdin]),
      stdout: "pipe",
      stderr: "pipe",
      timeout: o.timeoutMs ?? 10_000,
      killSignal: "SIGKILL",
    });
  } catch (err) {
    return { status: 127, stdout: "", stderr: (err as Error).message };
  }
  const [stdout, stderr, status] = await Promise.all([
    new Response(proc.stdout).text(),
    new Response(proc.stderr).text(),
    proc.exited,
  ]);
  const sig = proc.signalCode as keyof typeof osConstants.signals | null;
  return { status: sig ? 128 + (osConstants.signals[sig] ?? 0) : status, stdout, stderr };
}

/** Whether a process exists and is not a zombie (an exited nxagent xinit has not reaped yet). */
export function alive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !== "Z";
  } catch {
    return false;
  }
}

export class Session {
  state: XState = "stopped";
  since = new Date();
  nxState = "";
  lastError: string | undefined;
  account: Account | undefined;
  private xinit: Daemon | undefined;
  private agentPid: number | undefined;
  private waiting = false;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private exited: Promise<void> = Promise.resolve();
  private params: SessionParams | undefined;
  /** x_stop came before xinit was started (while provisioning). */
  private cancelled = false;
  /** Counts X sessions (xinit runs): a program shown in one is gone in the next. */
  generation = 0;
  /** The environment the session's programs got (for runAsUser). */
  private env: Record<string, string> = {};
  private readonly listeners = new Set<(s: XState) => void>();
  /** The services' view of the current x_start (rebuilt at each); undefined between X sessions. */
  private svcCtx: ServiceContext | undefined;
  /** Per service, its calls in order: a slow one never reorders its own prepare/connected/suspended. */
  private svcChains: Promise<void>[] = [];
  /** Services were told "connected" and not "suspended" since. */
  private svcConnected = false;
  /** The nxagent options the services asked for at the last x_start. */
  private svcOptions: string[] = [];
  /** Prepared.wrap of the current X session (set at launch, cleared when it ends). */
  private svcWrap: string[] = [];
  private svcWraps: string[][] = [];
  /** The nxagent options the services added at the last x_start (for status and tests). */
  get serviceOptions(): readonly string[] {
    return this.svcOptions;
  }
  /** The services' nxagent options of this X session, fixed at its start (resumes keep them). */
  private channelOptions: string[] = [];

  constructor(readonly opts: SessionOptions) {
    mkdirSync(opts.runDir, { recursive: true, mode: 0o755 });
    // nxagent runs as the user and reads its options file from here: the directory must be
    // traversable (not listable) by others.
    const st = statSync(opts.runDir);
    if ((st.mode & 0o011) !== 0o011) chmodSync(opts.runDir, (st.mode & 0o7777) | 0o011);
    this.removeStateFiles();
  }

  get optionsFile(): string {
    return join(this.opts.runDir, "nxagent.conf");
  }

  /** Called after every state change. */
  onState(f: (s: XState) => void): void {
    this.listeners.add(f);
  }

  /**
   * Runs a program in the X session as its user (its uid, gids, DISPLAY, HOME, LANG), in a
   * process group of its own, without waiting; argv goes to exec, never to a shell. undefined
   * when no X session runs.
   */
  runAsUser(argv: string[], extraEnv: Record<string, string> = {}): Daemon | undefined {
    const a = this.account;
    if (!a || !this.xinit) return undefined;
    const env = { ...this.env, ...extraEnv, DISPLAY: `:${this.opts.display}` };
    // cwd "/": the VMA (root) does not enter a directory the user controls.
    return spawnDaemon([...this.privPrefix(a), ...argv], {
      cwd: "/",
      env,
      detached: true,
      onLine: (l) => log.debug("session program", { line: l }),
    });
  }

  private privPrefix(a: Account): string[] {
    return [...this.svcWrap, ...privPrefix(a, this.opts.asCurrentUser)];
  }

  /** ServiceContext.execAsUser: the session's environment only, DISPLAY while X runs. */
  private execAsUser(a: Account, argv: string[], o: ExecAsUserOptions = {}): Promise<RunResult> {
    const env: Record<string, string> = { ...this.env, ...(o.env ?? {}) };
    if (this.xinit) env.DISPLAY = `:${this.opts.display}`;
    return execAs(this.privPrefix(a), argv, env, o);
  }

  get port(): number {
    return 4000 + this.opts.display;
  }
  get nxagentPid(): number | undefined {
    return this.agentPid;
  }

  status(): { state: XState; since: string; nx_state: string; user?: string; error?: string } {
    return {
      state: this.state,
      since: this.since.toISOString(),
      nx_state: this.nxState,
      ...(this.account ? { user: this.account.user } : {}),
      ...(this.lastError && this.state === "stopped" ? { error: this.lastError } : {}),
    };
  }

  /** x_start: a new session when stopped, a resume when suspended. */
  start(p: SessionParams): { state: XState; resumed?: boolean } {
    switch (this.state) {
      case "stopped":
        this.params = p;
        this.lastError = undefined;
        this.account = undefined;
        this.nxState = "";
        this.cancelled = false;
        this.setState("starting");
        void this.launch(p).catch((err) => {
          this.lastError = (err as Error).message;
          log.error("session start failed", { err: this.lastError });
          if (!this.xinit) {
            this.setState("stopped");
            this.endServices();
          }
        });
        return { state: "starting" };
      case "suspended": {
        if (this.params && this.params.user !== p.user)
          throw new StateError(`the suspended session belongs to ${this.params.user}, not ${p.user}`, this.state);
        if (!this.agentPid) throw new StateError("the suspended session has no nxagent", this.state);
        // The new cookie at once (a bad x_start fails here); the services' options are rewritten below.
        this.writeOptions(p, this.svcOptions);
        this.params = p;
        this.writeSessionProperties(p);
        this.waiting = false;
        this.setState("starting");
        // The services prepare (new slave key, printing on or off…) before nxagent rereads its
        // options at the SIGHUP; x_start answers at once, as without services.
        const agent = this.agentPid;
        void this.prepareServices(p, this.account!, this.env)
          .catch((err) => {
            log.error("session services failed to prepare", { err: (err as Error).message });
            return [] as string[];
          })
          .then((extra) => {
            if (this.state !== "starting" || this.agentPid !== agent || this.params !== p) return; // x_stop, or it ended meanwhile
            // nxagent keeps the channels (cups=, media=, slave=) it started with: a resume whose
            // set differs broke its reconnection now and then (no channel, or no suspend after).
            // The services follow this x_start's wishes within the session's channels.
            if (extra.join(",") !== this.channelOptions.join(","))
              log.info("session services: the X session keeps its channels", {
                asked: extra.join(","),
                kept: this.channelOptions.join(","),
              });
            this.svcOptions = [...this.channelOptions];
            this.writeOptions(p, this.channelOptions);
            this.signalAgent("SIGHUP");
            this.nudgeResume(5);
          })
          .catch((err) => {
            this.lastError = (err as Error).message;
            log.error("session resume failed", { err: this.lastError });
            this.stop();
          });
        // `resumed`: the L7R tells a resume from a new X session apart (its connect metrics).
        return { state: "starting", resumed: true };
      }
      case "connected":
        this.signalAgent("SIGHUP");
        throw new StateError("Can't connect to X session in state connected, suspending it, retry later", this.state);
      default:
        throw new StateError(
          `Unable to start/resume X session in state ${this.state}, try again in a few minutes`,
          this.state,
        );
    }
  }

  /**
   * nxagent sometimes misses a SIGHUP that arrives right after it reported "Session suspended"
   * (it sets a flag but stays blocked until something else wakes it; seen in tests as a
   * resume that only happened 20 s later). While it has not started resuming, say it again.
   */
  private nudgeResume(left: number): void {
    setTimeout(() => {
      if (left <= 0 || this.state !== "starting" || this.nxState !== "suspended") return;
      log.info("nxagent has not started resuming yet, signalling again");
      this.signalAgent("SIGHUP");
      this.nudgeResume(left - 1);
    }, 1500);
  }

  /** x_suspend: asks a listening or connected nxagent to suspend (SIGHUP). */
  suspend(): { state: XState } {
    if ((this.state === "listening" || this.state === "connected") && this.agentPid) this.signalAgent("SIGHUP");
    return { state: this.state };
  }

  /** x_stop: asks nxagent to terminate (SIGTERM); before nxagent runs, ends xinit's group. */
  stop(): { state: XState } {
    if (this.state === "stopped" || this.state === "stopping") return { state: this.state };
    if (this.agentPid) this.signalAgent("SIGTERM");
    else if (this.xinit) this.xinit.killGroup("SIGTERM");
    else this.cancelled = true; // not launched yet: launch() sees it and gives up
    this.setState("stopping");
    return { state: this.state };
  }

  /** Stops the session and waits up to `timeoutMs` for it, then kills what is left. */
  async shutdown(timeoutMs: number): Promise<void> {
    if (!this.xinit) {
      this.cancelled = true;
      this.setState("stopped");
      return;
    }
    this.stop();
    const done = await Promise.race([this.exited.then(() => true), Bun.sleep(timeoutMs).then(() => false)]);
    if (!done) {
      log.warn("session did not stop in time, killing it");
      this.kill();
      await Promise.race([this.exited, Bun.sleep(2000)]);
    }
  }

  private kill(): void {
    if (this.agentPid)
      try {
        process.kill(this.agentPid, "SIGKILL");
      } catch {}
    this.xinit?.killGroup("SIGKILL");
  }

  private signalAgent(sig: NodeJS.Signals): void {
    if (!this.agentPid) return;
    log.info("signalling nxagent", { pid: this.agentPid, signal: sig });
    try {
      process.kill(this.agentPid, sig);
    } catch (err) {
      log.warn("cannot signal nxagent", { pid: this.agentPid, err: (err as Error).message });
    }
  }

  private setState(s: XState): void {
    if (s === this.state) return;
    log.info("state", { from: this.state, to: s });
    this.state = s;
    this.since = new Date();
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    const t = (this.opts.timeouts as Record<string, number>)[s];
    if (t) this.timer = setTimeout(() => this.onTimeout(s), t);
    this.writeStateFile();
    if (s === "connected" && this.svcCtx) {
      this.svcConnected = true;
      this.fireServices("connected");
    } else if (s === "suspended" && this.svcCtx) {
      this.svcConnected = false;
      this.fireServices("suspended");
    }
    for (const f of this.listeners) {
      try {
        f(s);
      } catch (err) {
        log.error("state listener failed", { err: (err as Error).message });
      }
    }
  }

  private onTimeout(s: XState): void {
    if (this.state !== s) return;
    log.warn("timeout", { state: s });
    if (s === "stopping") {
      this.kill();
      return;
    }
    this.stop();
  }

  /**
   * The options file holds the cookie: nxagent (the user's) must read it, nothing else in the
   * desktop may, and the user must not change it (accept=, cookie=): owned by the VMA, group the
   * session's, mode 0640. The session's own programs run as the same user and could read it
   * too; they gain nothing: nxagent takes connections from the node's address only.
   */
  private writeOptions(p: SessionParams, extra: string[] = []): void {
    const f = this.optionsFile;
    const line = nxagentOptions(p, this.opts.display, this.opts.tolerancechecks, this.opts.acceptFrom, extra) + "\n";
    rmSync(f, { force: true });
    writeFileSync(f, line, { mode: this.opts.asCurrentUser ? 0o600 : 0o640 });
    if (!this.opts.asCurrentUser && this.account) chownSync(f, process.getuid!(), this.account.gid);
  }

  get propertiesFile(): string {
    return join(this.opts.runDir, "session.properties");
  }

  /** `<path.run>/session.properties`, readable by the session's user only (rewritten at each x_start). */
  private writeSessionProperties(p: SessionParams): void {
    const f = this.propertiesFile;
    rmSync(f, { force: true });
    writeFileSync(f, sessionPropertiesText(p.properties ?? {}), { mode: 0o600 });
    if (!this.opts.asCurrentUser && this.account) chownSync(f, this.account.uid, this.account.gid);
  }

  private sessionCommand(): string[] {
    if (this.opts.sessionCommand.length) return this.opts.sessionCommand;
    const qvd = "/usr/local/bin/qvd-session";
    return [existsSync(underRoot(this.opts.root, qvd)) ? qvd : "/etc/X11/Xsession"];
  }

  private async launch(p: SessionParams): Promise<void> {
    const o = this.opts;
    let account: Account;
    if (o.asCurrentUser) {
      const home = process.env.HOME ?? "/root";
      account = {
        user: process.env.USER ?? "root",
        uid: process.getuid!(),
        gid: process.getgid!(),
        home,
        shell: "/bin/sh",
        groups: [],
      };
    } else {
      const home = p.home ?? `${o.homePath}/${p.user}`;
      const pw = readPasswd(o.root).find((e) => e.name === p.user);
      if (!pw || !existsSync(underRoot(o.root, pw.home || home))) this.setState("provisioning");
      const req = { user: p.user, uid: p.uid, gid: p.gid, home, shell: o.shell, groups: sessionGroups(p, o.groups) };
      checkIdentity(req, o.identity ?? defaultIdentityRules(), o.root);
      account = await provision(req, o.root);
      if (!this.cancelled) this.setState("starting");
    }
    if (this.cancelled) {
      this.setState("stopped"); // x_stop or a timeout before xinit ran
      return;
    }
    this.account = account;
    this.writeSessionProperties(p);
    // X sockets live here; a fresh container may not have the directory yet.
    mkdirSync("/tmp/.X11-unix", { recursive: true, mode: 0o1777 });
    const homeOnDisk = o.asCurrentUser ? account.home : underRoot(o.root, account.home);
    const fileEnv = readEnvFiles(o.root);
    const env: Record<string, string> = {
      PATH: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
      ...fileEnv,
      HOME: homeOnDisk,
      USER: account.user,
      LOGNAME: account.user,
      SHELL: account.shell,
      MAIL: `/var/mail/${account.user}`,
    };
    if (!env.LANG) env.LANG = o.defaultLang;
    this.env = env;
    const svcEnv: Record<string, string> = {};
    this.svcWrap = [];
    const extra = await this.prepareServices(p, account, env, svcEnv);
    this.channelOptions = extra;
    Object.assign(env, svcEnv);
    this.svcWrap = this.svcWraps.find((w) => w.length) ?? [];
    if (this.cancelled) {
      this.setState("stopped");
      this.endServices();
      return;
    }
    this.writeOptions(p, extra);
    this.generation++;
    const d = o.display;
    // `cd`: a wrap's nsenter leaves the session in "/", not the home.
    const client = [
      "/bin/sh",
      "-c",
      'cd 2>/dev/null; exec "$@" >>"$HOME/.qvd-session.log" 2>&1',
      "qvd-session",
      ...this.sessionCommand(),
    ];
    const server = [
      o.nxagent,
      `:${d}`,
      "-ac",
      "-name",
      "QVD",
      "-display",
      `nx/nx,options=${this.optionsFile}:${d}`,
      ...o.nxagentExtraArgs,
    ];
    const priv = o.asCurrentUser
      ? []
      : [
          "setpriv",
          `--reuid=${account.uid}`,
          `--regid=${account.gid}`,
          account.groups.length ? `--groups=${account.groups.join(",")}` : "--clear-groups",
          "--",
        ];
    const argv = [...this.svcWrap, ...priv, o.xinit, ...client, "--", ...server];
    const logFile = join(o.runDir, "nxagent.log");
    try {
      chmodSync(logFile, 0o600);
    } catch {} // made by an older VMA, or missing
    this.waiting = false;
    const daemon = spawnDaemon(argv, {
      cwd: homeOnDisk,
      env,
      detached: true,
      onLine: (line) => {
        // nxagent prints both cookies when a proxy presents a wrong one: not into the log.
        const cookie = this.params?.cookie;
        const safe = cookie ? line.replaceAll(cookie, "<cookie>") : line;
        try {
          appendFileSync(logFile, safe + "\n", { mode: 0o600 });
        } catch {}
        if (NOTABLE_LINE.test(line)) log.info("nxagent", { line: safe });
        this.onLine(line);
      },
    });
    this.xinit = daemon;
    this.exited = daemon.exited.then(async (status) => {
      await Promise.race([daemon.drained, Bun.sleep(500)]);
      // shutdown() waits for the services' cleanup too (their cupsd, mounts), within bounds.
      await Promise.race([this.onExit(daemon, status), Bun.sleep(this.serviceTimeout + 1000)]);
    });
  }

  /** One line of xinit's merged output (nxagent's messages among them). */
  onLine(line: string): void {
    this.lineToServices(line);
    let m: RegExpExecArray | null;
    if ((m = /^Info: Agent running with pid '(\d+)'/.exec(line))) {
      this.agentPid = Number(m[1]);
      writeFileSync(join(this.opts.runDir, "nxagent.pid"), `${this.agentPid}\n`);
      log.info("nxagent running", { pid: this.agentPid });
      return;
    }
    if (/^Info: Waiting for connection /.test(line)) {
      this.waiting = true;
      if (this.nxState === "starting" || this.nxState === "resuming") this.setState("listening");
      return;
    }
    if ((m = /^Session: (\w+) session at/.exec(line) ?? /^Session: Session (\w+) at/.exec(line))) {
      const word = m[1]!.toLowerCase();
      this.nxState = word;
      const x = NX_TO_X[word];
      if (!x) {
        log.warn("unknown nxagent session state", { state: word });
        return;
      }
      if (word === "terminated" || word === "aborted") this.reapXinitAfterAgent();
      if (x === "starting") {
        // The socket may already be open (a resume prints "Waiting…" first).
        this.setState(this.waiting ? "listening" : "starting");
      } else {
        this.waiting = false;
        this.setState(x);
      }
      this.writeStateFile();
    }
  }

  /**
   * xinit can wait up to ~15 s for a server that died while nobody was connected (it keeps
   * retrying the display). Once nxagent is gone, end xinit's group after a short grace.
   */
  private reapXinitAfterAgent(): void {
    const daemon = this.xinit;
    const pid = this.agentPid;
    if (!daemon || !pid) return;
    const check = (left: number) =>
      setTimeout(() => {
        if (this.xinit !== daemon) return;
        if (alive(pid) && left > 0) return check(left - 1);
        if (alive(pid)) return; // still there: the stopping timeout kills it
        setTimeout(() => {
          if (this.xinit === daemon) daemon.killGroup("SIGTERM");
        }, 1000);
      }, 250);
    check(40);
  }

  private onExit(daemon: Daemon, status: number): Promise<void> {
    if (this.xinit !== daemon) return Promise.resolve();
    log.info("session ended", { status, nx_state: this.nxState });
    daemon.killGroup("SIGTERM"); // whatever of the session is left in xinit's group
    this.xinit = undefined;
    this.svcWrap = [];
    this.agentPid = undefined;
    this.waiting = false;
    this.nxState = "";
    this.setState("stopped");
    this.removeStateFiles();
    return this.endServices();
  }

  private get serviceTimeout(): number {
    return this.opts.serviceTimeoutMs ?? 15_000;
  }

  /**
   * Queues `f` on service i's chain: after the service's previous call, or after `waitPrevMs` at
   * most (prepare: an x_start does not wait long for a slow hook). Waited for up to `boundMs`
   * (default: the service timeout); never rejects.
   */
  private onChain<T>(
    i: number,
    what: string,
    f: () => T | Promise<T>,
    o: { waitPrevMs?: number; boundMs?: number } = {},
  ): Promise<T | undefined> {
    const svc = this.opts.services![i]!;
    const prev = this.svcChains[i] ?? Promise.resolve();
    let gateTimer: ReturnType<typeof setTimeout> | undefined;
    const gate =
      o.waitPrevMs === undefined
        ? prev
        : Promise.race([prev, new Promise<void>((r) => (gateTimer = setTimeout(r, o.waitPrevMs)))]).finally(() =>
            clearTimeout(gateTimer),
          );
    const call = gate.then(() => f());
    const boundMs = o.boundMs ?? this.serviceTimeout;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const bounded = Promise.race([
      call.catch((err) => {
        log.error("session service failed", { service: svc.name, at: what, err: (err as Error).message });
        return undefined;
      }),
      new Promise<undefined>((resolve) => {
        timer = setTimeout(() => {
          log.error("session service too slow, going on without it", { service: svc.name, at: what, ms: boundMs });
          resolve(undefined);
        }, boundMs);
      }),
    ]).finally(() => clearTimeout(timer));
    // The next call waits for this one and the ones before (however long).
    this.svcChains[i] = Promise.allSettled([prev, call]).then(() => {});
    return bounded;
  }

  /**
   * At every x_start: a fresh ServiceContext, then each service's prepare. Returns the nxagent
   * options they ask for (each checked; a refused one is logged and dropped) and adds their
   * environment to `envOut`. A service that throws or is too slow is off for this x_start.
   */
  private async prepareServices(
    p: SessionParams,
    account: Account,
    env: Record<string, string>,
    envOut: Record<string, string> = {},
  ): Promise<string[]> {
    const services = this.opts.services ?? [];
    this.svcOptions = [];
    this.svcWraps = [];
    if (!services.length) return [];
    const o = this.opts;
    const ctx: ServiceContext = {
      account,
      properties: { ...(p.properties ?? {}) },
      clientOs: p.client_os,
      display: o.display,
      runDir: o.runDir,
      homeOnDisk: env.HOME ?? (o.asCurrentUser ? account.home : underRoot(o.root, account.home)),
      env: { ...env },
      runAsUser: (argv, e) => this.runAsUser(argv, e),
      execAsUser: (argv, opts) => this.execAsUser(account, argv, opts),
    };
    this.svcCtx = ctx;
    // An x_start waits up to 2 s for a service's running hook, and 5 s for its prepare.
    const results = await Promise.all(
      services.map((svc, i) =>
        this.onChain<Prepared>(i, "prepare", () => svc.prepare(ctx), { waitPrevMs: 2000, boundMs: 5000 }),
      ),
    );
    const base = nxagentOptions(p, o.display, o.tolerancechecks, o.acceptFrom)
      .replace(/^nx\/nx,/, "")
      .replace(/:\d+$/, "")
      .split(",");
    const extra: string[] = [];
    this.svcWraps = results.map((r) => (Array.isArray(r?.wrap) ? r.wrap.map(String) : []));
    results.forEach((r, i) => {
      const name = services[i]!.name;
      for (const v of r?.options ?? []) {
        const why = serviceOptionProblem(String(v), [...base, ...extra]);
        if (why) log.error("session service option refused", { service: name, option: String(v).slice(0, 80), why });
        else extra.push(v);
      }
      for (const [k, v] of Object.entries(r?.env ?? {})) {
        const why = serviceEnvProblem(k, String(v));
        if (why) log.error("session service environment refused", { service: name, name: k.slice(0, 64), why });
        else envOut[k] = String(v);
      }
    });
    this.svcOptions = extra;
    if (extra.length) log.info("session services", { options: extra.join(",") });
    return extra;
  }

  /** Hands an nxagent line to the services (synchronously; a throw is logged). */
  private lineToServices(line: string): void {
    const ctx = this.svcCtx;
    if (!ctx) return;
    const cookie = this.params?.cookie;
    const l = cookie ? line.replaceAll(cookie, "<cookie>") : line;
    for (const svc of this.opts.services ?? []) {
      if (!svc.onAgentLine) continue;
      try {
        svc.onAgentLine(l, ctx);
      } catch (err) {
        log.error("session service failed", { service: svc.name, at: "agent line", err: (err as Error).message });
      }
    }
  }

  /** Calls `hook` of every service (each on its chain, with the current context). */
  private fireServices(hook: "connected" | "suspended" | "stopped", ctx = this.svcCtx): Promise<void> {
    const services = this.opts.services ?? [];
    if (!ctx || !services.length) return Promise.resolve();
    return Promise.all(
      services.map((svc, i) => (svc[hook] ? this.onChain(i, hook, () => svc[hook]!(ctx)) : undefined)),
    ).then(() => {});
  }

  /** The X session is over: "suspended" if the services were still connected, then "stopped". */
  private endServices(): Promise<void> {
    const ctx = this.svcCtx;
    if (!ctx) return Promise.resolve();
    const wasConnected = this.svcConnected;
    this.svcConnected = false;
    this.svcCtx = undefined;
    return (wasConnected ? this.fireServices("suspended", ctx) : Promise.resolve()).then(() =>
      this.fireServices("stopped", ctx),
    );
  }

  /** `${run}/nxagent.state` as the original wrote it: `<nx state>:<epoch>`. */
  private writeStateFile(): void {
    try {
      if (this.nxState)
        writeFileSync(join(this.opts.runDir, "nxagent.state"), `${this.nxState}:${Math.floor(Date.now() / 1000)}\n`);
    } catch {}
  }

  private removeStateFiles(): void {
    for (const f of ["nxagent.state", "nxagent.pid"]) rmSync(join(this.opts.runDir, f), { force: true });
  }
}
