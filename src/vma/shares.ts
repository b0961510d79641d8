// The slave channel's VMA side (shared folders, open-file, USB/IP): a SessionService that turns on
// nxagent's slave channel (slave=1, NX_SLAVE_CMD → `qvd vma-slave`, src/vma/slave.ts), and the
// mount helper that puts a client's folder on ~/Redirected/<name>. See src/vma/README.md,
// "Slave channel".
//
// Why a nested namespace: the container keeps no CAP_SYS_ADMIN (src/virt/lxc.ts CAPS), so nothing
// in it can mount FUSE, fusermount3 included. Per X session the VMA creates a user+mount namespace
// (the "holder", `unshare -U -m cat`) and the X session runs in it (Prepared.wrap: nsenter + setpriv).
// The VMA, owner of that user namespace, holds every capability over it, so it can mount FUSE in
// the session's mount namespace; the container's capabilities do not change. The namespace maps
// the container's ids 1…N-2 to themselves and its uid/gid 0 to the container's last id (N-1):
// container root stays unmapped, so in the session setuid-root programs are not setuid, and the
// map needs no CAP_SETFCAP (which mapping container root would). The session runs with
// no_new_privs and an empty bounding set after its setpriv.
//
// A mount: `qvd vma-slave` (the user's, run by nxagent) checks the request, makes the mount point,
// and asks the VMA over <runDir>/slave.sock (the user's only; the slave key again). The VMA runs,
// in the session's namespaces, a fixed sh script that opens /dev/fuse and the mount point, checks
// the opened directory (its real path is the expected one, owned by the user), mounts on the
// opened fd (nosuid,nodev, user_id/group_id the user's), then execs sshfs as the user on the
// mounted fd (`/dev/fd/3`, `-o slave`). Bun cannot pass fds, so the VMA relays the stream between
// the socket and sshfs's stdin/stdout.
import {
  chmodSync,
  chownSync,
  existsSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { createServer, type Server, type Socket } from "node:net";
import { spawn, type ChildProcess } from "node:child_process";
import { join } from "node:path";
import { logger } from "../log.ts";
import { ownChildren } from "../run.ts";
import { keyMatches, shareName } from "./slave.ts";
import type { UsbipAttacher } from "./usbip.ts";
import { propertyOff, type Prepared, type ServiceContext, type SessionService } from "./services.ts";

const log = logger("vma-shares");

/** PID 1's orphan reaper (src/vma/init.ts) must leave our children to us. */
function own(pid: number | undefined, exited: Promise<unknown>): void {
  if (!pid) return;
  ownChildren.add(pid);
  void exited.finally(() => ownChildren.delete(pid));
}

export interface SharesOptions {
  /** vma.slave.enable */
  enabled: boolean;
  /** The qvd binary as the guest sees it (nxagent runs `<qvd> vma-slave` through a wrapper). */
  qvd: string;
  sshfs?: string;
  sftpServer?: string;
  xdgOpen?: string;
  /** Run the session in a nested namespace and mount shares there (default: when /dev/fuse exists). */
  fuse?: boolean;
  /** The session runs as the VMA's own user (vma.session.as_current_user): no namespace, sshfs mounts itself. */
  asCurrentUser?: boolean;
  /**
   * USB devices can be attached here (src/vma/usbip.ts): a desktop with a kernel of its own (KVM).
   * An LXC desktop's vhci_hcd would be the node's: there USB/IP is answered 501.
   */
  usbip?: UsbipAttacher;
}

/**
 * The messages between `qvd vma-slave` and the VMA on the mount socket (one JSON line each way):
 * a share to mount, or (usbip: true) a USB device to attach; the stream follows a 200.
 */
export interface MountRequest {
  key: string;
  name?: string;
  charset?: string;
  usbip?: boolean;
}

const SOCKET = "slave.sock";
/** Mounts at a time (each is an sshfs process and a relay in the VMA). */
export const MAX_SHARES = 32;
export const CHARSET = /^[A-Za-z0-9._:+-]{1,40}$/;
/** Paths written into the wrapper script: no quoting games. */
const SAFE_PATH = /^\/[\w./+-]*$/;

// The mount helper, run as the nested namespace's root: $1 uid, $2 gid, $3 the mount point (as
// the VMA expects it, no symlink anywhere), $4 the supplementary gids ("" for none), then the
// sshfs argv. Opening follows symlinks; the check is on what was opened, and the mount is made on
// that very directory (/proc/self/fd/4 of each program is the inherited fd).
export const MOUNT_SCRIPT = `set -eu
uid=$1 gid=$2 mp=$3 groups=$4; shift 4
[ -d "$mp" ] || { echo "qvd-mount: $mp is not a directory" >&2; exit 3; }
exec 3<>/dev/fuse
exec 4<"$mp"
[ "$(readlink /proc/self/fd/4)" = "$mp" ] || { echo "qvd-mount: $mp is not where it should be" >&2; exit 3; }
[ "$(stat -L -c %u:%F /proc/self/fd/4)" = "$uid:directory" ] || { echo "qvd-mount: $mp is not the user's directory" >&2; exit 3; }
mount -i --no-canonicalize -t fuse.sshfs -o nosuid,nodev,fd=3,rootmode=40000,user_id=$uid,group_id=$gid qvd-client: /proc/self/fd/4
exec 4<&-
echo "qvd-mount: mounted" >&2
if [ -n "$groups" ]; then g="--groups=$groups"; else g=--clear-groups; fi
exec setpriv --reuid="$uid" --regid="$gid" "$g" --bounding-set=-all --no-new-privs -- "$@"
`;

/** The id map of the nested namespace, from the VMA's own (/proc/self/uid_map: "0 <host> N"). */
export function nestedIdMap(selfMap: string): string | undefined {
  const first = selfMap.trim().split("\n")[0]?.trim().split(/\s+/).map(Number);
  if (first?.length !== 3 || first[0] !== 0) return undefined;
  const n = Math.min(first[2]!, 65536);
  if (n < 3) return undefined;
  return `0 ${n - 1} 1\n1 1 ${n - 2}\n`;
}

/** One X session's namespace holder. */
class Holder {
  constructor(
    readonly proc: ChildProcess,
    readonly pid: number,
  ) {}
  get alive(): boolean {
    return this.proc.exitCode === null && this.proc.signalCode === null;
  }
  enter(): string[] {
    return ["nsenter", `--user=/proc/${this.pid}/ns/user`, `--mount=/proc/${this.pid}/ns/mnt`, "--"];
  }
}

async function startHolder(): Promise<Holder> {
  const self = readlinkSync("/proc/self/ns/user");
  const map = nestedIdMap(readFileSync("/proc/self/uid_map", "utf8"));
  const gmap = nestedIdMap(readFileSync("/proc/self/gid_map", "utf8"));
  if (!map || !gmap) throw new Error("the VMA's id map does not start at 0: no nested namespace");
  // `cat` on a pipe from the VMA: the holder ends with the VMA, however the VMA ends.
  const proc = spawn("unshare", ["--user", "--mount", "--propagation", "slave", "--", "cat"], {
    stdio: ["pipe", "ignore", "ignore"],
    detached: true,
  });
  const pid = proc.pid;
  if (!pid) throw new Error("cannot start unshare");
  own(pid, new Promise((res) => proc.on("exit", res)));
  const h = new Holder(proc, pid);
  const t0 = Date.now();
  for (;;) {
    let ns = self;
    try {
      ns = readlinkSync(`/proc/${pid}/ns/user`);
    } catch {}
    if (ns !== self) break;
    if (!h.alive || Date.now() - t0 > 3000) {
      proc.kill("SIGKILL");
      throw new Error("unshare did not create the session's namespace");
    }
    await Bun.sleep(5);
  }
  try {
    // One write each (the kernel takes a map in a single write).
    writeFileSync(`/proc/${pid}/uid_map`, map);
    writeFileSync(`/proc/${pid}/gid_map`, gmap);
  } catch (e) {
    proc.kill("SIGKILL");
    throw new Error(`cannot map the session's namespace: ${(e as Error).message}`);
  }
  return h;
}

function canFuse(): boolean {
  return existsSync("/dev/fuse");
}

/** The fuse mounts below `dir` in a mount namespace (/proc/<pid>/mountinfo), deepest first. */
export function fuseMountsBelow(mountinfo: string, dir: string): string[] {
  const out: string[] = [];
  const prefix = dir.endsWith("/") ? dir : dir + "/";
  for (const line of mountinfo.split("\n")) {
    const [pre, post] = line.split(" - ");
    if (!pre || !post) continue;
    const mp = pre.split(" ")[4]!.replace(/\\([0-7]{3})/g, (_, o) => String.fromCharCode(parseInt(o, 8)));
    if (post.startsWith("fuse") && mp.startsWith(prefix)) out.push(mp);
  }
  return out.sort((a, b) => b.length - a.length);
}

/** Runs argv, waits (bounded), returns the exit status and stderr (also for src/vma/usbip.ts). */
export async function runQuiet(argv: string[], timeoutMs = 10_000): Promise<{ status: number; stderr: string }> {
  let p;
  try {
    p = Bun.spawn(argv, {
      stdin: "ignore",
      stdout: "ignore",
      stderr: "pipe",
      timeout: timeoutMs,
      killSignal: "SIGKILL",
      cwd: "/",
      env: { PATH: process.env.PATH ?? "/usr/sbin:/usr/bin:/sbin:/bin" },
    });
  } catch (e) {
    return { status: 127, stderr: (e as Error).message }; // not installed
  }
  own(p.pid, p.exited);
  const stderr = await new Response(p.stderr).text();
  return { status: await p.exited, stderr };
}

/** The service nxagent's slave channel needs; one per VMA (one session at a time). */
export class SharesService implements SessionService {
  readonly name = "slave";
  private holder: Holder | undefined;
  private server: Server | undefined;
  private readonly sshfs = new Set<ChildProcess>();
  private ctx: ServiceContext | undefined;
  private sharesOn = false;
  private usbOn = false;

  constructor(readonly o: SharesOptions) {}

  get socketPath(): string {
    return join(this.ctx!.runDir, SOCKET);
  }
  get keyFile(): string {
    return join(this.ctx!.runDir, "slave.conf");
  }
  get wrapperFile(): string {
    return join(this.ctx!.runDir, "qvd-slave");
  }
  /** The namespace's holder pid (tests, diagnostics). */
  get holderPid(): number | undefined {
    return this.holder?.alive ? this.holder.pid : undefined;
  }

  async prepare(ctx: ServiceContext): Promise<Prepared> {
    const p = ctx.properties;
    const key = p["qvd.slave.key"];
    const sharesOn = !propertyOff(p, "qvd.vm.shares.enable");
    const usbOn = !propertyOff(p, "qvd.vm.usb.enable");
    if (!this.o.enabled || key === undefined || String(key).length === 0 || (!sharesOn && !usbOn)) {
      this.removeKey(ctx);
      return { options: [] };
    }
    this.ctx = ctx;
    this.sharesOn = sharesOn;
    this.usbOn = usbOn && this.o.usbip !== undefined;
    const a = ctx.account;
    // The key: the user's (nxagent runs NX_SLAVE_CMD as the user), nobody else's.
    rmSync(this.keyFile, { force: true });
    writeFileSync(this.keyFile, `${key}\n`, { mode: 0o600 });
    if (!this.o.asCurrentUser) chownSync(this.keyFile, a.uid, a.gid);

    // nxcomp execv()s NX_SLAVE_CMD with no arguments: a wrapper names ours (root's, read-only).
    for (const s of [this.o.qvd, ctx.runDir])
      if (!SAFE_PATH.test(s)) throw new Error(`unusable path for the slave wrapper: ${JSON.stringify(s)}`);
    const args = [
      "vma-slave",
      `--key-file=${this.keyFile}`,
      `--socket=${this.socketPath}`,
      `--display=:${ctx.display}`,
    ];
    if (!sharesOn) args.push("--no-shares");
    if (!usbOn) args.push("--no-usb");
    else if (!this.o.usbip) args.push("--usb-unavailable");
    if (this.o.sftpServer) args.push(`--sftp-server=${this.o.sftpServer}`);
    if (this.o.xdgOpen) args.push(`--xdg-open=${this.o.xdgOpen}`);
    for (const s of args) if (!/^[\w=/:.+-]+$/.test(s)) throw new Error(`unusable slave argument ${JSON.stringify(s)}`);
    rmSync(this.wrapperFile, { force: true });
    // Not exec: a handler that dies (a signal, a crash before it can log) is said on nxagent's
    // stderr, which the VMA logs (src/vma/session.ts NOTABLE_LINE).
    writeFileSync(
      this.wrapperFile,
      `#!/bin/sh\n${this.o.qvd} ${args.join(" ")}\nrc=$?\n[ "$rc" = 0 ] || echo "qvd-slave: the slave handler failed (status $rc)" >&2\nexit "$rc"\n`,
      { mode: 0o755 },
    );

    let wrap: string[] | undefined;
    if (sharesOn && !this.o.asCurrentUser && (this.o.fuse ?? canFuse())) {
      if (!this.holder?.alive) {
        // A new X session (a resume keeps its namespace: nothing of the old X session runs elsewhere).
        try {
          this.holder = await startHolder();
          log.info("session namespace", { holder: this.holder.pid });
        } catch (e) {
          this.holder = undefined;
          log.warn("no nested namespace for the session: shared folders cannot be mounted", {
            err: (e as Error).message,
          });
        }
      }
      if (this.holder)
        wrap = [...this.holder.enter(), "setpriv", "--no-new-privs", "--bounding-set=-all,+setuid,+setgid", "--"];
    }
    if (sharesOn || this.usbOn) await this.listen(ctx);
    if (this.usbOn && !this.o.asCurrentUser) await this.o.usbip!.installRule(a.uid, a.gid);
    const env = { NX_SLAVE_CMD: this.wrapperFile, QVD_SLAVE_CMD: this.wrapperFile };
    return { options: ["slave=1"], env, ...(wrap ? { wrap } : {}) };
  }

  async suspended(ctx: ServiceContext): Promise<void> {
    this.o.usbip?.detachAll();
    await this.unmountAll(ctx);
  }

  async stopped(ctx: ServiceContext): Promise<void> {
    this.o.usbip?.detachAll();
    await this.unmountAll(ctx);
    this.server?.close();
    this.server = undefined;
    rmSync(join(ctx.runDir, SOCKET), { force: true });
    this.removeKey(ctx);
    if (this.holder?.alive) this.holder.proc.kill("SIGKILL");
    this.holder = undefined;
  }

  private removeKey(ctx: ServiceContext): void {
    rmSync(join(ctx.runDir, "slave.conf"), { force: true });
  }

  /** The mount socket: the session user's alone (0600, theirs), in runDir (0711). */
  private async listen(ctx: ServiceContext): Promise<void> {
    if (this.server?.listening) {
      if (!this.o.asCurrentUser) chownSync(this.socketPath, ctx.account.uid, ctx.account.gid);
      return;
    }
    const path = join(ctx.runDir, SOCKET);
    rmSync(path, { force: true });
    const server = createServer((sock) => this.onConnection(sock));
    await new Promise<void>((res, rej) => {
      server.once("error", rej);
      server.listen(path, () => res());
    });
    chmodSync(path, 0o600);
    if (!this.o.asCurrentUser) chownSync(path, ctx.account.uid, ctx.account.gid);
    this.server = server;
  }

  private onConnection(sock: Socket): void {
    let buf = Buffer.alloc(0);
    const fail = (status: number, msg: string) => {
      sock.end(JSON.stringify({ status, error: msg }) + "\n");
    };
    const onData = (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      const nl = buf.indexOf(10);
      if (nl < 0) {
        if (buf.length > 4096) {
          sock.off("data", onData);
          fail(400, "request too long");
        }
        return;
      }
      sock.off("data", onData);
      sock.pause();
      const rest = buf.subarray(nl + 1);
      void this.mount(buf.subarray(0, nl).toString("utf8"), sock, rest).catch((e) => {
        log.warn("share not mounted", { err: (e as Error).message });
        fail(500, "the share could not be mounted");
      });
    };
    sock.on("data", onData);
    sock.on("error", () => sock.destroy());
    sock.setTimeout(10_000, () => {
      if (buf.indexOf(10) < 0) sock.destroy();
    });
  }

  /** Checks one mount request, mounts, and relays the socket to sshfs. */
  private async mount(line: string, sock: Socket, rest: Buffer): Promise<void> {
    const ctx = this.ctx;
    const reply = (status: number, extra: Record<string, unknown> = {}) =>
      sock.write(JSON.stringify({ status, ...extra }) + "\n");
    let req: MountRequest;
    try {
      req = JSON.parse(line) as MountRequest;
    } catch {
      reply(400, { error: "malformed request" });
      return void sock.end();
    }
    let key: string | undefined;
    try {
      key = ctx ? readFileSync(this.keyFile, "utf8").replace(/\n$/, "") : undefined;
    } catch {}
    if (typeof req?.key !== "string" || !keyMatches(req.key, key || undefined)) {
      reply(401, { error: "wrong slave key" });
      return void sock.end();
    }
    if (req.usbip === true) return await this.attachUsb(sock, rest);
    if (!ctx || !this.sharesOn) {
      reply(403, { error: "shared folders are disabled" });
      return void sock.end();
    }
    let name: string;
    try {
      if (typeof req.name !== "string") throw new Error();
      name = shareName(req.name);
      if (name !== req.name) throw new Error();
      if (req.charset !== undefined && (typeof req.charset !== "string" || !CHARSET.test(req.charset)))
        throw new Error();
    } catch {
      reply(400, { error: "invalid share name or charset" });
      return void sock.end();
    }
    if (this.sshfs.size >= MAX_SHARES) {
      reply(503, { error: `at most ${MAX_SHARES} shared folders at a time` });
      return void sock.end();
    }
    const a = ctx.account;
    const mountpoint = join(ctx.homeOnDisk, "Redirected", name);
    const sshfsArgs = ["qvd-client:", "-o", "slave", "-o", `uid=${a.uid}`, "-o", `gid=${a.gid}`];
    if (req.charset) sshfsArgs.push("-o", `modules=iconv,from_code=${req.charset},to_code=utf-8`);
    if (this.holder?.alive && this.mountsIn(join(ctx.homeOnDisk, "Redirected")).includes(mountpoint)) {
      reply(409, { error: "a folder is already shared under that name" });
      return void sock.end();
    }
    let argv: string[];
    if (this.holder?.alive) {
      argv = [
        ...this.holder.enter(),
        "/bin/sh",
        "-c",
        MOUNT_SCRIPT,
        "qvd-mount",
        String(a.uid),
        String(a.gid),
        mountpoint,
        a.groups.join(","),
        this.o.sshfs ?? "sshfs",
        ...sshfsArgs.slice(0, 1),
        "/dev/fd/3",
        ...sshfsArgs.slice(1),
      ];
    } else if (this.o.asCurrentUser) {
      argv = [this.o.sshfs ?? "sshfs", "qvd-client:", mountpoint, ...sshfsArgs.slice(1)];
    } else {
      reply(503, { error: "this desktop cannot mount shared folders (no FUSE namespace)" });
      return void sock.end();
    }
    const child = spawn(argv[0]!, argv.slice(1), {
      stdio: ["pipe", "pipe", "pipe"],
      cwd: "/",
      env: { PATH: process.env.PATH ?? "/usr/sbin:/usr/bin:/sbin:/bin", LANG: "C.UTF-8" },
    });
    this.sshfs.add(child);
    let errText = "";
    child.stderr!.on("data", (d: Buffer) => {
      if (errText.length < 4096) errText += d.toString();
    });
    const exited = new Promise<number>((res) => {
      child.on("close", (code) => res(code ?? 1));
      child.on("error", () => res(127));
    });
    own(
      child.pid,
      new Promise((res) => {
        child.on("exit", res);
        child.on("error", res);
      }),
    );
    // The answer (the client's 101) only once the helper has mounted: a refused mount point is
    // a 409 the client sees, not a stream that just ends.
    const mounted = !this.holder
      ? true
      : await Promise.race([
          new Promise<boolean>((res) => {
            const f = () => {
              if (errText.includes("qvd-mount: mounted")) res(true);
            };
            child.stderr!.on("data", f);
            f();
          }),
          exited.then(() => false),
          Bun.sleep(10_000).then(() => false),
        ]);
    if (!mounted) {
      if (child.exitCode === null) child.kill("SIGKILL");
      const why = /qvd-mount: ([^\n]*)/.exec(errText)?.[1] ?? errText.trim().split("\n").pop() ?? "";
      log.warn("share refused", { name, mountpoint, err: why });
      this.sshfs.delete(child);
      reply(409, {
        error: why.startsWith("/")
          ? "the mount point is not a directory of the user in ~/Redirected"
          : "the share could not be mounted",
      });
      return void sock.end();
    }
    reply(200, { ticket: mountpoint });
    log.info("share", { name, mountpoint });
    if (rest.length) child.stdin!.write(rest);
    sock.pipe(child.stdin!);
    child.stdout!.pipe(sock);
    sock.resume();
    sock.on("close", () => {
      if (child.exitCode === null) child.kill("SIGTERM");
    });
    child.stdin!.on("error", () => undefined);
    const code = await exited;
    this.sshfs.delete(child);
    if (code !== 0)
      log.warn("sshfs ended", { name, status: code, stderr: errText.trim().split("\n").slice(-2).join(" / ") });
    sock.end();
    // The client went away: sshfs on a mounted fd leaves a dead mount behind; take it away.
    if (this.ctx === ctx) await this.unmountAll(ctx, mountpoint);
  }

  /** A USB device request (the key checked): 200 then the stream goes to the attacher. */
  private async attachUsb(sock: Socket, rest: Buffer): Promise<void> {
    const usb = this.o.usbip;
    if (!this.ctx || !this.usbOn || !usb) {
      sock.end(JSON.stringify({ status: 403, error: "USB devices are disabled for this desktop" }) + "\n");
      return;
    }
    const no = await usb.refusal();
    if (no) {
      sock.end(JSON.stringify(no) + "\n");
      return;
    }
    sock.write(JSON.stringify({ status: 200 }) + "\n");
    await usb.attach(sock, rest);
  }

  /** The FUSE mounts below `dir` in the session's mount namespace. */
  private mountsIn(dir: string): string[] {
    try {
      return this.holder?.alive ? fuseMountsBelow(readFileSync(`/proc/${this.holder.pid}/mountinfo`, "utf8"), dir) : [];
    } catch {
      return [];
    }
  }

  /**
   * Unmounts (lazily) every share under ~/Redirected (or only `only`), ends the sshfs processes,
   * removes the empty mount points.
   */
  private async unmountAll(ctx: ServiceContext, only?: string): Promise<void> {
    const dir = join(ctx.homeOnDisk, "Redirected");
    let mounts: string[] = [];
    if (this.holder?.alive) {
      mounts = this.mountsIn(dir).filter((m) => only === undefined || m === only);
      for (const m of mounts) {
        const r = await runQuiet([...this.holder.enter(), "umount", "-l", "--no-canonicalize", "--", m]);
        if (r.status !== 0) log.warn("cannot unmount a share", { mountpoint: m, err: r.stderr.trim() });
      }
    } else if (this.o.asCurrentUser) {
      try {
        mounts = fuseMountsBelow(readFileSync("/proc/self/mountinfo", "utf8"), dir).filter(
          (m) => only === undefined || m === only,
        );
      } catch {}
      for (const m of mounts) await runQuiet(["fusermount3", "-u", "-z", "--", m]);
    }
    if (only === undefined) for (const c of this.sshfs) if (c.exitCode === null) c.kill("SIGTERM");
    // rmdir (never a recursive removal) as the user: the directory is theirs.
    let names: string[] = [];
    try {
      names = only === undefined ? readdirSync(dir) : [only.slice(dir.length + 1)];
    } catch {}
    if (names.length) {
      const a = ctx.account;
      const priv = this.o.asCurrentUser
        ? []
        : ["setpriv", `--reuid=${a.uid}`, `--regid=${a.gid}`, "--clear-groups", "--"];
      await runQuiet([...priv, "rmdir", "--ignore-fail-on-non-empty", "--", ...names.map((n) => join(dir, n))]);
    }
    if (mounts.length) log.info("shares unmounted", { count: mounts.length });
  }
}

export function sharesService(o: SharesOptions): SharesService {
  return new SharesService(o);
}
