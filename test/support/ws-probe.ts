// Run as a script (inside a test's network namespace): opens WebSockets to an L7R's
// /qvd/web/connect, sends what each case says, and prints one JSON line per case: the text
// frames it got and the close code. For the abuse cases of test/browser-desktop.test.ts.
//   bun ws-probe.ts URL ORIGIN CASES_JSON   (CASES_JSON: [{name, send: [string | {binary: n}], untilBinary?}])
// With untilBinary the probe closes (1000) at the first binary frame, recorded as
// `<binary N> <its first bytes as text>`: the screen's RFB greeting after a `ready`.
export {};
const [url, origin, casesJson] = process.argv.slice(2);
interface Case {
  name: string;
  send: (string | { binary: number })[];
  untilBinary?: boolean;
}
for (const c of JSON.parse(casesJson!) as Case[]) {
  const frames: string[] = [];
  const result = await new Promise<{ code: number; reason: string }>((resolve) => {
    const ws = new WebSocket(url!, { headers: { Origin: origin! }, tls: { rejectUnauthorized: false } } as any);
    const timer = setTimeout(() => resolve({ code: -1, reason: "no close in 300 s" }), 300_000);
    ws.onopen = () => {
      for (const m of c.send) ws.send(typeof m === "string" ? m : new Uint8Array(m.binary));
    };
    ws.binaryType = "arraybuffer";
    ws.onmessage = (e) => {
      if (typeof e.data === "string") return void frames.push(e.data);
      const b = new Uint8Array(e.data as ArrayBuffer);
      frames.push(`<binary ${b.byteLength}> ${new TextDecoder().decode(b.subarray(0, 12))}`);
      if (c.untilBinary) ws.close(1000);
    };
    ws.onclose = (e) => {
      clearTimeout(timer);
      resolve({ code: e.code, reason: e.reason });
    };
  });
  console.log(JSON.stringify({ name: c.name, ...result, frames }));
}
process.exit(0);
