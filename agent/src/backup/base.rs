//! Taking a backup of a running primary: PostgreSQL's non-exclusive backup API around a
//! parallel copy of PGDATA into the repository, each file checksummed and compressed; an
//! incremental backup stores only the pages (or files) changed since the prior backup.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

use super::catalog::{self, MANIFEST_FILE};
use super::compress::Compression;
use super::manifest::{BackupKind, FileEntry, FileSource, Manifest, MANIFEST_FORMAT};
use super::pages;
use super::repo::Repository;
use super::BackupError;
use crate::pg::config::{LOG_DIR, STEWARD_CONF};
use crate::pg::{format_lsn, parse_lsn, Instance};

/// Directories whose contents are never backed up (PostgreSQL recreates or does not need them;
/// WAL comes from the archive), as pg_basebackup does.
pub const SKIP_CONTENTS: &[&str] = &[
    "pg_wal",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_stat_tmp",
    "pg_subtrans",
    LOG_DIR,
];

/// Files never backed up: server state of the running instance, recovery markers, and the
/// agent-managed `steward.conf` (the agent writes it anew for whatever instance is restored).
pub const SKIP_FILES: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "backup_label.old",
    "tablespace_map",
    "standby.signal",
    "recovery.signal",
    "current_logfiles",
    STEWARD_CONF,
];

/// How a backup is taken.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub kind: BackupKind,
    pub compression: Compression,
    /// zstd level.
    pub level: i32,
    /// Files copied at once.
    pub parallel: usize,
    /// Backing up a standby: its primary, asked to switch WAL segments so the segment that
    /// makes the backup consistent gets archived now rather than when it fills up.
    pub primary: Option<crate::pg::Upstream>,
    /// Backing up a standby: how long to wait for that segment to reach the archive.
    pub wal_wait: Duration,
    /// Files larger than this go through a spool file in bounded memory ([`STREAM_ABOVE`]).
    pub stream_above: u64,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            kind: BackupKind::Full,
            compression: Compression::Zstd,
            level: 1,
            parallel: 2,
            primary: None,
            wal_wait: Duration::from_secs(300),
            stream_above: STREAM_ABOVE,
        }
    }
}

/// Where PostgreSQL keeps the control file, which a standby backup copies last.
const PG_CONTROL: &str = "global/pg_control";

/// A value of a `backup_label` line such as `START TIMELINE: 1`.
fn label_field<'a>(label: &'a str, field: &str) -> Option<&'a str> {
    label.lines().find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')).map(str::trim))
}

/// Start segment and timeline from a `backup_label`:
/// `START WAL LOCATION: 0/2000028 (file 000000010000000000000002)` and `START TIMELINE: 1`.
fn label_start(label: &str) -> Option<(String, u32)> {
    let loc = label_field(label, "START WAL LOCATION")?;
    let file = loc.split_once("(file ")?.1.strip_suffix(')')?.to_string();
    let timeline = label_field(label, "START TIMELINE")?.parse().ok()?;
    Some((file, timeline))
}

/// Asks the primary to switch to a new WAL segment, as the replication role (granted
/// `pg_switch_wal`), so the segment a standby backup needs is archived promptly.
async fn request_wal_switch(primary: &crate::pg::Upstream) -> Result<(), String> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&primary.host)
        .port(primary.port)
        .user(crate::pg::REPLICATION_ROLE)
        .password(primary.password.as_bytes())
        .dbname(crate::pg::config::REPLICATION_ROLE_DATABASE)
        .application_name("steward-backup")
        .connect_timeout(Duration::from_secs(5));
    let (client, conn) = crate::pg::tls::connect(cfg).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client.batch_execute("SELECT pg_switch_wal()").await.map_err(|e| e.to_string())
}

/// One file found in PGDATA.
#[derive(Debug)]
pub(crate) struct Found {
    /// Relative to PGDATA.
    pub(crate) rel: String,
    mode: u32,
}

/// Lists PGDATA: directories, and the files to back up, sorted.
pub(crate) fn walk(pg_data: &Path) -> Result<(Vec<String>, Vec<Found>), BackupError> {
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    let mut stack = vec![(pg_data.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !rel.is_empty() => continue, // dropped meanwhile
            Err(e) => return Err(BackupError::io("list", &dir, e)),
        };
        for e in entries {
            let e = e.map_err(|e| BackupError::io("list", &dir, e))?;
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                return Err(BackupError::Refused(format!("{}: a file name that is not UTF-8", dir.display())));
            };
            let path = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
            let meta = match std::fs::symlink_metadata(e.path()) {
                Ok(m) => m,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(BackupError::io("stat", e.path(), err)),
            };
            if meta.file_type().is_symlink() {
                return Err(BackupError::Refused(format!(
                    "{path} is a symbolic link: tablespaces and links in PGDATA are not supported by backups"
                )));
            }
            if meta.is_dir() {
                if name == "pgsql_tmp" {
                    continue;
                }
                dirs.push(path.clone());
                if !SKIP_CONTENTS.contains(&path.as_str()) {
                    stack.push((e.path(), path));
                }
            } else if meta.is_file() {
                let skip = (rel.is_empty() && SKIP_FILES.contains(&name.as_str()))
                    || name == "pg_internal.init"
                    || name.starts_with("pgsql_tmp")
                    || name.ends_with(".steward-tmp");
                if !skip {
                    files.push(Found { rel: path, mode: meta.permissions().mode() & 0o7777 });
                }
            }
        }
    }
    dirs.sort();
    files.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok((dirs, files))
}

/// Files larger than this are read, hashed and compressed a chunk at a time through a spool
/// file instead of in memory (relation segments grow to 1 GiB).
pub const STREAM_ABOVE: u64 = 64 << 20;

/// What one read of a streamed file takes (a whole number of pages).
const CHUNK: usize = 1 << 20;

/// An object to store: in memory, or made in a spool file (removed once stored).
enum Object {
    Bytes(Vec<u8>),
    Spooled(PathBuf),
}

/// What the backup stores for one file, decided off the async runtime.
enum Prepared {
    /// Vanished during the backup (a dropped relation): WAL replay accounts for it.
    Gone,
    Entry {
        entry: FileEntry,
        object: Option<(String, Object)>,
    },
}

struct FileJob {
    found: Found,
    abs: PathBuf,
    /// Where large files' objects are made, and what counts as large.
    spool: PathBuf,
    stream_above: u64,
    index: usize,
    dir: String,
    prior: Option<FileEntry>,
    since_lsn: u64,
    block_size: usize,
    compression: Compression,
    level: i32,
}

fn prepare(job: FileJob) -> Result<Prepared, BackupError> {
    match std::fs::metadata(&job.abs) {
        Ok(m) if m.len() > job.stream_above => return prepare_streamed(job),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Prepared::Gone),
        Err(e) => return Err(BackupError::io("stat", &job.abs, e)),
    }
    let data = match std::fs::read(&job.abs) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Prepared::Gone),
        Err(e) => return Err(BackupError::io("read", &job.abs, e)),
    };
    let sha256 = hex::encode(Sha256::digest(&data));
    let size = data.len() as u64;
    let entry =
        |source| FileEntry { path: job.found.rel.clone(), size, sha256: sha256.clone(), mode: job.found.mode, source };
    if let Some(prior) = &job.prior {
        if prior.sha256 == sha256 && prior.size == size {
            return Ok(Prepared::Entry { entry: entry(FileSource::Prior), object: None });
        }
        if pages::is_relation_main_fork(&job.found.rel) && job.block_size > 0 {
            let prior_pages = prior.size / job.block_size as u64;
            let changed = pages::changed_pages(&data, job.block_size, prior_pages, job.since_lsn);
            let total = data.len().div_ceil(job.block_size);
            if changed.len() * 2 < total {
                let delta = pages::encode(&data, job.block_size, &changed);
                let packed = job
                    .compression
                    .compress(&delta, job.level)
                    .map_err(|source| BackupError::Compress { name: job.found.rel.clone(), source })?;
                let key = format!("{}/{:06}.pages.{}", job.dir, job.index, job.compression.extension());
                let source = FileSource::Pages {
                    key: key.clone(),
                    compression: job.compression,
                    stored_bytes: packed.len() as u64,
                    pages: changed.len() as u32,
                };
                return Ok(Prepared::Entry { entry: entry(source), object: Some((key, Object::Bytes(packed))) });
            }
        }
    }
    let packed = job
        .compression
        .compress(&data, job.level)
        .map_err(|source| BackupError::Compress { name: job.found.rel.clone(), source })?;
    let key = format!("{}/{:06}.{}", job.dir, job.index, job.compression.extension());
    let source =
        FileSource::Whole { key: key.clone(), compression: job.compression, stored_bytes: packed.len() as u64 };
    Ok(Prepared::Entry { entry: entry(source), object: Some((key, Object::Bytes(packed))) })
}

/// Reads everything from `inner`, hashing and counting it on the way.
struct Hashing<R> {
    inner: R,
    sha: Sha256,
    bytes: u64,
}

impl<R: std::io::Read> std::io::Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// [`prepare`] for a large file, in bounded memory: one read that hashes it (and, for a
/// relation with a prior backup, writes its changed pages to a spool file), then, unless it is
/// unchanged or the changed pages make a small enough delta, a second read that hashes and
/// compresses it whole into a spool file. Each entry's checksum comes from the same read as
/// what is stored.
fn prepare_streamed(job: FileJob) -> Result<Prepared, BackupError> {
    use std::io::{BufWriter, Read, Write};
    let open = |path: &Path| match std::fs::File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(BackupError::io("read", path, e)),
    };
    let spool_io = |path: &Path, e: std::io::Error| BackupError::io("write", path, e);
    let ext = job.compression.extension();
    if let Some(prior) = &job.prior {
        let delta = pages::is_relation_main_fork(&job.found.rel) && job.block_size > 0;
        let raw_path = job.spool.join(format!("{:06}.pages.raw", job.index));
        let Some(mut file) = open(&job.abs)? else { return Ok(Prepared::Gone) };
        let mut raw = if delta {
            let f = std::fs::File::create(&raw_path).map_err(|e| spool_io(&raw_path, e))?;
            Some(BufWriter::with_capacity(CHUNK, f))
        } else {
            None
        };
        let (bs, prior_pages) = (job.block_size.max(1), prior.size / job.block_size.max(1) as u64);
        let mut sha = Sha256::new();
        let (mut size, mut page_no, mut changed) = (0u64, 0u64, 0u32);
        let mut buf = vec![0u8; CHUNK - CHUNK % bs];
        loop {
            // Fill the buffer (short reads happen) so pages never straddle two reads.
            let mut n = 0;
            while n < buf.len() {
                match file.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) => return Err(BackupError::io("read", &job.abs, e)),
                }
            }
            if n == 0 {
                break;
            }
            sha.update(&buf[..n]);
            size += n as u64;
            if let Some(out) = raw.as_mut() {
                for page in buf[..n].chunks(bs) {
                    if pages::changed(page, page_no, bs, prior_pages, job.since_lsn) {
                        // Only a partial last page needs padding to a whole page.
                        let pad = vec![0u8; bs - page.len()];
                        (|| {
                            out.write_all(&(page_no as u32).to_le_bytes())?;
                            out.write_all(page)?;
                            out.write_all(&pad)
                        })()
                        .map_err(|e| spool_io(&raw_path, e))?;
                        changed += 1;
                    }
                    page_no += 1;
                }
            }
            if n < buf.len() {
                break;
            }
        }
        let sha256 = hex::encode(sha.finalize());
        let entry = |source| FileEntry {
            path: job.found.rel.clone(),
            size,
            sha256: sha256.clone(),
            mode: job.found.mode,
            source,
        };
        let raw_done = raw.map(|w| w.into_inner().map_err(|e| spool_io(&raw_path, e.into_error())));
        if prior.sha256 == sha256 && prior.size == size {
            let _ = std::fs::remove_file(&raw_path);
            return Ok(Prepared::Entry { entry: entry(FileSource::Prior), object: None });
        }
        if let Some(raw_file) = raw_done {
            drop(raw_file?);
            if u64::from(changed) * 2 < page_no {
                let key = format!("{}/{:06}.pages.{ext}", job.dir, job.index);
                let packed = job.spool.join(format!("{:06}.pages.{ext}", job.index));
                let header = pages::header(bs, size, changed);
                let mut src = (&header[..]).chain(std::fs::File::open(&raw_path).map_err(|e| spool_io(&raw_path, e))?);
                let stored = compress_to(&mut src, &packed, &job)?;
                let _ = std::fs::remove_file(&raw_path);
                let source = FileSource::Pages {
                    key: key.clone(),
                    compression: job.compression,
                    stored_bytes: stored,
                    pages: changed,
                };
                return Ok(Prepared::Entry { entry: entry(source), object: Some((key, Object::Spooled(packed))) });
            }
            let _ = std::fs::remove_file(&raw_path);
        }
    }
    let Some(file) = open(&job.abs)? else { return Ok(Prepared::Gone) };
    let key = format!("{}/{:06}.{ext}", job.dir, job.index);
    let packed = job.spool.join(format!("{:06}.{ext}", job.index));
    let mut src = Hashing { inner: std::io::BufReader::with_capacity(CHUNK, file), sha: Sha256::new(), bytes: 0 };
    let stored = compress_to(&mut src, &packed, &job)?;
    let entry = FileEntry {
        path: job.found.rel.clone(),
        size: src.bytes,
        sha256: hex::encode(src.sha.finalize()),
        mode: job.found.mode,
        source: FileSource::Whole { key: key.clone(), compression: job.compression, stored_bytes: stored },
    };
    Ok(Prepared::Entry { entry, object: Some((key, Object::Spooled(packed))) })
}

/// Compresses what `src` yields into the spool file `packed`; returns its size.
fn compress_to(src: &mut dyn std::io::Read, packed: &Path, job: &FileJob) -> Result<u64, BackupError> {
    let out = std::fs::File::create(packed).map_err(|e| BackupError::io("write", packed, e))?;
    let mut out = std::io::BufWriter::with_capacity(CHUNK, out);
    job.compression
        .compress_stream(src, &mut out, job.level)
        .map_err(|source| BackupError::Compress { name: job.found.rel.clone(), source })?;
    let out = out.into_inner().map_err(|e| BackupError::io("write", packed, e.into_error()))?;
    Ok(out.metadata().map_err(|e| BackupError::io("stat", packed, e))?.len())
}

async fn query_one(
    client: &tokio_postgres::Client,
    action: &'static str,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<tokio_postgres::Row, BackupError> {
    client.query_one(sql, params).await.map_err(|source| BackupError::Sql { action, source })
}

/// Backs up `inst` (a running primary that archives its WAL into `repo` under `stanza`) and
/// returns the manifest, written last. An incremental backup without a prior backup of the
/// same system is taken as a full one.
pub async fn take(
    inst: &Instance,
    repo: &Repository,
    stanza: &str,
    opts: BackupOptions,
) -> Result<Manifest, BackupError> {
    super::archive::check_stanza(stanza)?;
    let started = Instant::now();
    let client = inst.superuser_client().await?;
    let pg_major = inst.binaries().major;
    let row = query_one(
        &client,
        "reading the server's identity",
        "SELECT system_identifier::text, pg_is_in_recovery(), current_setting('archive_mode'), \
         current_setting('block_size')::int, \
         (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size') FROM pg_control_system()",
        &[],
    )
    .await?;
    let (sysid, from_standby, archive_mode, block_size, segment_size): (String, bool, String, i32, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    if archive_mode == "off" {
        return Err(BackupError::Refused(
            "WAL archiving is off on this server, so a backup could never be restored: start the agent with --repo"
                .into(),
        ));
    }
    let prior = match opts.kind {
        BackupKind::Full => None,
        BackupKind::Incr => catalog::list(repo, stanza).await?.into_iter().rev().find(|m| m.system_identifier == sysid),
    };
    let kind = if prior.is_some() { opts.kind } else { BackupKind::Full };
    if opts.kind == BackupKind::Incr && prior.is_none() {
        tracing::info!(stanza, "no prior backup of this system: taking a full backup");
    }
    let started_at = chrono::Utc::now();
    let label = catalog::new_label(kind, prior.as_ref(), started_at);
    let dir = catalog::backup_dir(stanza, &label);
    if repo.list(&dir).await?.iter().any(|f| f == MANIFEST_FILE) {
        return Err(BackupError::Refused(format!("backup {label} exists already: wait a second and retry")));
    }

    // Start: a checkpoint (fast), then files may be copied while the server runs on.
    let start_sql = if pg_major >= 15 {
        "SELECT pg_backup_start($1, true)::text"
    } else {
        "SELECT pg_start_backup($1, true, false)::text"
    };
    let start_lsn_text: String = query_one(&client, "starting the backup", start_sql, &[&label]).await?.get(0);
    let start_lsn = parse_lsn(&start_lsn_text)
        .ok_or_else(|| BackupError::Refused(format!("PostgreSQL returned an unreadable start LSN {start_lsn_text}")))?;
    tracing::info!(stanza, %label, ?kind, start_lsn = %start_lsn_text, from_standby, "backup started");

    let pg_data = inst.spec().data_dir.clone();
    let walk_dir = pg_data.clone();
    let (directories, found) =
        tokio::task::spawn_blocking(move || walk(&walk_dir)).await.map_err(|e| BackupError::Task(e.to_string()))??;
    let since_lsn = prior.as_ref().and_then(|p| parse_lsn(&p.start_lsn)).unwrap_or(0);
    // Large files' objects are made here, next to PGDATA (the same disk, so the space is there).
    let spool = pg_data.parent().unwrap_or(&pg_data).join(format!(".backup-spool-{label}"));
    tokio::fs::create_dir_all(&spool).await.map_err(|e| BackupError::io("create", &spool, e))?;
    let jobs: Vec<FileJob> = found
        .into_iter()
        .enumerate()
        .map(|(index, found)| FileJob {
            abs: pg_data.join(&found.rel),
            spool: spool.clone(),
            stream_above: opts.stream_above,
            prior: prior.as_ref().and_then(|p| p.file(&found.rel).cloned()),
            found,
            index,
            dir: dir.clone(),
            since_lsn,
            block_size: usize::try_from(block_size).unwrap_or(8192),
            compression: opts.compression,
            level: opts.level,
        })
        .collect();
    let total = jobs.len();
    // From a standby, pg_control is copied after everything else: its minimum recovery point
    // then covers every page copied, and PostgreSQL replays at least that far on restore.
    let (jobs, last): (Vec<FileJob>, Vec<FileJob>) =
        jobs.into_iter().partition(|j| !(from_standby && j.found.rel == PG_CONTROL));
    let store = |job: FileJob| async move {
        let prepared =
            tokio::task::spawn_blocking(move || prepare(job)).await.map_err(|e| BackupError::Task(e.to_string()))??;
        match prepared {
            Prepared::Gone => Ok(None),
            Prepared::Entry { entry, object } => {
                match object {
                    Some((key, Object::Bytes(bytes))) => repo.put(&key, bytes).await?,
                    Some((key, Object::Spooled(file))) => {
                        let stored = repo.put_file(&key, &file).await;
                        let _ = tokio::fs::remove_file(&file).await;
                        stored?;
                    }
                    None => {}
                }
                Ok::<_, BackupError>(Some(entry))
            }
        }
    };
    let copied = async {
        let mut files: Vec<FileEntry> = stream::iter(jobs)
            .map(store)
            .buffer_unordered(opts.parallel.max(1))
            .try_filter_map(|e| async move { Ok(e) })
            .try_collect()
            .await?;
        for job in last {
            files.extend(store(job).await?);
        }
        Ok::<_, BackupError>(files)
    }
    .await;
    let _ = tokio::fs::remove_dir_all(&spool).await;
    let mut files = copied?;
    files.sort_by(|a, b| a.path.cmp(&b.path));

    // Stop: PostgreSQL waits until the WAL up to the stop position is archived.
    let stop_sql = if pg_major >= 15 {
        "SELECT lsn::text, labelfile, coalesce(spcmapfile, '') FROM pg_backup_stop(true)"
    } else {
        "SELECT lsn::text, labelfile, coalesce(spcmapfile, '') FROM pg_stop_backup(false, true)"
    };
    let row = query_one(&client, "stopping the backup", stop_sql, &[]).await?;
    let (stop_lsn_text, backup_label, spcmap): (String, String, String) = (row.get(0), row.get(1), row.get(2));
    if !spcmap.trim().is_empty() {
        return Err(BackupError::Refused("the server has tablespaces, which backups do not support".into()));
    }
    let unreadable = |what: &str| BackupError::Refused(format!("PostgreSQL returned an unreadable {what}"));
    let (start_wal, timeline) = label_start(&backup_label).ok_or_else(|| unreadable("backup_label"))?;
    let stop_lsn = parse_lsn(&stop_lsn_text).ok_or_else(|| unreadable("stop LSN"))?;
    let segment_size = u32::try_from(segment_size).map_err(|_| unreadable("wal_segment_size"))?;
    let stop_wal = super::wal::segment_before(timeline, stop_lsn, segment_size);
    if from_standby {
        // A standby's pg_backup_stop does not wait for the archive (its primary archives):
        // wait here until the segment that makes the backup consistent is there.
        wait_archived(repo, stanza, &stop_wal, &opts).await?;
    }
    let stopped_at = chrono::Utc::now();
    let size_bytes = files.iter().map(|f| f.size).sum();
    let stored_bytes = files
        .iter()
        .map(|f| match &f.source {
            FileSource::Whole { stored_bytes, .. } | FileSource::Pages { stored_bytes, .. } => *stored_bytes,
            FileSource::Prior => 0,
        })
        .sum();
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        label: label.clone(),
        kind,
        prior: prior.map(|p| p.label),
        system_identifier: sysid,
        pg_major,
        block_size: u32::try_from(block_size).unwrap_or(8192),
        timeline,
        start_lsn: format_lsn(start_lsn),
        stop_lsn: stop_lsn_text,
        start_wal,
        stop_wal,
        started_at: started_at.to_rfc3339(),
        stopped_at: stopped_at.to_rfc3339(),
        backup_label,
        directories,
        files,
        size_bytes,
        stored_bytes,
        from_standby,
    };
    let text = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| BackupError::BadManifest { label: label.clone(), why: e.to_string() })?;
    repo.put(&format!("{dir}/{MANIFEST_FILE}"), text).await?;
    tracing::info!(stanza, %label, ?kind, files = total, size_bytes, stored_bytes,
        elapsed_ms = started.elapsed().as_millis() as u64, "backup finished");
    Ok(manifest)
}

/// Waits until `segment` is in the stanza's archive, asking the primary (if known) to switch
/// segments every few seconds meanwhile.
async fn wait_archived(
    repo: &Repository,
    stanza: &str,
    segment: &str,
    opts: &BackupOptions,
) -> Result<(), BackupError> {
    let archive = super::archive::Archive::new(repo.clone(), stanza)?;
    let deadline = Instant::now() + opts.wal_wait;
    let mut asked: Option<Instant> = None;
    loop {
        if !archive.find(segment).await?.is_empty() {
            return Ok(());
        }
        if let Some(primary) = &opts.primary {
            if asked.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                if let Err(e) = request_wal_switch(primary).await {
                    tracing::warn!(stanza, primary = %primary.endpoint(), error = %e, "asking the primary to switch WAL failed");
                }
                asked = Some(Instant::now());
            }
        }
        if Instant::now() >= deadline {
            return Err(BackupError::Refused(format!(
                "WAL segment {segment}, which this backup needs to be consistent, was not archived within {} s: \
                 check the primary's archiving (steward-agent info, steward_archive_* metrics) and retry",
                opts.wal_wait.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
