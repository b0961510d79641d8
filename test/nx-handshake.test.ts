// The NX greeting rewriter (src/nx/handshake.ts): the client's NX proxy greeting gets the
// session's cookie before nxagent sees it; anything else is refused, within fixed bounds. Then
// spliceNx between real sockets: the greeting rewritten, the rest spliced both ways, a refused
// greeting closing both sides with nothing passed on.
import { afterEach, describe, expect, test } from "bun:test";
import type { Socket, TCPSocketListener } from "bun";
import { newNxCookie, NX_COOKIE, NX_TOKEN_MAX, NxGreeting, NxHandshakeError, spliceNx } from "../src/nx/handshake.ts";
import { ioHandlers, type IoData, type SpliceResult } from "../src/nx/splice.ts";
import { fuzzSeed, seededRng } from "./support/fuzz.ts";
import { until, within } from "./support/wait.ts";

const COOKIE = "0123456789abcdef0123456789abcdef";
const enc = (s: string) => Buffer.from(s, "latin1");
const dec = (b: Uint8Array) => Buffer.from(b).toString("latin1");
/** What `nxproxy -S` sends (captured from nxproxy 3.5.99.26, with and without its own cookie). */
const PLAIN = "NXPROXY-3.5.0-3.5.99 stream=default,data=default ";

function feed(g: NxGreeting, s: string | Uint8Array, chunk = Infinity) {
  const b = typeof s === "string" ? enc(s) : s;
  for (let i = 0; i < b.length; i += chunk === Infinity ? b.length : chunk) {
    const r = g.push(b.subarray(i, Math.min(b.length, i + (chunk === Infinity ? b.length : chunk))));
    if (r)
      return {
        head: dec(r.head),
        rest: dec(r.rest) + dec(b.subarray(Math.min(b.length, i + (chunk === Infinity ? b.length : chunk)))),
      };
  }
  return undefined;
}
const refused = (s: string | Uint8Array, re: RegExp) => expect(() => feed(new NxGreeting(COOKIE), s)).toThrow(re);

describe("NxGreeting", () => {
  test("a new cookie is 128 random bits in hex, different each time", () => {
    const a = newNxCookie();
    expect(a).toMatch(NX_COOKIE);
    expect(newNxCookie()).not.toBe(a);
  });

  test("nxproxy's greeting without a cookie gets the session's, first", () => {
    expect(feed(new NxGreeting(COOKIE), PLAIN)).toEqual({
      head: `NXPROXY-3.5.0-3.5.99 cookie=${COOKIE},stream=default,data=default `,
      rest: "",
    });
  });

  test("a cookie of the client's own (any case, anywhere, several) is replaced, not kept", () => {
    const evil = "ffffffffffffffffffffffffffffffff";
    for (const opts of [
      `cookie=${evil},stream=default,data=default`,
      `stream=default,COOKIE=${evil},data=default`,
      `Cookie=${COOKIE}x,stream=default,cookie=${evil},data=default`,
    ]) {
      const r = feed(new NxGreeting(COOKIE), `NXPROXY-3.5.0-3.5.99 ${opts} `)!;
      expect(r.head).toBe(`NXPROXY-3.5.0-3.5.99 cookie=${COOKIE},stream=default,data=default `);
      expect(r.head.toLowerCase().split("cookie=")).toHaveLength(2);
    }
  });

  test("split into any chunks (down to single bytes) gives the same; bytes after the greeting are the rest, untouched", () => {
    const after = "\u0000\u00ff binary NX data";
    const whole = feed(new NxGreeting(COOKIE), PLAIN + after)!;
    expect(whole.rest).toBe(after);
    for (const n of [1, 2, 3, 7, 21, 22, 23, 50]) expect(feed(new NxGreeting(COOKIE), PLAIN + after, n)).toEqual(whole);
  });

  test("older and shorter versions pass; empty options get the cookie alone", () => {
    expect(feed(new NxGreeting(COOKIE), "NXPROXY-1.2.2-3.5.0 link=lan ")!.head).toBe(
      `NXPROXY-1.2.2-3.5.0 cookie=${COOKIE},link=lan `,
    );
    expect(feed(new NxGreeting(COOKIE), "NXPROXY-3  ")!.head).toBe(`NXPROXY-3 cookie=${COOKIE} `);
  });

  test("something that is not an NX proxy is refused at its first byte", () => {
    expect(() => new NxGreeting(COOKIE).push(enc("G"))).toThrow(NxHandshakeError);
    expect(() => new NxGreeting(COOKIE).push(enc("NXSSH-"))).toThrow(/not an NX proxy/);
    refused("GET / HTTP/1.1\r\n\r\n", /not an NX proxy/);
    refused("NXPROXY-x.y stream=1 ", /not an NX proxy version/);
    refused("NXPROXY- stream=1 ", /not an NX proxy version/);
  });

  test("unprintable bytes are refused (nxcomp would turn them into spaces inside a token)", () => {
    for (const bad of [
      "NXPROXY-3.5.0\tcookie=x ",
      "NXPROXY-3.5.0 cookie=a\u0000b ",
      "NXPROXY-3.5.0 link=l\u00e9n ",
      "NXPROXY-3.5.0 link=lan\r\n",
    ])
      refused(bad, /unprintable byte/);
  });

  test("malformed options are refused", () => {
    for (const o of [
      "link",
      "link=",
      "=lan",
      "link=lan=wan",
      "link=lan,,data=1",
      "link=lan,",
      ",link=lan",
      "li-nk=lan",
      `x=${"v".repeat(256)}`,
    ])
      refused(`NXPROXY-3.5.0 ${o} `, /malformed NX options/);
  });

  test("bounded: a version over 64 bytes, or options over nxcomp's 511, are refused without holding more", () => {
    refused(`NXPROXY-3${"1".repeat(60)}`, /version is too long/);
    const g = new NxGreeting(COOKIE);
    g.push(enc("NXPROXY-3.5.0 "));
    expect(() => {
      for (let i = 0; i < 10_000; i++) g.push(enc("a"));
    }).toThrow(/options are too long/);
    // Options nxcomp would take pass only if they still fit with the cookie (40 more characters).
    const opts = (len: number) => {
      const parts: string[] = [];
      for (let n = 0; n < len; ) {
        const v = Math.min(200, len - n - (parts.length ? 1 : 0) - 3);
        parts.push(`ab=${"1".repeat(v)}`);
        n += (parts.length > 1 ? 1 : 0) + 3 + v;
      }
      return parts.join(",");
    };
    expect(opts(470)).toHaveLength(470);
    expect(feed(new NxGreeting(COOKIE), `NXPROXY-3.5.0 ${opts(470)} `)!.head.split(" ")[1]!.length + 1).toBe(
      NX_TOKEN_MAX,
    );
    refused(`NXPROXY-3.5.0 ${opts(471)} `, /options are too long/);
  });

  test("fuzz: 20,000 mutated greetings; only NxHandshakeError, and every accepted one carries exactly our cookie, first, within bounds", () => {
    const rnd = seededRng(fuzzSeed("nx-handshake", 0x5eed6)).int;
    const bases = [
      PLAIN,
      `NXPROXY-3.5.0-3.5.99 cookie=${"f".repeat(32)},stream=default,data=default `,
      "NXPROXY-3.5.0 link=lan,pack=adaptive-9,cache=8M ",
    ];
    const alphabet = " ,=cookieNXPROXY-0123456789.\t\u0000\u00ffabcxyz";
    let accepted = 0;
    for (let i = 0; i < 20_000; i++) {
      const b = [...bases[rnd(bases.length)]!];
      for (let m = rnd(6); m >= 0; m--) {
        const at = rnd(b.length + 1);
        const op = rnd(3);
        const ch = rnd(10) === 0 ? "cookie=".repeat(1 + rnd(3)) : alphabet[rnd(alphabet.length)]!;
        if (op === 0) b.splice(at, 0, ch);
        else if (op === 1) b.splice(at, 1);
        else b.splice(at, 1, ch);
      }
      const s = b.join("");
      let r;
      try {
        r = feed(new NxGreeting(COOKIE), s, 1 + rnd(40));
      } catch (err) {
        expect(err).toBeInstanceOf(NxHandshakeError);
        continue;
      }
      if (!r) continue;
      accepted++;
      // Parsed as nxcomp does: two space-ended tokens, options split on `,` then `=`.
      const [version, options] = r.head.split(" ");
      expect(r.head).toMatch(/^[!-~]+ [!-~]+ $/);
      expect(version).toMatch(/^NXPROXY-/);
      expect(options!.length + 1).toBeLessThanOrEqual(NX_TOKEN_MAX);
      const cookies = options!.split(",").filter((e) => e.split("=")[0]!.toLowerCase() === "cookie");
      expect(cookies).toEqual([`cookie=${COOKIE}`]);
      expect(options!.startsWith(`cookie=${COOKIE}`)).toBe(true);
    }
    expect(accepted).toBeGreaterThan(100);
  });
});

// spliceNx between real sockets: client C ⇄ [front | spliceNx | back] ⇄ agent A.
const listeners: TCPSocketListener<any>[] = [];
afterEach(() => {
  for (const l of listeners.splice(0)) l.stop(true);
});

function peer() {
  const got: Uint8Array[] = [];
  let sock: Socket<any> | undefined;
  let closeR!: () => void;
  const closed = new Promise<void>((r) => (closeR = r));
  return {
    got,
    closed,
    text: () => dec(Buffer.concat(got)),
    socket: () => sock!,
    handlers: {
      open(s: Socket<any>) {
        sock = s;
      },
      data(_s: Socket<any>, d: Uint8Array) {
        got.push(new Uint8Array(d));
      },
      close() {
        closeR();
      },
      end(s: Socket<any>) {
        s.end();
      },
    },
  };
}

/** How long any one step of a spliceNx test may take (their timeout is 20 s): a broken splice fails a wait, not the test's timeout. */
const STEP_MS = 10_000;
const TEST_MS = 20_000;

async function setup(opts: { toA?: string; timeoutMs?: number } = {}) {
  const agent = peer();
  const back = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: agent.handlers } as any);
  listeners.push(back as any);
  let result!: Promise<SpliceResult>;
  const refusedWith: string[] = [];
  const front = Bun.listen<IoData>({
    hostname: "127.0.0.1",
    port: 0,
    socket: {
      ...ioHandlers,
      open(s: Socket<IoData>) {
        s.data = {};
        void Bun.connect<IoData>({ hostname: "127.0.0.1", port: back.port, data: {}, socket: ioHandlers } as any).then(
          (b) => {
            result = spliceNx(s, b as any, {
              cookie: COOKIE,
              timeoutMs: opts.timeoutMs ?? 5000,
              initial: opts.toA ? { toA: enc(opts.toA) } : undefined,
              onRefused: (r) => refusedWith.push(r),
            });
          },
        );
      },
    },
  } as any);
  listeners.push(front as any);
  const client = peer();
  await Bun.connect({ hostname: "127.0.0.1", port: front.port, socket: client.handlers } as any);
  await until(() => result !== undefined && agent.socket() !== undefined, "the splice", STEP_MS);
  return { client, agent, result: () => within(result, STEP_MS, "end of the splice"), refusedWith };
}

describe("spliceNx", () => {
  test(
    "the greeting reaches the agent with the cookie; the bytes after it and the answers flow both ways",
    async () => {
      const { client, agent, result } = await setup({ toA: "HTTP/1.1 101 Switching Protocols\r\n\r\n" });
      await until(() => client.text().includes("101"), "the 101", STEP_MS);
      client.socket().write(enc("NXPROXY-3.5.0-3.5.99 "));
      // A check that nothing arrives: half a greeting is not passed on (30 ms to show itself).
      await Bun.sleep(30);
      expect(agent.got).toEqual([]);
      client.socket().write(enc("stream=default,data=default "));
      await until(() => agent.text().length > 0, "the greeting at the agent", STEP_MS);
      expect(agent.text()).toBe(`NXPROXY-3.5.0-3.5.99 cookie=${COOKIE},stream=default,data=default `);
      agent.socket().write(enc("NXPROXY-3.5.0-3.5.99 link=LAN cachelist=none "));
      await until(() => client.text().includes("cachelist"), "the agent's answer", STEP_MS);
      const bin = new Uint8Array(70_000).map((_, i) => i * 7);
      client.socket().write(bin);
      await until(() => agent.got.reduce((n, c) => n + c.length, 0) >= 70_000 + 80, "the client's data", STEP_MS);
      expect(Buffer.concat(agent.got).subarray(-70_000).equals(Buffer.from(bin))).toBe(true);
      client.socket().end();
      const r = await result();
      expect(r.aToB).toBeGreaterThan(70_000);
      await within(agent.closed, STEP_MS, "close at the agent");
    },
    TEST_MS,
  );

  test(
    "a greeting that is not NX closes both sides; nothing of it reaches the agent",
    async () => {
      const { client, agent, result, refusedWith } = await setup();
      client.socket().write(enc("NXPROXY-3.5.0 cookie=\u0000 "));
      expect(await result()).toEqual({ aToB: 0, bToA: 0 });
      await within(Promise.all([client.closed, agent.closed]), STEP_MS, "close at both sides");
      expect(agent.got).toEqual([]);
      expect(refusedWith[0]).toMatch(/unprintable/);
    },
    TEST_MS,
  );

  test(
    "a client that never greets is closed after the timeout",
    async () => {
      const { client, agent, result, refusedWith } = await setup({ timeoutMs: 200 });
      client.socket().write(enc("NXPROXY-3.5"));
      expect(await result()).toEqual({ aToB: 0, bToA: 0 });
      await within(Promise.all([client.closed, agent.closed]), STEP_MS, "close at both sides");
      expect(agent.got).toEqual([]);
      expect(refusedWith).toEqual(["the client sent no NX handshake in time"]);
    },
    TEST_MS,
  );

  test(
    "the agent closing before the greeting closes the client",
    async () => {
      const { client, agent, result } = await setup();
      agent.socket().end();
      expect(await result()).toEqual({ aToB: 0, bToA: 0 });
      await within(client.closed, STEP_MS, "close at the client");
    },
    TEST_MS,
  );
});
