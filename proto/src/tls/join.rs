//! Joining the cluster with a one-time token: how a new host or control-plane node gets its
//! first certificate without any secret copied by hand.
//!
//! A join token is `stj_<secret>.<sha256 of the CA certificate>`. The joiner generates its key
//! locally, connects to a control-plane node's REST port, and trusts the server only if the
//! server's chain contains the CA the token pins (as kubeadm's discovery hash does), so a
//! stolen address cannot hand out a rogue CA. The token's secret authorizes one certificate for
//! one role; the control plane marks it used through Raft.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::identity::{Identity, Role};
use super::pki::{self, TlsDir};
use super::transport::provider;
use super::TlsError;

const PREFIX: &str = "stj_";

/// A parsed join token.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinToken {
    /// The secret part; only its hash is stored.
    pub secret: String,
    /// SHA-256 (hex) of the CA certificate the joiner must find.
    pub ca_fingerprint: String,
}

impl JoinToken {
    /// A new token for the CA with `ca_fingerprint`.
    pub fn generate(ca_fingerprint: &str) -> Result<JoinToken, TlsError> {
        let mut bytes = [0u8; 24];
        provider()
            .secure_random
            .fill(&mut bytes)
            .map_err(|_| TlsError::Invalid("no randomness for a join token".into()))?;
        Ok(JoinToken { secret: hex::encode(bytes), ca_fingerprint: ca_fingerprint.to_string() })
    }

    /// Parses `stj_<secret>.<fingerprint>`.
    pub fn parse(s: &str) -> Result<JoinToken, TlsError> {
        let bad = || TlsError::Invalid("a join token looks like stj_<secret>.<ca-fingerprint>; copy it whole".into());
        let rest = s.trim().strip_prefix(PREFIX).ok_or_else(bad)?;
        let (secret, fp) = rest.split_once('.').ok_or_else(bad)?;
        let hexish = |t: &str, n: usize| t.len() == n && t.chars().all(|c| c.is_ascii_hexdigit());
        if !hexish(secret, 48) || !hexish(fp, 64) {
            return Err(bad());
        }
        Ok(JoinToken { secret: secret.to_ascii_lowercase(), ca_fingerprint: fp.to_ascii_lowercase() })
    }

    /// Hex SHA-256 of the secret: what the control plane stores and looks up.
    pub fn hash(&self) -> String {
        hex::encode(Sha256::digest(self.secret.as_bytes()))
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PREFIX}{}.{}", self.secret, self.ca_fingerprint)
    }
}

/// Body of `POST /v1/join`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub token: String,
    /// `agent` or `controlplane`; must match the token's role.
    pub role: String,
    /// Host id or node id the certificate is for.
    pub name: String,
    /// Addresses the joiner serves on (certificate SANs).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// PEM certificate signing request for the joiner's key.
    pub csr: String,
}

/// Reply of `POST /v1/join`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinReply {
    /// The CA bundle to trust.
    pub ca: String,
    /// The joiner's certificate.
    pub certificate: String,
    /// The CA's key, for control-plane nodes only (they issue certificates too).
    #[serde(default)]
    pub ca_key: Option<String>,
}

/// Accepts a server only if its chain holds the pinned CA and the leaf verifies against it.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: String,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| hex::encode(Sha256::digest(c.as_ref())) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the server's CA is not the one the join token names: wrong address, or a token from another cluster"
                        .into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

/// Sends one HTTP/1.1 request over TLS to `addr` and returns (status, body).
async fn https_post(
    addr: &str,
    config: Arc<rustls::ClientConfig>,
    path: &str,
    body: &[u8],
) -> Result<(u16, Vec<u8>), TlsError> {
    let name = super::transport::server_name(addr)?;
    let addr = addr.trim_start_matches("https://").trim_start_matches("http://").trim_end_matches('/');
    let io_err = |source| TlsError::Io { path: addr.into(), source };
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.map_err(io_err)?;
        let mut tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map_err(io_err)?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        tls.write_all(head.as_bytes()).await.map_err(io_err)?;
        tls.write_all(body).await.map_err(io_err)?;
        tls.flush().await.map_err(io_err)?;
        let mut raw = Vec::new();
        // The server closes after the reply (Connection: close); a peer that ends TLS without
        // close_notify still gave us the whole reply.
        if let Err(e) = tls.take(1 << 20).read_to_end(&mut raw).await {
            if raw.is_empty() {
                return Err(io_err(e));
            }
        }
        Ok(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .map_err(|_| TlsError::Invalid(format!("{addr} did not answer the join request within 20 s")))??;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| TlsError::Invalid(format!("{addr} sent a malformed HTTP reply")))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| TlsError::Invalid(format!("{addr} sent a malformed HTTP status line")))?;
    let mut body = raw[split + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(pos) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&data[..pos]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = pos + 2;
        let end = (start + size).min(data.len());
        out.extend_from_slice(&data[start..end]);
        data = data.get(end + 2..).unwrap_or_default();
    }
    out
}

/// Joins through the control-plane node at `api_addr` (its REST address) with `token`, and
/// writes the CA bundle, a new key and the issued certificate (and for control-plane nodes the
/// CA key) into `out`.
pub async fn join(
    api_addr: &str,
    token: &str,
    identity: &Identity,
    hosts: Vec<String>,
    out: &TlsDir,
) -> Result<(), TlsError> {
    let parsed = JoinToken::parse(token)?;
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa { fingerprint: parsed.ca_fingerprint.clone() }))
        .with_no_client_auth();
    let (csr, key_pem) = pki::new_csr(identity)?;
    let req = JoinRequest {
        token: token.trim().to_string(),
        role: identity.role.to_string(),
        name: identity.name.clone(),
        hosts,
        csr,
    };
    let body = serde_json::to_vec(&req).map_err(|e| TlsError::Invalid(e.to_string()))?;
    let (status, reply) = https_post(api_addr, Arc::new(config), "/v1/join", &body).await?;
    if status != 201 {
        let msg = serde_json::from_slice::<serde_json::Value>(&reply)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&reply).chars().take(300).collect());
        return Err(TlsError::Invalid(format!("joining through {api_addr} was refused ({status}): {msg}")));
    }
    let reply: JoinReply = serde_json::from_slice(&reply)
        .map_err(|e| TlsError::Invalid(format!("{api_addr} sent an unreadable join reply: {e}")))?;
    if pki::ca_fingerprint(&reply.ca)? != parsed.ca_fingerprint {
        return Err(TlsError::Invalid("the CA in the join reply is not the one the token names".into()));
    }
    if let Some(ca_key) = &reply.ca_key {
        if identity.role != Role::ControlPlane {
            return Err(TlsError::Invalid("the join reply carried the CA key to a non-control-plane host".into()));
        }
        pki::write_atomic(&out.ca_key(), ca_key, 0o600)?;
    }
    pki::write_atomic(&out.ca_cert(), &reply.ca, 0o644)?;
    out.write_leaf(&pki::LeafPair { cert_pem: reply.certificate, key_pem })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_junk() {
        let t = JoinToken::generate(&"ab".repeat(32)).unwrap();
        let s = t.to_string();
        assert!(s.starts_with("stj_"));
        assert_eq!(JoinToken::parse(&s).unwrap(), t);
        assert_eq!(t.hash().len(), 64);
        assert!(JoinToken::parse("stj_abc.def").is_err());
        assert!(JoinToken::parse(&s.replace("stj_", "")).is_err());
        assert_eq!(dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), b"abcde");
    }
}
