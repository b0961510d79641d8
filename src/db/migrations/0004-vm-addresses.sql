-- Version 4: a VM's address is never handed out twice while in use.
-- Two desktops that run with the same address would share one IP and MAC on the bridge: the
-- address a node started a desktop with is unique while it is recorded. A database where that
-- already happened is refused with the VMs to stop first (nothing is changed).
DO $$
DECLARE dup record;
BEGIN
  SELECT host(vm_address) AS a, string_agg(vm_id::text, ', ' ORDER BY vm_id) AS ids INTO dup
    FROM vm_runtimes WHERE vm_address IS NOT NULL GROUP BY vm_address HAVING count(*) > 1 LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'VMs % run with the same address %: stop all but one of them, then migrate again', dup.ids, dup.a;
  END IF;
END $$;
CREATE UNIQUE INDEX vm_runtimes_address ON vm_runtimes (vm_address) WHERE vm_address IS NOT NULL;

-- A VM's address cannot change (or be freed for another VM) unless the VM is stopped. The
-- runtime row is locked while this is checked, so a node's start (stopped → starting) waits
-- for the change and then starts with the new address, or the change sees the start.
CREATE FUNCTION vm_ip_guard() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE st text;
BEGIN
  IF NEW.ip IS DISTINCT FROM OLD.ip THEN
    SELECT vm_state INTO st FROM vm_runtimes WHERE vm_id = OLD.id FOR SHARE;
    IF st IS NOT NULL AND st <> 'stopped' THEN
      RAISE EXCEPTION 'vm "%" is %: its address cannot change until it is stopped', OLD.name, st USING ERRCODE = '55000';
    END IF;
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER vms_ip_guard BEFORE UPDATE OF ip ON vms FOR EACH ROW EXECUTE FUNCTION vm_ip_guard();
