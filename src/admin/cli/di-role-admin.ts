// The verbs of images (tag, untag), roles (grant, deny, inherit… and their ACLs) and
// administrators (assign, unassign, acls, can), on top of the verbs every object has.
import { UserError } from "../../errors.ts";
import { EXIT, usageError } from "../client.ts";
import { cell, describe, printJson } from "../format.ts";
import { objectByName } from "../objects.ts";
import { leaf, type Command, type Leaf } from "./framework.ts";
import { resolveId } from "./targets.ts";
import { likePattern } from "./toplevel.ts";

const DI = objectByName("di")!;
const ROLE = objectByName("role")!;
const ADMIN = objectByName("admin")!;

export function diCmds(): Record<string, Command> {
  const two = (verb: string, description: string, run: (id: number, tag: string, l: Leaf) => Promise<void>) =>
    leaf(
      verb,
      description,
      {
        di: { type: "positional", description: "Image: ID or VERSION", required: false },
        tag: { type: "positional", description: "Tag", required: false },
      },
      async (l) => {
        const [ref, tag] = l.pos;
        if (!ref || !tag)
          throw usageError(`give the image (ID or VERSION) and the tag: qvd admin di ${verb} 7 default`);
        await run(await resolveId(l, DI, ref), tag, l);
      },
      2,
    );
  return {
    tag: two(
      "tag",
      "Put a tag on an image; it moves from the OSF's image that had it. Example: qvd admin di tag 7 default",
      async (id, tag, l) => {
        const res = (
          await l
            .client()
            .call<{ di: Record<string, unknown>; previous_di_id: number | null }>("POST", `/dis/${id}/tags`, {
              body: { tag },
            })
        ).body;
        if (l.json) return printJson(res);
        console.log(
          `${describe("di", res.di)}: tagged ${tag}${res.previous_di_id !== null ? ` (moved from di ${res.previous_di_id})` : ""}; tags: ${cell(res.di.tags)}`,
        );
      },
    ),
    untag: two(
      "untag",
      "Remove a tag from an image (not head, default or its version). Example: qvd admin di untag 7 testing",
      async (id, tag, l) => {
        const row = (
          await l.client().call<Record<string, unknown>>("DELETE", `/dis/${id}/tags/${encodeURIComponent(tag)}`)
        ).body;
        if (l.json) return printJson(row);
        console.log(`${describe("di", row)}: untagged ${tag}; tags: ${cell(row.tags)}`);
      },
    ),
  };
}

export function roleCmds(): Record<string, Command> {
  const acl = (
    verb: string,
    description: string,
    call: (l: Leaf, id: number, acl: string) => Promise<Record<string, unknown>>,
    done: string,
  ) =>
    leaf(
      verb,
      description,
      {
        role: { type: "positional", description: "Role: ID or NAME", required: false },
        acl: { type: "positional", description: "ACL name(s), e.g. vm.start (see qvd admin acls)", required: false },
      },
      async (l) => {
        const [ref, ...acls] = l.pos;
        if (!ref || acls.length === 0)
          throw usageError(`give the role and at least one ACL: qvd admin role ${verb} helpdesk vm.start`);
        const id = await resolveId(l, ROLE, ref);
        let row: Record<string, unknown> = {};
        for (const a of acls) {
          row = await call(l, id, a);
          if (!l.json) console.log(`${describe("role", row)}: ${done} ${a}`);
        }
        if (l.json) printJson(row);
      },
    );
  const parent = (verb: string, description: string, method: "POST" | "DELETE", done: string) =>
    leaf(
      verb,
      description,
      {
        role: { type: "positional", description: "Role: ID or NAME", required: false },
        parent: { type: "positional", description: "The inherited role: ID or NAME", required: false },
      },
      async (l) => {
        const [ref, p] = l.pos;
        if (!ref || !p)
          throw usageError(`give the role and the role it inherits: qvd admin role ${verb} helpdesk Operator`);
        const id = await resolveId(l, ROLE, ref);
        const pid = await resolveId(l, ROLE, p);
        const row = (
          method === "POST"
            ? await l.client().call("POST", `/roles/${id}/inherits`, { body: { role_id: pid } })
            : await l.client().call("DELETE", `/roles/${id}/inherits/${pid}`)
        ).body;
        if (l.json) return printJson(row);
        console.log(`${describe("role", row)}: ${done} ${p}; inherits: ${cell(row.inherits)}`);
      },
      2,
    );
  return {
    grant: acl(
      "grant",
      "Grant ACLs in a role. Example: qvd admin role grant helpdesk vm.start vm.stop",
      async (l, id, a) =>
        (await l.client().call("PUT", `/roles/${id}/acls`, { body: { acl: a, positive: true } })).body,
      "granted",
    ),
    deny: acl(
      "deny",
      "Deny ACLs in a role (even when an inherited role grants them). Example: qvd admin role deny helpdesk vm.delete",
      async (l, id, a) =>
        (await l.client().call("PUT", `/roles/${id}/acls`, { body: { acl: a, positive: false } })).body,
      "denied",
    ),
    ungrant: acl(
      "ungrant",
      "Remove a role's own grant or denial of ACLs (inherited ones stay). Example: qvd admin role ungrant helpdesk vm.stop",
      async (l, id, a) => (await l.client().call("DELETE", `/roles/${id}/acls/${encodeURIComponent(a)}`)).body,
      "removed",
    ),
    inherit: parent(
      "inherit",
      "Make a role inherit another. Example: qvd admin role inherit helpdesk Operator",
      "POST",
      "now inherits",
    ),
    uninherit: parent(
      "uninherit",
      "Stop a role inheriting another. Example: qvd admin role uninherit helpdesk Operator",
      "DELETE",
      "no longer inherits",
    ),
    acls: leaf(
      "acls",
      "A role's effective ACLs (own grants, inherited, minus denials). Example: qvd admin role acls helpdesk",
      { role: { type: "positional", description: "Role: ID or NAME", required: false } },
      async (l) => {
        if (!l.pos[0]) throw usageError("give the role: ID or NAME");
        const res = await l.client().get<{ items: string[] }>(`/roles/${await resolveId(l, ROLE, l.pos[0])}/acls`);
        if (l.json) printJson(res);
        else for (const a of res.items) console.log(a);
      },
      1,
    ),
  };
}

export function adminCmds(): Record<string, Command> {
  const roleOp = (
    verb: string,
    description: string,
    run: (l: Leaf, id: number, rid: number) => Promise<Record<string, unknown>>,
    done: string,
  ) =>
    leaf(
      verb,
      description,
      {
        admin: { type: "positional", description: "Administrator: ID or NAME", required: false },
        role: { type: "positional", description: "Role: ID or NAME", required: false },
      },
      async (l) => {
        const [ref, r] = l.pos;
        if (!ref || !r) throw usageError(`give the administrator and the role: qvd admin admin ${verb} bob Operator`);
        const row = await run(l, await resolveId(l, ADMIN, ref), await resolveId(l, ROLE, r));
        if (l.json) return printJson(row);
        console.log(`${describe("administrator", row)}: ${done} ${r}; roles: ${cell(row.roles)}`);
      },
      2,
    );
  const acls = async (l: Leaf, ref: string) =>
    (await l.client().get<{ items: string[] }>(`/administrators/${await resolveId(l, ADMIN, ref)}/acls`)).items;
  return {
    assign: roleOp(
      "assign",
      "Give an administrator a role. Example: qvd admin admin assign bob Operator",
      async (l, id, rid) =>
        (await l.client().call("POST", `/administrators/${id}/roles`, { body: { role_id: rid } })).body,
      "assigned",
    ),
    unassign: roleOp(
      "unassign",
      "Take a role from an administrator. Example: qvd admin admin unassign bob Operator",
      async (l, id, rid) => (await l.client().call("DELETE", `/administrators/${id}/roles/${rid}`)).body,
      "unassigned",
    ),
    acls: leaf(
      "acls",
      "An administrator's effective ACLs. Example: qvd admin admin acls bob",
      { admin: { type: "positional", description: "Administrator: ID or NAME", required: false } },
      async (l) => {
        if (!l.pos[0]) throw usageError("give the administrator: ID or NAME");
        const items = await acls(l, l.pos[0]);
        if (l.json) printJson({ items });
        else for (const a of items) console.log(a);
      },
      1,
    ),
    can: leaf(
      "can",
      "The administrator's effective ACLs matching a pattern (% any text, _ one character); exit 0 when at least one matches, 1 when none. Example: qvd admin admin can bob vm.%",
      {
        admin: { type: "positional", description: "Administrator: ID or NAME", required: false },
        pattern: { type: "positional", description: "ACL pattern, e.g. vm.% or user.block", required: false },
      },
      async (l) => {
        const [ref, pattern] = l.pos;
        if (!ref || !pattern)
          throw usageError("give the administrator and an ACL pattern: qvd admin admin can bob vm.%");
        const re = likePattern(pattern);
        const matching = (await acls(l, ref)).filter((a) => re.test(a));
        if (l.json) printJson({ pattern, items: matching });
        else for (const a of matching) console.log(a);
        if (matching.length === 0)
          throw new UserError(`${ref} has no ACL matching ${JSON.stringify(pattern)}`, EXIT.refused);
      },
      2,
    ),
  };
}
