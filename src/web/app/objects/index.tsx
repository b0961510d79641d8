// The screens of the platform's objects: the dashboard, lists, detail pages and forms.
import type { Screen } from "../routes.ts";
import { Dashboard } from "../pages/dashboard.tsx";

export const OBJECT_SCREENS: Screen[] = [
  { path: "/", component: Dashboard, nav: { label: "Dashboard", section: "Platform", order: 0 } },
];
