// The desktop page (README.md in this directory): log in, list the user's desktops, connect one
// over a WebSocket and hand that socket to noVNC once the server says `ready`. The token lives
// only in `token` below: never in storage or the URL, so a reload means logging in again.
import RFB from "@novnc/novnc";
import "./style.css";

interface Vm {
  id: number;
  name: string;
  state: string;
  blocked: unknown;
}

interface Session {
  vm: Vm;
  ws: WebSocket;
  opened: boolean;
  rfb?: RFB;
  /** rfb.disconnect() was called or noVNC disconnected on its own: calling it again logs an error. */
  rfbStopped: boolean;
  /** The `error` frame before the close, if any. */
  error?: { status: number; message: string };
  /** A protocol violation by the server, seen by the page. */
  broken?: string;
}

const TAKEN_OVER = "This desktop was opened elsewhere (another browser or QVD client).";
const ENDED = "The desktop session ended.";
const LOST = "The connection to the desktop was lost.";
const EXPIRED = "Your login has expired; log in again";

const el = <T extends HTMLElement = HTMLElement>(id: string) => document.getElementById(id) as T;
const views = { login: el("login-view"), list: el("list-view"), session: el("session-view") };
const loginForm = el<HTMLFormElement>("login-form");
const nameInput = el<HTMLInputElement>("login-name");
const passwordInput = el<HTMLInputElement>("login-password");
const tenantInput = el<HTMLInputElement>("login-tenant");
const codeInput = el<HTMLInputElement>("login-code");
const loginButton = el<HTMLButtonElement>("login-submit");
const desktops = el<HTMLUListElement>("desktops");
const screen = el("screen");
const status = el("status");
const progress = el("progress");
const sessionActions = el("session-actions");
const clipboardPanel = el("clipboard-panel");
const clipboardToggle = el<HTMLButtonElement>("clipboard-toggle");
const clipboardText = el<HTMLTextAreaElement>("clipboard-text");
const fullscreenButton = el<HTMLButtonElement>("fullscreen");

let token: string | undefined;
let session: Session | undefined;
/** The desktop of the last session, for Reconnect. */
let lastVm: Vm | undefined;
/** The clipboard text both sides last agreed on: not sent back to where it came from. */
let lastClipboard = "";

function show(view: keyof typeof views): void {
  for (const [name, v] of Object.entries(views)) v.hidden = name !== view;
}

/** Shows `text` in an alert element (role="alert"), or hides it when empty. */
function say(id: string, text = ""): void {
  const a = el(id);
  a.textContent = text;
  a.hidden = text === "";
}

/** The message to show for a failed request: the server's short text, else `fallback`. */
async function serverText(r: Response, fallback: string): Promise<string> {
  const t = (await r.text().catch(() => "")).trim();
  return t && t.length <= 300 && !t.startsWith("<") ? t : fallback;
}

// Basic credentials as UTF-8 (RFC 7617): btoa alone takes only Latin-1.
const basic = (s: string) =>
  "Basic " + btoa(Array.from(new TextEncoder().encode(s), (b) => String.fromCharCode(b)).join(""));

// --- log in ----------------------------------------------------------------------------------

function showLogin(message = ""): void {
  token = undefined;
  desktops.replaceChildren();
  leaveFullscreen();
  show("login");
  say("login-alert", message);
  (nameInput.value ? passwordInput : nameInput).focus();
}

loginForm.addEventListener("submit", (e) => {
  e.preventDefault();
  void logIn();
});

async function logIn(): Promise<void> {
  const name = nameInput.value.trim();
  const tenant = tenantInput.value.trim();
  const code = codeInput.value.replace(/\s/g, "");
  const password = passwordInput.value;
  if (!name || !password) return say("login-alert", "Enter your name and password.");
  if (code && !/^\d{6}$/.test(code)) return say("login-alert", "The one-time code has 6 digits.");
  const login = tenant ? `${name}@${tenant}` : name;
  say("login-alert");
  loginButton.disabled = true;
  try {
    // X-QVD-Web: the server then sends no WWW-Authenticate, so the browser shows no dialog of its own.
    const r = await fetch("/qvd/create_auth_token", {
      headers: { authorization: basic(`${login}:${password}${code}`), "x-qvd-web": "1" },
      cache: "no-store",
    });
    if (r.status === 401) return say("login-alert", "Wrong name or password");
    if (r.status === 429) {
      let text = await serverText(r, "Too many failed logins");
      const wait = r.headers.get("retry-after");
      if (wait && /^\d+$/.test(wait) && !text.includes(wait)) text += ` (try again in ${wait} seconds)`;
      return say("login-alert", text);
    }
    if (!r.ok) return say("login-alert", await serverText(r, `The server could not log you in (${r.status}).`));
    const body = (await r.json().catch(() => undefined)) as { auth_token?: unknown } | undefined;
    if (typeof body?.auth_token !== "string" || !body.auth_token.trim())
      return say("login-alert", "The server sent an answer this page does not understand.");
    token = body.auth_token.trim();
    passwordInput.value = "";
    codeInput.value = "";
    el("whoami").textContent = login;
    await showList();
  } catch {
    say("login-alert", "The server cannot be reached. Check the network and try again.");
  } finally {
    loginButton.disabled = false;
  }
}

// --- the desktops ----------------------------------------------------------------------------

el("logout").addEventListener("click", () => showLogin());
el("refresh").addEventListener("click", () => void showList());

async function showList(): Promise<void> {
  leaveFullscreen();
  show("list");
  const t = token;
  if (!t) return showLogin();
  try {
    const r = await fetch("/qvd/list_of_vm", {
      headers: { authorization: `Bearer ${t}`, "x-qvd-web": "1" },
      cache: "no-store",
    });
    if (token !== t) return; // logged out meanwhile
    if (r.status === 401) return showLogin(EXPIRED);
    if (!r.ok) return say("list-alert", await serverText(r, `The list of desktops could not be loaded (${r.status}).`));
    const vms = (await r.json()) as Vm[];
    if (token !== t) return;
    if (!Array.isArray(vms)) throw new Error("not a list");
    say("list-alert");
    renderList(vms);
  } catch {
    if (token === t) say("list-alert", "The list of desktops could not be loaded. Try Refresh.");
  }
}

function renderList(vms: Vm[]): void {
  el("list-empty").hidden = vms.length > 0;
  desktops.replaceChildren(
    ...vms.map((vm, i) => {
      const li = document.createElement("li");
      const name = document.createElement("span");
      name.className = "vm-name";
      name.id = `vm-${i}`;
      name.textContent = String(vm.name);
      const state = document.createElement("span");
      state.className = "vm-state";
      const blocked = !!vm.blocked && vm.blocked !== "0";
      state.textContent = blocked ? "blocked" : String(vm.state);
      const connect = document.createElement("button");
      connect.type = "button";
      connect.textContent = "Connect";
      connect.setAttribute("aria-describedby", name.id);
      connect.disabled = blocked;
      connect.addEventListener("click", () => connectTo(vm));
      li.append(name, state, connect);
      return li;
    }),
  );
}

// --- a session -------------------------------------------------------------------------------

function addLine(text: string): void {
  const li = document.createElement("li");
  li.textContent = text;
  progress.append(li);
}

function connectTo(vm: Vm): void {
  if (!token) return showLogin();
  lastVm = vm;
  // A new session's clipboard is unknown: the first focus sends the system clipboard's text.
  lastClipboard = "";
  show("session");
  el("session-name").textContent = String(vm.name);
  progress.replaceChildren();
  say("session-alert");
  sessionActions.hidden = true;
  status.hidden = false;
  setClipboardPanel(false);
  addLine("Connecting…");
  let ws: WebSocket;
  try {
    ws = new WebSocket(`${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/qvd/web/connect`);
  } catch {
    return endSession(LOST);
  }
  // Set now, not only by noVNC: RFB frames may already be queued when the socket is handed over.
  ws.binaryType = "arraybuffer";
  const s: Session = { vm, ws, opened: false, rfbStopped: false };
  session = s;
  // Added before noVNC sets ws.onclose, so this runs first (see stopRfb).
  ws.addEventListener("close", (e) => closed(s, e));
  ws.onopen = () => {
    s.opened = true;
    // The size the desktop will have: the stage below the bar, in CSS pixels as noVNC's resizeSession.
    ws.send(
      JSON.stringify({
        token,
        id: vm.id,
        width: Math.max(1, screen.clientWidth),
        height: Math.max(1, screen.clientHeight),
      }),
    );
  };
  ws.onmessage = (e: MessageEvent) => control(s, e);
}

/** A text frame before `ready`. */
function control(s: Session, e: MessageEvent): void {
  let m: { type?: unknown; text?: unknown; status?: unknown; message?: unknown } | undefined;
  try {
    m = typeof e.data === "string" ? JSON.parse(e.data) : undefined;
  } catch {
    m = undefined;
  }
  if (!m || typeof m !== "object") {
    s.broken = "The server sent something this page does not understand.";
    s.ws.onmessage = null;
    s.ws.close();
    return;
  }
  if (m.type === "progress") addLine(String(m.text ?? ""));
  else if (m.type === "error")
    s.error = { status: Number(m.status), message: typeof m.message === "string" ? m.message : "" };
  else if (m.type === "ready") {
    // RFB from the next frame on: noVNC must own the socket before that frame is dispatched,
    // so it is handed over here, synchronously (noVNC replaces onmessage).
    s.ws.onmessage = null;
    startRfb(s);
  }
}

function startRfb(s: Session): void {
  let rfb: RFB;
  try {
    rfb = new RFB(screen, s.ws);
  } catch {
    s.broken = "The desktop viewer could not start in this browser.";
    s.ws.close();
    return;
  }
  s.rfb = rfb;
  rfb.resizeSession = true;
  rfb.scaleViewport = false;
  rfb.focusOnClick = true;
  rfb.showDotCursor = false;
  rfb.addEventListener("connect", () => {
    if (session !== s) return;
    status.hidden = true;
    rfb.focus({ preventScroll: true });
  });
  rfb.addEventListener("disconnect", () => {
    s.rfbStopped = true;
  });
  rfb.addEventListener("clipboard", (e) => {
    const text = (e as CustomEvent<{ text: string }>).detail.text;
    lastClipboard = text;
    clipboardText.value = text;
    // Refused without focus or permission: the Clipboard panel has the text anyway.
    navigator.clipboard?.writeText(text).catch(() => {});
  });
}

/**
 * noVNC logs an error when its socket closes before its handshake is done; told first (this
 * listener precedes noVNC's onclose), it takes the close as its own disconnect and stays quiet.
 */
function stopRfb(s: Session): void {
  if (s.rfb && !s.rfbStopped) {
    s.rfbStopped = true;
    s.rfb.disconnect();
  }
}

function closed(s: Session, e: CloseEvent): void {
  stopRfb(s);
  if (session !== s) return; // the user left it (Disconnect)
  session = undefined;
  if (e.code === 4401 || s.error?.status === 401) return showLogin(EXPIRED);
  if (e.code === 4001) return endSession(TAKEN_OVER);
  if (e.code === 4002) return endSession(ENDED);
  if (s.error) return endSession(s.error.message || `The server refused the connection (${s.error.status}).`);
  if (s.broken) return endSession(`${LOST}\n${s.broken}`);
  if (!s.opened) return endSession("The desktop could not be reached. Check the network and try again.");
  if (e.code === 1001) return endSession(`${LOST}\nThe server is shutting down; reconnect in a moment.`);
  endSession(e.reason ? `${LOST}\n${e.reason}` : LOST);
}

/** Shows why the session is over, with Reconnect. */
function endSession(message: string): void {
  session = undefined;
  setClipboardPanel(false);
  status.hidden = false;
  say("session-alert", message);
  sessionActions.hidden = false;
  el("reconnect").focus();
}

el("reconnect").addEventListener("click", () => {
  if (lastVm) connectTo(lastVm);
});
el("back").addEventListener("click", () => void showList());

el("disconnect").addEventListener("click", () => {
  const s = session;
  session = undefined;
  if (s) {
    if (s.rfb) stopRfb(s);
    // Closing a socket still connecting makes Chromium log an error: close it once open.
    else if (s.ws.readyState === WebSocket.CONNECTING) s.ws.onopen = () => s.ws.close();
    else s.ws.close();
  }
  void showList();
});

// --- the bar ---------------------------------------------------------------------------------

function leaveFullscreen(): void {
  if (document.fullscreenElement) document.exitFullscreen().catch(() => {});
}

fullscreenButton.hidden = !document.fullscreenEnabled;
fullscreenButton.addEventListener("click", () => {
  if (document.fullscreenElement) leaveFullscreen();
  else views.session.requestFullscreen().catch(() => {});
});
document.addEventListener("fullscreenchange", () => {
  fullscreenButton.setAttribute("aria-pressed", String(!!document.fullscreenElement));
});

function setClipboardPanel(open: boolean): void {
  clipboardPanel.hidden = !open;
  clipboardToggle.setAttribute("aria-expanded", String(open));
}

clipboardToggle.addEventListener("click", () => {
  const open = clipboardPanel.hidden;
  setClipboardPanel(open);
  if (open) clipboardText.focus();
  else session?.rfb?.focus({ preventScroll: true });
});

clipboardText.addEventListener("input", () => {
  lastClipboard = clipboardText.value;
  session?.rfb?.clipboardPasteFrom(clipboardText.value);
});

// Focusing the desktop (a click, or coming back to the window) brings the system clipboard
// along when the browser lets the page read it; a browser that asks first asks on this click.
screen.addEventListener("focusin", () => void pasteSystemClipboard());

async function pasteSystemClipboard(): Promise<void> {
  const s = session;
  if (!s?.rfb || !navigator.clipboard?.readText) return;
  try {
    const p = await navigator.permissions.query({ name: "clipboard-read" as PermissionName });
    if (p.state === "denied") return;
    const text = await navigator.clipboard.readText();
    if (session !== s || text === lastClipboard) return;
    lastClipboard = text;
    clipboardText.value = text;
    s.rfb.clipboardPasteFrom(text);
  } catch {
    // Not allowed here (or no such permission in this browser): the Clipboard panel still works.
  }
}

// A last resort so that no failure is only a console error.
window.addEventListener("unhandledrejection", (e) => {
  e.preventDefault();
  failure(e.reason);
});
window.addEventListener("error", (e) => {
  e.preventDefault();
  failure(e.error ?? e.message);
});

function failure(reason: unknown): void {
  const text = `Something went wrong in this page: ${reason instanceof Error ? reason.message : String(reason)}`;
  if (!views.login.hidden) say("login-alert", text);
  else if (!views.list.hidden) say("list-alert", text);
  else if (!session) say("session-alert", text);
}

showLogin();
