// Bundles the browser apps into minified, gzipped, content-hashed assets: the WAT (src/web/app,
// served under /wat/) and the desktop page (src/web/desktop, its assets under /qvd/web/). Used
// as a Bun macro by assets.ts and desktop-assets.ts, so the result is inlined wherever the
// sources are transpiled: into the compiled `qvd` binary at build time, and into the running
// process when run from source.
// A macro may not call Bun.build (the bundler would wait on itself), so it runs `bun build`.
import { mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export interface BundledAsset {
  /** Content-Type. */
  type: string;
  /** The gzipped body, base64. */
  gz: string;
  /** Uncompressed size in bytes. */
  size: number;
  etag: string;
}

const TYPES: Record<string, string> = {
  js: "text/javascript; charset=utf-8",
  css: "text/css; charset=utf-8",
  html: "text/html; charset=utf-8",
  svg: "image/svg+xml",
};

function asset(name: string, body: Uint8Array<ArrayBuffer>): BundledAsset {
  const ext = name.slice(name.lastIndexOf(".") + 1);
  return {
    type: TYPES[ext] ?? "application/octet-stream",
    gz: Buffer.from(Bun.gzipSync(body, { level: 9 })).toString("base64"),
    size: body.byteLength,
    etag: `"${new Bun.CryptoHasher("sha256").update(body).digest("hex").slice(0, 16)}"`,
  };
}

/**
 * Bundles the app whose entry point is `dir/entry` (its CSS imported from the script) and fills
 * `dir/index.html`'s %STYLE% and %SCRIPT% with links to the hashed files under `base`.
 * name (e.g. "main-1a2b3c.js", "index.html") → asset.
 */
function bundleApp(what: string, dir: string, entry: string, base: string): Record<string, BundledAsset> {
  const out = mkdtempSync(join(tmpdir(), "qvd-web-"));
  try {
    const r = Bun.spawnSync(
      [
        process.execPath,
        "build",
        join(import.meta.dir, dir, entry),
        "--outdir",
        out,
        "--minify",
        "--target",
        "browser",
        "--entry-naming",
        "[name]-[hash].[ext]",
        "--asset-naming",
        "[name]-[hash].[ext]",
        "--chunk-naming",
        "[name]-[hash].[ext]",
      ],
      { env: { ...process.env, BUN_BE_BUN: "1" }, stderr: "pipe", stdout: "pipe" },
    );
    if (r.exitCode !== 0) throw new Error(`bundling ${what} failed:\n${r.stderr.toString()}${r.stdout.toString()}`);
    const assets: Record<string, BundledAsset> = {};
    const names = readdirSync(out).sort();
    for (const n of names) assets[n] = asset(n, new Uint8Array(readFileSync(join(out, n))));
    const script = names.find((n) => n.endsWith(".js"));
    const style = names.find((n) => n.endsWith(".css"));
    if (!script) throw new Error(`bundling ${what} gave no script`);
    const html = readFileSync(join(import.meta.dir, dir, "index.html"), "utf8")
      .replace("%STYLE%", style ? `<link rel="stylesheet" href="${base}${style}">` : "")
      .replace("%SCRIPT%", `<script type="module" src="${base}${script}"></script>`);
    assets["index.html"] = asset("index.html", new TextEncoder().encode(html));
    return assets;
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
}

/** The WAT, served under /wat/. */
export function bundleWat(): Record<string, BundledAsset> {
  return bundleApp("the WAT", "app", "main.tsx", "/wat/");
}

/** The desktop page: index.html at /, the rest under /qvd/web/. */
export function bundleDesktop(): Record<string, BundledAsset> {
  return bundleApp("the desktop page", "desktop", "main.ts", "/qvd/web/");
}
