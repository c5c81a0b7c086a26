//! A control-plane node's certificates: created with the cluster CA at bootstrap, fetched with a
//! join token, or issued from a CA copied in by hand; renewed before they expire; and the CA
//! that signs agents' and other nodes' certificates.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use steward_proto::tls::pki::{self, Issuer, LeafRequest};
use steward_proto::tls::transport::host_of;
use steward_proto::tls::{Identity, Role, TlsDir, TlsMaterial};

use crate::config::NodeConfig;

/// Addresses a node's certificate is valid for: every host part of its listen and advertised
/// addresses, plus loopback and the machine's host name.
pub fn node_hosts(cfg: &NodeConfig) -> Vec<String> {
    let mut hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    for a in [&cfg.advertise.grpc_addr, &cfg.advertise.api_addr] {
        hosts.push(host_of(a).to_string());
    }
    for l in [cfg.grpc_listen, cfg.api_listen] {
        if !l.ip().is_unspecified() {
            hosts.push(l.ip().to_string());
        }
    }
    if let Ok(h) = nix::unistd::gethostname() {
        if let Some(h) = h.to_str() {
            hosts.push(h.to_string());
        }
    }
    hosts.sort();
    hosts.dedup();
    hosts.retain(|h| !h.is_empty() && h != "0.0.0.0" && h != "::");
    hosts
}

fn identity(cfg: &NodeConfig) -> Identity {
    Identity::new(Role::ControlPlane, cfg.node_id.to_string())
}

/// Makes sure the node has a certificate before it serves: joins with the token, issues one
/// from a CA present in the TLS directory, or (the first node of a new group) creates the CA.
pub async fn prepare(cfg: &NodeConfig) -> anyhow::Result<Arc<TlsMaterial>> {
    let dir = TlsDir(cfg.tls_dir.clone());
    std::fs::create_dir_all(&dir.0).with_context(|| format!("creating {}", dir.0.display()))?;
    let me = identity(cfg);
    if !dir.has_identity() {
        if let (Some(token), Some(url)) = (&cfg.join_token, &cfg.join_url) {
            tracing::info!(via = %url, "joining the cluster for a certificate");
            steward_proto::tls::join::join(url, token, &me, node_hosts(cfg), &dir)
                .await
                .context("joining the cluster")?;
        } else {
            let bootstraps = cfg.initial_members.keys().next() == Some(&cfg.node_id);
            if !dir.ca_key().exists() {
                if !bootstraps {
                    anyhow::bail!(
                        "{} has no certificate for this node. Start it with --join-token and --join-url \
                         (`stewardctl join-token create --role controlplane` on a running node makes one), \
                         or copy ca.pem and ca.key from the first node into that directory",
                        dir.0.display()
                    );
                }
                pki::ensure_ca(&dir)?;
                tracing::info!(dir = %dir.0.display(), "created the cluster CA");
            }
            issue_own(cfg, &dir)?;
        }
    }
    let found = dir.identity()?;
    if found != me {
        anyhow::bail!(
            "the certificate in {} is for {found}, but this is {me}: use this node's own TLS directory",
            dir.0.display()
        );
    }
    renew_if_due(cfg, &dir)?;
    Ok(TlsMaterial::load(&dir)?)
}

fn issue_own(cfg: &NodeConfig, dir: &TlsDir) -> anyhow::Result<()> {
    let issuer = Issuer::load(&dir.0)?;
    let leaf =
        issuer.issue(&LeafRequest { identity: identity(cfg), hosts: node_hosts(cfg), lifetime: cfg.cert_lifetime })?;
    dir.write_leaf(&leaf)?;
    Ok(())
}

/// At start: re-issues this node's certificate from the CA key when a third or less of its
/// life is left.
fn renew_if_due(cfg: &NodeConfig, dir: &TlsDir) -> anyhow::Result<()> {
    if dir.ca_key().exists() && pki::validity(&pki::read(&dir.node_cert())?)?.renewal_due(SystemTime::now()) {
        issue_own(cfg, dir)?;
        tracing::info!("renewed this node's certificate");
    }
    Ok(())
}

/// Reloads TLS files that changed on disk and renews this node's certificate in time (from the
/// CA key, when this node holds it).
pub async fn maintain(cfg: NodeConfig, tls: Arc<TlsMaterial>) {
    let every = (cfg.cert_lifetime / 20).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::time::sleep(every).await;
        match tls.reload_if_changed() {
            Ok(true) => tracing::info!(identity = %tls.identity(), "reloaded TLS certificates"),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "new TLS files are not usable; keeping the current ones"),
        }
        if !tls.renewal_due() || !tls.dir().ca_key().exists() {
            continue;
        }
        match issue_own(&cfg, tls.dir()).and_then(|()| Ok(tls.reload()?)) {
            Ok(()) => tracing::info!("renewed this node's certificate"),
            Err(e) => tracing::error!(error = %e, "renewing this node's certificate failed; will retry"),
        }
    }
}

/// Signs certificates for agents and joining nodes with the CA in this node's TLS directory.
pub struct CertAuthority {
    dir: TlsDir,
    lifetime: Duration,
}

impl CertAuthority {
    pub fn new(dir: TlsDir, lifetime: Duration) -> Self {
        Self { dir, lifetime }
    }

    /// A certificate for `identity` valid on `hosts`, for the key in `csr_pem`. Returns the
    /// chain and the CA bundle.
    pub fn sign(&self, csr_pem: &str, identity: Identity, hosts: Vec<String>) -> Result<(String, String), String> {
        let issuer = Issuer::load(&self.dir.0).map_err(|e| e.to_string())?;
        let cert = issuer
            .sign_csr(csr_pem, &LeafRequest { identity, hosts, lifetime: self.lifetime })
            .map_err(|e| e.to_string())?;
        let bundle = pki::read(&self.dir.ca_cert()).map_err(|e| e.to_string())?;
        Ok((cert, bundle))
    }

    /// The CA key (for joining control-plane nodes).
    pub fn ca_key(&self) -> Result<String, String> {
        pki::read(&self.dir.ca_key()).map_err(|e| e.to_string())
    }

    /// SHA-256 of the CA certificate, which join tokens pin.
    pub fn fingerprint(&self) -> Result<String, String> {
        let bundle = pki::read(&self.dir.ca_cert()).map_err(|e| e.to_string())?;
        pki::ca_fingerprint(&bundle).map_err(|e| e.to_string())
    }
}
