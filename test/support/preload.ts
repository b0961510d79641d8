// Loaded before every test file (bunfig.toml): tears down what test/support started, after
// the last test, whether tests passed or not. The PostgreSQL watchdog covers hard crashes.
import { afterAll, setDefaultTimeout } from "bun:test";
import { setLogLevel } from "../../src/log.ts";
import { stopTestCluster } from "./db.ts";

// Quiet by default; QVD_LOG_LEVEL=debug shows what the code under test logs.
setLogLevel((process.env.QVD_LOG_LEVEL as "debug" | undefined) ?? "warn");
// Integration tests start real servers; give them room (tests never assert timings). This
// reaches the first test file only: scripts/test.ts passes --timeout for the whole run.
setDefaultTimeout(60_000);
afterAll(async () => {
  await stopTestCluster();
  // The compiled qvd (about 100 MB in /tmp) and the farm certificates, if a test asked for them.
  const made = (globalThis as { __qvdTestNode?: { binary?: unknown; farm?: unknown } }).__qvdTestNode;
  if (made?.binary || made?.farm) await (await import("./node.ts")).removeQvdBinary();
});
