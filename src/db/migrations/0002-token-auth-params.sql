-- Version 2: a bearer token keeps what the authentication plugin said at the login that made
-- it (LDAP uid/gid/home, session parameters), so a bearer login starts the same identity.
ALTER TABLE user_tokens ADD COLUMN IF NOT EXISTS auth_params jsonb;
