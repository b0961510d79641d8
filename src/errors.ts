// Errors that reach a person. A UserError is printed as one line, without a stack trace;
// anything else is a bug and is reported as such (stack only with QVD_DEBUG=1).

export class UserError extends Error {
  /** Process exit code when this error ends a command. */
  exitCode: number;
  constructor(message: string, exitCode = 1) {
    super(message);
    this.name = "UserError";
    this.exitCode = exitCode;
  }
}

/** Bad configuration: a file, line and key are part of the message. */
export class ConfigError extends UserError {
  constructor(message: string) {
    super(message, 78); // EX_CONFIG
    this.name = "ConfigError";
  }
}

/** Formats any error as the single line a command prints before exiting. */
export function describeError(err: unknown): string {
  if (err instanceof UserError) return err.message;
  if (err instanceof Error) {
    const code = (err as { code?: string }).code;
    if (code === "ECONNREFUSED" || (code === "ENOENT" && /PGSQL/.test(err.message)))
      return `cannot connect to the database: ${err.message}`;
    if (code === "EADDRINUSE") return `an address to listen on is in use by another program: ${err.message}`;
    return process.env.QVD_DEBUG ? (err.stack ?? err.message) : `internal error: ${err.message}`;
  }
  return `internal error: ${String(err)}`;
}

/** The exit status of a command that ended with `err`. */
export function exitCodeOf(err: unknown): number {
  if (err instanceof UserError) return err.exitCode;
  if ((err as { code?: string } | undefined)?.code === "EADDRINUSE") return 69; // EX_UNAVAILABLE
  return 70; // EX_SOFTWARE
}
