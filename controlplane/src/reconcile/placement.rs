//! Where a new database goes. Pure: the caller gathers the candidates from the state.
//!
//! `single` databases share the one single-instance cluster of the least filled host.
//! `ha` databases share an existing healthy HA cluster with room, or get a new cluster of one
//! primary and two standbys on three different hosts, spread over as many zones as possible.

use std::collections::BTreeSet;

/// A host as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub host_id: String,
    /// Active, with PostgreSQL binaries.
    pub active: bool,
    pub zone: String,
    pub memory_budget_bytes: u64,
    pub disk_free_bytes: u64,
    /// First PostgreSQL port the host's agent offers.
    pub base_port: u16,
    /// Ports already taken by members on this host.
    pub used_ports: Vec<u16>,
    /// The `single` cluster already on this host, if any.
    pub cluster_id: Option<String>,
    /// Live databases with an instance on this host.
    pub databases: u64,
}

/// An existing HA cluster as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct HaCluster {
    pub cluster_id: String,
    pub databases: u64,
    /// Every member ready and on an active host.
    pub healthy: bool,
}

/// The decision for a `single` database.
#[derive(Debug, Clone, PartialEq)]
pub enum Placement {
    Existing { cluster_id: String, host_id: String },
    New { host_id: String },
}

/// The decision for an `ha` database.
#[derive(Debug, Clone, PartialEq)]
pub enum HaPlacement {
    Existing {
        cluster_id: String,
    },
    /// New cluster: `(host_id, port)` of the primary first, then the standbys.
    New {
        members: Vec<(String, u16)>,
    },
}

/// Why nothing fits.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlacementError {
    #[error("no database host is registered: start a steward-agent and let it register")]
    NoHosts,
    #[error("no active database host has capacity ({0}); add a host or free disk space")]
    NoCapacity(String),
    #[error("availability 'ha' needs {needed} active hosts with capacity, {usable} are usable ({reasons})")]
    TooFewHosts { needed: usize, usable: usize, reasons: String },
}

/// Free disk a host must keep to receive another database.
pub const MIN_FREE_DISK: u64 = 1 << 30;
/// Members of a new HA cluster: a primary and two standbys.
pub const HA_MEMBERS: usize = 3;
/// Databases an HA cluster carries before a new one is made.
pub const HA_CLUSTER_DATABASES: u64 = 32;

/// How many databases a host may carry for the memory it gives PostgreSQL: one per 16 MiB,
/// at least 32.
pub fn max_databases(memory_budget_bytes: u64) -> u64 {
    (memory_budget_bytes / (16 << 20)).max(32)
}

fn fill(c: &Candidate) -> f64 {
    c.databases as f64 / max_databases(c.memory_budget_bytes) as f64
}

/// Candidates that can take another database, least filled first (ties by host id), and the
/// reasons the others cannot.
fn usable(candidates: &[Candidate]) -> (Vec<&Candidate>, Vec<String>) {
    let mut reasons = Vec::new();
    let mut ok = Vec::new();
    for c in candidates {
        if !c.active {
            reasons.push(format!("{} is not active", c.host_id));
        } else if c.disk_free_bytes < MIN_FREE_DISK {
            reasons.push(format!("{} has less than 1 GiB free disk", c.host_id));
        } else if c.databases >= max_databases(c.memory_budget_bytes) {
            reasons.push(format!("{} is full ({} databases)", c.host_id, max_databases(c.memory_budget_bytes)));
        } else {
            ok.push(c);
        }
    }
    ok.sort_by(|a, b| fill(a).total_cmp(&fill(b)).then_with(|| a.host_id.cmp(&b.host_id)));
    (ok, reasons)
}

/// Picks the active host with the lowest fill for a `single` database.
pub fn place(candidates: &[Candidate]) -> Result<Placement, PlacementError> {
    if candidates.is_empty() {
        return Err(PlacementError::NoHosts);
    }
    let (ok, reasons) = usable(candidates);
    let c = ok.first().ok_or_else(|| PlacementError::NoCapacity(reasons.join("; ")))?;
    Ok(match &c.cluster_id {
        Some(id) => Placement::Existing { cluster_id: id.clone(), host_id: c.host_id.clone() },
        None => Placement::New { host_id: c.host_id.clone() },
    })
}

/// The lowest free port at or above the host's base port.
pub fn free_port(c: &Candidate) -> u16 {
    (c.base_port..=u16::MAX).find(|p| !c.used_ports.contains(p)).unwrap_or(c.base_port)
}

/// Places an `ha` database: the healthy HA cluster with the fewest databases if it has room,
/// else three new members on the least filled hosts, each new zone preferred over a used one.
pub fn place_ha(candidates: &[Candidate], clusters: &[HaCluster]) -> Result<HaPlacement, PlacementError> {
    let existing = clusters
        .iter()
        .filter(|c| c.healthy && c.databases < HA_CLUSTER_DATABASES)
        .min_by(|a, b| a.databases.cmp(&b.databases).then_with(|| a.cluster_id.cmp(&b.cluster_id)));
    if let Some(c) = existing {
        return Ok(HaPlacement::Existing { cluster_id: c.cluster_id.clone() });
    }
    if candidates.is_empty() {
        return Err(PlacementError::NoHosts);
    }
    let (mut ok, reasons) = usable(candidates);
    if ok.len() < HA_MEMBERS {
        return Err(PlacementError::TooFewHosts { needed: HA_MEMBERS, usable: ok.len(), reasons: reasons.join("; ") });
    }
    let mut chosen: Vec<&Candidate> = Vec::new();
    let mut zones = BTreeSet::new();
    while chosen.len() < HA_MEMBERS {
        // `ok` is sorted by fill: take the first host in a new zone, else the first host.
        let i = ok.iter().position(|c| !zones.contains(&c.zone)).unwrap_or(0);
        let c = ok.remove(i);
        zones.insert(c.zone.clone());
        chosen.push(c);
    }
    Ok(HaPlacement::New { members: chosen.iter().map(|c| (c.host_id.clone(), free_port(c))).collect() })
}

/// PostgreSQL name for a database: its own name when free in the cluster, otherwise suffixed
/// with part of its id (names are unique per owner, not per cluster).
pub fn pg_name(name: &str, id: &str, taken: &[String]) -> String {
    if !taken.iter().any(|t| t == name) {
        return name.to_string();
    }
    let suffix: String = id.chars().filter(|c| c.is_ascii_alphanumeric()).take(8).collect();
    format!("{name}_{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(id: &str, dbs: u64, cluster: Option<&str>) -> Candidate {
        Candidate {
            host_id: id.into(),
            active: true,
            zone: format!("z-{id}"),
            memory_budget_bytes: 1 << 30,
            disk_free_bytes: 10 << 30,
            base_port: 5432,
            used_ports: vec![],
            cluster_id: cluster.map(Into::into),
            databases: dbs,
        }
    }

    #[test]
    fn picks_least_filled_active_host() {
        let hosts = vec![cand("a", 3, Some("ca")), cand("b", 1, Some("cb")), cand("c", 1, None)];
        assert_eq!(place(&hosts), Ok(Placement::Existing { cluster_id: "cb".into(), host_id: "b".into() }));
        let mut hosts = hosts;
        hosts[1].active = false;
        assert_eq!(place(&hosts), Ok(Placement::New { host_id: "c".into() }));
    }

    #[test]
    fn explains_when_nothing_fits() {
        assert_eq!(place(&[]), Err(PlacementError::NoHosts));
        let mut full = cand("a", 64, None);
        full.disk_free_bytes = 0;
        let err = place(&[full]).unwrap_err();
        assert!(err.to_string().contains("less than 1 GiB"));
        let err = place(&[cand("b", 64, None)]).unwrap_err();
        assert!(err.to_string().contains("full"));
    }

    #[test]
    fn ha_spreads_over_zones_and_allocates_free_ports() {
        let mut hosts = vec![cand("a", 0, None), cand("b", 0, None), cand("c", 5, None), cand("d", 9, None)];
        hosts[1].zone = hosts[0].zone.clone();
        hosts[0].used_ports = vec![5432, 5433];
        let HaPlacement::New { members } = place_ha(&hosts, &[]).unwrap() else { panic!("expected new") };
        let ids: Vec<&str> = members.iter().map(|(h, _)| h.as_str()).collect();
        // a (least filled), then c and d (new zones) before b (same zone as a).
        assert_eq!(ids, ["a", "c", "d"]);
        assert_eq!(members[0].1, 5434);
        assert_eq!(members[1].1, 5432);
    }

    #[test]
    fn ha_reuses_a_healthy_cluster_with_room_and_needs_three_hosts() {
        let hosts = vec![cand("a", 0, None), cand("b", 0, None)];
        let clusters = vec![
            HaCluster { cluster_id: "x".into(), databases: 3, healthy: false },
            HaCluster { cluster_id: "y".into(), databases: 5, healthy: true },
        ];
        assert_eq!(place_ha(&hosts, &clusters), Ok(HaPlacement::Existing { cluster_id: "y".into() }));
        let err = place_ha(&hosts, &clusters[..1]).unwrap_err();
        assert!(err.to_string().contains("needs 3 active hosts"), "{err}");
    }

    #[test]
    fn pg_names_stay_unique() {
        assert_eq!(pg_name("orders", "1234abcd-ef", &[]), "orders");
        assert_eq!(pg_name("orders", "1234abcd-ef", &["orders".into()]), "orders_1234abcd");
    }
}
