// Serves the desktop page (src/web/desktop) from the assets inlined by the bundling macro, as
// raw HTTP responses for the L7R (src/nx/http.ts): nothing is read from disk at run time.
// index.html at / is revalidated; the hashed assets under /qvd/web/ are cached for ever.
import { bundleDesktop } from "./build.ts" with { type: "macro" };
import { loadAssets } from "./bundled.ts";
import { REASONS, writeHead, writeResponse, type HeaderList } from "../nx/http.ts";

const BUNDLED = bundleDesktop();

/** Where the page's assets are served (build.ts writes the same base into index.html). */
export const DESKTOP_ASSET_BASE = "/qvd/web/";

const ASSETS = loadAssets(BUNDLED);

// The page uses no inline script or style, talks only to its own origin (fetch and the
// WebSocket), and noVNC draws cursors and JPEG rectangles from data: and blob: images.
const SECURITY_HEADERS: HeaderList = [
  [
    "Content-Security-Policy",
    "default-src 'self'; connect-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
  ],
  ["X-Content-Type-Options", "nosniff"],
  ["Referrer-Policy", "no-referrer"],
  ["X-Frame-Options", "DENY"],
];

/** Whether an Accept-Encoding value allows gzip (a `q=0` refuses it). */
function acceptsGzip(value: string | undefined): boolean {
  if (!value) return false;
  for (const part of value.toLowerCase().split(",")) {
    const [coding, ...params] = part.split(";").map((p) => p.trim());
    if (coding !== "gzip" && coding !== "*") continue;
    const q = params.find((p) => p.startsWith("q="));
    return !q || Number(q.slice(2)) > 0;
  }
  return false;
}

/** Whether If-None-Match (a list, possibly weak, or `*`) matches `etag`. */
function matches(ifNoneMatch: string | undefined, etag: string): boolean {
  if (!ifNoneMatch) return false;
  return ifNoneMatch.split(",").some((t) => {
    const v = t.trim();
    return v === "*" || v === etag || v === `W/${etag}`;
  });
}

/**
 * The complete raw HTTP response to `GET path` (`path` without the query string; `headers`
 * with lower-cased names, as HttpRequest's) when it is the page (`/`) or one of its assets
 * (`/qvd/web/<name>`), else undefined.
 */
export function desktopPage(path: string, headers: Map<string, string>): Uint8Array | undefined {
  let name: string | undefined;
  if (path === "/") name = "index.html";
  else if (path.startsWith(DESKTOP_ASSET_BASE)) {
    const rest = path.slice(DESKTOP_ASSET_BASE.length);
    if (rest !== "index.html" && /^[\w.-]+$/.test(rest)) name = rest;
  }
  const a = name === undefined ? undefined : ASSETS.get(name);
  if (!a) return undefined;
  const common: HeaderList = [
    ["ETag", a.etag],
    ["Cache-Control", a.immutable ? "public, max-age=31536000, immutable" : "no-cache"],
    ["Vary", "Accept-Encoding"],
    ...SECURITY_HEADERS,
  ];
  if (matches(headers.get("if-none-match"), a.etag)) return notModified(common);
  if (acceptsGzip(headers.get("accept-encoding")))
    return writeResponse(200, a.type, a.gz, [["Content-Encoding", "gzip"], ...common]);
  a.plain ??= Bun.gunzipSync(a.gz);
  return writeResponse(200, a.type, a.plain, common);
}

/** A 304: writeHead, as it has no body (a Content-Length would have to be the 200's). */
function notModified(headers: HeaderList): Uint8Array {
  const head = writeHead(304, headers);
  // REASONS (src/nx/http.ts) has no 304 yet, and writeHead would say "304 Unknown".
  if (REASONS[304]) return head;
  return Buffer.from(
    Buffer.from(head)
      .toString("latin1")
      .replace(/^HTTP\/1\.1 304 Unknown/, "HTTP/1.1 304 Not Modified"),
    "latin1",
  );
}

/** Names and sizes of the assets (for the bench and tests). */
export function desktopAssetList(): { name: string; size: number; gzipped: number }[] {
  return [...ASSETS].map(([name, a]) => ({ name, size: a.size, gzipped: a.gz.byteLength }));
}
