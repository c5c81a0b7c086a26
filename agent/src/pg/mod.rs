//! PostgreSQL management for the host agent: find the server binaries, pick
//! the OS user, initialise, configure, start/stop an instance and provision
//! its role and database. One concern per submodule.

pub mod binaries;
pub mod config;
mod database;
pub mod error;
pub mod instance;
pub mod lifecycle;
pub mod paths;
pub mod runas;
pub mod sql;
pub mod tuning;

pub use binaries::PgBinaries;
pub use error::PgError;
pub use instance::{Instance, InstanceSpec};
pub use runas::RunAs;
pub use sql::scram_verifier;
pub use tuning::{tuning_for, Tuning};
