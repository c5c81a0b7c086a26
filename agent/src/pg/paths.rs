//! Filesystem chores around PGDATA: permission pre-checks that turn cryptic
//! PostgreSQL failures into actionable errors, owned private directories,
//! crash-safe file writes, and never-delete handling of leftovers.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{PgError, RunAs};

/// Longest accepted `<socket_dir>/.s.PGSQL.<port>` (sun_path is 108 bytes).
pub const MAX_SOCKET_PATH: usize = 100;

/// Runs blocking filesystem work off the async runtime.
pub async fn blocking<T, F>(f: F) -> Result<T, PgError>
where
    F: FnOnce() -> Result<T, PgError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(|e| PgError::Task(e.to_string()))?
}

/// Errors unless `path` is absolute: PostgreSQL programs run with cwd `/`.
pub fn require_absolute(what: &'static str, path: &Path) -> Result<(), PgError> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(PgError::RelativePath { what, path: path.to_path_buf() })
    }
}

/// Checks, top-down, that `run_as` can enter every existing ancestor of `path`
/// (missing ones will be created 0755 and are fine).
pub fn check_traversable(run_as: &RunAs, path: &Path) -> Result<(), PgError> {
    let mut ancestors: Vec<&Path> = path.ancestors().skip(1).collect();
    ancestors.reverse();
    for dir in ancestors {
        let meta = match fs::metadata(dir) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
            Err(e) => return Err(PgError::io("inspect", dir, e)),
        };
        if !run_as.can_enter(meta.uid(), meta.gid(), meta.mode()) {
            return Err(PgError::NotTraversable { user: run_as.name.clone(), path: dir.into() });
        }
    }
    Ok(())
}

/// The unix socket path PostgreSQL will create for `port`.
pub fn socket_path(socket_dir: &Path, port: u16) -> PathBuf {
    socket_dir.join(format!(".s.PGSQL.{port}"))
}

/// Errors if the socket path would not fit `sun_path`.
pub fn check_socket_path(socket_dir: &Path, port: u16) -> Result<(), PgError> {
    let path = socket_path(socket_dir, port);
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(PgError::SocketPathTooLong { path, len, max: MAX_SOCKET_PATH });
    }
    Ok(())
}

/// Creates `dir` (and missing parents) and makes it `mode`, owned by `run_as`.
pub fn ensure_owned_dir(dir: &Path, run_as: &RunAs, mode: u32) -> Result<(), PgError> {
    fs::create_dir_all(dir).map_err(|e| PgError::io("create directory", dir, e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
        .map_err(|e| PgError::io(format!("chmod {mode:o}"), dir, e))?;
    run_as.chown(dir)
}

/// True if `dir` is missing or has no entries.
pub fn is_missing_or_empty(dir: &Path) -> Result<bool, PgError> {
    match fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(PgError::io("list", dir, e)),
    }
}

/// Renames `path` to `<path>.failed-<unix-ts>[-n]` and returns the new name;
/// used instead of deleting anything that might hold data.
pub fn move_aside(path: &Path) -> Result<PathBuf, PgError> {
    let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let base = format!("{}.failed-{ts}", path.display());
    let mut target = PathBuf::from(&base);
    let mut n = 1;
    while target.exists() {
        target = PathBuf::from(format!("{base}-{n}"));
        n += 1;
    }
    fs::rename(path, &target).map_err(|e| PgError::io("move aside", path, e))?;
    tracing::warn!(from = %path.display(), to = %target.display(), "moved aside leftover directory");
    Ok(target)
}

/// Replaces `path` with `contents` atomically (tmp file, fsync, rename, fsync
/// dir), mode 0600 owned by `run_as`. Returns false if it already matched.
pub fn write_atomic(path: &Path, contents: &str, run_as: &RunAs) -> Result<bool, PgError> {
    match fs::read(path) {
        Ok(current) if current == contents.as_bytes() => return Ok(false),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(PgError::io("read", path, e)),
    }
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".steward-tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| PgError::io("create", &tmp, e))?;
    file.write_all(contents.as_bytes()).and_then(|()| file.sync_all()).map_err(|e| PgError::io("write", &tmp, e))?;
    drop(file);
    run_as.chown(&tmp)?;
    fs::rename(&tmp, path).map_err(|e| PgError::io("rename into place", path, e))?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent).and_then(|d| d.sync_all()).map_err(|e| PgError::io("fsync", parent, e))?;
    }
    Ok(true)
}

/// Removes the file `path` durably (fsyncing its directory); false if it was not there.
/// Only for marker files and the agent's own temporary files, never for data.
pub fn remove_file_if_exists(path: &Path) -> Result<bool, PgError> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(PgError::io("remove", path, e)),
    }
    if let Some(parent) = path.parent() {
        fs::File::open(parent).and_then(|d| d.sync_all()).map_err(|e| PgError::io("fsync", parent, e))?;
    }
    Ok(true)
}

/// Renames directory `from` to `to` (an empty directory at `to` is replaced)
/// and fsyncs the parent, so the switch survives a crash.
pub fn rename_dir_durably(from: &Path, to: &Path) -> Result<(), PgError> {
    fs::rename(from, to).map_err(|e| PgError::io(format!("rename {} to", from.display()), to, e))?;
    if let Some(parent) = to.parent() {
        fs::File::open(parent).and_then(|d| d.sync_all()).map_err(|e| PgError::io("fsync", parent, e))?;
    }
    Ok(())
}

/// Total size of the regular files below `dir` (errors count as 0), for logs.
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

/// Current length of a file (0 if missing), to later show only what was appended.
pub fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The last `max_lines` lines of `path` written after byte `from`, for error messages.
pub fn tail(path: &Path, from: u64, max_lines: usize) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = fs::File::open(path)?;
        let len = f.metadata()?.len();
        let start = if from <= len { from } else { 0 };
        let start = start.max(len.saturating_sub(64 * 1024));
        f.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let skip = lines.len().saturating_sub(max_lines);
            let out = lines[skip..].join("\n");
            if out.trim().is_empty() {
                "(log is empty)".into()
            } else {
                out
            }
        }
        Err(e) => format!("(could not read log: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_path_limit() {
        assert!(check_socket_path(Path::new("/run/steward"), 5432).is_ok());
        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(90)));
        let err = check_socket_path(&long, 5432).unwrap_err().to_string();
        assert!(err.contains("shorter socket directory"), "{err}");
    }

    #[test]
    fn atomic_write_reports_changes_and_tail_reads_new_lines() {
        let dir = tempfile::tempdir().unwrap();
        let me =
            RunAs { uid: nix::unistd::geteuid().as_raw(), gid: nix::unistd::getegid().as_raw(), name: "me".into() };
        let f = dir.path().join("a.conf");
        assert!(write_atomic(&f, "x = 1\n", &me).unwrap());
        assert!(!write_atomic(&f, "x = 1\n", &me).unwrap());
        assert!(write_atomic(&f, "x = 1\ny = 2\n", &me).unwrap());
        assert_eq!(fs::metadata(&f).unwrap().mode() & 0o777, 0o600);
        assert_eq!(tail(&f, 6, 10), "y = 2");
        assert_eq!(tail(&f, 0, 1), "y = 2");
    }

    #[test]
    fn move_aside_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("pgdata");
        fs::create_dir(&d).unwrap();
        fs::write(d.join("junk"), "x").unwrap();
        let moved = move_aside(&d).unwrap();
        assert!(!d.exists());
        assert!(moved.join("junk").exists());
        assert!(moved.to_string_lossy().contains("pgdata.failed-"));
    }
}
