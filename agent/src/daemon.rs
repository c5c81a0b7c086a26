//! The agent daemon: loads its state, restarts the instances it ran before, serves commands
//! and heartbeats to the control plane.

use std::net::SocketAddr;
use std::sync::Arc;

use steward_proto::v1::agent_server::AgentServer;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::AgentConfig;
use crate::host::Host;
use crate::pg::{PgError, RunAs, WalArchiving};
use crate::service::AgentService;
use crate::state::AgentState;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("creating data path {path}: {source}")]
    DataPath { path: std::path::PathBuf, source: std::io::Error },
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(
        "backup repository {}: {source}; create it writable by the PostgreSQL user, or mount the shared storage there",
        path.display()
    )]
    Repo { path: std::path::PathBuf, source: std::io::Error },
    /// An S3 repository that cannot be used as configured (no credentials, for example):
    /// refused at start rather than at the first archive_command.
    #[error(transparent)]
    Backup(#[from] crate::backup::BackupError),
    #[error("finding this executable for archive_command: {0}")]
    Exe(std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] steward_proto::tls::TlsError),
    #[error("binding the agent's command service on {addr}: {source} (is another agent running?)")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
}

/// A running agent.
pub struct RunningAgent {
    pub host: Arc<Host>,
    pub addr: SocketAddr,
    /// Where Prometheus metrics are served (`--metrics-listen`), if they are.
    pub metrics_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

/// Creates the repository directory if missing (owned by the PostgreSQL user, which runs
/// archive_command) and checks that user can reach it; an S3 repository is opened once, so
/// missing credentials stop the agent here. Returns the archiving settings.
fn prepare_repo(
    location: &str,
    exe: Option<&std::path::Path>,
    async_processes: u16,
    run_as: &RunAs,
) -> Result<WalArchiving, DaemonError> {
    let agent_exe = match exe {
        Some(e) => e.to_path_buf(),
        None => std::env::current_exe().map_err(DaemonError::Exe)?,
    };
    let repo = match crate::backup::repo::Location::parse(location)? {
        crate::backup::repo::Location::Posix(dir) => dir,
        crate::backup::repo::Location::S3(loc) => {
            crate::backup::s3::S3Repo::open(loc)?;
            return Ok(WalArchiving { agent_exe, repo: location.to_string(), async_processes });
        }
    };
    let repo = repo.as_path();
    let err = |source| DaemonError::Repo { path: repo.to_path_buf(), source };
    if !repo.exists() {
        std::fs::create_dir_all(repo).map_err(err)?;
        run_as.chown(repo)?;
        tracing::info!(repo = %repo.display(), "created the backup repository");
    }
    crate::pg::paths::check_traversable(run_as, repo)?;
    Ok(WalArchiving { agent_exe, repo: location.to_string(), async_processes })
}

/// Starts the agent and returns once its command service listens.
pub async fn start(cfg: AgentConfig) -> Result<RunningAgent, DaemonError> {
    std::fs::create_dir_all(&cfg.data_path)
        .map_err(|source| DaemonError::DataPath { path: cfg.data_path.clone(), source })?;
    let run_as = RunAs::detect()?;
    let state_dir = cfg.data_path.join("agent");
    // A host without a configured or stored id takes the one its certificate names.
    let fresh = !state_dir.join("agent-state.json").exists();
    let from_cert = if cfg.host_id.is_none() && fresh { crate::tls::host_id_from_cert(&cfg) } else { None };
    let mut state = AgentState::load_or_new(&state_dir, cfg.host_id.as_deref().or(from_cert.as_deref()))?;
    let tls = crate::tls::prepare(&cfg, &state.host_id).await?;
    if state.generation == 0 {
        state.save(&state_dir)?;
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| DaemonError::Bind { addr: cfg.listen, source })?;
    let addr = listener.local_addr().map_err(|source| DaemonError::Bind { addr: cfg.listen, source })?;
    let metrics = match cfg.metrics_listen {
        Some(a) => Some(crate::metrics::Listener::bind(a).await?),
        None => None,
    };
    let pg_major = match crate::pg::PgBinaries::discover(cfg.pg_major) {
        Ok(b) => b.major,
        Err(e) => {
            tracing::error!(error = %e, "no usable PostgreSQL server binaries: this host cannot run databases until they are installed");
            0
        }
    };
    let archiving = match &cfg.repo {
        Some(repo) => Some(prepare_repo(repo, cfg.archive_exe.as_deref(), cfg.archive_processes, &run_as)?),
        None => None,
    };
    // PostgreSQL serves TLS with this host's certificate from the cluster CA (valid for its
    // pg_host), so clients can verify it with the cluster's ca.pem.
    let server_cert = crate::pg::ServerCert::load(&tls.dir().node_cert(), &tls.dir().node_key())?;
    let host = Arc::new(Host::new(cfg, run_as, archiving, pg_major, server_cert, state, tls)?);
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();

    // Bring back the instances this host ran before a restart. HA primaries are left to the
    // monitor: they run only with a lease.
    let known = host.state.lock().await.clusters.clone();
    for (cluster_id, rec) in known {
        if rec.fenced || (rec.is_primary() && rec.lease_ms > 0) {
            continue;
        }
        match host.apply(&cluster_id, &rec).await {
            Ok(_) => tracing::info!(cluster = %cluster_id, port = rec.port, role = %rec.role, "instance running"),
            Err(e) => tracing::error!(cluster = %cluster_id, error = %e, "could not start instance"),
        }
    }
    crate::monitor::observe_all(&host).await;

    let svc = steward_proto::tls::transport::Gate::new(
        AgentServer::new(AgentService { host: host.clone() }),
        crate::tls::access,
    );
    let server_tls = host.tls.server_config(true, &[b"h2"])?;
    let mut rx = stop_rx.clone();
    tasks.spawn(async move {
        let incoming = steward_proto::tls::transport::incoming(listener, server_tls);
        let shutdown = async move {
            while !*rx.borrow() {
                if rx.changed().await.is_err() {
                    break;
                }
            }
        };
        if let Err(e) =
            tonic::transport::Server::builder().add_service(svc).serve_with_incoming_shutdown(incoming, shutdown).await
        {
            tracing::error!(error = %e, "agent command service failed");
        }
    });
    let h = host.clone();
    let mut rx = stop_rx.clone();
    tasks.spawn(async move {
        tokio::select! {
            _ = crate::heartbeat::run(h) => {}
            _ = rx.changed() => {}
        }
    });
    let h = host.clone();
    let mut rx = stop_rx.clone();
    tasks.spawn(async move {
        tokio::select! {
            _ = crate::repo_report::run(h) => {}
            _ = rx.changed() => {}
        }
    });
    let h = host.clone();
    let mut rx = stop_rx.clone();
    tasks.spawn(async move {
        tokio::select! {
            _ = crate::monitor::run(h) => {}
            _ = rx.changed() => {}
        }
    });
    let metrics_addr = metrics.map(|m| {
        let a = m.addr();
        tasks.spawn(m.serve(host.clone(), stop_rx.clone()));
        a
    });
    let h = host.clone();
    let mut rx = stop_rx;
    tasks.spawn(async move {
        tokio::select! {
            _ = crate::tls::maintain(h) => {}
            _ = rx.changed() => {}
        }
    });
    tracing::info!(addr = %addr, data_path = %host.cfg.data_path.display(), "agent started");
    Ok(RunningAgent { host, addr, metrics_addr, stop, tasks })
}

impl RunningAgent {
    /// Stops serving; stops PostgreSQL too when configured to (development).
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        if self.host.cfg.stop_postgres_on_exit {
            let instances = self.host.instances.lock().await.clone();
            for (id, inst) in instances {
                match inst.stop().await {
                    Ok(()) => tracing::info!(cluster = %id, "PostgreSQL stopped"),
                    Err(e) => {
                        tracing::error!(cluster = %id, error = %e, "stopping PostgreSQL failed")
                    }
                }
            }
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM: how daemons (and `systemctl stop`) ask to stop.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_repositories_are_opened_at_start() {
        let run_as = RunAs::detect().unwrap();
        let exe = std::path::Path::new("/usr/bin/steward-agent");
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("s3.env");
        let loc = format!("s3://steward/prod?endpoint=http://127.0.0.1:9&credentials_file={}", creds.display());
        // no credentials file: the agent does not start
        let e = prepare_repo(&loc, Some(exe), 2, &run_as).err().unwrap().to_string();
        assert!(e.contains("s3.env"), "{e}");
        std::fs::write(&creds, "AWS_ACCESS_KEY_ID=k\n").unwrap();
        std::fs::set_permissions(&creds, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let e = prepare_repo(&loc, Some(exe), 2, &run_as).err().unwrap().to_string();
        assert!(e.contains("no S3 credentials"), "{e}");
        std::fs::write(&creds, "AWS_ACCESS_KEY_ID=k\nAWS_SECRET_ACCESS_KEY=s\n").unwrap();
        // no request is sent at start: the endpoint need not be up
        let a = prepare_repo(&loc, Some(exe), 2, &run_as).unwrap();
        assert_eq!((a.repo.as_str(), a.agent_exe.as_path(), a.async_processes), (loc.as_str(), exe, 2));
        // a directory is created and kept as given
        let repo = dir.path().join("repo");
        let a = prepare_repo(&repo.display().to_string(), Some(exe), 0, &run_as).unwrap();
        assert!(repo.is_dir());
        assert_eq!(a.repo, repo.display().to_string());
    }
}
