//! Steward host agent library: host facts and PostgreSQL instance management
//! that the agent binary drives on behalf of the control plane.

// gRPC handlers return tonic::Status, the protocol's own error type; boxing it would only add noise.
#![allow(clippy::result_large_err)]

pub mod backup;
pub mod facts;
pub mod pg;

pub mod config;
pub mod daemon;
pub mod heartbeat;
pub mod host;
pub mod jobs;
pub mod lease;
pub mod metrics;
pub mod monitor;
pub mod repo_report;
pub mod service;
pub mod state;
pub mod tasks;
pub mod tls;
