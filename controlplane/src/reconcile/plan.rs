//! Where a database goes, from the replicated state: gathers the hosts and clusters that could
//! take it and asks the pure rules in `placement` (new databases, restores, moves and drains all
//! place the same way). Apply re-checks what must not race (names, ports).

use sqlx::SqlitePool;

use super::placement::{self, Candidate, HaCluster, HaPlacement, Placement, PlacementError};
use crate::state::model::{cluster_state, member_role, Cluster, Host, Member};
use crate::state::query;

/// Why nothing was planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// No host or cluster fits; the message says why.
    #[error("{0}")]
    NoPlace(#[from] PlacementError),
    #[error("reading the state: {0}")]
    Storage(#[from] sqlx::Error),
}

/// The decision: an existing cluster, or a new one with its members.
#[derive(Debug, Clone)]
pub struct Planned {
    pub cluster_id: String,
    pub new_cluster: Option<Cluster>,
    pub new_members: Vec<Member>,
    /// PostgreSQL database and role names already used in the chosen cluster.
    pub taken_pg_names: Vec<String>,
}

/// What a placement must stay away from: a move does not go back to its own cluster (nor, for
/// a `single` database, to its host, whose one single cluster it is).
#[derive(Debug, Clone, Default)]
pub struct Avoid {
    pub hosts: Vec<String>,
    pub clusters: Vec<String>,
}

/// Gathers placement candidates from the local replica. Runs for every new database, so it reads
/// per-host aggregates (SQLite does the scanning) instead of every cluster, member and database.
async fn candidates(pool: &SqlitePool, avoid: &Avoid) -> Result<(Vec<Candidate>, Vec<Host>), sqlx::Error> {
    use std::collections::HashMap;
    let hosts = query::hosts(pool).await?;
    let mut ports: HashMap<String, Vec<u16>> = HashMap::new();
    for (host, port) in query::member_ports(pool).await? {
        if let Ok(p) = u16::try_from(port) {
            ports.entry(host).or_default().push(p);
        }
    }
    let databases: HashMap<String, i64> = query::database_counts_by_host(pool).await?.into_iter().collect();
    let mut singles: HashMap<String, String> = HashMap::new();
    for (host, cluster) in query::single_clusters(pool).await? {
        singles.entry(host).or_insert(cluster);
    }
    let candidates = hosts
        .iter()
        .filter(|h| !avoid.hosts.contains(&h.id))
        .map(|h| Candidate {
            host_id: h.id.clone(),
            // A host without PostgreSQL binaries (pg_major 0) cannot take databases, nor can
            // one that is down or being drained.
            active: h.accepts_databases() && h.pg_major > 0,
            zone: h.zone.clone(),
            memory_budget_bytes: h.memory_budget_bytes as u64,
            disk_free_bytes: h.disk_free_bytes as u64,
            base_port: u16::try_from(h.pg_port).unwrap_or(5432),
            used_ports: ports.get(&h.id).cloned().unwrap_or_default(),
            cluster_id: singles.get(&h.id).cloned(),
            databases: databases.get(&h.id).copied().unwrap_or(0).max(0) as u64,
        })
        .collect();
    Ok((candidates, hosts))
}

/// Names (databases and roles) used in a cluster, so a new one picks a free name.
pub async fn taken_names(pool: &SqlitePool, cluster_id: &str) -> Result<Vec<String>, sqlx::Error> {
    let mut taken = Vec::new();
    for d in query::databases_in_cluster(pool, cluster_id).await? {
        taken.push(d.pg_name);
        taken.push(d.role_name);
    }
    Ok(taken)
}

/// Plans the placement of a database of `availability`, away from `avoid`.
pub async fn plan_placement(pool: &SqlitePool, availability: &str, avoid: &Avoid) -> Result<Planned, PlanError> {
    let (candidates, hosts) = candidates(pool, avoid).await?;
    let existing = |cluster_id: String| async move {
        let taken = taken_names(pool, &cluster_id).await?;
        Ok::<_, PlanError>(Planned { cluster_id, new_cluster: None, new_members: vec![], taken_pg_names: taken })
    };
    let pg_major = |host_id: &str| hosts.iter().find(|h| h.id == host_id).map(|h| h.pg_major).unwrap_or(0);
    let new_cluster =
        |id: String, primary: &str, port: u16, availability: &str, replication_password: String| Cluster {
            id,
            pg_major: pg_major(primary),
            primary_host: primary.to_string(),
            port: i64::from(port),
            epoch: 1,
            state: cluster_state::CREATING.into(),
            created_at: crate::now(),
            availability: availability.into(),
            replication_password,
        };
    if availability == "ha" {
        let clusters = query::clusters(pool).await?;
        let counts = query::database_counts(pool).await?;
        let mut ha = Vec::new();
        for c in clusters.iter().filter(|c| c.availability == "ha" && !avoid.clusters.contains(&c.id)) {
            let members = query::members(pool, &c.id).await?;
            let healthy = c.state == cluster_state::READY
                && members.iter().all(|m| {
                    m.state == cluster_state::READY
                        && m.role != member_role::FAILED
                        && hosts.iter().any(|h| h.id == m.host_id && h.accepts_databases())
                });
            let databases = counts.iter().find(|(id, _)| id == &c.id).map(|(_, n)| *n as u64).unwrap_or(0);
            ha.push(HaCluster { cluster_id: c.id.clone(), databases, healthy });
        }
        return match placement::place_ha(&candidates, &ha)? {
            HaPlacement::Existing { cluster_id } => existing(cluster_id).await,
            HaPlacement::New { members } => {
                let id = format!("ha-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
                let (primary, port) = members[0].clone();
                let cluster = new_cluster(id.clone(), &primary, port, "ha", new_password());
                let new_members = members
                    .iter()
                    .enumerate()
                    .map(|(i, (host, port))| Member {
                        cluster_id: id.clone(),
                        host_id: host.clone(),
                        port: i64::from(*port),
                        role: if i == 0 { member_role::PRIMARY } else { member_role::STANDBY }.into(),
                        state: cluster_state::CREATING.into(),
                    })
                    .collect();
                Ok(Planned { cluster_id: id, new_cluster: Some(cluster), new_members, taken_pg_names: vec![] })
            }
        };
    }
    match placement::place(&candidates)? {
        Placement::Existing { cluster_id, .. } => existing(cluster_id).await,
        Placement::New { host_id } => {
            let c = candidates.iter().find(|c| c.host_id == host_id);
            let port = c.map(placement::free_port).unwrap_or(5432);
            let cluster = new_cluster(format!("single-{host_id}"), &host_id, port, "single", String::new());
            let member = Member {
                cluster_id: cluster.id.clone(),
                host_id: host_id.clone(),
                port: i64::from(port),
                role: member_role::PRIMARY.into(),
                state: cluster_state::CREATING.into(),
            };
            Ok(Planned {
                cluster_id: cluster.id.clone(),
                new_cluster: Some(cluster),
                new_members: vec![member],
                taken_pg_names: vec![],
            })
        }
    }
}

/// A random password (database roles, replication and move roles).
pub fn new_password() -> String {
    use rand::distributions::{Alphanumeric, DistString};
    Alphanumeric.sample_string(&mut rand::thread_rng(), 32)
}
