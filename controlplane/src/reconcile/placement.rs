//! Where a new database goes. Pure: the caller gathers the candidates from the state.

/// A host as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub host_id: String,
    pub active: bool,
    pub memory_budget_bytes: u64,
    pub disk_free_bytes: u64,
    /// The `single` cluster already on this host, if any.
    pub cluster_id: Option<String>,
    /// Live databases on this host.
    pub databases: u64,
}

/// The decision: an existing cluster, or a new one on a host that runs none yet.
#[derive(Debug, Clone, PartialEq)]
pub enum Placement {
    Existing { cluster_id: String, host_id: String },
    New { host_id: String },
}

/// Why nothing fits.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlacementError {
    #[error("no database host is registered: start a steward-agent and let it register")]
    NoHosts,
    #[error("no active database host has capacity ({0}); add a host or free disk space")]
    NoCapacity(String),
}

/// Free disk a host must keep to receive another database.
pub const MIN_FREE_DISK: u64 = 1 << 30;

/// How many databases a host may carry for the memory it gives PostgreSQL: one per 16 MiB,
/// at least 32.
pub fn max_databases(memory_budget_bytes: u64) -> u64 {
    (memory_budget_bytes / (16 << 20)).max(32)
}

/// Picks the active host with the lowest fill (databases relative to capacity), ties broken by
/// host id so every node would choose the same.
pub fn place(candidates: &[Candidate]) -> Result<Placement, PlacementError> {
    if candidates.is_empty() {
        return Err(PlacementError::NoHosts);
    }
    let mut reasons = Vec::new();
    let mut best: Option<(&Candidate, f64)> = None;
    for c in candidates {
        if !c.active {
            reasons.push(format!("{} is not active", c.host_id));
            continue;
        }
        if c.disk_free_bytes < MIN_FREE_DISK {
            reasons.push(format!("{} has less than 1 GiB free disk", c.host_id));
            continue;
        }
        let max = max_databases(c.memory_budget_bytes);
        if c.databases >= max {
            reasons.push(format!("{} is full ({max} databases)", c.host_id));
            continue;
        }
        let fill = c.databases as f64 / max as f64;
        let better = match best {
            None => true,
            Some((b, bf)) => fill < bf || (fill == bf && c.host_id < b.host_id),
        };
        if better {
            best = Some((c, fill));
        }
    }
    match best {
        Some((c, _)) => Ok(match &c.cluster_id {
            Some(id) => Placement::Existing { cluster_id: id.clone(), host_id: c.host_id.clone() },
            None => Placement::New { host_id: c.host_id.clone() },
        }),
        None => Err(PlacementError::NoCapacity(reasons.join("; "))),
    }
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
            memory_budget_bytes: 1 << 30,
            disk_free_bytes: 10 << 30,
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
    fn pg_names_stay_unique() {
        assert_eq!(pg_name("orders", "1234abcd-ef", &[]), "orders");
        assert_eq!(pg_name("orders", "1234abcd-ef", &["orders".into()]), "orders_1234abcd");
    }
}
