// A small leveled logger on stderr. Roles log through it so that levels are uniform and
// secrets can be kept out: callers pass values, never whole config objects. Lines are text
// (`<time> LEVEL [scope] message key=value…`) or, with log.format = json, one JSON object per
// line for log shippers: {"time", "level", "scope", "msg", …fields}.

const LEVELS = { debug: 10, info: 20, warn: 30, error: 40, silent: 99 } as const;
export type LogLevel = keyof typeof LEVELS;

// QVD_LOG_LEVEL is the log.level key's own variable: read here too, for what is logged before
// the configuration is loaded (the roles then set the configured level).
let threshold: number = LEVELS[(process.env.QVD_LOG_LEVEL as LogLevel) ?? "info"] ?? LEVELS.info;
let json = false;

export function setLogLevel(level: LogLevel): void {
  threshold = LEVELS[level];
}

export type LogFormat = "text" | "json";

export function setLogFormat(format: LogFormat): void {
  json = format === "json";
}

/** A field's value as JSON can hold it (errors by their message, bigints as text). */
const jsonValue = (v: unknown): unknown =>
  v instanceof Error ? v.message : typeof v === "bigint" ? String(v) : v === undefined ? null : v;

function emit(level: LogLevel, scope: string, msg: string, fields?: Record<string, unknown>): void {
  if (LEVELS[level] < threshold) return;
  if (json) {
    const o: Record<string, unknown> = { time: new Date().toISOString(), level, scope, msg };
    // A field never replaces the line's own keys.
    for (const [k, v] of Object.entries(fields ?? {})) o[k in o ? `field_${k}` : k] = jsonValue(v);
    let line: string;
    try {
      line = JSON.stringify(o);
    } catch {
      line = JSON.stringify({ time: o.time, level, scope, msg, fields: "(not serializable)" });
    }
    process.stderr.write(`${line}\n`);
    return;
  }
  const extra = fields
    ? " " +
      Object.entries(fields)
        .map(([k, v]) => `${k}=${typeof v === "string" ? JSON.stringify(v) : String(v)}`)
        .join(" ")
    : "";
  process.stderr.write(`${new Date().toISOString()} ${level.toUpperCase()} [${scope}] ${msg}${extra}\n`);
}

export function logger(scope: string) {
  return {
    debug: (msg: string, f?: Record<string, unknown>) => emit("debug", scope, msg, f),
    info: (msg: string, f?: Record<string, unknown>) => emit("info", scope, msg, f),
    warn: (msg: string, f?: Record<string, unknown>) => emit("warn", scope, msg, f),
    error: (msg: string, f?: Record<string, unknown>) => emit("error", scope, msg, f),
  };
}
export type Logger = ReturnType<typeof logger>;
