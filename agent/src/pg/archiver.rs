//! What PostgreSQL's archiver says about WAL archiving on this instance, for heartbeats and
//! alerting: whether it is on, the backlog, failures, and the last success.

use super::{Instance, PgError};

/// The archiver's state on a primary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArchiverStatus {
    /// `archive_mode` is not off.
    pub enabled: bool,
    /// Files waiting in PostgreSQL's queue (`pg_wal/archive_status/*.ready`).
    pub queue: u64,
    /// Failed `archive_command` calls since the statistics were reset.
    pub failures: u64,
    /// When a file was last archived, Unix seconds (0: never).
    pub last_success_unix: i64,
}

impl Instance {
    /// Reads `pg_stat_archiver` and counts the `.ready` files of the archive queue.
    pub async fn archiver_status(&self) -> Result<ArchiverStatus, PgError> {
        let client = self.superuser_client().await?;
        let row = client
            .query_one(
                "SELECT current_setting('archive_mode') <> 'off', failed_count, \
                 coalesce(extract(epoch FROM last_archived_time)::bigint, 0), \
                 (SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready') \
                 FROM pg_stat_archiver",
                &[],
            )
            .await
            .map_err(|source| PgError::Sql { action: "reading pg_stat_archiver".into(), source })?;
        let (enabled, failures, last, queue): (bool, i64, i64, i64) = (row.get(0), row.get(1), row.get(2), row.get(3));
        Ok(ArchiverStatus {
            enabled,
            queue: u64::try_from(queue).unwrap_or(0),
            failures: u64::try_from(failures).unwrap_or(0),
            last_success_unix: last,
        })
    }
}
