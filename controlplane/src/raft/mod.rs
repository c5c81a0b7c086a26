//! Raft consensus for the control plane (openraft 0.9, the current stable line): type
//! configuration, durable log storage, the SQLite state machine, the tonic transport and the
//! node wrapper that forwards writes and linearizable reads to the leader.

pub mod group_commit;
pub mod log_store;
pub mod network;
pub mod node;
pub mod read_index;
pub mod service;
pub mod snapshot_policy;
pub mod state_machine;

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::state::{Command, Response};

/// Control-plane node id (stable, configured).
pub type NodeId = u64;

/// How to reach a control-plane node: its gRPC endpoint (Raft, agents, operators) and its REST endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub grpc_addr: String,
    pub api_addr: String,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "grpc={} api={}", self.grpc_addr, self.api_addr)
    }
}

openraft::declare_raft_types!(
    /// openraft type configuration of the control plane.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = NodeInfo,
        SnapshotData = Cursor<Vec<u8>>,
);

/// The openraft handle.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// A log id.
pub type LogId = openraft::LogId<NodeId>;
/// Storage error as openraft wants it.
pub type StorageError = openraft::StorageError<NodeId>;

/// Wraps any error as an openraft read/write storage error.
pub(crate) fn read_err(e: impl std::error::Error + 'static) -> StorageError {
    openraft::StorageIOError::read(openraft::AnyError::new(&e)).into()
}

pub(crate) fn write_err(e: impl std::error::Error + 'static) -> StorageError {
    openraft::StorageIOError::write(openraft::AnyError::new(&e)).into()
}
