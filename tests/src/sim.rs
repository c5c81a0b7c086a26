//! A simulated agent speaking the real gRPC protocol (register + heartbeats, following the
//! leader), for tests that need hosts but not PostgreSQL; one that also serves the agents'
//! command service ([`ServedAgent`]), so the control plane can provision databases on it; and
//! an operator client.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use steward_proto::tls::TlsMaterial;
use steward_proto::v1::agent_server::{Agent, AgentServer};
use steward_proto::v1::control_plane_client::ControlPlaneClient;
use steward_proto::v1::operator_client::OperatorClient;
use steward_proto::v1::*;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

fn channel(addr: &str) -> Result<Channel> {
    crate::tls::operator_channel(addr)
}

/// Facts of a fake host with plenty of capacity, whose agent address is unreachable.
pub fn facts(host_id: &str) -> HostFacts {
    facts_at(host_id, "127.0.0.1:9")
}

/// Facts of a fake host with plenty of capacity whose command service is at `agent_addr`.
pub fn facts_at(host_id: &str, agent_addr: &str) -> HostFacts {
    HostFacts {
        host_id: host_id.into(),
        hostname: host_id.into(),
        agent_addr: agent_addr.into(),
        zone: "sim".into(),
        cores: 4,
        memory_bytes: 8 << 30,
        disk_free_bytes: 100 << 30,
        disk_total_bytes: 200 << 30,
        data_path: "/nonexistent".into(),
        agent_version: "sim".into(),
        pg_major: 15,
        pg_host: "127.0.0.1".into(),
        pg_port: 5432,
        memory_budget_bytes: 4 << 30,
    }
}

/// Registers `host_id` and heartbeats every 300 ms until the returned task is aborted (it is
/// aborted on drop of the handle by the caller, and ends by itself after `lifetime`).
pub fn spawn_host(nodes: Vec<String>, host_id: &str, lifetime: Duration) -> tokio::task::JoinHandle<()> {
    let host_id = host_id.to_string();
    tokio::spawn(async move {
        let end = Instant::now() + lifetime;
        heartbeat_loop(&nodes, &host_id, Duration::from_millis(300), end, |_, _| {}).await;
    })
}

/// A simulated agent with an agent certificate for `host_id`: registers, then heartbeats every
/// `every` until `end`, following the leader hint (or the next node) after a failure.
/// `on_beat(sent, latency)` is called for each answered heartbeat.
pub async fn heartbeat_loop(
    nodes: &[String],
    host_id: &str,
    every: Duration,
    end: Instant,
    mut on_beat: impl FnMut(Instant, Duration),
) {
    let material = match crate::tls::host_material(host_id) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("simulated host {host_id}: no certificate: {e:#}");
            return;
        }
    };
    let beat = Beat { facts: facts(host_id), material, instances: None, registered: false };
    heartbeat_loop_with(nodes, &beat, every, end, |sent, took| {
        if let Some(took) = took {
            on_beat(sent, took)
        }
    })
    .await
}

/// What a simulated agent sends: its facts, certificate and (for a [`ServedAgent`]) the
/// instances it runs.
#[derive(Clone)]
pub struct Beat {
    pub facts: HostFacts,
    pub material: Arc<TlsMaterial>,
    pub instances: Option<Instances>,
    /// Start with heartbeats rather than a registration (an agent that was registered before
    /// and resumes after a pause; it registers again if the control plane does not know it).
    pub registered: bool,
}

/// [`heartbeat_loop`] for any [`Beat`]; `on_beat(sent, latency)` is called for every heartbeat
/// sent after registration, with `None` when it failed (no answer, or not the leader).
pub async fn heartbeat_loop_with(
    nodes: &[String],
    beat: &Beat,
    every: Duration,
    end: Instant,
    mut on_beat: impl FnMut(Instant, Option<Duration>),
) {
    let f = &beat.facts;
    let Some(first) = nodes.first() else { return };
    let mut target = first.clone();
    let mut i = 0usize;
    let mut registered = beat.registered;
    let mut client: Option<ControlPlaneClient<Channel>> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while Instant::now() < end {
        tick.tick().await;
        if client.is_none() {
            match crate::tls::channel_with(&target, &beat.material) {
                Ok(ch) => client = Some(ControlPlaneClient::new(ch)),
                Err(_) => return,
            }
        }
        let Some(c) = client.as_mut() else { continue };
        let sent = Instant::now();
        let r = if registered {
            let instances = beat.instances.as_ref().map(Instances::report).unwrap_or_default();
            let mut req = tonic::Request::new(HeartbeatRequest { facts: Some(f.clone()), instances });
            req.set_timeout(Duration::from_secs(5));
            c.heartbeat(req).await.map(|r| r.into_inner().known)
        } else {
            let mut req = tonic::Request::new(RegisterRequest { facts: Some(f.clone()) });
            req.set_timeout(Duration::from_secs(5));
            c.register(req).await.map(|_| true)
        };
        match r {
            Ok(known) => {
                if registered {
                    on_beat(sent, Some(sent.elapsed()));
                }
                registered = known;
            }
            Err(s) => {
                if registered {
                    on_beat(sent, None);
                }
                client = None;
                match s.metadata().get("x-steward-leader").and_then(|v| v.to_str().ok()) {
                    Some(l) => target = l.to_string(),
                    None => {
                        i = (i + 1) % nodes.len();
                        target = nodes[i].clone();
                    }
                }
            }
        }
    }
}

/// The instances a [`ServedAgent`] was asked to run, by cluster id, as it reports them.
#[derive(Clone, Default)]
pub struct Instances {
    inner: Arc<Mutex<SimState>>,
}

#[derive(Default)]
struct SimState {
    instances: HashMap<String, InstanceStatus>,
    databases: HashSet<(String, String)>,
}

/// A made-up WAL position, the same on every member (no lag).
const SIM_LSN: u64 = 0x0300_0000;

impl Instances {
    fn lock(&self) -> std::sync::MutexGuard<'_, SimState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What a heartbeat reports: every instance, as it runs.
    pub fn report(&self) -> Vec<InstanceStatus> {
        self.lock().instances.values().cloned().collect()
    }

    /// Instances and databases this agent holds.
    pub fn counts(&self) -> (usize, usize) {
        let s = self.lock();
        (s.instances.len(), s.databases.len())
    }

    /// Refuses an epoch older than the newest seen for the cluster, as a real agent does.
    // gRPC handlers answer with tonic::Status, the protocol's own error type (as in the agent).
    #[allow(clippy::result_large_err)]
    fn check_epoch(s: &SimState, cluster_id: &str, epoch: u64) -> Result<(), Status> {
        match s.instances.get(cluster_id) {
            Some(i) if epoch < i.epoch => Err(Status::failed_precondition(format!(
                "epoch {epoch} of cluster {cluster_id} is older than {} seen on this host",
                i.epoch
            ))),
            _ => Ok(()),
        }
    }
}

fn running(cluster_id: &str, epoch: u64, port: u32, standby: bool) -> InstanceStatus {
    InstanceStatus {
        cluster_id: cluster_id.into(),
        epoch,
        running: true,
        role: if standby { "standby" } else { "primary" }.into(),
        port,
        in_recovery: standby,
        timeline: 1,
        received_lsn: SIM_LSN,
        replayed_lsn: SIM_LSN,
        probe_ok: true,
        ..Default::default()
    }
}

/// The agents' command service without PostgreSQL: instance and database commands succeed at
/// once and are remembered (and reported in heartbeats); backups, restores, archives and moves
/// are refused as unimplemented.
struct SimAgentService {
    facts: HostFacts,
    state: Instances,
}

#[allow(clippy::result_large_err)]
fn sim_only<T>(what: &str) -> Result<Response<T>, Status> {
    Err(Status::unimplemented(format!("{what}: a simulated agent has no PostgreSQL")))
}

#[tonic::async_trait]
impl Agent for SimAgentService {
    async fn ensure_instance(
        &self,
        req: Request<EnsureInstanceRequest>,
    ) -> Result<Response<EnsureInstanceReply>, Status> {
        let r = req.into_inner();
        if r.cluster_id.is_empty() || r.port == 0 || r.port > 65535 {
            return Err(Status::invalid_argument("cluster_id and port (1-65535) are required"));
        }
        let standby = match r.role.as_str() {
            "" | "primary" => false,
            "standby" => true,
            other => return Err(Status::invalid_argument(format!("role '{other}' is not 'primary' or 'standby'"))),
        };
        let mut s = self.state.lock();
        Instances::check_epoch(&s, &r.cluster_id, r.epoch)?;
        let initialized = !s.instances.contains_key(&r.cluster_id);
        let status = running(&r.cluster_id, r.epoch, r.port, standby);
        s.instances.insert(r.cluster_id.clone(), status.clone());
        Ok(Response::new(EnsureInstanceReply { status: Some(status), initialized }))
    }

    async fn ensure_database(
        &self,
        req: Request<EnsureDatabaseRequest>,
    ) -> Result<Response<EnsureDatabaseReply>, Status> {
        let r = req.into_inner();
        let mut s = self.state.lock();
        Instances::check_epoch(&s, &r.cluster_id, r.epoch)?;
        match s.instances.get(&r.cluster_id) {
            Some(i) if i.running && i.role == "primary" => {}
            _ => return Err(Status::failed_precondition("this member is not a serving primary")),
        }
        let created = s.databases.insert((r.cluster_id, r.database));
        Ok(Response::new(EnsureDatabaseReply { created }))
    }

    async fn status(&self, _req: Request<AgentStatusRequest>) -> Result<Response<AgentStatusReply>, Status> {
        Ok(Response::new(AgentStatusReply { facts: Some(self.facts.clone()), instances: self.state.report() }))
    }

    async fn promote(&self, req: Request<PromoteRequest>) -> Result<Response<PromoteReply>, Status> {
        let r = req.into_inner();
        let mut s = self.state.lock();
        Instances::check_epoch(&s, &r.cluster_id, r.epoch)?;
        let port = s
            .instances
            .get(&r.cluster_id)
            .map(|i| i.port)
            .ok_or_else(|| Status::failed_precondition(format!("no member of cluster {} here", r.cluster_id)))?;
        let status = running(&r.cluster_id, r.epoch, port, false);
        s.instances.insert(r.cluster_id, status.clone());
        Ok(Response::new(PromoteReply { status: Some(status) }))
    }

    async fn peer_lease(&self, req: Request<PeerLeaseRequest>) -> Result<Response<PeerLeaseReply>, Status> {
        let r = req.into_inner();
        let s = self.state.lock();
        Instances::check_epoch(&s, &r.cluster_id, r.epoch)?;
        Ok(Response::new(PeerLeaseReply { granted: true, reason: String::new() }))
    }

    async fn fence(&self, req: Request<FenceRequest>) -> Result<Response<FenceReply>, Status> {
        let r = req.into_inner();
        let mut s = self.state.lock();
        Instances::check_epoch(&s, &r.cluster_id, r.epoch)?;
        if let Some(i) = s.instances.get_mut(&r.cluster_id) {
            i.running = false;
            i.fenced = true;
            i.role = "stopped".into();
        }
        Ok(Response::new(FenceReply { final_lsn: SIM_LSN }))
    }

    async fn backup(&self, _req: Request<BackupRequest>) -> Result<Response<BackupReply>, Status> {
        sim_only("Backup")
    }

    async fn switch_wal(&self, _req: Request<SwitchWalRequest>) -> Result<Response<SwitchWalReply>, Status> {
        sim_only("SwitchWal")
    }

    async fn restore_database(
        &self,
        _req: Request<RestoreDatabaseRequest>,
    ) -> Result<Response<RestoreDatabaseReply>, Status> {
        sim_only("RestoreDatabase")
    }

    async fn archive_database(
        &self,
        _req: Request<ArchiveDatabaseRequest>,
    ) -> Result<Response<ArchiveDatabaseReply>, Status> {
        sim_only("ArchiveDatabase")
    }

    async fn load_archive(&self, _req: Request<LoadArchiveRequest>) -> Result<Response<LoadArchiveReply>, Status> {
        sim_only("LoadArchive")
    }

    async fn delete_archive(
        &self,
        _req: Request<DeleteArchiveRequest>,
    ) -> Result<Response<DeleteArchiveReply>, Status> {
        sim_only("DeleteArchive")
    }

    async fn move_source(&self, _req: Request<MoveSourceRequest>) -> Result<Response<MoveSourceReply>, Status> {
        sim_only("MoveSource")
    }

    async fn move_target(&self, _req: Request<MoveTargetRequest>) -> Result<Response<MoveTargetReply>, Status> {
        sim_only("MoveTarget")
    }
}

/// A simulated agent serving the agents' command service on its own port of 127.0.0.1 with its
/// agent certificate (valid for 127.0.0.1, the address the control plane dials), behind the
/// same access rule as a real agent. It stops serving when dropped.
pub struct ServedAgent {
    pub host_id: String,
    /// `127.0.0.1:<port>`, advertised as `agent_addr`.
    pub addr: String,
    pub instances: Instances,
    /// What its heartbeats send (facts with `addr`, certificate, instances).
    pub beat: Beat,
    server: tokio::task::JoinHandle<()>,
}

impl ServedAgent {
    /// Binds a port and starts serving; register and heartbeat with [`heartbeat_loop_with`] and
    /// [`ServedAgent::beat`].
    pub async fn start(host_id: &str) -> Result<Self> {
        let material = crate::tls::host_material(host_id)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding a simulated agent port")?;
        let addr = listener.local_addr()?.to_string();
        let facts = facts_at(host_id, &addr);
        let instances = Instances::default();
        let svc = steward_proto::tls::transport::Gate::new(
            AgentServer::new(SimAgentService { facts: facts.clone(), state: instances.clone() }),
            steward_agent::tls::access,
        );
        let incoming = steward_proto::tls::transport::incoming(listener, material.server_config(true, &[b"h2"])?);
        let name = host_id.to_string();
        let server = tokio::spawn(async move {
            if let Err(e) = tonic::transport::Server::builder().add_service(svc).serve_with_incoming(incoming).await {
                eprintln!("simulated agent {name}: command service failed: {e}");
            }
        });
        let beat = Beat { facts, material, instances: Some(instances.clone()), registered: false };
        Ok(Self { host_id: host_id.into(), addr, instances, beat, server })
    }
}

impl Drop for ServedAgent {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Operator gRPC client for `addr` with the admin token attached to each request by [`op_req`].
pub fn operator(addr: &str) -> Result<OperatorClient<Channel>> {
    Ok(OperatorClient::new(channel(addr).context("operator channel")?))
}

/// Wraps a message with the admin token.
pub fn op_req<T>(token: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Ok(v) = format!("Bearer {token}").parse() {
        r.metadata_mut().insert("authorization", v);
    }
    r.set_timeout(Duration::from_secs(30));
    r
}
