//! The Raft state machine: applies committed entries to the SQLite state in one transaction
//! together with `last_applied` (so a restart never applies an entry twice), and turns the
//! state into snapshots that are consistent copies of the SQLite file.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StoredMembership};
use sqlx::{Connection, SqliteConnection};

use super::{read_err, write_err, Entry, LogId, NodeId, NodeInfo, StorageError, TypeConfig};
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

fn snapshot_file(dir: &Path) -> PathBuf {
    dir.join("snapshot.db")
}

fn meta_file(dir: &Path) -> PathBuf {
    dir.join("snapshot.meta.json")
}

/// Writes `bytes` to `path` durably: temp file, fsync, rename, fsync of the directory.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

async fn read_applied(conn: &mut SqliteConnection) -> Result<(Option<LogId>, Membership), StorageError> {
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT key, value FROM raft_applied").fetch_all(&mut *conn).await.map_err(read_err)?;
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

async fn set_applied(conn: &mut SqliteConnection, key: &str, value: String) -> Result<(), StorageError> {
    sqlx::query(
        "INSERT INTO raft_applied (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )
    .bind(key)
    .bind(value)
    .execute(&mut *conn)
    .await
    .map_err(write_err)?;
    Ok(())
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        let mut conn = self.store.pool().acquire().await.map_err(read_err)?;
        read_applied(&mut conn).await
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut tx = self.store.begin().await.map_err(write_err)?;
        let mut out = Vec::new();
        let mut last = None;
        let mut commands = false;
        for entry in entries {
            last = Some(entry.log_id);
            let resp = match &entry.payload {
                EntryPayload::Blank => Response::Empty,
                EntryPayload::Normal(cmd) => {
                    commands = true;
                    apply_entry(&mut tx, cmd).await.map_err(write_err)?
                }
                EntryPayload::Membership(m) => {
                    let stored = Membership::new(Some(entry.log_id), m.clone());
                    set_applied(&mut tx, "membership", serde_json::to_string(&stored).map_err(write_err)?).await?;
                    Response::Empty
                }
            };
            out.push(resp);
        }
        if let Some(last) = last {
            set_applied(&mut tx, "last_applied", serde_json::to_string(&Some(last)).map_err(write_err)?).await?;
        }
        tx.commit().await.map_err(write_err)?;
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
        write_durably(&incoming, &bytes).map_err(write_err)?;
        self.store.replace_from(&incoming).await.map_err(write_err)?;
        std::fs::rename(&incoming, snapshot_file(&self.dir)).map_err(write_err)?;
        write_durably(&meta_file(&self.dir), &serde_json::to_vec(meta).map_err(write_err)?).map_err(write_err)?;
        self.stats.snapshots_installed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(last_log_id = ?meta.last_log_id, bytes = bytes.len(), "installed snapshot from leader");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let meta_path = meta_file(&self.dir);
        if !meta_path.exists() {
            return Ok(None);
        }
        let meta: Meta = serde_json::from_slice(&std::fs::read(&meta_path).map_err(read_err)?).map_err(read_err)?;
        let bytes = std::fs::read(snapshot_file(&self.dir)).map_err(read_err)?;
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
        let building = self.dir.join("snapshot.building.db");
        self.store.copy_to(&building).await.map_err(write_err)?;
        // The copy carries its own `raft_applied` rows: read the meta from it, not from the live
        // state, which may have moved on while the copy was taken.
        let url = format!("sqlite://{}", building.display());
        let mut conn = SqliteConnection::connect(&url).await.map_err(read_err)?;
        let (last_log_id, last_membership) = read_applied(&mut conn).await?;
        conn.close().await.map_err(read_err)?;
        let snapshot_id = match last_log_id {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, chrono::Utc::now().timestamp_millis()),
            None => format!("empty-{}", chrono::Utc::now().timestamp_millis()),
        };
        let meta = Meta { last_log_id, last_membership, snapshot_id };
        std::fs::File::open(&building).and_then(|f| f.sync_all()).map_err(write_err)?;
        std::fs::rename(&building, snapshot_file(&self.dir)).map_err(write_err)?;
        write_durably(&meta_file(&self.dir), &serde_json::to_vec(&meta).map_err(write_err)?).map_err(write_err)?;
        let bytes = std::fs::read(snapshot_file(&self.dir)).map_err(read_err)?;
        self.stats.snapshots_built.fetch_add(1, Ordering::Relaxed);
        tracing::info!(last_log_id = ?meta.last_log_id, bytes = bytes.len(), "built snapshot");
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
    }
}
