//! Writing a whole file durably (temp file, fsync, rename, fsync of the directory), for the
//! files a node must find intact after a power loss: snapshots, their metadata, the state's boot
//! marker.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Bytes written between two fsyncs.
const SYNC_STEP: usize = 512 << 10;

/// Writes `bytes` to `path` durably: the old content or the new one survives a crash, never a
/// mix.
///
/// A snapshot is tens of MiB. Written whole and fsynced once, it queued that much in front of
/// the Raft log's own fsync, whose appends then stalled for 100-200 ms on every node that built
/// or received a snapshot. Here it is synced every [`SYNC_STEP`] bytes, and after each step the
/// writer rests as long as the step took: the disk stays free half of the time for the log,
/// whatever its speed, and a log fsync waits behind one step at most. A small file is one step
/// and no rest.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temp_path(path);
    let mut f = std::fs::File::create(&tmp)?;
    let steps = bytes.len().div_ceil(SYNC_STEP);
    for (i, step) in bytes.chunks(SYNC_STEP).enumerate() {
        let started = std::time::Instant::now();
        f.write_all(step)?;
        f.sync_data()?;
        if i + 1 < steps {
            std::thread::sleep(started.elapsed());
        }
    }
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// `path` with `.tmp` appended, so files that differ only in their extension never share one.
fn temp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".tmp");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_in_steps_and_replaces_the_old_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.db");
        std::fs::write(&path, b"old").unwrap();
        let bytes: Vec<u8> = (0..SYNC_STEP * 2 + 7).map(|i| i as u8).collect();
        write(&path, &bytes).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        write(&path, b"small").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"small");
        // Only the file itself is left.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
