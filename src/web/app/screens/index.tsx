// The settings screens: configuration, live sessions and the administrator's own profile.
import type { Screen } from "../routes.ts";
import { ConfigPage } from "./config.tsx";
import { Profile } from "./profile.tsx";
import { SessionsPage } from "./sessions.tsx";

export const SETTINGS_SCREENS: Screen[] = [
  { path: "/profile", component: Profile },
  {
    path: "/config",
    component: ConfigPage,
    acl: ["config.see"],
    nav: { label: "Configuration", section: "Settings", order: 10 },
  },
  {
    path: "/sessions",
    component: SessionsPage,
    acl: ["session.see"],
    nav: { label: "Sessions", section: "Settings", order: 20 },
  },
];
