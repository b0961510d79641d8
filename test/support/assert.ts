// Small assertions the tests share.
//   const u = await ok(sa.post("/users", { name: "bob" }), 201);   // the body, or a failure naming status and body
//   const row = await ok(admin.get(`/vms/${id}`), "2xx", "the VM");
//   expect(clone(u)).toMatchObject({ name: "bob" });
//   const e = await rejection(unpackImage(…), ImageError, /not a tarball/);
import { expect } from "bun:test";

/** An answer of the admin API as ApiClient gives it (any object with a status and a body). */
export interface Answer<T = any> {
  status: number;
  body: T;
}

/**
 * The body of `answer` when its status is `status` (default 200; "2xx": any success); otherwise
 * fails naming what was asked (`what`), the status and the body.
 */
export async function ok<T = any>(
  answer: Promise<Answer<T>> | Answer<T>,
  status: number | "2xx" = 200,
  what?: string,
): Promise<T> {
  const r = await answer;
  const good = status === "2xx" ? r.status >= 200 && r.status < 300 : r.status === status;
  if (!good)
    throw new Error(`${what ? `${what}: ` : ""}expected ${status}, got ${r.status}: ${JSON.stringify(r.body)}`);
  return r.body;
}

/** A deep copy, for bun's toMatchObject, which writes its asymmetric matchers into the object it checks. */
export const clone = <T>(v: T): T => structuredClone(v);

/** The error `p` rejects with: an instance of `type`, its message matching `pattern` (expectations that fail otherwise, also when `p` resolves). */
export async function rejection<E extends Error>(
  p: Promise<unknown>,
  type: abstract new (...args: any[]) => E,
  pattern?: RegExp,
): Promise<E> {
  let err: unknown;
  try {
    await p;
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(type);
  if (pattern) expect((err as Error).message).toMatch(pattern);
  return err as E;
}
