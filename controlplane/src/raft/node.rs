//! One control-plane node's view of Raft: starts openraft over the durable stores, and offers
//! `write` (proposed locally when leading, otherwise forwarded to the leader over gRPC) and
//! `linearizable_read` (leader lease check, or the leader's read index on a follower).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use openraft::error::RaftError;
use openraft::{Config, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use steward_proto::v1::raft_client::RaftClient;
use steward_proto::v1::RaftPayload;

use super::log_store::LogStore;
use steward_proto::tls::{Role, TlsMaterial};

use super::group_commit::GroupCommit;
use super::network::{peer_channels, NetworkFactory};
use super::read_index::Coalescer;
use super::snapshot_policy;
use super::state_machine::{snapshot_file, SmStats, StateMachine};
use super::{NodeId, NodeInfo, Raft};
use crate::state::{Command, Response, Store};
use steward_proto::tls::transport::Channels;

/// Why a write or a linearizable read could not be served. Maps to HTTP 503 / gRPC UNAVAILABLE:
/// the client may retry.
#[derive(Debug, thiserror::Error)]
pub enum RaftApiError {
    #[error("no control-plane leader is known right now (election in progress or no quorum); retry shortly")]
    NoLeader,
    #[error("control-plane leader {leader} did not answer: {message}")]
    LeaderUnreachable { leader: NodeId, message: String },
    #[error("raft: {0}")]
    Raft(String),
    #[error("state store: {0}")]
    Store(String),
}

/// Answer to a forwarded write.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardReply {
    /// Applied on the leader at this log index.
    Ok(Response, u64),
    NotLeader {
        leader: Option<NodeId>,
    },
    Error(String),
}

/// Answer to a read-index request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ReadIndexReply {
    Ok(u64),
    NotLeader { leader: Option<NodeId> },
    Error(String),
}

/// Tunables of the Raft group.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Build a snapshot after at least this many applied entries since the last one (and see
    /// `snapshot_policy` for the log bytes it also waits for).
    pub snapshot_logs: u64,
    /// Entries kept in the log after a snapshot (for slow followers without a snapshot transfer).
    pub keep_logs: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        Self { heartbeat_ms: 100, election_min_ms: 400, election_max_ms: 800, snapshot_logs: 10_000, keep_logs: 1000 }
    }
}

/// A running Raft node with its stores.
pub struct RaftNode {
    pub id: NodeId,
    pub raft: Raft,
    pub store: Store,
    pub log: LogStore,
    pub stats: Arc<SmStats>,
    /// This node's certificate and trust; client configs below present it.
    pub tls: Arc<TlsMaterial>,
    /// Channels to the other control-plane nodes (they must present a control-plane certificate).
    pub peers: Channels,
    /// Client TLS towards agents (they must present an agent certificate).
    pub agent_tls: Arc<rustls::ClientConfig>,
    /// Batches this node's proposals while it leads.
    pub proposals: GroupCommit,
    /// Leadership confirmations shared by concurrent linearizable reads (leader side).
    leader_rounds: Coalescer<ReadIndexReply>,
    /// `ReadIndex` calls to the leader shared by concurrent linearizable reads (follower side).
    follower_rounds: Coalescer<ReadIndexReply>,
}

/// How long a write or read waits for a leader to appear before giving up with 503.
const LEADER_WAIT: Duration = Duration::from_secs(5);

impl RaftNode {
    /// Opens the Raft log and snapshots under `dir`, the state database under `state_dir`
    /// (often the same directory), and starts openraft.
    pub async fn start(
        id: NodeId,
        dir: &Path,
        state_dir: &Path,
        settings: &RaftSettings,
        tls: Arc<TlsMaterial>,
    ) -> anyhow::Result<Arc<Self>> {
        let peer_tls = tls.client_config(&[Role::ControlPlane])?;
        let agent_tls = tls.client_config(&[Role::Agent])?;
        std::fs::create_dir_all(dir)?;
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("creating the state directory {}", state_dir.display()))?;
        let store = Store::open(state_dir).await?;
        let log = LogStore::open(dir).await?;
        let stats = Arc::new(SmStats::default());
        let sm = StateMachine::new(store.clone(), dir, stats.clone());
        let config = Config {
            cluster_name: "steward".into(),
            heartbeat_interval: settings.heartbeat_ms,
            election_timeout_min: settings.election_min_ms,
            election_timeout_max: settings.election_max_ms,
            install_snapshot_timeout: 30_000,
            // Snapshots are triggered by `snapshot_policy`, which also weighs log bytes.
            snapshot_policy: SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: settings.keep_logs,
            purge_batch_size: 256,
            ..Default::default()
        };
        let config = Arc::new(config.validate()?);
        let peers = peer_channels(peer_tls);
        let raft = Raft::new(id, config, NetworkFactory::new(peers.clone()), log.clone(), sm).await?;
        let proposals = GroupCommit::start(raft.clone());
        snapshot_policy::start(raft.clone(), settings.snapshot_logs, log.appended_bytes(), snapshot_file(dir));
        Ok(Arc::new(Self {
            id,
            raft,
            store,
            log,
            stats,
            tls,
            peers,
            agent_tls,
            proposals,
            leader_rounds: Coalescer::default(),
            follower_rounds: Coalescer::default(),
        }))
    }

    /// Initializes a new group with `members` if this node has never been part of one.
    pub async fn bootstrap(&self, members: BTreeMap<NodeId, NodeInfo>) -> anyhow::Result<()> {
        if self.raft.is_initialized().await? {
            return Ok(());
        }
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(e)) => {
                tracing::info!(error = %e, "group already initialized");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Current leader id and address, if known.
    pub fn leader(&self) -> Option<(NodeId, NodeInfo)> {
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        let node = m.membership_config.membership().get_node(&leader).cloned()?;
        Some((leader, node))
    }

    /// True when this node is the leader (per its latest metrics).
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    /// Proposes `cmd` here, batched with concurrent proposals (group commit); reports
    /// `NotLeader` instead of forwarding.
    pub async fn write_local(&self, cmd: Command) -> ForwardReply {
        self.proposals.propose(cmd).await
    }

    /// Proposes `cmd` and waits until it is committed and applied, forwarding to the leader when
    /// this node does not lead. Retries while an election is in progress, up to a deadline.
    pub async fn write(&self, cmd: Command) -> Result<Response, RaftApiError> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            let reply = if self.is_leader() {
                self.write_local(cmd.clone()).await
            } else {
                match self.leader() {
                    Some((lid, node)) if lid != self.id => self.forward_write(lid, &node, &cmd).await?,
                    _ => ForwardReply::NotLeader { leader: None },
                }
            };
            match reply {
                ForwardReply::Ok(r, index) => {
                    // Read-your-writes on this node: wait until the entry is applied here too.
                    self.raft
                        .wait(Some(LEADER_WAIT))
                        .applied_index_at_least(Some(index), "forwarded write")
                        .await
                        .map_err(|e| RaftApiError::Raft(format!("waiting to apply index {index}: {e}")))?;
                    return Ok(r);
                }
                ForwardReply::Error(e) => return Err(RaftApiError::Raft(e)),
                ForwardReply::NotLeader { .. } => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(RaftApiError::NoLeader);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn peer(&self, addr: &str) -> Result<RaftClient<tonic::transport::Channel>, RaftApiError> {
        self.peers.get(addr).map(RaftClient::new).map_err(|e| RaftApiError::Raft(e.to_string()))
    }

    async fn forward_write(
        &self,
        leader: NodeId,
        node: &NodeInfo,
        cmd: &Command,
    ) -> Result<ForwardReply, RaftApiError> {
        let mut client = self.peer(&node.grpc_addr)?;
        let json = serde_json::to_vec(cmd).map_err(|e| RaftApiError::Raft(e.to_string()))?;
        let mut req = tonic::Request::new(RaftPayload { json });
        req.set_timeout(LEADER_WAIT);
        match client.forward_write(req).await {
            Ok(r) => serde_json::from_slice(&r.into_inner().json).map_err(|e| RaftApiError::Raft(e.to_string())),
            // The leader may have just died: report "not leader" so the caller waits for a new one.
            Err(s) if s.code() == tonic::Code::Unavailable => {
                tracing::debug!(leader, error = %s, "forwarding write failed");
                Ok(ForwardReply::NotLeader { leader: None })
            }
            Err(s) => Err(RaftApiError::LeaderUnreachable { leader, message: s.message().to_string() }),
        }
    }

    /// Leader side of a read index: confirms leadership with a quorum and returns the index a
    /// reader must have applied.
    pub async fn read_index_local(&self) -> ReadIndexReply {
        let raft = self.raft.clone();
        let round = move || -> futures::future::BoxFuture<'static, ReadIndexReply> {
            let raft = raft.clone();
            Box::pin(async move { confirm_leadership(&raft).await })
        };
        self.leader_rounds
            .join(round)
            .await
            .unwrap_or_else(|| ReadIndexReply::Error("read-index round failed (node shutting down)".into()))
    }

    /// Asks the leader at `addr` for its read index, sharing the call with concurrent readers.
    async fn read_index_remote(&self, leader: NodeId, addr: &str) -> Result<ReadIndexReply, RaftApiError> {
        let client = self.peer(addr)?;
        let round = move || -> futures::future::BoxFuture<'static, ReadIndexReply> {
            let mut client = client.clone();
            Box::pin(async move {
                let mut req = tonic::Request::new(RaftPayload { json: b"null".to_vec() });
                req.set_timeout(LEADER_WAIT);
                match client.read_index(req).await {
                    Ok(r) => serde_json::from_slice(&r.into_inner().json)
                        .unwrap_or_else(|e| ReadIndexReply::Error(format!("leader's read index reply: {e}"))),
                    Err(s) => {
                        tracing::debug!(leader, error = %s, "read index failed");
                        ReadIndexReply::NotLeader { leader: None }
                    }
                }
            })
        };
        Ok(self
            .follower_rounds
            .join(round)
            .await
            .unwrap_or_else(|| ReadIndexReply::Error("read-index round failed (node shutting down)".into())))
    }

    /// Makes the next local read linearizable: on the leader, confirm leadership; on a follower,
    /// fetch the leader's read index and wait until it is applied here.
    pub async fn linearizable_read(&self) -> Result<(), RaftApiError> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            let reply = if self.is_leader() {
                self.read_index_local().await
            } else if let Some((lid, node)) = self.leader().filter(|(l, _)| *l != self.id) {
                self.read_index_remote(lid, &node.grpc_addr).await?
            } else {
                ReadIndexReply::NotLeader { leader: None }
            };
            match reply {
                ReadIndexReply::Ok(index) => {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    return self
                        .raft
                        .wait(Some(left.max(Duration::from_millis(100))))
                        .applied_index_at_least(Some(index), "linearizable read")
                        .await
                        .map(|_| ())
                        .map_err(|e| RaftApiError::Raft(format!("catching up to read index {index}: {e}")));
                }
                ReadIndexReply::Error(e) => return Err(RaftApiError::Raft(e)),
                ReadIndexReply::NotLeader { .. } => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(RaftApiError::NoLeader);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// One leadership confirmation on the leader: a heartbeat round to a quorum; returns the index a
/// reader must have applied.
async fn confirm_leadership(raft: &Raft) -> ReadIndexReply {
    match raft.ensure_linearizable().await {
        Ok(log_id) => ReadIndexReply::Ok(log_id.map(|l| l.index).unwrap_or(0)),
        Err(RaftError::APIError(e)) => match e {
            openraft::error::CheckIsLeaderError::ForwardToLeader(f) => {
                ReadIndexReply::NotLeader { leader: f.leader_id }
            }
            other => ReadIndexReply::Error(other.to_string()),
        },
        Err(e) => ReadIndexReply::Error(e.to_string()),
    }
}
