// Configuration files for the tests of one file, in a temp folder of its own.
//   const { dir, conf } = useConfFiles("qvd-config-test-");
//   const c = configFromArgs({ config: conf("nodename = n1\n") }, []);
import { afterAll } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

/** A temp folder (removed after the file's tests) and `conf(text)`, which writes the next node-N.conf there and returns its path. */
export function useConfFiles(prefix: string): { dir: string; conf(text: string): string } {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  let count = 0;
  return {
    dir,
    conf(text) {
      const f = join(dir, `node-${++count}.conf`);
      writeFileSync(f, text);
      return f;
    },
  };
}
