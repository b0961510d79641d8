// The VMA's configuration precedence: an image's /etc/qvd/vma.conf cannot set what only the node
// decides, and the node's values (vma.json `settings`) win over flags and the environment, which
// an image's own init chooses.
import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { loadVmaConfig, type VmaFile } from "../src/roles/vma.ts";
import { Config, KEYS } from "../src/config.ts";
import { isNodeOnlyVmaKey, NODE_ONLY_KEYS, NODE_ONLY_PREFIXES, nodeVmaSettings } from "../src/vma/node-settings.ts";

const dir = mkdtempSync("/tmp/qvd-vma-config-");
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const vf = (settings: Record<string, string> = {}): VmaFile => ({
  vm_id: 1,
  secret: "s".repeat(24),
  node_address: "198.18.0.1",
  port: 3030,
  settings,
});

describe("VMA configuration", () => {
  const guest = join(dir, "vma.conf");
  writeFileSync(
    guest,
    [
      "vma.provision.root = /tmp/elsewhere",
      "vma.session.as_current_user = 1",
      "vma.command.nxagent = /tmp/evil",
      "vma.nxagent.args.extra = -ac",
      "vma.on_action.expire = /tmp/evil",
      "vma.command.xmessage = /tmp/evil",
      "vma.poweroff.command = /tmp/evil",
      "vma.user.groups = sudo",
      "identity.uid.min = 1000",
      "vma.user.shell = /bin/zsh",
      "vma.default.lang = de_DE.UTF-8",
      "",
    ].join("\n"),
  );

  test("the image's vma.conf: node-only keys ignored (and named), the rest applies", () => {
    const { cfg, ignored } = loadVmaConfig(vf(), "vma.json", { guestConfig: guest, env: {} });
    expect(ignored).toEqual([
      "vma.provision.root",
      "vma.session.as_current_user",
      "vma.command.nxagent",
      "vma.nxagent.args.extra",
      "vma.on_action.expire",
      "vma.command.xmessage",
      "vma.poweroff.command",
      "vma.user.groups",
      "identity.uid.min",
    ]);
    expect(cfg.get("vma.provision.root")).toBe("/");
    expect(cfg.get("vma.session.as_current_user")).toBe(false);
    expect(cfg.get("vma.command.nxagent")).toBe("/usr/bin/nxagent");
    expect(cfg.get("vma.on_action.expire")).toBe("");
    expect(cfg.get("vma.command.xmessage")).toBe("/usr/bin/xmessage"); // the node decides what the VMA starts in the session
    expect(cfg.get("identity.uid.min")).toBe(10000);
    expect(cfg.get("vma.user.shell")).toBe("/bin/zsh");
    expect(cfg.get("vma.default.lang")).toBe("de_DE.UTF-8");
  });

  test("every node-only key (NODE_ONLY_KEYS and each key under NODE_ONLY_PREFIXES) is refused from the image's vma.conf", () => {
    const all = Object.keys(KEYS).filter(isNodeOnlyVmaKey);
    // The list is the real one: every named key exists, every prefix covers at least one key.
    for (const k of NODE_ONLY_KEYS) expect([k, k in KEYS]).toEqual([k, true]);
    for (const p of NODE_ONLY_PREFIXES) expect([p, all.some((k) => k.startsWith(p))]).toEqual([p, true]);
    const file = join(dir, "vma-all.conf");
    writeFileSync(file, all.map((k) => `${k} = /tmp/evil`).join("\n") + "\n");
    const { cfg, ignored } = loadVmaConfig(vf(), "vma.json", { guestConfig: file, env: {} });
    expect([...ignored].sort()).toEqual([...all].sort());
    const defaults = loadVmaConfig(vf(), "vma.json", { guestConfig: join(dir, "none"), env: {} }).cfg;
    for (const k of all) expect([k, cfg.get(k as never)]).toEqual([k, defaults.get(k as never)]);
  });

  test("the node's settings win over flags and the environment for node-only keys, not for the rest", () => {
    const flags = [
      { flag: "--set", key: "vma.provision.root", value: "/tmp/flag" },
      { flag: "--set", key: "vma.user.shell", value: "/bin/dash" },
    ];
    const env = { QVD_VMA_COMMAND_XINIT: "/tmp/evil", QVD_VMA_DEFAULT_LANG: "fr_FR.UTF-8" };
    const { cfg } = loadVmaConfig(
      vf({
        "vma.provision.root": "/",
        "vma.command.xinit": "xinit",
        "vma.user.shell": "/bin/bash",
        "vma.default.lang": "C.UTF-8",
      }),
      "vma.json",
      { guestConfig: join(dir, "none"), flags, env },
    );
    expect(cfg.get("vma.provision.root")).toBe("/");
    expect(cfg.get("vma.command.xinit")).toBe("xinit");
    expect(cfg.get("vma.user.shell")).toBe("/bin/dash"); // not node-only: --set wins as before
    expect(cfg.get("vma.default.lang")).toBe("C.UTF-8"); // settings sit above the environment anyway
  });

  test("the HKD sends a value for every node-only key (path.run excepted: the node's own)", () => {
    const s = nodeVmaSettings(new Config());
    expect(s["vma.provision.root"]).toBe("/");
    expect(s["vma.session.as_current_user"]).toBe("0");
    expect(s["vma.on_action.expire"]).toBe("");
    expect(s["path.run"]).toBeUndefined();
    for (const k of Object.keys(s)) expect(isNodeOnlyVmaKey(k)).toBe(true);
    expect(Object.keys(s)).toContain("identity.uid.min");
  });
});
