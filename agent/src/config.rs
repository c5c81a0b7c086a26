//! Agent configuration: TOML file, overridden by flags and `STEWARD_*` environment variables,
//! resolved into [`AgentConfig`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Bad configuration, naming the setting and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("parsing config file {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("{0}")]
    Invalid(String),
}

/// Flags of `steward-agent run` (each may also come from the config file).
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentArgs {
    /// TOML file with any of these settings.
    #[arg(long, env = "STEWARD_AGENT_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Control-plane gRPC address (host:port); repeat for each node. The agent follows the leader.
    #[arg(long = "control-plane", env = "STEWARD_CONTROL_PLANE", value_delimiter = ',')]
    #[serde(default)]
    pub control_plane: Vec<String>,
    /// Listen address of the agent's command service. Default 0.0.0.0:7410.
    #[arg(long, env = "STEWARD_AGENT_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address the control plane dials for commands (default: the listen address).
    #[arg(long, env = "STEWARD_AGENT_ADVERTISE")]
    pub advertise: Option<String>,
    /// Where PostgreSQL data and agent state live (local NVMe). Default /var/lib/steward/agent.
    #[arg(long, env = "STEWARD_DATA_PATH")]
    pub data_path: Option<PathBuf>,
    /// Failure-domain label used to spread replicas. Default "default".
    #[arg(long, env = "STEWARD_ZONE")]
    pub zone: Option<String>,
    /// Stable host id (default: generated once and kept in the data path).
    #[arg(long, env = "STEWARD_HOST_ID")]
    pub host_id: Option<String>,
    /// Address clients use to reach PostgreSQL on this host (default: the advertise host).
    #[arg(long, env = "STEWARD_PG_HOST")]
    pub pg_host: Option<String>,
    /// PostgreSQL listen_addresses. Default "*".
    #[arg(long, env = "STEWARD_PG_LISTEN")]
    pub pg_listen: Option<String>,
    /// Port PostgreSQL listens on. Default 5432.
    #[arg(long, env = "STEWARD_PG_PORT")]
    pub pg_port: Option<u16>,
    /// Memory PostgreSQL may use on this host, in MiB (default: all of the host's memory).
    #[arg(long, env = "STEWARD_MEMORY_BUDGET_MB")]
    pub memory_budget_mb: Option<u64>,
    /// PostgreSQL major version to run (default: the newest installed).
    #[arg(long, env = "STEWARD_PG_MAJOR")]
    pub pg_major: Option<u32>,
    /// Backup repository every instance on this host archives its WAL into: an absolute
    /// directory, on shared storage (NFS) in production so any host can restore from it, and
    /// created (owned by the PostgreSQL user) if missing; or an S3 bucket,
    /// `s3://BUCKET/PREFIX?endpoint=URL&region=NAME` (see docs/backup-format.md for
    /// credentials). Unset: WAL is not archived.
    #[arg(long, env = "STEWARD_REPO")]
    pub repo: Option<String>,
    /// WAL files pushed at once by archive-push's background pusher (asynchronous mode, with a
    /// spool next to each PGDATA); 0 pushes each file within the archive_command call. Default 2.
    #[arg(long, env = "STEWARD_ARCHIVE_PROCESSES", value_parser = clap::value_parser!(u16).range(0..=64))]
    pub archive_processes: Option<u16>,
    /// Stop PostgreSQL when the agent exits (development only: in production PostgreSQL keeps
    /// serving across agent restarts).
    #[arg(long)]
    #[serde(default)]
    pub stop_postgres_on_exit: bool,
    /// Directory with this host's TLS files: ca.pem (the cluster CA), node.pem and node.key
    /// (this host's certificate, for host id = its name). Default <data-path>/tls.
    #[arg(long, env = "STEWARD_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// One-time join token (`stewardctl join-token create --role agent`): on first start, gets
    /// this host's certificate from --join-url. Not needed once the TLS directory is filled.
    #[arg(long, env = "STEWARD_JOIN_TOKEN", hide_env_values = true)]
    #[serde(skip)]
    pub join_token: Option<String>,
    /// REST address of a control-plane node to join through (e.g. 10.0.0.1:7480).
    #[arg(long, env = "STEWARD_JOIN_URL")]
    pub join_url: Option<String>,
    /// Serve Prometheus metrics over plain HTTP at http://ADDR/metrics (e.g. 127.0.0.1:9187, or
    /// the host's internal address for a remote Prometheus). Off unless set. Exposes no secrets.
    #[arg(long, env = "STEWARD_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

/// Resolved agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub control_plane: Vec<String>,
    pub listen: SocketAddr,
    pub advertise: String,
    pub data_path: PathBuf,
    pub zone: String,
    pub host_id: Option<String>,
    pub pg_host: String,
    pub pg_listen: String,
    pub pg_port: u16,
    pub memory_budget_bytes: Option<u64>,
    pub pg_major: Option<u32>,
    pub stop_postgres_on_exit: bool,
    /// Backup repository location for WAL archiving (a directory or an `s3://` URL), if any.
    pub repo: Option<String>,
    /// Background WAL pushes at once (0: synchronous archive-push).
    pub archive_processes: u16,
    /// The steward-agent executable PostgreSQL runs as archive_command (default: this
    /// executable; set when agents run inside another program, as in `steward-controlplane dev`).
    pub archive_exe: Option<PathBuf>,
    /// Where this host's certificate, key and the CA bundle live.
    pub tls_dir: PathBuf,
    /// Join token and the control-plane REST address to use it at, for the first start.
    pub join: Option<(String, String)>,
    /// Where the plain-HTTP Prometheus listener binds, if it is on.
    pub metrics_listen: Option<SocketAddr>,
}

fn load_file(path: &Path) -> Result<AgentArgs, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })
}

impl AgentArgs {
    /// Merges file and flags and applies defaults.
    pub fn resolve(self) -> Result<AgentConfig, ConfigError> {
        let file = match &self.config {
            Some(p) => load_file(p)?,
            None => AgentArgs::default(),
        };
        let control_plane = if self.control_plane.is_empty() { file.control_plane } else { self.control_plane };
        if control_plane.is_empty() {
            return Err(ConfigError::Invalid(
                "no control plane given: pass --control-plane HOST:PORT (repeat for each node)".into(),
            ));
        }
        let listen = self.listen.or(file.listen).unwrap_or_else(|| ([0, 0, 0, 0], 7410).into());
        let advertise = self.advertise.or(file.advertise).unwrap_or_else(|| listen.to_string());
        if advertise.starts_with("0.0.0.0") {
            return Err(ConfigError::Invalid(
                "the agent listens on 0.0.0.0: pass --advertise HOST:PORT with an address the control plane can dial"
                    .into(),
            ));
        }
        let pg_host = self
            .pg_host
            .or(file.pg_host)
            .unwrap_or_else(|| steward_proto::tls::transport::host_of(&advertise).to_string());
        let repo = self.repo.or(file.repo);
        if let Some(r) = &repo {
            if r.contains("://") {
                // the same parser the repository uses, so a bad URL stops the agent here
                crate::backup::repo::Location::parse(r).map_err(|e| ConfigError::Invalid(format!("repo: {e}")))?;
            } else if !Path::new(r).is_absolute() {
                return Err(ConfigError::Invalid(format!(
                    "repo {r} is relative: PostgreSQL runs archive_command in PGDATA, so pass an absolute path"
                )));
            }
        }
        let data_path = self.data_path.or(file.data_path).unwrap_or_else(|| PathBuf::from("/var/lib/steward/agent"));
        let tls_dir = self.tls_dir.or(file.tls_dir).unwrap_or_else(|| data_path.join("tls"));
        let join_token = self.join_token.map(|t| t.trim().to_string()).filter(|t| !t.is_empty());
        let join = match (join_token, self.join_url.or(file.join_url)) {
            (Some(t), Some(u)) => Some((t, u)),
            (None, None) | (None, Some(_)) => None,
            (Some(_), None) => {
                return Err(ConfigError::Invalid(
                    "--join-token needs --join-url: the REST address of a control-plane node".into(),
                ))
            }
        };
        Ok(AgentConfig {
            control_plane,
            listen,
            advertise,
            data_path,
            zone: self.zone.or(file.zone).unwrap_or_else(|| "default".into()),
            host_id: self.host_id.or(file.host_id),
            pg_host,
            pg_listen: self.pg_listen.or(file.pg_listen).unwrap_or_else(|| "*".into()),
            pg_port: self.pg_port.or(file.pg_port).unwrap_or(5432),
            memory_budget_bytes: self.memory_budget_mb.or(file.memory_budget_mb).map(|mb| mb << 20),
            pg_major: self.pg_major.or(file.pg_major),
            stop_postgres_on_exit: self.stop_postgres_on_exit || file.stop_postgres_on_exit,
            repo,
            archive_processes: self.archive_processes.or(file.archive_processes).unwrap_or(2),
            archive_exe: None,
            tls_dir,
            join,
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requires_control_plane_and_dialable_address() {
        assert!(AgentArgs::default().resolve().is_err());
        let a = AgentArgs { control_plane: vec!["127.0.0.1:7400".into()], ..Default::default() };
        assert!(a.resolve().unwrap_err().to_string().contains("--advertise"));
        let a = AgentArgs {
            control_plane: vec!["127.0.0.1:7400".into()],
            listen: Some("127.0.0.1:7411".parse().unwrap()),
            ..Default::default()
        };
        let c = a.resolve().unwrap();
        assert_eq!(c.pg_host, "127.0.0.1");
        assert_eq!(c.pg_port, 5432);
        assert_eq!(c.repo, None);
        let a = AgentArgs {
            control_plane: vec!["127.0.0.1:7400".into()],
            listen: Some("127.0.0.1:7411".parse().unwrap()),
            repo: Some("relative/repo".into()),
            ..Default::default()
        };
        assert!(a.resolve().unwrap_err().to_string().contains("absolute"));
        let with_repo = |repo: &str| AgentArgs {
            control_plane: vec!["127.0.0.1:7400".into()],
            listen: Some("127.0.0.1:7411".parse().unwrap()),
            repo: Some(repo.into()),
            ..Default::default()
        };
        let c = with_repo("s3://steward/prod?endpoint=http://127.0.0.1:9000").resolve().unwrap();
        assert_eq!(c.repo.as_deref(), Some("s3://steward/prod?endpoint=http://127.0.0.1:9000"));
        let e = with_repo("s3://steward?endpoint=127.0.0.1:9000").resolve().unwrap_err().to_string();
        assert!(e.contains("not an http:// or https:// URL"), "{e}");
        assert!(with_repo("nfs://server/export").resolve().is_err());
    }

    #[test]
    fn metrics_listener_is_off_unless_configured() {
        let base = || AgentArgs {
            control_plane: vec!["127.0.0.1:7400".into()],
            listen: Some("127.0.0.1:7411".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(base().resolve().unwrap().metrics_listen, None);
        let flag = AgentArgs { metrics_listen: Some("127.0.0.1:9187".parse().unwrap()), ..base() };
        assert_eq!(flag.resolve().unwrap().metrics_listen, Some("127.0.0.1:9187".parse().unwrap()));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, "metrics_listen = \"10.0.0.7:9187\"\n").unwrap();
        let from_file = AgentArgs { config: Some(file), ..base() };
        assert_eq!(from_file.resolve().unwrap().metrics_listen, Some("10.0.0.7:9187".parse().unwrap()));
    }
}
