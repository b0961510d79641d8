// The real HKD (startHkd of src/roles/hkd.ts, from the sources) with its real LXC backend
// wrapped, for tests that must see what the HKD asks of the backend, or make it fail on cue.
// Run in a TestNode's namespace: node.start(settings, { command: [bun, this file], env }).
// Every call is appended to $HKD_TEST_CUES/calls as "<call> <vm id>"; files in that directory
// are the cues:
//   start-hold    after the real start, wait until start-go exists, then fail the start;
//   cleanup-fail  cleanup fails (without doing anything) while the file exists.
import { appendFileSync, existsSync } from "node:fs";
import { join } from "node:path";
import { defineCommand, runMain } from "citty";
import { configFromArgs } from "../../src/cli.ts";
import { hkdArgs, runUntilSignal, startHkd } from "../../src/roles/hkd.ts";
import type { Backend } from "../../src/virt/backend.ts";

const dir = process.env.HKD_TEST_CUES;
if (!dir) throw new Error("HKD_TEST_CUES is not set");
const cue = (name: string) => existsSync(join(dir, name));
const note = (call: string, vmId: number) => appendFileSync(join(dir, "calls"), `${call} ${vmId}\n`);

function watched(b: Backend): Backend {
  return {
    kind: b.kind,
    prepare: (spec) => (note("prepare", spec.vmId), b.prepare(spec)),
    async start(spec) {
      note("start", spec.vmId);
      const r = await b.start(spec);
      if (cue("start-hold")) {
        note("start-held", spec.vmId);
        while (!cue("start-go")) await Bun.sleep(50);
        note("start-failed", spec.vmId);
        throw new Error("the container failed while starting (test cue)");
      }
      return r;
    },
    stop: (vmId, ms) => (note("stop", vmId), b.stop(vmId, ms)),
    kill: (vmId) => (note("kill", vmId), b.kill(vmId)),
    status: (vmId) => b.status(vmId),
    running: () => b.running(),
    leftovers: () => b.leftovers(),
    async cleanup(vmId, opts) {
      note("cleanup", vmId);
      if (cue("cleanup-fail")) throw new Error("cleanup failed (test cue)");
      return b.cleanup(vmId, opts);
    },
  };
}

void runMain(
  defineCommand({
    args: hkdArgs,
    async run({ args, rawArgs }) {
      const cfg = configFromArgs(args, rawArgs);
      const { stop } = await startHkd(cfg, { wrapBackend: watched });
      console.log("qvd hkd running (test harness)");
      await runUntilSignal(stop);
    },
  }),
);
