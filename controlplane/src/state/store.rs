//! The SQLite file that holds the replicated state: opening it (with migrations), durable
//! settings, consistent snapshot copies and snapshot installation.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::Connection;

use super::boot::{self, Durability};

/// Failures of the state store. Displayed to operators, so each says which file was involved.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database {path}: {source}")]
    Sqlite { path: PathBuf, source: sqlx::Error },
    #[error("migrating state database {path}: {source}")]
    Migrate { path: PathBuf, source: sqlx::migrate::MigrateError },
    #[error("state database {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("state database {path} (state machine connection): {source}")]
    Writer { path: PathBuf, source: rusqlite::Error },
}

/// Migrations of the state schema, embedded so a binary always carries its own schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Upper bound of the memory map through which [`Store::image`] reads the state file.
const IMAGE_MMAP_BYTES: i64 = 1 << 32;

/// A consistent copy of the state file (see [`Store::image`]).
pub struct StateImage {
    /// The file's bytes: a SQLite database of its own.
    pub bytes: Vec<u8>,
    /// Its `raft_applied` rows (key, JSON value).
    pub applied: Vec<(String, String)>,
}

/// Handle to the state database. Cloning is cheap (shares the pool and the writer).
#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
    writer: Writer,
    path: PathBuf,
}

/// The state machine's own synchronous connection, on which committed entries are applied.
/// Applying a batch is thousands of small statements; here each costs microseconds, where the
/// async pool hands every statement to a worker thread and back. Reads stay on the pool (WAL
/// lets them run while the writer commits).
#[derive(Clone)]
pub struct Writer {
    conn: Arc<Mutex<rusqlite::Connection>>,
    path: PathBuf,
    /// Checkpoints the WAL off the apply path while the writer lives.
    _checkpoints: super::wal::Checkpointer,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").field("path", &self.path).finish()
    }
}

/// Distinct statements the apply code prepares; all stay cached on the writer.
const WRITER_STATEMENT_CACHE: usize = 256;

impl Writer {
    fn open(path: &Path, durability: &Durability) -> Result<Self, StateError> {
        let err = |source| StateError::Writer { path: path.to_path_buf(), source };
        let conn = rusqlite::Connection::open(path).map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(err)?;
        // WAL without an fsync per commit, and (where a reboot can be detected) without any:
        // the Raft log is the durable record of what was applied (see `boot`).
        conn.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
        conn.pragma_update(None, "synchronous", durability.synchronous()).map_err(err)?;
        conn.pragma_update(None, "foreign_keys", "OFF").map_err(err)?;
        super::wal::writer_backstop(&conn).map_err(err)?;
        conn.set_prepared_statement_cache_capacity(WRITER_STATEMENT_CACHE);
        let checkpoints = super::wal::Checkpointer::start(path, durability.synchronous()).map_err(err)?;
        Ok(Self { conn: Arc::new(Mutex::new(conn)), path: path.to_path_buf(), _checkpoints: checkpoints })
    }

    /// Runs `f` on the connection on a blocking thread, so the async runtime is never blocked
    /// by SQLite (or by its fsync).
    pub async fn run<R, F>(&self, f: F) -> Result<R, StateError>
    where
        F: FnOnce(&mut rusqlite::Connection) -> Result<R, rusqlite::Error> + Send + 'static,
        R: Send + 'static,
    {
        let conn = self.conn.clone();
        let path = self.path.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().map_err(|_| StateError::Invalid {
                path: path.clone(),
                message: "the state machine connection was poisoned by an earlier panic".into(),
            })?;
            f(&mut guard).map_err(|source| StateError::Writer { path, source })
        })
        .await;
        joined
            .map_err(|e| StateError::Invalid { path: self.path.clone(), message: format!("apply task failed: {e}") })?
    }
}

/// Options of the read pool (which also installs snapshots): WAL journal, full fsync on commit.
fn durable_options(path: &Path) -> Result<SqliteConnectOptions, sqlx::Error> {
    Ok(SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(false)
        .busy_timeout(std::time::Duration::from_secs(10)))
}

impl Store {
    /// Opens (creating if needed) `state.db` in `dir` and brings its schema up to date. A
    /// state written without fsync in an earlier boot is discarded first (see `boot`): the
    /// state machine then rebuilds it from the snapshot and the log.
    pub async fn open(dir: &Path) -> Result<Self, StateError> {
        Self::open_in_boot(dir, boot::current_boot_id().as_deref()).await
    }

    /// [`Store::open`] as if in the boot with id `boot` (tests play reboots with it).
    pub async fn open_in_boot(dir: &Path, boot: Option<&str>) -> Result<Self, StateError> {
        let path = dir.join("state.db");
        let prepared = boot::prepare(&path, boot).map_err(|e| StateError::Invalid {
            path: path.clone(),
            message: format!("checking whether the state survived a reboot: {e}"),
        })?;
        if prepared.discarded {
            tracing::warn!(
                path = %path.display(),
                "the host restarted since the state was last written (without fsync): \
                 rebuilding it from the local snapshot and the Raft log"
            );
        }
        let err = |source| StateError::Sqlite { path: path.clone(), source };
        let opts = durable_options(&path).map_err(err)?;
        // A local file needs no liveness ping before each use: that would be one more trip
        // through the driver's worker thread for every read.
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .test_before_acquire(false)
            .connect_with(opts)
            .await
            .map_err(err)?;
        MIGRATOR.run(&pool).await.map_err(|source| StateError::Migrate { path: path.clone(), source })?;
        let writer = Writer::open(&path, &prepared.durability)?;
        Ok(Self { pool, writer, path })
    }

    /// The pool, for read queries.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The state machine's connection, on which committed entries are applied.
    pub fn writer(&self) -> &Writer {
        &self.writer
    }

    fn err(&self, source: sqlx::Error) -> StateError {
        StateError::Sqlite { path: self.path.clone(), source }
    }

    /// Reads one value of the state machine's Raft bookkeeping (`raft_applied`).
    pub async fn applied_value(&self, key: &str) -> Result<Option<String>, StateError> {
        let row: Option<(String,)> = sqlx::query_as("SELECT value FROM raft_applied WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(row.map(|r| r.0))
    }

    /// A consistent image of the whole state file, for a snapshot: every page as it is, read in
    /// one transaction together with the `raft_applied` rows it holds (so the snapshot's meta
    /// matches its content even while entries keep being applied). Blocking: call it off the
    /// async workers.
    ///
    /// Pages are copied, not rebuilt: `VACUUM INTO`, used before, reinserted every row and index
    /// entry, and at 60,000 teams that was a few hundred ms of CPU on every node at once.
    pub fn image(&self) -> Result<StateImage, StateError> {
        read_image(&self.path).map_err(|source| StateError::Writer { path: self.path.clone(), source })
    }

    /// Replaces every replicated table's rows with those of the snapshot file `src`, in one
    /// transaction: readers see either the old state or the new one, never a mix.
    pub async fn replace_from(&self, src: &Path) -> Result<(), StateError> {
        let mut conn = self.pool.acquire().await.map_err(|e| self.err(e))?;
        sqlx::query("ATTACH DATABASE ? AS snap")
            .bind(src.display().to_string())
            .execute(&mut *conn)
            .await
            .map_err(|e| self.err(e))?;
        let result = async {
            let tables: Vec<(String,)> = sqlx::query_as(
                "SELECT name FROM main.sqlite_master WHERE type = 'table'
                 AND name NOT LIKE 'sqlite_%' AND name <> '_sqlx_migrations'",
            )
            .fetch_all(&mut *conn)
            .await?;
            let mut tx = conn.begin().await?;
            for (t,) in &tables {
                sqlx::query(&format!("DELETE FROM main.\"{t}\"")).execute(&mut *tx).await?;
                sqlx::query(&format!("INSERT INTO main.\"{t}\" SELECT * FROM snap.\"{t}\"")).execute(&mut *tx).await?;
            }
            tx.commit().await
        }
        .await;
        let detach = sqlx::query("DETACH DATABASE snap").execute(&mut *conn).await;
        result.map_err(|e| self.err(e))?;
        detach.map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// [`Store::image`] of the state file at `path`, on a read-only connection of its own.
fn read_image(path: &Path) -> Result<StateImage, rusqlite::Error> {
    let conn = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    // Pages read through a memory map: half the CPU of a read() per page.
    conn.pragma_update(None, "mmap_size", IMAGE_MMAP_BYTES)?;
    conn.execute_batch("BEGIN")?;
    let applied = conn
        .prepare("SELECT key, value FROM raft_applied")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<Vec<(String, String)>, _>>()?;
    let mut bytes = conn.serialize(rusqlite::DatabaseName::Main)?.to_vec();
    conn.execute_batch("COMMIT")?;
    // The file format's read and write versions (bytes 18 and 19): 1, rollback journal, so a
    // snapshot file opened later does not look for a WAL of its own.
    if bytes.len() >= 100 {
        bytes[18] = 1;
        bytes[19] = 1;
    }
    Ok(StateImage { bytes, applied })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn copy_and_replace_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(&dir.path().join("a").tap_create()).await.unwrap();
        let b = Store::open(&dir.path().join("b").tap_create()).await.unwrap();
        sqlx::query("INSERT INTO teams VALUES ('t1','c','h1','now')").execute(a.pool()).await.unwrap();
        sqlx::query("INSERT INTO teams VALUES ('old','c','h2','now')").execute(b.pool()).await.unwrap();
        let snap = dir.path().join("snap.db");
        std::fs::write(&snap, a.image().unwrap().bytes).unwrap();
        b.replace_from(&snap).await.unwrap();
        let names: Vec<(String,)> = sqlx::query_as("SELECT name FROM teams").fetch_all(b.pool()).await.unwrap();
        assert_eq!(names, vec![("t1".to_string(),)]);
    }

    /// A state written before migration 0008 (which rebuilt `teams`) keeps its teams and the
    /// databases that reference them when a node upgrades, and a snapshot taken before it still
    /// installs on an upgraded node.
    #[tokio::test]
    async fn a_state_from_before_the_teams_rebuild_upgrades_and_its_snapshots_install() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old").tap_create();
        let path = old.join("state.db");
        {
            let pool = SqlitePoolOptions::new().connect_with(durable_options(&path).unwrap()).await.unwrap();
            let before = sqlx::migrate::Migrator {
                migrations: MIGRATOR.migrations.iter().filter(|m| m.version < 8).cloned().collect(),
                ..sqlx::migrate::Migrator::DEFAULT
            };
            before.run(&pool).await.unwrap();
            for sql in [
                "INSERT INTO teams VALUES ('shop', 'c', 'h1', 't0')",
                "INSERT INTO databases (id, name, owner, purpose, plan, availability, backup_retention_days,
                     state, cluster_id, pg_name, role_name, password, created_at, updated_at)
                 VALUES ('d1', 'orders', 'shop', 'p', 'small', 'single', 7, 'active', 'c1', 'orders',
                     'orders', 'pw', 't0', 't0')",
            ] {
                sqlx::query(sql).execute(&pool).await.unwrap();
            }
            pool.close().await;
        }
        let snapshot = dir.path().join("before-0008.db");
        std::fs::write(&snapshot, read_image(&path).unwrap().bytes).unwrap();

        let upgraded = Store::open(&old).await.unwrap();
        let teams: Vec<(String, String)> =
            sqlx::query_as("SELECT name, token_hash FROM teams").fetch_all(upgraded.pool()).await.unwrap();
        assert_eq!(teams, [("shop".to_string(), "h1".to_string())]);
        let dangling: Vec<(String, i64, String, i64)> =
            sqlx::query_as("SELECT * FROM pragma_foreign_key_check('databases') WHERE \"parent\" = 'teams'")
                .fetch_all(upgraded.pool())
                .await
                .unwrap();
        assert!(dangling.is_empty(), "databases lost their owner team: {dangling:?}");
        let (ok,): (String,) = sqlx::query_as("PRAGMA integrity_check").fetch_one(upgraded.pool()).await.unwrap();
        assert_eq!(ok, "ok");

        let fresh = Store::open(&dir.path().join("new").tap_create()).await.unwrap();
        fresh.replace_from(&snapshot).await.unwrap();
        let owners: Vec<(String, String)> =
            sqlx::query_as("SELECT d.name, t.name FROM databases d JOIN teams t ON t.name = d.owner")
                .fetch_all(fresh.pool())
                .await
                .unwrap();
        assert_eq!(owners, [("orders".to_string(), "shop".to_string())]);
    }

    trait TapCreate {
        fn tap_create(self) -> Self;
    }
    impl TapCreate for PathBuf {
        fn tap_create(self) -> Self {
            std::fs::create_dir_all(&self).unwrap();
            self
        }
    }
}
