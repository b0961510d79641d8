// The data layer's public face: import objects and functions from here.
export * from "./objects.ts";
export * from "./errors.ts";
export { connect, transaction, type Db, type Sql } from "./pool.ts";
export * from "./tenants.ts";
export * from "./administrators.ts";
export * from "./roles.ts";
export * from "./users.ts";
export * from "./osfs.ts";
export * from "./dis.ts";
export * from "./vms.ts";
export * from "./hosts.ts";
export * from "./properties.ts";
export * from "./configs.ts";
export * from "./audit.ts";
export * from "./tokens.ts";
export * from "./listen.ts";
