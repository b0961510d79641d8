// Serves the WAT from the assets inlined by the bundling macro: nothing is read from disk at
// run time. Hashed assets are cached for ever; index.html (every other path under /wat, so
// the app's own URLs can be reloaded and bookmarked) is revalidated.
import { bundleWat } from "./build.ts" with { type: "macro" };
import { loadAssets } from "./bundled.ts";

const BUNDLED = bundleWat();

const ASSETS = loadAssets(BUNDLED);

// The app uses no inline script or style and talks only to its own origin.
const SECURITY_HEADERS = {
  "content-security-policy":
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
  "x-content-type-options": "nosniff",
  "referrer-policy": "no-referrer",
  "x-frame-options": "DENY",
};

/** The answer to a GET under /wat/ (`rest` is the path after it). */
export function watResponse(rest: string, request: Request): Response {
  const name = /^[\w.-]+$/.test(rest) && ASSETS.has(rest) ? rest : "index.html";
  const a = ASSETS.get(name)!;
  const headers: Record<string, string> = {
    ...SECURITY_HEADERS,
    "content-type": a.type,
    etag: a.etag,
    vary: "accept-encoding",
    "cache-control": a.immutable ? "public, max-age=31536000, immutable" : "no-cache",
  };
  if (request.headers.get("if-none-match") === a.etag) return new Response(null, { status: 304, headers });
  if (/\bgzip\b/.test(request.headers.get("accept-encoding") ?? ""))
    return new Response(a.gz, { headers: { ...headers, "content-encoding": "gzip" } });
  return new Response(Bun.gunzipSync(a.gz), { headers });
}

/** Names and sizes of the assets (for the bench and tests). */
export function watAssetList(): { name: string; size: number; gzipped: number }[] {
  return [...ASSETS].map(([name, a]) => ({ name, size: a.size, gzipped: a.gz.byteLength }));
}
