// A small leveled logger on stderr. Roles log through it so that levels are uniform and
// secrets can be kept out: callers pass values, never whole config objects.

const LEVELS = { debug: 10, info: 20, warn: 30, error: 40, silent: 99 } as const;
export type LogLevel = keyof typeof LEVELS;

let threshold: number = LEVELS[(process.env.QVD_LOG_LEVEL as LogLevel) ?? "info"] ?? LEVELS.info;

export function setLogLevel(level: LogLevel): void {
  threshold = LEVELS[level];
}

function emit(level: LogLevel, scope: string, msg: string, fields?: Record<string, unknown>): void {
  if (LEVELS[level] < threshold) return;
  const extra = fields
    ? " " + Object.entries(fields).map(([k, v]) => `${k}=${typeof v === "string" ? JSON.stringify(v) : String(v)}`).join(" ")
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
