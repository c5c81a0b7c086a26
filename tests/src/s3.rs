//! A real S3-compatible server for tests: `s3s-fs` (an S3 implementation over a local
//! directory, with SigV4 authentication) served on loopback. The `s3-test-server` binary runs
//! [`serve`]; tests start that binary with [`S3Server::start`], so the code under test talks
//! to a separate process over HTTP exactly as it would to a production object store.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{bin, wait_for, Proc};

/// Access key of the servers tests start.
pub const ACCESS_KEY: &str = "steward-test-key";
/// Secret key of the servers tests start.
pub const SECRET_KEY: &str = "steward-test-secret-0123456789";

/// The line the server prints on stdout once it accepts connections, followed by the address.
pub const READY_PREFIX: &str = "s3-test-server listening on ";

/// Serves the S3 API over the buckets (subdirectories) of `root` on `listener`, refusing
/// requests not signed with `access_key` / `secret_key`. Runs until the process ends.
pub async fn serve(root: &Path, listener: tokio::net::TcpListener, access_key: &str, secret_key: &str) -> Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder as ConnBuilder;

    let fs = s3s_fs::FileSystem::new(root).map_err(|e| anyhow::anyhow!("serving {}: {e:?}", root.display()))?;
    let mut builder = s3s::service::S3ServiceBuilder::new(fs);
    builder.set_auth(s3s::auth::SimpleAuth::from_single(access_key, secret_key));
    let service = builder.build();
    let http = ConnBuilder::new(TokioExecutor::new());
    loop {
        let (socket, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("s3-test-server: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let conn = http.serve_connection(TokioIo::new(socket), service.clone()).into_owned();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                eprintln!("s3-test-server: connection: {e}");
            }
        });
    }
}

/// A running `s3-test-server` process (killed on drop) and the directory it serves.
pub struct S3Server {
    /// Where the server listens.
    pub addr: SocketAddr,
    /// The directory holding one subdirectory per bucket.
    pub root: PathBuf,
    proc: Proc,
}

impl S3Server {
    /// Starts the server over `root` (created if missing) with `buckets` created, and waits
    /// (up to 30 s) until it listens.
    pub async fn start(root: &Path, buckets: &[&str], log: &Path) -> Result<S3Server> {
        for b in buckets {
            std::fs::create_dir_all(root.join(b)).with_context(|| format!("creating bucket {b}"))?;
        }
        let args: Vec<String> =
            ["--root", &root.display().to_string(), "--addr", "127.0.0.1:0"].iter().map(|s| s.to_string()).collect();
        let mut cmd = std::process::Command::new(bin("s3-test-server"));
        cmd.args(&args).env("S3_TEST_ACCESS_KEY", ACCESS_KEY).env("S3_TEST_SECRET_KEY", SECRET_KEY);
        let mut proc = Proc::from_command("s3-test-server", cmd, log)?;
        let addr = wait_for("s3-test-server to listen", Duration::from_secs(30), || async {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if let Some(line) = text.lines().find_map(|l| l.strip_prefix(READY_PREFIX)) {
                return Ok(Some(line.trim().parse::<SocketAddr>().context("the printed address")?));
            }
            Ok(None)
        })
        .await;
        match addr {
            Ok(addr) => Ok(S3Server { addr, root: root.to_path_buf(), proc }),
            Err(e) => {
                proc.kill();
                let text = std::fs::read_to_string(log).unwrap_or_default();
                bail!("{e:#}; its log:\n{text}")
            }
        }
    }

    /// The endpoint URL clients use.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A repository location in `bucket` under `prefix` (may be empty), with `extra` query
    /// options appended (`&name=value...`).
    pub fn location(&self, bucket: &str, prefix: &str, extra: &str) -> String {
        let path = if prefix.is_empty() { bucket.to_string() } else { format!("{bucket}/{prefix}") };
        format!("s3://{path}?endpoint={}&region=us-east-1{extra}", self.endpoint())
    }

    /// Writes a credentials file (mode 600) with this server's keys, or with `secret` instead
    /// of the right secret.
    pub fn write_credentials(&self, path: &Path, secret: Option<&str>) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::remove_file(path);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        writeln!(f, "AWS_ACCESS_KEY_ID={ACCESS_KEY}\nAWS_SECRET_ACCESS_KEY={}", secret.unwrap_or(SECRET_KEY))?;
        Ok(())
    }

    /// Stops the server (SIGKILL), as an endpoint going away.
    pub fn kill(&mut self) {
        self.proc.kill();
    }
}
