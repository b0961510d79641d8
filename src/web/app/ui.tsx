// The few building blocks every screen uses: buttons, form fields with the server's error
// beside them, a modal dialog, notices and a loading line. Plain elements with real labels
// and roles, so the app works with the keyboard and with screen readers.
import type { ComponentChildren, JSX } from "preact";
import { useEffect, useRef, useState } from "preact/hooks";
import { href, navigate } from "./router.ts";

export function Link(props: { to: string; children: ComponentChildren; class?: string; title?: string }) {
  return (
    <a
      href={href(props.to)}
      class={props.class}
      title={props.title}
      onClick={(e) => {
        if (e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
        e.preventDefault();
        navigate(props.to);
      }}
    >
      {props.children}
    </a>
  );
}

type ButtonProps = JSX.ButtonHTMLAttributes<HTMLButtonElement> & {
  kind?: "primary" | "danger" | "plain";
  busy?: boolean;
};
export function Button({ kind = "plain", busy, children, class: cls, disabled, type, ...rest }: ButtonProps) {
  return (
    <button
      type={type ?? "button"}
      class={`btn btn-${kind} ${cls ?? ""}`}
      disabled={disabled || busy}
      aria-busy={busy || undefined}
      {...rest}
    >
      {children}
    </button>
  );
}

let fieldSeq = 0;
/** A labelled input with its error shown beside it (and announced: aria-describedby). */
export function Field(props: {
  label: string;
  error?: string;
  hint?: string;
  children: (attrs: { id: string; "aria-invalid"?: boolean; "aria-describedby"?: string }) => ComponentChildren;
}) {
  const id = useRef(`f${++fieldSeq}`).current;
  const errId = `${id}-err`;
  return (
    <div class={`field ${props.error ? "field-invalid" : ""}`}>
      <label for={id}>{props.label}</label>
      {props.children({
        id,
        "aria-invalid": props.error ? true : undefined,
        "aria-describedby": props.error ? errId : undefined,
      })}
      {props.hint && !props.error && <div class="field-hint">{props.hint}</div>}
      {props.error && (
        <div class="field-error" id={errId} role="alert">
          {props.error}
        </div>
      )}
    </div>
  );
}

/** A modal dialog (native <dialog>: focus is trapped and Escape closes it). */
export function Modal(props: { title: string; onClose: () => void; children: ComponentChildren; wide?: boolean }) {
  const ref = useRef<HTMLDialogElement>(null);
  // Escape calls the onClose of the latest render (it may depend on state, e.g. an upload running).
  const onClose = useRef(props.onClose);
  onClose.current = props.onClose;
  useEffect(() => {
    const d = ref.current!;
    if (!d.open) d.showModal();
    const onCancel = (e: Event) => {
      e.preventDefault();
      onClose.current();
    };
    d.addEventListener("cancel", onCancel);
    return () => d.removeEventListener("cancel", onCancel);
  }, []);
  return (
    <dialog ref={ref} class={`modal ${props.wide ? "modal-wide" : ""}`} aria-labelledby="modal-title">
      <header class="modal-head">
        <h2 id="modal-title">{props.title}</h2>
        <button type="button" class="btn btn-plain modal-close" aria-label="Close" onClick={props.onClose}>
          ×
        </button>
      </header>
      <div class="modal-body">{props.children}</div>
    </dialog>
  );
}

/** Asks before something that cannot be undone. */
export function Confirm(props: {
  title: string;
  message: ComponentChildren;
  action: string;
  danger?: boolean;
  /** Also asks for a (required) reason with this label, passed to onConfirm. */
  reason?: string;
  onConfirm: (reason?: string) => Promise<void> | void;
  onClose: () => void;
}) {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string>();
  const [reason, setReason] = useState("");
  return (
    <Modal title={props.title} onClose={props.onClose}>
      <p>{props.message}</p>
      {props.reason && (
        <Field label={props.reason}>
          {(attrs) => (
            <input
              {...attrs}
              type="text"
              required
              maxLength={1000}
              value={reason}
              onInput={(e) => setReason(e.currentTarget.value)}
            />
          )}
        </Field>
      )}
      {error && (
        <p class="error" role="alert">
          {error}
        </p>
      )}
      <div class="actions">
        <Button onClick={props.onClose}>Cancel</Button>
        <Button
          kind={props.danger ? "danger" : "primary"}
          busy={busy}
          onClick={async () => {
            if (props.reason && !reason.trim()) return setError(`${props.reason}: required`);
            setBusy(true);
            setError(undefined);
            try {
              await props.onConfirm(props.reason ? reason.trim() : undefined);
              props.onClose();
            } catch (err) {
              setError((err as Error).message);
              setBusy(false);
            }
          }}
        >
          {props.action}
        </Button>
      </div>
    </Modal>
  );
}

// Notices: short messages at the top right ("VM started", errors of background actions).
type Notice = { id: number; text: string; kind: "ok" | "error" };
let notices: Notice[] = [];
let noticeSeq = 0;
const noticeListeners = new Set<(n: Notice[]) => void>();
export function notify(text: string, kind: "ok" | "error" = "ok"): void {
  const n = { id: ++noticeSeq, text, kind };
  notices = [...notices, n].slice(-5);
  for (const f of noticeListeners) f(notices);
  setTimeout(
    () => {
      notices = notices.filter((x) => x !== n);
      for (const f of noticeListeners) f(notices);
    },
    kind === "error" ? 8000 : 4000,
  );
}
export function Notices() {
  const [list, setList] = useState(notices);
  useEffect(() => {
    noticeListeners.add(setList);
    return () => void noticeListeners.delete(setList);
  }, []);
  return (
    <div class="notices" role="status" aria-live="polite">
      {list.map((n) => (
        <div key={n.id} class={`notice notice-${n.kind}`}>
          {n.text}
        </div>
      ))}
    </div>
  );
}

export function Loading(props: { what?: string }) {
  return (
    <p class="loading" aria-live="polite">
      Loading{props.what ? ` ${props.what}` : ""}…
    </p>
  );
}

export function ErrorLine(props: { error?: string }) {
  return props.error ? (
    <p class="error" role="alert">
      {props.error}
    </p>
  ) : null;
}

/** "3 minutes ago" style for timestamps, with the exact time as a tooltip. */
export function When(props: { at?: string | null }) {
  if (!props.at) return <span class="muted">—</span>;
  const d = new Date(props.at);
  const s = Math.round((Date.now() - d.getTime()) / 1000);
  const a = Math.abs(s);
  const txt =
    a < 60
      ? "just now"
      : a < 3600
        ? `${Math.round(a / 60)} min`
        : a < 86400
          ? `${Math.round(a / 3600)} h`
          : `${Math.round(a / 86400)} d`;
  return (
    <time dateTime={d.toISOString()} title={d.toLocaleString()}>
      {a < 60 ? txt : s >= 0 ? `${txt} ago` : `in ${txt}`}
    </time>
  );
}
