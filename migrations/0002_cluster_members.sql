-- High availability: a cluster has members (one primary, standbys) on different hosts.

ALTER TABLE clusters ADD COLUMN availability TEXT NOT NULL DEFAULT 'single';
-- Password of the replication role (standbys need it in plaintext for their passfile).
ALTER TABLE clusters ADD COLUMN replication_password TEXT NOT NULL DEFAULT '';

CREATE TABLE cluster_members (
    cluster_id TEXT NOT NULL REFERENCES clusters (id),
    host_id    TEXT NOT NULL REFERENCES hosts (id),
    port       INTEGER NOT NULL,
    -- 'primary', 'standby', or 'failed' (a former primary waiting to rejoin).
    role       TEXT NOT NULL,
    -- 'creating' until the member first answered, then 'ready'.
    state      TEXT NOT NULL,
    PRIMARY KEY (cluster_id, host_id)
);
CREATE INDEX cluster_members_host ON cluster_members (host_id);

-- Every existing (single) cluster has its one member.
INSERT INTO cluster_members (cluster_id, host_id, port, role, state)
    SELECT id, primary_host, port, 'primary', state FROM clusters;
-- Two members on one host never share a port.
CREATE UNIQUE INDEX cluster_members_host_port ON cluster_members (host_id, port);
