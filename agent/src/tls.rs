//! The agent's certificate: loaded at start (joining with a one-time token on the very first
//! start), checked against the host id, renewed through the control plane after two thirds of
//! its life, and reloaded without a restart.

use std::sync::Arc;
use std::time::Duration;

use steward_proto::tls::pki::{self, LeafPair};
use steward_proto::tls::{Identity, Role, TlsDir, TlsError, TlsMaterial};
use steward_proto::v1::control_plane_client::ControlPlaneClient;
use steward_proto::v1::RenewCertificateRequest;

use crate::config::AgentConfig;
use crate::host::Host;

/// Addresses this host's certificate is valid for: the PostgreSQL names
/// ([`crate::pg::tls::host_names`]: clients' host, listen addresses, loopback) and the agent's
/// advertised address, which the control plane dials.
pub fn host_names(cfg: &AgentConfig) -> Vec<String> {
    let mut hosts = crate::pg::tls::host_names(&cfg.pg_host, &cfg.pg_listen);
    let agent = steward_proto::tls::transport::host_of(&cfg.advertise);
    if !agent.is_empty() && !hosts.iter().any(|h| h == agent) {
        hosts.push(agent.to_string());
    }
    hosts
}

/// Loads this host's TLS material, joining first if the directory is empty and a join token
/// was given. The certificate's name must be `host_id`.
pub async fn prepare(cfg: &AgentConfig, host_id: &str) -> Result<Arc<TlsMaterial>, TlsError> {
    let dir = TlsDir(cfg.tls_dir.clone());
    if !dir.has_identity() {
        match &cfg.join {
            Some((token, url)) => {
                tracing::info!(via = %url, host_id, "joining the cluster for a certificate");
                let me = Identity::new(Role::Agent, host_id);
                steward_proto::tls::join::join(url, token, &me, host_names(cfg), &dir).await?;
            }
            None => {
                return Err(TlsError::Invalid(format!(
                    "{} holds no certificate for this host: start once with --join-token and --join-url \
                     (`stewardctl join-token create --role agent` makes a token)",
                    dir.0.display()
                )))
            }
        }
    }
    let found = dir.identity()?;
    if found.role != Role::Agent || found.name != host_id {
        return Err(TlsError::Invalid(format!(
            "the certificate in {} is for {found}, but this host is agent/{host_id}: \
             give the agent its own TLS directory (or --host-id {})",
            dir.0.display(),
            found.name
        )));
    }
    TlsMaterial::load(&dir)
}

/// The host id to use when none is configured or stored yet: the certificate's name, if the
/// TLS directory already holds one.
pub fn host_id_from_cert(cfg: &AgentConfig) -> Option<String> {
    let dir = TlsDir(cfg.tls_dir.clone());
    if !dir.has_identity() {
        return None;
    }
    dir.identity().ok().filter(|i| i.role == Role::Agent).map(|i| i.name)
}

async fn renew(host: &Host) -> Result<(), String> {
    let identity = host.tls.identity();
    let (csr, key_pem) = pki::new_csr(&identity).map_err(|e| e.to_string())?;
    let mut last = String::from("no control-plane node configured");
    for addr in &host.cfg.control_plane {
        let Ok(ch) = steward_proto::tls::transport::channel(addr, host.cp_tls.clone(), Duration::from_secs(2)) else {
            continue;
        };
        let mut req = tonic::Request::new(RenewCertificateRequest { csr: csr.clone(), hosts: host_names(&host.cfg) });
        req.set_timeout(Duration::from_secs(10));
        match ControlPlaneClient::new(ch).renew_certificate(req).await {
            Ok(r) => {
                let r = r.into_inner();
                let dir = host.tls.dir();
                pki::write_atomic(&dir.ca_cert(), &r.ca, 0o644).map_err(|e| e.to_string())?;
                dir.write_leaf(&LeafPair { cert_pem: r.certificate, key_pem }).map_err(|e| e.to_string())?;
                host.tls.reload().map_err(|e| e.to_string())?;
                return Ok(());
            }
            Err(s) => last = format!("{addr}: {}", s.message()),
        }
    }
    Err(last)
}

/// PostgreSQL serves the host's certificate too: hand it the new one (a reload, no restart).
async fn serve_to_postgres(host: &Host) {
    if let Err(e) = host.rotate_server_cert().await {
        tracing::warn!(error = %e, "PostgreSQL keeps its previous certificate");
    }
}

/// Renews the certificate when due and picks up files changed on disk; runs until dropped.
pub async fn maintain(host: Arc<Host>) {
    loop {
        let every = (host.tls.lifetime() / 20).clamp(Duration::from_secs(1), Duration::from_secs(60));
        tokio::time::sleep(every).await;
        if host.tls.renewal_due() {
            match renew(&host).await {
                Ok(()) => {
                    tracing::info!(not_after = ?host.tls.not_after(), "renewed this host's certificate");
                    serve_to_postgres(&host).await;
                }
                Err(e) => tracing::warn!(error = %e, "renewing this host's certificate failed; will retry"),
            }
            continue;
        }
        match host.tls.reload_if_changed() {
            Ok(true) => {
                tracing::info!("reloaded TLS certificates");
                serve_to_postgres(&host).await;
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "new TLS files are not usable; keeping the current ones"),
        }
    }
}

/// Who may call the agent's command service: control-plane nodes; other agents only for the
/// peer lease check.
pub fn access(path: &str) -> &'static [Role] {
    if path.ends_with("/PeerLease") {
        &[Role::ControlPlane, Role::Agent]
    } else {
        &[Role::ControlPlane]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_peer_lease_is_open_to_agents() {
        assert_eq!(access("/steward.v1.Agent/PeerLease"), &[Role::ControlPlane, Role::Agent]);
        assert_eq!(access("/steward.v1.Agent/Promote"), &[Role::ControlPlane]);
    }
}
