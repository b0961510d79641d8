// What a screen of the app is: a path pattern, the component, the ACL needed to see it, and
// where it sits in the navigation. The objects' screens (objects/) and the settings screens
// (screens/) each export their own list; main.tsx puts them together.
import type { ComponentType } from "preact";

export interface Screen {
  /** "/vms", "/vms/:id"… */
  path: string;
  component: ComponentType<{ params: Record<string, string>; query: URLSearchParams }>;
  /** Shown only with one of these ACLs (none: everyone logged in). */
  acl?: string[];
  /** Only in multitenant mode. */
  multitenant?: boolean;
  /** An entry in the navigation. */
  nav?: { label: string; section: "Platform" | "Administration" | "Settings"; order: number };
}
