// The NX session in the guest: nxagent as the X server of `xinit <session>`, run as the user,
// and the state machine driven by nxagent's output (DESIGN section 7; the original's VMA.pm).
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
import { appendFileSync, chmodSync, chownSync, existsSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { UserError } from "../errors.ts";
import { logger } from "../log.ts";
import { spawnDaemon, type Daemon } from "../run.ts";
import { defaultIdentityRules, type IdentityRules } from "../auth/identity.ts";
import { checkIdentity, provision, readEnvFiles, readPasswd, underRoot, type Account } from "./provision.ts";

const log = logger("vma.session");

export const X_STATES = ["stopped", "starting", "provisioning", "listening", "connected", "suspending", "suspended", "stopping"] as const;
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
}

/** A request the session cannot take in its current state (HTTP 409). */
export class StateError extends UserError {
  constructor(message: string, readonly state: XState) {
    super(message);
    this.name = "StateError";
  }
}

/** nxagent's `client=` values; the clients send darwin for macOS. */
const NX_CLIENT_OS: Record<string, string> = {
  linux: "linux", android: "linux", windows: "windows", winnt: "windows", macosx: "macosx", darwin: "macosx", solaris: "solaris",
};

const NX_TO_X: Record<string, XState> = {
  starting: "starting", resuming: "starting", started: "connected", resumed: "connected",
  suspending: "suspending", suspended: "suspended",
  terminating: "stopping", aborting: "stopping", terminated: "stopping", aborted: "stopping",
};

/**
 * The one line of the nxagent options file: `nx/nx,keyboard=…,…,cookie=…,accept=…:100`. Values
 * were validated. Without a cookie nxagent would take whoever connects first: none, no session.
 */
export function nxagentOptions(p: SessionParams, display: number, tolerancechecks: string, acceptFrom = ""): string {
  if (!p.cookie || !/^[0-9a-f]{32}$/.test(p.cookie)) throw new UserError("x_start needs the session's NX cookie");
  const o: string[] = [];
  if (p.keyboard) o.push(`keyboard=${p.keyboard}`);
  if (p.client_os) o.push(`client=${NX_CLIENT_OS[p.client_os] ?? "linux"}`);
  if (p.link) o.push(`link=${p.link}`);
  if (p.geometry) o.push(`geometry=${p.geometry}`);
  if (p.fullscreen !== undefined) o.push(`fullscreen=${p.fullscreen ? 1 : 0}`);
  o.push(`tolerancechecks=${tolerancechecks}`, `cookie=${p.cookie}`);
  if (acceptFrom) o.push(`accept=${acceptFrom}`);
  for (const v of o) if (!/^[\w]+=[\w/+.-]+$/.test(v)) throw new UserError(`bad nxagent option ${JSON.stringify(v)}`);
  return `nx/nx,${o.join(",")}:${display}`;
}

/** Supplementary groups of a new account: the qvd.vm.user.groups property (names separated by
 * commas or spaces) when the session has one, else vma.user.groups. */
export function sessionGroups(p: SessionParams, fallback: string[]): string[] {
  const v = p.properties?.["qvd.vm.user.groups"];
  return v === undefined ? fallback : String(v).split(/[\s,]+/).filter(Boolean);
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

/** Whether a process exists and is not a zombie (an exited nxagent xinit has not reaped yet). */
function alive(pid: number): boolean {
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

  constructor(readonly opts: SessionOptions) {
    mkdirSync(opts.runDir, { recursive: true, mode: 0o755 });
    // nxagent runs as the user and reads its options file from here: the directory must be
    // traversable (not listable) by others.
    const st = statSync(opts.runDir);
    if ((st.mode & 0o011) !== 0o011) chmodSync(opts.runDir, (st.mode & 0o7777) | 0o011);
    this.removeStateFiles();
  }

  get optionsFile(): string { return join(this.opts.runDir, "nxagent.conf"); }

  /** Called after every state change. */
  onState(f: (s: XState) => void): void { this.listeners.add(f); }

  /**
   * Runs a program in the X session as its user (its uid, gids, DISPLAY, HOME, LANG), in a
   * process group of its own, without waiting; argv goes to exec, never to a shell. undefined
   * when no X session runs.
   */
  runAsUser(argv: string[]): Daemon | undefined {
    const a = this.account;
    if (!a || !this.xinit) return undefined;
    const priv = this.opts.asCurrentUser
      ? []
      : ["setpriv", `--reuid=${a.uid}`, `--regid=${a.gid}`, a.groups.length ? `--groups=${a.groups.join(",")}` : "--clear-groups", "--"];
    const env = { ...this.env, DISPLAY: `:${this.opts.display}` };
    // cwd "/": the VMA (root) does not enter a directory the user controls.
    return spawnDaemon([...priv, ...argv], { cwd: "/", env, detached: true, onLine: (l) => log.debug("session program", { line: l }) });
  }

  get port(): number { return 4000 + this.opts.display; }
  get nxagentPid(): number | undefined { return this.agentPid; }

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
  start(p: SessionParams): { state: XState } {
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
          if (!this.xinit) this.setState("stopped");
        });
        return { state: "starting" };
      case "suspended": {
        if (this.params && this.params.user !== p.user)
          throw new StateError(`the suspended session belongs to ${this.params.user}, not ${p.user}`, this.state);
        if (!this.agentPid) throw new StateError("the suspended session has no nxagent", this.state);
        this.params = p;
        this.writeOptions(p);
        this.writeSessionProperties(p);
        this.waiting = false;
        this.setState("starting");
        this.signalAgent("SIGHUP");
        this.nudgeResume(5);
        return { state: "starting" };
      }
      case "connected":
        this.signalAgent("SIGHUP");
        throw new StateError("Can't connect to X session in state connected, suspending it, retry later", this.state);
      default:
        throw new StateError(`Unable to start/resume X session in state ${this.state}, try again in a few minutes`, this.state);
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
    if (this.agentPid) try { process.kill(this.agentPid, "SIGKILL"); } catch {}
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
  private writeOptions(p: SessionParams): void {
    const f = this.optionsFile;
    const line = nxagentOptions(p, this.opts.display, this.opts.tolerancechecks, this.opts.acceptFrom) + "\n";
    rmSync(f, { force: true });
    writeFileSync(f, line, { mode: this.opts.asCurrentUser ? 0o600 : 0o640 });
    if (!this.opts.asCurrentUser && this.account) chownSync(f, process.getuid!(), this.account.gid);
  }

  get propertiesFile(): string { return join(this.opts.runDir, "session.properties"); }

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
      account = { user: process.env.USER ?? "root", uid: process.getuid!(), gid: process.getgid!(), home, shell: "/bin/sh", groups: [] };
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
    this.writeOptions(p);
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
    this.generation++;
    const d = o.display;
    const client = ["/bin/sh", "-c", 'exec "$@" >>"$HOME/.qvd-session.log" 2>&1', "qvd-session", ...this.sessionCommand()];
    const server = [o.nxagent, `:${d}`, "-ac", "-name", "QVD", "-display", `nx/nx,options=${this.optionsFile}:${d}`, ...o.nxagentExtraArgs];
    const priv = o.asCurrentUser
      ? []
      : ["setpriv", `--reuid=${account.uid}`, `--regid=${account.gid}`, account.groups.length ? `--groups=${account.groups.join(",")}` : "--clear-groups", "--"];
    const argv = [...priv, o.xinit, ...client, "--", ...server];
    const logFile = join(o.runDir, "nxagent.log");
    try { chmodSync(logFile, 0o600); } catch {} // made by an older VMA, or missing
    this.waiting = false;
    const daemon = spawnDaemon(argv, {
      cwd: homeOnDisk,
      env,
      detached: true,
      onLine: (line) => {
        // nxagent prints both cookies when a proxy presents a wrong one: not into the log.
        const cookie = this.params?.cookie;
        try { appendFileSync(logFile, (cookie ? line.replaceAll(cookie, "<cookie>") : line) + "\n", { mode: 0o600 }); } catch {}
        this.onLine(line);
      },
    });
    this.xinit = daemon;
    this.exited = daemon.exited.then(async (status) => {
      await Promise.race([daemon.drained, Bun.sleep(500)]);
      this.onExit(daemon, status);
    });
  }

  /** One line of xinit's merged output (nxagent's messages among them). */
  onLine(line: string): void {
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
    const check = (left: number) => setTimeout(() => {
      if (this.xinit !== daemon) return;
      if (alive(pid) && left > 0) return check(left - 1);
      if (alive(pid)) return; // still there: the stopping timeout kills it
      setTimeout(() => { if (this.xinit === daemon) daemon.killGroup("SIGTERM"); }, 1000);
    }, 250);
    check(40);
  }

  private onExit(daemon: Daemon, status: number): void {
    if (this.xinit !== daemon) return;
    log.info("session ended", { status, nx_state: this.nxState });
    daemon.killGroup("SIGTERM"); // whatever of the session is left in xinit's group
    this.xinit = undefined;
    this.agentPid = undefined;
    this.waiting = false;
    this.nxState = "";
    this.setState("stopped");
    this.removeStateFiles();
  }

  /** `${run}/nxagent.state` as the original wrote it: `<nx state>:<epoch>`. */
  private writeStateFile(): void {
    try {
      if (this.nxState) writeFileSync(join(this.opts.runDir, "nxagent.state"), `${this.nxState}:${Math.floor(Date.now() / 1000)}\n`);
    } catch {}
  }

  private removeStateFiles(): void {
    for (const f of ["nxagent.state", "nxagent.pid"]) rmSync(join(this.opts.runDir, f), { force: true });
  }
}
