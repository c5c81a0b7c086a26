//! A control-plane node's certificates: created with the cluster CA at bootstrap, fetched with a
//! join token, or issued from a CA copied in by hand; renewed before they expire; and the CA
//! that signs agents' and other nodes' certificates.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use steward_proto::tls::pki::{self, Issuer, LeafRequest};
use steward_proto::tls::{Identity, Role, TlsDir, TlsMaterial};

use crate::config::NodeConfig;

/// Addresses a node's certificate is valid for: every host part of its listen and advertised
/// addresses, plus loopback and the machine's host name.
pub fn node_hosts(cfg: &NodeConfig) -> Vec<String> {
    let mut hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    for a in [&cfg.advertise.grpc_addr, &cfg.advertise.api_addr] {
        hosts.push(host_part(a));
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

/// The host of `host:port` (brackets of IPv6 literals removed).
pub fn host_part(addr: &str) -> String {
    let a = addr.trim_start_matches("https://").trim_start_matches("http://");
    let h = match a.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => a,
    };
    h.trim_start_matches('[').trim_end_matches(']').to_string()
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

/// Whether a certificate with `not_after` and `lifetime` is in the last third of its life.
pub fn renewal_due(not_after: SystemTime, lifetime: Duration) -> bool {
    let left = not_after.duration_since(SystemTime::now()).unwrap_or_default();
    left < lifetime / 3
}

/// Re-issues this node's certificate from the CA key when a third or less of its life is left.
fn renew_if_due(cfg: &NodeConfig, dir: &TlsDir) -> anyhow::Result<bool> {
    if !dir.ca_key().exists() {
        return Ok(false);
    }
    let pem = pki::read(&dir.node_cert())?;
    if !renewal_due(pki::not_after(&pem)?, pki::lifetime(&pem)?) {
        return Ok(false);
    }
    issue_own(cfg, dir)?;
    tracing::info!("renewed this node's certificate");
    Ok(true)
}

/// Renews this node's certificate in time and reloads TLS files that changed on disk.
pub async fn maintain(cfg: NodeConfig, tls: Arc<TlsMaterial>) {
    let every = (cfg.cert_lifetime / 20).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::time::sleep(every).await;
        let dir = tls.dir().clone();
        if let Err(e) = renew_if_due(&cfg, &dir) {
            tracing::error!(error = %e, "renewing this node's certificate failed; will retry");
        }
        match tls.reload_if_changed() {
            Ok(true) => tracing::info!(identity = %tls.identity(), "reloaded TLS certificates"),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "new TLS files are not usable; keeping the current ones"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_parts_and_renewal() {
        assert_eq!(host_part("10.0.0.1:7400"), "10.0.0.1");
        assert_eq!(host_part("[::1]:7400"), "::1");
        assert_eq!(host_part("db.example"), "db.example");
        let life = Duration::from_secs(90);
        assert!(!renewal_due(SystemTime::now() + Duration::from_secs(80), life));
        assert!(renewal_due(SystemTime::now() + Duration::from_secs(20), life));
        assert!(renewal_due(SystemTime::now() - Duration::from_secs(1), life));
    }
}
