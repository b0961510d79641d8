// Reading a password: from a file, from the terminal without echo, or the first line of a
// non-terminal standard input (`echo "$PW" | qvd admin login …`).
import { readFileSync } from "node:fs";
import { UserError } from "../errors.ts";
import { usageError } from "./client.ts";

/** The first line of a file, without its line ending. */
export function passwordFromFile(file: string): string {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (err) {
    throw usageError(`${file}: cannot read password file: ${(err as Error).message}`);
  }
  const line = text.split(/\r?\n/)[0] ?? "";
  if (!line) throw usageError(`${file}: the first line (the password) is empty`);
  return line;
}

/** The first line of standard input (stops reading at the first newline). */
async function firstLineOfStdin(): Promise<string> {
  const reader = Bun.stdin.stream().getReader();
  const decoder = new TextDecoder();
  let text = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (value) text += decoder.decode(value, { stream: true });
      if (done || text.includes("\n")) break;
    }
  } finally {
    await reader.cancel().catch(() => {});
  }
  return text.split(/\r?\n/)[0] ?? "";
}

/** Prompts on the terminal without echo; Ctrl-C aborts. */
function promptHidden(prompt: string): Promise<string> {
  const stdin = process.stdin;
  // Echo off before the prompt shows: a password typed (or pasted) as soon as the prompt
  // appears must never be echoed.
  stdin.setRawMode(true);
  process.stderr.write(prompt);
  stdin.resume();
  return new Promise((resolve, reject) => {
    let chars: string[] = [];
    const finish = () => {
      stdin.off("data", onData);
      stdin.setRawMode(false);
      stdin.pause();
      process.stderr.write("\n");
    };
    const onData = (d: Buffer | string) => {
      for (const ch of d.toString()) {
        if (ch === "\r" || ch === "\n") {
          finish();
          return resolve(chars.join(""));
        }
        if (ch === "\u0003" || (ch === "\u0004" && chars.length === 0)) {
          finish();
          return reject(new UserError("interrupted", 130));
        }
        if (ch === "\u007f" || ch === "\b") chars.pop();
        else if (ch === "\u0015") chars = [];
        else if (ch >= " ") chars.push(ch);
      }
    };
    stdin.on("data", onData);
  });
}

/** The password for a login: `--password-file`, else the terminal, else stdin's first line. */
export async function readPassword(file: string | undefined, prompt: string): Promise<string> {
  if (file) return passwordFromFile(file);
  const pw = process.stdin.isTTY ? await promptHidden(prompt) : await firstLineOfStdin();
  if (!pw)
    throw usageError(
      "no password given (type it at the prompt, pipe it on standard input, or use --password-file FILE)",
    );
  return pw;
}
