//! In-memory heartbeat bookkeeping on the leader. Heartbeats are not Raft writes: only the
//! transitions they cause (a host going `down` or coming back) are replicated.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use steward_proto::v1::InstanceStatus;

/// What the last heartbeat of a host said, and when it came.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub wall: String,
    pub instances: Vec<InstanceStatus>,
}

/// Last heartbeat per host id, and the leases granted to primaries.
#[derive(Debug, Default)]
pub struct Liveness {
    hosts: Mutex<HashMap<String, Seen>>,
    leases: Mutex<HashMap<String, Instant>>,
}

impl Liveness {
    /// Records a heartbeat.
    pub fn beat(&self, host_id: &str, instances: Vec<InstanceStatus>) {
        let seen = Seen { at: Instant::now(), wall: crate::now(), instances };
        if let Ok(mut h) = self.hosts.lock() {
            h.insert(host_id.to_string(), seen);
        }
    }

    /// Records a lease granted to a cluster's primary, valid until `until`.
    pub fn grant(&self, cluster_id: &str, until: Instant) {
        if let Ok(mut l) = self.leases.lock() {
            let e = l.entry(cluster_id.to_string()).or_insert(until);
            *e = (*e).max(until);
        }
    }

    /// Until when a lease granted by this node to the cluster's primary may run.
    pub fn lease_until(&self, cluster_id: &str) -> Option<Instant> {
        self.leases.lock().ok().and_then(|l| l.get(cluster_id).copied())
    }

    /// When the host last heartbeat and what it said of one cluster's instance, without copying
    /// the rest of its report (the failover check asks this for every HA cluster).
    pub fn instance(&self, host_id: &str, cluster_id: &str) -> (Option<Instant>, Option<InstanceStatus>) {
        let Ok(h) = self.hosts.lock() else { return (None, None) };
        match h.get(host_id) {
            Some(seen) => (Some(seen.at), seen.instances.iter().find(|i| i.cluster_id == cluster_id).cloned()),
            None => (None, None),
        }
    }

    /// When the host last heartbeat (since this node started), without copying its report.
    pub fn last_seen(&self, host_id: &str) -> Option<Instant> {
        self.hosts.lock().ok().and_then(|h| h.get(host_id).map(|s| s.at))
    }

    /// The last heartbeat of a host, if any arrived since this node started.
    pub fn get(&self, host_id: &str) -> Option<Seen> {
        self.hosts.lock().ok().and_then(|h| h.get(host_id).cloned())
    }
}

/// Whether a host has missed its heartbeats: nothing for `down_after` since `since`, where
/// `since` is its last heartbeat or, if none arrived yet, when this node became leader.
pub fn is_overdue(last: Option<Instant>, leader_since: Instant, now: Instant, down_after: std::time::Duration) -> bool {
    let reference = last.map_or(leader_since, |l| l.max(leader_since));
    now.saturating_duration_since(reference) > down_after
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn overdue_counts_from_leadership_when_no_heartbeat_seen() {
        let t0 = Instant::now();
        let d = Duration::from_secs(3);
        assert!(!is_overdue(None, t0, t0 + Duration::from_secs(2), d));
        assert!(is_overdue(None, t0, t0 + Duration::from_secs(4), d));
        assert!(!is_overdue(Some(t0 + Duration::from_secs(3)), t0, t0 + Duration::from_secs(5), d));
    }
}
