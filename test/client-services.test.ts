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
import { BUSID, bwrapUsable, encodePath, openFile, requestUsbip, shareFolder, sftpArgv, usbDeviceMissing } from "../src/client/slave.ts";

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
writeFileSync(standIn, `#!/bin/bash
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
`, { mode: 0o755 });

const procs: { kill(sig?: NodeJS.Signals | number): unknown }[] = [];
const mounts: string[] = [];

async function unmount(m: string) {
  await Bun.spawn(["fusermount3", "-u", "-z", m], { stderr: "ignore" }).exited;
}

afterAll(async () => {
  for (const m of mounts) await unmount(m);
  for (const p of procs) try { p.kill("SIGTERM"); } catch {}
  await Bun.sleep(200);
  for (const m of mounts) await unmount(m);
  rmSync(dir, { recursive: true, force: true });
});

async function waitFor<T>(what: string, f: () => Promise<T | undefined> | T | undefined, timeoutMs = 15_000, stepMs = 100): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await f();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await Bun.sleep(stepMs);
  }
}

// Files under a FUSE mount served by this process are reached by other processes: a read in
// this one would block the very event loop that relays its answer.
async function sh(argv: string[]): Promise<{ code: number; out: string }> {
  const p = Bun.spawn(argv, { stdout: "pipe", stderr: "ignore" });
  const [out, code] = await Promise.all([new Response(p.stdout).text(), p.exited]);
  return { code, out };
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
  return net.createServer((c) => {
    let buf = Buffer.alloc(0);
    const onData = (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      if (buf.indexOf("\r\n\r\n") < 0) return;
      c.off("data", onData);
      c.write(`HTTP/1.1 101 Switching Protocols\r\nX-QVD-Share-Ticket: ${mnt}\r\n\r\n`);
      const p = spawn("sshfs", [`qvd-client:${remote}`, mnt, "-o", "slave", "-f"], { stdio: ["pipe", "pipe", "ignore"] });
      procs.push(p);
      c.pipe(p.stdin);
      p.stdout.pipe(c);
      p.stdin.on("error", () => {});
      c.on("error", () => {});
      p.on("close", () => c.destroy());
    };
    c.on("data", onData);
  }).listen(sock);
}

describe("the slave channel's pieces", () => {
  test("CUPS_SERVER: host:port, host, a socket path; hostile values are refused", () => {
    expect(cupsTarget(undefined)).toEqual({ spec: "631", host: "localhost", port: 631 });
    expect(cupsTarget("127.0.0.1:6310").spec).toBe("tcp:127.0.0.1:6310");
    expect(cupsTarget("printsrv").spec).toBe("tcp:printsrv:631");
    expect(cupsTarget("printsrv/version=1.1").spec).toBe("tcp:printsrv:631");
    expect(cupsTarget("/run/cups/cups.sock").spec).toBe("unix:/run/cups/cups.sock");
    // Each would smuggle another nxproxy option (',') or a display (':'), or is not a host.
    for (const bad of ["a,slave=1", "/tmp/x,media=4713", "/tmp/a:1", "h:99999", "h:0", "-S", "a b", "h:1:2", "[::1]:631"]) {
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
    for (const bad of ["1", "1-", "a-1", "1-1;reboot", "../1-1", "1-1\n", "1-1 2-2", ""]) expect(BUSID.test(bad)).toBe(false);
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
    const s = await shareFolder({ endpoint: { path: sock }, key: KEY, dir: share, sftpServer: SFTP, bwrap, workDir: work });
    const ls = async () => {
      const p = Bun.spawn(["ls", "-a", mnt], { stdout: "pipe", stderr: "ignore" });
      return (await new Response(p.stdout).text()).split("\n").filter(Boolean);
    };
    return { s, srv, mnt, ls };
  }

  test("the desktop's sshfs sees the folder; a file written there lands in it, byte for byte", async () => {
    const { s, srv, mnt } = await attempt("plain", "", "bwrap");
    try {
      expect(await waitFor("the mount", async () => ((await existsAsync(join(mnt, "in-share.txt"))) ? true : undefined))).toBe(true);
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

  for (const [name, remote] of [["parent", ".."], ["etc", "/etc"], ["root", "/"], ["abs-secret-dir", join(dir, "user")]] as const) {
    test(`sshfs qvd-client:${remote === join(dir, "user") ? "<the share's parent, absolute>" : remote} shows nothing of this machine outside the folder`, async () => {
      const { s, srv, mnt, ls } = await attempt(`hostile-${name}`, remote, "bwrap");
      try {
        const seen = await waitFor("the hostile mount", async () => {
          const l = await ls();
          return l.length > 2 ? l : undefined;
        }, 10_000).catch(() => [] as string[]);
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

  test("the sandbox: no network, no capabilities, the folder at its own path", () => {
    const argv = sftpArgv(share, SFTP, "bwrap", work);
    expect(argv.slice(0, 6)).toEqual(["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]);
    expect(argv.join(" ")).toContain(`--bind ${share} ${share} --chdir ${share} -- ${SFTP} -e`);
    expect(argv.filter((a) => a === "--bind")).toHaveLength(1);
  });
});

describe.skipIf(!haveFuse)("requests to the desktop's slave server (the stand-in, on a socket)", () => {
  let srv: net.Server;
  const sock = join(dir, "standin.sock");
  beforeAll(() => {
    srv = net.createServer((c) => {
      const p = spawn(standIn, [], { stdio: ["pipe", "pipe", "ignore"] });
      procs.push(p);
      c.pipe(p.stdin);
      p.stdout.pipe(c);
      p.stdin.on("error", () => {});
      c.on("error", () => {});
      p.on("close", () => c.end());
    }).listen(sock);
  });
  afterAll(() => srv?.close());

  test("open a file: POST /open/<name> with the ticket; a wrong key is refused with the server's 401", async () => {
    await openFile({ path: sock }, KEY, "/home/u/Redirected/Docs", "sub dir/a b.txt", 1000);
    expect(readFileSync(join(desk, "opened"), "utf8")).toContain("/home/u/Redirected/Docs sub%20dir/a%20b.txt\n");
    await expect(openFile({ path: sock }, "x".repeat(64), "/t", "a.txt", 0)).rejects.toThrow("the desktop did not open a.txt: 401 Unauthorized");
  });

  test("USB/IP: the desktop's refusal comes back as one line", async () => {
    await expect(requestUsbip({ path: sock }, KEY)).rejects.toThrow("the desktop refused USB/IP: 501 Not Implemented: no vhci_hcd in this desktop");
  });

  test("the share request is the original's, byte for byte", async () => {
    const share = join(dir, "byte share");
    mkdirSync(share, { recursive: true });
    rmSync(join(desk, "requests"), { force: true });
    mkdirSync(join(dir, "work2"), { recursive: true });
    const s2 = await shareFolder({ endpoint: { path: sock }, key: KEY, dir: share, sftpServer: SFTP, bwrap: haveBwrap ? "bwrap" : undefined, workDir: join(dir, "work2") });
    mounts.push(s2.ticket);
    expect(s2.ticket).toBe(join(desk, "Redirected", "byte%20share"));
    expect(readFileSync(join(desk, "requests"), "utf8")).toEndWith(
      `PUT /shares${dir}/byte%20share HTTP/1.1\nAuthorization: Basic ${KEY}\nConnection: Upgrade\nUpgrade: qvd:sftp/1.0\n`);
    await unmount(s2.ticket);
    await Promise.race([s2.ended, Bun.sleep(3000)]);
  }, 20_000);
});
