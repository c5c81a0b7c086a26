-- Database lifecycle beyond provisioning: deprecation (still usable), archive (final verified
-- backup, live data dropped), deletion (the record stays for audit).
ALTER TABLE databases ADD COLUMN deprecation_reason TEXT NOT NULL DEFAULT '';
ALTER TABLE databases ADD COLUMN sunset_at TEXT NOT NULL DEFAULT '';
-- Where the final archive of an archived database is, and its size.
ALTER TABLE databases ADD COLUMN archive_location TEXT NOT NULL DEFAULT '';
ALTER TABLE databases ADD COLUMN archive_bytes INTEGER NOT NULL DEFAULT 0;
-- Its key in the repository and SHA-256 (checked when it is loaded back); '' once removed.
ALTER TABLE databases ADD COLUMN archive_key TEXT NOT NULL DEFAULT '';
ALTER TABLE databases ADD COLUMN archive_sha256 TEXT NOT NULL DEFAULT '';
ALTER TABLE databases ADD COLUMN deleted_at TEXT NOT NULL DEFAULT '';
CREATE INDEX audit_target ON audit (target);
