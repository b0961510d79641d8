-- Version 6: a farm of nodes (README: "Running a farm").
-- host_runtimes.drain: an administrator drains a node: no new placements on it; its users move
--   at their next connect.
-- host_runtimes.lost_ts / lost_reason: when and why the node was declared lost (by the cluster
--   monitor of another node, or by an administrator).
-- vm_runtimes.vm_cmd_ts: when the pending command was given (queued starts go in this order).
-- vm_runtimes.home_key: the home a placed or running desktop uses (tenant/user); unique, so one
--   home is never in use by two desktops at once, on any node.
ALTER TABLE host_runtimes ADD COLUMN drain boolean NOT NULL DEFAULT false;
ALTER TABLE host_runtimes ADD COLUMN lost_ts timestamptz;
ALTER TABLE host_runtimes ADD COLUMN lost_reason text NOT NULL DEFAULT '';
ALTER TABLE vm_runtimes ADD COLUMN vm_cmd_ts timestamptz;
ALTER TABLE vm_runtimes ADD COLUMN home_key text;
CREATE UNIQUE INDEX vm_runtimes_home ON vm_runtimes (home_key) WHERE home_key IS NOT NULL;
-- Placement finds the desktops a node took on since its heartbeat (src/db/placement.ts) by
-- their last state change, without reading every VM of the farm.
CREATE INDEX vm_runtimes_state_ts ON vm_runtimes (vm_state_ts);

-- The WAT and the CLI show a node's drain and lost marks (new columns go last: CREATE OR REPLACE).
CREATE OR REPLACE VIEW host_view AS
  SELECT h.id, h.name, h.address, h.description, h.frontend, h.backend, h.created_at, h.updated_at,
         r.state, r.state_ts, r.blocked, r.cmd, r.ok_ts, r.usable_ram_mb, r.usable_cpu, r.version,
         (SELECT count(*) FROM vm_runtimes vr WHERE vr.host_id = h.id AND vr.vm_state <> 'stopped')::integer AS vms_running,
         r.drain, r.lost_ts, r.lost_reason
    FROM hosts h JOIN host_runtimes r ON r.host_id = h.id;
