// Running an object action on one object or on a selection (the chosen ids, or everything
// matching the filter), asking first when the spec says so, and reporting what happened:
// "3 done, 1 failed: vm "x" is running; stop it before deleting it".
import { useState } from "preact/hooks";
import { api } from "../api.ts";
import { useSession } from "../session.ts";
import { Button, Confirm, notify } from "../ui.tsx";
import { ObjectForm } from "./form.tsx";
import { selectionQuery, selectionSize, type Selection } from "./query.ts";
import type { ActionSpec, ObjectSpec, Row } from "./types.ts";

export interface MassResult {
  total: number;
  ok: number;
  failed: number;
  results: { id: number; ok: boolean; error?: string }[];
}

export function describeMass(r: MassResult): string {
  if (!r.total) return "Nothing matched";
  if (!r.failed) return `${r.ok} done`;
  const reasons = new Map<string, number>();
  for (const x of r.results) if (!x.ok) reasons.set(x.error ?? "failed", (reasons.get(x.error ?? "failed") ?? 0) + 1);
  const why = [...reasons]
    .slice(0, 3)
    .map(([m, n]) => (n > 1 ? `${m} (×${n})` : m))
    .join("; ");
  return `${r.ok} done, ${r.failed} failed: ${why}${reasons.size > 3 ? "; …" : ""}`;
}

async function runMass(spec: ObjectSpec, a: ActionSpec, sel: Selection, reason?: string): Promise<MassResult> {
  const q = selectionQuery(sel);
  const r = a.run;
  if ("action" in r) return api.post(`/${spec.path}/actions/${r.action}${q}`, withReason(r.body, reason));
  if ("patch" in r) return api.patch(`/${spec.path}${q}`, r.patch);
  if ("delete" in r) return api.del(`/${spec.path}${q}`);
  throw new Error(`${a.label} acts on one ${spec.singular} at a time`);
}

const withReason = (body: Record<string, unknown> | undefined, reason: string | undefined) =>
  reason === undefined ? (body ?? {}) : { ...body, reason };

async function runSingle(spec: ObjectSpec, a: ActionSpec, row: Row, reason?: string): Promise<string> {
  const r = a.run;
  const name = spec.name(row);
  if ("action" in r) await api.post(`/${spec.path}/${row.id}/${r.action}`, withReason(r.body, reason));
  else if ("patch" in r) await api.patch(`/${spec.path}/${row.id}`, r.patch);
  else if ("delete" in r) await api.del(`/${spec.path}/${row.id}`);
  else return (await r.custom(row)) ?? `${cap(spec.singular)} ${name} ${a.done}`;
  return `${cap(spec.singular)} ${name} ${a.done}`;
}

const cap = (s: string) => s.charAt(0).toUpperCase() + s.slice(1);

/** Whether the administrator may edit a selection (the spec has fields for it that they may change). */
export const massEditable = (spec: ObjectSpec, can: (acl: string) => boolean) =>
  spec.fields.some((f) => f.mass && can(f.acl ?? `${spec.acl}.update`));

export const allowedActions = (spec: ObjectSpec, can: (acl: string) => boolean) =>
  spec.actions.filter((a) => [a.acl].flat().every(can));

/** A button per action, with the confirmation dialog and error notices. */
function ActionButtons(props: {
  actions: ActionSpec[];
  what: string;
  disabled?: boolean;
  run: (a: ActionSpec, reason?: string) => Promise<void>;
}) {
  const [asking, setAsking] = useState<ActionSpec>();
  const [busy, setBusy] = useState<string>();
  return (
    <>
      {props.actions.map((a) => (
        <Button
          key={a.label}
          kind={a.danger ? "danger" : "plain"}
          disabled={props.disabled}
          busy={busy === a.label}
          onClick={async () => {
            if (a.confirm) return setAsking(a);
            setBusy(a.label);
            try {
              await props.run(a);
            } catch (err) {
              notify(`${a.label}: ${(err as Error).message}`, "error");
            } finally {
              setBusy(undefined);
            }
          }}
        >
          {a.label}
        </Button>
      ))}
      {asking && (
        <Confirm
          title={`${asking.label} ${props.what}`}
          message={asking.confirm!(props.what)}
          action={asking.label}
          danger={asking.danger}
          reason={asking.reason}
          onConfirm={(reason) => props.run(asking, reason)}
          onClose={() => setAsking(undefined)}
        />
      )}
    </>
  );
}

/** Buttons of the actions that apply to one object (its detail page). */
export function SingleActions(props: { spec: ObjectSpec; row: Row; onDone: (a: ActionSpec) => void }) {
  const s = useSession();
  const { spec, row } = props;
  const acts = allowedActions(spec, s.can).filter(
    (a) => a.single !== false && (!a.when || a.when(row, s.administrator.id)),
  );
  return (
    <ActionButtons
      actions={acts}
      what={`${spec.singular} ${spec.name(row)}`}
      run={async (a, reason) => {
        notify(await runSingle(spec, a, row, reason));
        props.onDone(a);
      }}
    />
  );
}

/** The toolbar acting on a list's selection. */
export function MassActions(props: { spec: ObjectSpec; selection: Selection; onDone: () => void }) {
  const s = useSession();
  const { spec, selection } = props;
  const n = selectionSize(selection);
  const [editing, setEditing] = useState(false);
  const acts = allowedActions(spec, s.can).filter((a) => a.mass ?? !("custom" in a.run));
  const canEdit = massEditable(spec, s.can);
  if (!acts.length && !canEdit) return null;
  return (
    <div
      class="toolbar mass"
      role="toolbar"
      aria-label={`Actions on the selected ${spec.plural}`}
      data-empty={n ? undefined : ""}
    >
      <span class="muted">
        {n
          ? `${n === 1 ? `1 ${spec.singular}` : `${n} ${spec.plural}`} selected`
          : `Select ${spec.plural} to act on them`}
      </span>
      {canEdit && (
        <Button disabled={!n} onClick={() => setEditing(true)}>
          Edit
        </Button>
      )}
      {editing && (
        <ObjectForm
          spec={spec}
          selection={selection}
          onClose={() => setEditing(false)}
          onSaved={() => {}}
          onMassSaved={(r) => {
            setEditing(false);
            notify(`Edit: ${describeMass(r)}`, r.failed ? "error" : "ok");
            props.onDone();
          }}
        />
      )}
      <ActionButtons
        actions={acts}
        what={n === 1 ? `1 ${spec.singular}` : `${n} ${spec.plural}`}
        disabled={!n}
        run={async (a, reason) => {
          const r = await runMass(spec, a, selection, reason);
          notify(`${a.label}: ${describeMass(r)}`, r.failed ? "error" : "ok");
          props.onDone();
        }}
      />
    </div>
  );
}

/** The usual Delete action of a spec. */
export const deleteAction = (acl: string, extra: Partial<ActionSpec> = {}): ActionSpec => ({
  label: "Delete",
  acl: `${acl}.delete`,
  run: { delete: true },
  danger: true,
  confirm: (what) => `Delete ${what}? This cannot be undone.`,
  done: "deleted",
  ...extra,
});
