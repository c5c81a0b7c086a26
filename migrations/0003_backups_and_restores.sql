-- Backups the control plane scheduled or an operator asked for: one row per backup operation
-- (the operation row, kind 'backup', holds progress and attempts), filled in when it ends.
CREATE TABLE backups (
    operation_id   TEXT PRIMARY KEY,
    cluster_id     TEXT NOT NULL REFERENCES clusters (id),
    -- 'full' or 'incr' as requested; `kind_taken` is what the agent took (an incremental
    -- backup without a prior one is taken as a full one).
    kind           TEXT NOT NULL,
    kind_taken     TEXT NOT NULL DEFAULT '',
    -- 'schedule' or the operator who asked.
    requested_by   TEXT NOT NULL,
    retention_days INTEGER NOT NULL,
    -- 'running', 'succeeded' or 'failed'.
    state          TEXT NOT NULL,
    -- Member the backup was taken from, and whether it was a standby.
    host_id        TEXT NOT NULL DEFAULT '',
    from_standby   INTEGER NOT NULL DEFAULT 0,
    label          TEXT NOT NULL DEFAULT '',
    size_bytes     INTEGER NOT NULL DEFAULT 0,
    stored_bytes   INTEGER NOT NULL DEFAULT 0,
    stop_lsn       TEXT NOT NULL DEFAULT '',
    error          TEXT NOT NULL DEFAULT '',
    created_at     TEXT NOT NULL,
    finished_at    TEXT NOT NULL DEFAULT ''
);
CREATE INDEX backups_cluster ON backups (cluster_id, created_at);

-- Databases created as a point-in-time copy of another one (POST /v1/databases/{id}/restore):
-- where their data comes from. The `restore` operation fills them from the source cluster's
-- backups and WAL.
CREATE TABLE restores (
    database_id        TEXT PRIMARY KEY REFERENCES databases (id),
    source_database_id TEXT NOT NULL REFERENCES databases (id),
    source_cluster_id  TEXT NOT NULL,
    source_pg_name     TEXT NOT NULL,
    -- RFC 3339; '' for the latest archived WAL.
    target_time        TEXT NOT NULL,
    created_at         TEXT NOT NULL
);
