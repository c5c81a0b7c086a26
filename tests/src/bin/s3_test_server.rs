//! `s3-test-server`: a real S3-compatible server (s3s-fs) over a local directory, for tests
//! of the S3 repository backend. Prints `s3-test-server listening on ADDR` once it accepts
//! connections; every request must be SigV4-signed with the given keys.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "S3-compatible test server over a local directory (one subdirectory per bucket)")]
struct Args {
    /// Directory served; each subdirectory is a bucket.
    #[arg(long)]
    root: PathBuf,
    /// Address to listen on (port 0: any free port, printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: std::net::SocketAddr,
    /// Access key requests must be signed with.
    #[arg(long, env = "S3_TEST_ACCESS_KEY")]
    access_key: String,
    /// Secret key requests must be signed with.
    #[arg(long, env = "S3_TEST_SECRET_KEY", hide_env_values = true)]
    secret_key: String,
    /// Buckets to create (as directories) before serving.
    #[arg(long)]
    bucket: Vec<String>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    for b in &args.bucket {
        std::fs::create_dir_all(args.root.join(b)).with_context(|| format!("creating bucket {b}"))?;
    }
    let listener = tokio::net::TcpListener::bind(args.addr).await.with_context(|| format!("binding {}", args.addr))?;
    let addr = listener.local_addr()?;
    let mut out = std::io::stdout();
    writeln!(out, "{}{addr}", steward_tests::s3::READY_PREFIX)?;
    out.flush()?;
    steward_tests::s3::serve(&args.root, listener, &args.access_key, &args.secret_key).await
}
