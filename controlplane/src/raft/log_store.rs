//! Durable Raft log and vote in their own SQLite file (`raft-log.db`). Every append, truncate,
//! purge and vote commits with `synchronous=FULL` (an fsync) before openraft is told it is durable;
//! a batch of entries handed over together is one transaction, so one fsync. The committed index
//! is only a hint for a faster restart (losing it is safe), so it is written without an fsync of
//! its own: the next append's fsync carries it.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{OptionalSend, Vote};
use sqlx::sqlite::{SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use super::{read_err, write_err, Entry, LogId, NodeId, StorageError, TypeConfig};
use crate::state::store::durable_options;

/// The log store; clones share the pool and serve as log readers for replication tasks.
#[derive(Clone, Debug)]
pub struct LogStore {
    pool: SqlitePool,
    /// One connection with `synchronous=NORMAL` (no fsync at commit), for the committed index.
    relaxed: SqlitePool,
}

impl LogStore {
    /// Opens (creating if needed) `raft-log.db` in `dir`.
    pub async fn open(dir: &Path) -> Result<Self, sqlx::Error> {
        let opts = durable_options(&dir.join("raft-log.db"))?;
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(opts).await?;
        sqlx::query("CREATE TABLE IF NOT EXISTS log (idx INTEGER PRIMARY KEY, entry TEXT NOT NULL)")
            .execute(&pool)
            .await?;
        sqlx::query("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            .execute(&pool)
            .await?;
        let relaxed = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(durable_options(&dir.join("raft-log.db"))?.synchronous(SqliteSynchronous::Normal))
            .await?;
        Ok(Self { pool, relaxed })
    }

    async fn meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StorageError> {
        let row: Option<(String,)> = sqlx::query_as("SELECT value FROM meta WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(read_err)?;
        match row {
            Some((v,)) => Ok(Some(serde_json::from_str(&v).map_err(read_err)?)),
            None => Ok(None),
        }
    }

    async fn set_meta<T: serde::Serialize>(&self, key: &str, value: &T) -> Result<(), StorageError> {
        Self::set_meta_in(&self.pool, key, value).await
    }

    async fn set_meta_in<T: serde::Serialize>(pool: &SqlitePool, key: &str, value: &T) -> Result<(), StorageError> {
        let v = serde_json::to_string(value).map_err(write_err)?;
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(v)
        .execute(pool)
        .await
        .map_err(write_err)?;
        Ok(())
    }

    /// Index of the first entry still in the log (for status output).
    pub async fn first_index(&self) -> Option<u64> {
        let row: Option<(Option<i64>,)> =
            sqlx::query_as("SELECT MIN(idx) FROM log").fetch_optional(&self.pool).await.ok()?;
        row.and_then(|r| r.0).map(|i| i as u64)
    }
}

fn bound_to_sql(range: &impl RangeBounds<u64>) -> (i64, i64) {
    let start = match range.start_bound() {
        Bound::Included(s) => *s as i64,
        Bound::Excluded(s) => *s as i64 + 1,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(e) => *e as i64,
        Bound::Excluded(e) => *e as i64 - 1,
        Bound::Unbounded => i64::MAX,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (start, end) = bound_to_sql(&range);
        let rows: Vec<(String,)> = sqlx::query_as("SELECT entry FROM log WHERE idx >= ? AND idx <= ? ORDER BY idx")
            .bind(start)
            .bind(end)
            .fetch_all(&self.pool)
            .await
            .map_err(read_err)?;
        rows.into_iter().map(|(e,)| serde_json::from_str(&e).map_err(read_err)).collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.meta("last_purged").await?;
        let last: Option<(String,)> = sqlx::query_as("SELECT entry FROM log ORDER BY idx DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(read_err)?;
        let last_log_id = match last {
            Some((e,)) => Some(serde_json::from_str::<Entry>(&e).map_err(read_err)?.log_id),
            None => last_purged,
        };
        Ok(LogState { last_purged_log_id: last_purged, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.set_meta("vote", vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.meta("vote").await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        Self::set_meta_in(&self.relaxed, "committed", &committed).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.meta::<Option<LogId>>("committed").await?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut tx = self.pool.begin().await.map_err(write_err)?;
        for entry in entries {
            let json = serde_json::to_string(&entry).map_err(write_err)?;
            sqlx::query("INSERT OR REPLACE INTO log (idx, entry) VALUES (?, ?)")
                .bind(entry.log_id.index as i64)
                .bind(json)
                .execute(&mut *tx)
                .await
                .map_err(write_err)?;
        }
        let res = tx.commit().await;
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(write_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        sqlx::query("DELETE FROM log WHERE idx >= ?")
            .bind(log_id.index as i64)
            .execute(&self.pool)
            .await
            .map_err(write_err)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.set_meta("last_purged", &log_id).await?;
        sqlx::query("DELETE FROM log WHERE idx <= ?")
            .bind(log_id.index as i64)
            .execute(&self.pool)
            .await
            .map_err(write_err)?;
        Ok(())
    }
}
