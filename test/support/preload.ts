// Loaded before every test file (bunfig.toml): tears down what test/support started, after
// the last test, whether tests passed or not. The PostgreSQL watchdog covers hard crashes.
import { afterAll } from "bun:test";
import { stopTestCluster } from "./db.ts";

process.env.QVD_LOG_LEVEL ??= "warn";
afterAll(async () => {
  await stopTestCluster();
});
