//! Restoring a backup into a data directory, set up to recover from the WAL archive to the
//! latest WAL, a point in time or an LSN, and then to be promoted. Every file is rebuilt from
//! its backup chain and checked against the manifest's SHA-256 before it is written.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use futures::stream::{self, StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use super::catalog;
use super::manifest::{FileEntry, FileSource, Manifest};
use super::pages;
use super::repo::Repository;
use super::BackupError;
use crate::pg::config::sh_quote;
use crate::pg::RunAs;

/// Where recovery stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryTarget {
    /// Replay all archived WAL.
    Latest,
    /// Stop before the first commit after this time (RFC 3339, e.g. `2026-11-25T02:10:05Z`).
    Time(chrono::DateTime<chrono::FixedOffset>),
    /// Stop after this WAL position (e.g. `0/5000028`).
    Lsn(String),
}

/// Segments `archive-get` fetches ahead during a restore's recovery.
pub const PREFETCH: u16 = 4;

/// The prefetch spool of a restored PGDATA: a sibling directory, never inside it.
pub fn prefetch_spool(pg_data: &Path) -> PathBuf {
    let name = pg_data.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "pgdata".into());
    pg_data.with_file_name(format!("{name}.wal-prefetch"))
}

/// What to restore, and how.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The backup to restore; default: the newest one that finished before the target time
    /// (or the newest of all).
    pub label: Option<String>,
    pub target: RecoveryTarget,
    /// The steward-agent executable for `restore_command`.
    pub agent_exe: PathBuf,
    /// Files rebuilt at once.
    pub parallel: usize,
    /// Restore over an existing (stopped) PGDATA: keep files that already match the manifest,
    /// rewrite the others, remove what the backup does not have (WAL in pg_wal included).
    pub delta: bool,
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    pub label: String,
    pub files: usize,
    /// Bytes written.
    pub bytes: u64,
    /// Files of a delta restore that already matched and were kept.
    pub unchanged: usize,
}

/// SHA-256 (hex) of a file's contents, read through `buf`.
fn sha256_file(path: &Path, buf: &mut [u8]) -> Result<String, BackupError> {
    use std::io::Read;
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(path).map_err(|e| BackupError::io("read", path, e))?;
    loop {
        let n = file.read(buf).map_err(|e| BackupError::io("read", path, e))?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

/// Readies an existing PGDATA for a delta restore of `m`: removes files and directories the
/// backup does not have, the WAL in pg_wal and recovery leftovers, and returns the files that
/// already match the manifest (size and SHA-256).
fn tidy_for_delta(pg_data: &Path, m: &Manifest) -> Result<std::collections::HashSet<String>, BackupError> {
    let (dirs, files) = super::base::walk(pg_data)?;
    let keep_dirs: std::collections::HashSet<&str> = m.directories.iter().map(String::as_str).collect();
    // deepest first, so a removed parent never hides a child from this loop
    for d in dirs.iter().rev() {
        if !keep_dirs.contains(d.as_str()) {
            let p = pg_data.join(d);
            if p.exists() {
                std::fs::remove_dir_all(&p).map_err(|e| BackupError::io("remove", &p, e))?;
            }
        }
    }
    let mut unchanged = std::collections::HashSet::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let p = pg_data.join(&f.rel);
        if !p.exists() {
            continue; // inside a directory removed above
        }
        let Some(entry) = m.file(&f.rel) else {
            std::fs::remove_file(&p).map_err(|e| BackupError::io("remove", &p, e))?;
            continue;
        };
        let len = std::fs::metadata(&p).map_err(|e| BackupError::io("stat", &p, e))?.len();
        if len != entry.size {
            continue;
        }
        if sha256_file(&p, &mut buf)? == entry.sha256 {
            unchanged.insert(f.rel);
        }
    }
    for dir in ["pg_wal/archive_status", "pg_wal"] {
        for e in std::fs::read_dir(pg_data.join(dir)).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_file()) {
                std::fs::remove_file(e.path()).map_err(|err| BackupError::io("remove", e.path(), err))?;
            }
        }
    }
    for name in
        ["backup_label", "backup_label.old", "recovery.signal", "standby.signal", "tablespace_map", "postmaster.opts"]
    {
        let p = pg_data.join(name);
        if p.exists() {
            std::fs::remove_file(&p).map_err(|e| BackupError::io("remove", &p, e))?;
        }
    }
    Ok(unchanged)
}

/// Picks the backup to restore for `opts`.
fn choose<'a>(
    all: &'a [Manifest],
    repo: &Repository,
    stanza: &str,
    opts: &RestoreOptions,
) -> Result<&'a Manifest, BackupError> {
    if let Some(label) = &opts.label {
        return all
            .iter()
            .find(|m| &m.label == label)
            .ok_or_else(|| BackupError::Refused(format!("stanza {stanza} has no complete backup {label}")));
    }
    let fits = |m: &Manifest| match &opts.target {
        RecoveryTarget::Time(t) => chrono::DateTime::parse_from_rfc3339(&m.stopped_at).is_ok_and(|s| s <= *t),
        _ => true,
    };
    all.iter().rev().find(|m| fits(m)).ok_or_else(|| {
        BackupError::Refused(format!(
            "stanza {stanza} has no complete backup{} in repository {}",
            if matches!(opts.target, RecoveryTarget::Time(_)) { " that finished before the target time" } else { "" },
            repo.location()
        ))
    })
}

/// A stored object: its key, compression and bytes as stored.
type Object = (String, super::Compression, Vec<u8>);

/// The objects `f` of `chain[0]` is rebuilt from: the whole file, then the page deltas to lay
/// over it, oldest first.
async fn fetch_objects(
    repo: &Repository,
    chain: &[Manifest],
    f: &FileEntry,
) -> Result<(Object, Vec<Object>), BackupError> {
    let (base, deltas) = sources(chain, &f.path)?;
    let get = |(key, c): (String, super::Compression)| async move {
        let bytes =
            repo.get(&key).await?.ok_or_else(|| BackupError::Corrupt { key: key.clone(), why: "missing".into() })?;
        Ok::<_, BackupError>((key, c, bytes))
    };
    let base = get(base).await?;
    let mut out = Vec::new();
    for d in deltas {
        out.push(get(d).await?);
    }
    Ok((base, out))
}

/// Writes one file from its objects: the whole-file object streamed (bounded memory) with the
/// deltas' pages merged in on the way, hashed as it is written, and checked for size and
/// SHA-256 against the manifest before it counts as restored.
fn restore_file(
    path: &Path,
    f: &FileEntry,
    base: &Object,
    deltas: &[Object],
    run_as: &RunAs,
) -> Result<(), BackupError> {
    use std::io::Read;
    let corrupt = |key: &str, why: String| BackupError::Corrupt { key: key.to_string(), why };
    let unpacked: Vec<Vec<u8>> = deltas
        .iter()
        .map(|(key, compression, packed)| {
            compression
                .decompress(packed, super::archive::MAX_OBJECT_BYTES * 2)
                .map_err(|e| corrupt(key, format!("does not decompress: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let overlay = if unpacked.is_empty() {
        None
    } else {
        let last_key = deltas.last().map(|d| d.0.as_str()).unwrap_or_default();
        Some(pages::Overlay::new(&unpacked).map_err(|why| corrupt(last_key, why))?)
    };
    let mut file = create_private(path)?;
    let (key, compression, packed) = base;
    let mut reader = compression.reader(packed).map_err(|e| corrupt(key, format!("does not decompress: {e}")))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0u64;
    let mut base_done = false;
    loop {
        // Fill the buffer from the base (zeros once it ends), cut at the rebuilt size.
        let want = match &overlay {
            Some(o) => (o.size().saturating_sub(written)).min(buf.len() as u64) as usize,
            None => buf.len(),
        };
        let mut n = 0;
        while n < want && !base_done {
            match reader.read(&mut buf[n..want]).map_err(|e| corrupt(key, format!("does not decompress: {e}")))? {
                0 => base_done = true,
                k => n += k,
            }
        }
        if let Some(o) = &overlay {
            buf[n..want].fill(0);
            n = want;
            o.apply(&mut buf[..n], written);
        }
        if n == 0 {
            break;
        }
        written += n as u64;
        if written > super::archive::MAX_OBJECT_BYTES as u64 * 2 {
            return Err(corrupt(key, "decompresses to more than 2 GiB".into()));
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).map_err(|e| BackupError::io("write", path, e))?;
    }
    let sha = hex::encode(hasher.finalize());
    if sha != f.sha256 || written != f.size {
        let _ = std::fs::remove_file(path);
        return Err(corrupt(
            &f.path,
            format!("rebuilt {written} bytes with sha256 {sha}, the manifest says {} bytes with {}", f.size, f.sha256),
        ));
    }
    drop(file);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(f.mode & 0o7777))
        .map_err(|e| BackupError::io("chmod", path, e))?;
    run_as.chown(path)?;
    Ok(())
}

/// Where the contents of `path` as of `chain[0]` come from: the whole-file object, then the
/// page deltas to lay over it, oldest first.
#[allow(clippy::type_complexity)]
fn sources(
    chain: &[Manifest],
    path: &str,
) -> Result<((String, super::Compression), Vec<(String, super::Compression)>), BackupError> {
    let mut deltas = Vec::new();
    let mut i = 0;
    loop {
        let m = chain.get(i).ok_or_else(|| BackupError::BadManifest {
            label: chain.first().map(|m| m.label.clone()).unwrap_or_default(),
            why: format!("{path} refers to a prior backup the chain does not have"),
        })?;
        let entry = m.file(path).ok_or_else(|| BackupError::BadManifest {
            label: m.label.clone(),
            why: format!("{path} is missing from a backup a later one refers to"),
        })?;
        match &entry.source {
            FileSource::Whole { key, compression, .. } => {
                deltas.reverse();
                return Ok(((key.clone(), *compression), deltas));
            }
            FileSource::Prior => i += 1,
            FileSource::Pages { key, compression, .. } => {
                deltas.push((key.clone(), *compression));
                i += 1;
            }
        }
    }
}

/// Rebuilds the contents of `path` as of `chain[0]`, in memory (verify).
async fn rebuild(repo: &Repository, chain: &[Manifest], path: &str) -> Result<Vec<u8>, BackupError> {
    let (base, deltas) = sources(chain, path)?;
    // Read the objects here; decompress, lay over and (in rebuild_checked) hash on a blocking
    // thread, so parallel rebuilds use every core.
    let get = |key: String| async move {
        repo.get(&key).await?.ok_or_else(|| BackupError::Corrupt { key: key.clone(), why: "missing".into() })
    };
    let base_packed = get(base.0.clone()).await?;
    let mut delta_packed = Vec::new();
    for (key, compression) in deltas {
        delta_packed.push((get(key.clone()).await?, key, compression));
    }
    tokio::task::spawn_blocking(move || {
        let unpack = |packed: &[u8], key: &str, c: super::Compression| {
            c.decompress(packed, super::archive::MAX_OBJECT_BYTES * 2)
                .map_err(|e| BackupError::Corrupt { key: key.to_string(), why: format!("does not decompress: {e}") })
        };
        let mut data = unpack(&base_packed, &base.0, base.1)?;
        for (packed, key, c) in delta_packed {
            let delta = unpack(&packed, &key, c)?;
            data = pages::apply(data, &delta).map_err(|why| BackupError::Corrupt { key, why })?;
        }
        Ok(data)
    })
    .await
    .map_err(|e| BackupError::Task(e.to_string()))?
}

/// The recovery settings appended to `postgresql.auto.conf` (later settings win).
/// `prefetch`: the spool for fetching the next segments ahead while recovery replays.
pub fn recovery_settings(
    exe: &Path,
    repo: &str,
    stanza: &str,
    target: &RecoveryTarget,
    prefetch: Option<&Path>,
) -> String {
    let mut get = format!(
        "{} archive-get --repo {} --stanza {}",
        sh_quote(&exe.to_string_lossy()).replace('%', "%%"),
        sh_quote(repo).replace('%', "%%"),
        sh_quote(stanza)
    );
    if let Some(dir) = prefetch {
        get.push_str(&format!(
            " --prefetch {PREFETCH} --spool {}",
            sh_quote(&dir.to_string_lossy()).replace('%', "%%")
        ));
    }
    get.push_str(" %f %p");
    let q = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "''"));
    let mut s = String::from("\n# steward-agent restore: recover from the WAL archive, then promote\n");
    s.push_str(&format!("restore_command = {}\n", q(&get)));
    match target {
        RecoveryTarget::Latest => {}
        RecoveryTarget::Time(t) => {
            s.push_str(&format!("recovery_target_time = {}\n", q(&t.format("%Y-%m-%d %H:%M:%S%.6f%:z").to_string())));
            s.push_str("recovery_target_inclusive = off\n");
        }
        RecoveryTarget::Lsn(l) => s.push_str(&format!("recovery_target_lsn = {}\n", q(l))),
    }
    if *target != RecoveryTarget::Latest {
        s.push_str("recovery_target_action = 'promote'\n");
    }
    s
}

/// Creates (or empties) `path`, readable and writable by its owner only until the restore sets
/// the file's own mode.
fn create_private(path: &Path) -> Result<std::fs::File, BackupError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| BackupError::io("create", path, e))
}

fn write_file(path: &Path, data: &[u8], mode: u32, run_as: &RunAs) -> Result<(), BackupError> {
    let mut f = create_private(path)?;
    // no fsync per file: the restore syncs the whole filesystem once at the end
    f.write_all(data).map_err(|e| BackupError::io("write", path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777))
        .map_err(|e| BackupError::io("chmod", path, e))?;
    run_as.chown(path)?;
    Ok(())
}

/// Restores a backup of `stanza` into `pg_data` (which must be missing or empty), owned by
/// `run_as`, with `recovery.signal` and the recovery settings in place: starting PostgreSQL
/// on it then replays the archive to the target and promotes. The caller writes the server's
/// own settings (`steward.conf`: port, sockets, archiving under the new cluster's stanza).
pub async fn restore(
    repo: &Repository,
    stanza: &str,
    pg_data: &Path,
    run_as: &RunAs,
    opts: &RestoreOptions,
) -> Result<RestoreReport, BackupError> {
    super::archive::check_stanza(stanza)?;
    if opts.delta {
        if !pg_data.join("PG_VERSION").is_file() {
            return Err(BackupError::Refused(format!(
                "{} holds no PostgreSQL data directory: a delta restore works over one; restore without --delta",
                pg_data.display()
            )));
        }
        if pg_data.join("postmaster.pid").exists() {
            return Err(BackupError::Refused(format!(
                "{} has a postmaster.pid: stop PostgreSQL before a delta restore (or remove the file if no server runs)",
                pg_data.display()
            )));
        }
    } else {
        match std::fs::read_dir(pg_data) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(BackupError::Refused(format!(
                        "{} is not empty: restore into a new directory (nothing there is overwritten), \
                         or pass --delta to restore over a stopped PostgreSQL data directory",
                        pg_data.display()
                    )));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(BackupError::io("inspect", pg_data, e)),
        }
    }
    let all = catalog::list(repo, stanza).await?;
    let top = choose(&all, repo, stanza, opts)?;
    let label = top.label.clone();
    let chain = catalog::chain(&all, top)?;
    tracing::info!(stanza, %label, chain = chain.len(), files = chain[0].files.len(), delta = opts.delta, "restoring backup");
    let unchanged = if opts.delta {
        let (dir, m) = (pg_data.to_path_buf(), chain[0].clone());
        tokio::task::spawn_blocking(move || tidy_for_delta(&dir, &m))
            .await
            .map_err(|e| BackupError::Task(e.to_string()))??
    } else {
        Default::default()
    };
    let unchanged = &unchanged;

    std::fs::create_dir_all(pg_data).map_err(|e| BackupError::io("create", pg_data, e))?;
    std::fs::set_permissions(pg_data, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| BackupError::io("chmod", pg_data, e))?;
    run_as.chown(pg_data)?;
    for d in &chain[0].directories {
        let p = pg_data.join(d);
        std::fs::create_dir_all(&p).map_err(|e| BackupError::io("create", &p, e))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| BackupError::io("chmod", &p, e))?;
        run_as.chown(&p)?;
    }
    for d in ["pg_wal", "pg_wal/archive_status"] {
        let p = pg_data.join(d);
        if !p.exists() {
            std::fs::create_dir_all(&p).map_err(|e| BackupError::io("create", &p, e))?;
            run_as.chown(&p)?;
        }
    }

    let chain = &chain;
    // Owned entries: a stream over borrowed ones makes this future unprovably Send to callers
    // that spawn it.
    let todo: Vec<FileEntry> = chain[0].files.iter().filter(|f| !unchanged.contains(&f.path)).cloned().collect();
    let bytes: u64 = stream::iter(todo)
        .map(|f: FileEntry| async move {
            let (base, deltas) = fetch_objects(repo, chain, &f).await?;
            let (size, path, run_as) = (f.size, pg_data.join(&f.path), run_as.clone());
            tokio::task::spawn_blocking(move || restore_file(&path, &f, &base, &deltas, &run_as))
                .await
                .map_err(|e| BackupError::Task(e.to_string()))??;
            Ok::<u64, BackupError>(size)
        })
        .buffer_unordered(opts.parallel.max(1))
        .try_fold(0u64, |acc, n| async move { Ok(acc + n) })
        .await?;

    write_file(&pg_data.join("backup_label"), chain[0].backup_label.as_bytes(), 0o600, run_as)?;
    write_file(&pg_data.join("recovery.signal"), b"", 0o600, run_as)?;
    let auto = pg_data.join("postgresql.auto.conf");
    let mut conf = std::fs::read_to_string(&auto).unwrap_or_default();
    // Prefetch spool next to PGDATA (same filesystem, so a prefetched segment is moved, not copied).
    let spool = prefetch_spool(pg_data);
    std::fs::create_dir_all(&spool).map_err(|e| BackupError::io("create", &spool, e))?;
    run_as.chown(&spool)?;
    conf.push_str(&recovery_settings(&opts.agent_exe, &repo.location(), stanza, &opts.target, Some(&spool)));
    write_file(&auto, conf.as_bytes(), 0o600, run_as)?;
    // One syncfs for every file and directory written: far cheaper than an fsync per file, and
    // nothing is reported restored before it is on disk.
    let dir = std::fs::File::open(pg_data).map_err(|e| BackupError::io("open", pg_data, e))?;
    nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir))
        .map_err(|e| BackupError::io("syncfs", pg_data, e.into()))?;
    let report =
        RestoreReport { label: chain[0].label.clone(), files: chain[0].files.len(), bytes, unchanged: unchanged.len() };
    tracing::info!(stanza, label = %report.label, files = report.files, bytes, "backup restored");
    Ok(report)
}

/// Rebuilds a file of `chain[0]` and checks it against the manifest's size and SHA-256.
pub async fn rebuild_checked(repo: &Repository, chain: &[Manifest], f: &FileEntry) -> Result<Vec<u8>, BackupError> {
    let data = rebuild(repo, chain, &f.path).await?;
    let (data, sha) = tokio::task::spawn_blocking(move || {
        let sha = hex::encode(Sha256::digest(&data));
        (data, sha)
    })
    .await
    .map_err(|e| BackupError::Task(e.to_string()))?;
    if sha != f.sha256 || data.len() as u64 != f.size {
        let label = chain.first().map(|m| m.label.as_str()).unwrap_or("");
        return Err(BackupError::Corrupt {
            key: format!("{label}/{}", f.path),
            why: format!(
                "rebuilt {} bytes with sha256 {sha}, the manifest says {} bytes with {}",
                data.len(),
                f.size,
                f.sha256
            ),
        });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_settings_render_targets() {
        let exe = Path::new("/usr/bin/steward-agent");
        let latest = recovery_settings(exe, "/srv/repo", "db-1", &RecoveryTarget::Latest, None);
        assert!(latest
            .contains("restore_command = '/usr/bin/steward-agent archive-get --repo /srv/repo --stanza db-1 %f %p'"));
        assert!(!latest.contains("recovery_target"));
        let t = chrono::DateTime::parse_from_rfc3339("2026-11-25T02:10:05.5+01:00").unwrap();
        let s = recovery_settings(exe, "/srv/repo", "db-1", &RecoveryTarget::Time(t), None);
        assert!(s.contains("recovery_target_time = '2026-11-25 02:10:05.500000+01:00'"), "{s}");
        assert!(s.contains("recovery_target_action = 'promote'"));
        let s = recovery_settings(exe, "/srv/repo", "db-1", &RecoveryTarget::Lsn("0/5000028".into()), None);
        assert!(s.contains("recovery_target_lsn = '0/5000028'"));
        let s =
            recovery_settings(exe, "/srv/repo", "db-1", &RecoveryTarget::Latest, Some(Path::new("/d/x.wal-prefetch")));
        assert!(
            s.contains("archive-get --repo /srv/repo --stanza db-1 --prefetch 4 --spool /d/x.wal-prefetch %f %p"),
            "{s}"
        );
        assert_eq!(prefetch_spool(Path::new("/srv/restore/pgdata")), Path::new("/srv/restore/pgdata.wal-prefetch"));
    }
}
