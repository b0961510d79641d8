// The VMA's slave server (src/vma/slave.ts) driven through pipes: authentication on every
// endpoint, the exact 101 answers and the argv of the programs it would run (a recording exec
// stands in for sshfs, sftp-server and xdg-open), names and paths that try to leave the shares
// directory, malformed input, and the `qvd vma-slave` subcommand on real stdin/stdout pipes.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync, existsSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { PassThrough } from "node:stream";
import { createServer } from "node:net";
import {
  keyMatches,
  serveSlave,
  spawnExec,
  USBIP_UNAVAILABLE,
  type SlaveCommand,
  type SlaveExec,
  type SlaveOptions,
} from "../src/vma/slave.ts";

const KEY = "4fQxZ0aB1cD2eF3gH4iJ5kL6mN7oP8qR9sT0uV1wX2yZ3aB4cD5eF6gH7iJ8kL9m"; // 64 chars, as the L7R mints
const WRONG_SAME = KEY.slice(0, -1) + (KEY.endsWith("m") ? "n" : "m");
let work: string;
let keyFile: string;
let shares: string;

beforeAll(() => {
  work = mkdtempSync(join(tmpdir(), "qvd-slave-"));
  keyFile = join(work, "slave.conf");
  writeFileSync(keyFile, KEY + "\n", { mode: 0o600 });
  shares = join(work, "home", "Redirected");
});
afterAll(() => rmSync(work, { recursive: true, force: true }));

interface Recorded {
  handOvers: { cmd: SlaveCommand; received: string }[];
  launches: SlaveCommand[];
}

function recorder(): SlaveExec & Recorded {
  const r: Recorded = { handOvers: [], launches: [] };
  return {
    ...r,
    async handOver(cmd, rest, output) {
      let received = "";
      for await (const c of rest) received += new TextDecoder().decode(c);
      r.handOvers.push({ cmd, received });
      output.write(new TextEncoder().encode("<program output>"));
      return 0;
    },
    launch(cmd) {
      r.launches.push(cmd);
    },
  };
}

/** Sends `request` (then end of input) and returns everything the server wrote. */
async function talk(
  request: string | Uint8Array,
  extra: Partial<SlaveOptions> = {},
): Promise<{ out: string; exec: ReturnType<typeof recorder> }> {
  const exec = recorder();
  const input = new PassThrough();
  const chunks: Uint8Array[] = [];
  let ended = false;
  const done = serveSlave(
    input,
    {
      write: (b) => chunks.push(b),
      end: () => {
        ended = true;
      },
    },
    {
      keyFile,
      sharesDir: shares,
      uid: 1234,
      sshfs: "/usr/bin/sshfs",
      sftpServer: "/usr/lib/openssh/sftp-server",
      xdgOpen: "/usr/bin/xdg-open",
      exec,
      ...extra,
    },
  );
  input.end(typeof request === "string" ? Buffer.from(request, "latin1") : request);
  await done;
  expect(ended).toBe(true);
  return { out: Buffer.concat(chunks).toString("latin1"), exec };
}

const auth = `Authorization: Basic ${KEY}\r\n`;
const up = "Connection: Upgrade\r\nUpgrade: qvd:sftp/1.0\r\n";
const status = (out: string) => Number(/^HTTP\/1\.1 (\d{3}) /.exec(out)?.[1]);

describe("authentication", () => {
  const endpoints = [
    `PUT /shares/home/u/Docs HTTP/1.1\r\n${up}`,
    `GET /shares${"/tmp"} HTTP/1.1\r\n${up}`,
    `POST /open/a.txt HTTP/1.1\r\nX-QVD-Share-Ticket: /x\r\n`,
    `POST /usbip HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: qvd:usbip/1.0\r\n`,
    `GET /nothing HTTP/1.1\r\n`,
    `DELETE /shares/x HTTP/1.1\r\n`,
  ];
  const bad = [
    ["no Authorization", ""],
    ["a wrong key of the same length", `Authorization: Basic ${WRONG_SAME}\r\n`],
    ["a shorter key", `Authorization: Basic ${KEY.slice(0, 10)}\r\n`],
    ["a longer key", `Authorization: Basic ${KEY}x\r\n`],
    ["another scheme", `Authorization: Bearer ${KEY}\r\n`],
    ["an empty key", `Authorization: Basic \r\n`],
    ["the key base64-encoded", `Authorization: Basic ${Buffer.from(KEY).toString("base64")}\r\n`],
  ] as const;
  for (const ep of endpoints) {
    for (const [what, header] of bad) {
      test(`${ep.split("\r\n")[0]} with ${what}: 401, closed, nothing run`, async () => {
        // A valid request pipelined behind must not be answered: the connection closed.
        const { out, exec } = await talk(`${ep}${header}\r\nPOST /usbip HTTP/1.1\r\n${auth}\r\n`);
        expect(out).toBe(
          'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm="QVD"\r\nConnection: close\r\n' +
            "Content-Type: text/plain; charset=utf-8\r\nContent-Length: 13\r\n\r\nUnauthorized\n",
        );
        expect(exec.handOvers.length + exec.launches.length).toBe(0);
      });
    }
  }

  test("a missing or empty key file accepts nothing", async () => {
    expect(status((await talk(`POST /usbip HTTP/1.1\r\n${auth}\r\n`, { keyFile: join(work, "absent") })).out)).toBe(
      401,
    );
    const empty = join(work, "empty.conf");
    writeFileSync(empty, "");
    expect(status((await talk(`POST /usbip HTTP/1.1\r\nAuthorization: Basic \r\n\r\n`, { keyFile: empty })).out)).toBe(
      401,
    );
  });

  test("keyMatches: equal only", () => {
    expect(keyMatches(KEY, KEY)).toBe(true);
    expect(keyMatches(WRONG_SAME, KEY)).toBe(false);
    expect(keyMatches("", KEY)).toBe(false);
    expect(keyMatches(undefined, KEY)).toBe(false);
    expect(keyMatches(KEY, undefined)).toBe(false);
  });
});

describe("PUT /shares (client folder into the desktop)", () => {
  test("one request of the original protocol, byte for byte", async () => {
    const req =
      `PUT /shares/home/alice/Documents HTTP/1.1\r\nAuthorization: Basic ${KEY}\r\nConnection: Upgrade\r\n` +
      "Upgrade: qvd:sftp/1.0;charset=ISO-8859-1\r\n\r\nSFTP-BYTES";
    const { out, exec } = await talk(req);
    const mp = join(shares, "Documents");
    expect(out).toBe(`HTTP/1.1 101 Switching Protocols\r\nX-QVD-Share-Ticket: ${mp}\r\n\r\n<program output>`);
    expect(exec.handOvers).toHaveLength(1);
    expect(exec.handOvers[0]!.cmd.argv).toEqual([
      "/usr/bin/sshfs",
      "qvd-client:",
      mp,
      "-o",
      "slave",
      "-o",
      "uid=1234",
      "-o",
      "modules=iconv,from_code=ISO-8859-1,to_code=utf-8",
    ]);
    expect(exec.handOvers[0]!.received).toBe("SFTP-BYTES"); // what follows the head goes to sshfs
    expect(statSync(mp).isDirectory()).toBe(true);
  });

  test("no charset, extra args, and the root share", async () => {
    const { out, exec } = await talk(`PUT /shares/ HTTP/1.1\r\n${auth}${up}\r\n`, {
      sshfsExtraArgs: ["-o", "cache=no"],
    });
    const mp = join(shares, "Root");
    expect(out).toBe(`HTTP/1.1 101 Switching Protocols\r\nX-QVD-Share-Ticket: ${mp}\r\n\r\n<program output>`);
    expect(exec.handOvers[0]!.cmd.argv).toEqual([
      "/usr/bin/sshfs",
      "qvd-client:",
      mp,
      "-o",
      "slave",
      "-o",
      "uid=1234",
      "-o",
      "cache=no",
    ]);
  });

  test("percent-encoded names are decoded; an encoded slash only splits", async () => {
    const { out } = await talk(`PUT /shares/C%3A/My%20Files%2Fsub HTTP/1.1\r\n${auth}${up}\r\n`);
    expect(out).toContain(`X-QVD-Share-Ticket: ${join(shares, "sub")}\r\n`);
    const { out: o2 } = await talk(`PUT /shares/My%20Files HTTP/1.1\r\n${auth}${up}\r\n`);
    expect(o2).toContain(`X-QVD-Share-Ticket: ${join(shares, "My Files")}\r\n`);
  });

  const escapes: [string, string][] = [
    ["..", "/shares/.."],
    ["a/..", "/shares/a/.."],
    ["encoded ..", "/shares/%2e%2e"],
    ["encoded ../", "/shares/x%2F%2E%2E"],
    [".", "/shares/a/."],
    ["NUL", "/shares/a%00b"],
    ["newline", "/shares/a%0d%0aX-Evil:%201"],
    ["256 bytes", `/shares/${"n".repeat(256)}`],
    ["256 bytes in UTF-8", `/shares/${"%C3%A9".repeat(128)}`],
    ["bad percent-encoding", "/shares/%zz"],
  ];
  for (const [what, path] of escapes) {
    test(`name with ${what}: 400, nothing run`, async () => {
      const { out, exec } = await talk(`PUT ${path} HTTP/1.1\r\n${auth}${up}\r\n`);
      expect(status(out)).toBe(400);
      expect(exec.handOvers).toHaveLength(0);
    });
  }

  test("255 bytes is a valid name", async () => {
    const { out } = await talk(`PUT /shares/${"n".repeat(255)} HTTP/1.1\r\n${auth}${up}\r\n`);
    expect(status(out)).toBe(101);
  });

  test("a symlink or a file in the shares directory is not mounted over", async () => {
    mkdirSync(shares, { recursive: true });
    symlinkSync("/etc", join(shares, "evil"));
    writeFileSync(join(shares, "afile"), "x");
    for (const name of ["evil", "afile"]) {
      const { out, exec } = await talk(`PUT /shares/${name} HTTP/1.1\r\n${auth}${up}\r\n`);
      expect(status(out)).toBe(409);
      expect(exec.handOvers).toHaveLength(0);
    }
  });

  test("a symlinked shares directory path is still checked", async () => {
    const outside = join(work, "outside");
    mkdirSync(outside);
    symlinkSync(outside, join(work, "linked"));
    const { out } = await talk(`PUT /shares/x HTTP/1.1\r\n${auth}${up}\r\n`, { sharesDir: join(work, "linked") });
    expect(status(out)).toBe(101); // the shares dir itself may be a link; the mount point is its child
    expect(existsSync(join(outside, "x"))).toBe(true);
  });

  for (const [what, hdr] of [
    ["no Upgrade", "Connection: Upgrade\r\n"],
    ["no Connection", "Upgrade: qvd:sftp/1.0\r\n"],
    ["another protocol", "Connection: Upgrade\r\nUpgrade: websocket\r\n"],
    ["a charset with a space", "Connection: Upgrade\r\nUpgrade: qvd:sftp/1.0;charset=a b\r\n"],
    ["a charset that is an option", "Connection: Upgrade\r\nUpgrade: qvd:sftp/1.0;charset=x,allow_other\r\n"],
  ] as const) {
    test(`${what}: 426`, async () => {
      const { out, exec } = await talk(`PUT /shares/x HTTP/1.1\r\n${auth}${hdr}\r\n`);
      expect(status(out)).toBe(426);
      expect(exec.handOvers).toHaveLength(0);
    });
  }
});

describe("GET /shares (desktop folder to the client)", () => {
  test("101, then sftp-server -e in that directory", async () => {
    const dir = join(work, "served");
    mkdirSync(dir);
    const { out, exec } = await talk(`GET /shares${dir} HTTP/1.1\r\n${auth}${up}\r\n`);
    expect(out).toBe("HTTP/1.1 101 Switching Protocols\r\n\r\n<program output>");
    expect(exec.handOvers[0]!.cmd.argv).toEqual(["/usr/lib/openssh/sftp-server", "-e"]);
    expect(exec.handOvers[0]!.cmd.cwd).toBe(dir);
  });

  test("a missing directory: 404; '..': 400; a file: 404", async () => {
    expect(status((await talk(`GET /shares${work}/nope HTTP/1.1\r\n${auth}${up}\r\n`)).out)).toBe(404);
    expect(status((await talk(`GET /shares${work}/../etc HTTP/1.1\r\n${auth}${up}\r\n`)).out)).toBe(400);
    expect(status((await talk(`GET /shares${keyFile} HTTP/1.1\r\n${auth}${up}\r\n`)).out)).toBe(404);
  });
});

describe("POST /open", () => {
  let share: string;
  beforeAll(() => {
    share = join(shares, "Opened");
    mkdirSync(join(share, "sub"), { recursive: true });
    writeFileSync(join(share, "sub", "report.odt"), "x");
    symlinkSync(keyFile, join(share, "link"));
  });

  test("xdg-open of the file in the share, on DISPLAY=:100, no shell", async () => {
    const { out, exec } = await talk(
      `POST /open/sub/report.odt HTTP/1.1\r\n${auth}X-QVD-Share-Ticket: ${share}\r\nContent-Length: 0\r\n\r\n`,
    );
    expect(out).toBe("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    expect(exec.launches).toHaveLength(1);
    expect(exec.launches[0]!.argv).toEqual(["/usr/bin/xdg-open", join(share, "sub", "report.odt")]);
    expect(exec.launches[0]!.env?.DISPLAY).toBe(":100");
  });

  for (const [what, path, ticket] of [
    ["'..' in the file", "/open/sub/../../../slave.conf", "SHARE"],
    ["encoded '..'", "/open/%2e%2e/x", "SHARE"],
    ["a symlink out of the share", "/open/link", "SHARE"],
    ["a ticket outside the shares dir", "/open/slave.conf", "WORK"],
    ["the shares dir as ticket", "/open/Opened/sub/report.odt", "SHARES"],
    ["a ticket with '..'", "/open/slave.conf", "SHARE/../../.."],
    ["no ticket", "/open/sub/report.odt", ""],
    ["no file", "/open/", "SHARE"],
  ] as const) {
    test(`${what}: refused, nothing run`, async () => {
      const t = ticket.replace("SHARES", shares).replace("SHARE", share).replace("WORK", work);
      const { out, exec } = await talk(
        `POST ${path} HTTP/1.1\r\n${auth}${t ? `X-QVD-Share-Ticket: ${t}\r\n` : ""}\r\n`,
      );
      expect([400, 404]).toContain(status(out));
      expect(exec.launches).toHaveLength(0);
    });
  }

  test("a missing file: 404; GET: 405", async () => {
    expect(status((await talk(`POST /open/nope HTTP/1.1\r\n${auth}X-QVD-Share-Ticket: ${share}\r\n\r\n`)).out)).toBe(
      404,
    );
    expect(
      status((await talk(`GET /open/sub/report.odt HTTP/1.1\r\n${auth}X-QVD-Share-Ticket: ${share}\r\n\r\n`)).out),
    ).toBe(405);
  });
});

describe("other requests", () => {
  test("POST /usbip in an LXC desktop (or one without the VMA's socket): 501 naming vhci_hcd and LXC; GET /usbip: 405", async () => {
    const msg = `${USBIP_UNAVAILABLE}\n`;
    const expected = `HTTP/1.1 501 Not Implemented\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: ${msg.length}\r\n\r\n${msg}`;
    expect(msg).toContain("vhci_hcd");
    expect(msg).toContain("LXC");
    const req = `POST /usbip HTTP/1.1\r\n${auth}Connection: Upgrade\r\nUpgrade: qvd:usbip/1.0\r\n\r\n`;
    expect((await talk(req, { usbUnavailable: true, socket: join(work, "vma.sock") })).out).toBe(expected);
    expect((await talk(req)).out).toBe(expected);
    expect(status((await talk(`GET /usbip HTTP/1.1\r\n${auth}\r\n`)).out)).toBe(405);
  });

  test("POST /usbip in a KVM desktop: the VMA's socket is asked with the key, the 101 follows its 200, the stream is relayed both ways", async () => {
    const path = join(work, "usb.sock");
    const asked: string[] = [];
    let answer = `{"status":200}\n`;
    const server = createServer((s) => {
      let buf = "";
      let answered = false;
      s.on("data", (d) => {
        buf += d.toString("latin1");
        if (!answered) {
          const nl = buf.indexOf("\n");
          if (nl < 0) return;
          asked.push(buf.slice(0, nl));
          buf = buf.slice(nl + 1);
          answered = true;
          if (!answer.startsWith(`{"status":200`)) return void s.end(answer);
          s.write(answer + "vma:");
        }
        // After the 200: the client's device line and URBs, echoed back.
        if (buf.length) s.write(buf);
        buf = "";
      });
    });
    await new Promise<void>((r) => server.listen(path, () => r()));
    try {
      const up = `POST /usbip HTTP/1.1\r\n${auth}Connection: Upgrade\r\nUpgrade: qvd:usbip/1.0\r\n\r\n`;
      const { out } = await talk(`${up}65538 3\nURB`, { socket: path });
      expect(out.startsWith("HTTP/1.1 101 Switching Protocols\r\n\r\n")).toBe(true);
      expect(out.slice(out.indexOf("vma:"))).toBe("vma:65538 3\nURB");
      expect(JSON.parse(asked[0]!)).toEqual({ key: KEY, usbip: true });
      // Without the Upgrade headers: 426, the VMA not asked.
      asked.length = 0;
      expect(status((await talk(`POST /usbip HTTP/1.1\r\n${auth}\r\n`, { socket: path })).out)).toBe(426);
      expect(asked).toEqual([]);
      // The VMA's refusal (no vhci_hcd, too many devices) reaches the client as its status and reason.
      answer = `{"status":503,"error":"at most 8 USB devices at a time"}\n`;
      const r = await talk(up, { socket: path });
      expect(r.out).toStartWith("HTTP/1.1 503 Service Unavailable\r\n");
      expect(r.out).toEndWith("at most 8 USB devices at a time\n");
      // Switched off by the administrator: 403 before anything else.
      asked.length = 0;
      expect(status((await talk(up, { socket: path, noUsb: true })).out)).toBe(403);
      expect(asked).toEqual([]);
    } finally {
      server.close();
    }
  });

  test("unknown path 404, wrong method 405, and the connection goes on", async () => {
    const { out } = await talk(
      `GET /printer HTTP/1.1\r\n${auth}\r\nDELETE /shares/x HTTP/1.1\r\n${auth}\r\nPOST /usbip HTTP/1.1\r\n${auth}Content-Length: 3\r\n\r\nabc`,
    );
    expect([...out.matchAll(/HTTP\/1\.1 (\d{3})/g)].map((m) => m[1])).toEqual(["404", "405", "501"]);
  });

  const malformed: [string, string | Uint8Array, number][] = [
    ["garbage", "hello\r\n\r\n", 400],
    ["bare LF lines", `POST /usbip HTTP/1.1\n${auth.trimEnd()}\n\n`, 400],
    ["a header without a colon", `POST /usbip HTTP/1.1\r\n${auth}Broken\r\n\r\n`, 400],
    ["a repeated Authorization", `POST /usbip HTTP/1.1\r\n${auth}${auth}\r\n`, 400],
    ["a relative target", `POST usbip HTTP/1.1\r\n${auth}\r\n`, 400],
    ["HTTP/2.0", `POST /usbip HTTP/2.0\r\n${auth}\r\n`, 505],
    ["an oversized header", `POST /usbip HTTP/1.1\r\n${auth}X-Pad: ${"a".repeat(9000)}\r\n\r\n`, 431],
    ["a never-ending header", `POST /usbip HTTP/1.1\r\n${auth}X-Pad: ${"a".repeat(20000)}`, 431],
    ["too many header lines", `POST /usbip HTTP/1.1\r\n${auth}${"X-A: b\r\n".repeat(70)}\r\n`, 431],
    ["an incomplete request", `POST /usbip HTTP/1.1\r\n${auth}`, 400],
    ["chunked body", `POST /usbip HTTP/1.1\r\n${auth}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n`, 400],
    ["a bad Content-Length", `POST /usbip HTTP/1.1\r\n${auth}Content-Length: -1\r\n\r\n`, 400],
    ["a body too large", `POST /usbip HTTP/1.1\r\n${auth}Content-Length: 99999999\r\n\r\n`, 400],
    ["a short body", `POST /usbip HTTP/1.1\r\n${auth}Content-Length: 10\r\n\r\nabc`, 400],
    ["a NUL in a header", `POST /usbip HTTP/1.1\r\n${auth}X-A: a\x00b\r\n\r\n`, 400],
    [
      "a non-ASCII byte",
      new Uint8Array([...Buffer.from(`POST /usbip HTTP/1.1\r\n${auth}X-A: \xff\r\n\r\n`, "latin1")]),
      400,
    ],
  ];
  for (const [what, req, code] of malformed) {
    test(`${what}: ${code} and close`, async () => {
      // A valid request behind it is not answered.
      const tail = Buffer.from(`POST /usbip HTTP/1.1\r\n${auth}\r\n`);
      const head = typeof req === "string" ? Buffer.from(req, "latin1") : Buffer.from(req);
      const { out } = await talk(
        what === "an incomplete request" || what === "a never-ending header" || what === "a short body"
          ? head
          : Buffer.concat([head, tail]),
      );
      expect(status(out)).toBe(code);
      expect(out.match(/HTTP\/1\.1 /g)).toHaveLength(1);
      expect(out).toContain("Connection: close\r\n");
    });
  }

  test("an empty connection ends quietly", async () => {
    expect((await talk("")).out).toBe("");
  });
});

describe("qvd vma-slave on real pipes", () => {
  test("the default exec hands the rest of the stream to the program and its output back", async () => {
    const input = new PassThrough();
    const chunks: Uint8Array[] = [];
    const fake = join(work, "fake-sshfs");
    writeFileSync(fake, `#!/bin/sh\nprintf '%s|' "$@"\nexec cat\n`, { mode: 0o755 });
    const done = serveSlave(
      input,
      { write: (b) => chunks.push(b), end: () => undefined },
      {
        keyFile,
        sharesDir: shares,
        uid: 1,
        sshfs: fake,
        exec: spawnExec,
      },
    );
    input.write(`PUT /shares/catted HTTP/1.1\r\n${auth}${up}\r\nfirst `);
    await Bun.sleep(50);
    input.end("second");
    await done;
    const out = Buffer.concat(chunks).toString();
    const mp = join(shares, "catted");
    expect(out).toBe(
      `HTTP/1.1 101 Switching Protocols\r\nX-QVD-Share-Ticket: ${mp}\r\n\r\n` +
        `qvd-client:|${mp}|-o|slave|-o|uid=1|first second`,
    );
  });

  test("answers on stdout, and a wrong key closes", async () => {
    const p = Bun.spawn(
      [
        process.execPath,
        join(import.meta.dir, "..", "src", "main.ts"),
        "vma-slave",
        "--key-file",
        keyFile,
        "--shares-dir",
        shares,
      ],
      { stdin: "pipe", stdout: "pipe", stderr: "pipe" },
    );
    p.stdin.write(
      `POST /usbip HTTP/1.1\r\n${auth}\r\nPOST /usbip HTTP/1.1\r\nAuthorization: Basic ${WRONG_SAME}\r\n\r\nPOST /usbip HTTP/1.1\r\n${auth}\r\n`,
    );
    const out = await new Response(p.stdout).text(); // ends when the server closes, stdin still open
    await p.stdin.end();
    expect(await p.exited).toBe(0);
    expect([...out.matchAll(/HTTP\/1\.1 (\d{3})/g)].map((m) => m[1])).toEqual(["501", "401"]);
  });
});
