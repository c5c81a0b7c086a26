-- A team's token hash is checked for uniqueness where tokens are looked up: `tokens.hash`
-- (UNIQUE) holds every team token, the first one included. The UNIQUE constraint on
-- `teams.token_hash` kept a second index of random 64-character keys that nothing reads, and
-- every team created paid for it at apply time on every node (a random page of the index
-- dirtied per insert: ~15% of a team create's apply cost). SQLite cannot drop a constraint,
-- so the table is rebuilt with the same columns in the same order (snapshots from earlier
-- versions still install: their rows are copied table by table, column by column).
CREATE TABLE teams_rebuilt (
    name       TEXT PRIMARY KEY,
    contact    TEXT NOT NULL,
    token_hash TEXT NOT NULL,
    created_at TEXT NOT NULL
);
INSERT INTO teams_rebuilt (name, contact, token_hash, created_at)
    SELECT name, contact, token_hash, created_at FROM teams;
DROP TABLE teams;
ALTER TABLE teams_rebuilt RENAME TO teams;
