//! Prefetch for `archive-get`. Recovery asks for one segment at a time and replays it before it
//! asks for the next, so each request pays the repository's latency and the decompression. With a
//! spool directory, the call for segment N serves a copy fetched ahead of time if there is one,
//! and starts a background fetcher (`archive-get-queue`) for the next segments, which writes
//! verified copies into the spool. Copies older than the segment asked for are dropped.

use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::archive::Archive;
use super::wal::WalName;
use super::BackupError;

/// The `count` segment names after `name` on the same timeline, for segments of
/// `segment_size` bytes; empty for anything but a whole segment.
pub fn following(name: &str, count: u32, segment_size: u32) -> Vec<String> {
    let Ok(WalName::Segment { timeline, log, seg, partial: false }) = WalName::parse(name) else {
        return Vec::new();
    };
    let per_log = (0x1_0000_0000u64 / u64::from(segment_size.max(1))).max(1);
    let mut pos = u64::from(log) * per_log + u64::from(seg);
    let mut out = Vec::new();
    for _ in 0..count {
        pos += 1;
        let (l, s) = (pos / per_log, pos % per_log);
        let (Ok(l), Ok(s)) = (u32::try_from(l), u32::try_from(s)) else { break };
        out.push(format!("{timeline:08X}{l:08X}{s:08X}"));
    }
    out
}

/// Moves the prefetched copy of `name` to `dest` if there is one (true), and drops copies of
/// segments before it, which recovery has gone past.
pub fn take(dir: &Path, name: &str, dest: &Path) -> Result<bool, BackupError> {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let file = e.file_name();
        let Some(f) = file.to_str() else { continue };
        if WalName::parse(f).is_ok() && f < name {
            let _ = std::fs::remove_file(e.path());
        }
    }
    let copy = dir.join(name);
    if !copy.is_file() {
        return Ok(false);
    }
    match std::fs::rename(&copy, dest) {
        Ok(()) => Ok(true),
        Err(_) => {
            // another filesystem: copy, then drop the spool's copy
            std::fs::copy(&copy, dest).map_err(|e| BackupError::io("copy a prefetched segment to", dest, e))?;
            let _ = std::fs::remove_file(&copy);
            Ok(true)
        }
    }
}

/// The background fetcher: writes verified copies of `names` that are archived and not yet in
/// `dir`. One runs per spool at a time (it holds `prefetch.lock`); returns how many it fetched.
pub async fn fill(archive: &Archive, dir: &Path, names: &[String]) -> Result<usize, BackupError> {
    std::fs::create_dir_all(dir).map_err(|e| BackupError::io("create", dir, e))?;
    let lock_path = dir.join("prefetch.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| BackupError::io("open", &lock_path, e))?;
    let Ok(_lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
        return Ok(0); // another fetcher is at work
    };
    let mut fetched = 0;
    for name in names {
        let target = dir.join(name);
        if target.exists() {
            continue;
        }
        let Some(data) = archive.fetch(name).await? else {
            break; // not archived (yet): the rest will not be either
        };
        let tmp: PathBuf = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, &data).map_err(|e| BackupError::io("write", &tmp, e))?;
        std::fs::rename(&tmp, &target).map_err(|e| BackupError::io("rename", &target, e))?;
        fetched += 1;
    }
    Ok(fetched)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn following_segments_cross_log_boundaries() {
        assert_eq!(
            following("0000000200000000000000FE", 3, 16 << 20),
            vec!["0000000200000000000000FF", "000000020000000100000000", "000000020000000100000001"]
        );
        assert_eq!(following("000000010000000000000003", 1, 1 << 30), vec!["000000010000000100000000"]);
        assert!(following("00000002.history", 3, 16 << 20).is_empty());
        assert!(following("000000010000000000000003.partial", 3, 16 << 20).is_empty());
    }

    #[test]
    fn take_serves_a_copy_and_drops_older_ones() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        std::fs::create_dir(&spool).unwrap();
        for n in ["000000010000000000000001", "000000010000000000000002", "000000010000000000000003"] {
            std::fs::write(spool.join(n), n).unwrap();
        }
        let dest = dir.path().join("RECOVERYXLOG");
        assert!(take(&spool, "000000010000000000000002", &dest).unwrap());
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "000000010000000000000002");
        assert!(!spool.join("000000010000000000000001").exists(), "older copies are dropped");
        assert!(spool.join("000000010000000000000003").exists());
        assert!(!take(&spool, "000000010000000000000009", &dest).unwrap());
    }
}
