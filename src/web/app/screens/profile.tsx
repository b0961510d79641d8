// The administrator's own profile.
import { useSession } from "../session.ts";

export function Profile() {
  const s = useSession();
  return (
    <section>
      <h1>Your profile</h1>
      <p>{s.administrator.name}</p>
    </section>
  );
}
