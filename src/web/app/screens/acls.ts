// The ACL catalogue (GET /acls, fetched once per page load) and how ACLs group by the object
// they are about: "vm.start" → object "vm", action "start".
import { api } from "../api.ts";

export interface Acl {
  name: string;
  description: string;
}

let catalogue: Promise<Acl[]> | undefined;
export function aclCatalogue(): Promise<Acl[]> {
  catalogue ??= api.get<{ items: Acl[] }>("/acls").then(
    (r) => r.items,
    (err) => {
      catalogue = undefined; // try again next time
      throw err;
    },
  );
  return catalogue;
}

/** Objects in the order of the navigation, with their screen names; unknown ones follow by name. */
const OBJECTS: [string, string][] = [
  ["user", "Users"],
  ["vm", "Virtual machines"],
  ["host", "Nodes"],
  ["osf", "OS flavours"],
  ["di", "Images"],
  ["administrator", "Administrators"],
  ["role", "Roles"],
  ["tenant", "Tenants"],
  ["property", "Properties"],
  ["config", "Configuration"],
  ["audit", "Audit log"],
  ["session", "Sessions"],
  ["stats", "Dashboard"],
];

export const objectOf = (acl: string) => (acl.includes(".") ? acl.slice(0, acl.indexOf(".")) : acl);
export const actionOf = (acl: string) => (acl.includes(".") ? acl.slice(acl.indexOf(".") + 1) : acl);

export interface AclGroup {
  object: string;
  label: string;
  acls: Acl[];
}

export function groupAcls(acls: Acl[]): AclGroup[] {
  const by = new Map<string, Acl[]>();
  for (const a of acls) {
    const o = objectOf(a.name);
    if (!by.has(o)) by.set(o, []);
    by.get(o)!.push(a);
  }
  const order = (o: string) => {
    const i = OBJECTS.findIndex(([k]) => k === o);
    return i < 0 ? OBJECTS.length : i;
  };
  return [...by.entries()]
    .sort(([a], [b]) => order(a) - order(b) || a.localeCompare(b))
    .map(([object, list]) => ({ object, label: OBJECTS.find(([k]) => k === object)?.[1] ?? object, acls: list }));
}
