//! Every gRPC service and message Steward speaks (`steward.v1`): the Raft transport between
//! control-plane nodes, the agent-facing registration/heartbeat service, the commands the control
//! plane sends to agents, and the operator service behind `stewardctl`.

/// Generated code for package `steward.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("steward.v1");
}

pub mod tls;
