// The demo's network namespace: its node, the VM bridge, the desktops' veths and the firewall
// live in it, so the demo never changes this machine's own interfaces. Removing the namespace
// removes all of them.
import { existsSync } from "node:fs";
import { UserError } from "../errors.ts";
import { run } from "../run.ts";
import { netnsPrefix } from "../virt/network.ts";

export const validNetnsName = (name: string) => /^[\w.-]{1,64}$/.test(name);

export class DemoNetns {
  constructor(readonly name: string) {
    if (!validNetnsName(name)) throw new UserError(`--netns ${name}: letters, digits, '.', '_' and '-' only`);
  }

  get exists(): boolean {
    return existsSync(`/run/netns/${this.name}`);
  }

  /** argv prefix that runs a program inside the namespace. */
  get exec(): string[] {
    return netnsPrefix(this.name);
  }

  async create(): Promise<void> {
    await run(["ip", "netns", "add", this.name]);
    await run(["ip", "-n", this.name, "link", "set", "lo", "up"]);
  }

  /** Containers still running in it under `lxcPath` (LXC's command socket belongs to the namespace). */
  async containers(lxcPath: string): Promise<string[]> {
    if (!this.exists || !existsSync(lxcPath)) return [];
    const r = await run([...this.exec, "lxc-ls", "-P", lxcPath, "--running", "-1"], { allowFail: true });
    return r.stdout.split("\n").filter(Boolean);
  }

  /** Stops any container left in it (by force), then removes it. */
  async remove(lxcPath: string): Promise<string[]> {
    const left = await this.containers(lxcPath);
    for (const c of left)
      await run([...this.exec, "lxc-stop", "-k", "-n", c, "-P", lxcPath], { allowFail: true, timeoutMs: 60_000 });
    if (this.exists) await run(["ip", "netns", "del", this.name]);
    return left;
  }
}
