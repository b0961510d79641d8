// The soft-expiry notice: when the node calls /vma/expire (the desktop's image was replaced,
// src/db/dis.ts moveTag, or an administrator set an expiry), the user sees one xmessage window
// in their X session saying so, and when the desktop will be restarted if a hard time is set.
//
//  - Once per expiry setting and X session: the node repeats the call every poll; the same
//    times do nothing while the window was shown in this X session (open or dismissed). New
//    times replace the window. A new X session (log out, log in) shows it again: the desktop
//    still runs the old image.
//  - Only in a connected session: otherwise (no session, listening, suspended) it waits for the
//    next "connected" (a start or a resume), so the user is there to read it.
//  - The text is fixed; the only variable parts are the hard time's digits, formatted here from
//    a parsed Date. xmessage gets it as one argv element (no shell), runs as the session's user.
import { logger } from "../log.ts";
import type { Daemon } from "../run.ts";
import type { Session } from "./session.ts";

const log = logger("vma.expiry");

export const NOTICE_TITLE = "QVD: desktop update";

/**
 * An expiry time as the node sends it: an ISO 8601 string, or seconds since the epoch; null
 * or absent: none. "invalid" for anything else.
 */
export function parseExpiryTime(v: string | number | null | undefined): Date | null | "invalid" {
  if (v === null || v === undefined || v === "") return null;
  if (typeof v === "number") return Number.isFinite(v) && v >= 0 && v < 1e11 ? new Date(v * 1000) : "invalid";
  if (!/^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}(:?\d{2})?)?$/.test(v)) return "invalid";
  const d = new Date(v);
  return Number.isNaN(d.getTime()) ? "invalid" : d;
}

const pad = (n: number) => String(n).padStart(2, "0");

/** The notice's text; times in the desktop's local time zone. */
export function noticeText(hard: Date | null, now = new Date()): string {
  const lines = ["Your desktop has been updated."];
  if (hard) {
    const hhmm = `${pad(hard.getHours())}:${pad(hard.getMinutes())}`;
    const sameDay =
      hard.getFullYear() === now.getFullYear() &&
      hard.getMonth() === now.getMonth() &&
      hard.getDate() === now.getDate();
    const day = `${hard.getFullYear()}-${pad(hard.getMonth() + 1)}-${pad(hard.getDate())}`;
    lines.push(`It will be restarted ${sameDay ? "" : `on ${day} `}at ${hhmm} to run the new version.`);
  } else {
    lines.push("The new version runs from the next restart of this desktop.");
  }
  lines.push("Please save your work and log out.");
  return lines.join("\n");
}

/** xmessage's command line: the text is its last argument, after fixed options. */
export function noticeArgv(xmessage: string, text: string): string[] {
  // The icon name is what task bars show (Xt's default: "xmessage").
  return [
    xmessage,
    "-center",
    "-title",
    NOTICE_TITLE,
    "-xrm",
    `xmessage.iconName: ${NOTICE_TITLE}`,
    "-buttons",
    "OK:0",
    "-default",
    "OK",
    text,
  ];
}

/** An xmessage that ends this fast with status 1 could not open the display yet: retried. */
const QUICK_FAILURE_MS = 5000;
const MAX_ATTEMPTS = 5;

export class ExpiryNotice {
  private key: string | undefined;
  private hard: Date | null = null;
  /** The X session (Session.generation) the current setting's window was shown in. */
  private shownIn: number | undefined;
  private window: Daemon | undefined;
  private attempts = 0;
  private attemptsIn: number | undefined;

  /** `xmessage`: the program; empty: no built-in notice (the expire hook alone). */
  constructor(
    private readonly session: Session,
    private readonly xmessage: string,
  ) {
    session.onState((s) => {
      if (s === "connected") this.maybeShow();
      else if (s === "stopped") this.window = undefined; // gone with its X server
    });
  }

  /** The node's expire call: shows the notice for a new setting (now or at the next connect). */
  set(soft: Date | null, hard: Date | null): void {
    if (!this.xmessage) return;
    const key = `${soft?.getTime() ?? ""}|${hard?.getTime() ?? ""}`;
    if (key !== this.key) {
      this.key = key;
      this.hard = hard;
      this.shownIn = undefined;
      this.attempts = 0;
      this.window?.killGroup("SIGTERM"); // the old setting's window
      this.window = undefined;
    }
    this.maybeShow();
  }

  private maybeShow(): void {
    const s = this.session;
    if (this.key === undefined || s.state !== "connected" || this.shownIn === s.generation) return;
    const w = s.runAsUser(noticeArgv(this.xmessage, noticeText(this.hard)));
    if (!w) return;
    if (this.attemptsIn !== s.generation) [this.attempts, this.attemptsIn] = [0, s.generation];
    const key = this.key;
    const generation = (this.shownIn = s.generation);
    this.window = w;
    this.attempts++;
    const started = Date.now();
    log.info("expiry notice shown", { pid: w.pid, hard: this.hard?.toISOString() ?? "" });
    void w.exited.then((status) => {
      if (this.window === w) this.window = undefined;
      if (
        status === 1 &&
        Date.now() - started < QUICK_FAILURE_MS &&
        key === this.key &&
        generation === s.generation &&
        this.attempts < MAX_ATTEMPTS
      ) {
        log.warn("expiry notice failed, retrying", { status });
        this.shownIn = undefined;
        setTimeout(() => this.maybeShow(), 1000);
      }
    });
  }
}
