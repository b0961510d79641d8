// A stranger's NX connection, run inside a network namespace (`nsenter … bun
// test/support/nx-raw.ts HOST PORT GREETING WAIT_MS`): connects, sends GREETING (may be empty),
// and prints as JSON whether the connection opened, what came back within WAIT_MS, whether the
// other side closed it, and why it did not open (`ECONNREFUSED`: an answer; `timeout`: none).
import { poll } from "./wait.ts";

const [host, port, greeting, waitMs] = process.argv.slice(2);
let reply = "";
let closed = false;
let connected = false;
let error = "";
const conn = Bun.connect({
  hostname: host!,
  port: Number(port),
  socket: {
    open() {
      connected = true;
    },
    data(_s, d) {
      reply += Buffer.from(d).toString("latin1");
    },
    close() {
      closed = true;
    },
    end(sock) {
      sock.end();
    },
  },
}).catch((err: { code?: string }) => {
  error = err?.code ?? String(err);
  return undefined;
});
// A dropped SYN is never answered: give up after WAIT_MS.
const s = await Promise.race([conn, Bun.sleep(Number(waitMs)).then(() => void (error ||= "timeout"))]);
if (s) {
  if (greeting) s.write(greeting);
  await poll(() => closed || reply.includes(" cachelist="), Number(waitMs), 50);
  s.end();
}
console.log(JSON.stringify({ connected, reply, closed, ...(connected ? {} : { error }) }));
process.exit(0);
