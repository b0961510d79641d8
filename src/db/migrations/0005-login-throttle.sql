-- Version 5: failed-login throttling (src/auth/throttle.ts). One row per key: a service's
-- account, a client address, or an address an account logged in from. A try takes its slot
-- under the row lock before the password is checked, so parallel tries on any number of API
-- or L7R processes are counted; tries refused without a check change nothing.
CREATE TABLE login_throttle (
  key           text PRIMARY KEY,
  failures      integer NOT NULL DEFAULT 0 CHECK (failures >= 0),
  failed_at     timestamptz,
  pending       integer NOT NULL DEFAULT 0 CHECK (pending >= 0),
  pending_until timestamptz,
  updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX login_throttle_updated ON login_throttle (updated_at);
