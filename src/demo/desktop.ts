// What the demo puts in its database, once: the node's host row, an OSF "Desktop" with the
// Debian desktop image (built by `qvd di build`'s builder, from its cache when the recipe is
// unchanged) tagged default and head, a user `demo` with a generated password, and one VM.
// Every step finds what an earlier run made and keeps it.
import { copyFileSync, existsSync, mkdirSync, renameSync, rmSync, statSync } from "node:fs";
import { join } from "node:path";
import { KEYS } from "../config.ts";
import * as D from "../db/index.ts";
import { generatePassword } from "../db/schema.ts";
import { UserError } from "../errors.ts";
import { buildImage, DEFAULT_IMAGE_NAME, sha256File } from "../virt/image-build.ts";
import { ImageError, imagePaths, removeBasefs, unpackImage } from "../virt/images.ts";
import { DEFAULT_IDMAP } from "../virt/lxc.ts";
import { writeSecret } from "./database.ts";

export const DEMO_TENANT = 1; // the default tenant: users log in without @tenant
export const DEMO_OSF = "Desktop";
export const DEMO_USER = "demo";
export const DEMO_VM = "Debian desktop";
export const USER_PASSWORD_FILE = "demo-password";
export const VM_RANGE = "198.18.0.0/16";
export const NODE_ADDRESS = "198.18.0.1"; // the gateway: the node's address on the VM bridge

type Say = (line: string) => void;
const scope = D.tenantScope(DEMO_TENANT);
const byName = (name: string) => ({ filters: [{ field: "name", op: "=" as const, value: name }] });

export async function ensureHost(sql: D.Sql, name: string): Promise<void> {
  await D.registerHost(sql, name, NODE_ADDRESS);
}

async function ensureOsf(sql: D.Sql): Promise<D.OsfRow> {
  const [osf] = (await D.list(sql, D.osfs, scope, byName(DEMO_OSF))).rows;
  return (
    osf ??
    D.create(sql, D.osfs, D.ALL_TENANTS, {
      tenant_id: DEMO_TENANT,
      name: DEMO_OSF,
      description: "Debian desktop (qvd demo)",
      memory_mb: 512,
    })
  ); // jwm and xterm need far less
}

export interface ImageOptions {
  storageRoot: string;
  imagesDir: string;
  /** An image tarball to use instead of building one. */
  image?: string;
  say: Say;
}

/** The OSF's default image, with its file in the images folder: reused, or made and registered. */
export async function ensureImage(sql: D.Sql, o: ImageOptions): Promise<D.DiRow> {
  const osf = await ensureOsf(sql);
  const current = await D.diForTag(sql, osf.id, "default");
  if (current && existsSync(join(o.imagesDir, current.path))) {
    o.say(`Reusing image ${current.path} (${DEMO_OSF} ${current.version}, tags ${current.tags.join(", ")})`);
    return current;
  }
  mkdirSync(o.imagesDir, { recursive: true });
  // A file name no image row uses yet (an earlier image whose file went missing keeps its row).
  const used = new Set(
    (await D.list(sql, D.dis, D.ALL_TENANTS, { fields: ["path"], limit: D.MAX_LIMIT })).rows.map((d) => d.path),
  );
  let name = DEFAULT_IMAGE_NAME;
  for (let n = 2; used.has(name); n++) name = DEFAULT_IMAGE_NAME.replace(/\.tar\.gz$/, `-${n}.tar.gz`);
  const file = join(o.imagesDir, name);

  let sha256: string;
  let bytes: number;
  if (o.image) {
    if (!existsSync(o.image)) throw new UserError(`--image ${o.image}: no such file`);
    o.say(`Copying the image ${o.image}…`);
    const tmp = `${file}.tmp-${process.pid}`;
    try {
      copyFileSync(o.image, tmp);
      renameSync(tmp, file);
    } finally {
      rmSync(tmp, { force: true });
    }
    [sha256, bytes] = [await sha256File(file), statSync(file).size];
  } else {
    const cacheDir = String(KEYS["di.build.cache"].default);
    o.say(
      `Building the Debian desktop image with qvd di build (cache ${cacheDir}; about 3 minutes when nothing is cached)…`,
    );
    const res = await buildImage({ output: file, cacheDir, log: (line) => o.say(`  ${line}`) });
    o.say(`  ${res.cached ? "copied from the cache" : "built"} in ${res.seconds.toFixed(0)} s`);
    [sha256, bytes] = [res.sha256, res.bytes];
  }
  const created = await D.create(sql, D.dis, D.ALL_TENANTS, {
    osf_id: osf.id,
    path: name,
    description: "Debian desktop built by qvd di build",
  });
  await D.finishDiUpload(sql, created.id, bytes, sha256);
  // The first image of an OSF gets `default` by itself; a replacement takes it over.
  await D.tagDi(sql, D.ALL_TENANTS, created.id, "default");
  const di = await D.get(sql, D.dis, D.ALL_TENANTS, created.id);
  o.say(
    `Registered image ${name} (${(bytes / 1024 / 1024).toFixed(0)} MiB) as ${DEMO_OSF} ${di.version}, tags ${di.tags.join(", ")}`,
  );
  return di;
}

/** Unpacks the image now, with progress, as the node would at the first start of the desktop. */
export async function unpackForNode(di: D.DiRow, o: ImageOptions): Promise<void> {
  const p = imagePaths(o.storageRoot, o.imagesDir, di);
  let last = -1;
  const unpack = () =>
    unpackImage({
      image: p.image,
      basefsDir: p.basefsDir,
      diId: di.id,
      sha256: di.sha256,
      idmap: DEFAULT_IDMAP, // the demo node's (default) range
      onProgress: (pr) => {
        if (pr.phase === "wait") return o.say("  waiting for another unpack of this image…");
        const pct = pr.total ? Math.floor((pr.bytes / pr.total) * 4) * 25 : 100;
        if (pct !== last) o.say(`  ${pr.phase}: ${pct}%`);
        last = pct;
      },
    });
  const res = await unpack().catch(async (err) => {
    // Unpacked by an earlier demo before desktops were unprivileged: nothing runs on it now.
    if (!(err instanceof ImageError && /was unpacked with/.test(err.message))) throw err;
    o.say("  the image was unpacked for privileged desktops: unpacking it again");
    removeBasefs(p.basefsDir, di.id);
    return unpack();
  });
  o.say(res.unpacked ? `Unpacked into ${res.basefs}` : `Image already unpacked in ${res.basefs}`);
}

export interface DemoUser {
  name: string;
  passwordFile: string;
  /** Set when the password was made in this run (it is shown once). */
  newPassword?: string;
  vm: D.VmRow;
}

/** The user `demo` (password in <dir>/demo-password, mode 0600) and its one desktop. */
export async function ensureUser(sql: D.Sql, dir: string, osfName = DEMO_OSF): Promise<DemoUser> {
  const passwordFile = join(dir, USER_PASSWORD_FILE);
  let [user] = (await D.list(sql, D.users, scope, byName(DEMO_USER))).rows;
  let newPassword: string | undefined;
  if (!user || !existsSync(passwordFile)) {
    // A new user, or one whose password file is gone: a fresh password either way.
    newPassword = generatePassword();
    user = user
      ? await D.update(sql, D.users, scope, user.id, { password: newPassword })
      : await D.create(sql, D.users, D.ALL_TENANTS, {
          tenant_id: DEMO_TENANT,
          name: DEMO_USER,
          password: newPassword,
          description: "qvd demo user",
        });
    writeSecret(passwordFile, newPassword);
  }
  const [osf] = (await D.list(sql, D.osfs, scope, byName(osfName))).rows;
  if (!osf) throw new UserError(`the OSF ${osfName} is gone from the demo database`);
  let [vm] = (await D.list(sql, D.vms, scope, { filters: [{ field: "user_id", op: "=", value: user.id }] })).rows;
  vm ??= await D.createVm(sql, D.ALL_TENANTS, { user_id: user.id, osf_id: osf.id, name: DEMO_VM }, { range: VM_RANGE });
  return { name: DEMO_USER, passwordFile, newPassword, vm };
}
