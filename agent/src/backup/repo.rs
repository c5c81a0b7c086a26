//! The backup repository: a flat key → bytes store with durable, atomic writes, so WAL
//! archiving and backups do not care where the bytes live. Keys are `/`-separated relative
//! paths of plain names. The POSIX backend (a local or NFS directory) is the default; the S3
//! backend ([`super::s3`]) keeps the same keys as objects in a bucket.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::s3::{S3Location, S3Repo};
use super::BackupError;

/// Version of the repository layout (docs/backup-format.md); kept in [`FORMAT_KEY`].
pub const FORMAT_VERSION: u32 = 1;

/// The file at the repository's root that names its layout version.
pub const FORMAT_KEY: &str = "steward-repo.json";

/// Where archived WAL and backups are kept.
#[derive(Debug, Clone)]
pub enum Repository {
    /// A directory on a local or network filesystem.
    Posix(PosixRepo),
    /// A bucket (and key prefix) of an S3-compatible object store.
    S3(S3Repo),
}

/// A repository location as written on the command line or in the agent's configuration,
/// checked for syntax only (nothing is touched), so the agent can refuse a bad one at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// An absolute directory path.
    Posix(PathBuf),
    /// An `s3://bucket/prefix?options` URL.
    S3(S3Location),
}

impl Location {
    /// Parses `location`: an absolute path, or an `s3://` URL (see [`super::s3`]).
    pub fn parse(location: &str) -> Result<Location, BackupError> {
        if location.starts_with("s3://") {
            return S3Location::parse(location).map(Location::S3);
        }
        let bad = |why: &str| BackupError::Repository { location: location.to_string(), why: why.to_string() };
        if let Some((scheme, _)) = location.split_once("://") {
            return Err(bad(&format!(
                "{scheme}:// repositories are not supported: use an absolute directory path or s3://bucket/prefix"
            )));
        }
        let root = PathBuf::from(location);
        if !root.is_absolute() {
            return Err(bad("must be an absolute path (or an s3:// URL)"));
        }
        Ok(Location::Posix(root))
    }
}

/// Runs blocking filesystem work off the async runtime.
async fn blocking<T, F>(f: F) -> Result<T, BackupError>
where
    F: FnOnce() -> Result<T, BackupError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(|e| BackupError::Task(e.to_string()))?
}

/// Checks that `key` is a relative path of plain names (letters, digits, `.`, `-`, `_`), so no
/// key can reach outside the repository.
pub fn check_key(key: &str) -> Result<(), BackupError> {
    let bad = |why| BackupError::BadKey { key: key.to_string(), why };
    if key.is_empty() {
        return Err(bad("empty"));
    }
    for part in key.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return Err(bad("empty, '.' or '..' path component"));
        }
        if !part.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
            return Err(bad("only letters, digits, '.', '-' and '_' are allowed in a component"));
        }
        if part.starts_with('.') {
            return Err(bad("components starting with '.' are reserved for temporary files"));
        }
    }
    Ok(())
}

impl Repository {
    /// Opens the repository at `location`: an absolute directory path that exists, or an
    /// `s3://` URL (credentials from the environment or the URL's credentials_file; no
    /// request is sent until the first operation).
    pub fn open(location: &str) -> Result<Self, BackupError> {
        let bad = |why: &str| BackupError::Repository { location: location.to_string(), why: why.to_string() };
        let root = match Location::parse(location)? {
            Location::S3(loc) => return S3Repo::open(loc).map(Repository::S3),
            Location::Posix(root) => root,
        };
        match fs::metadata(&root) {
            Ok(m) if m.is_dir() => Ok(Repository::Posix(PosixRepo { root })),
            Ok(_) => Err(bad("exists but is not a directory")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(bad(
                "does not exist: create it (writable by the user PostgreSQL runs as) or mount the shared storage there",
            )),
            Err(e) => Err(BackupError::io("stat", root, e)),
        }
    }

    /// The location as [`Repository::open`] takes it: for messages, and for the
    /// restore_command a restore writes (an S3 location never holds credentials).
    pub fn location(&self) -> String {
        match self {
            Repository::Posix(p) => p.root.display().to_string(),
            Repository::S3(s) => s.location().to_string(),
        }
    }

    /// Stores `data` under `key`, replacing what was there, atomically and durably: once this
    /// returns, the object survives a crash of this host, and a reader never sees half of it.
    pub async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), BackupError> {
        check_key(key)?;
        match self {
            Repository::Posix(p) => {
                let p = p.clone();
                let key = key.to_string();
                blocking(move || p.put(&key, &data)).await
            }
            Repository::S3(s) => s.put(key, data).await,
        }
    }

    /// Stores the contents of the local file `file` under `key`, as [`Repository::put`] does,
    /// without holding it in memory (large backup objects are made in a spool file first).
    pub async fn put_file(&self, key: &str, file: &Path) -> Result<(), BackupError> {
        check_key(key)?;
        match self {
            Repository::Posix(p) => {
                let (p, key, file) = (p.clone(), key.to_string(), file.to_path_buf());
                blocking(move || {
                    p.put_from(&key, &mut fs::File::open(&file).map_err(|e| BackupError::io("open", &file, e))?)
                })
                .await
            }
            Repository::S3(s) => s.put_file(key, file).await,
        }
    }

    /// The object under `key`, or None if there is none.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, BackupError> {
        check_key(key)?;
        match self {
            Repository::Posix(p) => {
                let path = p.path(key);
                blocking(move || match fs::read(&path) {
                    Ok(d) => Ok(Some(d)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(BackupError::io("read", path, e)),
                })
                .await
            }
            Repository::S3(s) => s.get(key).await,
        }
    }

    /// Names of the objects directly under `dir` ("" for the top), sorted; empty if there is
    /// no such directory. Temporary files of writes in progress are not listed.
    pub async fn list(&self, dir: &str) -> Result<Vec<String>, BackupError> {
        if !dir.is_empty() {
            check_key(dir)?;
        }
        match self {
            Repository::Posix(p) => {
                let path = if dir.is_empty() { p.root.clone() } else { p.path(dir) };
                blocking(move || {
                    let entries = match fs::read_dir(&path) {
                        Ok(e) => e,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                        Err(e) => return Err(BackupError::io("list", path, e)),
                    };
                    let mut names = Vec::new();
                    for e in entries {
                        let e = e.map_err(|e| BackupError::io("list", &path, e))?;
                        if let Some(n) = e.file_name().to_str().filter(|n| !n.starts_with('.')) {
                            names.push(n.to_string());
                        }
                    }
                    names.sort();
                    Ok(names)
                })
                .await
            }
            Repository::S3(s) => s.list(dir).await,
        }
    }

    /// Bytes of every object under `prefix` (a directory key).
    pub async fn size(&self, prefix: &str) -> Result<u64, BackupError> {
        check_key(prefix)?;
        match self {
            Repository::Posix(p) => {
                let root = p.path(prefix);
                blocking(move || {
                    let mut total = 0;
                    let mut stack = vec![root];
                    while let Some(dir) = stack.pop() {
                        let entries = match fs::read_dir(&dir) {
                            Ok(e) => e,
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                            Err(e) => return Err(BackupError::io("list", dir, e)),
                        };
                        for e in entries.flatten() {
                            match e.metadata() {
                                Ok(m) if m.is_dir() => stack.push(e.path()),
                                Ok(m) => total += m.len(),
                                Err(_) => {} // removed meanwhile
                            }
                        }
                    }
                    Ok(total)
                })
                .await
            }
            Repository::S3(s) => s.size(prefix).await,
        }
    }

    /// Removes the object under `key`; false if there was none.
    pub async fn delete(&self, key: &str) -> Result<bool, BackupError> {
        check_key(key)?;
        match self {
            Repository::Posix(p) => {
                let path = p.path(key);
                blocking(move || match fs::remove_file(&path) {
                    Ok(()) => {
                        sync_parent(&path)?;
                        Ok(true)
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                    Err(e) => Err(BackupError::io("remove", path, e)),
                })
                .await
            }
            Repository::S3(s) => s.delete(key).await,
        }
    }

    /// Makes sure the repository carries the layout version this code writes: writes
    /// [`FORMAT_KEY`] into an empty repository, refuses one of another version.
    pub async fn ensure_format(&self) -> Result<(), BackupError> {
        let want = serde_json::json!({ "format": FORMAT_VERSION });
        match self.get(FORMAT_KEY).await? {
            None => self.put(FORMAT_KEY, format!("{want}\n").into_bytes()).await,
            Some(bytes) => {
                let found: serde_json::Value = serde_json::from_slice(&bytes)
                    .map_err(|e| BackupError::BadInfo { key: FORMAT_KEY.into(), why: format!("not JSON ({e})") })?;
                if found["format"] == want["format"] {
                    Ok(())
                } else {
                    Err(BackupError::Repository {
                        location: self.location(),
                        why: format!(
                            "layout version {} is not {FORMAT_VERSION}, the one this steward-agent understands: \
                             use the steward-agent release that wrote it",
                            found["format"]
                        ),
                    })
                }
            }
        }
    }
}

/// The behaviour every backend must show, checked on an empty repository. The tests run it
/// against each backend (the POSIX one in this module, S3 against a real S3-compatible
/// server in the workspace's cross-component tests) so the backends cannot drift apart; it
/// returns what differed instead of panicking so it can live outside test code.
#[doc(hidden)]
pub async fn check_contract(repo: &Repository) -> Result<(), String> {
    macro_rules! ensure_eq {
        ($got:expr, $want:expr) => {{
            let got = $got;
            let want = $want;
            if got != want {
                return Err(format!("{}: got {got:?}, want {want:?}", stringify!($got)));
            }
        }};
    }
    let e = |e: BackupError| e.to_string();
    ensure_eq!(repo.get("a/b/c").await.map_err(e)?, None);
    ensure_eq!(repo.list("a/b").await.map_err(e)?, Vec::<String>::new());
    repo.put("a/b/c", b"one".to_vec()).await.map_err(e)?;
    repo.put("a/b/c", b"two".to_vec()).await.map_err(e)?;
    repo.put("a/b/d", vec![]).await.map_err(e)?;
    repo.put("a/x", b"x".to_vec()).await.map_err(e)?;
    repo.put("ab/y", b"yyyy".to_vec()).await.map_err(e)?;
    ensure_eq!(repo.get("a/b/c").await.map_err(e)?, Some(b"two".to_vec()));
    ensure_eq!(repo.get("a/b/d").await.map_err(e)?, Some(Vec::new()));
    ensure_eq!(repo.list("a/b").await.map_err(e)?, vec!["c", "d"]);
    // "directories" and objects side by side, as backup labels next to backup.info
    ensure_eq!(repo.list("a").await.map_err(e)?, vec!["b", "x"]);
    ensure_eq!(repo.list("").await.map_err(e)?, vec!["a", "ab"]);
    ensure_eq!(repo.size("a").await.map_err(e)?, 4);
    ensure_eq!(repo.size("ab").await.map_err(e)?, 4);
    ensure_eq!(repo.size("missing").await.map_err(e)?, 0);
    ensure_eq!(repo.delete("a/b/c").await.map_err(e)?, true);
    ensure_eq!(repo.delete("a/b/c").await.map_err(e)?, false);
    ensure_eq!(repo.get("a/b/c").await.map_err(e)?, None);
    ensure_eq!(repo.list("a/b").await.map_err(e)?, vec!["d"]);
    for bad in ["../escape", "a/.hidden", ""] {
        if repo.put(bad, vec![]).await.is_ok() {
            return Err(format!("key {bad:?} was accepted"));
        }
    }

    repo.ensure_format().await.map_err(e)?;
    repo.ensure_format().await.map_err(e)?;
    repo.put(FORMAT_KEY, b"{\"format\": 99}".to_vec()).await.map_err(e)?;
    match repo.ensure_format().await {
        Err(err) if err.to_string().contains("layout version 99") => {}
        other => return Err(format!("a repository of layout 99 was not refused: {other:?}")),
    }
    Ok(())
}

/// A repository in a directory.
#[derive(Debug, Clone)]
pub struct PosixRepo {
    root: PathBuf,
}

impl PosixRepo {
    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn put(&self, key: &str, mut data: &[u8]) -> Result<(), BackupError> {
        self.put_from(key, &mut data)
    }

    /// Write what `source` yields to a temporary file, fsync, rename into place, fsync the
    /// directory; directories created on the way are fsynced into their parents too.
    fn put_from(&self, key: &str, source: &mut dyn std::io::Read) -> Result<(), BackupError> {
        let path = self.path(key);
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        self.create_dirs(&dir)?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("object");
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let tmp = dir.join(format!(".{name}.{}.{nanos}.tmp", std::process::id()));
        let written = (|| {
            let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o640).open(&tmp)?;
            std::io::copy(source, &mut f)?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(BackupError::io("write", &tmp, e));
        }
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(BackupError::io("rename into place", &path, e));
        }
        sync_dir(&dir)
    }

    /// Creates `dir` and any missing parents below the root, each made durable in its parent.
    fn create_dirs(&self, dir: &Path) -> Result<(), BackupError> {
        if dir.is_dir() {
            return Ok(());
        }
        let rel = dir.strip_prefix(&self.root).unwrap_or(dir);
        let mut cur = self.root.clone();
        for part in rel.components() {
            let parent = cur.clone();
            cur.push(part);
            match fs::DirBuilder::new().mode(0o750).create(&cur) {
                Ok(()) => sync_dir(&parent)?,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(BackupError::io("create directory", &cur, e)),
            }
        }
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| BackupError::io("fsync", dir, e))
}

fn sync_parent(path: &Path) -> Result<(), BackupError> {
    match path.parent() {
        Some(p) => sync_dir(p),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_stay_inside() {
        for ok in ["a", "archive/x-1/00000001.history-ab.zst", "steward-repo.json"] {
            check_key(ok).unwrap();
        }
        for bad in ["", "/abs", "a//b", "../x", "a/../b", "a/./b", "a b", "a/.tmp", "a\\b", "a/"] {
            assert!(check_key(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[tokio::test]
    async fn posix_put_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Repository::open("relative/path").is_err());
        assert!(Repository::open("gs://bucket/prefix").unwrap_err().to_string().contains("not supported"));
        assert!(Repository::open(&dir.path().join("missing").display().to_string()).is_err());
        let repo = Repository::open(&dir.path().display().to_string()).unwrap();
        check_contract(&repo).await.unwrap();
        // no temporary files are left behind
        let left: Vec<_> = fs::read_dir(dir.path().join("a/b")).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("d")]);
    }

    #[test]
    fn locations_parse_without_touching_anything() {
        assert_eq!(Location::parse("/srv/repo").unwrap(), Location::Posix("/srv/repo".into()));
        assert!(matches!(Location::parse("s3://bkt/p?endpoint=http://127.0.0.1:9000"), Ok(Location::S3(_))));
        assert!(Location::parse("relative").unwrap_err().to_string().contains("absolute"));
        assert!(Location::parse("s3://?region=x").unwrap_err().to_string().contains("no bucket"));
    }
}
