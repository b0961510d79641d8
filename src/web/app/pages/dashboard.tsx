// The dashboard (home).
import { useSession } from "../session.ts";

export function Dashboard() {
  const s = useSession();
  return (
    <section>
      <h1>Dashboard</h1>
      <p>Welcome, {s.administrator.name}.</p>
    </section>
  );
}
