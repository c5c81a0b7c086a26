-- Database moves between clusters (logical replication, then a switch of placement), and host
-- drains that move every database off a host.

-- One row per move operation (the operation row, kind 'move', holds progress and attempts).
CREATE TABLE moves (
    operation_id      TEXT PRIMARY KEY,
    database_id       TEXT NOT NULL REFERENCES databases (id),
    source_cluster_id TEXT NOT NULL,
    source_pg_name    TEXT NOT NULL,
    source_role       TEXT NOT NULL,
    target_cluster_id TEXT NOT NULL,
    target_pg_name    TEXT NOT NULL,
    target_role       TEXT NOT NULL,
    -- Password of the move's replication role on the source (the target's subscription uses it);
    -- the role is dropped when the move ends.
    move_password     TEXT NOT NULL,
    -- 'operator', 'drain' or who asked.
    requested_by      TEXT NOT NULL,
    -- 'copying' until the database is switched to the target, then 'switched'; it ends 'done'
    -- or 'rolled_back'.
    state             TEXT NOT NULL,
    -- Set by an operator's abort or by the control plane giving up: the move is rolled back
    -- (only before the switch), also by a new leader that takes it over.
    abort_reason      TEXT NOT NULL DEFAULT '',
    write_pause_ms    INTEGER NOT NULL DEFAULT 0,
    created_at        TEXT NOT NULL,
    finished_at       TEXT NOT NULL DEFAULT ''
);
CREATE INDEX moves_database ON moves (database_id, state);

-- An operator drains a host: it takes no new databases, and its databases are moved away.
ALTER TABLE hosts ADD COLUMN draining INTEGER NOT NULL DEFAULT 0;

-- What a finished operation achieved, in words (a move's write pause, ...).
ALTER TABLE operations ADD COLUMN detail TEXT NOT NULL DEFAULT '';
