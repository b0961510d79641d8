// Compiles src/main.ts into one self-contained, minified executable for this platform.
//   bun scripts/build-binaries.ts [--outfile PATH]      (default dist/qvd)
// schema.sql and package.json are imported by the sources, so they are inside the binary:
// it runs with nothing beside it.
import { mkdirSync, statSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { parseArgs } from "node:util";

const root = join(import.meta.dir, "..");

export async function buildBinary(outfile = join(root, "dist", "qvd")): Promise<string> {
  outfile = resolve(outfile);
  mkdirSync(dirname(outfile), { recursive: true });
  const result = await Bun.build({
    entrypoints: [join(root, "src", "main.ts")],
    compile: {
      outfile,
      // A system binary: it must not pick up .env or bunfig.toml from the directory it runs in.
      autoloadDotenv: false,
      autoloadBunfig: false,
    },
    minify: true,
    sourcemap: "none",
    throw: false,
  });
  if (!result.success) {
    const msgs = result.logs.map((l) => String(l)).join("\n");
    throw new Error(`build failed:\n${msgs}`);
  }
  return outfile;
}

if (import.meta.main) {
  let outfile: string | undefined;
  try {
    ({
      values: { outfile },
    } = parseArgs({ args: process.argv.slice(2), options: { outfile: { type: "string" } }, strict: true }));
  } catch (err) {
    console.error(`build: ${(err as Error).message} (usage: bun scripts/build-binaries.ts [--outfile PATH])`);
    process.exit(64);
  }
  try {
    const path = await buildBinary(outfile);
    const size = statSync(path).size;
    const shown = relative(process.cwd(), path).startsWith("..") ? path : relative(process.cwd(), path);
    console.log(`${shown} ${(size / 1024 / 1024).toFixed(1)} MiB`);
  } catch (err) {
    console.error(`build: ${(err as Error).message}`);
    process.exit(1);
  }
}
