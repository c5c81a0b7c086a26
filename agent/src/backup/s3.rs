//! The S3 backend of the backup repository: the same keys as the POSIX layout, stored as
//! objects in a bucket of any S3-compatible service, so clusters without shared storage can
//! still archive WAL and keep backups off the host.
//!
//! Location syntax (docs/backup-format.md):
//! `s3://<bucket>[/<prefix>][?endpoint=URL&region=NAME&path_style=true|false&credentials_file=PATH]`.
//! Credentials never come from the location, because it ends up in `archive_command`, which
//! any database user can read in `pg_settings`: they come from `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`) in the environment, or from the
//! `credentials_file` named in the location.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, PutPayload, RetryConfig};

use super::BackupError;

/// Objects larger than this are uploaded in parts: one request of a 1 GiB body is slow to
/// retry and needs a long request timeout, and S3 caps a single PUT at 5 GiB.
pub const MULTIPART_THRESHOLD: usize = 64 << 20;

/// Size of each part of a multipart upload (S3 wants at least 5 MiB for all but the last).
const PART_SIZE: usize = 16 << 20;

/// How long connecting to the endpoint may take before the attempt counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Bound on one request, body included: at most a 64 MiB object or a 16 MiB part of a larger
/// one, even on a slow link.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Retries of failed requests stop once this much time has passed since the first attempt,
/// so an unreachable endpoint fails archive_command within about half a minute instead of
/// holding it (PostgreSQL retries a failed archive_command itself).
const RETRY_TIMEOUT: Duration = Duration::from_secs(25);

/// The query options a location may carry.
const OPTIONS: [&str; 4] = ["endpoint", "region", "path_style", "credentials_file"];

/// A parsed `s3://` location, without credentials: what the agent validates at start and
/// what [`S3Repo::open`] connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    /// The location as written (it never holds credentials), so a restore can write it into
    /// the restored server's restore_command.
    pub spec: String,
    /// The bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket ("" for the bucket's root), without slashes at its ends.
    pub prefix: String,
    /// Endpoint URL of an S3-compatible service; None for AWS itself.
    pub endpoint: Option<String>,
    /// Region the requests are signed for.
    pub region: String,
    /// Path-style requests (`endpoint/bucket/key`) instead of virtual-hosted ones
    /// (`bucket.endpoint/key`).
    pub path_style: bool,
    /// File with `AWS_ACCESS_KEY_ID=...` style lines, read instead of the environment.
    pub credentials_file: Option<PathBuf>,
}

/// Decodes `%XX` escapes of a query value.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn bool_option(name: &str, v: &str) -> Result<bool, String> {
    match v {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(format!("option {name} must be true or false, not {v:?}")),
    }
}

impl S3Location {
    /// Parses `s3://bucket/prefix?options`. Errors name the location without its query, so
    /// that whatever was (wrongly) put there is not echoed into logs.
    pub fn parse(location: &str) -> Result<S3Location, BackupError> {
        let (base, query) = match location.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (location, None),
        };
        let bad = |why: String| BackupError::Repository { location: base.to_string(), why };
        let Some(rest) = base.strip_prefix("s3://") else {
            return Err(bad("an S3 location starts with s3://".into()));
        };
        let (bucket, prefix) = match rest.split_once('/') {
            Some((b, p)) => (b, p.trim_matches('/')),
            None => (rest, ""),
        };
        if bucket.is_empty() {
            return Err(bad("no bucket: write s3://<bucket>/<optional prefix>?endpoint=...".into()));
        }
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
            && bucket.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && bucket.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
        if !bucket_ok {
            return Err(bad(format!(
                "{bucket:?} is not a bucket name: 3 to 63 lowercase letters, digits, '.' and '-', \
                 starting and ending with a letter or digit"
            )));
        }
        if !prefix.is_empty() {
            super::repo::check_key(prefix).map_err(|e| bad(format!("prefix: {e}")))?;
        }
        let mut loc = S3Location {
            spec: location.to_string(),
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            endpoint: None,
            region: String::new(),
            path_style: false,
            credentials_file: None,
        };
        let mut path_style = None;
        let mut region = None;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, raw) = pair.split_once('=').unwrap_or((pair, ""));
            if !OPTIONS.contains(&name) {
                let lower = name.to_ascii_lowercase();
                let hint = if ["key", "secret", "token", "password", "credential"].iter().any(|w| lower.contains(w)) {
                    "credentials are never read from the location (archive_command, which carries it, is \
                     visible to every database user): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the \
                     environment or name a file holding them with credentials_file=PATH"
                        .to_string()
                } else {
                    format!("the options are {}", OPTIONS.join(", "))
                };
                return Err(bad(format!("unknown option {name:?}: {hint}")));
            }
            let Some(value) = percent_decode(raw).filter(|v| !v.is_empty()) else {
                return Err(bad(format!("option {name} has an empty or badly escaped value")));
            };
            match name {
                "endpoint" => {
                    let rest = value.strip_prefix("http://").or_else(|| value.strip_prefix("https://"));
                    let host = rest.map(|r| r.split('/').next().unwrap_or(""));
                    if host.is_none_or(|h| h.is_empty()) {
                        return Err(bad(format!("endpoint {value:?} is not an http:// or https:// URL")));
                    }
                    loc.endpoint = Some(value.trim_end_matches('/').to_string());
                }
                "region" => region = Some(value),
                "path_style" => path_style = Some(bool_option(name, &value).map_err(bad)?),
                "credentials_file" => {
                    let p = PathBuf::from(&value);
                    if !p.is_absolute() {
                        return Err(bad(format!("credentials_file {value:?} must be an absolute path")));
                    }
                    loc.credentials_file = Some(p);
                }
                _ => {}
            }
        }
        loc.region = region
            .or_else(|| std::env::var("AWS_REGION").ok().filter(|r| !r.is_empty()))
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok().filter(|r| !r.is_empty()))
            .unwrap_or_else(|| "us-east-1".to_string());
        // Self-hosted services (MinIO, Ceph, ...) rarely have per-bucket DNS names: path style
        // is their sensible default; AWS itself prefers virtual-hosted requests.
        loc.path_style = path_style.unwrap_or(loc.endpoint.is_some());
        Ok(loc)
    }

    /// `s3://bucket/prefix`, for messages.
    pub fn display(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    /// The endpoint requests go to, for messages.
    pub fn endpoint_display(&self) -> String {
        match &self.endpoint {
            Some(e) => e.clone(),
            None => format!("https://s3.{}.amazonaws.com", self.region),
        }
    }
}

/// Access key, secret and optional session token.
struct Credentials {
    key_id: String,
    secret: String,
    token: Option<String>,
}

/// Reads the credentials from `file` (when given) or the environment.
fn credentials(loc: &S3Location) -> Result<Credentials, BackupError> {
    let bad = |why: String| BackupError::Repository { location: loc.display(), why };
    const NAMES: [&str; 3] = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"];
    let (vars, source) = match &loc.credentials_file {
        Some(path) => {
            let meta = std::fs::metadata(path).map_err(|e| BackupError::io("read S3 credentials", path, e))?;
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(bad(format!(
                    "credentials_file {} can be read by other users (mode {:o}): chmod 600 it, owned by the \
                     user PostgreSQL runs as",
                    path.display(),
                    meta.permissions().mode() & 0o777
                )));
            }
            let text = std::fs::read_to_string(path).map_err(|e| BackupError::io("read S3 credentials", path, e))?;
            let mut vars = std::collections::HashMap::new();
            for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
                let line = line.strip_prefix("export ").unwrap_or(line);
                let Some((k, v)) = line.split_once('=') else {
                    return Err(bad(format!(
                        "credentials_file {}: lines must be NAME=VALUE (a line has no '=')",
                        path.display()
                    )));
                };
                let v = v.trim();
                let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
                vars.insert(k.trim().to_string(), v.to_string());
            }
            (vars, format!("credentials_file {}", path.display()))
        }
        None => (
            NAMES.iter().filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v))).collect(),
            "the environment".to_string(),
        ),
    };
    let get = |k: &str| vars.get(k).filter(|v| !v.is_empty()).cloned();
    match (get("AWS_ACCESS_KEY_ID"), get("AWS_SECRET_ACCESS_KEY")) {
        (Some(key_id), Some(secret)) => Ok(Credentials { key_id, secret, token: get("AWS_SESSION_TOKEN") }),
        _ => Err(bad(format!(
            "no S3 credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not both set in {source}; \
             set them there, or name a file holding them with credentials_file=PATH in the location \
             (PostgreSQL runs archive_command with the postmaster's environment)"
        ))),
    }
}

/// A repository in an S3 bucket (under an optional key prefix).
#[derive(Clone)]
pub struct S3Repo {
    loc: S3Location,
    store: Arc<AmazonS3>,
}

/// Only the location: the client inside holds the credentials, which no log may show.
impl std::fmt::Debug for S3Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Repo").field("location", &self.loc.display()).finish_non_exhaustive()
    }
}

impl S3Repo {
    /// Reads the credentials and sets up the client (no request is sent yet).
    pub fn open(loc: S3Location) -> Result<S3Repo, BackupError> {
        let creds = credentials(&loc)?;
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&loc.bucket)
            .with_region(&loc.region)
            .with_access_key_id(creds.key_id)
            .with_secret_access_key(creds.secret)
            .with_virtual_hosted_style_request(!loc.path_style)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(200),
                    max_backoff: Duration::from_secs(5),
                    base: 2.0,
                },
                max_retries: 6,
                retry_timeout: RETRY_TIMEOUT,
            })
            .with_client_options(
                ClientOptions::new().with_connect_timeout(CONNECT_TIMEOUT).with_timeout(REQUEST_TIMEOUT),
            );
        if let Some(t) = creds.token {
            b = b.with_token(t);
        }
        if let Some(e) = &loc.endpoint {
            b = b.with_allow_http(e.starts_with("http://"));
            b = b.with_endpoint(if loc.path_style { e.clone() } else { virtual_hosted(e, &loc.bucket) });
        }
        let store = b.build().map_err(|e| BackupError::Repository { location: loc.display(), why: e.to_string() })?;
        tracing::debug!(location = %loc.display(), endpoint = %loc.endpoint_display(), "opened S3 repository");
        Ok(S3Repo { loc, store: Arc::new(store) })
    }

    /// `s3://bucket/prefix`, for messages.
    pub fn display(&self) -> String {
        self.loc.display()
    }

    /// The full location, options included, as [`S3Location::parse`] accepts it.
    pub fn location(&self) -> &str {
        &self.loc.spec
    }

    fn path(&self, key: &str) -> Result<ObjectPath, BackupError> {
        let full = if self.loc.prefix.is_empty() { key.to_string() } else { format!("{}/{key}", self.loc.prefix) };
        ObjectPath::parse(&full)
            .map_err(|_| BackupError::BadKey { key: key.to_string(), why: "not a valid object path" })
    }

    /// The directory `dir` ("" for the repository's root) as a listing prefix.
    fn dir_path(&self, dir: &str) -> Result<Option<ObjectPath>, BackupError> {
        match (dir.is_empty(), self.loc.prefix.is_empty()) {
            (true, true) => Ok(None),
            (true, false) => Ok(Some(ObjectPath::from(self.loc.prefix.as_str()))),
            (false, _) => self.path(dir).map(Some),
        }
    }

    /// Turns an object-store failure into a message an operator can act on. object_store
    /// keeps the HTTP status of some failures (listing, for one) only in the message text, so
    /// the status and S3's error code are read from there.
    fn err(&self, action: &'static str, key: &str, e: object_store::Error) -> BackupError {
        let endpoint = self.loc.endpoint_display();
        let text = chain(&e);
        let code = s3_code(&text).unwrap_or_default();
        let denied =
            matches!(e, object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. })
                || matches!(http_status(&text), Some(401 | 403));
        let why = if denied {
            format!(
                "S3 endpoint {endpoint} denied access to bucket {} ({}): check the access key and secret, and \
                 that they may read, write, list and delete there",
                self.loc.bucket,
                if code.is_empty() { "access denied" } else { code }
            )
        } else if code == "NoSuchBucket" {
            format!(
                "bucket {} does not exist at S3 endpoint {endpoint}: create it (steward-agent does not create buckets)",
                self.loc.bucket
            )
        } else if unreachable(&e) {
            format!("could not reach S3 endpoint {endpoint}: {text}")
        } else {
            text
        };
        self.err_text(action, key, why)
    }

    fn err_text(&self, action: &'static str, key: &str, why: String) -> BackupError {
        let key = if key.is_empty() { "/" } else { key };
        BackupError::ObjectStore { action, key: key.to_string(), location: self.display(), why }
    }

    /// One PUT for small objects (atomic on S3: readers see the old or the new object); a
    /// multipart upload for large ones, which becomes visible only once completed.
    pub async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), BackupError> {
        let path = self.path(key)?;
        if data.len() <= MULTIPART_THRESHOLD {
            self.store.put(&path, PutPayload::from(data)).await.map_err(|e| self.err("write", key, e))?;
            return Ok(());
        }
        let bytes = bytes::Bytes::from(data);
        let mut start = 0;
        self.multipart(key, || {
            let part = (start < bytes.len()).then(|| bytes.slice(start..(start + PART_SIZE).min(bytes.len())));
            start += PART_SIZE;
            std::future::ready(Ok(part))
        })
        .await
    }

    /// A multipart upload of the parts `next` yields until it yields None; aborted (so nothing
    /// becomes visible) if a part or the completion fails.
    async fn multipart<F, Fut>(&self, key: &str, mut next: F) -> Result<(), BackupError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Option<bytes::Bytes>, BackupError>>,
    {
        let path = self.path(key)?;
        let mut upload = self.store.put_multipart(&path).await.map_err(|e| self.err("start upload of", key, e))?;
        let mut sent = Ok(());
        loop {
            match next().await {
                Ok(Some(part)) => {
                    if let Err(e) = upload.put_part(PutPayload::from(part)).await {
                        sent = Err(self.err("upload part of", key, e));
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    sent = Err(e);
                    break;
                }
            }
        }
        if sent.is_ok() {
            sent = upload.complete().await.map(|_| ()).map_err(|e| self.err("complete upload of", key, e));
        }
        if let Err(err) = sent {
            if let Err(e) = upload.abort().await {
                tracing::warn!(key, error = %self.err("abort upload of", key, e), "multipart upload left behind");
            }
            return Err(err);
        }
        Ok(())
    }

    /// Like [`S3Repo::put`], from a local file read one part at a time.
    pub async fn put_file(&self, key: &str, file: &std::path::Path) -> Result<(), BackupError> {
        use tokio::io::AsyncReadExt;
        let io = |e: std::io::Error| BackupError::io("read", file, e);
        let len = tokio::fs::metadata(file).await.map_err(io)?.len();
        if len <= MULTIPART_THRESHOLD as u64 {
            return self.put(key, tokio::fs::read(file).await.map_err(io)?).await;
        }
        let f = tokio::sync::Mutex::new(tokio::fs::File::open(file).await.map_err(io)?);
        self.multipart(key, || async {
            let mut part = Vec::with_capacity(PART_SIZE);
            let mut f = f.lock().await;
            (&mut *f).take(PART_SIZE as u64).read_to_end(&mut part).await.map_err(io)?;
            Ok((!part.is_empty()).then(|| bytes::Bytes::from(part)))
        })
        .await
    }

    /// The object under `key`, or None. A large object is read in [`PART_SIZE`] ranges, each
    /// its own request (so a slow link does not hit the request timeout), all pinned to the
    /// version the first request saw.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, BackupError> {
        let path = self.path(key)?;
        let got = match self.store.get(&path).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err("read", key, e)),
        };
        let size = got.meta.size;
        if size <= MULTIPART_THRESHOLD as u64 {
            return match got.bytes().await {
                Ok(b) => Ok(Some(b.to_vec())),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.err("read", key, e)),
            };
        }
        let e_tag = got.meta.e_tag.clone();
        drop(got);
        let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        while (data.len() as u64) < size {
            let start = data.len() as u64;
            let opts = GetOptions {
                range: Some(GetRange::Bounded(start..(start + PART_SIZE as u64).min(size))),
                if_match: e_tag.clone(),
                ..Default::default()
            };
            let part = self.store.get_opts(&path, opts).await.map_err(|e| self.err("read", key, e))?;
            let bytes = part.bytes().await.map_err(|e| self.err("read", key, e))?;
            if bytes.is_empty() {
                return Err(self.err_text("read", key, format!("the object ended at {start} of {size} bytes")));
            }
            data.extend_from_slice(&bytes);
        }
        Ok(Some(data))
    }

    /// Names directly under `dir`: objects and common prefixes ("directories"), sorted.
    pub async fn list(&self, dir: &str) -> Result<Vec<String>, BackupError> {
        let prefix = self.dir_path(dir)?;
        let listed = self.store.list_with_delimiter(prefix.as_ref()).await.map_err(|e| self.err("list", dir, e))?;
        let mut names: Vec<String> = listed
            .common_prefixes
            .iter()
            .chain(listed.objects.iter().map(|o| &o.location))
            .filter_map(|p| p.filename().map(str::to_string))
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Bytes of every object under `prefix`, at any depth.
    pub async fn size(&self, prefix: &str) -> Result<u64, BackupError> {
        let path = self.path(prefix)?;
        self.store
            .list(Some(&path))
            .try_fold(0u64, |total, meta| async move { Ok(total + meta.size) })
            .await
            .map_err(|e| self.err("list", prefix, e))
    }

    /// Removes `key`; false if there was none (S3's DELETE does not say, so HEAD first).
    pub async fn delete(&self, key: &str) -> Result<bool, BackupError> {
        let path = self.path(key)?;
        match self.store.head(&path).await {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(self.err("look up", key, e)),
        }
        self.store.delete(&path).await.map_err(|e| self.err("delete", key, e))?;
        Ok(true)
    }
}

/// `scheme://host` → `scheme://bucket.host`, for virtual-hosted requests to a custom endpoint.
fn virtual_hosted(endpoint: &str, bucket: &str) -> String {
    match endpoint.split_once("://") {
        Some((scheme, host)) => format!("{scheme}://{bucket}.{host}"),
        None => endpoint.to_string(),
    }
}

/// Whether the failure is a connection failure or timeout rather than an answer.
fn unreachable(e: &object_store::Error) -> bool {
    use std::io::ErrorKind as K;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<reqwest::Error>() {
            if r.is_connect() || r.is_timeout() {
                return true;
            }
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                K::ConnectionRefused
                    | K::TimedOut
                    | K::HostUnreachable
                    | K::NetworkUnreachable
                    | K::ConnectionReset
                    | K::ConnectionAborted
            ) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// The HTTP status in object_store's "Server returned non-2xx status code: 403 Forbidden".
fn http_status(text: &str) -> Option<u16> {
    text.split("status code: ").nth(1).and_then(|r| r.get(..3)).and_then(|c| c.parse().ok())
}

/// S3's error code (`<Code>AccessDenied</Code>`) in a response body quoted in `text`.
fn s3_code(text: &str) -> Option<&str> {
    let rest = text.split("<Code>").nth(1)?;
    rest.split("</Code>").next().filter(|c| c.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// The error and its causes on one line.
fn chain(e: &object_store::Error) -> String {
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(err) = cur {
        let m = err.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = err.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        let l =
            S3Location::parse("s3://steward-backups/prod/eu?endpoint=http://127.0.0.1:9000/&region=eu-west-1").unwrap();
        assert_eq!(l.bucket, "steward-backups");
        assert_eq!(l.prefix, "prod/eu");
        assert_eq!(l.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(l.region, "eu-west-1");
        assert!(l.path_style, "custom endpoints default to path-style requests");
        let l = S3Location::parse("s3://bkt").unwrap();
        assert_eq!((l.prefix.as_str(), l.endpoint.as_deref(), l.path_style), ("", None, false));
        let l = S3Location::parse("s3://bkt/?credentials_file=%2Fetc%2Fsteward%2Fs3.env&path_style=false").unwrap();
        assert_eq!(l.credentials_file, Some(PathBuf::from("/etc/steward/s3.env")));
        assert!(!l.path_style);
        assert_eq!(virtual_hosted("https://s3.example.com:9000", "bkt"), "https://bkt.s3.example.com:9000");

        for (bad, why) in [
            ("s3://", "no bucket"),
            ("s3:///prefix", "no bucket"),
            ("s3://Upper_Case", "not a bucket name"),
            ("s3://bkt/../x", "prefix"),
            ("s3://bkt?endpoint=ftp://x", "not an http:// or https:// URL"),
            ("s3://bkt?endpoint=", "empty"),
            ("s3://bkt?path_style=maybe", "true or false"),
            ("s3://bkt?credentials_file=rel/path", "absolute"),
            ("s3://bkt?colour=blue", "unknown option \"colour\""),
        ] {
            let e = S3Location::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        // a credential in the location is refused without being echoed back
        let e = S3Location::parse("s3://bkt?secret_key=hunter2").unwrap_err().to_string();
        assert!(e.contains("never read from the location") && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn credentials_file_is_private_and_complete() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s3.env");
        std::fs::write(&file, "# steward\nexport AWS_ACCESS_KEY_ID=AK\nAWS_SECRET_ACCESS_KEY=\"s e\"\n").unwrap();
        let loc = S3Location::parse(&format!("s3://bkt?credentials_file={}", file.display())).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = credentials(&loc).err().unwrap().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = credentials(&loc).unwrap();
        assert_eq!((c.key_id.as_str(), c.secret.as_str(), c.token), ("AK", "s e", None));
        std::fs::write(&file, "AWS_ACCESS_KEY_ID=AK\n").unwrap();
        let e = credentials(&loc).err().unwrap().to_string();
        assert!(e.contains("no S3 credentials") && e.contains("s3.env"), "{e}");
    }
}
