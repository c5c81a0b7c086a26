//! The agent's gRPC command service: idempotent, epoch-checked commands from the control plane.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use steward_proto::v1::agent_server::Agent;
use steward_proto::v1::{
    AgentStatusReply, AgentStatusRequest, EnsureDatabaseReply, EnsureDatabaseRequest, EnsureInstanceReply,
    EnsureInstanceRequest, InstanceStatus,
};
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};

use crate::config::AgentConfig;
use crate::pg::{Instance, InstanceSpec, PgBinaries, PgError, RunAs};
use crate::state::{epoch_allowed, AgentState, ClusterRecord};

/// Everything the command service and the heartbeat loop share.
pub struct Host {
    pub cfg: AgentConfig,
    pub run_as: RunAs,
    /// Major version of the PostgreSQL binaries found at start (0 if none were found).
    pub pg_major: u32,
    pub state: Mutex<AgentState>,
    pub instances: Mutex<HashMap<String, Arc<Instance>>>,
    /// Serialises commands that change instances (initdb, config, start).
    pub ops: Mutex<()>,
}

impl Host {
    fn state_dir(&self) -> PathBuf {
        self.cfg.data_path.join("agent")
    }

    /// Memory PostgreSQL may use: configured budget or the host's memory.
    pub fn memory_budget(&self) -> u64 {
        self.cfg.memory_budget_bytes.unwrap_or_else(|| {
            crate::facts::host_resources(&self.cfg.data_path).map(|r| r.memory_bytes).unwrap_or(1 << 30)
        })
    }

    /// The instance object for a cluster at `port`.
    pub fn instance_for(&self, cluster_id: &str, port: u16, pg_major: Option<u32>) -> Result<Instance, PgError> {
        let bins = PgBinaries::discover(pg_major.or(self.cfg.pg_major))?;
        let cores = crate::facts::host_resources(&self.cfg.data_path).map(|r| r.cores).unwrap_or(1);
        let spec = InstanceSpec {
            cluster_id: cluster_id.to_string(),
            data_dir: self.cfg.data_path.join("clusters").join(cluster_id).join("pgdata"),
            socket_dir: self.cfg.data_path.join("run"),
            port,
            listen_addresses: self.cfg.pg_listen.clone(),
            memory_budget_bytes: self.memory_budget(),
            cores,
        };
        Ok(Instance::new(spec, bins, self.run_as.clone()))
    }

    /// Persists the newest epoch and placement of a cluster before acting on it.
    async fn admit(&self, cluster_id: &str, epoch: u64, port: Option<u16>, pg_major: u32) -> Result<(), Status> {
        let mut st = self.state.lock().await;
        let known = st.clusters.get(cluster_id).cloned();
        if !epoch_allowed(known.as_ref().map(|k| k.epoch), epoch) {
            return Err(Status::failed_precondition(format!(
                "stale epoch {epoch} for cluster {cluster_id}: this agent has seen epoch {}",
                known.map(|k| k.epoch).unwrap_or(0)
            )));
        }
        let record = match (known, port) {
            (Some(k), None) => ClusterRecord { epoch, ..k },
            (_, Some(port)) => ClusterRecord { epoch, port, pg_major },
            (None, None) => {
                return Err(Status::failed_precondition(format!(
                    "cluster {cluster_id} has no instance on this host yet"
                )))
            }
        };
        if let Some((other, _)) = st.clusters.iter().find(|(id, r)| r.port == record.port && id.as_str() != cluster_id)
        {
            return Err(Status::already_exists(format!(
                "port {} is already used by cluster {other} on this host",
                record.port
            )));
        }
        if st.clusters.get(cluster_id) != Some(&record) {
            st.clusters.insert(cluster_id.to_string(), record);
            let dir = self.state_dir();
            st.save(&dir).map_err(|e| Status::internal(e.to_string()))?;
        }
        Ok(())
    }

    /// Initializes (if needed), configures and starts the cluster's instance.
    pub async fn ensure_instance(
        &self,
        cluster_id: &str,
        port: u16,
        pg_major: Option<u32>,
    ) -> Result<(Arc<Instance>, bool), PgError> {
        let _guard = self.ops.lock().await;
        let existing = self.instances.lock().await.get(cluster_id).cloned();
        let inst = match existing {
            Some(i) if i.spec().port == port => i,
            _ => Arc::new(self.instance_for(cluster_id, port, pg_major)?),
        };
        let initialized = inst.ensure_initialized().await?;
        inst.write_config().await?;
        inst.start().await?;
        self.instances.lock().await.insert(cluster_id.to_string(), inst.clone());
        Ok((inst, initialized))
    }

    /// Observed state of every instance, for heartbeats and status.
    pub async fn statuses(&self) -> Vec<InstanceStatus> {
        let st = self.state.lock().await.clone();
        let instances = self.instances.lock().await.clone();
        let mut out = Vec::new();
        for (id, rec) in st.clusters {
            let running = match instances.get(&id) {
                Some(i) => i.is_running().await,
                None => false,
            };
            out.push(InstanceStatus {
                cluster_id: id,
                epoch: rec.epoch,
                running,
                role: if running { "primary".into() } else { "stopped".into() },
                port: u32::from(rec.port),
                error: String::new(),
            });
        }
        out
    }
}

fn valid_cluster_id(id: &str) -> Result<(), Status> {
    if id.is_empty() || id.len() > 128 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(Status::invalid_argument("cluster_id must be 1-128 letters, digits, '-' or '_'"));
    }
    Ok(())
}

fn pg_status(e: PgError) -> Status {
    Status::internal(e.to_string())
}

/// The tonic service.
pub struct AgentService {
    pub host: Arc<Host>,
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn ensure_instance(
        &self,
        req: Request<EnsureInstanceRequest>,
    ) -> Result<Response<EnsureInstanceReply>, Status> {
        let r = req.into_inner();
        valid_cluster_id(&r.cluster_id)?;
        let port = u16::try_from(r.port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| Status::invalid_argument("port must be 1-65535"))?;
        let major = (r.pg_major > 0).then_some(r.pg_major);
        self.host.admit(&r.cluster_id, r.epoch, Some(port), r.pg_major).await?;
        tracing::info!(cluster = %r.cluster_id, epoch = r.epoch, port, "ensure instance");
        let (inst, initialized) = self.host.ensure_instance(&r.cluster_id, port, major).await.map_err(pg_status)?;
        let running = inst.is_running().await;
        Ok(Response::new(EnsureInstanceReply {
            status: Some(InstanceStatus {
                cluster_id: r.cluster_id,
                epoch: r.epoch,
                running,
                role: "primary".into(),
                port: r.port,
                error: String::new(),
            }),
            initialized,
        }))
    }

    async fn ensure_database(
        &self,
        req: Request<EnsureDatabaseRequest>,
    ) -> Result<Response<EnsureDatabaseReply>, Status> {
        let r = req.into_inner();
        valid_cluster_id(&r.cluster_id)?;
        self.host.admit(&r.cluster_id, r.epoch, None, 0).await?;
        let inst = self.host.instances.lock().await.get(&r.cluster_id).cloned();
        let inst = match inst {
            Some(i) => i,
            None => {
                let rec = self.host.state.lock().await.clusters.get(&r.cluster_id).cloned();
                let rec =
                    rec.ok_or_else(|| Status::failed_precondition("no instance for this cluster on this host"))?;
                self.host.ensure_instance(&r.cluster_id, rec.port, Some(rec.pg_major)).await.map_err(pg_status)?.0
            }
        };
        tracing::info!(cluster = %r.cluster_id, database = %r.database, role = %r.role, "ensure database");
        let created = inst.ensure_database(&r.database, &r.role, &r.password_scram).await.map_err(pg_status)?;
        Ok(Response::new(EnsureDatabaseReply { created }))
    }

    async fn status(&self, _req: Request<AgentStatusRequest>) -> Result<Response<AgentStatusReply>, Status> {
        let facts = crate::heartbeat::facts(&self.host).await;
        Ok(Response::new(AgentStatusReply { facts: Some(facts), instances: self.host.statuses().await }))
    }
}
