//! Background WAL checkpoints for the SQLite files a node writes on its hot path (the state and
//! the Raft log). SQLite's automatic checkpoint runs inside the commit that crosses its
//! threshold, so every few hundred commits one of them copied megabytes and fsynced the file:
//! tens of milliseconds added to a Raft append or apply. Here a thread of its own checkpoints
//! with `PASSIVE` (which never blocks the writer), and the writer's own automatic checkpoint
//! stays only as a backstop far above what the thread lets the WAL grow to.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use rusqlite::Connection;

/// How often the checkpoint thread looks at the WAL.
const EVERY: Duration = Duration::from_millis(100);

/// The writer's own automatic checkpoint, in pages: only reached if the thread falls behind
/// (about 40 MiB of WAL with 4 KiB pages).
pub const WRITER_AUTOCHECKPOINT_PAGES: u32 = 10_000;

/// Keeps the checkpoint thread of one file running; the thread ends once every clone of the
/// handle is dropped.
#[derive(Clone, Debug)]
pub struct Checkpointer {
    _alive: Arc<PathBuf>,
}

impl Checkpointer {
    /// Starts checkpointing `path` (a database in WAL mode) on a thread of its own, with
    /// SQLite's `synchronous` setting `synchronous` (`OFF`: checkpoints do not fsync).
    pub fn start(path: &Path, synchronous: &str) -> Result<Self, rusqlite::Error> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(1))?;
        conn.pragma_update(None, "synchronous", synchronous)?;
        let alive = Arc::new(path.to_path_buf());
        let weak = Arc::downgrade(&alive);
        let name = format!("wal-{}", path.file_stem().and_then(|s| s.to_str()).unwrap_or("db"));
        std::thread::Builder::new()
            .name(name)
            .spawn(move || run(conn, weak))
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        Ok(Self { _alive: alive })
    }
}

fn run(conn: Connection, alive: Weak<PathBuf>) {
    loop {
        std::thread::sleep(EVERY);
        let Some(path) = alive.upgrade() else { return };
        // (busy, frames in the WAL, frames checkpointed); PASSIVE copies what no reader still
        // needs and returns at once if the writer holds a lock.
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        }) {
            Ok((_, frames, done)) => tracing::trace!(file = %path.display(), frames, done, "wal checkpoint"),
            Err(e) => tracing::warn!(file = %path.display(), error = %e, "wal checkpoint failed; retrying"),
        }
    }
}

/// Sets a writer connection's automatic checkpoint to the backstop threshold.
pub fn writer_backstop(conn: &Connection) -> Result<(), rusqlite::Error> {
    conn.pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT_PAGES)
}
