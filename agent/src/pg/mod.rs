//! PostgreSQL management for the host agent: find the server binaries, pick
//! the OS user, initialise, configure, start/stop an instance, provision its
//! role and database, and run it as a streaming-replication primary or
//! standby. One concern per submodule.

pub mod archiver;
pub mod binaries;
pub mod config;
pub mod controldata;
mod database;
pub mod error;
pub mod instance;
pub mod lifecycle;
pub mod logical;
pub mod paths;
mod probe;
pub mod replication;
pub mod runas;
pub mod sql;
mod standby;
#[cfg(test)]
mod test_support;
pub mod tls;
pub mod tuning;

pub use binaries::PgBinaries;
pub use database::role_exists;
pub use error::PgError;
pub use instance::{Instance, InstanceSpec, WalArchiving};
pub use replication::{format_lsn, parse_lsn, ReplicationStatus, Role, StandbyState, Upstream, REPLICATION_ROLE};
pub use runas::RunAs;
pub use sql::scram_verifier;
pub use tls::ServerCert;
pub use tuning::{tuning_for, Tuning};
