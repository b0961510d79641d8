// One HKD per node: an exclusive flock on a file under path.run, held for the process's life
// (the kernel releases it when the process dies, however it dies).
import { dlopen, FFIType } from "bun:ffi";
import { closeSync, mkdirSync, openSync, writeFileSync } from "node:fs";
import { dirname } from "node:path";
import { UserError } from "../errors.ts";

const LOCK_EX = 2;
const LOCK_NB = 4;

let libc: { symbols: { flock: (fd: number, op: number) => number } } | undefined;
function flock(fd: number, op: number): number {
  libc ??= dlopen("libc.so.6", {
    flock: { args: [FFIType.i32, FFIType.i32], returns: FFIType.i32 },
  }) as unknown as typeof libc;
  return libc!.symbols.flock(fd, op);
}

/** Takes the lock or fails with a message naming the file; returns a release function. */
export function acquireNodeLock(path: string): () => void {
  mkdirSync(dirname(path), { recursive: true, mode: 0o755 });
  const fd = openSync(path, "a+", 0o644);
  if (flock(fd, LOCK_EX | LOCK_NB) !== 0) {
    closeSync(fd);
    throw new UserError(`another HKD holds ${path}: only one may run per node`);
  }
  writeFileSync(path, `${process.pid}\n`);
  return () => closeSync(fd);
}
