//! Transport security shared by every Steward process: the cluster CA and certificates
//! ([`pki`]), identities carried in them ([`identity`]) and mutual-TLS servers and clients
//! ([`transport`]).

pub mod identity;
pub mod join;
pub mod pki;
pub mod transport;

pub use identity::{Identity, Role};
pub use pki::TlsDir;
pub use transport::{PeerInfo, TlsMaterial};

/// Why TLS material could not be created, loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Io { path: std::path::PathBuf, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}
