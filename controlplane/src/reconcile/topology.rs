//! What each member of a cluster should be, as agent commands: role, upstream, slots,
//! synchronous standbys, peers and lease. Pure, so every rule is unit tested.

use steward_proto::v1::EnsureInstanceRequest;

use crate::state::model::{member_role, Cluster, Host, Member};

/// Lease an HA primary must hold, in milliseconds.
pub const DEFAULT_LEASE_MS: u32 = 2500;

/// `synchronous_standby_names` for a primary: any one of the other members must confirm each
/// commit (quorum commit), so an acknowledged transaction survives losing the primary.
pub fn sync_names(others: &[&str]) -> String {
    if others.is_empty() {
        return String::new();
    }
    let quoted: Vec<String> = others.iter().map(|n| format!("\"{}\"", n.replace('"', ""))).collect();
    format!("ANY 1 ({})", quoted.join(", "))
}

/// The command that makes `member` what the cluster needs. `sync` false leaves a primary
/// asynchronous (while its standbys are still being cloned).
pub fn ensure_request(
    cluster: &Cluster,
    members: &[Member],
    hosts: &[Host],
    member: &Member,
    sync: bool,
) -> Option<EnsureInstanceRequest> {
    let ha = cluster.availability == "ha";
    let primary = members.iter().find(|m| m.host_id == cluster.primary_host)?;
    let primary_host = hosts.iter().find(|h| h.id == primary.host_id)?;
    let others: Vec<&Member> = members.iter().filter(|m| m.host_id != cluster.primary_host).collect();
    let mut req = EnsureInstanceRequest {
        cluster_id: cluster.id.clone(),
        epoch: cluster.epoch as u64,
        pg_major: cluster.pg_major as u32,
        port: member.port as u32,
        member_name: member.host_id.clone(),
        lease_ms: if ha { DEFAULT_LEASE_MS } else { 0 },
        replication_password: if ha { cluster.replication_password.clone() } else { String::new() },
        ..Default::default()
    };
    if member.host_id == cluster.primary_host {
        req.role = member_role::PRIMARY.into();
        if ha {
            let names: Vec<&str> = others.iter().map(|m| m.host_id.as_str()).collect();
            req.synchronous_standby_names = if sync { sync_names(&names) } else { String::new() };
            req.slots = others.iter().map(|m| steward_agent::host::slot_for(&m.host_id)).collect();
            req.peer_agents = others
                .iter()
                .filter_map(|m| hosts.iter().find(|h| h.id == m.host_id).map(|h| h.agent_addr.clone()))
                .collect();
        }
    } else {
        req.role = member_role::STANDBY.into();
        req.upstream_host = primary_host.pg_host.clone();
        req.upstream_port = primary.port as u32;
        req.slot_name = steward_agent::host::slot_for(&member.host_id);
    }
    Some(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str) -> Host {
        Host {
            id: id.into(),
            hostname: id.into(),
            agent_addr: format!("{id}:7410"),
            zone: "z".into(),
            cores: 2,
            memory_bytes: 1,
            memory_budget_bytes: 1,
            disk_free_bytes: 1,
            disk_total_bytes: 1,
            data_path: "/d".into(),
            agent_version: "t".into(),
            pg_major: 15,
            pg_host: format!("10.0.0.{}", id.len()),
            pg_port: 5432,
            state: "active".into(),
            registered_at: String::new(),
            state_changed_at: String::new(),
            draining: false,
            revoked_at: None,
        }
    }

    fn member(id: &str, role: &str) -> Member {
        Member { cluster_id: "c".into(), host_id: id.into(), port: 5433, role: role.into(), state: "ready".into() }
    }

    #[test]
    fn primary_gets_sync_slots_and_peers_standby_gets_upstream() {
        let cluster = Cluster {
            id: "c".into(),
            pg_major: 15,
            primary_host: "a".into(),
            port: 5433,
            epoch: 4,
            state: "ready".into(),
            created_at: String::new(),
            availability: "ha".into(),
            replication_password: "pw".into(),
        };
        let members = vec![member("a", "primary"), member("bb", "standby"), member("ccc", "failed")];
        let hosts = vec![host("a"), host("bb"), host("ccc")];
        let p = ensure_request(&cluster, &members, &hosts, &members[0], true).unwrap();
        assert_eq!(p.role, "primary");
        assert_eq!(p.synchronous_standby_names, "ANY 1 (\"bb\", \"ccc\")");
        assert_eq!(p.slots, ["steward_bb", "steward_ccc"]);
        assert_eq!(p.peer_agents, ["bb:7410", "ccc:7410"]);
        assert_eq!(p.epoch, 4);
        assert!(p.lease_ms > 0);
        let async_p = ensure_request(&cluster, &members, &hosts, &members[0], false).unwrap();
        assert_eq!(async_p.synchronous_standby_names, "");
        let s = ensure_request(&cluster, &members, &hosts, &members[1], true).unwrap();
        assert_eq!((s.role.as_str(), s.upstream_host.as_str(), s.upstream_port), ("standby", "10.0.0.1", 5433));
        assert_eq!(s.slot_name, "steward_bb");
        assert_eq!(s.replication_password, "pw");
    }
}
