import pkg from "../package.json" with { type: "json" };

/** The product version, compiled into the binary from package.json. */
export const VERSION: string = pkg.version;
