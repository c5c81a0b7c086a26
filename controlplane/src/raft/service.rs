//! Server side of the Raft transport: hands peers' RPCs to the local openraft instance, and
//! serves forwarded writes and read-index requests when this node leads.

use std::sync::Arc;

use steward_proto::v1::raft_server::Raft as RaftRpc;
use steward_proto::v1::RaftPayload;
use tonic::{Request, Response, Status};

use super::node::{ForwardReply, RaftNode, ReadIndexReply};
use crate::state::Command;

/// The tonic `Raft` service of one node.
pub struct RaftService {
    node: Arc<RaftNode>,
}

impl RaftService {
    pub fn new(node: Arc<RaftNode>) -> Self {
        Self { node }
    }
}

fn decode<T: serde::de::DeserializeOwned>(req: Request<RaftPayload>) -> Result<T, Status> {
    serde_json::from_slice(&req.into_inner().json).map_err(|e| Status::invalid_argument(format!("bad payload: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Response<RaftPayload>, Status> {
    serde_json::to_vec(v)
        .map(|json| Response::new(RaftPayload { json }))
        .map_err(|e| Status::internal(format!("encoding reply: {e}")))
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let r = self.node.raft.append_entries(decode(req)?).await;
        encode(&r)
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let r = self.node.raft.vote(decode(req)?).await;
        encode(&r)
    }

    async fn install_snapshot(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let r = self.node.raft.install_snapshot(decode(req)?).await;
        encode(&r)
    }

    async fn forward_write(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let cmd: Command = decode(req)?;
        let reply: ForwardReply = self.node.write_local(cmd).await;
        encode(&reply)
    }

    async fn read_index(&self, _req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let reply: ReadIndexReply = self.node.read_index_local().await;
        encode(&reply)
    }
}
