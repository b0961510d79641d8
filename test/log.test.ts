// The logger's two formats (src/log.ts): text lines, and log.format = json for log shippers.
import { afterEach, expect, test } from "bun:test";
import { loadConfig } from "../src/config.ts";
import { logger, setLogFormat, setLogLevel } from "../src/log.ts";

/** What the logger writes to stderr while `f` runs. */
function captured(f: () => void): string[] {
  const lines: string[] = [];
  const write = process.stderr.write;
  process.stderr.write = ((chunk: string | Uint8Array) => {
    lines.push(...String(chunk).split("\n").filter(Boolean));
    return true;
  }) as typeof process.stderr.write;
  try {
    f();
  } finally {
    process.stderr.write = write;
  }
  return lines;
}

afterEach(() => {
  setLogFormat("text");
  setLogLevel("warn");
});

test("text: time, level, scope, message and key=value fields", () => {
  setLogLevel("info");
  const [line] = captured(() => logger("l7r").info("session ended", { vm: 7, user: "alice smith" }));
  expect(line).toMatch(/^\d{4}-\d\d-\d\dT[\d:.]+Z INFO \[l7r\] session ended vm=7 user="alice smith"$/);
});

test("json: one object per line, fields as values; a field cannot replace the line's own keys; errors by message", () => {
  setLogLevel("info");
  setLogFormat("json");
  const lines = captured(() => {
    logger("hkd").warn("start failed", {
      vm: 7,
      ok: false,
      level: "spoofed",
      msg: "spoofed too",
      error: new Error("no space left"),
      size: 10n,
      none: undefined,
    });
    logger("hkd").debug("not at this level");
  });
  expect(lines).toHaveLength(1);
  const o = JSON.parse(lines[0]!);
  expect(o).toMatchObject({
    level: "warn",
    scope: "hkd",
    msg: "start failed",
    vm: 7,
    ok: false,
    field_level: "spoofed",
    field_msg: "spoofed too",
    error: "no space left",
    size: "10",
    none: null,
  });
  expect(new Date(o.time).getTime()).toBeGreaterThan(0);
  // A message with quotes and newlines stays one line.
  const [l2] = captured(() => logger("api").info('a "quoted"\nmessage', { path: "/x\ny" }));
  expect(JSON.parse(l2!)).toMatchObject({ msg: 'a "quoted"\nmessage', path: "/x\ny" });
});

test("log.format is a configuration key: text by default, json or text only", () => {
  expect(loadConfig({ env: {} }).get("log.format")).toBe("text");
  expect(loadConfig({ env: { QVD_LOG_FORMAT: "json" } }).get("log.format")).toBe("json");
  expect(() => loadConfig({ env: { QVD_LOG_FORMAT: "xml" } })).toThrow(/log\.format.*text, json/s);
});
