//! Durable Raft log and vote in their own SQLite file (`raft-log.db`).
//!
//! openraft calls `append` inside its core task and asks it to return once the entries are
//! readable, reporting durability later through a callback. So appends go into an in-memory
//! tail at once, and one writer thread makes them durable: it takes every operation queued
//! since its last commit (appends, votes, truncation, purges) into one transaction with
//! `synchronous=FULL`, so one fsync serves all of them, then reports each append flushed. The
//! core task never waits on the disk, and appends that arrive during an fsync share the next.
//!
//! The tail keeps the newest entries after they are flushed too, so replication reads them
//! from memory. Votes, truncation and purges wait for their commit (they are rare, and Raft's
//! safety rests on the vote being durable before it is acted on). The committed index is only
//! a hint for a faster restart (losing it is safe), so it rides along with the next commit.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{OptionalSend, Vote};
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

use super::snapshot_policy::LogBytes;
use super::{read_err, write_err, Entry, LogId, NodeId, StorageError, TypeConfig};
use crate::state::wal::{self, Checkpointer};

/// Flushed entries kept in memory for replication reads (the unflushed ones are always there).
const TAIL_KEEP: u64 = 512;

/// Operations one writer transaction takes at most.
const MAX_OPS_PER_COMMIT: usize = 256;

/// Failures of the log file itself.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("raft log {path}: {source}")]
    Sqlite { path: PathBuf, source: rusqlite::Error },
    #[error("raft log {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The log store; clones share it and serve as log readers for replication tasks.
#[derive(Clone, Debug)]
pub struct LogStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// Newest entries by index: every entry not yet durable, and up to [`TAIL_KEEP`] that are.
    tail: Arc<Mutex<BTreeMap<u64, Entry>>>,
    /// The committed index (JSON) to write with the next commit.
    committed: Arc<Mutex<Option<String>>>,
    /// Operations for the writer thread, in order.
    ops: mpsc::Sender<Op>,
    /// Reads of entries older than the tail, and of the vote and meta at start.
    reader: Mutex<Connection>,
    /// Checkpoints the WAL off the append path while the store lives.
    _checkpoints: Checkpointer,
    /// Bytes appended since start, for the snapshot policy.
    appended: Arc<LogBytes>,
}

impl Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").field("path", &self.path).finish()
    }
}

/// Result of a write the caller waits for.
type Done = oneshot::Sender<Result<(), String>>;

enum Op {
    Append { rows: Vec<(i64, String)>, last: u64, flushed: LogFlushed<TypeConfig> },
    Meta { key: &'static str, json: String, done: Done },
    Truncate { from: i64, done: Done },
    Purge { upto: i64, json: String, done: Done },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each critical section is a single map or value update: a panic cannot leave it half done.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn connect(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

const UPSERT_META: &str =
    "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value";

impl LogStore {
    /// Opens (creating if needed) `raft-log.db` in `dir` and starts its writer thread.
    pub async fn open(dir: &Path) -> Result<Self, LogError> {
        let path = dir.join("raft-log.db");
        let p = path.clone();
        let opened = tokio::task::spawn_blocking(move || -> Result<_, rusqlite::Error> {
            let writer = connect(&p)?;
            writer.execute_batch(
                "CREATE TABLE IF NOT EXISTS log (idx INTEGER PRIMARY KEY, entry TEXT NOT NULL);
                 CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
            )?;
            wal::writer_backstop(&writer)?;
            Ok((writer, connect(&p)?, Checkpointer::start(&p, "FULL")?))
        })
        .await
        .map_err(|e| LogError::Invalid { path: path.clone(), message: format!("opening task failed: {e}") })?;
        let (writer, reader, checkpoints) = opened.map_err(|source| LogError::Sqlite { path: path.clone(), source })?;
        let (tx, rx) = mpsc::channel();
        let tail = Arc::new(Mutex::new(BTreeMap::new()));
        let committed = Arc::new(Mutex::new(None));
        let thread = Writer { conn: writer, ops: rx, tail: tail.clone(), committed: committed.clone() };
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || thread.run())
            .map_err(|e| LogError::Invalid { path: path.clone(), message: format!("starting the writer: {e}") })?;
        let inner = Inner {
            path,
            tail,
            committed,
            ops: tx,
            reader: Mutex::new(reader),
            _checkpoints: checkpoints,
            appended: Arc::default(),
        };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Runs `f` on the reader connection, on a blocking thread.
    async fn read<R, F>(&self, f: F) -> Result<R, LogError>
    where
        F: FnOnce(&Connection) -> Result<R, rusqlite::Error> + Send + 'static,
        R: Send + 'static,
    {
        let inner = self.inner.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let conn = lock(&inner.reader);
            f(&conn).map_err(|source| LogError::Sqlite { path: inner.path.clone(), source })
        })
        .await;
        joined.map_err(|e| LogError::Invalid {
            path: self.inner.path.clone(),
            message: format!("read task failed: {e}"),
        })?
    }

    /// Queues `op` for the writer and waits until it is durable.
    async fn write(&self, op: impl FnOnce(Done) -> Op) -> Result<(), LogError> {
        let invalid = |message: String| LogError::Invalid { path: self.inner.path.clone(), message };
        let (done, rx) = oneshot::channel();
        self.inner.ops.send(op(done)).map_err(|_| invalid("the log writer has stopped".into()))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(invalid(e)),
            Err(_) => Err(invalid("the log writer has stopped".into())),
        }
    }

    async fn meta<T: serde::de::DeserializeOwned>(&self, key: &'static str) -> Result<Option<T>, StorageError> {
        let row: Option<String> = self
            .read(move |c| {
                c.prepare_cached("SELECT value FROM meta WHERE key = ?")?.query_row([key], |r| r.get(0)).optional()
            })
            .await
            .map_err(read_err)?;
        match row {
            Some(v) => Ok(Some(serde_json::from_str(&v).map_err(read_err)?)),
            None => Ok(None),
        }
    }

    async fn set_meta<T: serde::Serialize>(&self, key: &'static str, value: &T) -> Result<(), StorageError> {
        let json = serde_json::to_string(value).map_err(write_err)?;
        self.write(|done| Op::Meta { key, json, done }).await.map_err(write_err)
    }

    /// The count of bytes appended to this log, which the snapshot policy compares with the
    /// snapshot's size.
    pub fn appended_bytes(&self) -> Arc<LogBytes> {
        self.inner.appended.clone()
    }

    /// Index of the oldest entry still in the log (the operator API reports it).
    pub async fn first_index(&self) -> Option<u64> {
        let on_disk: Option<i64> =
            self.read(|c| c.query_row("SELECT MIN(idx) FROM log", [], |r| r.get(0))).await.ok()?;
        let in_memory = lock(&self.inner.tail).keys().next().copied();
        match (on_disk, in_memory) {
            (Some(d), Some(m)) => Some((d as u64).min(m)),
            (Some(d), None) => Some(d as u64),
            (None, m) => m,
        }
    }
}

/// The writer thread: owns the durable connection.
struct Writer {
    conn: Connection,
    ops: mpsc::Receiver<Op>,
    tail: Arc<Mutex<BTreeMap<u64, Entry>>>,
    committed: Arc<Mutex<Option<String>>>,
}

impl Writer {
    fn run(mut self) {
        // Ends when every store handle (and so every sender) is gone.
        while let Ok(first) = self.ops.recv() {
            let mut ops = vec![first];
            while ops.len() < MAX_OPS_PER_COMMIT {
                match self.ops.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            let committed = lock(&self.committed).take();
            let started = std::time::Instant::now();
            let result = self.commit(&ops, committed.as_deref()).map_err(|e| e.to_string());
            tracing::debug!(ops = ops.len(), ms = started.elapsed().as_secs_f64() * 1e3, "log committed");
            let mut flushed_upto = None;
            for op in ops {
                let r = result.clone();
                match op {
                    Op::Append { last, flushed, .. } => {
                        if r.is_ok() {
                            flushed_upto = Some(last);
                        }
                        flushed.log_io_completed(r.map_err(std::io::Error::other));
                    }
                    Op::Meta { done, .. } | Op::Truncate { done, .. } | Op::Purge { done, .. } => {
                        let _ = done.send(r);
                    }
                }
            }
            if let Some(upto) = flushed_upto {
                // Keep the newest flushed entries for replication; the older ones are on disk.
                let mut tail = lock(&self.tail);
                let keep_from = upto.saturating_sub(TAIL_KEEP);
                while let Some((&first, _)) = tail.first_key_value() {
                    if first > keep_from {
                        break;
                    }
                    tail.pop_first();
                }
            }
        }
    }

    fn commit(&mut self, ops: &[Op], committed: Option<&str>) -> Result<(), rusqlite::Error> {
        let tx = self.conn.transaction()?;
        for op in ops {
            match op {
                Op::Append { rows, .. } => {
                    let mut st = tx.prepare_cached("INSERT OR REPLACE INTO log (idx, entry) VALUES (?, ?)")?;
                    for (idx, json) in rows {
                        st.execute(params![idx, json])?;
                    }
                }
                Op::Meta { key, json, .. } => {
                    tx.prepare_cached(UPSERT_META)?.execute(params![key, json])?;
                }
                Op::Truncate { from, .. } => {
                    tx.prepare_cached("DELETE FROM log WHERE idx >= ?")?.execute([from])?;
                }
                Op::Purge { upto, json, .. } => {
                    tx.prepare_cached(UPSERT_META)?.execute(params!["last_purged", json])?;
                    tx.prepare_cached("DELETE FROM log WHERE idx <= ?")?.execute([upto])?;
                }
            }
        }
        if let Some(json) = committed {
            tx.prepare_cached(UPSERT_META)?.execute(params!["committed", json])?;
        }
        tx.commit()
    }
}

fn bound_to_sql(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(s) => *s,
        Bound::Excluded(s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(e) => *e,
        Bound::Excluded(e) => match e.checked_sub(1) {
            Some(e) => e,
            None => return (1, 0),
        },
        Bound::Unbounded => i64::MAX as u64,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (start, end) = bound_to_sql(&range);
        if start > end {
            return Ok(Vec::new());
        }
        // Everything below the tail's first index is durable, so on disk.
        let (from_memory, tail_first) = {
            let tail = lock(&self.inner.tail);
            let entries: Vec<Entry> = tail.range(start..=end).map(|(_, e)| e.clone()).collect();
            (entries, tail.keys().next().copied())
        };
        let disk_end = match tail_first {
            Some(first) if first <= start => return Ok(from_memory),
            Some(first) => end.min(first - 1),
            None => end,
        };
        let (s, e) = (start as i64, disk_end.min(i64::MAX as u64) as i64);
        let rows: Vec<String> = self
            .read(move |c| {
                let mut st = c.prepare_cached("SELECT entry FROM log WHERE idx >= ? AND idx <= ? ORDER BY idx")?;
                let rows = st.query_map(params![s, e], |r| r.get(0))?;
                rows.collect()
            })
            .await
            .map_err(read_err)?;
        let mut out = Vec::with_capacity(rows.len() + from_memory.len());
        for json in rows {
            out.push(serde_json::from_str::<Entry>(&json).map_err(read_err)?);
        }
        out.extend(from_memory);
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.meta("last_purged").await?;
        let in_memory = lock(&self.inner.tail).last_key_value().map(|(_, e)| e.log_id);
        let last_log_id = match in_memory {
            Some(id) => Some(id),
            None => {
                let last: Option<String> = self
                    .read(|c| {
                        c.query_row("SELECT entry FROM log ORDER BY idx DESC LIMIT 1", [], |r| r.get(0)).optional()
                    })
                    .await
                    .map_err(read_err)?;
                match last {
                    Some(e) => Some(serde_json::from_str::<Entry>(&e).map_err(read_err)?.log_id),
                    None => last_purged,
                }
            }
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
        let json = serde_json::to_string(&committed).map_err(write_err)?;
        *lock(&self.inner.committed) = Some(json);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.meta::<Option<LogId>>("committed").await?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let Some(last) = entries.last().map(|e| e.log_id.index) else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        let mut rows = Vec::with_capacity(entries.len());
        for e in &entries {
            rows.push((e.log_id.index as i64, serde_json::to_string(e).map_err(write_err)?));
        }
        self.inner.appended.add(rows.iter().map(|(_, json)| json.len() as u64).sum());
        // Readable at once (openraft's contract for a return from `append`); durable when the
        // writer reports it through `callback`.
        {
            let mut tail = lock(&self.inner.tail);
            for e in entries {
                tail.insert(e.log_id.index, e);
            }
        }
        let sent = self.inner.ops.send(Op::Append { rows, last, flushed: callback });
        if let Err(mpsc::SendError(Op::Append { flushed, .. })) = sent {
            let e = std::io::Error::other("the log writer has stopped");
            let message = e.to_string();
            flushed.log_io_completed(Err(e));
            return Err(write_err(std::io::Error::other(message)));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let from = log_id.index;
        {
            let mut tail = lock(&self.inner.tail);
            let _ = tail.split_off(&from);
        }
        self.write(|done| Op::Truncate { from: from as i64, done }).await.map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let json = serde_json::to_string(&log_id).map_err(write_err)?;
        let upto = log_id.index;
        {
            let mut tail = lock(&self.inner.tail);
            let rest = tail.split_off(&upto.saturating_add(1));
            *tail = rest;
        }
        self.write(|done| Op::Purge { upto: upto as i64, json, done }).await.map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::state_machine::{SmStats, StateMachine};
    use crate::state::Store;

    /// A fresh log store and state machine in a directory of their own (kept alive with them).
    struct Fresh;

    impl openraft::testing::StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Fresh {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
            let dir = tempfile::tempdir().map_err(write_err)?;
            let log = LogStore::open(dir.path()).await.map_err(write_err)?;
            let store = Store::open(dir.path()).await.map_err(write_err)?;
            let sm = StateMachine::new(store, dir.path(), Arc::new(SmStats::default()));
            Ok((dir, log, sm))
        }
    }

    /// openraft's own conformance suite for log storage and state machines: appends through the
    /// writer thread, reads from the in-memory tail and from disk, truncation, purges, votes,
    /// initial state after a restart and snapshots.
    #[test]
    fn passes_the_openraft_storage_suite() {
        openraft::testing::Suite::test_all(Fresh).unwrap();
    }
}
