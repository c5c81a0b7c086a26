-- API tokens with scopes, join tokens for new hosts and nodes, and host revocation.

-- Every API token except the admin token (which lives in a file on each node). Only the
-- SHA-256 of a token is stored; the token itself is shown once, when it is created.
CREATE TABLE tokens (
    id         TEXT PRIMARY KEY,
    hash       TEXT NOT NULL UNIQUE,
    -- 'admin', 'operator' or 'team'.
    scope      TEXT NOT NULL,
    -- The team a 'team' token acts for.
    team       TEXT,
    -- A label saying what the token is for.
    name       TEXT NOT NULL,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);

-- Teams' first tokens, created with the team before this table existed.
INSERT INTO tokens (id, hash, scope, team, name, created_at)
    SELECT 'team-' || name, token_hash, 'team', name, 'created with the team', created_at FROM teams;

-- One-time tokens with which an agent or a control-plane node gets its first certificate.
CREATE TABLE join_tokens (
    hash       TEXT PRIMARY KEY,
    -- 'agent' or 'controlplane'.
    role       TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    created_at TEXT NOT NULL,
    used_at    TEXT,
    used_by    TEXT
);

-- A revoked host's certificate is refused and the host may not register or heartbeat again.
ALTER TABLE hosts ADD COLUMN revoked_at TEXT;
