// The WAT's entry point: finds out whether a session exists, shows the login or the app shell
// (navigation filtered by ACLs, the screen of the URL), and returns to the login with a
// message when the session expires.
import { render } from "preact";
import { useEffect, useRef, useState } from "preact/hooks";
import { api, whenSessionExpires } from "./api.ts";
import { LoginPage } from "./pages/login.tsx";
import { OBJECT_SCREENS } from "./objects/index.tsx";
import { SETTINGS_SCREENS } from "./screens/index.tsx";
import type { Screen } from "./routes.ts";
import { match, navigate, useLocation } from "./router.ts";
import { makeSession, SessionContext, type Session } from "./session.ts";
import { Link, Loading, Notices } from "./ui.tsx";
import "./style.css";

const SCREENS: Screen[] = [...OBJECT_SCREENS, ...SETTINGS_SCREENS];

const visible = (s: Screen, session: Session) =>
  (!s.acl || session.canAny(...s.acl)) && (!s.multitenant || session.multitenant);

function Shell(props: { session: Session; onLogout: () => void }) {
  const { path, query } = useLocation();
  const [menuOpen, setMenuOpen] = useState(false);
  const screens = SCREENS.filter((s) => visible(s, props.session));
  let found: { screen: Screen; params: Record<string, string> } | undefined;
  for (const s of screens) {
    const params = match(s.path, path);
    if (params) {
      found = { screen: s, params };
      break;
    }
  }
  const sections = ["Platform", "Administration", "Settings"] as const;
  const navs = screens.filter((s) => s.nav).sort((a, b) => a.nav!.order - b.nav!.order);
  const a = props.session.administrator;
  // After a navigation, keyboard and screen-reader users land on the new screen's heading.
  const first = useRef(true);
  useEffect(() => {
    setMenuOpen(false);
    if (first.current) return void (first.current = false);
    requestAnimationFrame(() => {
      const h = document.querySelector<HTMLElement>("main h1") ?? document.getElementById("main");
      if (!h || h.contains(document.activeElement)) return;
      if (!h.hasAttribute("tabindex")) h.setAttribute("tabindex", "-1");
      h.focus({ preventScroll: true });
    });
  }, [path]);
  return (
    <div class="shell">
      <a class="skip" href="#main">
        Skip to content
      </a>
      <header class="top">
        <button
          type="button"
          class="btn btn-plain menu-toggle"
          aria-expanded={menuOpen}
          aria-controls="nav"
          onClick={() => setMenuOpen(!menuOpen)}
        >
          Menu
        </button>
        <Link to="/" class="brand">
          QVD
        </Link>
        <span class="spacer" />
        <Link to="/profile" class="whoami" title="Your profile and password">
          {a.name}
          {props.session.multitenant && <span class="muted"> @ {a.tenant_name}</span>}
        </Link>
        <button type="button" class="btn btn-plain" onClick={props.onLogout}>
          Log out
        </button>
      </header>
      <nav id="nav" class={`side ${menuOpen ? "open" : ""}`} aria-label="Main">
        {sections.map((sec) => {
          const items = navs.filter((s) => s.nav!.section === sec);
          if (!items.length) return null;
          return (
            <div class="nav-section" key={sec}>
              <h2>{sec}</h2>
              <ul>
                {items.map((s) => {
                  const active = s.path === "/" ? path === "/" : path === s.path || path.startsWith(s.path + "/");
                  return (
                    <li key={s.path}>
                      <Link to={s.path} class={active ? "active" : ""}>
                        {s.nav!.label}
                      </Link>
                    </li>
                  );
                })}
              </ul>
            </div>
          );
        })}
      </nav>
      <main id="main" tabIndex={-1}>
        {found ? <found.screen.component params={found.params} query={query} /> : <NotFound />}
      </main>
      <Notices />
    </div>
  );
}

function NotFound() {
  return (
    <section>
      <h1>Not found</h1>
      <p>
        There is nothing here, or you are not allowed to see it. <Link to="/">Back to the dashboard</Link>.
      </p>
    </section>
  );
}

function App() {
  const [session, setSession] = useState<Session | null | undefined>(undefined);
  const [expired, setExpired] = useState(false);
  const [multitenant, setMultitenant] = useState(false);
  useEffect(() => {
    whenSessionExpires(() => {
      setSession((s) => {
        if (s) setExpired(true);
        return null;
      });
    });
    // GET /login tells without a 401 (which browsers log as an error) whether a session exists.
    api
      .get("/login")
      .then((l) => {
        setMultitenant(l.multitenant);
        setSession(l.session ? makeSession(l.session) : null);
      })
      .catch(() => setSession(null));
  }, []);
  if (session === undefined) return <Loading />;
  if (!session)
    return (
      <>
        <LoginPage
          multitenant={multitenant}
          notice={expired ? "Your session ended; log in again to go on where you were." : undefined}
          onLogin={(s) => {
            setExpired(false);
            setSession(makeSession(s));
          }}
        />
        <Notices />
      </>
    );
  return (
    <SessionContext.Provider value={session}>
      <Shell
        key={session.administrator.id}
        session={session}
        onLogout={async () => {
          await api.post("/logout").catch(() => {});
          setSession(null);
          navigate("/", { replace: true });
        }}
      />
    </SessionContext.Provider>
  );
}

render(<App />, document.getElementById("app")!);
