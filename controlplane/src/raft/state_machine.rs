//! The Raft state machine: applies committed entries to the SQLite state in one transaction
//! together with `last_applied` (so a restart never applies an entry twice), and turns the
//! state into snapshots that are consistent copies of the SQLite file.
//!
//! Applied transactions are not fsynced one by one: the Raft log already holds every committed
//! entry durably, so an OS crash can only take the state back to an earlier `last_applied`, from
//! which the log replays. Snapshots are fsynced; a state found behind the local snapshot is
//! restored from it at start (the log may no longer hold the entries in between).

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StoredMembership};
use sqlx::SqliteConnection;

use super::{read_err, write_err, Entry, LogId, NodeId, NodeInfo, StorageError, TypeConfig};
use crate::durable_file;
use crate::state::{apply::apply_entry, Response, Store};

type Membership = StoredMembership<NodeId, NodeInfo>;
type Meta = SnapshotMeta<NodeId, NodeInfo>;

/// Counters other parts of the node read (status, metrics, tests).
#[derive(Debug, Default)]
pub struct SmStats {
    /// Snapshots received from a leader and installed since start.
    pub snapshots_installed: AtomicU64,
    /// Snapshots built locally since start.
    pub snapshots_built: AtomicU64,
    /// Woken after every applied batch that held commands, so reconcilers react at once
    /// instead of waiting for their next tick.
    pub applied: tokio::sync::Notify,
}

/// State machine over [`Store`]; snapshot files live in `dir`.
pub struct StateMachine {
    store: Store,
    dir: PathBuf,
    stats: Arc<SmStats>,
}

impl StateMachine {
    pub fn new(store: Store, dir: &Path, stats: Arc<SmStats>) -> Self {
        Self { store, dir: dir.to_path_buf(), stats }
    }
}

/// The local snapshot in the Raft directory `dir`.
pub fn snapshot_file(dir: &Path) -> PathBuf {
    dir.join("snapshot.db")
}

fn meta_file(dir: &Path) -> PathBuf {
    dir.join("snapshot.meta.json")
}

/// The meta of the local snapshot, if there is one.
fn read_meta(dir: &Path) -> Result<Option<Meta>, StorageError> {
    let path = meta_file(dir);
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(serde_json::from_slice(&std::fs::read(&path).map_err(read_err)?).map_err(read_err)?))
}

/// Runs file work (fsyncs, whole snapshot files) on a blocking thread.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(std::io::Error::other)?
}

/// Nice value of the thread that builds snapshots (0 is normal, 19 the lowest priority).
const SNAPSHOT_NICE: i32 = 10;

/// Runs `f` on a thread of its own with a lower CPU priority ([`SNAPSHOT_NICE`]; Linux nice
/// values are per thread) and waits for it.
async fn in_background<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("raft-snapshot".into())
        .spawn(move || {
            let tid = rustix::thread::gettid();
            if let Err(e) = rustix::process::setpriority_process(Some(tid), SNAPSHOT_NICE) {
                tracing::debug!(error = %e, "could not lower the snapshot thread's priority");
            }
            let _ = tx.send(f());
        })
        .map_err(write_err)?;
    rx.await.map_err(|_| write_err(std::io::Error::other("the snapshot thread ended without a result")))?
}

async fn read_applied(conn: &mut SqliteConnection) -> Result<(Option<LogId>, Membership), StorageError> {
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT key, value FROM raft_applied").fetch_all(&mut *conn).await.map_err(read_err)?;
    parse_applied(rows)
}

/// Last applied log id and membership from `raft_applied` rows.
fn parse_applied(rows: Vec<(String, String)>) -> Result<(Option<LogId>, Membership), StorageError> {
    let mut last = None;
    let mut membership = Membership::default();
    for (k, v) in rows {
        match k.as_str() {
            "last_applied" => last = serde_json::from_str(&v).map_err(read_err)?,
            "membership" => membership = serde_json::from_str(&v).map_err(read_err)?,
            _ => {}
        }
    }
    Ok((last, membership))
}

/// Applies `entries` in one transaction together with `last_applied` (and the membership), so
/// a crash leaves either all of them applied or none.
fn apply_entries(conn: &mut rusqlite::Connection, entries: &[Entry]) -> Result<Vec<Response>, rusqlite::Error> {
    let tx = conn.transaction()?;
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let resp = match &entry.payload {
            EntryPayload::Blank => Response::Empty,
            EntryPayload::Normal(cmd) => apply_entry(&tx, cmd)?,
            EntryPayload::Membership(m) => {
                let stored = Membership::new(Some(entry.log_id), m.clone());
                set_applied(&tx, "membership", &stored)?;
                Response::Empty
            }
        };
        out.push(resp);
    }
    if let Some(last) = entries.last() {
        set_applied(&tx, "last_applied", &Some(last.log_id))?;
    }
    tx.commit()?;
    Ok(out)
}

fn set_applied(conn: &rusqlite::Connection, key: &str, value: &impl serde::Serialize) -> Result<(), rusqlite::Error> {
    let json = serde_json::to_string(value).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    conn.prepare_cached(
        "INSERT INTO raft_applied (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute(rusqlite::params![key, json])?;
    Ok(())
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        let mut conn = self.store.pool().acquire().await.map_err(read_err)?;
        let (applied, membership) = read_applied(&mut conn).await?;
        // Applying does not fsync (the log is the durable record), so after an OS crash the state
        // may be behind the last snapshot, whose entries the log may no longer hold: start from
        // the snapshot then, and the log replays what follows it.
        let Some(meta) = read_meta(&self.dir)? else { return Ok((applied, membership)) };
        if meta.last_log_id <= applied {
            return Ok((applied, membership));
        }
        if applied.is_none() {
            // A new state directory: on tmpfs after a reboot, or a state moved with --state-dir.
            tracing::info!(
                snapshot = ?meta.last_log_id,
                "the state database is empty: restoring it from the local snapshot, then replaying the log"
            );
        } else {
            tracing::warn!(
                applied = ?applied,
                snapshot = ?meta.last_log_id,
                "the state database is behind the local snapshot (its last transactions were lost in a crash): \
                 restoring it from the snapshot"
            );
        }
        self.store.replace_from(&snapshot_file(&self.dir)).await.map_err(write_err)?;
        read_applied(&mut conn).await
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let commands = entries.iter().any(|e| matches!(e.payload, EntryPayload::Normal(_)));
        let (n, started) = (entries.len(), std::time::Instant::now());
        let out = self.store.writer().run(move |conn| apply_entries(conn, &entries)).await.map_err(write_err)?;
        tracing::debug!(entries = n, ms = started.elapsed().as_secs_f64() * 1e3, "applied");
        if commands {
            self.stats.applied.notify_waiters();
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { store: self.store.clone(), dir: self.dir.clone(), stats: self.stats.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(&mut self, meta: &Meta, snapshot: Box<Cursor<Vec<u8>>>) -> Result<(), StorageError> {
        let incoming = self.dir.join("snapshot.incoming.db");
        let bytes = snapshot.into_inner();
        let size = bytes.len();
        let path = incoming.clone();
        blocking(move || durable_file::write(&path, &bytes)).await.map_err(write_err)?;
        self.store.replace_from(&incoming).await.map_err(write_err)?;
        let (dir, meta_json) = (self.dir.clone(), serde_json::to_vec(meta).map_err(write_err)?);
        blocking(move || {
            std::fs::rename(&incoming, snapshot_file(&dir))?;
            durable_file::write(&meta_file(&dir), &meta_json)
        })
        .await
        .map_err(write_err)?;
        self.stats.snapshots_installed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(last_log_id = ?meta.last_log_id, bytes = size, "installed snapshot from leader");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let Some(meta) = read_meta(&self.dir)? else { return Ok(None) };
        let path = snapshot_file(&self.dir);
        let bytes = blocking(move || std::fs::read(path)).await.map_err(read_err)?;
        Ok(Some(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) }))
    }
}

/// Builds a snapshot from a consistent copy of the state file.
pub struct SnapshotBuilder {
    store: Store,
    dir: PathBuf,
    stats: Arc<SmStats>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (store, dir) = (self.store.clone(), self.dir.clone());
        // Tens of MiB to copy and write durably, on a thread of low CPU priority: the copy is
        // a burst of CPU that otherwise delays appends and applies on a busy node.
        let (meta, bytes, copied_ms, written_ms) = in_background(move || {
            let started = std::time::Instant::now();
            let image = store.image().map_err(read_err)?;
            let copied_ms = started.elapsed().as_secs_f64() * 1e3;
            let (last_log_id, last_membership) = parse_applied(image.applied)?;
            let snapshot_id = match last_log_id {
                Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, chrono::Utc::now().timestamp_millis()),
                None => format!("empty-{}", chrono::Utc::now().timestamp_millis()),
            };
            let meta = Meta { last_log_id, last_membership, snapshot_id };
            let meta_json = serde_json::to_vec(&meta).map_err(write_err)?;
            durable_file::write(&snapshot_file(&dir), &image.bytes).map_err(write_err)?;
            durable_file::write(&meta_file(&dir), &meta_json).map_err(write_err)?;
            Ok((meta, image.bytes, copied_ms, started.elapsed().as_secs_f64() * 1e3 - copied_ms))
        })
        .await?;
        self.stats.snapshots_built.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            last_log_id = ?meta.last_log_id,
            bytes = bytes.len(),
            copied_ms,
            written_ms,
            "built snapshot"
        );
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Command;
    use openraft::{CommittedLeaderId, RaftSnapshotBuilder};

    fn team(index: u64) -> Entry {
        let name = format!("t{index}");
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Command::CreateTeam {
                name,
                contact: "c".into(),
                token_hash: format!("h{index}"),
                at: "t0".into(),
                actor: "test".into(),
                token_id: None,
            }),
        }
    }

    async fn teams(store: &Store) -> i64 {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM teams").fetch_one(store.pool()).await.unwrap();
        n
    }

    /// An OS crash can take the unsynced state back before the last snapshot: the state machine
    /// then starts from the snapshot rather than from a point the log may no longer reach.
    #[tokio::test]
    async fn state_behind_the_snapshot_is_restored_from_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let mut sm = StateMachine::new(store.clone(), dir.path(), Arc::default());
        sm.apply((1..=5).map(team)).await.unwrap();
        let old = dir.path().join("old.db");
        std::fs::write(&old, store.image().unwrap().bytes).unwrap();
        sm.apply((6..=10).map(team)).await.unwrap();
        let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(10));

        // The crash: the state loses its last five transactions.
        store.replace_from(&old).await.unwrap();
        assert_eq!(teams(&store).await, 5);

        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(10));
        assert_eq!(teams(&store).await, 10);
        // Up to date already: nothing is restored again.
        sm.apply([team(11)]).await.unwrap();
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(11));
        assert_eq!(teams(&store).await, 11);
    }

    #[tokio::test]
    async fn a_state_from_an_earlier_boot_is_rebuilt_from_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open_in_boot(dir.path(), Some("boot-1")).await.unwrap();
            let mut sm = StateMachine::new(store.clone(), dir.path(), Arc::default());
            sm.apply((1..=5).map(team)).await.unwrap();
            sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
            sm.apply((6..=8).map(team)).await.unwrap();
        }
        // A restart of the process in the same boot trusts the file, unsynced writes included.
        {
            let store = Store::open_in_boot(dir.path(), Some("boot-1")).await.unwrap();
            let mut sm = StateMachine::new(store.clone(), dir.path(), Arc::default());
            let (applied, _) = sm.applied_state().await.unwrap();
            assert_eq!(applied.map(|l| l.index), Some(8));
            assert_eq!(teams(&store).await, 8);
        }
        // After a reboot the file is rebuilt from the snapshot; the log replays 6..=8 from there.
        let store = Store::open_in_boot(dir.path(), Some("boot-2")).await.unwrap();
        let mut sm = StateMachine::new(store.clone(), dir.path(), Arc::default());
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(5));
        assert_eq!(teams(&store).await, 5);
        sm.apply((6..=8).map(team)).await.unwrap();
        assert_eq!(teams(&store).await, 8);
    }
}
