-- Version 3: an ended administrator session (logout, ended by an administrator, deleted when
-- expired and cleaned up) is announced on qvd_sessions with its public id, so that every API process ends
-- that session's event streams at once instead of at their next keep-alive.
CREATE FUNCTION notify_session_end() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('qvd_sessions', left(OLD.token_hash, 12));
  RETURN NULL;
END $$;
CREATE TRIGGER admin_sessions_end AFTER DELETE ON admin_sessions FOR EACH ROW EXECUTE FUNCTION notify_session_end();
