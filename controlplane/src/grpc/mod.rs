//! gRPC services of a control-plane node other than the Raft transport: the agent-facing
//! `ControlPlane` service and the operator service behind `stewardctl`.

pub mod agent_client;
pub mod agent_service;
pub mod operator;

use tonic::Status;

use crate::raft::node::RaftNode;

/// Metadata key carrying the leader's gRPC address on an UNAVAILABLE reply from a follower.
pub const LEADER_HINT: &str = "x-steward-leader";

/// UNAVAILABLE with the leader's address, for calls only the leader serves.
pub fn not_leader(node: &RaftNode) -> Status {
    let mut status = Status::unavailable("this control-plane node is not the leader; retry on the leader");
    if let Some((_, info)) = node.leader() {
        if let Ok(v) = info.grpc_addr.parse() {
            status.metadata_mut().insert(LEADER_HINT, v);
        }
    }
    status
}
