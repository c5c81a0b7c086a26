//! Configuration of a control-plane node: a TOML file, overridden by flags, overridden by
//! environment variables (clap reads `STEWARD_*`), resolved into [`NodeConfig`] with defaults.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::raft::node::RaftSettings;
use crate::raft::{NodeId, NodeInfo};
use crate::reconcile::backup::{parse_interval, BackupPolicy};

/// Errors in configuration, each naming the setting and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("parsing config file {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("{0}")]
    Invalid(String),
}

/// Flags of `steward-controlplane run` (every one may also come from the config file).
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeArgs {
    /// TOML file with any of these settings (flags and environment override it).
    #[arg(long, env = "STEWARD_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Stable id of this node in the Raft group (1, 2, 3, ...).
    #[arg(long, env = "STEWARD_NODE_ID")]
    pub node_id: Option<u64>,
    /// Where the Raft log, snapshots and (unless --state-dir) the state database live.
    #[arg(long, env = "STEWARD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where the state database (state.db) lives. Default <data-dir>/raft. Best on a tmpfs
    /// that survives restarts of the service but not of the host (the packaged unit uses
    /// /run/steward-controlplane): the state is rebuilt from the snapshot and the Raft log
    /// after a reboot anyway, and kept in memory it never competes with the log's fsyncs for
    /// the disk. Needs room for the state (tens of MiB per 10,000 databases).
    #[arg(long, env = "STEWARD_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// gRPC listen address (Raft peers, agents, stewardctl). Default 0.0.0.0:7400.
    #[arg(long, env = "STEWARD_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    /// REST listen address. Default 0.0.0.0:7480.
    #[arg(long, env = "STEWARD_API_LISTEN")]
    pub api_listen: Option<SocketAddr>,
    /// gRPC address other nodes and agents dial (default: the listen address).
    #[arg(long, env = "STEWARD_ADVERTISE_GRPC")]
    pub advertise_grpc: Option<String>,
    /// REST address advertised to peers (default: the listen address).
    #[arg(long, env = "STEWARD_ADVERTISE_API")]
    pub advertise_api: Option<String>,
    /// Member of the initial group, as ID=GRPC_ADDR,API_ADDR; repeat for each (1, 3 or 5 nodes).
    /// Give the same list to every initial node. Omit on a node that will be added later with
    /// `stewardctl raft add-node`.
    #[arg(long = "initial-member", value_name = "ID=GRPC,API")]
    #[serde(default)]
    pub initial_members: Vec<String>,
    /// File holding the admin token (created with a random token if missing).
    #[arg(long, env = "STEWARD_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Raft heartbeat interval in milliseconds (default 100).
    #[arg(long)]
    pub raft_heartbeat_ms: Option<u64>,
    /// Minimum election timeout in milliseconds (default 400; the maximum is twice this). A
    /// follower that stops hearing from its leader starts an election after the leader's lease
    /// (the maximum) plus a random timeout between the minimum and the maximum: 1.2-1.6 s by
    /// default.
    #[arg(long)]
    pub raft_election_ms: Option<u64>,
    /// Build a snapshot after at least this many log entries (default 10000), once the log
    /// since the last snapshot is also half its size, and at the latest after ten times this
    /// many. Each snapshot copies and writes the whole state; more entries mean less disk and
    /// CPU, and a longer replay after a host reboot.
    #[arg(long)]
    pub snapshot_logs: Option<u64>,
    /// Log entries kept after a snapshot (default 1000).
    #[arg(long)]
    pub keep_logs: Option<u64>,
    /// Interval agents heartbeat at, in milliseconds (default 1000).
    #[arg(long)]
    pub agent_heartbeat_ms: Option<u32>,
    /// A host is marked down after this many milliseconds without a heartbeat (default 5000).
    #[arg(long)]
    pub host_down_after_ms: Option<u64>,
    /// Full backup of every cluster that serves databases this often (e.g. 7d, 24h; "off" turns
    /// scheduled backups off). Default 7d. Needs agents started with --repo.
    #[arg(long, env = "STEWARD_BACKUP_FULL_EVERY")]
    pub backup_full_every: Option<String>,
    /// Incremental backups in between, this often (e.g. 1d, 6h; "off": fulls only). Default 1d.
    #[arg(long, env = "STEWARD_BACKUP_INCR_EVERY")]
    pub backup_incr_every: Option<String>,
    /// A deleted database's archive stays in the repository this long (e.g. 30d; 0 removes it
    /// right away). Default 7d.
    #[arg(long, env = "STEWARD_ARCHIVE_DELETE_GRACE")]
    pub archive_delete_grace: Option<String>,
    /// Directory with this node's TLS files: ca.pem (trusted CA bundle), ca.key (the cluster
    /// CA's key), node.pem and node.key. Default <data-dir>/tls. The first node of a new
    /// cluster creates the CA here; other nodes get theirs with --join-token, or from a copy of
    /// ca.pem and ca.key placed here before their first start.
    #[arg(long, env = "STEWARD_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// One-time join token (`stewardctl join-token create --role controlplane`): on first
    /// start, fetches the CA and this node's certificate from --join-url.
    #[arg(long, env = "STEWARD_JOIN_TOKEN", hide_env_values = true)]
    #[serde(skip)]
    pub join_token: Option<String>,
    /// REST address of a running control-plane node to join through (e.g. 10.0.0.1:7480).
    #[arg(long, env = "STEWARD_JOIN_URL")]
    pub join_url: Option<String>,
    /// Lifetime of the certificates this node issues (agents renew theirs after two thirds of
    /// it), e.g. 90d or 12h. Default 90d.
    #[arg(long, env = "STEWARD_CERT_LIFETIME")]
    pub cert_lifetime: Option<String>,
    /// REST requests per second allowed per token (bursts of twice that). Default 50.
    #[arg(long, env = "STEWARD_RATE_LIMIT")]
    pub rate_limit: Option<u32>,
    /// A REST request still running after this long is answered 503 (e.g. 30s). Default 30s.
    #[arg(long, env = "STEWARD_REQUEST_TIMEOUT")]
    pub request_timeout: Option<String>,
}

/// Resolved configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: NodeId,
    pub data_dir: PathBuf,
    /// Directory of the state database.
    pub state_dir: PathBuf,
    pub grpc_listen: SocketAddr,
    pub api_listen: SocketAddr,
    pub advertise: NodeInfo,
    pub initial_members: BTreeMap<NodeId, NodeInfo>,
    pub admin_token_file: PathBuf,
    pub raft: RaftSettings,
    pub agent_heartbeat_ms: u32,
    pub host_down_after: Duration,
    pub backup_policy: BackupPolicy,
    pub archive_grace: Duration,
    pub tls_dir: PathBuf,
    pub join_token: Option<String>,
    pub join_url: Option<String>,
    pub cert_lifetime: Duration,
    pub rate_limit: u32,
    pub request_timeout: Duration,
}

/// The Raft directory under a node's data dir: log, snapshots, and the state unless
/// `--state-dir` puts it elsewhere.
pub fn raft_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("raft")
}

/// Parses `ID=GRPC,API`.
pub fn parse_member(s: &str) -> Result<(NodeId, NodeInfo), ConfigError> {
    let bad = || ConfigError::Invalid(format!("initial member '{s}' must look like 2=10.0.0.2:7400,10.0.0.2:7480"));
    let (id, addrs) = s.split_once('=').ok_or_else(bad)?;
    let id: NodeId = id.trim().parse().map_err(|_| bad())?;
    let (grpc, api) = addrs.split_once(',').ok_or_else(bad)?;
    if id == 0 || grpc.trim().is_empty() || api.trim().is_empty() {
        return Err(bad());
    }
    Ok((id, NodeInfo { grpc_addr: grpc.trim().into(), api_addr: api.trim().into() }))
}

fn load_file(path: &Path) -> Result<NodeArgs, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })
}

impl NodeArgs {
    /// Merges the config file (if any) under these flags and applies defaults.
    pub fn resolve(self) -> Result<NodeConfig, ConfigError> {
        let file = match &self.config {
            Some(p) => load_file(p)?,
            None => NodeArgs::default(),
        };
        let node_id = self.node_id.or(file.node_id).unwrap_or(1);
        if node_id == 0 {
            return Err(ConfigError::Invalid("node_id must be 1 or greater".into()));
        }
        let data_dir =
            self.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from("/var/lib/steward/controlplane"));
        let state_dir = self.state_dir.or(file.state_dir).unwrap_or_else(|| raft_dir(&data_dir));
        let default_grpc: SocketAddr = ([0, 0, 0, 0], 7400).into();
        let default_api: SocketAddr = ([0, 0, 0, 0], 7480).into();
        let grpc_listen = self.grpc_listen.or(file.grpc_listen).unwrap_or(default_grpc);
        let api_listen = self.api_listen.or(file.api_listen).unwrap_or(default_api);
        let advertise = NodeInfo {
            grpc_addr: self.advertise_grpc.or(file.advertise_grpc).unwrap_or_else(|| grpc_listen.to_string()),
            api_addr: self.advertise_api.or(file.advertise_api).unwrap_or_else(|| api_listen.to_string()),
        };
        let members = if self.initial_members.is_empty() { file.initial_members } else { self.initial_members };
        let mut initial_members = BTreeMap::new();
        for m in &members {
            let (id, info) = parse_member(m)?;
            if initial_members.insert(id, info).is_some() {
                return Err(ConfigError::Invalid(format!("initial member id {id} is listed twice")));
            }
        }
        if !initial_members.is_empty() && !initial_members.contains_key(&node_id) {
            return Err(ConfigError::Invalid(format!(
                "this node (id {node_id}) is not among the initial members; list it, or give no initial members to join later"
            )));
        }
        let election = self.raft_election_ms.or(file.raft_election_ms).unwrap_or(400);
        let heartbeat = self.raft_heartbeat_ms.or(file.raft_heartbeat_ms).unwrap_or(100);
        if heartbeat == 0 || heartbeat * 2 > election {
            return Err(ConfigError::Invalid(
                "raft_heartbeat_ms must be > 0 and at most half of raft_election_ms".into(),
            ));
        }
        let raft = RaftSettings {
            heartbeat_ms: heartbeat,
            election_min_ms: election,
            election_max_ms: election * 2,
            snapshot_logs: self.snapshot_logs.or(file.snapshot_logs).unwrap_or(10_000).max(1),
            keep_logs: self.keep_logs.or(file.keep_logs).unwrap_or(1000),
        };
        let interval = |name: &str, v: Option<String>, default: Duration| match v {
            None => Ok(default),
            Some(v) => parse_interval(&v).map_err(|e| ConfigError::Invalid(format!("{name}: {e}"))),
        };
        let defaults = BackupPolicy::default();
        let backup_policy = BackupPolicy {
            full_every: interval(
                "backup_full_every",
                self.backup_full_every.or(file.backup_full_every),
                defaults.full_every,
            )?,
            incr_every: interval(
                "backup_incr_every",
                self.backup_incr_every.or(file.backup_incr_every),
                defaults.incr_every,
            )?,
            retry_after: defaults.retry_after,
        };
        let archive_grace = interval(
            "archive_delete_grace",
            self.archive_delete_grace.or(file.archive_delete_grace),
            Duration::from_secs(7 * 86_400),
        )?;
        let cert_lifetime = interval(
            "cert_lifetime",
            self.cert_lifetime.or(file.cert_lifetime),
            steward_proto::tls::pki::LEAF_LIFETIME,
        )?;
        if cert_lifetime < Duration::from_secs(30) {
            return Err(ConfigError::Invalid("cert_lifetime must be at least 30s".into()));
        }
        let request_timeout =
            interval("request_timeout", self.request_timeout.or(file.request_timeout), Duration::from_secs(30))?;
        if request_timeout.is_zero() {
            return Err(ConfigError::Invalid("request_timeout must be greater than 0 (e.g. 30s)".into()));
        }
        let rate_limit = self.rate_limit.or(file.rate_limit).unwrap_or(50);
        if rate_limit == 0 {
            return Err(ConfigError::Invalid("rate_limit must be at least 1 request per second".into()));
        }
        let tls_dir = self.tls_dir.or(file.tls_dir).unwrap_or_else(|| data_dir.join("tls"));
        let join_token = self.join_token.map(|t| t.trim().to_string()).filter(|t| !t.is_empty());
        let join_url = self.join_url.or(file.join_url);
        if join_token.is_some() != join_url.is_some() {
            return Err(ConfigError::Invalid("--join-token and --join-url go together: give both or neither".into()));
        }
        let admin_token_file =
            self.admin_token_file.or(file.admin_token_file).unwrap_or_else(|| data_dir.join("admin.token"));
        Ok(NodeConfig {
            node_id,
            data_dir,
            state_dir,
            grpc_listen,
            api_listen,
            advertise,
            initial_members,
            admin_token_file,
            raft,
            agent_heartbeat_ms: self.agent_heartbeat_ms.or(file.agent_heartbeat_ms).unwrap_or(1000).max(50),
            host_down_after: Duration::from_millis(self.host_down_after_ms.or(file.host_down_after_ms).unwrap_or(5000)),
            backup_policy,
            archive_grace,
            tls_dir,
            join_token,
            join_url,
            cert_lifetime,
            rate_limit,
            request_timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_parse_and_validate() {
        let (id, info) = parse_member("2=10.0.0.2:7400,10.0.0.2:7480").unwrap();
        assert_eq!(id, 2);
        assert_eq!(info.api_addr, "10.0.0.2:7480");
        assert!(parse_member("x=1,2").is_err());
        assert!(parse_member("2=only-one").is_err());
    }

    #[test]
    fn node_must_be_in_initial_members() {
        let args = NodeArgs { node_id: Some(3), initial_members: vec!["1=a:1,a:2".into()], ..Default::default() };
        assert!(args.resolve().is_err());
    }

    #[test]
    fn file_values_are_overridden_by_flags() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "node_id = 2\nsnapshot_logs = 10\ninitial_members = [\"2=a:1,a:2\"]\n").unwrap();
        let cfg =
            NodeArgs { config: Some(p.clone()), snapshot_logs: Some(20), ..Default::default() }.resolve().unwrap();
        assert_eq!(cfg.node_id, 2);
        assert_eq!(cfg.raft.snapshot_logs, 20);
        assert_eq!(cfg.state_dir, PathBuf::from("/var/lib/steward/controlplane/raft"));
        std::fs::write(&p, "data_dir = \"/d\"\nstate_dir = \"/run/s\"\n").unwrap();
        let cfg = NodeArgs { config: Some(p.clone()), ..Default::default() }.resolve().unwrap();
        assert_eq!((cfg.data_dir, cfg.state_dir), (PathBuf::from("/d"), PathBuf::from("/run/s")));
        std::fs::write(&p, "backup_full_every = \"3d\"\n").unwrap();
        let cfg = NodeArgs { config: Some(p.clone()), backup_incr_every: Some("off".into()), ..Default::default() }
            .resolve()
            .unwrap();
        assert_eq!(cfg.backup_policy.full_every, Duration::from_secs(3 * 86_400));
        assert!(cfg.backup_policy.incr_every.is_zero());
        let err = NodeArgs { backup_full_every: Some("weekly".into()), ..Default::default() }.resolve().unwrap_err();
        assert!(err.to_string().contains("backup_full_every"), "{err}");
        std::fs::write(&p, "nod_id = 2\n").unwrap();
        let err = NodeArgs { config: Some(p), ..Default::default() }.resolve().unwrap_err();
        assert!(err.to_string().contains("nod_id"), "{err}");
    }
}
