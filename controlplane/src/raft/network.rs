//! Client side of the Raft transport: openraft's RPCs sent over tonic to the peer's `Raft`
//! service, JSON-encoded, with the deadline openraft asks for.

use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::de::DeserializeOwned;
use std::sync::Arc;
use steward_proto::v1::raft_client::RaftClient;
use steward_proto::v1::RaftPayload;

use steward_proto::tls::transport::{Channels, KeepAlive};
use tonic::transport::Channel;

use super::{NodeId, NodeInfo, TypeConfig};

/// One channel per control-plane peer address, shared by everything that talks to peers:
/// openraft's replication streams, votes and leadership checks, forwarded writes, read-index
/// calls and forwarded operator calls. openraft asks for a new client at every leadership
/// check; with a connection each, that was two TLS handshakes per linearizable read round.
pub fn peer_channels(tls: Arc<rustls::ClientConfig>) -> Channels {
    Channels::new(tls, Duration::from_millis(500), KeepAlive::PEER)
}

/// Creates one [`Network`] per peer.
#[derive(Clone)]
pub struct NetworkFactory {
    channels: Channels,
}

impl NetworkFactory {
    pub fn new(channels: Channels) -> Self {
        Self { channels }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Network;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> Self::Network {
        Network { target, client: self.channels.get(&node.grpc_addr).map(RaftClient::new).map_err(|e| e.to_string()) }
    }
}

/// Connection to one peer.
pub struct Network {
    target: NodeId,
    client: Result<RaftClient<Channel>, String>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

type RpcResult<T, E> = Result<T, RPCError<NodeId, NodeInfo, E>>;

impl Network {
    async fn call<Req, Resp, E>(&mut self, kind: RpcKind, req: &Req, option: &RPCOption) -> RpcResult<Resp, E>
    where
        Req: serde::Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = match &mut self.client {
            Ok(c) => c,
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&TransportError(e.clone())))),
        };
        let json = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(RaftPayload { json });
        request.set_timeout(option.hard_ttl());
        let reply = match kind {
            RpcKind::Append => client.append_entries(request).await,
            RpcKind::Vote => client.vote(request).await,
            RpcKind::Snapshot => client.install_snapshot(request).await,
        };
        let reply = match reply {
            Ok(r) => r.into_inner(),
            Err(status)
                if status.code() == tonic::Code::Unavailable || status.code() == tonic::Code::DeadlineExceeded =>
            {
                return Err(RPCError::Unreachable(Unreachable::new(&TransportError(status.message().to_string()))))
            }
            Err(status) => return Err(RPCError::Network(NetworkError::new(&TransportError(status.to_string())))),
        };
        let result: Result<Resp, E> =
            serde_json::from_slice(&reply.json).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

enum RpcKind {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetwork<TypeConfig> for Network {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, RaftError<NodeId>> {
        self.call(RpcKind::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        self.call(RpcKind::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, RaftError<NodeId>> {
        self.call(RpcKind::Vote, &rpc, &option).await
    }
}
