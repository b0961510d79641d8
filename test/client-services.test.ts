// `qvd client`'s side channels with real programs: the slave channel's shared folders (bwrap +
// sftp-server on this side, real sshfs on the desktop's side), what a hostile desktop can reach
// through a share, open-a-file, USB requests, and the whole client against a real nxagent and
// nxproxy: printing forwarded to a real CUPS, sound to a real PulseAudio, shares and files over
// the slave channel. The desktop's slave server here is a small stand-in speaking the original's
// protocol (test/client-services.test.ts's `desktop-slave.sh`); the VMA's own is in
// test/vma-slave.test.ts and the LXC end-to-end in test/session-services.test.ts.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import net from "node:net";
import { join } from "node:path";
import { cupsTarget, nxOption } from "../src/client/session.ts";
import {
  BUSID,
  bwrapUsable,
  encodePath,
  openFile,
  requestUsbip,
  shareFolder,
  sftpArgv,
  usbDeviceMissing,
} from "../src/client/slave.ts";
import { waitFor } from "./support/wait.ts";
import { freeDisplay } from "./support/free.ts";
import { capture } from "./support/spawn.ts";

const KEY = "Q".repeat(20) + "a1b2c3d4e5f6g7h8i9j0" + "Z".repeat(24); // 64 characters, as the L7R mints
const dir = mkdtempSync("/tmp/qvd-client-svc-");
const haveFuse = existsSync("/dev/fuse") && !!Bun.which("sshfs") && process.getuid?.() === 0;
const haveBwrap = !!Bun.which("bwrap") && bwrapUsable("bwrap") === undefined;
const SFTP = "/usr/lib/openssh/sftp-server";

/** The desktop's slave server, as nxagent runs it (NX_SLAVE_CMD: the connection on stdin/stdout). */
const standIn = join(dir, "desktop-slave.sh");
const desk = join(dir, "desktop");
mkdirSync(join(desk, "Redirected"), { recursive: true });
writeFileSync(join(desk, "key"), KEY + "\n");
writeFileSync(
  standIn,
  `#!/bin/bash
# The original protocol's answers; real sshfs on the stream; opened files and requests recorded.
d=${desk}
key=$(cat "$d/key")
IFS= read -r line; line=\${line%$'\\r'}
echo "$line" >> "$d/requests"
method=\${line%% *}; rest=\${line#* }; target=\${rest%% *}
auth=""; ticket=""
while IFS= read -r h; do
  h=\${h%$'\\r'}; [ -z "$h" ] && break
  echo "$h" >> "$d/requests"
  case "\${h,,}" in authorization:*) auth=\${h#*: };; x-qvd-share-ticket:*) ticket=\${h#*: };; esac
done
if [ "$auth" != "Basic $key" ]; then printf 'HTTP/1.1 401 Unauthorized\\r\\nContent-Length: 13\\r\\n\\r\\nUnauthorized\\n'; exit 0; fi
case "$method $target" in
  "PUT /shares/"*)
    mnt="$d/Redirected/\${target##*/}"; mkdir -p "$mnt"
    printf 'HTTP/1.1 101 Switching Protocols\\r\\nX-QVD-Share-Ticket: %s\\r\\n\\r\\n' "$mnt"
    exec sshfs qvd-client: "$mnt" -o slave -f ;;
  "POST /open/"*) echo "$ticket \${target#/open/}" >> "$d/opened"; printf 'HTTP/1.1 200 OK\\r\\nContent-Length: 0\\r\\n\\r\\n' ;;
  "POST /usbip") printf 'HTTP/1.1 501 Not Implemented\\r\\nContent-Length: 28\\r\\n\\r\\nno vhci_hcd in this desktop\\n' ;;
  *) printf 'HTTP/1.1 404 Not Found\\r\\nContent-Length: 0\\r\\n\\r\\n' ;;
esac
`,
  { mode: 0o755 },
);

const procs: { kill(sig?: NodeJS.Signals | number): unknown }[] = [];
const mounts: string[] = [];

async function unmount(m: string) {
  await Bun.spawn(["fusermount3", "-u", "-z", m], { stderr: "ignore" }).exited;
}

afterAll(async () => {
  // Every FUSE mount under this test's directory, also ones a failed test did not note.
  const under = readFileSync("/proc/mounts", "utf8")
    .split("\n")
    .map((l) => l.split(" ")[1] ?? "")
    .filter((m) => m.startsWith(dir + "/"));
  for (const m of [...mounts, ...under]) await unmount(m);
  for (const p of procs)
    try {
      p.kill("SIGTERM");
    } catch {}
  await Bun.sleep(200);
  for (const m of mounts) await unmount(m);
  rmSync(dir, { recursive: true, force: true });
});

// Files under a FUSE mount served by this process are reached by other processes: a read in
// this one would block the very event loop that relays its answer.
async function sh(argv: string[]): Promise<{ code: number; out: string; err: string }> {
  const r = await capture(argv);
  return { code: r.code, out: r.stdout, err: r.stderr };
}
const readAsync = async (p: string) => (await sh(["cat", p])).out;
const existsAsync = async (p: string) => (await sh(["test", "-e", p])).code === 0;

/**
 * A listener standing for nxproxy's slave port: each connection answers the share request and
 * runs `sshfs qvd-client:<remote> <mnt> -o slave` on the stream, as a (hostile) desktop can.
 */
function hostileDesktop(sock: string, remote: string, mnt: string): net.Server {
  mkdirSync(mnt, { recursive: true });
  mounts.push(mnt);
  return net
    .createServer((c) => {
      let buf = Buffer.alloc(0);
      const onData = (d: Buffer) => {
        buf = Buffer.concat([buf, d]);
        if (buf.indexOf("\r\n\r\n") < 0) return;
        c.off("data", onData);
        c.write(`HTTP/1.1 101 Switching Protocols\r\nX-QVD-Share-Ticket: ${mnt}\r\n\r\n`);
        const p = spawn("sshfs", [`qvd-client:${remote}`, mnt, "-o", "slave", "-f"], {
          stdio: ["pipe", "pipe", "ignore"],
        });
        procs.push(p);
        c.pipe(p.stdin);
        p.stdout.pipe(c);
        p.stdin.on("error", () => {});
        c.on("error", () => {});
        p.on("close", () => c.destroy());
      };
      c.on("data", onData);
    })
    .listen(sock);
}

describe("the slave channel's pieces", () => {
  test("CUPS_SERVER: host:port, host, a socket path; hostile values are refused", () => {
    expect(cupsTarget(undefined)).toEqual({ spec: "631", host: "localhost", port: 631 });
    expect(cupsTarget("127.0.0.1:6310").spec).toBe("tcp:127.0.0.1:6310");
    expect(cupsTarget("printsrv").spec).toBe("tcp:printsrv:631");
    expect(cupsTarget("printsrv/version=1.1").spec).toBe("tcp:printsrv:631");
    expect(cupsTarget("/run/cups/cups.sock").spec).toBe("unix:/run/cups/cups.sock");
    // Each would smuggle another nxproxy option (',') or a display (':'), or is not a host.
    for (const bad of [
      "a,slave=1",
      "/tmp/x,media=4713",
      "/tmp/a:1",
      "h:99999",
      "h:0",
      "-S",
      "a b",
      "h:1:2",
      "[::1]:631",
    ]) {
      expect(() => cupsTarget(bad)).toThrow(/CUPS_SERVER/);
    }
  });

  test("nxproxy options with ':' end with the display (nxcomp reads a trailing :digits as the display)", () => {
    expect(nxOption("slave=unix:/tmp/q/slave", 50)).toBe("slave=unix:/tmp/q/slave:50");
    expect(nxOption("media=4713", 50)).toBe("media=4713");
    expect(nxOption("cups=tcp:127.0.0.1:631", 7)).toBe("cups=tcp:127.0.0.1:631:7");
  });

  test("share paths are percent-encoded per segment; bus ids are checked", () => {
    expect(encodePath("/home/a b/ñ%?#")).toBe("/home/a%20b/%C3%B1%25%3F%23");
    for (const ok of ["1-1", "2-1.4", "10-3.2.1"]) expect(BUSID.test(ok)).toBe(true);
    for (const bad of ["1", "1-", "a-1", "1-1;reboot", "../1-1", "1-1\n", "1-1 2-2", ""])
      expect(BUSID.test(bad)).toBe(false);
    expect(usbDeviceMissing("1-1", join(dir, "no-sysfs"))).toBe("no USB device 1-1 (this machine has no USB)");
    mkdirSync(join(dir, "sysfs", "devices"), { recursive: true });
    expect(usbDeviceMissing("1-1", join(dir, "sysfs"))).toBe("no USB device 1-1 (see `usbip list -l`)");
  });
});

describe.skipIf(!haveFuse || !haveBwrap)("a shared folder against a desktop that tries to read more", () => {
  const share = join(dir, "user", "Docs");
  const secret = join(dir, "user", "secret.txt");
  const work = join(dir, "work");
  beforeAll(() => {
    mkdirSync(share, { recursive: true });
    mkdirSync(work, { recursive: true, mode: 0o700 });
    writeFileSync(join(share, "in-share.txt"), "shared text\n");
    writeFileSync(secret, "NOT FOR THE DESKTOP\n");
  });

  async function attempt(name: string, remote: string, bwrap: string | undefined) {
    const sock = join(dir, `${name}.sock`);
    const mnt = join(dir, `${name}-mnt`);
    const srv = hostileDesktop(sock, remote, mnt);
    const s = await shareFolder({
      endpoint: { path: sock },
      key: KEY,
      dir: share,
      sftpServer: SFTP,
      bwrap,
      workDir: work,
    });
    const ls = async () => {
      const p = Bun.spawn(["ls", "-a", mnt], { stdout: "pipe", stderr: "ignore" });
      return (await new Response(p.stdout).text()).split("\n").filter(Boolean);
    };
    return { s, srv, mnt, ls };
  }

  test("the desktop's sshfs sees the folder; a file written there lands in it, byte for byte", async () => {
    const { s, srv, mnt } = await attempt("plain", "", "bwrap");
    try {
      expect(
        await waitFor("the mount", async () => ((await existsAsync(join(mnt, "in-share.txt"))) ? true : undefined)),
      ).toBe(true);
      expect(await readAsync(join(mnt, "in-share.txt"))).toBe("shared text\n");
      const bytes = new Uint8Array(300_000).map((_, i) => (i * 31) % 256);
      writeFileSync(join(dir, "from-desktop.bin"), bytes);
      expect((await sh(["cp", join(dir, "from-desktop.bin"), join(mnt, "from-desktop.bin")])).code).toBe(0);
      expect(Buffer.compare(readFileSync(join(share, "from-desktop.bin")), Buffer.from(bytes))).toBe(0);
      // Owned by this user, not by someone of the sandbox.
      expect(statSync(join(share, "from-desktop.bin")).uid).toBe(process.getuid!());
    } finally {
      await unmount(mnt);
      await Promise.race([s.ended, Bun.sleep(3000)]);
      srv.close();
    }
  }, 30_000);

  for (const [name, remote] of [
    ["parent", ".."],
    ["etc", "/etc"],
    ["root", "/"],
    ["abs-secret-dir", join(dir, "user")],
  ] as const) {
    test(`sshfs qvd-client:${remote === join(dir, "user") ? "<the share's parent, absolute>" : remote} shows nothing of this machine outside the folder`, async () => {
      const { s, srv, mnt, ls } = await attempt(`hostile-${name}`, remote, "bwrap");
      try {
        const seen = await waitFor(
          "the hostile mount",
          async () => {
            const l = await ls();
            return l.length > 2 ? l : undefined;
          },
          10_000,
        ).catch(() => [] as string[]);
        // Whatever it mounted, the secret next to the folder and the machine's files are not there.
        expect(seen).not.toContain("secret.txt");
        expect(seen).not.toContain("hostname");
        expect(seen).not.toContain("shadow");
        expect(seen).not.toContain("root");
        expect(await existsAsync(join(mnt, "secret.txt"))).toBe(false);
        expect(await existsAsync(join(mnt, "hostname"))).toBe(false);
        expect(await existsAsync(join(mnt, "etc", "hostname"))).toBe(false);
        // It did mount: what it shows is the sandbox.
        if (name === "root") expect(seen).toContain("usr");
        if (name === "parent" || name === "abs-secret-dir") expect(seen).toContain("Docs");
        if (name === "etc") {
          // The sandbox's /etc holds only a passwd and a group naming this user alone.
          expect(seen.filter((x) => x !== "." && x !== "..").sort()).toEqual(["group", "passwd"]);
          expect((await readAsync(join(mnt, "passwd"))).trim().split("\n")).toHaveLength(1);
        }
      } finally {
        await unmount(mnt);
        await Promise.race([s.ended, Bun.sleep(3000)]);
        srv.close();
      }
    }, 30_000);
  }

  test("the same read without the sandbox (--share-unconfined) does reach the secret: the check above can fail", async () => {
    const { s, srv, mnt, ls } = await attempt("unconfined", join(dir, "user"), undefined);
    try {
      const seen = await waitFor("the mount", async () => {
        const l = await ls();
        return l.includes("secret.txt") ? l : undefined;
      });
      expect(seen).toContain("secret.txt");
      expect(await readAsync(join(mnt, "secret.txt"))).toBe("NOT FOR THE DESKTOP\n");
    } finally {
      await unmount(mnt);
      await Promise.race([s.ended, Bun.sleep(3000)]);
      srv.close();
    }
  }, 30_000);

  test("a ticket or a refusal with terminal escape sequences is not passed on", async () => {
    const sock = join(dir, "escape.sock");
    let answer = "";
    const srv = net
      .createServer((c) => {
        c.once("data", () => {
          c.write(answer);
          if (answer.startsWith("HTTP/1.1 101")) setTimeout(() => c.end(), 200);
        });
        c.on("error", () => {});
      })
      .listen(sock);
    try {
      answer = "HTTP/1.1 101 Switching Protocols\r\nX-QVD-Share-Ticket: \x1b]0;owned\x07/x\r\n\r\n";
      const s = await shareFolder({
        endpoint: { path: sock },
        key: KEY,
        dir: share,
        sftpServer: SFTP,
        bwrap: "bwrap",
        workDir: work,
      });
      expect(s.ticket).toBe("");
      await Promise.race([s.ended, Bun.sleep(3000)]);
      answer = "HTTP/1.1 409 Conflict\r\nContent-Length: 11\r\n\r\n\x1b[2Jcleared";
      const e = await shareFolder({
        endpoint: { path: sock },
        key: KEY,
        dir: share,
        sftpServer: SFTP,
        bwrap: "bwrap",
        workDir: work,
      }).catch((x) => x as Error);
      expect((e as Error).message).toBe("the desktop refused the share: 409 Conflict: ?[2Jcleared");
    } finally {
      srv.close();
    }
  });

  test("a slave connection closed before any answer is tried once more; twice, and the client says so", async () => {
    const sock = join(dir, "flaky.sock");
    let conns = 0;
    let closeFirst = 1;
    const srv = net
      .createServer((c) => {
        conns++;
        c.on("error", () => {});
        if (conns <= closeFirst) return void c.destroy();
        c.once("data", () => c.end("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"));
      })
      .listen(sock);
    try {
      await openFile({ path: sock }, KEY, "/home/u/Redirected/Docs", "a.txt", 0);
      expect(conns).toBe(2);
      conns = 0;
      closeFirst = 99;
      const e = await openFile({ path: sock }, KEY, "/home/u/Redirected/Docs", "a.txt", 0).catch((x) => x as Error);
      expect((e as Error).message).toMatch(
        /^the desktop did not open a\.txt: the desktop closed the slave connection without answering$|closed the slave connection without answering$/,
      );
      expect(conns).toBe(2);
    } finally {
      srv.close();
    }
  });

  test("the sandbox: no network, no capabilities, the folder at its own path", () => {
    const argv = sftpArgv(share, SFTP, "bwrap", work);
    expect(argv.slice(0, 6)).toEqual([
      "bwrap",
      "--unshare-all",
      "--die-with-parent",
      "--new-session",
      "--cap-drop",
      "ALL",
    ]);
    expect(argv.join(" ")).toContain(`--bind ${share} ${share} --chdir ${share} -- ${SFTP} -e`);
    expect(argv.filter((a) => a === "--bind")).toHaveLength(1);
  });
});

describe.skipIf(!haveFuse)("requests to the desktop's slave server (the stand-in, on a socket)", () => {
  let srv: net.Server;
  const sock = join(dir, "standin.sock");
  beforeAll(() => {
    srv = net
      .createServer((c) => {
        const p = spawn(standIn, [], { stdio: ["pipe", "pipe", "ignore"] });
        procs.push(p);
        c.pipe(p.stdin);
        p.stdout.pipe(c);
        p.stdin.on("error", () => {});
        c.on("error", () => {});
        p.on("close", () => c.end());
      })
      .listen(sock);
  });
  afterAll(() => srv?.close());

  test("open a file: POST /open/<name> with the ticket; a wrong key is refused with the server's 401", async () => {
    await openFile({ path: sock }, KEY, "/home/u/Redirected/Docs", "sub dir/a b.txt", 1000);
    expect(readFileSync(join(desk, "opened"), "utf8")).toContain("/home/u/Redirected/Docs sub%20dir/a%20b.txt\n");
    await expect(openFile({ path: sock }, "x".repeat(64), "/t", "a.txt", 0)).rejects.toThrow(
      "the desktop did not open a.txt: 401 Unauthorized",
    );
  });

  test("USB/IP: the desktop's refusal comes back as one line", async () => {
    await expect(requestUsbip({ path: sock }, KEY)).rejects.toThrow(
      "the desktop refused USB/IP: 501 Not Implemented: no vhci_hcd in this desktop",
    );
  });

  test("the share request is the original's, byte for byte", async () => {
    const share = join(dir, "byte share");
    mkdirSync(share, { recursive: true });
    rmSync(join(desk, "requests"), { force: true });
    mkdirSync(join(dir, "work2"), { recursive: true });
    const s2 = await shareFolder({
      endpoint: { path: sock },
      key: KEY,
      dir: share,
      sftpServer: SFTP,
      bwrap: haveBwrap ? "bwrap" : undefined,
      workDir: join(dir, "work2"),
    });
    mounts.push(s2.ticket);
    expect(s2.ticket).toBe(join(desk, "Redirected", "byte%20share"));
    expect(readFileSync(join(desk, "requests"), "utf8")).toEndWith(
      `PUT /shares${dir}/byte%20share HTTP/1.1\nAuthorization: Basic ${KEY}\nConnection: Upgrade\nUpgrade: qvd:sftp/1.0\n`,
    );
    await unmount(s2.ticket);
    await Promise.race([s2.ended, Bun.sleep(3000)]);
  }, 20_000);
});

describe("against the VMA's own slave server (`qvd vma-slave`, src/vma/slave.ts)", () => {
  let srv: net.Server;
  const sock = join(dir, "vma-slave.sock");
  const home = join(dir, "vma-home");
  beforeAll(async () => {
    mkdirSync(join(home, "Redirected", "Docs"), { recursive: true });
    writeFileSync(join(home, "Redirected", "Docs", "a.txt"), "x");
    writeFileSync(join(dir, "vma-key"), KEY + "\n", { mode: 0o600 });
    writeFileSync(join(dir, "vma-open.sh"), `#!/bin/sh\necho "$@" >> ${join(dir, "vma-opened")}\n`, { mode: 0o755 });
    srv = net
      .createServer((c) => {
        const p = spawn(
          process.execPath,
          [
            "src/main.ts",
            "vma-slave",
            "--key-file",
            join(dir, "vma-key"),
            "--shares-dir",
            join(home, "Redirected"),
            "--xdg-open",
            join(dir, "vma-open.sh"),
          ],
          { stdio: ["pipe", "pipe", "ignore"] },
        );
        procs.push(p);
        c.pipe(p.stdin);
        p.stdout.pipe(c);
        p.stdin.on("error", () => {});
        c.on("error", () => {});
        p.on("close", () => c.end());
      })
      .listen(sock);
    await new Promise((r) => srv.once("listening", r));
  });
  afterAll(() => srv?.close());

  test("open-file and USB/IP requests get its answers: 200 and a run of xdg-open; a clear USB refusal; 401 for a wrong key", async () => {
    await openFile({ path: sock }, KEY, join(home, "Redirected", "Docs"), "a.txt", 1000);
    // The stand-in xdg-open appends one line: wait for the whole line, not the file.
    const opened = await waitFor(
      "xdg-open",
      () =>
        existsSync(join(dir, "vma-opened")) && readFileSync(join(dir, "vma-opened"), "utf8").endsWith("\n")
          ? readFileSync(join(dir, "vma-opened"), "utf8")
          : undefined,
      5000,
    );
    expect(opened).toBe(`${join(home, "Redirected", "Docs", "a.txt")}\n`);
    await expect(requestUsbip({ path: sock }, KEY)).rejects.toThrow(/^the desktop refused USB\/IP: 50[13] /);
    await expect(requestUsbip({ path: sock }, "y".repeat(64))).rejects.toThrow(
      "the desktop refused USB/IP: 401 Unauthorized",
    );
    await expect(openFile({ path: sock }, KEY, join(home, "Redirected", "Docs"), "missing.txt", 0)).rejects.toThrow(
      /did not open missing\.txt: 404 Not Found/,
    );
  }, 20_000);
});

// --- The whole client: a scripted L7R relaying to a real nxagent, real nxproxy on an Xvfb ---

async function drain(s: ReadableStream<Uint8Array>, f: (text: string) => unknown): Promise<void> {
  const r = s.getReader();
  const dec = new TextDecoder();
  for (let x = await r.read(); !x.done; x = await r.read()) f(dec.decode(x.value, { stream: true }));
}

const haveNx = ["nxproxy", "nxagent", "Xvfb", "lpstat", "pactl", "pulseaudio", "cupsd"].every((p) => Bun.which(p));
const PASSWORD = "pw";

/** The L7R's side of a connection, as far as the client sees it: the list, then the 101 and a relay to nxagent. */
function scriptedL7R(agentPort: () => number, slaveKey: () => string | undefined, queries: string[]): net.Server {
  return net
    .createServer((c) => {
      let buf = Buffer.alloc(0);
      const onData = (d: Buffer) => {
        buf = Buffer.concat([buf, d]);
        for (;;) {
          const end = buf.indexOf("\r\n\r\n");
          if (end < 0) return;
          const line = buf.subarray(0, end).toString("latin1").split("\r\n")[0]!;
          buf = buf.subarray(end + 4);
          const target = line.split(" ")[1]!;
          if (target.startsWith("/qvd/list_of_vm")) {
            const body = JSON.stringify([{ id: 7, name: "desk", state: "running", blocked: 0 }]);
            c.write(
              `HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`,
            );
            continue;
          }
          queries.push(target);
          c.off("data", onData);
          const agent = net.connect(agentPort(), "127.0.0.1", () => {
            const key = slaveKey();
            c.write(`HTTP/1.1 101 Switching Protocols\r\n${key ? `X-QVD-Slave-Key: ${key}\r\n` : ""}\r\n`);
            if (buf.length) agent.write(buf);
            c.pipe(agent);
            agent.pipe(c);
          });
          agent.on("error", () => c.destroy());
          c.on("error", () => agent.destroy());
          agent.on("close", () => c.end());
          c.on("close", () => agent.destroy());
          return;
        }
      };
      c.on("data", onData);
    })
    .listen(0, "127.0.0.1");
}

describe.skipIf(!haveNx || !haveFuse || !haveBwrap)(
  "qvd client with a real nxagent: printing, sound, a shared folder, a file, USB",
  () => {
    const svc = import("./support/services.ts");
    let cups: Awaited<ReturnType<Awaited<typeof svc>["startClientCups"]>>;
    let pulse: Awaited<ReturnType<Awaited<typeof svc>["startClientPulse"]>>;
    let xvfb: { display: number; stop(): Promise<void> };
    let l7r: net.Server;
    let agentDisplay = 0;
    let key: string | undefined = KEY;
    const queries: string[] = [];
    const argvFile = join(dir, "nxproxy-argv");
    const nxproxy = join(dir, "nxproxy-rec.sh");

    beforeAll(async () => {
      const s = await svc;
      writeFileSync(nxproxy, `#!/bin/sh\nprintf '%s\\n' "$@" > ${argvFile}\nexec nxproxy "$@"\n`, { mode: 0o755 });
      [cups, pulse] = await Promise.all([s.startClientCups(), s.startClientPulse()]);
      xvfb = await s.startXvfb(freeDisplay(60));
      l7r = scriptedL7R(
        () => 4000 + agentDisplay,
        () => key,
        queries,
      );
      await new Promise((r) => l7r.once("listening", r));
    }, 60_000);
    afterAll(async () => {
      l7r?.close();
      await Promise.all([cups?.stop(), pulse?.stop(), xvfb?.stop()]);
    });

    async function startAgent() {
      agentDisplay = freeDisplay(Math.max(xvfb.display + 1, 140));
      const a = {
        log: "",
        proc: Bun.spawn(
          [
            "nxagent",
            `:${agentDisplay}`,
            "-ac",
            "-name",
            "QVD",
            "-nolisten",
            "tcp",
            "-display",
            `nx/nx,link=lan,geometry=800x600,client=linux,slave=1,media=1,cups=1:${agentDisplay}`,
          ],
          {
            stdout: "ignore",
            stderr: "pipe",
            env: { PATH: process.env.PATH!, DISPLAY: "", NX_SLAVE_CMD: standIn, HOME: desk },
          },
        ),
      };
      procs.push(a.proc);
      void (async () => {
        await drain(a.proc.stderr as ReadableStream<Uint8Array>, (t) => (a.log += t));
      })();
      await waitFor("nxagent", () => (/Waiting for connection/.test(a.log) ? true : undefined));
      return a;
    }

    function runClient(args: string[], env: Record<string, string> = {}) {
      const p = Bun.spawn(
        [
          process.execPath,
          "src/main.ts",
          "client",
          "--host",
          `127.0.0.1:${(l7r.address() as net.AddressInfo).port}`,
          "--no-tls",
          "--user",
          "alice",
          "--nxproxy-command",
          nxproxy,
          ...args,
        ],
        {
          env: {
            PATH: process.env.PATH!,
            HOME: dir,
            QVD_PASSWORD: PASSWORD,
            DISPLAY: `:${xvfb.display}`,
            CUPS_SERVER: cups.server,
            PULSE_SERVER: pulse.server,
            ...env,
          },
          stdin: "ignore",
          stdout: "pipe",
          stderr: "pipe",
        },
      );
      procs.push(p);
      const r = { out: "", err: "", p };
      void drain(p.stdout as ReadableStream<Uint8Array>, (t) => (r.out += t));
      void drain(p.stderr as ReadableStream<Uint8Array>, (t) => (r.err += t));
      return r;
    }

    test("all on: the desktop sees the user's printers and PulseAudio, mounts the folder, opens the file; USB is refused clearly; all undone at the end", async () => {
      key = KEY;
      const agent = await startAgent();
      const share = join(dir, "e2e share");
      const other = join(dir, "e2e-docs");
      mkdirSync(share, { recursive: true });
      mkdirSync(other, { recursive: true });
      writeFileSync(join(share, "from-user.txt"), "from the user's disk\n");
      writeFileSync(join(other, "note.txt"), "open me\n");
      rmSync(join(desk, "opened"), { force: true });
      const c = runClient(["--share", share, "--file", join(other, "note.txt"), "--usb", "1-1"]);
      const nd = agentDisplay;
      try {
        await waitFor(
          `the file opened (client: ${c.out} ${c.err})`,
          () => (/Opened note\.txt in the desktop/.test(c.out) ? true : undefined),
          30_000,
        );
        expect(c.out).toContain(`Shared ${share} with the desktop (${join(desk, "Redirected", "e2e%20share")})`);
        expect(c.out).toContain(`Shared ${other} with the desktop`);
        expect(readFileSync(join(desk, "opened"), "utf8")).toBe(`${join(desk, "Redirected", "e2e-docs")} note.txt\n`);
        // The desktop's mount: the user's file is there; a file written there lands on the user's disk.
        const mnt = join(desk, "Redirected", "e2e%20share");
        mounts.push(mnt, join(desk, "Redirected", "e2e-docs"));
        expect(await readAsync(join(mnt, "from-user.txt"))).toBe("from the user's disk\n");
        writeFileSync(join(dir, "saved.txt"), "saved in the desktop\n");
        const cp = await sh(["cp", join(dir, "saved.txt"), join(mnt, "saved.txt")]);
        expect([cp.code, cp.err]).toEqual([0, ""]);
        expect(readFileSync(join(share, "saved.txt"), "utf8")).toBe("saved in the desktop\n");
        // USB: this machine has none; the session goes on.
        expect(c.err).toContain("qvd: warning: no USB device 1-1 (this machine has no USB)\n");
        // The query asked for printing and sound; nxproxy got the three channels.
        expect(queries.at(-1)).toContain("&qvd.client.printing.enabled=1&qvd.client.audio.enabled=1&");
        const argv = readFileSync(argvFile, "utf8").trim().split("\n");
        const slave = argv.find((a) => a.startsWith("slave=unix:"))!;
        const media = argv.find((a) => a.startsWith("media="))!;
        // nxproxy's display (the local port - 4000) closes each option that has a ':'.
        const ld = Number(argv.at(-1)!.split(":")[1]);
        expect(argv.slice(0, 1)).toEqual(["-S"]);
        expect(argv).toContain(`cups=tcp:${cups.server}:${ld}`);
        expect(slave).toMatch(new RegExp(`^slave=unix:/.*/slave:${ld}$`));
        const slaveDir = slave.slice("slave=unix:".length, -`/slave:${ld}`.length);
        expect(statSync(slaveDir).mode & 0o777).toBe(0o700);
        // Printing: the desktop's side of nxagent's CUPS port lists the user's printers.
        const lp = await sh(["lpstat", "-h", `127.0.0.1:${2000 + nd}`, "-a"]);
        expect(lp.out).toContain(cups.printers[0].name);
        expect(lp.out).toContain(cups.printers[1].name);
        // Sound: nxagent's multimedia port reaches the PulseAudio the client opened on media= (src/client/audio.ts).
        const audioPort = Number(media.slice("media=".length));
        const info = await sh(["pactl", "-s", `tcp:127.0.0.1:${7000 + nd}`, "info"]);
        expect(info.code).toBe(0);
        expect(info.out).toContain("Server Name:");
        // The end: the desktop goes; the client ends normally and undoes its side.
        agent.proc.kill("SIGTERM");
        expect(await Promise.race([c.p.exited, Bun.sleep(20_000).then(() => "timeout")])).toBe(0);
        expect(
          await waitFor(
            "the media port closed",
            async () =>
              (await sh(["pactl", "-s", `tcp:127.0.0.1:${audioPort}`, "info"])).code !== 0 ? true : undefined,
            5000,
          ),
        ).toBe(true);
        expect(existsSync(slaveDir)).toBe(false);
      } finally {
        c.p.kill("SIGTERM");
        agent.proc.kill("SIGTERM");
        for (const m of mounts) await unmount(m);
      }
    }, 90_000);

    test("a wrong slave key: the share is refused with the desktop's 401 and the session goes on; --no-printing --no-audio ask for neither", async () => {
      key = "W".repeat(64);
      const agent = await startAgent();
      const share = join(dir, "e2e-wrong");
      mkdirSync(share, { recursive: true });
      const c = runClient(["--share", share, "--no-printing", "--no-audio"]);
      try {
        await waitFor(
          `the refusal (client: ${c.out} ${c.err})`,
          () => (/is not shared/.test(c.err) ? true : undefined),
          30_000,
        );
        expect(c.err).toBe(`qvd: warning: ${share} is not shared: the desktop refused the share: 401 Unauthorized\n`);
        expect(queries.at(-1)).toContain("&qvd.client.printing.enabled=0&qvd.client.audio.enabled=0&");
        const argv = readFileSync(argvFile, "utf8").trim().split("\n");
        expect(argv.filter((a) => /^(cups|media)=/.test(a))).toEqual([]);
        expect(c.p.exitCode).toBeNull();
        agent.proc.kill("SIGTERM");
        expect(await Promise.race([c.p.exited, Bun.sleep(20_000).then(() => "timeout")])).toBe(0);
      } finally {
        key = KEY;
        c.p.kill("SIGTERM");
        agent.proc.kill("SIGTERM");
      }
    }, 60_000);
  },
);

describe.skipIf(!haveNx)("a hostile L7R's slave key", () => {
  test("a key with a space or a control character is not put into a header: a warning, and the session goes on", async () => {
    const xd = freeDisplay(60);
    const x = Bun.spawn(["Xvfb", `:${xd}`, "-screen", "0", "800x600x24", "-nolisten", "tcp", "-noreset"], {
      stdout: "ignore",
      stderr: "ignore",
    });
    procs.push(x);
    const nd = freeDisplay(Math.max(xd + 1, 150));
    const agent = Bun.spawn(
      ["nxagent", `:${nd}`, "-ac", "-nolisten", "tcp", "-display", `nx/nx,link=lan,slave=1:${nd}`],
      {
        stdout: "ignore",
        stderr: "pipe",
        env: { PATH: process.env.PATH!, DISPLAY: "", HOME: dir },
      },
    );
    procs.push(agent);
    let agentLog = "";
    void drain(agent.stderr as ReadableStream<Uint8Array>, (t) => (agentLog += t));
    const queries: string[] = [];
    const l7r = scriptedL7R(
      () => 4000 + nd,
      () => `${KEY.slice(0, 10)} injected\x01`,
      queries,
    );
    await new Promise((r) => l7r.once("listening", r));
    await waitFor(
      `nxagent (${agentLog.slice(-300)})`,
      () => (/Waiting for connection/.test(agentLog) ? true : undefined),
      15_000,
    );
    mkdirSync(join(dir, "k-share"), { recursive: true });
    const p = Bun.spawn(
      [
        process.execPath,
        "src/main.ts",
        "client",
        "--host",
        `127.0.0.1:${(l7r.address() as net.AddressInfo).port}`,
        "--no-tls",
        "--user",
        "a",
        "--share",
        join(dir, "k-share"),
        "--no-printing",
        "--no-audio",
      ],
      {
        env: { PATH: process.env.PATH!, HOME: dir, QVD_PASSWORD: "x", DISPLAY: `:${xd}` },
        stdin: "ignore",
        stdout: "ignore",
        stderr: "pipe",
      },
    );
    procs.push(p);
    let err = "";
    void drain(p.stderr as ReadableStream<Uint8Array>, (t) => (err += t));
    try {
      await waitFor(`the warning (${err})`, () => (err.includes("slave key") ? true : undefined), 20_000);
      expect(err).toBe(
        "qvd: warning: the server gave a malformed slave key: no shared folders, files or USB devices in this session\n",
      );
      // A check that nothing happens: the session goes on (the client does not exit within 500 ms).
      await Bun.sleep(500);
      expect(p.exitCode).toBeNull();
    } finally {
      p.kill("SIGTERM");
      agent.kill("SIGTERM");
      x.kill("SIGTERM");
      l7r.close();
    }
  }, 40_000);
});

describe("usage errors of the service flags (exit 2, before any connection or password)", () => {
  const run = async (args: string[], env: Record<string, string> = {}) => {
    const p = Bun.spawn([process.execPath, "src/main.ts", "client", "--host", "127.0.0.1:9", "--user", "u", ...args], {
      env: { PATH: process.env.PATH!, HOME: dir, DISPLAY: ":99", ...env },
      stdin: "ignore",
      stdout: "pipe",
      stderr: "pipe",
    });
    const [err, code] = await Promise.all([new Response(p.stderr).text(), p.exited]);
    return { err, code };
  };
  mkdirSync(join(dir, "adir"), { recursive: true });
  writeFileSync(join(dir, "afile"), "x");
  const cases: [string[], string][] = [
    [["--share", join(dir, "nope")], `qvd: --share ${join(dir, "nope")}: no such directory\n`],
    [["--share", join(dir, "afile")], `qvd: --share ${join(dir, "afile")}: not a directory\n`],
    [["--file", join(dir, "adir")], `qvd: --file ${join(dir, "adir")}: not a regular file\n`],
    [["--file", join(dir, "afile"), "--file", join(dir, "afile")], "qvd: --file: one file per session\n"],
    [["--usb", "1-1;reboot"], `qvd: --usb "1-1;reboot": not a USB bus id (like 1-1 or 2-1.4, see \`usbip list -l\`)\n`],
    [["--share"], "qvd: --share needs a value\n"],
  ];
  for (const [args, msg] of cases) {
    test(args.join(" ").replaceAll(dir, "…"), async () => {
      expect(await run(args)).toEqual({ err: msg, code: 2 });
    });
  }

  test("no bwrap: --share is refused with what to do, unless --share-unconfined", async () => {
    const r = await run(["--share", join(dir, "adir")], { PATH: "/nonexistent" });
    expect(r.code).toBe(2);
    expect(r.err).toBe(
      "qvd: --share needs a sandbox that lets the desktop reach only the shared folder: bwrap is not installed (package bubblewrap)" +
        "; install bubblewrap, or give --share-unconfined (the desktop can then read every file this user can)\n",
    );
    // With --share-unconfined it goes on to connect (and fails there: nothing listens on port 9).
    const u = await run(["--share", join(dir, "adir"), "--share-unconfined"], {
      PATH: "/nonexistent",
      QVD_PASSWORD: "x",
    });
    expect(u.code).toBe(7);
  });
});
