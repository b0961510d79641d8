// Run inside a node's network namespace (`nsenter … bun test/support/l7r-probe.ts PORT LOGIN
// PASSWORD VM_ID`): list_of_vm as the Perl client sends it, then connect_to_vm as the Qt
// client sends it (bare LF); prints what came back as JSON, with the first bytes after a 101.
import { basic, WireClient } from "./qvd-wire.ts";
import { poll } from "./wait.ts";

const [port, login, password, vmId, mode] = process.argv.slice(2);
const auth = basic(login!, password!);
const c = await WireClient.connect(Number(port));
c.send(
  `GET /qvd/list_of_vm? HTTP/1.1\r\nAuthorization: ${auth}\r\nAccept: application/json\r\nUser-Agent: QVD::HTTPC/0.01 (linux)\r\n\r\n`,
);
const list = await c.response();
if (mode === "stop") {
  // "Restart session": stop_vm as the Qt client sends it (with the Upgrade headers it adds).
  c.send(`GET /qvd/stop_vm?id=${vmId} HTTP/1.1\nAuthorization: ${auth}\nConnection: Upgrade\nUpgrade: QVD/1.0\n\n`);
  const { progress, res } = await c.final(300_000);
  console.log(JSON.stringify({ progress, final: { status: res.status, body: res.body } }));
  c.end();
  process.exit(0);
}
const { progress, res, nx } = await c.connectToVm(Number(vmId), auth);
const out = {
  list: { status: list.status, body: list.body },
  progress,
  final: { status: res.status, reason: res.reason, lines: res.lines, body: res.body },
  nx,
  closedByServer: false,
};
console.log(JSON.stringify(out));
if (mode === "hold" && res.status === 101) {
  // Keep the session until the server closes it (a later connection takes the VM over).
  await poll(() => c.closed, 120_000);
  out.closedByServer = c.closed;
  console.log(JSON.stringify(out));
}
c.end();
process.exit(0);
