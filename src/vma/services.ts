// The session's side services (printing, sound, the slave channel): each is a SessionService
// the Session (src/vma/session.ts) calls at fixed points of the NX session's life. A service
// never breaks a session: whatever it throws is logged and the session goes on.
import type { Daemon, RunResult } from "../run.ts";
import type { Account } from "./provision.ts";

export interface ServiceContext {
  /** The session's user (as provisioned). */
  account: Account;
  /** x_start's merged properties (src/l7r/x-start.ts): administrator properties, qvd.client.*, qvd.slave.key. */
  properties: Record<string, string | number | boolean>;
  /** x_start's client_os (linux, windows, …), if any. */
  clientOs?: string;
  /** The NX display (100). */
  display: number;
  /** path.run of the VMA (/run/qvd). */
  runDir: string;
  /** The user's home as the VMA sees it (under vma.provision.root). */
  homeOnDisk: string;
  /** The session's environment (HOME, USER, LANG, PATH…; DISPLAY not included). */
  env: Record<string, string>;
  /**
   * Runs argv as the session's user (uid, gids, the session environment plus `env`, DISPLAY),
   * in a process group of its own, never through a shell. undefined when no X session runs.
   */
  runAsUser(argv: string[], env?: Record<string, string>): Daemon | undefined;
  /**
   * Runs argv as the session's user and waits for it (output collected; a non-zero status is
   * returned, not thrown). Its environment is the session's plus `env` (plus DISPLAY while an X
   * session runs), never the VMA's. Usable from `prepare` on. Killed (SIGKILL) after `timeoutMs`
   * (default 10 s); a program that could not be started gives status 127.
   */
  execAsUser(
    argv: string[],
    opts?: { env?: Record<string, string>; timeoutMs?: number; stdin?: string },
  ): Promise<RunResult>;
}

export interface Prepared {
  /** nxagent options (`name=value`, e.g. `media=1`); none: the service is off for this x_start. */
  options: string[];
  /** Environment for xinit and nxagent (used when a new X session starts, not at a resume). */
  env?: Record<string, string>;
  /**
   * An argv prefix, run as root before the session's setpriv, for a NEW X session and every
   * program run as its user until it ends (the slave service's nested namespace: nsenter, then
   * setpriv --no-new-privs). The first service that gives one wins; a resume keeps the old one.
   */
  wrap?: string[];
}

export interface SessionService {
  readonly name: string;
  /**
   * At every x_start (new session and resume), after provisioning and before nxagent reads its
   * options file: the options this service needs, and per-session files it writes.
   */
  prepare(ctx: ServiceContext): Prepared | Promise<Prepared>;
  /** Each line nxagent prints (it announces the ports of its channels). */
  onAgentLine?(line: string, ctx: ServiceContext): void;
  /** The session became connected (started or resumed). */
  connected?(ctx: ServiceContext): void | Promise<void>;
  /** The session was suspended. */
  suspended?(ctx: ServiceContext): void | Promise<void>;
  /** The X session ended (after suspended, when it was). */
  stopped?(ctx: ServiceContext): void | Promise<void>;
}

/** An administrator property that switches a service off: `0`, `false`, `no` (any case). */
export function propertyOff(props: Record<string, string | number | boolean>, key: string): boolean {
  const v = props[key];
  if (v === undefined) return false;
  return v === false || v === 0 || /^(0|false|no|off)$/i.test(String(v).trim());
}
