//! Steward control plane: Raft-replicated state (openraft + SQLite), the product REST API,
//! the gRPC services for agents and operators, and the reconcilers that drive agents.

// gRPC handlers return tonic::Status, the protocol's own error type; boxing it would only add noise.
#![allow(clippy::result_large_err)]

pub mod api;
pub mod config;
pub mod dev;
pub mod durable_file;
pub mod grpc;
pub mod metrics;
pub mod pki;
pub mod raft;
pub mod reconcile;
pub mod server;
pub mod state;

/// Current time as RFC 3339 UTC with milliseconds: the format of every timestamp in the state.
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
