//! Mutual TLS for every Steward connection (rustls): certificates reloaded from disk while
//! serving (rotation without a restart), clients verified against the cluster CA and a
//! revocation list, servers checked for the role the caller expects, and the peer's identity
//! handed to request handlers.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use super::identity::{Identity, Role};
use super::pki::{self, TlsDir};
use super::TlsError;

/// The crypto provider every config uses (ring: no C toolchain beyond what `ring` needs).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM text.
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid(format!("certificate PEM: {e}")))
}

fn roots_from_pem(pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs_from_pem(pem)? {
        roots.add(c).map_err(|e| TlsError::Invalid(format!("CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(TlsError::Invalid("the CA file holds no certificate".into()));
    }
    Ok(roots)
}

/// What one load of a TLS directory produced.
struct Loaded {
    key: Arc<CertifiedKey>,
    identity: Identity,
    validity: pki::Validity,
    client_verifier: Arc<dyn ClientCertVerifier>,
    server_verifier: Arc<WebPkiServerVerifier>,
    stamp: Vec<Option<SystemTime>>,
}

/// A process's TLS identity and trust, reloadable. Configs built from it keep pointing at it,
/// so a reload changes what the next handshake uses; open connections are not disturbed.
pub struct TlsMaterial {
    dir: TlsDir,
    loaded: RwLock<Arc<Loaded>>,
    revoked: RwLock<HashSet<Identity>>,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial").field("dir", &self.dir.0).finish_non_exhaustive()
    }
}

fn stamp(dir: &TlsDir) -> Vec<Option<SystemTime>> {
    [dir.ca_cert(), dir.node_cert(), dir.node_key()]
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

fn load(dir: &TlsDir) -> Result<Loaded, TlsError> {
    let stamp = stamp(dir);
    let ca = std::fs::read(dir.ca_cert()).map_err(|source| missing(dir, &dir.ca_cert(), source))?;
    let cert_pem = std::fs::read(dir.node_cert()).map_err(|source| missing(dir, &dir.node_cert(), source))?;
    let key_pem = std::fs::read(dir.node_key()).map_err(|source| missing(dir, &dir.node_key(), source))?;
    let roots = Arc::new(roots_from_pem(&ca)?);
    let chain = certs_from_pem(&cert_pem)?;
    let first = chain
        .first()
        .ok_or_else(|| TlsError::Invalid(format!("{} holds no certificate", dir.node_cert().display())))?;
    let identity = Identity::from_der(first)
        .ok_or_else(|| TlsError::Invalid(format!("{} carries no Steward identity", dir.node_cert().display())))?;
    let validity = pki::validity(&String::from_utf8_lossy(&cert_pem))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| TlsError::Invalid(format!("{}: {e}", dir.node_key().display())))?;
    let provider = provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Invalid(format!("{}: {e}", dir.node_key().display())))?;
    let key = Arc::new(CertifiedKey::new(chain, signing));
    key.keys_match().map_err(|e| {
        TlsError::Invalid(format!(
            "{} and {} do not belong together ({e}): re-issue the certificate",
            dir.node_cert().display(),
            dir.node_key().display()
        ))
    })?;
    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| TlsError::Invalid(format!("client verifier: {e}")))?;
    let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider)
        .build()
        .map_err(|e| TlsError::Invalid(format!("server verifier: {e}")))?;
    Ok(Loaded { key, identity, validity, client_verifier, server_verifier, stamp })
}

fn missing(dir: &TlsDir, path: &std::path::Path, source: io::Error) -> TlsError {
    if source.kind() == io::ErrorKind::NotFound {
        TlsError::Invalid(format!(
            "{} is missing: this process has no certificate in {} yet; join the cluster with a join token \
             (see `--join-token`), or issue one with `steward-controlplane pki issue`",
            path.display(),
            dir.0.display()
        ))
    } else {
        TlsError::Io { path: path.to_path_buf(), source }
    }
}

impl TlsMaterial {
    /// Loads `ca.pem`, `node.pem` and `node.key` from `dir`.
    pub fn load(dir: &TlsDir) -> Result<Arc<TlsMaterial>, TlsError> {
        let loaded = load(dir)?;
        Ok(Arc::new(TlsMaterial {
            dir: dir.clone(),
            loaded: RwLock::new(Arc::new(loaded)),
            revoked: RwLock::new(HashSet::new()),
        }))
    }

    fn current(&self) -> Arc<Loaded> {
        match self.loaded.read() {
            Ok(l) => l.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The directory the material comes from.
    pub fn dir(&self) -> &TlsDir {
        &self.dir
    }

    /// This process's identity.
    pub fn identity(&self) -> Identity {
        self.current().identity.clone()
    }

    /// When this process's certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.current().validity.not_after
    }

    /// How long this process's certificate is valid in all.
    pub fn lifetime(&self) -> Duration {
        self.current().validity.lifetime()
    }

    /// Whether this process's certificate is in the last third of its life.
    pub fn renewal_due(&self) -> bool {
        self.current().validity.renewal_due(SystemTime::now())
    }

    /// Reloads the files if any changed since the last load. A broken new set is refused and
    /// the old one kept (the error says why), so a botched copy cannot take a process offline.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        if stamp(&self.dir) == self.current().stamp {
            return Ok(false);
        }
        self.reload()?;
        Ok(true)
    }

    /// Reloads the files now.
    pub fn reload(&self) -> Result<(), TlsError> {
        let loaded = Arc::new(load(&self.dir)?);
        match self.loaded.write() {
            Ok(mut l) => *l = loaded,
            Err(poisoned) => *poisoned.into_inner() = loaded,
        }
        Ok(())
    }

    /// Replaces the set of revoked identities: their certificates are refused at the handshake.
    pub fn set_revoked(&self, revoked: HashSet<Identity>) {
        match self.revoked.write() {
            Ok(mut r) => *r = revoked,
            Err(poisoned) => *poisoned.into_inner() = revoked,
        }
    }

    fn is_revoked(&self, id: &Identity) -> bool {
        match self.revoked.read() {
            Ok(r) => r.contains(id),
            Err(poisoned) => poisoned.into_inner().contains(id),
        }
    }

    /// Server config: `client_auth` says whether a client certificate from the cluster CA is
    /// required (gRPC) or not asked for (REST, where bearer tokens authenticate).
    pub fn server_config(
        self: &Arc<Self>,
        client_auth: bool,
        alpn: &[&[u8]],
    ) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let builder = rustls::ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
        let builder = if client_auth {
            builder.with_client_cert_verifier(Arc::new(ClientVerifier(self.clone())))
        } else {
            builder.with_no_client_auth()
        };
        let mut cfg = builder.with_cert_resolver(Arc::new(Resolver(self.clone())));
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(cfg))
    }

    /// Client config presenting this process's certificate and accepting only servers whose
    /// certificate is valid for the dialled address and carries one of `expect`'s roles.
    pub fn client_config(self: &Arc<Self>, expect: &'static [Role]) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ServerVerifier { material: self.clone(), expect }))
            .with_client_cert_resolver(Arc::new(Resolver(self.clone())));
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// A client config that trusts `ca_pem` and presents no certificate (joining hosts, REST clients).
pub fn anonymous_client_config(ca_pem: &[u8]) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = roots_from_pem(ca_pem)?;
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

#[derive(Debug)]
struct Resolver(Arc<TlsMaterial>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().key.clone())
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[derive(Debug)]
struct ClientVerifier(Arc<TlsMaterial>);

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.current().client_verifier.verify_client_cert(end_entity, intermediates, now)?;
        let id = Identity::from_der(end_entity)
            .ok_or_else(|| rustls::Error::General("the client certificate carries no Steward identity".into()))?;
        if self.0.is_revoked(&id) {
            tracing::warn!(identity = %id, "refused a revoked certificate");
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.current().client_verifier.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.current().client_verifier.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current().client_verifier.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct ServerVerifier {
    material: Arc<TlsMaterial>,
    expect: &'static [Role],
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let loaded = self.material.current();
        loaded.server_verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        match Identity::from_der(end_entity) {
            Some(id) if self.expect.contains(&id.role) => Ok(ServerCertVerified::assertion()),
            Some(id) => Err(rustls::Error::General(format!("the server is {id}, not a {}", roles(self.expect)))),
            None => Err(rustls::Error::General("the server certificate carries no Steward identity".into())),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.material.current().server_verifier.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.material.current().server_verifier.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.material.current().server_verifier.supported_verify_schemes()
    }
}

fn roles(r: &[Role]) -> String {
    r.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(" or ")
}

/// Who connected: address and, for mutual TLS, the certificate's identity. Handlers find it in
/// the request's extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    pub identity: Option<Identity>,
}

/// A server-side TLS connection.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: PeerInfo,
}

impl TlsConn {
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more connections wait to be accepted, so a flood of
/// half-open connections cannot exhaust memory or file descriptors.
const MAX_PENDING_HANDSHAKES: usize = 512;

/// Accepts TCP connections on `listener` and yields those that complete the TLS handshake;
/// failed handshakes (no certificate, another CA, revoked, plaintext) are logged and dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = pending.clone().acquire_owned().await else { return };
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (tcp, addr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(permit);
                match handshake {
                    Ok(Ok(tls)) => {
                        let identity = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| Identity::from_der(c));
                        let _ = tx.send(Ok(TlsConn { inner: tls, peer: PeerInfo { addr, identity } })).await;
                    }
                    Ok(Err(e)) => tracing::info!(peer = %addr, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::info!(peer = %addr, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The identity of the peer of a gRPC request, if it presented a certificate.
pub fn peer_identity<T>(req: &tonic::Request<T>) -> Option<&Identity> {
    req.extensions().get::<PeerInfo>().and_then(|p| p.identity.as_ref())
}

/// Which roles may call a gRPC path (`/steward.v1.Agent/PeerLease`).
pub type AccessRule = fn(&str) -> &'static [Role];

/// Wraps a gRPC service so that only peers whose certificate has a role the rule allows for the
/// called method reach it; others get PERMISSION_DENIED (or UNAUTHENTICATED without a
/// certificate) before any handler runs.
#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    rule: AccessRule,
}

impl<S> Gate<S> {
    pub fn new(inner: S, rule: AccessRule) -> Self {
        Self { inner, rule }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Gate<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for Gate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::BoxBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::BoxBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let allowed = (self.rule)(req.uri().path());
        let identity = req.extensions().get::<PeerInfo>().and_then(|p| p.identity.clone());
        let denied = match identity {
            Some(id) if allowed.contains(&id.role) => None,
            Some(id) => Some(tonic::Status::permission_denied(format!("{id} may not call {}", req.uri().path()))),
            None => Some(tonic::Status::unauthenticated("a client certificate from the cluster CA is required")),
        };
        match denied {
            Some(status) => Box::pin(async move { Ok(status.into_http()) }),
            None => {
                // Standard tower practice: call the clone that was driven to readiness.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(inner.call(req))
            }
        }
    }
}

/// The host of an address as configured (`host:port`, `[v6]:port`, with or without an
/// `https://` prefix): what certificates name and TLS clients check.
pub fn host_of(addr: &str) -> &str {
    let a = addr.trim_start_matches("https://").trim_start_matches("http://").trim_end_matches('/');
    let host = match a.rsplit_once(':') {
        Some((h, port)) if !port.is_empty() && port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => a,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The name a TLS client checks the server's certificate against, for `addr`.
pub(crate) fn server_name(addr: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host_of(addr).to_string())
        .map_err(|_| TlsError::Invalid(format!("'{addr}' has no valid host name")))
}

/// How an idle or stuck connection is noticed: HTTP/2 pings every `interval`, and the connection
/// is dropped (the channel reconnects on its next call) when one is not answered within `timeout`.
#[derive(Debug, Clone, Copy)]
pub struct KeepAlive {
    pub interval: Duration,
    pub timeout: Duration,
    /// Ping even while no call is open (for long-lived channels that must not sit on a dead link).
    pub while_idle: bool,
}

impl Default for KeepAlive {
    fn default() -> Self {
        Self { interval: Duration::from_secs(5), timeout: Duration::from_secs(10), while_idle: false }
    }
}

impl KeepAlive {
    /// For channels between peers that must notice a dead link quickly: a ping every second,
    /// the connection dropped when one goes unanswered for two, so a connection left on a dead
    /// link (a partition, a host that vanished) is replaced within about three seconds instead
    /// of waiting out TCP's retransmission backoff.
    pub const PEER: KeepAlive =
        KeepAlive { interval: Duration::from_secs(1), timeout: Duration::from_secs(2), while_idle: true };
}

/// A lazily connecting gRPC channel to `addr` (host:port; an `https://` or `http://` prefix is
/// ignored) over TLS with `config`.
pub fn channel(
    addr: &str,
    config: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
) -> Result<tonic::transport::Channel, TlsError> {
    channel_with_keepalive(addr, config, connect_timeout, KeepAlive::default())
}

/// Lazily connecting channels by address, one per address, shared by every caller. A channel
/// multiplexes calls over one HTTP/2 connection and reconnects by itself, so the mutual-TLS
/// handshake is paid once per peer rather than once per call (a handshake per call costs both
/// sides CPU and eats into short call deadlines).
#[derive(Clone)]
pub struct Channels {
    config: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
    keepalive: KeepAlive,
    channels: Arc<std::sync::Mutex<std::collections::HashMap<String, tonic::transport::Channel>>>,
}

impl Channels {
    pub fn new(config: Arc<rustls::ClientConfig>, connect_timeout: Duration, keepalive: KeepAlive) -> Self {
        Self { config, connect_timeout, keepalive, channels: Arc::default() }
    }

    /// The channel to `addr`, created on first use.
    pub fn get(&self, addr: &str) -> Result<tonic::transport::Channel, TlsError> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let c = channel_with_keepalive(addr, self.config.clone(), self.connect_timeout, self.keepalive)?;
        channels.insert(addr.to_string(), c.clone());
        Ok(c)
    }
}

/// [`channel`] with its own keep-alive settings.
pub fn channel_with_keepalive(
    addr: &str,
    config: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
    keepalive: KeepAlive,
) -> Result<tonic::transport::Channel, TlsError> {
    let addr = addr.trim_start_matches("https://").trim_start_matches("http://").trim_end_matches('/').to_string();
    let name = server_name(&addr)?;
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| TlsError::Invalid(format!("address '{addr}': {e}")))?
        .http2_keep_alive_interval(keepalive.interval)
        .keep_alive_timeout(keepalive.timeout)
        .keep_alive_while_idle(keepalive.while_idle);
    let connector = tower::service_fn(move |_uri: tonic::transport::Uri| {
        let config = config.clone();
        let name = name.clone();
        let addr = addr.clone();
        async move {
            let connect = async {
                let tcp = TcpStream::connect(&addr).await?;
                tcp.set_nodelay(true)?;
                tokio_rustls::TlsConnector::from(config).connect(name, tcp).await
            };
            let tls = tokio::time::timeout(connect_timeout, connect)
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {addr} timed out")))??;
            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(host_of("10.0.0.1:7400"), "10.0.0.1");
        assert_eq!(host_of("https://db.example:7480/"), "db.example");
        assert_eq!(host_of("[::1]:7400"), "::1");
        assert_eq!(host_of("db.example"), "db.example");
        assert!(server_name("10.0.0.1:7400").is_ok());
        assert!(server_name("bad host:1").is_err());
    }
}
