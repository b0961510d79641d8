// Live administrator sessions (who is logged in, from where) and ending one.
import { useState } from "preact/hooks";
import { api } from "../api.ts";
import { useSession } from "../session.ts";
import { Button, Confirm, ErrorLine, Loading, notify, When } from "../ui.tsx";
import { useLoad } from "../load.ts";

interface AdminSession {
  id: string;
  administrator_id: number;
  administrator_name: string;
  tenant_id: number;
  created_at: string;
  last_seen_at: string;
  expires_at: string;
  address: string | null;
  source: string;
}

export function SessionsPage() {
  const session = useSession();
  const list = useLoad((s) => api.get<{ items: AdminSession[] }>("/sessions", s), []);
  const [ending, setEnding] = useState<AdminSession>();
  const canEnd = session.can("session.delete");
  return (
    <section>
      <h1>Sessions</h1>
      <p class="muted">
        Administrators logged in now (WAT, CLI and API). Ending a session logs that administrator out at their next
        request.
      </p>
      <div class="st-filters">
        <Button onClick={() => void list.reload()} busy={list.loading && !!list.data}>
          Refresh
        </Button>
      </div>
      <ErrorLine error={list.error && `Cannot load the sessions: ${list.error}`} />
      {!list.data && !list.error && <Loading what="sessions" />}
      {list.data && (
        <div class="st-scroll">
          <table>
            <thead>
              <tr>
                <th scope="col">Administrator</th>
                <th scope="col">Source</th>
                <th scope="col">Address</th>
                <th scope="col">Logged in</th>
                <th scope="col">Last seen</th>
                <th scope="col">Expires</th>
                {canEnd && (
                  <th scope="col">
                    <span class="sr-only">Actions</span>
                  </th>
                )}
              </tr>
            </thead>
            <tbody>
              {list.data.items.map((s) => (
                <tr key={s.id}>
                  <td>
                    {s.administrator_name}
                    {s.administrator_id === session.administrator.id && <span class="muted"> (you)</span>}
                  </td>
                  <td>{s.source.toUpperCase()}</td>
                  <td>{s.address ?? <span class="muted">—</span>}</td>
                  <td>
                    <When at={s.created_at} />
                  </td>
                  <td>
                    <When at={s.last_seen_at} />
                  </td>
                  <td>
                    <When at={s.expires_at} />
                  </td>
                  {canEnd && (
                    <td class="st-row-actions">
                      <Button
                        aria-label={`End session of ${s.administrator_name} from ${s.address ?? "unknown address"}`}
                        onClick={() => setEnding(s)}
                      >
                        End
                      </Button>
                    </td>
                  )}
                </tr>
              ))}
              {list.data.items.length === 0 && (
                <tr>
                  <td colSpan={canEnd ? 7 : 6} class="muted">
                    No live session.
                  </td>
                </tr>
              )}
            </tbody>
          </table>
        </div>
      )}
      {ending && (
        <Confirm
          title="End session"
          message={`End the session of ${ending.administrator_name}${ending.address ? ` from ${ending.address}` : ""}? If it is yours, you are logged out.`}
          action="End session"
          danger
          onClose={() => setEnding(undefined)}
          onConfirm={async () => {
            await api.del(`/sessions/${ending.id}`);
            notify(`Session of ${ending.administrator_name} ended`);
            await list.reload();
          }}
        />
      )}
    </section>
  );
}
