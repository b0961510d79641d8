-- Version 7: KVM desktops beside LXC (src/virt/README.md, "Backends").
-- osfs.hypervisor: which backend runs the OSF's desktops; its images are of that kind (lxc: a
--   root filesystem tarball, kvm: a qcow2). Placement only picks nodes that run it.
-- osfs.vcpus: virtual CPUs of a KVM desktop (LXC desktops share the node's CPUs by cpu_shares).
-- host_runtimes.hypervisors: the backends the node runs now (written by its HKD at start-up,
--   after probing them); hypervisor_notes: what the probes found (e.g. KVM's accelerator).
ALTER TABLE osfs ADD COLUMN hypervisor text NOT NULL DEFAULT 'lxc' CHECK (hypervisor IN ('lxc', 'kvm'));
ALTER TABLE osfs ADD COLUMN vcpus integer NOT NULL DEFAULT 1 CHECK (vcpus BETWEEN 1 AND 64);
ALTER TABLE host_runtimes ADD COLUMN hypervisors text[] NOT NULL DEFAULT '{lxc}'
  CHECK (hypervisors <@ ARRAY['lxc', 'kvm']::text[]);
ALTER TABLE host_runtimes ADD COLUMN hypervisor_notes text NOT NULL DEFAULT '';

-- An OSF's images are of its hypervisor's kind, so the hypervisor changes only while it has
-- none. The OSF's row is locked first: an image being added (its foreign key check holds a key
-- share lock) commits before the check, and one added after it waits for the change.
CREATE FUNCTION osf_hypervisor_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM 1 FROM osfs WHERE id = OLD.id FOR UPDATE;
  IF EXISTS (SELECT 1 FROM dis WHERE osf_id = OLD.id) THEN
    RAISE EXCEPTION 'OSF "%" has disk images: the hypervisor decides their kind; delete them or make a new OSF', OLD.name USING ERRCODE = '55000';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER osfs_hypervisor_guard BEFORE UPDATE OF hypervisor ON osfs FOR EACH ROW
  WHEN (OLD.hypervisor IS DISTINCT FROM NEW.hypervisor) EXECUTE FUNCTION osf_hypervisor_guard();

-- New columns go last (CREATE OR REPLACE VIEW keeps the old ones in place).
CREATE OR REPLACE VIEW osf_view AS
  SELECT o.id, o.tenant_id, t.name AS tenant_name, o.name, o.description, o.memory_mb, o.cpu_shares, o.use_overlay,
         o.persistent, o.user_storage_mb, o.created_at, o.updated_at,
         (SELECT count(*) FROM vms v WHERE v.osf_id = o.id)::integer AS vms,
         (SELECT count(*) FROM dis d WHERE d.osf_id = o.id)::integer AS dis,
         o.hypervisor, o.vcpus
    FROM osfs o JOIN tenants t ON t.id = o.tenant_id;

CREATE OR REPLACE VIEW host_view AS
  SELECT h.id, h.name, h.address, h.description, h.frontend, h.backend, h.created_at, h.updated_at,
         r.state, r.state_ts, r.blocked, r.cmd, r.ok_ts, r.usable_ram_mb, r.usable_cpu, r.version,
         (SELECT count(*) FROM vm_runtimes vr WHERE vr.host_id = h.id AND vr.vm_state <> 'stopped')::integer AS vms_running,
         r.drain, r.lost_ts, r.lost_reason, r.hypervisors, r.hypervisor_notes
    FROM hosts h JOIN host_runtimes r ON r.host_id = h.id;
