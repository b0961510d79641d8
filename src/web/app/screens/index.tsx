// The settings screens: the administrator's own profile, configuration.
import type { Screen } from "../routes.ts";
import { Profile } from "./profile.tsx";

export const SETTINGS_SCREENS: Screen[] = [{ path: "/profile", component: Profile }];
