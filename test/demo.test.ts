// `qvd demo` (the compiled binary), as a new user runs it: a whole farm in one directory. The
// first run creates everything and prints how to connect; `qvd client`, run as printed against
// an Xvfb display, shows the desktop; SIGINT stops desktops, node, API and PostgreSQL and removes
// the network namespace. Later runs reuse everything; a demo killed hard is cleaned up by the
// next one. Non-default ports and namespace name, so a real demo on this machine is not touched.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { chmodSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { LocalCluster } from "../src/db/local-cluster.ts";
import { startVm } from "../src/db/commands.ts";
import { ALL_TENANTS } from "../src/db/objects.ts";
import { connect } from "../src/db/pool.ts";
import { run } from "../src/run.ts";
import { freePort } from "./support/free.ts";
import { cleanEnv, desktopImage, qvdBinary } from "./support/node.ts";
import { screenMean, startXvfb } from "./support/services.ts";
import { until } from "./support/wait.ts";

const isRoot = process.getuid?.() === 0;

/** A port nobody listens on now (the kernel's choice). */
/** Every process whose command line mentions `needle` (the demo's children, PostgreSQL, LXC monitors). */
function processesWith(needle: string): string[] {
  const out: string[] = [];
  for (const pid of readdirSync("/proc").filter((n) => /^\d+$/.test(n))) {
    try {
      const cmd = readFileSync(`/proc/${pid}/cmdline`, "utf8").replace(/\0/g, " ");
      if (cmd.includes(needle) && Number(pid) !== process.pid) out.push(`${pid}: ${cmd}`);
    } catch {}
  }
  return out;
}

const hostLinks = async () =>
  (await run(["ip", "-o", "link", "show"])).stdout
    .split("\n")
    .map((l) => l.split(":")[1]?.trim() ?? "")
    .filter(Boolean)
    .sort();

describe.skipIf(!isRoot)("qvd demo", () => {
  const work = mkdtempSync(join(tmpdir(), "qvd-demo-"));
  chmodSync(work, 0o755); // the PostgreSQL user must reach the demo dir
  const dir = join(work, "demo");
  const netns = `qvdt-demo-${randomBytes(2).toString("hex")}`;
  const [port, apiPort] = [freePort(), freePort()];
  const running = new Set<Bun.Subprocess>();
  let binary: string;
  let image: string;
  let linksBefore: string[];

  beforeAll(async () => {
    const { ensureDeps } = await import("../scripts/deps.ts");
    await ensureDeps(
      [
        "postgresql",
        "runuser",
        "lxc",
        "iproute2",
        "nftables",
        "nsenter",
        "openssl",
        "xvfb",
        "nxproxy",
        "xwd",
        "imagemagick",
      ],
      () => {},
    );
    image = await desktopImage();
    binary = await qvdBinary();
    linksBefore = await hostLinks();
  }, 30 * 60_000);

  afterAll(async () => {
    for (const p of running) {
      p.kill("SIGTERM");
      await p.exited;
    }
    // Whatever a failed test left: its processes, the namespace, PostgreSQL.
    for (const line of processesWith(dir)) process.kill(Number(line.split(":")[0]), "SIGKILL");
    if (existsSync(`/run/netns/${netns}`)) await run(["ip", "netns", "del", netns], { allowFail: true });
    const cluster = new LocalCluster({ dir: join(dir, "postgresql") });
    if (await cluster.running()) await cluster.stop("immediate").catch(() => {});
    rmSync(work, { recursive: true, force: true });
  }, 180_000);

  interface Demo {
    proc: Bun.Subprocess<"ignore", "pipe", "pipe">;
    output: () => string;
    stderr: () => string;
  }

  const demoArgv = () => [
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
  ];

  /** Starts `qvd demo` and resolves once it has printed how to connect and that it runs. */
  async function startDemo(): Promise<Demo> {
    const proc = Bun.spawn(demoArgv(), { stdin: "ignore", stdout: "pipe", stderr: "pipe", env: cleanEnv() });
    running.add(proc);
    let out = "";
    let err = "";
    void (async () => {
      const r = proc.stderr.pipeThrough(new TextDecoderStream()).getReader();
      for (let c = await r.read(); !c.done; c = await r.read()) err += c.value;
    })();
    const reader = proc.stdout.pipeThrough(new TextDecoderStream()).getReader();
    while (!/^Running; press Ctrl-C/m.test(out)) {
      const { value, done } = await reader.read();
      if (done) {
        await proc.exited;
        throw new Error(`qvd demo exited (${proc.exitCode}) before it was ready:\n${out}\n${err}`);
      }
      out += value;
    }
    void (async () => {
      for (let c = await reader.read(); !c.done; c = await reader.read()) out += c.value;
    })();
    return { proc, output: () => out, stderr: () => err };
  }

  async function stopDemo(demo: Demo, signal: "SIGINT" | "SIGTERM"): Promise<number> {
    demo.proc.kill(signal);
    const code = await demo.proc.exited;
    running.delete(demo.proc);
    return code;
  }

  /** Nothing of the demo is left: no namespace, no process, PostgreSQL stopped, the host's links as before. */
  async function expectCleanedUp(): Promise<void> {
    expect(existsSync(`/run/netns/${netns}`)).toBe(false);
    expect(processesWith(dir)).toEqual([]);
    expect(existsSync(join(dir, "postgresql", "data", "postmaster.pid"))).toBe(false);
    expect(await new LocalCluster({ dir: join(dir, "postgresql") }).running()).toBe(false);
    expect(existsSync(join(dir, "demo.pid"))).toBe(false);
    expect(await hostLinks()).toEqual(linksBefore);
  }

  const superPwFile = join(dir, "superadmin-password");
  const userPwFile = join(dir, "demo-password");
  const dbUrl = () => new LocalCluster({ dir: join(dir, "postgresql") }).url("qvd");

  test("first run: the farm comes up, qvd client as printed shows the desktop, SIGINT stops it all", async () => {
    const demo = await startDemo();
    const out = demo.output();
    expect(out).toContain("[7/7]");

    // The passwords, shown once, kept 0600.
    const superPw = readFileSync(superPwFile, "utf8").trim();
    const userPw = readFileSync(userPwFile, "utf8").trim();
    for (const f of [superPwFile, userPwFile]) expect(statSync(f).mode & 0o777).toBe(0o600);
    expect(out).toContain(`Password:   ${superPw}`);
    expect(out).toContain(`Password of demo: ${userPw}`);

    // How to connect: the client command, the WAT and the admin login.
    const cert = join(dir, "tls", "cert.pem");
    const clientLine = /^ {2}(\S+ client .*)$/m.exec(out)?.[1];
    expect(clientLine).toBe(`${binary} client --host 127.0.0.1 --port ${port} --user demo --ca ${cert}`);
    expect(out).toContain(`https://127.0.0.1:${apiPort}/wat/`);
    // The desktop in a web browser, on the users' port: the page, with its policy.
    expect(out).toContain(`Or in a web browser, with nothing to install: https://127.0.0.1:${port}/  (user demo)`);
    const page = await fetch(`https://127.0.0.1:${port}/`, { tls: { ca: readFileSync(cert, "utf8") } } as RequestInit);
    expect(page.status).toBe(200);
    expect(page.headers.get("content-security-policy")).toStartWith("default-src 'self'");
    expect(await page.text()).toContain('<script type="module"');
    expect(out).toContain(`Admin login: superadmin, tenant *, password in ${superPwFile}`);

    // The desktops' network lives in the namespace; the host's interfaces are untouched.
    expect(await hostLinks()).toEqual(linksBefore);
    const nsLinks = (await run(["ip", "-n", netns, "-o", "link", "show"])).stdout;
    expect(nsLinks).toContain("qvdbr0");

    // The admin API over HTTPS, verified with the demo's certificate; the superadmin logs in.
    const ca = readFileSync(cert, "utf8");
    const login = await fetch(`https://127.0.0.1:${apiPort}/api/v1/login`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ name: "superadmin", password: superPw }),
      tls: { ca },
    } as RequestInit);
    expect(login.status).toBe(200);

    // The user's client, exactly as printed, on an X display of this test.
    const DISPLAY = 64;
    const xvfb = await startXvfb(DISPLAY);
    const mean = () => screenMean(DISPLAY);
    let client: Bun.Subprocess | undefined;
    try {
      const before = await mean();
      client = Bun.spawn(clientLine!.split(" "), {
        stdout: "pipe",
        stderr: "pipe",
        env: { ...cleanEnv(), DISPLAY: `:${DISPLAY}`, QVD_PASSWORD: userPw },
      });
      let m = before;
      await until(
        async () => (m = await mean()) > before + 0.05 || client!.exitCode !== null,
        "the desktop's pixels",
        180_000,
      );
      if (client.exitCode !== null)
        throw new Error(
          `qvd client exited ${client.exitCode}: ${await new Response(client.stderr as ReadableStream).text()}`,
        );
      expect(m).toBeGreaterThan(before + 0.05);
      const sql = connect(dbUrl(), { max: 1 });
      try {
        const [vm] = await sql`SELECT vm_state, user_state FROM vm_view WHERE name = 'Debian desktop'`;
        expect(vm).toMatchObject({ vm_state: "running", user_state: "connected" });
      } finally {
        await sql.end({ timeout: 5 });
      }

      // An administrator's image, uploaded through the API as the WAT does, on an OSF of its own:
      // it lands in the demo's storage, where the node reads it, and a desktop starts from it.
      const auth = { authorization: `Bearer ${(await login.json()).token}` };
      const api = async (method: string, path: string, body?: unknown) => {
        const r = await fetch(`https://127.0.0.1:${apiPort}/api/v1${path}`, {
          method,
          headers: { ...auth, "content-type": "application/json" },
          body: body === undefined ? undefined : JSON.stringify(body),
          tls: { ca },
        } as RequestInit);
        return { status: r.status, body: await r.json().catch(() => ({})) };
      };
      const sql2 = connect(dbUrl(), { max: 1 });
      let owner: { tenant_id: number };
      try {
        [owner] = (await sql2`SELECT tenant_id FROM vms WHERE name = 'Debian desktop'`) as unknown as [typeof owner];
      } finally {
        await sql2.end({ timeout: 5 });
      }
      const osf = await api("POST", "/osfs", { tenant_id: owner!.tenant_id, name: "uploaded", memory_mb: 256 });
      expect(osf.status).toBe(201);
      const di = await api("POST", "/dis", { osf_id: osf.body.id, path: "uploaded-desktop.tar.gz" });
      expect(di.status).toBe(201);
      const put = await fetch(`https://127.0.0.1:${apiPort}/api/v1/dis/${di.body.id}/image`, {
        method: "PUT",
        headers: { ...auth, "content-type": "application/octet-stream" },
        body: Bun.file(image),
        tls: { ca },
      } as RequestInit);
      expect(put.status).toBe(200);
      expect(existsSync(join(dir, "storage", "images", "uploaded-desktop.tar.gz"))).toBe(true);
      // Another user: a user's home is used by one desktop at a time (demo's is in use).
      const user2 = await api("POST", "/users", {
        tenant_id: owner!.tenant_id,
        name: "uploader",
        password: "uploader-pw-1",
      });
      expect(user2.status).toBe(201);
      const vm2 = await api("POST", "/vms", { user_id: user2.body.id, osf_id: osf.body.id, name: "uploaded desktop" });
      expect(vm2.status).toBe(201);
      const started = await api("POST", `/vms/${vm2.body.id}/start`);
      expect(started.status, JSON.stringify(started.body)).toBeLessThan(300);
      let state: { vm_state?: string; blocked?: boolean; blocked_reason?: string } = {};
      await until(
        async () => {
          state = (await api("GET", `/vms/${vm2.body.id}`)).body;
          return state.vm_state === "running" || state.blocked === true;
        },
        "the uploaded image's desktop to run",
        180_000,
      );
      expect(state, JSON.stringify(state)).toMatchObject({ vm_state: "running", blocked: false });

      // Ctrl-C while the user is connected: the session ends, everything stops.
      expect(await stopDemo(demo, "SIGINT")).toBe(0);
      expect(await client.exited).toBe(0);
    } finally {
      client?.kill("SIGKILL");
      await xvfb.stop();
    }
    expect(demo.output()).toContain("Stopping the node and its desktops…");
    expect(demo.output()).toContain(`Removed the network namespace ${netns}.`);
    expect(demo.output()).toMatch(/Stopped\.\n$/);
    expect(demo.stderr()).toBe("");
    await expectCleanedUp();
  }, 600_000);

  test("second run: everything is reused; a second demo in the same directory is refused", async () => {
    const passwords = [readFileSync(superPwFile, "utf8"), readFileSync(userPwFile, "utf8")];
    const demo = await startDemo();
    const out = demo.output();
    expect(out).not.toContain("Password");
    expect(out).not.toContain("Creating");
    expect(out).toContain("Reusing image debian-bookworm-desktop.tar.gz");
    expect(out).toContain("Image already unpacked");
    expect([readFileSync(superPwFile, "utf8"), readFileSync(userPwFile, "utf8")]).toEqual(passwords);
    const sql = connect(dbUrl(), { max: 1 });
    try {
      const [n] = await sql`SELECT (SELECT count(*) FROM users)::int AS users, (SELECT count(*) FROM vms)::int AS vms,
        (SELECT count(*) FROM dis)::int AS dis, (SELECT count(*) FROM hosts)::int AS hosts, (SELECT count(*) FROM administrators)::int AS admins`;
      // The demo's own objects, reused, and the first run's uploaded image, its user and desktop.
      expect(n).toEqual({ users: 2, vms: 2, dis: 2, hosts: 1, admins: 1 });
    } finally {
      await sql.end({ timeout: 5 });
    }

    const second = await run(demoArgv(), { allowFail: true, env: cleanEnv() });
    expect(second.status).not.toBe(0);
    expect(second.stderr).toContain("another qvd demo");

    expect(await stopDemo(demo, "SIGTERM")).toBe(0);
    await expectCleanedUp();
  }, 600_000);

  test("a demo killed hard: the next run stops what it left (node, desktop, API, namespace) and starts afresh", async () => {
    const killed = await startDemo();
    const sql = connect(dbUrl(), { max: 1 });
    const vmState = async () => (await sql`SELECT vm_state FROM vm_view WHERE name = 'Debian desktop'`)[0]!.vm_state;
    try {
      const [vm] = await sql`SELECT id FROM vms`;
      await startVm(sql, ALL_TENANTS, vm!.id, { aliveWithinS: 60 });
      await until(async () => (await vmState()) === "running", "the desktop to run", 120_000);
    } finally {
      await sql.end({ timeout: 5 });
    }
    expect(processesWith(`[lxc monitor] ${join(dir, "run", "lxc")}`)).toHaveLength(1);
    killed.proc.kill("SIGKILL");
    await killed.proc.exited;
    running.delete(killed.proc);
    expect(existsSync(`/run/netns/${netns}`)).toBe(true);

    const demo = await startDemo();
    const out = demo.output();
    expect(out).toContain("Stopped the node left running by an earlier demo");
    expect(out).toContain("Stopped the API left running by an earlier demo");
    expect(out).toContain(`Removed the network namespace ${netns} left by an earlier demo`);
    expect(processesWith(`[lxc monitor] ${join(dir, "run", "lxc")}`)).toEqual([]);
    const check = connect(dbUrl(), { max: 1 });
    try {
      expect((await check`SELECT vm_state FROM vm_view`)[0]!.vm_state).toBe("stopped");
    } finally {
      await check.end({ timeout: 5 });
    }
    expect(await stopDemo(demo, "SIGINT")).toBe(0);
    await expectCleanedUp();
  }, 600_000);

  test("a namespace of that name in use by something else: refused, and left as it is", async () => {
    await run(["ip", "netns", "add", netns]);
    const other = Bun.spawn(["nsenter", `--net=/run/netns/${netns}`, "--", "sleep", "600"], {
      stdout: "ignore",
      stderr: "ignore",
    });
    try {
      await until(
        async () => (await run(["ip", "netns", "pids", netns])).stdout.trim() !== "",
        "the other process in the namespace",
        10_000,
      );
      const r = await run(demoArgv(), { allowFail: true, env: cleanEnv() });
      expect(r.status).not.toBe(0);
      expect(r.stderr).toContain(`the network namespace ${netns} is in use`);
      expect(existsSync(`/run/netns/${netns}`)).toBe(true);
      expect(other.exitCode).toBeNull();
    } finally {
      other.kill("SIGKILL");
      await other.exited;
      await run(["ip", "netns", "del", netns]);
    }
    await expectCleanedUp();
  }, 300_000);
});
