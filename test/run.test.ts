// The process runner's log lines and errors never carry a password from a command line.
import { expect, test } from "bun:test";
import { loggableCommand, run } from "../src/run.ts";

test("passwords in URLs on a command line are masked in what is logged", () => {
  const line = loggableCommand([
    "qvd",
    "hkd",
    "--db",
    "postgres://qvd:s3cr%21t@db1:5432,db2/qvd?sslmode=require",
    "--set",
    "x=postgres://u@h/db?password=pw2&sslmode=require",
  ]);
  expect(line).not.toContain("s3cr");
  expect(line).not.toContain("pw2");
  expect(line).toContain("postgres://qvd:********@db1:5432,db2/qvd?sslmode=require");
  expect(line).toContain("password=********&sslmode=require");
  // Nothing else changes: no password, nothing masked.
  expect(loggableCommand(["lxc-start", "-n", "qvd-1", "postgres://qvd@/qvd?host=/run/pg"])).toBe(
    "lxc-start -n qvd-1 'postgres://qvd@/qvd?host=/run/pg'",
  );
});

test("a failing command's error names it without the password", async () => {
  const err = await run(["sh", "-c", "exit 3", "sh", "postgres://qvd:topsecret@db/qvd"]).catch((e: Error) => e);
  expect(err).toBeInstanceOf(Error);
  expect((err as Error).message).toContain("postgres://qvd:********@db/qvd");
  expect((err as Error).message).not.toContain("topsecret");
});
