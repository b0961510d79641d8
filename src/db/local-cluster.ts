// A PostgreSQL cluster managed by qvd itself on this machine (`qvd demo`, the tests):
// initdb + pg_ctl in a directory, listening on a unix socket in that directory only (no TCP).
// When qvd runs as root the server runs as an unprivileged user (initdb refuses root):
// `postgres` when the postgresql package created it, else `nobody`.
import {
  chmodSync,
  chownSync,
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  realpathSync,
  statSync,
} from "node:fs";
import { join } from "node:path";
import { UserError } from "../errors.ts";
import { run } from "../run.ts";
import { connect } from "./pool.ts";

/** The directory of the PostgreSQL server programs (pg_ctl, initdb, postgres). */
export function findPgBinDir(): string {
  const onPath = Bun.which("pg_ctl");
  if (onPath) {
    // Debian puts symlinks on PATH at most; the real directory also holds initdb and postgres.
    const real = realpathSync(onPath);
    return real.slice(0, real.lastIndexOf("/"));
  }
  const base = "/usr/lib/postgresql";
  const versions = existsSync(base)
    ? readdirSync(base)
        .filter((v) => /^\d+$/.test(v))
        .sort((a, b) => +b - +a)
    : [];
  for (const v of versions) if (existsSync(`${base}/${v}/bin/pg_ctl`)) return `${base}/${v}/bin`;
  throw new UserError("PostgreSQL server programs not found (pg_ctl): install the postgresql package");
}

export interface LocalClusterOptions {
  /** Holds the data directory (`data/`), the server log and the unix socket. */
  dir: string;
  /** Extra server settings (`-c key=value`), e.g. fsync=off for throwaway clusters. */
  settings?: Record<string, string | number>;
  /** initdb without fsync (throwaway clusters). */
  noSync?: boolean;
}

/** Quotes a server setting value for pg_ctl -o. */
const settingArg = (k: string, v: string | number) => `-c ${k}='${String(v).replace(/'/g, "''")}'`;

export class LocalCluster {
  readonly dir: string;
  readonly data: string;
  readonly log: string;
  readonly bin: string;
  /** The system user the server runs as, when qvd runs as root. */
  readonly user?: string;
  private readonly asUser: string[];
  private readonly opts: LocalClusterOptions;

  constructor(opts: LocalClusterOptions) {
    this.opts = opts;
    this.dir = opts.dir;
    this.data = join(this.dir, "data");
    this.log = join(this.dir, "server.log");
    this.bin = findPgBinDir();
    if (process.getuid?.() === 0) {
      this.user = systemUser("postgres") ? "postgres" : "nobody";
      this.asUser = ["runuser", "-u", this.user, "--"];
    } else this.asUser = [];
  }

  /** libpq-style URL of a database in this cluster (unix socket in `dir`). */
  url(db = "postgres"): string {
    return `postgres://postgres@/${encodeURIComponent(db)}?host=${encodeURIComponent(this.dir).replace(/%2F/g, "/")}`;
  }

  /** Whether initdb has already created the cluster. */
  get initialised(): boolean {
    return existsSync(join(this.data, "PG_VERSION"));
  }

  /**
   * Creates `dir` if needed and gives it to the server's user; checks that this user can
   * reach it (all its parents must be searchable).
   */
  private async prepareDir(): Promise<void> {
    mkdirSync(this.dir, { recursive: true });
    if (!this.user) return;
    const u = systemUser(this.user);
    if (!u) throw new UserError(`no system user ${this.user} to run PostgreSQL as (see /etc/passwd)`);
    if (statSync(this.dir).uid !== u.uid) chownSync(this.dir, u.uid, u.gid);
    chmodSync(this.dir, 0o755);
    const probe = await run([...this.asUser, "test", "-w", this.dir, "-a", "-x", this.dir], {
      cwd: "/",
      allowFail: true,
    });
    if (probe.status !== 0)
      throw new UserError(
        `${this.dir}: the ${this.user} user (which runs PostgreSQL) cannot reach this directory: make its parent directories searchable (chmod o+x) or choose another directory`,
      );
  }

  private exec(prog: string, args: string[], timeoutMs = 120_000) {
    // As another user, start from a directory that user can read (initdb complains otherwise).
    return run([...this.asUser, `${this.bin}/${prog}`, ...args], { cwd: this.dir, timeoutMs });
  }

  /** initdb: a cluster whose superuser is `postgres`, trusted on the (private) unix socket. */
  async init(): Promise<void> {
    await this.prepareDir();
    await this.exec("initdb", [
      "-D",
      this.data,
      "-U",
      "postgres",
      "--auth=trust",
      "-E",
      "UTF8",
      "--locale=C",
      ...(this.opts.noSync ? ["--no-sync"] : []),
    ]);
  }

  /**
   * Makes this new cluster a streaming standby of `primary` (pg_basebackup -R over the
   * primary's unix socket); start() then runs it as a hot standby.
   */
  async initStandbyOf(primary: LocalCluster): Promise<void> {
    await this.prepareDir();
    await this.exec("pg_basebackup", [
      "-D",
      this.data,
      "-R",
      "-X",
      "stream",
      "-c",
      "fast",
      "-d",
      `host=${primary.dir} user=postgres`,
    ]);
  }

  /** Promotes a standby: it leaves recovery and takes writes (waits until it does). */
  async promote(): Promise<void> {
    await this.exec("pg_ctl", ["-D", this.data, "-w", "-t", "60", "promote"], 90_000);
  }

  /** Starts the server and waits until it accepts connections. */
  async start(): Promise<void> {
    await this.prepareDir();
    const settings = {
      listen_addresses: "",
      unix_socket_directories: this.dir,
      // Only this user (and root) may connect: the socket trusts whoever reaches it.
      unix_socket_permissions: "0700",
      ...this.opts.settings,
    };
    const o = Object.entries(settings)
      .map(([k, v]) => settingArg(k, v))
      .join(" ");
    await this.exec("pg_ctl", ["-D", this.data, "-l", this.log, "-w", "-t", "60", "-o", o, "start"], 90_000).catch(
      (err) => {
        throw new UserError(`cannot start PostgreSQL in ${this.data}: ${(err as Error).message}${this.logTail()}`);
      },
    );
  }

  /** Stops the server: `fast` (clean shutdown, clients cut) or `immediate` (crash-like). */
  async stop(mode: "smart" | "fast" | "immediate" = "fast"): Promise<void> {
    await this.exec("pg_ctl", ["-D", this.data, "-m", mode, "-w", "-t", "60", "stop"], 90_000);
  }

  /** A real restart of the server process (connections are cut). */
  async restart(): Promise<void> {
    await this.stop("fast");
    await this.start();
  }

  /** Whether a server is running on this data directory (pg_ctl status). */
  async running(): Promise<boolean> {
    if (!existsSync(join(this.data, "postmaster.pid"))) return false;
    const res = await run([...this.asUser, `${this.bin}/pg_ctl`, "-D", this.data, "status"], {
      cwd: this.dir,
      allowFail: true,
      timeoutMs: 30_000,
    });
    return res.status === 0;
  }

  async databaseExists(name: string): Promise<boolean> {
    const sql = connect(this.url(), { max: 1 });
    try {
      const rows = await sql`SELECT 1 FROM pg_database WHERE datname = ${name}`;
      return rows.length > 0;
    } finally {
      await sql.end({ timeout: 5 });
    }
  }

  /** Creates a database (empty, or a copy of `template`). */
  async createDatabase(name: string, template?: string): Promise<void> {
    const sql = connect(this.url(), { max: 1 });
    try {
      await sql.unsafe(`CREATE DATABASE ${quoteIdent(name)}${template ? ` TEMPLATE ${quoteIdent(template)}` : ""}`);
    } finally {
      await sql.end({ timeout: 5 });
    }
  }

  private logTail(): string {
    try {
      const lines = readFileSync(this.log, "utf8").trim().split("\n").slice(-3);
      return lines.length ? ` (${this.log}: ${lines.join(" / ")})` : "";
    } catch {
      return "";
    }
  }
}

const quoteIdent = (s: string) => `"${s.replace(/"/g, '""')}"`;

/** A local system user from /etc/passwd (the server's user is always a local one). */
function systemUser(name: string): { uid: number; gid: number } | undefined {
  let passwd = "";
  try {
    passwd = readFileSync("/etc/passwd", "utf8");
  } catch {
    return undefined;
  }
  for (const line of passwd.split("\n")) {
    const f = line.split(":");
    if (f[0] === name && f.length >= 4) return { uid: Number(f[2]), gid: Number(f[3]) };
  }
  return undefined;
}
