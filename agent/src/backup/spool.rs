//! Asynchronous, parallel archive-push. PostgreSQL's archiver calls `archive_command` for one
//! file at a time and waits, so a slow push caps WAL throughput. With a spool directory, the
//! first call starts a background pusher that reads PostgreSQL's own queue — the `.ready` files
//! in `pg_wal/archive_status` — and pushes ahead, several files at once, marking each durable
//! one `<name>.ok` in the spool. Each `archive_command` call then only waits for its file's mark.
//!
//! Nothing is ever dropped: the queue is PostgreSQL's, which keeps every segment until
//! archive-push exits 0 for it, and a file is marked `.ok` only once it is durable in the
//! repository. A failed push leaves `<name>.error` with the message; the call for that file
//! reports it and fails, so PostgreSQL retries (and the next attempt pushes it again). The queue
//! depth (`.ready` files) is what the agent reports for alerting.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use nix::fcntl::{Flock, FlockArg};

use super::archive::{Archive, PushOptions};
use super::wal::WalName;
use super::BackupError;

/// How long one archive_command call waits for its file before failing (PostgreSQL retries).
pub const WAIT_FOR_PUSH: Duration = Duration::from_secs(120);

/// How long an idle pusher waits for new `.ready` files before it exits.
const PUSHER_IDLE: Duration = Duration::from_millis(1500);

/// Files the pusher looks ahead at per round, per process.
const LOOKAHEAD_PER_PROCESS: usize = 4;

/// The spool of one instance.
#[derive(Debug, Clone)]
pub struct Spool {
    pub dir: PathBuf,
}

impl Spool {
    fn ok(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.ok"))
    }

    fn error(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.error"))
    }

    fn lock_path(&self) -> PathBuf {
        self.dir.join("pusher.lock")
    }

    /// Takes the pusher lock: Some while no other pusher holds it (`wait`: block until then).
    fn lock(&self, wait: bool) -> Result<Option<Flock<std::fs::File>>, BackupError> {
        let path = self.lock_path();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| BackupError::io("open", &path, e))?;
        let arg = if wait { FlockArg::LockExclusive } else { FlockArg::LockExclusiveNonblock };
        match Flock::lock(file, arg) {
            Ok(l) => Ok(Some(l)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(BackupError::io("lock", &path, e.into())),
        }
    }
}

/// PostgreSQL's archive queue: names with a `.ready` file, history files first (as the
/// archiver orders them), then by name.
pub fn ready_files(pg_data: &Path) -> Result<Vec<String>, BackupError> {
    let dir = pg_data.join("pg_wal").join("archive_status");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(BackupError::io("list", &dir, e)),
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".ready")).map(str::to_string))
        .filter(|n| WalName::parse(n).is_ok())
        .collect();
    names.sort_by_key(|n| (!n.ends_with(".history"), n.clone()));
    Ok(names)
}

/// What archive_command runs in asynchronous mode: make sure a pusher runs, then wait for
/// `name` to be marked. `start_pusher` launches one (a detached `archive-push-queue` process).
pub async fn push_via_spool(
    spool: &Spool,
    name: &str,
    start_pusher: impl Fn() -> Result<(), BackupError>,
) -> Result<(), BackupError> {
    std::fs::create_dir_all(&spool.dir).map_err(|e| BackupError::io("create", &spool.dir, e))?;
    let deadline = Instant::now() + WAIT_FOR_PUSH;
    let mut next_check = Instant::now();
    loop {
        // The .ok mark stays until PostgreSQL has moved the file out of its queue (the pusher
        // then removes it), so the pusher never takes a file it already pushed for new work.
        if spool.ok(name).exists() {
            return Ok(());
        }
        if let Some(msg) = take_mark(&spool.error(name))? {
            return Err(BackupError::Refused(format!("asynchronous push of {name} failed: {msg}")));
        }
        if Instant::now() >= next_check {
            // No pusher holds the lock: start one (it takes the lock itself).
            if let Some(lock) = spool.lock(false)? {
                drop(lock);
                start_pusher()?;
            }
            next_check = Instant::now() + Duration::from_millis(500);
        }
        if Instant::now() >= deadline {
            return Err(BackupError::Refused(format!(
                "asynchronous push of {name} did not finish within {}s; see the pusher's errors in the PostgreSQL log",
                WAIT_FOR_PUSH.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

/// Removes the `.ok` marks of files no longer in PostgreSQL's queue (archived and acknowledged).
fn forget_done(spool: &Spool, ready: &[String]) -> Result<(), BackupError> {
    let queued: std::collections::HashSet<&str> = ready.iter().map(String::as_str).collect();
    let entries = std::fs::read_dir(&spool.dir).map_err(|e| BackupError::io("list", &spool.dir, e))?;
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(name) = file.to_str().and_then(|f| f.strip_suffix(".ok")) else { continue };
        if !queued.contains(name) {
            match std::fs::remove_file(e.path()) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(BackupError::io("remove", e.path(), err)),
            }
        }
    }
    Ok(())
}

/// Removes a mark file and returns its contents, or None if it is not there.
fn take_mark(path: &Path) -> Result<Option<String>, BackupError> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            std::fs::remove_file(path).map_err(|e| BackupError::io("remove", path, e))?;
            Ok(Some(text))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(BackupError::io("read", path, e)),
    }
}

fn write_mark(path: &Path, text: &str) -> Result<(), BackupError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| BackupError::io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| BackupError::io("rename", path, e))
}

/// The background pusher (`archive-push-queue`): pushes every queued file not yet marked, up
/// to `processes` at once, until the queue has been empty for a moment. Holds the spool lock,
/// so at most one runs per spool.
pub async fn run_pusher(
    archive: &Archive,
    pg_data: &Path,
    spool: &Spool,
    opts: PushOptions,
    processes: usize,
) -> Result<usize, BackupError> {
    std::fs::create_dir_all(&spool.dir).map_err(|e| BackupError::io("create", &spool.dir, e))?;
    let Some(_lock) = spool.lock(true)? else { return Ok(0) };
    let mut pushed = 0;
    let mut idle_since = Instant::now();
    loop {
        let ready = ready_files(pg_data)?;
        forget_done(spool, &ready)?;
        let queue: Vec<String> = ready
            .into_iter()
            .filter(|n| !spool.ok(n).exists() && !spool.error(n).exists())
            .take(processes.max(1) * LOOKAHEAD_PER_PROCESS)
            .collect();
        if queue.is_empty() {
            if idle_since.elapsed() >= PUSHER_IDLE {
                return Ok(pushed);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        // Each file is marked as soon as it is durable, not when the whole round is done.
        let mut results = stream::iter(queue)
            .map(|name| async move {
                let path = pg_data.join("pg_wal").join(&name);
                let r = archive.push(&path, Some(pg_data), opts).await.map(|_| ());
                (name, r)
            })
            .buffer_unordered(processes.max(1));
        while let Some((name, r)) = results.next().await {
            match r {
                Ok(()) => {
                    write_mark(&spool.ok(&name), "")?;
                    pushed += 1;
                }
                Err(e) => {
                    eprintln!("steward-agent archive-push-queue {name}: {e}");
                    write_mark(&spool.error(&name), &e.to_string())?;
                }
            }
        }
        idle_since = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_is_history_first_then_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let status = dir.path().join("pg_wal/archive_status");
        std::fs::create_dir_all(&status).unwrap();
        for n in [
            "000000020000000000000004.ready",
            "000000010000000000000003.partial.ready",
            "00000002.history.ready",
            "000000020000000000000005.done",
            "garbage.ready",
        ] {
            std::fs::write(status.join(n), "").unwrap();
        }
        assert_eq!(
            ready_files(dir.path()).unwrap(),
            vec!["00000002.history", "000000010000000000000003.partial", "000000020000000000000004"]
        );
        assert!(ready_files(&dir.path().join("missing")).unwrap().is_empty());
    }

    #[tokio::test]
    async fn marks_are_consumed_once() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool { dir: dir.path().join("spool") };
        std::fs::create_dir_all(&spool.dir).unwrap();
        write_mark(&spool.ok("000000010000000000000001"), "").unwrap();
        let started = std::sync::atomic::AtomicUsize::new(0);
        let start = || {
            started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        };
        push_via_spool(&spool, "000000010000000000000001", start).await.unwrap();
        assert!(spool.ok("000000010000000000000001").exists(), "kept until PostgreSQL dequeues the file");
        forget_done(&spool, &[]).unwrap();
        assert!(!spool.ok("000000010000000000000001").exists());
        write_mark(&spool.error("000000010000000000000002"), "disk full").unwrap();
        let e = push_via_spool(&spool, "000000010000000000000002", start).await.unwrap_err();
        assert!(e.to_string().contains("disk full"), "{e}");
        assert!(!spool.error("000000010000000000000002").exists(), "an error is reported once, then retried");
    }
}
