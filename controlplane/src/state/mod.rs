//! The replicated state: what the control plane knows about teams, hosts, clusters, databases and
//! operations. Rows change only by applying [`command::Command`]s from the Raft log.

pub mod apply;
pub mod boot;
pub mod command;
pub mod lifecycle;
pub mod model;
pub mod query;
pub mod store;
pub mod wal;

pub use command::{Command, Response};
pub use store::{StateError, Store};
