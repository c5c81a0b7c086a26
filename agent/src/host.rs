//! This host's PostgreSQL instances as the agent manages them: the durable records of what the
//! control plane asked for, the live `Instance` objects, and the runtime facts (leases, last
//! observed status) the monitor and the heartbeat share.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use steward_proto::v1::InstanceStatus;
use tokio::sync::{Mutex, Notify};

use crate::config::AgentConfig;
use crate::lease::{PeerPromise, PrimaryLease};
use crate::pg::{Instance, InstanceSpec, PgBinaries, PgError, Role, RunAs, ServerCert, Upstream, WalArchiving};
use crate::state::{epoch_allowed, AgentState, ClusterRecord, StateError};

/// Why a command was refused before it touched PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("stale epoch {got} for cluster {cluster}: this agent has seen epoch {known}")]
    StaleEpoch { cluster: String, got: u64, known: u64 },
    #[error("port {port} is already used by cluster {other} on this host")]
    PortTaken { port: u16, other: String },
    #[error("cluster {0} has no instance on this host")]
    Unknown(String),
    #[error("{0}")]
    NotAllowed(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Pg(#[from] PgError),
}

/// Runtime facts about one cluster's instance (not persisted).
#[derive(Debug, Clone, Default)]
pub struct Runtime {
    pub lease: PrimaryLease,
    /// Promise this standby gave the primary (peer lease).
    pub promise: Option<PeerPromise>,
    /// The instance was seen running since the agent started (so "not running" means it died).
    pub was_running: bool,
    /// When the monitor's latest observation of this instance began.
    pub observed_at: Option<Instant>,
    /// When a command last finished applying this instance: observations that began earlier
    /// are stale about whether it runs.
    pub applied_at: Option<Instant>,
    /// A peer-lease round is in flight.
    pub peer_refresh: bool,
    /// Failed restarts in a row, and when the next one may be tried (backoff).
    pub restart_failures: u32,
    pub next_restart: Option<Instant>,
    pub status: InstanceStatus,
    /// What the backup repository holds for this primary (refreshed by `repo_report`).
    pub repo_report: Option<crate::repo_report::StanzaReport>,
    /// The primary's archiver state and when it was read (refreshed by the monitor).
    pub archiver: Option<(Instant, crate::pg::archiver::ArchiverStatus)>,
}

/// Everything the command service, the monitor and the heartbeat loop share.
pub struct Host {
    pub cfg: AgentConfig,
    pub run_as: RunAs,
    /// WAL archiving every instance of this host gets (from `--repo`), if any.
    pub archiving: Option<WalArchiving>,
    /// Major version of the PostgreSQL binaries found at start (0 if none were found).
    pub pg_major: u32,
    /// The certificate every instance of this host serves TLS with (this host's certificate,
    /// replaced when it is renewed).
    pub server_cert: std::sync::RwLock<ServerCert>,
    pub state: Mutex<AgentState>,
    pub instances: Mutex<HashMap<String, Arc<Instance>>>,
    pub runtime: Mutex<HashMap<String, Runtime>>,
    /// Serialises commands that change instances (initdb, clone, config, start, promote).
    pub ops: Mutex<()>,
    /// Wakes the heartbeat loop early when something the control plane must know changed.
    pub wake: Notify,
    pub started: Instant,
    /// Backups the control plane asked for, joined by retries of the same operation.
    pub backups: crate::jobs::JobTable<steward_proto::v1::BackupReply>,
    /// Database restores (clones) the control plane asked for, likewise.
    pub restores: crate::jobs::JobTable<steward_proto::v1::RestoreDatabaseReply>,
    /// Archives of databases and loads of archives, likewise.
    pub archives: crate::jobs::JobTable<steward_proto::v1::ArchiveDatabaseReply>,
    pub loads: crate::jobs::JobTable<steward_proto::v1::LoadArchiveReply>,
    /// Steps of database moves, one at a time per move.
    pub moves: crate::jobs::KeyedLocks,
    /// This host's certificate and trust (reloaded on renewal).
    pub tls: Arc<steward_proto::tls::TlsMaterial>,
    /// Client TLS towards control-plane nodes.
    pub cp_tls: Arc<rustls::ClientConfig>,
    /// Channels to other agents (peer lease checks, every monitor tick), kept open: a new
    /// mutual-TLS connection per check cost a handshake five times a second per standby, inside
    /// the check's 300 ms deadline.
    pub peers: steward_proto::tls::transport::Channels,
}

/// Slot name of a member on its primary.
pub fn slot_for(member: &str) -> String {
    let s: String =
        member.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect();
    format!("steward_{s}")
}

impl Host {
    pub fn new(
        cfg: AgentConfig,
        run_as: RunAs,
        archiving: Option<WalArchiving>,
        pg_major: u32,
        server_cert: ServerCert,
        state: AgentState,
        tls: Arc<steward_proto::tls::TlsMaterial>,
    ) -> Result<Self, steward_proto::tls::TlsError> {
        use steward_proto::tls::Role;
        let cp_tls = tls.client_config(&[Role::ControlPlane])?;
        let peer_tls = tls.client_config(&[Role::Agent])?;
        let peers = steward_proto::tls::transport::Channels::new(
            peer_tls,
            std::time::Duration::from_millis(300),
            steward_proto::tls::transport::KeepAlive::PEER,
        );
        Ok(Self {
            tls,
            cp_tls,
            peers,
            cfg,
            run_as,
            archiving,
            pg_major,
            server_cert: std::sync::RwLock::new(server_cert),
            state: Mutex::new(state),
            instances: Mutex::new(HashMap::new()),
            runtime: Mutex::new(HashMap::new()),
            ops: Mutex::new(()),
            wake: Notify::new(),
            started: Instant::now(),
            backups: Default::default(),
            restores: Default::default(),
            archives: Default::default(),
            loads: Default::default(),
            moves: Default::default(),
        })
    }

    fn state_dir(&self) -> PathBuf {
        self.cfg.data_path.join("agent")
    }

    /// Memory PostgreSQL may use: configured budget or the host's memory.
    pub fn memory_budget(&self) -> u64 {
        self.cfg.memory_budget_bytes.unwrap_or_else(|| {
            crate::facts::host_resources(&self.cfg.data_path).map(|r| r.memory_bytes).unwrap_or(1 << 30)
        })
    }

    fn instance_for(&self, cluster_id: &str, port: u16, pg_major: Option<u32>) -> Result<Instance, PgError> {
        let bins = PgBinaries::discover(pg_major.filter(|m| *m > 0).or(self.cfg.pg_major))?;
        let cores = crate::facts::host_resources(&self.cfg.data_path).map(|r| r.cores).unwrap_or(1);
        let spec = InstanceSpec {
            cluster_id: cluster_id.to_string(),
            data_dir: self.cfg.data_path.join("clusters").join(cluster_id).join("pgdata"),
            socket_dir: self.cfg.data_path.join("run"),
            port,
            listen_addresses: self.cfg.pg_listen.clone(),
            memory_budget_bytes: self.memory_budget(),
            cores,
            archive: self.archiving.clone(),
        };
        let inst = Instance::new(spec, bins, self.run_as.clone());
        inst.set_server_cert(self.current_server_cert());
        Ok(inst)
    }

    /// The certificate instances serve now.
    pub fn current_server_cert(&self) -> ServerCert {
        match self.server_cert.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Takes this host's (renewed) certificate from its TLS directory and has every running
    /// instance serve it, reloading PostgreSQL's configuration (no restart).
    pub async fn rotate_server_cert(&self) -> Result<(), PgError> {
        let dir = self.tls.dir();
        let cert = ServerCert::load(&dir.node_cert(), &dir.node_key())?;
        match self.server_cert.write() {
            Ok(mut c) => *c = cert.clone(),
            Err(poisoned) => *poisoned.into_inner() = cert.clone(),
        }
        let _ops = self.ops.lock().await;
        let instances: Vec<Arc<Instance>> = self.instances.lock().await.values().cloned().collect();
        for inst in instances {
            inst.rotate_server_cert(cert.clone()).await?;
        }
        Ok(())
    }

    /// The live instance object of a cluster (created on first use).
    pub async fn instance(&self, cluster_id: &str, rec: &ClusterRecord) -> Result<Arc<Instance>, PgError> {
        let mut map = self.instances.lock().await;
        if let Some(i) = map.get(cluster_id).filter(|i| i.spec().port == rec.port) {
            return Ok(i.clone());
        }
        let i = Arc::new(self.instance_for(cluster_id, rec.port, Some(rec.pg_major))?);
        map.insert(cluster_id.to_string(), i.clone());
        Ok(i)
    }

    /// Accepts a command's epoch and record for a cluster, persisting both before anything acts
    /// on them. A newer epoch clears a fence.
    pub async fn admit(
        &self,
        cluster_id: &str,
        epoch: u64,
        update: Option<ClusterRecord>,
    ) -> Result<ClusterRecord, Refusal> {
        let mut st = self.state.lock().await;
        let known = st.clusters.get(cluster_id).cloned();
        if !epoch_allowed(known.as_ref().map(|k| k.epoch), epoch) {
            return Err(Refusal::StaleEpoch {
                cluster: cluster_id.into(),
                got: epoch,
                known: known.map(|k| k.epoch).unwrap_or(0),
            });
        }
        let mut record = match (known.clone(), update) {
            (_, Some(u)) => u,
            (Some(k), None) => k,
            (None, None) => return Err(Refusal::Unknown(cluster_id.into())),
        };
        let newer = known.as_ref().is_none_or(|k| epoch > k.epoch);
        record.epoch = epoch;
        record.fenced = if newer { false } else { known.as_ref().is_some_and(|k| k.fenced) && record.is_primary() };
        if let Some((other, _)) = st.clusters.iter().find(|(id, r)| r.port == record.port && id.as_str() != cluster_id)
        {
            return Err(Refusal::PortTaken { port: record.port, other: other.clone() });
        }
        if known.as_ref() != Some(&record) {
            st.clusters.insert(cluster_id.to_string(), record.clone());
            let dir = self.state_dir();
            st.save(&dir)?;
        }
        Ok(record)
    }

    /// Marks a primary fenced (durably): it stays stopped until a command with a newer epoch.
    pub async fn fence(&self, cluster_id: &str, why: &str) {
        // Record first: whatever happens next, this member is not to serve again at this epoch.
        self.mark_fenced(cluster_id, why).await;
        if let Some(inst) = self.instances.lock().await.get(cluster_id).cloned() {
            // SIGKILL rather than `pg_ctl stop`: it also works on a hung or stopped postmaster.
            if let Err(e) = inst.kill_now().await {
                tracing::error!(cluster = %cluster_id, error = %e, "fencing: killing PostgreSQL failed");
            }
        }
    }

    /// Planned fence (switchover): marks the primary fenced first, so the monitor cannot restart
    /// it, then stops it with a fast shutdown, which streams all WAL to connected standbys.
    /// Returns the shutdown checkpoint's LSN.
    pub async fn fence_gracefully(&self, cluster_id: &str, epoch: u64) -> Result<u64, Refusal> {
        let rec = self.admit(cluster_id, epoch, None).await?;
        if !rec.is_primary() {
            return Err(Refusal::NotAllowed(format!("this member of {cluster_id} is not the primary")));
        }
        let _ops = self.ops.lock().await;
        self.mark_fenced(cluster_id, "planned switchover").await;
        let inst = self.instance(cluster_id, &rec).await?;
        if let Err(e) = inst.stop().await {
            tracing::warn!(cluster = %cluster_id, error = %e, "fast shutdown failed: stopping immediately");
            inst.stop_immediate().await?;
        }
        Ok(inst.checkpoint_lsn().await?)
    }

    async fn mark_fenced(&self, cluster_id: &str, why: &str) {
        let mut st = self.state.lock().await;
        if let Some(rec) = st.clusters.get_mut(cluster_id) {
            if !rec.fenced {
                rec.fenced = true;
                let dir = self.state_dir();
                if let Err(e) = st.save(&dir) {
                    tracing::error!(cluster = %cluster_id, error = %e, "recording the fence failed");
                }
            }
        }
        tracing::warn!(cluster = %cluster_id, reason = why, "primary fenced: PostgreSQL stopped");
        self.wake.notify_one();
    }

    fn upstream(rec: &ClusterRecord) -> Upstream {
        Upstream {
            host: rec.upstream_host.clone(),
            port: rec.upstream_port,
            password: rec.replication_password.clone(),
        }
    }

    /// Brings the instance to what `rec` describes: initdb (primary) or clone/rewind (standby),
    /// configuration, start, replication role and slots. Idempotent. Returns whether it created
    /// the data directory now.
    pub async fn apply(&self, cluster_id: &str, rec: &ClusterRecord) -> Result<(Arc<Instance>, bool), PgError> {
        let _guard = self.ops.lock().await;
        self.apply_locked(cluster_id, rec).await
    }

    /// Counts the control plane's command for this primary as a lease grant.
    pub async fn grant_from_command(&self, cluster_id: &str, lease_ms: u32) {
        if lease_ms > 0 {
            let mut rt = self.runtime.lock().await;
            rt.entry(cluster_id.to_string())
                .or_default()
                .lease
                .granted(Instant::now(), Duration::from_millis(u64::from(lease_ms)));
        }
    }

    /// [`Host::apply`] for a caller that already holds `ops` (so the monitor cannot act on a
    /// half-applied record).
    pub async fn apply_locked(&self, cluster_id: &str, rec: &ClusterRecord) -> Result<(Arc<Instance>, bool), PgError> {
        let inst = self.instance(cluster_id, rec).await?;
        let name =
            if rec.member_name.is_empty() { self.state.lock().await.host_id.clone() } else { rec.member_name.clone() };
        let created = if rec.is_primary() {
            inst.set_role(Role::Primary { synchronous_standby_names: rec.synchronous_standby_names.clone() }, &name);
            let created = inst.ensure_initialized().await?;
            inst.write_config().await?;
            // Only control-plane commands start an HA primary (the monitor fences instead of
            // restarting one): the command is the grant, counted from when PostgreSQL starts
            // rather than from when a slow initdb began.
            self.grant_from_command(cluster_id, rec.lease_ms).await;
            inst.start().await?;
            if !rec.replication_password.is_empty() {
                inst.ensure_replication_role(&crate::pg::scram_verifier(&rec.replication_password)).await?;
            }
            if !rec.slots.is_empty() {
                inst.ensure_slots(&rec.slots).await?;
            }
            created
        } else {
            let upstream = Self::upstream(rec);
            let was_primary = inst.is_initialized() && !inst.spec().data_dir.join("standby.signal").exists();
            if was_primary {
                tracing::info!(cluster = %cluster_id, "rejoining a former primary as standby: pg_rewind");
                inst.stop_immediate().await?;
                if let Err(e) = inst.rewind_from(&upstream, &rec.slot_name, &name).await {
                    tracing::warn!(cluster = %cluster_id, error = %e, "pg_rewind failed: cloning afresh");
                    let aside = crate::pg::paths::move_aside(&inst.spec().data_dir)?;
                    tracing::warn!(cluster = %cluster_id, kept = %aside.display(), "old data directory moved aside");
                }
            }
            let cloned = Instance::clone_from(&inst, &upstream, &rec.slot_name, &name).await?;
            inst.set_role(Role::Standby { upstream, slot_name: rec.slot_name.clone() }, &name);
            inst.write_config().await?;
            inst.start().await?;
            cloned
        };
        let mut rt = self.runtime.lock().await;
        let e = rt.entry(cluster_id.to_string()).or_default();
        e.was_running = true;
        e.applied_at = Some(Instant::now());
        Ok((inst, created))
    }

    /// Promotes this host's standby of the cluster.
    ///
    /// `old_primary_fenced`: the control plane saw the old primary's agent report it fenced, so
    /// a promise made to it protects nothing any more.
    pub async fn promote(
        &self,
        cluster_id: &str,
        epoch: u64,
        sync_names: &str,
        slots: &[String],
        old_primary_fenced: bool,
    ) -> Result<(), Refusal> {
        let _guard = self.ops.lock().await;
        let promise = self.runtime.lock().await.get(cluster_id).and_then(|r| r.promise);
        if !old_primary_fenced {
            crate::lease::may_promote(promise, epoch, Instant::now()).map_err(Refusal::NotAllowed)?;
        }
        let current = self
            .state
            .lock()
            .await
            .clusters
            .get(cluster_id)
            .cloned()
            .ok_or_else(|| Refusal::Unknown(cluster_id.into()))?;
        let mut rec = current.clone();
        rec.role = "primary".into();
        rec.synchronous_standby_names = sync_names.to_string();
        rec.slots = slots.to_vec();
        rec.upstream_host.clear();
        rec.upstream_port = 0;
        rec.slot_name.clear();
        // The control plane chose this member: it holds a lease from now (before the record says
        // "primary", so the monitor never sees a primary without one).
        self.grant_from_command(cluster_id, rec.lease_ms).await;
        let rec = self.admit(cluster_id, epoch, Some(rec)).await?;
        let inst = self.instance(cluster_id, &rec).await?;
        inst.promote(sync_names).await?;
        if !slots.is_empty() {
            inst.ensure_slots(slots).await?;
        }
        let mut rt = self.runtime.lock().await;
        let r = rt.entry(cluster_id.to_string()).or_default();
        r.promise = None;
        r.was_running = true;
        tracing::info!(cluster = %cluster_id, epoch, "promoted to primary");
        drop(rt);
        self.wake.notify_one();
        Ok(())
    }

    /// Last observed status of every instance (filled in by the monitor).
    pub async fn statuses(&self) -> Vec<InstanceStatus> {
        let st = self.state.lock().await.clone();
        let rt = self.runtime.lock().await;
        st.clusters
            .iter()
            .map(|(id, rec)| {
                let mut s = rt.get(id).map(|r| r.status.clone()).unwrap_or_default();
                // An observation that is not recent says nothing about health now (e.g. the
                // monitor waits on a hung PostgreSQL): report the probe as failing.
                let stale = rt.get(id).and_then(|r| r.observed_at).is_none_or(|t| t.elapsed() > Duration::from_secs(3));
                if stale && s.probe_ok {
                    s.probe_ok = false;
                    s.error = "no recent observation: PostgreSQL does not answer".into();
                }
                if let Some((_, a)) = rt.get(id).and_then(|r| r.archiver) {
                    s.archiving = a.enabled;
                    s.archive_queue = a.queue;
                    s.archive_failures = a.failures;
                    s.archive_last_success_unix = a.last_success_unix;
                }
                if let Some(r) = rt.get(id).and_then(|r| r.repo_report) {
                    s.backup_last_success_unix = r.last_backup_unix;
                    s.repository_bytes = r.bytes;
                }
                s.cluster_id = id.clone();
                s.epoch = rec.epoch;
                s.port = u32::from(rec.port);
                s.fenced = rec.fenced;
                if s.role.is_empty() {
                    s.role = if s.running { rec.role.clone() } else { "stopped".into() };
                }
                s
            })
            .collect()
    }
}
