// `qvd node`: a whole node in one process, the HKD (desktops) and the L7R (users' broker).
import { defineCommand } from "citty";
import { hkdArgs, runUntilSignal, startHkd } from "./hkd.ts";
import { l7rArgs, l7rConfig, startL7rRole } from "./l7r.ts";

export default defineCommand({
  meta: { name: "node", description: "Run a node: the HKD (desktops, as root) and the L7R (user broker) in one process" },
  args: { ...hkdArgs, ...l7rArgs },
  async run({ args, rawArgs }) {
    const cfg = l7rConfig(args, rawArgs);
    const hkd = await startHkd(cfg, { register: args.register, address: args.address });
    let l7r: Awaited<ReturnType<typeof startL7rRole>>;
    try {
      l7r = await startL7rRole(cfg);
    } catch (err) {
      await hkd.stop();
      throw err;
    }
    await runUntilSignal(async () => {
      await l7r.stop();
      await hkd.stop();
    });
  },
});
