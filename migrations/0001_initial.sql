-- Replicated control-plane state. Every row here is written only by applying Raft log entries
-- (controlplane/src/state/apply.rs), in the same transaction that advances `raft_applied`.

-- Raft bookkeeping of the state machine: last applied log id and last membership (JSON).
CREATE TABLE raft_applied (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE teams (
    name       TEXT PRIMARY KEY,
    contact    TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);

CREATE TABLE hosts (
    id                  TEXT PRIMARY KEY,
    hostname            TEXT NOT NULL,
    agent_addr          TEXT NOT NULL,
    zone                TEXT NOT NULL,
    cores               INTEGER NOT NULL,
    memory_bytes        INTEGER NOT NULL,
    memory_budget_bytes INTEGER NOT NULL,
    disk_free_bytes     INTEGER NOT NULL,
    disk_total_bytes    INTEGER NOT NULL,
    data_path           TEXT NOT NULL,
    agent_version       TEXT NOT NULL,
    pg_major            INTEGER NOT NULL,
    pg_host             TEXT NOT NULL,
    pg_port             INTEGER NOT NULL,
    state               TEXT NOT NULL,
    registered_at       TEXT NOT NULL,
    state_changed_at    TEXT NOT NULL
);

CREATE TABLE clusters (
    id           TEXT PRIMARY KEY,
    pg_major     INTEGER NOT NULL,
    primary_host TEXT NOT NULL REFERENCES hosts (id),
    port         INTEGER NOT NULL,
    epoch        INTEGER NOT NULL,
    state        TEXT NOT NULL,
    created_at   TEXT NOT NULL
);

CREATE TABLE databases (
    id                    TEXT PRIMARY KEY,
    name                  TEXT NOT NULL,
    owner                 TEXT NOT NULL REFERENCES teams (name),
    purpose               TEXT NOT NULL,
    plan                  TEXT NOT NULL,
    availability          TEXT NOT NULL,
    backup_retention_days INTEGER NOT NULL,
    state                 TEXT NOT NULL,
    cluster_id            TEXT NOT NULL REFERENCES clusters (id),
    pg_name               TEXT NOT NULL,
    role_name             TEXT NOT NULL,
    password              TEXT NOT NULL,
    created_at            TEXT NOT NULL,
    updated_at            TEXT NOT NULL
);
-- A name is unique per owner among databases that still exist.
CREATE UNIQUE INDEX databases_owner_name ON databases (owner, name) WHERE state <> 'deleted';
-- A PostgreSQL database name is unique within its cluster.
CREATE UNIQUE INDEX databases_cluster_pg_name ON databases (cluster_id, pg_name) WHERE state <> 'deleted';

-- Lifecycle history of each database.
CREATE TABLE database_events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    database_id TEXT NOT NULL REFERENCES databases (id),
    at          TEXT NOT NULL,
    state       TEXT NOT NULL,
    note        TEXT NOT NULL
);

CREATE TABLE operations (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    database_id TEXT NOT NULL,
    state       TEXT NOT NULL,
    step        TEXT NOT NULL,
    attempts    INTEGER NOT NULL,
    error       TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE INDEX operations_state ON operations (state);

CREATE TABLE idempotency_keys (
    team        TEXT NOT NULL,
    key         TEXT NOT NULL,
    database_id TEXT NOT NULL,
    PRIMARY KEY (team, key)
);

CREATE TABLE audit (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    at      TEXT NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    target  TEXT NOT NULL,
    outcome TEXT NOT NULL
);
