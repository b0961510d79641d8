// Run as a script (inside a test's network namespace): opens WebSockets to an L7R's
// /qvd/web/connect, sends what each case says, and prints one JSON line per case: the text
// frames it got and the close code. For the abuse cases of test/browser-desktop.test.ts.
//   bun ws-probe.ts URL ORIGIN CASES_JSON   (CASES_JSON: [{name, send: [string | {binary: n}]}])
export {};
const [url, origin, casesJson] = process.argv.slice(2);
interface Case {
  name: string;
  send: (string | { binary: number })[];
}
for (const c of JSON.parse(casesJson!) as Case[]) {
  const frames: string[] = [];
  const result = await new Promise<{ code: number; reason: string }>((resolve) => {
    const ws = new WebSocket(url!, { headers: { Origin: origin! }, tls: { rejectUnauthorized: false } } as any);
    const timer = setTimeout(() => resolve({ code: -1, reason: "no close in 20 s" }), 20_000);
    ws.onopen = () => {
      for (const m of c.send) ws.send(typeof m === "string" ? m : new Uint8Array(m.binary));
    };
    ws.onmessage = (e) => frames.push(typeof e.data === "string" ? e.data : `<binary ${(e.data as ArrayBuffer).byteLength}>`);
    ws.onclose = (e) => {
      clearTimeout(timer);
      resolve({ code: e.code, reason: e.reason });
    };
  });
  console.log(JSON.stringify({ name: c.name, ...result, frames }));
}
process.exit(0);
