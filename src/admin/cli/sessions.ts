// `qvd admin session`: the live administrator sessions, and ending one.
import { usageError } from "../client.ts";
import { printJson, table } from "../format.ts";
import { group, leaf } from "./framework.ts";

export const sessionCommand = group(
  "session",
  "Administrator sessions: list, end",
  {
    list: leaf(
      "list",
      "Live administrator sessions. Example: qvd admin session list",
      {},
      async (l) => {
        const res = await l.client().get<{ items: Record<string, unknown>[] }>("/sessions");
        if (l.json) return printJson(res);
        if (res.items.length === 0) return console.error("no sessions");
        console.log(
          table(res.items, [
            "id",
            "administrator_name",
            "tenant_id",
            "source",
            "address",
            "last_seen_at",
            "expires_at",
          ]),
        );
      },
      0,
    ),
    end: leaf(
      "end",
      "End an administrator's session (its id from session list). Example: qvd admin session end 3f2a9c0b7d1e",
      { sid: { type: "positional", description: "Session id", required: false } },
      async (l) => {
        if (!l.pos[0]) throw usageError("give the session id (see qvd admin session list)");
        const res = (await l.client().call("DELETE", `/sessions/${encodeURIComponent(l.pos[0])}`)).body;
        if (l.json) return printJson(res);
        console.log(`ended session ${l.pos[0]}`);
      },
      1,
    ),
  },
  { ls: "list", del: "end" },
);
