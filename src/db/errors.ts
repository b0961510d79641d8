// Errors of the data layer, each with the HTTP status the API answers and a message a person
// can act on. PostgreSQL errors are translated here, in one place.
import { UserError } from "../errors.ts";

export class DataError extends UserError {
  constructor(
    message: string,
    readonly status: number,
    readonly field?: string,
  ) {
    super(message);
    this.name = "DataError";
  }
}

export class NotFoundError extends DataError {
  constructor(kind: string, id: number | string) {
    super(`${kind} ${typeof id === "number" ? id : JSON.stringify(id)} not found`, 404);
    this.name = "NotFoundError";
  }
}

export class ConflictError extends DataError {
  constructor(message: string, field?: string) {
    super(message, 409, field);
    this.name = "ConflictError";
  }
}

/** Deleting something others depend on. `dependents` says what, so a person can act. */
export class InUseError extends DataError {
  constructor(
    message: string,
    readonly dependents: { kind: string; count: number; ids: number[] }[],
  ) {
    super(message, 409);
    this.name = "InUseError";
  }
}

export class ValidationError extends DataError {
  constructor(field: string | undefined, message: string) {
    super(field ? `${field}: ${message}` : message, 422, field);
    this.name = "ValidationError";
  }
}

interface PgErrorLike {
  code?: string;
  constraint_name?: string;
  detail?: string;
  message: string;
  column_name?: string;
}

const isPgError = (e: unknown): e is PgErrorLike =>
  e instanceof Error && typeof (e as PgErrorLike).code === "string" && /^[0-9A-Z]{5}$/.test((e as PgErrorLike).code!);

/** Translates a PostgreSQL error about `kind` into a DataError; other errors pass through. */
export function translatePgError(err: unknown, kind: string): unknown {
  if (!isPgError(err)) return err;
  const detail = err.detail ?? "";
  switch (err.code) {
    case "23505": {
      // Key (tenant_id, name)=(1, alice) already exists.
      const m = /Key \((.+)\)=\((.+)\) already exists/.exec(detail);
      const cols = m?.[1]?.split(", ") ?? [];
      const vals = m?.[2]?.split(", ") ?? [];
      const field = cols.filter((c) => c !== "tenant_id" && c !== "osf_id" && c !== "user_id").pop() ?? cols[0];
      const value = vals[cols.indexOf(field ?? "")] ?? "";
      const within = cols.includes("tenant_id")
        ? " in this tenant"
        : cols.includes("osf_id") && field !== "osf_id"
          ? " in this OSF"
          : cols.includes("user_id") && field !== "user_id"
            ? " for this user"
            : "";
      return new ConflictError(`${kind} with ${field} ${JSON.stringify(value)} already exists${within}`, field);
    }
    case "23503": {
      // Insert/update: Key (osf_id)=(5) is not present in table "osfs".
      let m = /Key \((.+)\)=\((.+)\) is not present in table "(\w+)"/.exec(detail);
      if (m)
        return new ValidationError(
          m[1]!.split(", ")[0],
          `no such ${m[3]!.replace(/s$/, "")} (${m[2]!.split(", ")[0]})`,
        );
      // Delete: Key (id)=(5) is still referenced from table "vms".
      m = /is still referenced from table "(\w+)"/.exec(detail);
      if (m) return new InUseError(`${kind} is still used by ${m[1]}`, [{ kind: m[1]!, count: 1, ids: [] }]);
      return new ConflictError(`${kind}: ${err.message}`);
    }
    case "23514":
      return new ValidationError(
        err.constraint_name?.replace(/_check$/, "").replace(/^[a-z]+_/, ""),
        err.message.replace(/^new row for relation "\w+" violates /, "violates "),
      );
    case "23502":
      return new ValidationError(err.column_name, "is required");
    case "55000": // a trigger refusing a change in the object's current state (vm_ip_guard)
      return new ConflictError(err.message);
    case "22021": // a NUL character, which text cannot hold
    case "22P05":
      return new ValidationError(undefined, "text must not contain NUL characters");
    case "22P02":
    case "22003":
    case "22007":
    case "22008":
      return new ValidationError(undefined, err.message);
  }
  // Any other data exception (class 22) is a value PostgreSQL cannot take: the input's fault.
  if (err.code!.startsWith("22")) return new ValidationError(undefined, err.message);
  return err;
}
