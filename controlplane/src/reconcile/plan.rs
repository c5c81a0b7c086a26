//! Where a database goes, from the replicated state: gathers the hosts and clusters that could
//! take it and asks the pure rules in `placement` (new databases, restores, moves and drains all
//! place the same way). Apply re-checks what must not race (names, ports).

use std::collections::HashMap;
use std::sync::Arc;

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
#[derive(Debug)]
pub struct Planned {
    pub cluster_id: String,
    pub new_cluster: Option<Cluster>,
    pub new_members: Vec<Member>,
    /// PostgreSQL database and role names already used in the chosen cluster.
    pub taken_pg_names: Vec<String>,
    /// Counts this placement as pending until the caller drops the plan, which it does once
    /// its write has been applied (or has failed).
    pub held: Reservation,
}

/// Placements this node has planned whose writes are not applied yet, by host (and by HA
/// cluster). Placement reads the replicated state, which does not show them: without this,
/// every create that runs meanwhile picks the same least filled host.
#[derive(Debug, Default)]
pub struct Pending {
    counts: std::sync::Mutex<HashMap<String, u64>>,
}

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        // A panic while holding the lock cannot leave the counts inconsistent (one map update).
        self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Pending placements on `key` (a host id or an HA cluster id).
    pub fn count(&self, key: &str) -> u64 {
        self.lock().get(key).copied().unwrap_or(0)
    }

    /// Counts one placement on each of `keys` until the returned reservation is dropped.
    pub fn reserve(self: &Arc<Self>, keys: Vec<String>) -> Reservation {
        let mut counts = self.lock();
        for k in &keys {
            *counts.entry(k.clone()).or_default() += 1;
        }
        Reservation { pending: Some(self.clone()), keys }
    }
}

/// One planned placement counted in [`Pending`]; dropping it ends the count.
#[derive(Debug, Default)]
pub struct Reservation {
    pending: Option<Arc<Pending>>,
    keys: Vec<String>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let Some(pending) = &self.pending else { return };
        let mut counts = pending.lock();
        for k in &self.keys {
            if let Some(n) = counts.get_mut(k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    counts.remove(k);
                }
            }
        }
    }
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
async fn candidates(
    pool: &SqlitePool,
    pending: &Pending,
    avoid: &Avoid,
) -> Result<(Vec<Candidate>, Vec<Host>), sqlx::Error> {
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
            databases: databases.get(&h.id).copied().unwrap_or(0).max(0) as u64 + pending.count(&h.id),
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

/// Plans the placement of a database of `availability`, away from `avoid`, counting it in
/// `pending` while the plan is held.
pub async fn plan_placement(
    pool: &SqlitePool,
    pending: &Arc<Pending>,
    availability: &str,
    avoid: &Avoid,
) -> Result<Planned, PlanError> {
    let (candidates, hosts) = candidates(pool, pending, avoid).await?;
    let existing = |cluster_id: String, host: Option<String>| async move {
        let taken = taken_names(pool, &cluster_id).await?;
        let held = pending.reserve(vec![host.unwrap_or_else(|| cluster_id.clone())]);
        Ok::<_, PlanError>(Planned { cluster_id, new_cluster: None, new_members: vec![], taken_pg_names: taken, held })
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
            let databases =
                counts.iter().find(|(id, _)| id == &c.id).map(|(_, n)| *n as u64).unwrap_or(0) + pending.count(&c.id);
            ha.push(HaCluster { cluster_id: c.id.clone(), databases, healthy });
        }
        return match placement::place_ha(&candidates, &ha)? {
            HaPlacement::Existing { cluster_id } => existing(cluster_id, None).await,
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
                let held = pending.reserve(members.into_iter().map(|(host, _)| host).collect());
                Ok(Planned { cluster_id: id, new_cluster: Some(cluster), new_members, taken_pg_names: vec![], held })
            }
        };
    }
    match placement::place(&candidates)? {
        Placement::Existing { cluster_id, host_id } => existing(cluster_id, Some(host_id)).await,
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
                held: pending.reserve(vec![host_id]),
            })
        }
    }
}

/// A random password (database roles, replication and move roles).
pub fn new_password() -> String {
    use rand::distributions::{Alphanumeric, DistString};
    Alphanumeric.sample_string(&mut rand::thread_rng(), 32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{apply::apply, Command, Store};

    #[test]
    fn a_reservation_counts_until_dropped() {
        let pending = Arc::new(Pending::default());
        let a = pending.reserve(vec!["h1".into(), "h2".into()]);
        let b = pending.reserve(vec!["h1".into()]);
        assert_eq!((pending.count("h1"), pending.count("h2")), (2, 1));
        drop(a);
        assert_eq!((pending.count("h1"), pending.count("h2")), (1, 0));
        drop(b);
        assert_eq!(pending.count("h1"), 0);
        // A plan without a reservation (an explicit target) counts nothing.
        drop(Reservation::default());
    }

    /// Creates that run at once all read the same state; held plans must steer each to another
    /// host instead of all to the least filled one.
    #[tokio::test]
    async fn concurrent_plans_spread_over_the_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        for id in ["h1", "h2", "h3"] {
            let cmd = Command::UpsertHost { host: Host::for_test(id) };
            store.writer().run(move |c| apply(c, &cmd)).await.unwrap();
        }
        let pending = Arc::new(Pending::default());
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(plan_placement(store.pool(), &pending, "single", &Avoid::default()).await.unwrap());
        }
        let mut hosts: Vec<String> = held.iter().map(|p| p.cluster_id.clone()).collect();
        hosts.sort();
        assert_eq!(hosts, ["single-h1", "single-h2", "single-h3"]);
        // Once the plans are written (here: dropped), the hosts are free again.
        held.clear();
        let next = plan_placement(store.pool(), &pending, "single", &Avoid::default()).await.unwrap();
        assert_eq!(next.cluster_id, "single-h1");
    }
}
