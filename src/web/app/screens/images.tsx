// Images: the "New image" dialog (create the image, upload the file with a progress bar) and
// the tag editor of an image (default, head, custom tags; expiry for running VMs on a move).
import { useEffect, useRef, useState } from "preact/hooks";
import { api, type ApiError, qs } from "../api.ts";
import { useSession } from "../session.ts";
import { Button, ErrorLine, Field, Modal, notify } from "../ui.tsx";
import { fieldMessage, useLoad } from "../load.ts";
import { bytes, UploadAborted, uploadImage, type Upload } from "./upload.ts";

type Phase = "form" | "uploading" | "failed" | "done";

/** A safe file name for the server (path.storage.images/<name>): no directories, no blanks. */
const serverName = (file: string, kvm: boolean) =>
  file
    .replace(/^.*[\\/]/, "")
    .replace(/[^A-Za-z0-9._+-]+/g, "_")
    .slice(0, 200) || (kvm ? "image.qcow2" : "image.tar.gz");

export function NewImageDialog(props: { osfId?: number; onClose: () => void; onCreated: (id: number) => void }) {
  const session = useSession();
  const osfs = useLoad(
    (s) =>
      api.get<{ items: { id: number; name: string; tenant_name: string; hypervisor: string }[] }>(
        `/osfs${qs({ sort: "name", limit: 1000, fields: "id,name,tenant_name,hypervisor" })}`,
        s,
      ),
    [],
  );
  const [osf, setOsf] = useState(props.osfId ? String(props.osfId) : "");
  const [version, setVersion] = useState("");
  const [description, setDescription] = useState("");
  const [file, setFile] = useState<File>();
  const [path, setPath] = useState("");
  const [pathEdited, setPathEdited] = useState(false);
  const [phase, setPhase] = useState<Phase>("form");
  const [diId, setDiId] = useState<number>();
  const [progress, setProgress] = useState({ sent: 0, total: 0, since: 0 });
  const [errors, setErrors] = useState<Record<string, string>>({});
  const [error, setError] = useState<string>();
  const [hint, setHint] = useState<string>();
  const upload = useRef<Upload>();
  // Modal keeps the first onClose it is given, so the close handler reads the phase from a ref.
  const busyRef = useRef(false);
  busyRef.current = phase === "uploading";

  // Leaving the page would break the upload: the browser asks first.
  useEffect(() => {
    if (phase !== "uploading") return;
    const warn = (e: BeforeUnloadEvent) => e.preventDefault();
    addEventListener("beforeunload", warn);
    return () => removeEventListener("beforeunload", warn);
  }, [phase]);
  useEffect(() => () => upload.current?.abort(), []);

  const start = async (id: number, f: File) => {
    setPhase("uploading");
    setError(undefined);
    setProgress({ sent: 0, total: f.size, since: Date.now() });
    const u = uploadImage(id, f, (sent, total) => setProgress((p) => ({ ...p, sent, total })));
    upload.current = u;
    try {
      await u.done;
      upload.current = undefined;
      setPhase("done");
      notify(`Image ${f.name} uploaded`);
      props.onCreated(id);
    } catch (err) {
      upload.current = undefined;
      if (err instanceof UploadAborted) return;
      setPhase("failed");
      setError(
        `${(err as Error).message.replace(/ \(the image is marked failed; upload it again\)$/, "")}. The image is kept, marked failed: upload the file again, or delete it.`,
      );
    }
  };

  const submit = async (e: Event) => {
    e.preventDefault();
    setErrors({});
    setError(undefined);
    if (!file) return setErrors({ file: "choose the image file to upload" });
    if (diId !== undefined) return start(diId, file);
    try {
      const body: Record<string, unknown> = { osf_id: Number(osf), path: path || serverName(file.name, kvm) };
      if (version.trim()) body.version = version.trim();
      if (description.trim()) body.description = description.trim();
      const di = await api.post<{ id: number }>("/dis", body);
      setDiId(di.id);
      await start(di.id, file);
    } catch (err) {
      const a = err as ApiError;
      if (a.field) setErrors({ [a.field]: fieldMessage(a.message, a.field) });
      else setError(a.message);
    }
  };

  const cancel = async () => {
    upload.current?.abort();
    upload.current = undefined;
    const id = diId;
    props.onClose();
    if (id === undefined) return;
    // The server notices the broken upload, removes the partial file and marks the image failed.
    if (!session.can("di.delete"))
      return notify(
        `Upload cancelled. Image ${id} stays, marked failed: upload its file again from its page, or have it deleted.`,
        "error",
      );
    try {
      await api.del(`/dis/${id}`);
      notify("Upload cancelled; the new image was deleted.");
    } catch (err) {
      notify(
        `Upload cancelled, but image ${id} could not be deleted (${(err as Error).message}); it stays, marked failed.`,
        "error",
      );
    }
  };

  const remove = async () => {
    if (diId === undefined) return;
    try {
      await api.del(`/dis/${diId}`);
      notify("The failed image was deleted.");
      props.onClose();
    } catch (err) {
      setError(`Cannot delete the image: ${(err as Error).message}`);
    }
  };

  const pct = progress.total ? Math.floor((progress.sent / progress.total) * 100) : 0;
  const secs = (Date.now() - progress.since) / 1000;
  const rate = secs > 0.5 ? progress.sent / secs : 0;
  const busy = phase === "uploading";
  const fixed = diId !== undefined; // created: only the file can change now
  // The OSF's hypervisor decides the kind of image (the API refuses the other kind).
  const kvm = (osfs.data?.items ?? []).find((o) => String(o.id) === osf)?.hypervisor === "kvm";

  return (
    <Modal
      title="New image"
      onClose={() =>
        busyRef.current ? setHint("The upload is still running: use Cancel upload to stop it.") : props.onClose()
      }
    >
      <form onSubmit={submit} class="image-form">
        <Field label="OS flavour" error={errors.osf_id ?? (osfs.error && `Cannot list the OS flavours: ${osfs.error}`)}>
          {(a) => (
            <select
              {...a}
              required
              value={osf}
              disabled={fixed || busy}
              onChange={(e) => setOsf(e.currentTarget.value)}
            >
              <option value="">Choose an OS flavour…</option>
              {(osfs.data?.items ?? []).map((o) => (
                <option key={o.id} value={String(o.id)}>
                  {session.multitenant ? `${o.name} (${o.tenant_name})` : o.name}
                </option>
              ))}
            </select>
          )}
        </Field>
        <Field
          label="Version"
          hint="Optional; empty: today's date and a number, e.g. 2024-05-01-000"
          error={errors.version}
        >
          {(a) => (
            <input
              {...a}
              value={version}
              disabled={fixed || busy}
              maxLength={64}
              onInput={(e) => setVersion(e.currentTarget.value)}
            />
          )}
        </Field>
        <Field label="Description" error={errors.description}>
          {(a) => (
            <input
              {...a}
              value={description}
              disabled={fixed || busy}
              onInput={(e) => setDescription(e.currentTarget.value)}
            />
          )}
        </Field>
        <Field
          label="Image file"
          hint={
            kvm ? "A KVM disk image: .qcow2 (qvd di build --kvm)" : "An LXC root file system: .tar.gz (qvd di build)"
          }
          error={errors.file}
        >
          {(a) => (
            <input
              {...a}
              type="file"
              accept={kvm ? ".qcow2" : ".tar.gz,.tgz,.tar,.gz,.tar.xz,.tar.zst"}
              disabled={busy}
              onChange={(e) => {
                const f = e.currentTarget.files?.[0];
                setFile(f);
                if (f && !pathEdited && !fixed) setPath(serverName(f.name, kvm));
              }}
            />
          )}
        </Field>
        <Field label="File name on the server" hint="Under the images directory; must be unique" error={errors.path}>
          {(a) => (
            <input
              {...a}
              value={path}
              disabled={fixed || busy}
              maxLength={255}
              onInput={(e) => {
                setPath(e.currentTarget.value);
                setPathEdited(true);
              }}
            />
          )}
        </Field>
        {phase !== "form" && (
          <div class="upload-progress">
            <label for="upload-bar">Upload progress</label>
            <progress id="upload-bar" max={100} value={pct} aria-valuetext={`${pct}%`} />
            <div class="muted" aria-live="polite">
              {phase === "done"
                ? `Uploaded ${bytes(progress.total)}.`
                : phase === "failed"
                  ? `Stopped at ${pct}%.`
                  : progress.sent >= progress.total && progress.total > 0
                    ? "All sent; the server is checking and storing the file…"
                    : `${pct}% — ${bytes(progress.sent)} of ${bytes(progress.total)}${rate ? `, ${bytes(rate)}/s` : ""}`}
            </div>
          </div>
        )}
        <ErrorLine error={error} />
        {hint && busy && (
          <p class="muted" role="status">
            {hint}
          </p>
        )}
        <div class="actions">
          {busy ? (
            <Button kind="danger" onClick={cancel}>
              Cancel upload
            </Button>
          ) : phase === "done" ? (
            <Button kind="primary" onClick={props.onClose}>
              Close
            </Button>
          ) : (
            <>
              {phase === "failed" && session.can("di.delete") && (
                <Button kind="danger" onClick={remove}>
                  Delete image
                </Button>
              )}
              <Button onClick={props.onClose}>Cancel</Button>
              <Button type="submit" kind="primary">
                {phase === "failed" ? "Upload again" : "Upload"}
              </Button>
            </>
          )}
        </div>
      </form>
    </Modal>
  );
}

// --- tags ------------------------------------------------------------------------------------

interface Di {
  id: number;
  version?: string;
  state?: string;
  tags?: string[];
  expire_soft_s?: number | null;
  expire_hard_s?: number | null;
  [k: string]: unknown;
}

const PROTECTED = ["head", "default"];

function tagKind(tag: string, di: Di): string {
  if (tag === di.version) return "version";
  if (tag === "head") return "newest";
  if (tag === "default") return "for new VMs";
  return "";
}

const duration = (s: number) =>
  s < 3600
    ? `${Math.round(s / 60)} min`
    : s < 86400
      ? `${+(s / 3600).toFixed(1)} h`
      : `${+(s / 86400).toFixed(1)} days`;

type ExpiryChoice = { mode: "image" | "never" | "at"; at: string };

/** Seconds from now for the API: undefined = the image's own setting, null = never. */
function expirySeconds(c: ExpiryChoice): number | null | undefined | string {
  if (c.mode === "image") return undefined;
  if (c.mode === "never") return null;
  if (!c.at) return "choose a date and time";
  const s = Math.round((new Date(c.at).getTime() - Date.now()) / 1000);
  return s < 0 ? "choose a time in the future" : s;
}

function ExpiryField(props: {
  label: string;
  own?: number | null;
  value: ExpiryChoice;
  error?: string;
  onChange: (c: ExpiryChoice) => void;
  disabled?: boolean;
}) {
  const own = props.own == null ? "no limit" : `${duration(props.own)} after the move`;
  return (
    <Field label={props.label} error={props.error}>
      {(a) => (
        <div class="expiry">
          <select
            {...a}
            value={props.value.mode}
            disabled={props.disabled}
            onChange={(e) => props.onChange({ ...props.value, mode: e.currentTarget.value as ExpiryChoice["mode"] })}
          >
            <option value="image">The image's setting ({own})</option>
            <option value="never">No limit</option>
            <option value="at">At a date and time…</option>
          </select>
          {props.value.mode === "at" && (
            <input
              type="datetime-local"
              aria-label={`${props.label} (date and time)`}
              value={props.value.at}
              disabled={props.disabled}
              onInput={(e) => props.onChange({ ...props.value, at: e.currentTarget.value })}
            />
          )}
        </div>
      )}
    </Field>
  );
}

export function ImageTags(props: { di: { id: number; [k: string]: unknown }; onChange: () => void }) {
  const session = useSession();
  const [di, setDi] = useState<Di>(props.di);
  useEffect(() => setDi(props.di), [props.di]);
  const [tag, setTag] = useState("");
  const [soft, setSoft] = useState<ExpiryChoice>({ mode: "image", at: "" });
  const [hard, setHard] = useState<ExpiryChoice>({ mode: "image", at: "" });
  const [busy, setBusy] = useState(false);
  const [errors, setErrors] = useState<Record<string, string>>({});
  const [error, setError] = useState<string>();
  const editable = session.can("di.tag");
  const tags = [...(di.tags ?? [])].sort(
    (a, b) =>
      Number(b === di.version) - Number(a === di.version) ||
      Number(PROTECTED.includes(b)) - Number(PROTECTED.includes(a)) ||
      a.localeCompare(b),
  );
  const unusable = di.state && di.state !== "ready" && di.state !== "published";

  const put = async (t: string, withExpiry: boolean) => {
    const e: Record<string, string> = {};
    const s = withExpiry ? expirySeconds(soft) : undefined;
    const h = withExpiry ? expirySeconds(hard) : undefined;
    if (typeof s === "string") e.expire_soft_s = s;
    if (typeof h === "string") e.expire_hard_s = h;
    if (!t.trim()) e.tag = "write a tag";
    setErrors(e);
    setError(undefined);
    if (Object.keys(e).length) return;
    setBusy(true);
    try {
      const body: Record<string, unknown> = { tag: t.trim() };
      if (s !== undefined) body.expire_soft_s = s;
      if (h !== undefined) body.expire_hard_s = h;
      const r = await api.post<{ di: Di; previous_di_id: number | null }>(`/dis/${di.id}/tags`, body);
      setDi(r.di);
      setTag("");
      const previous = r.previous_di_id
        ? await api.get<Di>(`/dis/${r.previous_di_id}`).catch(() => undefined)
        : undefined;
      notify(
        r.previous_di_id
          ? `Tag ${t.trim()} moved here from ${previous ? `version ${previous.version}` : `image ${r.previous_di_id}`}`
          : `Tag ${t.trim()} added`,
      );
      props.onChange();
    } catch (err) {
      const a = err as ApiError;
      if (a.field === "tag" || a.field?.startsWith("expire_"))
        setErrors({ [a.field]: fieldMessage(a.message, a.field) });
      else setError(a.message);
    }
    setBusy(false);
  };

  const untag = async (t: string) => {
    setBusy(true);
    setError(undefined);
    try {
      setDi(await api.del<Di>(`/dis/${di.id}/tags/${encodeURIComponent(t)}`));
      notify(`Tag ${t} removed`);
      props.onChange();
    } catch (err) {
      setError((err as Error).message);
    }
    setBusy(false);
  };

  return (
    <div class="di-tags">
      {unusable && (
        <p class="st-note" role="note">
          This image is {di.state}: VMs whose tag points here will not start from it until it is ready.
        </p>
      )}
      <ul class="st-chips" aria-label="Tags of this image">
        {tags.map((t) => (
          <li key={t} class={`st-chip ${t === di.version ? "st-chip-fixed" : ""}`}>
            <code>{t}</code>
            {tagKind(t, di) && <span class="muted"> · {tagKind(t, di)}</span>}
            {editable && t !== di.version && !PROTECTED.includes(t) && (
              <Button
                kind="plain"
                class="st-chip-remove"
                disabled={busy}
                aria-label={`Remove tag ${t}`}
                onClick={() => untag(t)}
              >
                Remove
              </Button>
            )}
          </li>
        ))}
      </ul>
      <p class="muted">
        The version tag is fixed; <code>head</code> and <code>default</code> move here from the OS flavour's other image
        when put on this one.
      </p>
      {editable && !tags.includes("default") && (
        <p>
          <Button disabled={busy} onClick={() => put("default", true)}>
            Make default
          </Button>{" "}
          <span class="muted">new VMs (and VMs with the default tag, at their next start) use this image</span>
        </p>
      )}
      {editable && (
        <form
          class="tag-form"
          onSubmit={(e) => {
            e.preventDefault();
            void put(tag, true);
          }}
        >
          <Field
            label="Add a tag"
            hint="Moves the tag here if another image of the OS flavour has it"
            error={errors.tag}
          >
            {(a) => (
              <input
                {...a}
                value={tag}
                maxLength={128}
                disabled={busy}
                onInput={(e) => setTag(e.currentTarget.value)}
              />
            )}
          </Field>
          <fieldset class="expiry-set">
            <legend>Running VMs still on the old image</legend>
            <ExpiryField
              label="Must restart by"
              own={di.expire_soft_s}
              value={soft}
              error={errors.expire_soft_s}
              onChange={setSoft}
              disabled={busy}
            />
            <ExpiryField
              label="Will be stopped at"
              own={di.expire_hard_s}
              value={hard}
              error={errors.expire_hard_s}
              onChange={setHard}
              disabled={busy}
            />
          </fieldset>
          <ErrorLine error={error} />
          <div class="actions">
            <Button type="submit" kind="primary" busy={busy}>
              Add tag
            </Button>
          </div>
        </form>
      )}
      {!editable && error && <ErrorLine error={error} />}
    </div>
  );
}
