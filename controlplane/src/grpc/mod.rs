//! gRPC services of a control-plane node other than the Raft transport: the agent-facing
//! `ControlPlane` service and the operator service behind `stewardctl`.

pub mod agent_client;
pub mod agent_service;
pub mod operator;
pub mod revocation;

use steward_proto::tls::Role;
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

/// Who may call the Raft transport: other control-plane nodes only.
pub fn raft_access(_path: &str) -> &'static [Role] {
    &[Role::ControlPlane]
}

/// Who may call the agent-facing service: agents (each only as itself, checked per call).
pub fn agent_access(_path: &str) -> &'static [Role] {
    &[Role::Agent]
}

/// Who may call the operator service: operators, and nodes forwarding an operator's call to the
/// leader. The bearer token then decides what the caller may do.
pub fn operator_access(_path: &str) -> &'static [Role] {
    &[Role::Operator, Role::ControlPlane]
}
