//! The cluster's certificate authority and the files each process keeps: a CA created once at
//! bootstrap, and short-lived leaf certificates (ECDSA P-256) that carry an [`Identity`].
//!
//! A TLS directory holds `ca.pem` (the trusted CA bundle: during a CA rotation, old and new),
//! `node.pem` + `node.key` (this process's certificate and key) and, on control-plane nodes
//! only, `ca.key` (the key that signs new certificates).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};

use super::identity::{valid_name, Identity, Role};
use super::TlsError;

/// File names inside a TLS directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const NODE_CERT: &str = "node.pem";
pub const NODE_KEY: &str = "node.key";

/// How long the CA is valid: long, because replacing it touches every host.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default lifetime of leaf certificates; they are renewed after two thirds of it.
pub const LEAF_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);

fn rc(e: rcgen::Error) -> TlsError {
    TlsError::Invalid(format!("certificate: {e}"))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io { path: path.to_path_buf(), source }
}

fn set_validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = time::OffsetDateTime::now_utc();
    // A little backdating absorbs clock skew between hosts.
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::seconds(i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX / 2));
    let serial: [u8; 16] = rand_bytes();
    params.serial_number = Some(SerialNumber::from_slice(&serial));
}

fn rand_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    if rustls::crypto::ring::default_provider().secure_random.fill(&mut out).is_err() {
        // Unreachable in practice (the OS RNG); a time-derived serial still keeps them distinct.
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
        for (i, b) in nanos.to_be_bytes().iter().enumerate().take(N) {
            out[i] = *b;
        }
    }
    out[0] &= 0x7f; // a positive serial
    out
}

/// A CA certificate and its key, in PEM.
pub struct CaPair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A leaf certificate and its key, in PEM.
pub struct LeafPair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Creates a new self-signed cluster CA.
pub fn create_ca(common_name: &str) -> Result<CaPair, TlsError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "Steward");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params, CA_LIFETIME);
    let key = KeyPair::generate().map_err(rc)?;
    let cert = params.self_signed(&key).map_err(rc)?;
    Ok(CaPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// What a leaf certificate is for: the identity, and the addresses it may serve on.
#[derive(Debug, Clone)]
pub struct LeafRequest {
    pub identity: Identity,
    /// DNS names and IP addresses servers are reached by (ignored for operators).
    pub hosts: Vec<String>,
    pub lifetime: Duration,
}

impl LeafRequest {
    fn params(&self) -> Result<CertificateParams, TlsError> {
        valid_name(&self.identity.name)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, self.identity.to_string());
        dn.push(DnType::OrganizationName, "Steward");
        params.distinguished_name = dn;
        let uri = rcgen::Ia5String::try_from(self.identity.uri()).map_err(rc)?;
        let mut sans = vec![SanType::URI(uri)];
        if self.identity.role != Role::Operator {
            for h in &self.hosts {
                let h = h.trim();
                if h.is_empty() {
                    continue;
                }
                let san = match h.parse::<IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(
                        rcgen::Ia5String::try_from(h.to_string())
                            .map_err(|_| TlsError::Invalid(format!("'{h}' is neither an IP address nor a DNS name")))?,
                    ),
                };
                if !sans.contains(&san) {
                    sans.push(san);
                }
            }
        }
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match self.identity.role {
            Role::Operator => vec![ExtendedKeyUsagePurpose::ClientAuth],
            _ => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, self.lifetime);
        Ok(params)
    }
}

/// The CA, loaded to sign certificates.
pub struct Issuer {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The CA certificate as stored, appended to issued chains: joiners find the CA they pin
    /// in the server's chain.
    ca_pem: String,
}

impl Issuer {
    /// Loads the CA from PEM (the first certificate of the bundle must be the one `key` signs for).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Issuer, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(rc)?;
        let ca_pem = first_pem(cert_pem)?.to_string();
        let params = CertificateParams::from_ca_cert_pem(&ca_pem).map_err(rc)?;
        let cert = params.self_signed(&key).map_err(rc)?;
        Ok(Issuer { cert, key, ca_pem })
    }

    /// Loads `ca.pem` and `ca.key` from a TLS directory.
    pub fn load(dir: &Path) -> Result<Issuer, TlsError> {
        let cert = read(&dir.join(CA_CERT))?;
        let key_path = dir.join(CA_KEY);
        let key = std::fs::read_to_string(&key_path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => TlsError::Invalid(format!(
                "{} is missing: only control-plane nodes hold the CA key",
                key_path.display()
            )),
            _ => TlsError::Io { path: key_path.clone(), source },
        })?;
        Issuer::from_pem(&cert, &key)
    }

    /// Issues a certificate with a freshly generated key.
    pub fn issue(&self, req: &LeafRequest) -> Result<LeafPair, TlsError> {
        let key = KeyPair::generate().map_err(rc)?;
        let cert = req.params()?.signed_by(&key, &self.cert, &self.key).map_err(rc)?;
        Ok(LeafPair { cert_pem: self.chain(&cert.pem()), key_pem: key.serialize_pem() })
    }

    /// Issues a certificate for the key in a CSR; the identity, hosts and lifetime come from
    /// `req` (what the caller was authorized for), never from the CSR.
    pub fn sign_csr(&self, csr_pem: &str, req: &LeafRequest) -> Result<String, TlsError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| TlsError::Invalid(format!("the certificate request is not valid: {e}")))?;
        csr.params = req.params()?;
        Ok(self.chain(&csr.signed_by(&self.cert, &self.key).map_err(rc)?.pem()))
    }

    fn chain(&self, leaf_pem: &str) -> String {
        format!("{}\n{}\n", leaf_pem.trim_end(), self.ca_pem.trim_end())
    }
}

/// A new key and a certificate signing request for it (the key never leaves the host).
pub fn new_csr(identity: &Identity) -> Result<(String, String), TlsError> {
    let key = KeyPair::generate().map_err(rc)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, identity.to_string());
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key).map_err(rc)?;
    Ok((csr.pem().map_err(rc)?, key.serialize_pem()))
}

fn first_pem(bundle: &str) -> Result<&str, TlsError> {
    const END: &str = "-----END CERTIFICATE-----";
    let end = bundle.find(END).ok_or_else(|| TlsError::Invalid("no certificate in the CA file".into()))?;
    Ok(&bundle[..end + END.len()])
}

/// SHA-256 of the DER of the first certificate in a PEM bundle, hex: what join tokens pin.
pub fn ca_fingerprint(ca_pem: &str) -> Result<String, TlsError> {
    let ders = super::transport::certs_from_pem(ca_pem.as_bytes())?;
    let first = ders.first().ok_or_else(|| TlsError::Invalid("no certificate in the CA file".into()))?;
    Ok(hex::encode(Sha256::digest(first.as_ref())))
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// How long the certificate is valid in all.
    pub fn lifetime(&self) -> Duration {
        self.not_after.duration_since(self.not_before).unwrap_or_default()
    }

    /// Whether a third or less of its life is left at `now`: time to renew it.
    pub fn renewal_due(&self, now: SystemTime) -> bool {
        self.not_after.duration_since(now).unwrap_or_default() < self.lifetime() / 3
    }
}

/// The validity of the first certificate in a PEM text.
pub fn validity(cert_pem: &str) -> Result<Validity, TlsError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| TlsError::Invalid(format!("certificate PEM: {e}")))?;
    let cert = pem.parse_x509().map_err(|e| TlsError::Invalid(format!("certificate: {e}")))?;
    let v = cert.validity();
    let at = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    Ok(Validity { not_before: at(v.not_before.timestamp()), not_after: at(v.not_after.timestamp()) })
}

/// Reads a text file, naming it in the error.
pub fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(io(path))
}

/// Writes `contents` atomically (temp file + rename), with `mode`; readers never see half a file.
pub fn write_atomic(path: &Path, contents: &str, mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    // A temporary name of this writer's own: two writers of the same file (two threads
    // issuing into one directory) must not remove or rename each other's halves.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp.{}.{seq}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(io(&tmp))?;
    f.write_all(contents.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// A TLS directory's paths.
#[derive(Debug, Clone)]
pub struct TlsDir(pub PathBuf);

impl TlsDir {
    pub fn ca_cert(&self) -> PathBuf {
        self.0.join(CA_CERT)
    }
    pub fn ca_key(&self) -> PathBuf {
        self.0.join(CA_KEY)
    }
    pub fn node_cert(&self) -> PathBuf {
        self.0.join(NODE_CERT)
    }
    pub fn node_key(&self) -> PathBuf {
        self.0.join(NODE_KEY)
    }

    /// Whether this directory has a CA bundle and a certificate of its own.
    pub fn has_identity(&self) -> bool {
        self.ca_cert().exists() && self.node_cert().exists() && self.node_key().exists()
    }

    /// Stores a CA (certificate world-readable, key 0600).
    pub fn write_ca(&self, ca: &CaPair) -> Result<(), TlsError> {
        write_atomic(&self.ca_key(), &ca.key_pem, 0o600)?;
        write_atomic(&self.ca_cert(), &ca.cert_pem, 0o644)
    }

    /// Stores this process's certificate and key (key 0600). The key is written first, so a
    /// reader that sees the new certificate also finds its key.
    pub fn write_leaf(&self, leaf: &LeafPair) -> Result<(), TlsError> {
        write_atomic(&self.node_key(), &leaf.key_pem, 0o600)?;
        write_atomic(&self.node_cert(), &leaf.cert_pem, 0o644)
    }

    /// The identity in this directory's certificate.
    pub fn identity(&self) -> Result<Identity, TlsError> {
        let pem = read(&self.node_cert())?;
        let ders = super::transport::certs_from_pem(pem.as_bytes())?;
        ders.first()
            .and_then(|d| Identity::from_der(d))
            .ok_or_else(|| TlsError::Invalid(format!("{} carries no Steward identity", self.node_cert().display())))
    }
}

/// Creates a CA in `dir` unless one is there; returns whether it created one.
pub fn ensure_ca(dir: &TlsDir) -> Result<bool, TlsError> {
    if dir.ca_cert().exists() {
        if !dir.ca_key().exists() {
            return Err(TlsError::Invalid(format!(
                "{} exists without {}: copy the CA key from a control-plane node, or remove both to start a new cluster",
                dir.ca_cert().display(),
                dir.ca_key().display()
            )));
        }
        return Ok(false);
    }
    dir.write_ca(&create_ca("Steward cluster CA")?)?;
    Ok(true)
}

/// Issues `req` from the CA in `ca_dir` into `out` (copying the CA bundle there too).
pub fn issue_into(ca_dir: &TlsDir, req: &LeafRequest, out: &TlsDir) -> Result<(), TlsError> {
    let issuer = Issuer::load(&ca_dir.0)?;
    let leaf = issuer.issue(req)?;
    let bundle = read(&ca_dir.ca_cert())?;
    write_atomic(&out.ca_cert(), &bundle, 0o644)?;
    out.write_leaf(&leaf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_issues_leaves_with_identity_and_csrs_keep_their_key() {
        let ca = create_ca("test CA").unwrap();
        let issuer = Issuer::from_pem(&ca.cert_pem, &ca.key_pem).unwrap();
        let req = LeafRequest {
            identity: Identity::new(Role::Agent, "host-a"),
            hosts: vec!["10.0.0.1".into(), "db1.example".into()],
            lifetime: Duration::from_secs(3600),
        };
        let leaf = issuer.issue(&req).unwrap();
        let der = super::super::transport::certs_from_pem(leaf.cert_pem.as_bytes()).unwrap();
        assert_eq!(Identity::from_der(&der[0]), Some(req.identity.clone()));
        let life = validity(&leaf.cert_pem).unwrap().lifetime();
        assert!(life >= Duration::from_secs(3600) && life <= Duration::from_secs(3600 + 301), "{life:?}");

        let (csr, _key) = new_csr(&Identity::new(Role::ControlPlane, "evil")).unwrap();
        let signed = issuer.sign_csr(&csr, &req).unwrap();
        let der = super::super::transport::certs_from_pem(signed.as_bytes()).unwrap();
        // The identity is the one authorized, not the one the CSR asked for.
        assert_eq!(Identity::from_der(&der[0]), Some(req.identity.clone()));
        assert_eq!(ca_fingerprint(&ca.cert_pem).unwrap().len(), 64);
        // renewal is due in the last third of the life
        let v = validity(&leaf.cert_pem).unwrap();
        assert!(!v.renewal_due(v.not_before + Duration::from_secs(60)));
        assert!(v.renewal_due(v.not_after - Duration::from_secs(60)));
        assert!(v.renewal_due(v.not_after + Duration::from_secs(1)));
        assert!(Issuer::from_pem(&ca.cert_pem, "junk").is_err());
        assert!(issuer.sign_csr("junk", &req).is_err());
    }

    #[test]
    fn concurrent_writers_of_one_file_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        let writers: Vec<_> = (0..8)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    (0..50).map(|_| write_atomic(&path, &format!("writer {i}"), 0o644)).collect::<Vec<_>>()
                })
            })
            .collect();
        for w in writers {
            for r in w.join().unwrap() {
                r.unwrap();
            }
        }
        assert!(std::fs::read_to_string(&path).unwrap().starts_with("writer "));
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
