// `qvd vma-slave`: the VMA's slave server for one slave connection, on stdin/stdout (nxagent
// runs one per connection). The protocol is in src/vma/slave.ts and src/vma/README.md.
import { homedir } from "node:os";
import { join } from "node:path";
import { defineCommand } from "citty";
import { serveSlave } from "../vma/slave.ts";

export default defineCommand({
  meta: { name: "vma-slave", description: "Serve one slave-channel connection on stdin/stdout (run by nxagent)" },
  args: {
    "key-file": { type: "string", description: "File holding the session's slave key", default: "/run/qvd/slave.conf" },
    "shares-dir": { type: "string", description: "Directory where shares are mounted (default ~/Redirected)" },
    sshfs: { type: "string", description: "sshfs program", default: "sshfs" },
    "sftp-server": { type: "string", description: "sftp-server program", default: "/usr/lib/openssh/sftp-server" },
    "xdg-open": { type: "string", description: "xdg-open program", default: "xdg-open" },
    display: { type: "string", description: "DISPLAY for opened files", default: ":100" },
    socket: { type: "string", description: "The VMA's mount socket (shared folders are mounted by the VMA)" },
    // citty reads --no-shares / --no-usb as these set to false.
    shares: { type: "boolean", default: true, description: "Shared folders and open-file (--no-shares: 403)" },
    usb: { type: "boolean", default: true, description: "USB/IP (--no-usb: 403)" },
    "usb-unavailable": { type: "boolean", description: "This desktop cannot attach USB devices (an LXC desktop): 501" },
  },
  async run({ args }) {
    const env: Record<string, string> = {};
    for (const [k, v] of Object.entries(process.env)) if (v !== undefined) env[k] = v;
    await serveSlave(
      process.stdin as AsyncIterable<Uint8Array>,
      {
        write: (b) => process.stdout.write(b),
        end: () => undefined,
      },
      {
        keyFile: args["key-file"],
        sharesDir: args["shares-dir"] ?? join(homedir(), "Redirected"),
        uid: process.getuid?.() ?? 0,
        sshfs: args.sshfs,
        sftpServer: args["sftp-server"],
        xdgOpen: args["xdg-open"],
        display: args.display,
        socket: args.socket,
        noShares: args.shares === false,
        noUsb: args.usb === false,
        usbUnavailable: !!args["usb-unavailable"],
        env,
      },
    );
  },
});
