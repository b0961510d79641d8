// The assets a bundling macro (build.ts) inlined, decoded once at start-up for serving: the
// WAT's (assets.ts) and the desktop page's (desktop-assets.ts).
import type { BundledAsset } from "./build.ts";

export interface Asset {
  type: string;
  gz: Uint8Array<ArrayBuffer>;
  /** Decompressed once, on the first request that does not accept gzip. */
  plain?: Uint8Array;
  size: number;
  etag: string;
  /** Hashed names are cached for ever; index.html is revalidated. */
  immutable: boolean;
}

export function loadAssets(bundled: Record<string, BundledAsset>): Map<string, Asset> {
  return new Map(
    Object.entries(bundled).map(([name, a]) => [
      name,
      {
        type: a.type,
        gz: new Uint8Array(Buffer.from(a.gz, "base64")),
        size: a.size,
        etag: a.etag,
        immutable: name !== "index.html",
      },
    ]),
  );
}
