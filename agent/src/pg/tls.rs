//! TLS for PostgreSQL: the server certificate every instance presents, and the client side the
//! agent (and PostgreSQL's own connections it configures) use over TCP.
//!
//! The certificate is the host's own, issued by the cluster CA; instances take it as a
//! [`ServerCert`] PEM pair ([`Instance::set_server_cert`]) and a renewed one without a restart
//! ([`Instance::rotate_server_cert`], driven by `Host::rotate_server_cert`).

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::paths::{self, blocking};
use super::{Instance, PgError, RunAs};

/// File name of the server certificate, in the agent's TLS directory and in each instance's.
pub const CERT_FILE: &str = "pg-server.crt";

/// File name of the server key next to [`CERT_FILE`] (mode 0600).
pub const KEY_FILE: &str = "pg-server.key";

/// The directory, next to PGDATA, an instance's certificate is installed in: never inside
/// PGDATA, so backups, pg_basebackup and pg_rewind never copy the key to another host.
pub const INSTANCE_DIR: &str = "tls";

/// A PostgreSQL server certificate (chain) and its private key, both PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerCert {
    /// The certificate, optionally followed by intermediates.
    pub cert_pem: String,
    /// The private key (PKCS#8, or whatever OpenSSL reads).
    pub key_pem: String,
}

impl fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // the key never goes into logs
        f.debug_struct("ServerCert").field("cert_pem", &self.cert_pem).field("key_pem", &"<redacted>").finish()
    }
}

impl ServerCert {
    /// Reads a PEM pair from files, checking that each holds what its name says.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, PgError> {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| PgError::io("read", p, e));
        let cert = ServerCert { cert_pem: read(cert_path)?, key_pem: read(key_path)? };
        cert.check()?;
        Ok(cert)
    }

    /// Refuses a pair PostgreSQL would refuse at start (which would take the server down).
    fn check(&self) -> Result<(), PgError> {
        if !self.cert_pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(PgError::Certificate("the certificate is not a PEM certificate".into()));
        }
        if !self.key_pem.contains("PRIVATE KEY-----") {
            return Err(PgError::Certificate("the key is not a PEM private key".into()));
        }
        Ok(())
    }
}

/// The names a host's certificate is made for: its client-facing address, its listen
/// addresses (wildcards aside), `localhost` and 127.0.0.1; duplicates and blanks dropped.
pub fn host_names(pg_host: &str, pg_listen: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let listen = pg_listen.split(',').map(str::trim).filter(|a| !matches!(*a, "*" | "0.0.0.0" | "::"));
    for name in std::iter::once(pg_host.trim()).chain(listen).chain(["localhost", "127.0.0.1"]) {
        let name = name.trim_start_matches('[').trim_end_matches(']');
        if !name.is_empty() && !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
    }
    names
}

/// A new self-signed certificate (ECDSA P-256) for `names` (IP addresses become IP SANs), for
/// tests that run PostgreSQL without a cluster CA.
#[cfg(test)]
pub fn generate(names: &[String]) -> Result<ServerCert, PgError> {
    let fail = |e: rcgen::Error| PgError::Certificate(e.to_string());
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(fail)?;
    let cn = names.first().map_or("steward", String::as_str);
    params.distinguished_name.push(rcgen::DnType::CommonName, format!("steward PostgreSQL {cn}"));
    let key = rcgen::KeyPair::generate().map_err(fail)?;
    let cert = params.self_signed(&key).map_err(fail)?;
    Ok(ServerCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Copies `cert` into `dir` (made 0700 and owned by `run_as`, as are both files, 0600), where
/// PostgreSQL reads it. Returns whether a file changed (so the server must reload).
pub fn install(dir: &Path, cert: &ServerCert, run_as: &RunAs) -> Result<bool, PgError> {
    cert.check()?;
    paths::ensure_owned_dir(dir, run_as, 0o700)?;
    // key first: PostgreSQL refuses to load a certificate that does not match its key
    let mut changed = paths::write_atomic(&dir.join(KEY_FILE), &cert.key_pem, run_as)?;
    changed |= paths::write_atomic(&dir.join(CERT_FILE), &cert.cert_pem, run_as)?;
    Ok(changed)
}

impl Instance {
    /// Where this instance's certificate is installed: next to PGDATA.
    pub fn tls_dir(&self) -> PathBuf {
        self.home().join(INSTANCE_DIR)
    }

    /// The certificate [`Instance::write_config`] installs and turns `ssl` on with. An instance
    /// without one runs without TLS, and pg_hba.conf then refuses every TCP connection.
    pub fn set_server_cert(&self, cert: ServerCert) {
        *self.server_cert.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(cert);
    }

    /// Certificate rotation without a restart: installs `cert` and, if the server runs, makes it
    /// load it (`pg_reload_conf()`); new connections get the new certificate. Returns whether
    /// anything changed. Callers serialise it with other configuration changes.
    pub async fn rotate_server_cert(&self, cert: ServerCert) -> Result<bool, PgError> {
        cert.check()?;
        self.set_server_cert(cert);
        if !self.is_initialized() || !self.write_config().await? {
            return Ok(false);
        }
        if self.is_running().await {
            let client = self.superuser_client().await?;
            client
                .batch_execute("SELECT pg_reload_conf()")
                .await
                .map_err(|source| PgError::Sql { action: "reloading the configuration".into(), source })?;
            self.config_changed.store(false, std::sync::atomic::Ordering::SeqCst);
            tracing::info!(cluster_id = %self.spec.cluster_id, "server certificate rotated");
        }
        Ok(true)
    }

    /// Installs the certificate set with [`Instance::set_server_cert`], if any, and returns the
    /// `ssl` settings for `steward.conf` ("" without one) and whether a file changed.
    pub(super) async fn install_server_cert(&self) -> Result<(String, bool), PgError> {
        let cert = self.server_cert.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let Some(cert) = cert else {
            return Ok((String::new(), false));
        };
        let (dir, run_as) = (self.tls_dir(), self.run_as.clone());
        blocking(move || {
            let changed = install(&dir, &cert, &run_as)?;
            Ok((super::config::render_tls_conf(&dir.join(CERT_FILE), &dir.join(KEY_FILE)), changed))
        })
        .await
    }
}

/// Accepts any server certificate but checks the handshake signatures with it: libpq's
/// `sslmode=require` (encrypted, server not authenticated), as the connection URIs say.
#[derive(Debug)]
struct RequireMode(Arc<CryptoProvider>);

impl ServerCertVerifier for RequireMode {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The TLS connector for every tokio-postgres connection over TCP (ring provider, no CA
/// verification: see [`RequireMode`]). Use with `sslmode=require` ([`connect`] sets it).
pub fn connector() -> MakeRustlsConnect {
    static CONNECTOR: OnceLock<MakeRustlsConnect> = OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("the ring provider supports TLS 1.2 and 1.3")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(RequireMode(provider)))
                .with_no_client_auth();
            MakeRustlsConnect::new(config)
        })
        .clone()
}

/// Connects with `cfg` over TLS (`sslmode=require`): the client, and the connection future the
/// caller spawns.
pub async fn connect(
    mut cfg: tokio_postgres::Config,
) -> Result<
    (tokio_postgres::Client, impl Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static),
    tokio_postgres::Error,
> {
    cfg.ssl_mode(SslMode::Require);
    cfg.connect(connector()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_skip_wildcards_and_duplicates() {
        assert_eq!(host_names("10.0.0.5", "*"), ["10.0.0.5", "localhost", "127.0.0.1"]);
        assert_eq!(
            host_names("db1.example", "10.0.0.5, 127.0.0.1,::,[fe80::1]"),
            ["db1.example", "10.0.0.5", "127.0.0.1", "fe80::1", "localhost"]
        );
        assert_eq!(host_names("127.0.0.1", "127.0.0.1"), ["127.0.0.1", "localhost"]);
    }
}
