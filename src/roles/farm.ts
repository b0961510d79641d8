// `qvd farm ca | cert`: the farm's certificates (src/farm/certs.ts). The CA stays with the
// administrator; each node gets node.crt and node.key, named in cluster.tls.cert/key with the
// CA's certificate in cluster.tls.ca.
import { resolve } from "node:path";
import { defineCommand } from "citty";
import { UserError } from "../errors.ts";
import { CA_DAYS, createFarmCa, issueNodeCert, NODE_DAYS } from "../farm/certs.ts";

const days = (v: string | undefined, def: number) => {
  if (v === undefined) return def;
  if (!/^\d{1,5}$/.test(v) || Number(v) < 1) throw new UserError(`--days ${v}: expected a number of days`);
  return Number(v);
};

const ca = defineCommand({
  meta: { name: "ca", description: "Create the farm CA (DIR/ca.crt, DIR/ca.key mode 0600); never overwrites one" },
  args: {
    dir: { type: "string", description: "Folder of the CA", required: true, valueHint: "DIR" },
    days: { type: "string", description: `Validity in days (default ${CA_DAYS})`, valueHint: "N" },
  },
  async run({ args }) {
    const r = await createFarmCa(resolve(args.dir), { days: days(args.days, CA_DAYS) });
    console.log(`Farm CA: ${r.cert} (key ${r.key}, keep it off the nodes)`);
  },
});

const cert = defineCommand({
  meta: { name: "cert", description: "Issue a node's certificate (OUT/node.crt, OUT/node.key), signed by the farm CA" },
  args: {
    "ca-dir": {
      type: "string",
      description: "Folder of the farm CA (ca.crt, ca.key)",
      required: true,
      valueHint: "DIR",
    },
    name: {
      type: "string",
      description: "The node's name (its nodename, hosts.name): the certificate's CN",
      required: true,
    },
    address: {
      type: "string",
      description: "The address other nodes reach it on (hosts.address): IP or DNS name",
      required: true,
      valueHint: "ADDR",
    },
    out: { type: "string", description: "Folder for node.crt and node.key", required: true, valueHint: "DIR" },
    days: { type: "string", description: `Validity in days (default ${NODE_DAYS})`, valueHint: "N" },
    force: { type: "boolean", description: "Replace node.crt and node.key (renewal)" },
  },
  async run({ args }) {
    const caDir = resolve(args["ca-dir"]);
    const r = await issueNodeCert({
      caDir,
      name: args.name,
      address: args.address,
      outDir: resolve(args.out),
      days: days(args.days, NODE_DAYS),
      force: Boolean(args.force),
    });
    console.log(`Node certificate for ${args.name} (${args.address}): ${r.cert}, key ${r.key}`);
    console.log(
      `On the node: cluster.tls.ca = ${caDir}/ca.crt (the certificate only), cluster.tls.cert = ${r.cert}, cluster.tls.key = ${r.key}`,
    );
  },
});

export default defineCommand({
  meta: { name: "farm", description: "The farm's certificates: a CA and one certificate per node (node-to-node TLS)" },
  subCommands: { ca, cert },
});
