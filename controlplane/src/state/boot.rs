//! Whether the state file can be trusted after a start, and so whether it may be written
//! without any fsync.
//!
//! The state database holds nothing of its own: every row comes from applying the Raft log,
//! which is durable, on top of the last snapshot, which is fsynced. Writing the state with
//! `synchronous=OFF` (no fsync on commit, none in checkpoints either) cut the control plane's
//! disk writes at 2,000 writes/s from ~190 MB/s to ~25 MB/s: the page cache absorbs the many
//! rewrites of the same B-tree pages, and no checkpoint fsync queues the device in front of the
//! Raft log's own. The price is that an OS crash or power loss may leave the file torn, which
//! no check can reliably tell apart from a consistent file.
//!
//! So the state is trusted only within the boot that wrote it. A marker file next to it records
//! the kernel's boot id (written durably before any unsynced write). A process crash or restart
//! in the same boot finds the same id: the page cache still has every write, the file is
//! complete. A different id means the host restarted: the file is discarded and rebuilt from the
//! local snapshot and the Raft log (the state machine restores the snapshot when the state is
//! behind it, see `raft::state_machine`). Without a marker (a state written by a version that
//! synced its checkpoints) or without a boot id (not Linux) the old crash-consistent mode stays.

use std::path::{Path, PathBuf};

/// Where the kernel publishes an id that changes at every boot.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// How the state file is written in this run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Durability {
    /// No fsync at all; the marker says which boot may trust the file.
    ThisBoot,
    /// fsync at checkpoints (SQLite `synchronous=NORMAL`): consistent after an OS crash, maybe
    /// behind. Used where the boot id cannot be read.
    Checkpoints,
}

impl Durability {
    /// The SQLite `synchronous` setting of the state's writer and checkpointer.
    pub fn synchronous(&self) -> &'static str {
        match self {
            Durability::ThisBoot => "OFF",
            Durability::Checkpoints => "NORMAL",
        }
    }
}

/// What [`prepare`] found and did.
#[derive(Debug, PartialEq, Eq)]
pub struct Prepared {
    pub durability: Durability,
    /// The state file was written in an earlier boot without fsync and was removed.
    pub discarded: bool,
}

/// The marker file of the state file `db`.
pub fn marker(db: &Path) -> PathBuf {
    db.with_extension("db.boot")
}

/// This boot's id, if the kernel publishes one.
pub fn current_boot_id() -> Option<String> {
    let id = std::fs::read_to_string(BOOT_ID).ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_string())
}

/// Before the state file `db` is opened: discards it if an earlier boot wrote it unsynced, then
/// records `boot` (this boot's id) durably as the one whose writes the file will hold.
pub fn prepare(db: &Path, boot: Option<&str>) -> std::io::Result<Prepared> {
    let marker = marker(db);
    let Some(boot) = boot else {
        // The file may be written without fsync only where a reboot can be told apart. A marker
        // says an earlier run wrote it unsynced: without a boot id, that run's boot cannot be
        // ruled out, so the file cannot be trusted.
        let discarded = marker.exists() && db.exists();
        if discarded {
            remove_state(db)?;
        }
        remove_if_present(&marker)?;
        return Ok(Prepared { durability: Durability::Checkpoints, discarded });
    };
    let recorded = match std::fs::read_to_string(&marker) {
        Ok(s) => Some(s.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let discarded = match &recorded {
        Some(r) if r != boot && db.exists() => {
            remove_state(db)?;
            true
        }
        _ => false,
    };
    if recorded.as_deref() != Some(boot) {
        // On disk before the first unsynced write it vouches for.
        crate::durable_file::write(&marker, boot.as_bytes())?;
    }
    Ok(Prepared { durability: Durability::ThisBoot, discarded })
}

/// Removes the state file with its WAL and shared-memory index.
fn remove_state(db: &Path) -> std::io::Result<()> {
    for f in [db.to_path_buf(), suffixed(db, "-wal"), suffixed(db, "-shm")] {
        remove_if_present(&f)?;
    }
    Ok(())
}

fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_files(dir: &Path) -> PathBuf {
        let db = dir.join("state.db");
        for f in [db.clone(), suffixed(&db, "-wal"), suffixed(&db, "-shm")] {
            std::fs::write(f, b"x").unwrap();
        }
        db
    }

    #[test]
    fn a_state_written_unsynced_in_an_earlier_boot_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let db = state_files(dir.path());
        std::fs::write(marker(&db), "boot-a").unwrap();
        let p = prepare(&db, Some("boot-b")).unwrap();
        assert_eq!(p, Prepared { durability: Durability::ThisBoot, discarded: true });
        assert!(!db.exists() && !suffixed(&db, "-wal").exists() && !suffixed(&db, "-shm").exists());
        assert_eq!(std::fs::read_to_string(marker(&db)).unwrap(), "boot-b");
    }

    #[test]
    fn the_same_boot_keeps_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let db = state_files(dir.path());
        std::fs::write(marker(&db), "boot-a\n").unwrap();
        let p = prepare(&db, Some("boot-a")).unwrap();
        assert_eq!(p, Prepared { durability: Durability::ThisBoot, discarded: false });
        assert!(db.exists() && suffixed(&db, "-wal").exists());
    }

    #[test]
    fn a_state_without_marker_was_synced_and_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let db = state_files(dir.path());
        let p = prepare(&db, Some("boot-a")).unwrap();
        assert_eq!(p, Prepared { durability: Durability::ThisBoot, discarded: false });
        assert!(db.exists());
        assert_eq!(std::fs::read_to_string(marker(&db)).unwrap(), "boot-a");
    }

    #[test]
    fn without_a_boot_id_checkpoints_fsync_and_an_unsynced_state_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let db = state_files(dir.path());
        let p = prepare(&db, None).unwrap();
        assert_eq!(p, Prepared { durability: Durability::Checkpoints, discarded: false });
        assert!(db.exists() && !marker(&db).exists());
        assert_eq!(p.durability.synchronous(), "NORMAL");

        std::fs::write(marker(&db), "boot-a").unwrap();
        let p = prepare(&db, None).unwrap();
        assert_eq!(p, Prepared { durability: Durability::Checkpoints, discarded: true });
        assert!(!db.exists() && !marker(&db).exists());
    }

    #[test]
    fn this_machine_has_a_boot_id() {
        // Debian's kernels publish it; the fast mode depends on it.
        assert!(current_boot_id().is_some_and(|id| id.len() >= 32));
    }
}
