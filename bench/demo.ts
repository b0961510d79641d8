// `qvd demo` as a new user meets it: the compiled binary in a fresh directory with the cached
// Debian image (--image: the image build itself is measured by `qvd di build`). Prints:
//   - first run: start → "Running" (cluster, schema, certificate, image copy and unpack, namespace, node, API);
//   - later run: start → "Running" (everything reused);
//   - first login: qvd client started → the desktop's pixels on an Xvfb (desktop cold start included);
//   - Ctrl-C with a desktop running → the demo exited (desktop, node, API, PostgreSQL, namespace).
// Prints figures; asserts nothing. Run as root: bun bench/demo.ts
import { chmodSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { run } from "../src/run.ts";
import { cleanEnv, desktopImage, qvdBinary, until } from "../test/support/node.ts";

const image = await desktopImage();
const binary = await qvdBinary();
const work = mkdtempSync("/tmp/qvd-bench-demo-");
chmodSync(work, 0o755);
const dir = join(work, "demo");
const port = 28443;
const apiPort = 28444;
const netns = `qvdb-demo-${process.pid}`;
const DISPLAY = 71;
const s = (ms: number) => `${(ms / 1000).toFixed(1)} s`;

async function demo(): Promise<{ proc: Bun.Subprocess; ms: number }> {
  const t0 = performance.now();
  const proc = Bun.spawn(
    [
      binary,
      "demo",
      "--dir",
      dir,
      "--port",
      String(port),
      "--api-port",
      String(apiPort),
      "--netns",
      netns,
      "--image",
      image,
    ],
    { stdout: "pipe", stderr: "inherit", env: cleanEnv() },
  );
  const reader = proc.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let out = "";
  while (!/^Running; /m.test(out)) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`qvd demo exited:\n${out}`);
    out += value;
  }
  const ms = performance.now() - t0;
  void (async () => {
    while (!(await reader.read()).done);
  })();
  return { proc, ms };
}

async function stop(proc: Bun.Subprocess): Promise<number> {
  const t0 = performance.now();
  proc.kill("SIGINT");
  await proc.exited;
  return performance.now() - t0;
}

const xvfb = Bun.spawn(["Xvfb", `:${DISPLAY}`, "-screen", "0", "1024x768x24", "-nolisten", "tcp"], {
  stdout: "ignore",
  stderr: "ignore",
});
try {
  const first = await demo();
  console.log(`first run, start → Running:  ${s(first.ms)}`);
  const mean = async () =>
    Number(
      (
        await run(
          ["sh", "-c", `xwd -root -silent -display :${DISPLAY} | /usr/bin/convert xwd:- -format '%[fx:mean]' info:-`],
          { allowFail: true },
        )
      ).stdout.trim(),
    ) || 0;
  await until(
    async () => (await run(["xwd", "-root", "-silent", "-display", `:${DISPLAY}`], { allowFail: true })).status === 0,
    "Xvfb",
  );
  const before = await mean();
  const t0 = performance.now();
  const client = Bun.spawn(
    [
      binary,
      "client",
      "--host",
      "127.0.0.1",
      "--port",
      String(port),
      "--user",
      "demo",
      "--ca",
      join(dir, "tls", "cert.pem"),
    ],
    {
      stdout: "ignore",
      stderr: "ignore",
      env: {
        ...cleanEnv(),
        DISPLAY: `:${DISPLAY}`,
        QVD_PASSWORD: readFileSync(join(dir, "demo-password"), "utf8").trim(),
      },
    },
  );
  await until(async () => (await mean()) > before + 0.05, "the desktop's pixels", 180_000);
  console.log(`first login, client → pixels: ${s(performance.now() - t0)}`);
  console.log(`Ctrl-C with a desktop → exit: ${s(await stop(first.proc))}`);
  await client.exited;
  const again = await demo();
  console.log(`later run, start → Running:  ${s(again.ms)}`);
  console.log(`Ctrl-C, no desktop → exit:    ${s(await stop(again.proc))}`);
} finally {
  xvfb.kill("SIGKILL");
  rmSync(work, { recursive: true, force: true });
}
