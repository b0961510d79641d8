// The screens of the platform's objects: the dashboard, and a list and a detail page for
// every object kind, generated from the specs.
import type { Screen } from "../routes.ts";
import { Dashboard } from "../pages/dashboard.tsx";
import { DetailPage } from "./detail-page.tsx";
import { ListPage } from "./list-page.tsx";
import { administratorsSpec } from "./specs/administrators.tsx";
import { auditSpec } from "./specs/audit.tsx";
import { disSpec } from "./specs/dis.tsx";
import { hostsSpec } from "./specs/hosts.tsx";
import { osfsSpec } from "./specs/osfs.tsx";
import { propertiesSpec } from "./specs/properties.tsx";
import { rolesSpec } from "./specs/roles.tsx";
import { tenantsSpec } from "./specs/tenants.tsx";
import { usersSpec } from "./specs/users.tsx";
import { vmsSpec } from "./specs/vms.tsx";
import type { ObjectSpec } from "./types.ts";

export const SPECS: ObjectSpec[] = [
  usersSpec,
  vmsSpec,
  hostsSpec,
  osfsSpec,
  disSpec,
  administratorsSpec,
  rolesSpec,
  tenantsSpec,
  propertiesSpec,
  auditSpec,
];

function screensOf(spec: ObjectSpec): Screen[] {
  const acl = [`${spec.acl}.see`];
  const list: Screen = {
    path: `/${spec.path}`,
    // key: a list of another kind is a fresh component (its selection and state start anew).
    component: ({ query }) => <ListPage key={spec.path} spec={spec} query={query} />,
    acl,
    multitenant: spec.multitenantOnly,
    nav: spec.nav,
  };
  if (spec.noDetail) return [list];
  const detail: Screen = {
    path: `/${spec.path}/:id`,
    component: ({ params }) => <DetailPage key={`${spec.path}/${params.id}`} spec={spec} id={params.id!} />,
    acl,
    multitenant: spec.multitenantOnly,
  };
  return [list, detail];
}

export const OBJECT_SCREENS: Screen[] = [
  { path: "/", component: Dashboard, nav: { label: "Dashboard", section: "Platform", order: 0 } },
  ...SPECS.flatMap(screensOf),
];
