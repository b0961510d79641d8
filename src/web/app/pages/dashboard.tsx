// The dashboard (home): counts of the platform's objects with blocked ones, running against
// total VMs and nodes, connected users, the nodes with most VMs and the VMs closest to
// expiry. Every figure links to the list it counts; all of it follows the event stream.
import type { ComponentChildren } from "preact";
import { api } from "../api.ts";
import { useChanges } from "../events.ts";
import { useLoad } from "../load.ts";
import { useSession } from "../session.ts";
import { ErrorLine, Link, Loading, When } from "../ui.tsx";

interface Stats {
  users: { total: number; blocked: number; connected: number };
  vms: { total: number; blocked: number; running: number };
  hosts: { total: number; blocked: number; running: number };
  osfs: { total: number };
  dis: { total: number; blocked: number };
  top_hosts: { id: number; name: string; vms_running: number }[];
  vms_close_to_expiry: {
    id: number;
    name: string;
    user_name: string;
    expire_soft_at: string | null;
    expire_hard_at: string | null;
  }[];
}

function Figure(props: { to: string; n: number; label: string; acl: boolean }) {
  const body = (
    <>
      <span class="figure-n">{props.n}</span> <span class="figure-label">{props.label}</span>
    </>
  );
  return props.acl ? (
    <Link to={props.to} class="figure">
      {body}
    </Link>
  ) : (
    <span class="figure">{body}</span>
  );
}

function Card(props: {
  title: string;
  to: string;
  total: number;
  see: boolean;
  children?: ComponentChildren;
  part?: { n: number; label: string; to: string };
}) {
  const { part } = props;
  return (
    <section class="card" aria-label={props.title}>
      <h2>{props.see ? <Link to={props.to}>{props.title}</Link> : props.title}</h2>
      <p class="card-total">{props.total}</p>
      {part && (
        <div class="card-part">
          <meter
            min={0}
            max={Math.max(1, props.total)}
            value={part.n}
            aria-label={`${part.label}: ${part.n} of ${props.total}`}
          />
          <Figure to={part.to} n={part.n} label={`${part.label} of ${props.total}`} acl={props.see} />
        </div>
      )}
      <div class="card-figures">{props.children}</div>
    </section>
  );
}

export function Dashboard() {
  const s = useSession();
  const canStats = s.can("stats.see");
  const {
    data: stats,
    error,
    reload,
  } = useLoad((signal) => (canStats ? api.get<Stats>("/stats", signal) : Promise.resolve(undefined)), [canStats]);
  useChanges(canStats ? ["user", "vm", "host", "osf", "di"] : [], () => void reload(), 1000);

  if (!canStats)
    return (
      <section>
        <h1>Dashboard</h1>
        <p>Welcome, {s.administrator.name}. Choose a screen in the menu.</p>
      </section>
    );
  if (!stats)
    return error ? (
      <section>
        <h1>Dashboard</h1>
        <ErrorLine error={error} />
      </section>
    ) : (
      <Loading what="the dashboard" />
    );
  const see = (o: string) => s.can(`${o}.see`);
  return (
    <section aria-labelledby="dash-title">
      <h1 id="dash-title">Dashboard</h1>
      <ErrorLine error={error} />
      <div class="cards">
        <Card
          title="Users"
          to="/users"
          total={stats.users.total}
          see={see("user")}
          part={{ n: stats.users.connected, label: "connected", to: "/users?connected=true" }}
        >
          <Figure to="/users?blocked=true" n={stats.users.blocked} label="blocked" acl={see("user")} />
        </Card>
        <Card
          title="Virtual machines"
          to="/vms"
          total={stats.vms.total}
          see={see("vm")}
          part={{ n: stats.vms.running, label: "running", to: "/vms?vm_state=running" }}
        >
          <Figure to="/vms?blocked=true" n={stats.vms.blocked} label="blocked" acl={see("vm")} />
        </Card>
        <Card
          title="Nodes"
          to="/hosts"
          total={stats.hosts.total}
          see={see("host")}
          part={{ n: stats.hosts.running, label: "running", to: "/hosts?state=running" }}
        >
          <Figure to="/hosts?blocked=true" n={stats.hosts.blocked} label="blocked" acl={see("host")} />
        </Card>
        <Card title="OS flavours" to="/osfs" total={stats.osfs.total} see={see("osf")} />
        <Card title="Images" to="/dis" total={stats.dis.total} see={see("di")}>
          <Figure to="/dis?blocked=true" n={stats.dis.blocked} label="blocked" acl={see("di")} />
        </Card>
      </div>
      <div class="dash-lists">
        <Ranked
          id="top-hosts"
          title="Nodes with most VMs"
          empty="No VM is running."
          items={stats.top_hosts.map((h) => (
            <li key={h.id}>
              {see("host") ? <Link to={`/hosts/${h.id}`}>{h.name}</Link> : h.name}{" "}
              {see("vm") ? (
                <Link to={`/vms?host_id=${h.id}`}>{h.vms_running} running</Link>
              ) : (
                <span>{h.vms_running} running</span>
              )}
            </li>
          ))}
        />
        <Ranked
          id="expiring"
          title="VMs closest to expiry"
          empty="No VM has an expiry."
          items={stats.vms_close_to_expiry.map((v) => (
            <li key={v.id}>
              {see("vm") ? <Link to={`/vms/${v.id}`}>{v.name}</Link> : v.name}{" "}
              <span class="muted">({v.user_name})</span> stops <When at={v.expire_hard_at} />
            </li>
          ))}
        />
      </div>
    </section>
  );
}

/** A short ranked list in a panel, or what to say when it is empty. */
function Ranked(props: { id: string; title: string; empty: string; items: ComponentChildren[] }) {
  return (
    <section class="panel" aria-labelledby={props.id}>
      <h2 id={props.id}>{props.title}</h2>
      {props.items.length ? <ol class="ranked">{props.items}</ol> : <p class="empty">{props.empty}</p>}
    </section>
  );
}
