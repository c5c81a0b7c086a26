//! The tests' cluster CA: one per test process, under /tmp, with an operator certificate for
//! gRPC clients and stewardctl, and certificates issued on demand for nodes, agents and
//! simulated hosts. Everything in the tests speaks TLS, as in production.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use steward_proto::tls::pki::{self, LeafRequest};
use steward_proto::tls::{Identity, Role, TlsDir, TlsMaterial};
use tonic::transport::Channel;

static CA: OnceLock<PathBuf> = OnceLock::new();

/// Tests of one process run in parallel: the first to need a certificate issues it while the
/// others wait, instead of all of them writing the same directory at once.
static ISSUING: Mutex<()> = Mutex::new(());

/// Removes CA directories of test processes that are gone.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir("/tmp") else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(pid) = name.strip_prefix("steward-test-pki-") {
            if !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// This process's CA directory (ca.pem, ca.key), created on first use.
pub fn ca_dir() -> &'static Path {
    CA.get_or_init(|| {
        sweep_stale();
        let dir = PathBuf::from(format!("/tmp/steward-test-pki-{}", std::process::id()));
        let ca = TlsDir(dir.join("ca"));
        if let Err(e) = pki::ensure_ca(&ca) {
            panic!("creating the test CA in {}: {e}", dir.display());
        }
        dir
    })
    .as_path()
}

fn ca() -> TlsDir {
    TlsDir(ca_dir().join("ca"))
}

/// The CA certificate clients trust.
pub fn ca_pem() -> PathBuf {
    ca().ca_cert()
}

/// Issues `role`/`name` valid for `hosts` into `out`.
pub fn issue(role: Role, name: &str, hosts: &[&str], out: &Path) -> Result<()> {
    let mut all: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
    all.extend(["127.0.0.1".to_string(), "localhost".to_string()]);
    let req = LeafRequest { identity: Identity::new(role, name), hosts: all, lifetime: pki::LEAF_LIFETIME };
    pki::issue_into(&ca(), &req, &TlsDir(out.to_path_buf())).with_context(|| format!("issuing {role}/{name}"))
}

/// Gives a control-plane node's TLS directory the CA (certificate and key): the node issues
/// its own certificate at start.
pub fn seed_node(tls_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(tls_dir)?;
    for f in [pki::CA_CERT, pki::CA_KEY] {
        std::fs::copy(ca().0.join(f), tls_dir.join(f)).with_context(|| format!("copying {f}"))?;
    }
    Ok(())
}

/// The operator certificate directory (for stewardctl's --tls-dir).
pub fn operator_dir() -> PathBuf {
    let dir = ca_dir().join("operator");
    let _one_issuer = ISSUING.lock().unwrap_or_else(|e| e.into_inner());
    if !TlsDir(dir.clone()).has_identity() {
        if let Err(e) = issue(Role::Operator, "test-operator", &[], &dir) {
            panic!("issuing the test operator certificate: {e:#}");
        }
    }
    dir
}

/// TLS material of a simulated host (an agent certificate named `host_id`).
pub fn host_material(host_id: &str) -> Result<Arc<TlsMaterial>> {
    let dir = ca_dir().join(format!("host-{host_id}"));
    let _one_issuer = ISSUING.lock().unwrap_or_else(|e| e.into_inner());
    if !TlsDir(dir.clone()).has_identity() {
        issue(Role::Agent, host_id, &[], &dir)?;
    }
    Ok(TlsMaterial::load(&TlsDir(dir))?)
}

/// A gRPC channel to a control-plane node presenting the TLS material in `material`.
pub fn channel_with(addr: &str, material: &Arc<TlsMaterial>) -> Result<Channel> {
    let cfg = material.client_config(&[Role::ControlPlane])?;
    Ok(steward_proto::tls::transport::channel(addr, cfg, Duration::from_millis(500))?)
}

/// A gRPC channel to a control-plane node as the test operator.
pub fn operator_channel(addr: &str) -> Result<Channel> {
    static OP: OnceLock<Arc<TlsMaterial>> = OnceLock::new();
    let m = match OP.get() {
        Some(m) => m.clone(),
        None => {
            let m = TlsMaterial::load(&TlsDir(operator_dir()))?;
            OP.get_or_init(|| m).clone()
        }
    };
    channel_with(addr, &m)
}

/// An HTTPS client trusting the test CA.
pub fn https_client(timeout: Duration) -> reqwest::Client {
    let pem = std::fs::read(ca_pem()).unwrap_or_default();
    let mut b = reqwest::Client::builder().timeout(timeout).use_rustls_tls();
    if let Ok(cert) = reqwest::Certificate::from_pem(&pem) {
        b = b.add_root_certificate(cert);
    }
    b.build().unwrap_or_default()
}
