//! The WAL archive of one stanza (one cluster): what `archive-push` and `archive-get` do.
//!
//! Objects are named `<wal name>-<sha256 of the uncompressed file>.<compression>`, so the
//! checksum travels with the object: a second push of the same file is recognised as done, a
//! push of different contents under the same name is refused, and a reader verifies what it
//! restores. `archive.info` pins the stanza to one database system identifier.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::compress::Compression;
use super::repo::Repository;
use super::wal::{self, WalName};
use super::BackupError;

/// Format of `archive.info`.
const INFO_FORMAT: u32 = 1;

/// Largest file the archive accepts or restores: the biggest WAL segment size PostgreSQL allows.
pub const MAX_OBJECT_BYTES: usize = 1 << 30;

/// What `archive.info` records about a stanza's archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveInfo {
    pub format: u32,
    /// The database system identifier (a string: it does not fit JSON's safe integers).
    pub system_identifier: String,
    /// PostgreSQL major version of the server that created the archive, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pg_major: Option<u32>,
    /// WAL segment size in bytes, from the first segment archived (16 MiB if not known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment_size: Option<u32>,
}

impl ArchiveInfo {
    /// The segment size, 16 MiB (PostgreSQL's default) when not recorded.
    pub fn segment_size(&self) -> u32 {
        self.segment_size.unwrap_or(16 << 20)
    }
}

/// How archive-push stores files.
#[derive(Debug, Clone, Copy)]
pub struct PushOptions {
    pub compression: Compression,
    /// zstd level (1 = fastest).
    pub level: i32,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions { compression: Compression::Zstd, level: 1 }
    }
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    /// Stored as `key`, `stored` bytes for `size` bytes of WAL.
    Archived { key: String, size: usize, stored: usize },
    /// The same contents were archived before (PostgreSQL retries after a crash between the
    /// copy and its own bookkeeping): nothing to do.
    AlreadyArchived { key: String },
}

/// One archived copy of a WAL file, as found by its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedObject {
    pub key: String,
    pub sha256: String,
    pub compression: Compression,
}

/// A stanza's WAL archive in a repository.
#[derive(Debug, Clone)]
pub struct Archive {
    repo: Repository,
    stanza: String,
}

/// Checks a stanza name: it becomes a directory of the repository.
pub fn check_stanza(stanza: &str) -> Result<(), BackupError> {
    let ok = !stanza.is_empty()
        && stanza.len() <= 128
        && !stanza.starts_with('.')
        && stanza.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(BackupError::BadStanza(stanza.to_string()))
    }
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Splits an object file name into the WAL name, the checksum and the compression.
fn parse_object_name(file: &str) -> Option<(&str, &str, Compression)> {
    let (stem, ext) = file.rsplit_once('.')?;
    let (name, sha) = stem.rsplit_once('-')?;
    let ok = sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    ok.then_some((name, sha, Compression::from_extension(ext)?))
}

impl Archive {
    /// The archive of `stanza` in `repo`.
    pub fn new(repo: Repository, stanza: &str) -> Result<Self, BackupError> {
        check_stanza(stanza)?;
        Ok(Archive { repo, stanza: stanza.to_string() })
    }

    fn top(&self) -> String {
        format!("{}/archive", self.stanza)
    }

    fn info_key(&self) -> String {
        format!("{}/archive.info", self.top())
    }

    /// The directory a WAL name's objects live in.
    fn dir_of(&self, parsed: &WalName, name: &str) -> String {
        match parsed.group(name) {
            Some(g) => format!("{}/{g}", self.top()),
            None => self.top(),
        }
    }

    /// `archive.info`, or None before the first push.
    pub async fn info(&self) -> Result<Option<ArchiveInfo>, BackupError> {
        let key = self.info_key();
        let Some(bytes) = self.repo.get(&key).await? else { return Ok(None) };
        let info: ArchiveInfo = serde_json::from_slice(&bytes)
            .map_err(|e| BackupError::BadInfo { key: key.clone(), why: e.to_string() })?;
        if info.format != INFO_FORMAT {
            return Err(BackupError::BadInfo { key, why: format!("format {} is not {INFO_FORMAT}", info.format) });
        }
        Ok(Some(info))
    }

    /// Refuses a system identifier other than the archive's; creates `archive.info` (and the
    /// repository's format marker) on the first push.
    async fn admit(
        &self,
        name: &str,
        sysid: Option<u64>,
        pg_major: Option<u32>,
        segment_size: Option<u32>,
    ) -> Result<(), BackupError> {
        match (self.info().await?, sysid) {
            (Some(info), Some(id)) if info.system_identifier != id.to_string() => Err(BackupError::SystemMismatch {
                name: name.to_string(),
                stanza: self.stanza.clone(),
                found: id,
                expected: info.system_identifier.parse().unwrap_or(0),
            }),
            (Some(_), _) => Ok(()),
            (None, Some(id)) => {
                self.repo.ensure_format().await?;
                let info =
                    ArchiveInfo { format: INFO_FORMAT, system_identifier: id.to_string(), pg_major, segment_size };
                let text = serde_json::to_vec_pretty(&info)
                    .map_err(|e| BackupError::BadInfo { key: self.info_key(), why: e.to_string() })?;
                tracing::info!(stanza = %self.stanza, system_identifier = id, "created the stanza's WAL archive");
                self.repo.put(&self.info_key(), text).await
            }
            (None, None) => Err(BackupError::BadInfo {
                key: self.info_key(),
                why: format!(
                    "missing, and {name} does not say which database system it belongs to; push a WAL segment \
                     first, or pass --pg-data so pg_control can tell"
                ),
            }),
        }
    }

    /// The archived copies of `name` (normally one).
    pub async fn find(&self, name: &str) -> Result<Vec<ArchivedObject>, BackupError> {
        let parsed = WalName::parse(name)?;
        let dir = self.dir_of(&parsed, name);
        let mut found = Vec::new();
        for file in self.repo.list(&dir).await? {
            if let Some((n, sha, compression)) = parse_object_name(&file) {
                if n == name {
                    found.push(ArchivedObject { key: format!("{dir}/{file}"), sha256: sha.to_string(), compression });
                }
            }
        }
        Ok(found)
    }

    /// archive-push: stores the WAL file at `path` durably. `pg_data` (PostgreSQL runs
    /// archive_command in PGDATA) supplies pg_control to check the file comes from this server.
    pub async fn push(
        &self,
        path: &Path,
        pg_data: Option<&Path>,
        opts: PushOptions,
    ) -> Result<PushOutcome, BackupError> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| BackupError::NotWalName { name: path.display().to_string(), why: "no file name" })?
            .to_string();
        let parsed = WalName::parse(&name)?;
        let (file, pg_data_owned) = (path.to_path_buf(), pg_data.map(Path::to_path_buf));
        let (data, seg_header, ctl_sysid, pg_major) =
            tokio::task::spawn_blocking(move || read_for_push(&file, &parsed, pg_data_owned))
                .await
                .map_err(|e| BackupError::Task(e.to_string()))??;
        let seg_sysid = seg_header.map(|h| h.system_identifier);
        if let (Some(seg), Some((ctl, pg_control))) = (seg_sysid, &ctl_sysid) {
            if seg != *ctl {
                return Err(BackupError::ForeignSegment {
                    name,
                    segment: seg,
                    control: *ctl,
                    pg_control: pg_control.clone(),
                });
            }
        }
        self.admit(&name, seg_sysid.or(ctl_sysid.map(|c| c.0)), pg_major, seg_header.map(|h| h.segment_size)).await?;

        // Hash and compress at once, on two threads: the push's latency is the longer of the two.
        let size = data.len();
        let (compression, level) = (opts.compression, opts.level);
        let (sha, packed) = tokio::task::spawn_blocking(move || {
            std::thread::scope(|scope| {
                let hasher = scope.spawn(|| sha256_hex(&data));
                let packed = compression.compress(&data, level);
                (hasher.join().map_err(|_| "the hashing thread panicked".to_string()), packed)
            })
        })
        .await
        .map_err(|e| BackupError::Task(e.to_string()))?;
        let sha = sha.map_err(BackupError::Task)?;
        let packed = packed.map_err(|source| BackupError::Compress { name: name.clone(), source })?;
        let existing = self.find(&name).await?;
        if let Some(same) = existing.iter().find(|o| o.sha256 == sha) {
            return Ok(PushOutcome::AlreadyArchived { key: same.key.clone() });
        }
        if let Some(other) = existing.first() {
            return Err(BackupError::ChecksumConflict {
                name,
                stanza: self.stanza.clone(),
                archived: other.sha256.clone(),
                local: sha,
            });
        }
        let stored = packed.len();
        let parsed = WalName::parse(&name)?;
        let key = format!("{}/{name}-{sha}.{}", self.dir_of(&parsed, &name), compression.extension());
        self.repo.put(&key, packed).await?;
        Ok(PushOutcome::Archived { key, size, stored })
    }

    /// Every archived object of the stanza with its WAL name, in name order.
    pub async fn list_all(&self) -> Result<Vec<(String, ArchivedObject)>, BackupError> {
        let mut dirs = vec![self.top()];
        for entry in self.repo.list(&self.top()).await? {
            if entry.len() == 16 && entry.bytes().all(|b| b.is_ascii_hexdigit()) {
                dirs.push(format!("{}/{entry}", self.top()));
            }
        }
        let mut out = Vec::new();
        for dir in dirs {
            for file in self.repo.list(&dir).await? {
                if let Some((name, sha, compression)) = parse_object_name(&file) {
                    let obj = ArchivedObject { key: format!("{dir}/{file}"), sha256: sha.to_string(), compression };
                    out.push((name.to_string(), obj));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Removes one archived object (expire).
    pub async fn remove(&self, obj: &ArchivedObject) -> Result<bool, BackupError> {
        self.repo.delete(&obj.key).await
    }

    /// The contents of the archived WAL file `name`, verified against its checksum; None if
    /// it was never archived.
    pub async fn fetch(&self, name: &str) -> Result<Option<Vec<u8>>, BackupError> {
        let Some(obj) = self.find(name).await?.into_iter().next() else { return Ok(None) };
        self.fetch_object(obj).await.map(Some)
    }

    /// The contents of one archived object, verified against its checksum.
    pub async fn fetch_object(&self, obj: ArchivedObject) -> Result<Vec<u8>, BackupError> {
        let packed = self
            .repo
            .get(&obj.key)
            .await?
            .ok_or_else(|| BackupError::Corrupt { key: obj.key.clone(), why: "listed but gone when read".into() })?;
        let key = obj.key.clone();
        tokio::task::spawn_blocking(move || {
            let data = obj
                .compression
                .decompress(&packed, MAX_OBJECT_BYTES)
                .map_err(|e| BackupError::Corrupt { key: key.clone(), why: format!("does not decompress: {e}") })?;
            let sha = sha256_hex(&data);
            if sha != obj.sha256 {
                return Err(BackupError::Corrupt {
                    key,
                    why: format!("its contents have sha256 {sha}, not {}", obj.sha256),
                });
            }
            Ok(data)
        })
        .await
        .map_err(|e| BackupError::Task(e.to_string()))?
    }

    /// archive-get: writes the archived WAL file `name` to `dest` (atomically: PostgreSQL must
    /// never read half a segment). Returns false if `name` was never archived.
    pub async fn get(&self, name: &str, dest: &Path) -> Result<bool, BackupError> {
        let Some(data) = self.fetch(name).await? else { return Ok(false) };
        let dest = dest.to_path_buf();
        tokio::task::spawn_blocking(move || write_restored(&dest, &data))
            .await
            .map_err(|e| BackupError::Task(e.to_string()))??;
        Ok(true)
    }
}

/// The file's bytes, its page header (segments only), and pg_control's
/// system identifier and PG_VERSION when `pg_data` has them.
#[allow(clippy::type_complexity)]
fn read_for_push(
    file: &Path,
    parsed: &WalName,
    pg_data: Option<PathBuf>,
) -> Result<(Vec<u8>, Option<wal::SegmentHeader>, Option<(u64, PathBuf)>, Option<u32>), BackupError> {
    let meta = std::fs::metadata(file).map_err(|e| BackupError::io("stat", file, e))?;
    if meta.len() > MAX_OBJECT_BYTES as u64 {
        return Err(BackupError::BadSegment {
            path: file.to_path_buf(),
            why: format!("{} bytes is too large", meta.len()),
        });
    }
    let data = std::fs::read(file).map_err(|e| BackupError::io("read", file, e))?;
    let header = if parsed.has_page_header() { Some(wal::parse_segment_header(file, &data)?) } else { None };
    let (mut ctl, mut pg_major) = (None, None);
    if let Some(dir) = pg_data {
        let pg_control = dir.join("global").join("pg_control");
        ctl = Some((wal::control_system_identifier(&dir)?, pg_control));
        pg_major = std::fs::read_to_string(dir.join("PG_VERSION")).ok().and_then(|v| v.trim().parse().ok());
    }
    Ok((data, header, ctl, pg_major))
}

fn write_restored(dest: &Path, data: &[u8]) -> Result<(), BackupError> {
    use std::io::Write;
    let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("wal");
    let tmp = dest.with_file_name(format!(".{name}.steward-tmp"));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(BackupError::io("write", &tmp, e));
    }
    std::fs::rename(&tmp, dest).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        BackupError::io("rename into place", dest, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYSID: u64 = 7_311_111_111_111_111_111;
    const SEG: u32 = 1 << 16;

    fn setup() -> (tempfile::TempDir, Archive, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let repo_dir = dir.path().join("repo");
        std::fs::create_dir(&repo_dir).unwrap();
        let repo = Repository::open(&repo_dir.display().to_string()).unwrap();
        let wal = dir.path().join("pg_wal");
        std::fs::create_dir(&wal).unwrap();
        (dir, Archive::new(repo, "cluster-1").unwrap(), wal)
    }

    fn write_segment(wal: &Path, name: &str, sysid: u64, fill: u8) -> PathBuf {
        let p = wal.join(name);
        std::fs::write(&p, wal::fake_segment(sysid, 1, SEG, fill)).unwrap();
        p
    }

    #[test]
    fn object_names() {
        let sha = "a".repeat(64);
        let f = format!("000000010000000000000001-{sha}.zst");
        assert_eq!(parse_object_name(&f), Some(("000000010000000000000001", sha.as_str(), Compression::Zstd)));
        assert_eq!(parse_object_name("00000002.history-abc.zst"), None);
        assert_eq!(parse_object_name(&format!("x-{sha}.gz")), None);
        assert!(check_stanza("ha-3f2db182b823").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            assert!(check_stanza(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn push_get_and_duplicates() {
        let (dir, archive, wal) = setup();
        let name = "000000010000000000000001";
        let seg = write_segment(&wal, name, SYSID, 0x11);
        let out = archive.push(&seg, None, PushOptions::default()).await.unwrap();
        let PushOutcome::Archived { key, size, stored } = out else { panic!("{out:?}") };
        assert!(key.starts_with("cluster-1/archive/0000000100000000/000000010000000000000001-"), "{key}");
        assert_eq!(size, SEG as usize);
        assert!(stored < size / 10, "a uniform segment must compress well: {stored}");
        assert_eq!(archive.info().await.unwrap().unwrap().system_identifier, SYSID.to_string());

        // the same file again: success, nothing written
        let again = archive.push(&seg, None, PushOptions::default()).await.unwrap();
        assert_eq!(again, PushOutcome::AlreadyArchived { key: key.clone() });
        // the same name with other contents: refused, the archived copy stays
        write_segment(&wal, name, SYSID, 0x22);
        let e = archive.push(&seg, None, PushOptions::default()).await.unwrap_err();
        assert!(matches!(e, BackupError::ChecksumConflict { .. }), "{e}");
        assert!(e.to_string().contains("already archived with different contents"), "{e}");
        assert_eq!(archive.find(name).await.unwrap().len(), 1);

        // get restores the first contents, atomically named
        let dest = dir.path().join("RECOVERYXLOG");
        assert!(archive.get(name, &dest).await.unwrap());
        assert_eq!(std::fs::read(&dest).unwrap(), wal::fake_segment(SYSID, 1, SEG, 0x11));
        // missing segment: false, nothing written
        let missing = dir.path().join("missing");
        assert!(!archive.get("000000010000000000000002", &missing).await.unwrap());
        assert!(!missing.exists());
        // lz4 and raw objects restore too
        for (i, c) in [Compression::Lz4, Compression::None].into_iter().enumerate() {
            let n = format!("00000001000000000000000{}", i + 3);
            let p = write_segment(&wal, &n, SYSID, 0x33);
            archive.push(&p, None, PushOptions { compression: c, level: 1 }).await.unwrap();
            assert!(archive.get(&n, &dest).await.unwrap());
            assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(&p).unwrap());
        }
        // names that are not WAL are refused before anything is read
        let e = archive.get("../../etc/passwd", &dest).await.unwrap_err();
        assert!(matches!(e, BackupError::NotWalName { .. }), "{e}");
    }

    #[tokio::test]
    async fn foreign_wal_is_refused() {
        let (_dir, archive, wal) = setup();
        let a = write_segment(&wal, "000000010000000000000001", SYSID, 0);
        archive.push(&a, None, PushOptions::default()).await.unwrap();
        let b = write_segment(&wal, "000000010000000000000002", SYSID + 1, 0);
        let e = archive.push(&b, None, PushOptions::default()).await.unwrap_err();
        assert!(matches!(e, BackupError::SystemMismatch { .. }), "{e}");
        assert!(archive.find("000000010000000000000002").await.unwrap().is_empty());

        // a segment whose header disagrees with PGDATA's pg_control
        let pg_data = wal.parent().unwrap().to_path_buf();
        std::fs::create_dir_all(pg_data.join("global")).unwrap();
        let mut control = vec![0u8; 8192];
        control[0..8].copy_from_slice(&(SYSID + 2).to_ne_bytes());
        std::fs::write(pg_data.join("global/pg_control"), control).unwrap();
        let c = write_segment(&wal, "000000010000000000000003", SYSID, 0);
        let e = archive.push(&c, Some(&pg_data), PushOptions::default()).await.unwrap_err();
        assert!(matches!(e, BackupError::ForeignSegment { .. }), "{e}");

        // a torn or non-WAL file
        let t = wal.join("000000010000000000000004");
        std::fs::write(&t, vec![0u8; 100]).unwrap();
        assert!(matches!(archive.push(&t, None, PushOptions::default()).await, Err(BackupError::BadSegment { .. })));
    }

    #[tokio::test]
    async fn history_files_need_a_known_system() {
        let (_dir, archive, wal) = setup();
        let h = wal.join("00000002.history");
        std::fs::write(&h, "1\t0/3000000\tno recovery target specified\n").unwrap();
        let e = archive.push(&h, None, PushOptions::default()).await.unwrap_err();
        assert!(e.to_string().contains("--pg-data"), "{e}");
        let s = write_segment(&wal, "000000010000000000000001", SYSID, 0);
        archive.push(&s, None, PushOptions::default()).await.unwrap();
        let out = archive.push(&h, None, PushOptions::default()).await.unwrap();
        let PushOutcome::Archived { key, .. } = out else { panic!() };
        assert!(key.starts_with("cluster-1/archive/00000002.history-"), "{key}");
        assert_eq!(archive.fetch("00000002.history").await.unwrap().unwrap(), std::fs::read(&h).unwrap());
    }

    #[tokio::test]
    async fn corruption_is_detected() {
        let (dir, archive, wal) = setup();
        let name = "000000010000000000000001";
        let seg = write_segment(&wal, name, SYSID, 0x5A);
        archive.push(&seg, None, PushOptions { compression: Compression::None, level: 1 }).await.unwrap();
        let key = archive.find(name).await.unwrap().remove(0).key;
        let path = dir.path().join("repo").join(&key);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[4096] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let e = archive.get(name, &dir.path().join("out")).await.unwrap_err();
        assert!(matches!(e, BackupError::Corrupt { .. }), "{e}");
        assert!(!dir.path().join("out").exists());

        let name2 = "000000010000000000000002";
        let seg2 = write_segment(&wal, name2, SYSID, 0x5A);
        archive.push(&seg2, None, PushOptions::default()).await.unwrap();
        let key2 = archive.find(name2).await.unwrap().remove(0).key;
        let path2 = dir.path().join("repo").join(&key2);
        let len = std::fs::metadata(&path2).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&path2).unwrap().set_len(len / 2).unwrap();
        let e = archive.get(name2, &dir.path().join("out")).await.unwrap_err();
        assert!(e.to_string().contains("does not decompress"), "{e}");
    }
}
