//! A 3-node control plane on loopback: creates through follower and leader, leader killed,
//! re-election, no acknowledged create lost, the killed node catching up (by snapshot after log
//! purge), and adding/removing a node at runtime.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use serde_json::json;
use steward_proto::v1::{AddNodeRequest, CreateJoinTokenRequest, RaftStatusRequest, RemoveNodeRequest};
use steward_tests::sim::{op_req, operator, spawn_host};
use steward_tests::{admin_token, wait_for, wait_leader, Node, Rest, Scratch};

const RAFT_ARGS: &[&str] = &["--snapshot-logs", "20", "--keep-logs", "2", "--host-down-after-ms", "8000"];

async fn status(addr: &str, token: &str) -> Result<steward_proto::v1::RaftStatusReply> {
    Ok(operator(addr)?.raft_status(op_req(token, RaftStatusRequest {})).await?.into_inner())
}

async fn create_team(rest: &Rest, node: &Node, token: &str, name: &str) -> Result<String> {
    let (s, v) = rest.post(&node.url("/v1/teams"), token, &json!({"name": name, "contact": "ops@example.com"})).await?;
    ensure!(s == 201, "creating team {name} via node {}: {s} {v}", node.id);
    Ok(v["token"].as_str().unwrap_or_default().to_string())
}

async fn create_db(rest: &Rest, node: &Node, token: &str, name: &str) -> Result<String> {
    let (s, v) = rest.post(&node.url("/v1/databases"), token, &json!({"name": name, "purpose": "raft test"})).await?;
    ensure!(s == 202, "creating database {name} via node {}: {s} {v}", node.id);
    Ok(v["id"].as_str().unwrap_or_default().to_string())
}

async fn listed_ids(rest: &Rest, node: &Node, admin: &str) -> Result<BTreeSet<String>> {
    let (s, v) = rest.get(&node.url("/v1/databases"), admin).await?;
    ensure!(s == 200, "listing via node {}: {s} {v}", node.id);
    Ok(v["databases"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|d| d["id"].as_str().map(String::from))
        .collect())
}

/// Waits until `node`, restarted after losing its state, has applied `target` and serves every
/// acknowledged create (its reads need a leader, which may still be being elected when the
/// restarted node was the leader); then checks its log says `how` it rebuilt the state.
async fn rebuilt(
    rest: &Rest,
    node: &Node,
    admin: &str,
    target: u64,
    how: &str,
    acked: &BTreeSet<String>,
) -> Result<()> {
    let what = format!("node {} to rebuild its state and serve every acknowledged create", node.id);
    let missing = wait_for(&what, Duration::from_secs(60), || async {
        let s = status(&node.grpc, admin).await?;
        if s.last_applied < target {
            return Ok(None);
        }
        let ids = listed_ids(rest, node, admin).await?;
        Ok(Some(acked.difference(&ids).cloned().collect::<Vec<_>>()))
    })
    .await?;
    ensure!(missing.is_empty(), "node {} misses acknowledged creates after rebuilding its state: {missing:?}", node.id);
    let log = std::fs::read_to_string(node.dir.with_extension("log"))?;
    ensure!(log.contains(how), "node {}'s log does not say {how:?}", node.id);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_survive_leader_loss_and_catch_up() -> Result<()> {
    let scratch = Scratch::new("steward-raft-")?;
    let root = scratch.path();
    let (token_file, admin) = admin_token(root)?;
    let mut nodes: Vec<Node> = (1..=3).map(|id| Node::new(root, id, &token_file, RAFT_ARGS)).collect();
    // Node 3 keeps its state database apart from its data dir, as packaged nodes do on /run.
    let state3 = root.join("state-3");
    nodes[2].args.extend(["--state-dir".to_string(), state3.display().to_string()]);
    let members: Vec<String> = nodes.iter().map(Node::member).collect();
    for n in nodes.iter_mut() {
        for m in &members {
            n.args.push("--initial-member".into());
            n.args.push(m.clone());
        }
        n.start()?;
    }
    let rest = Rest::default();
    let leader = wait_leader(&rest, &nodes.iter().collect::<Vec<_>>(), Duration::from_secs(30)).await?;
    let li = nodes.iter().position(|n| n.id == leader).unwrap_or(0);
    let fi = (li + 1) % 3;
    println!("initial leader: node {leader}");

    let grpc_addrs: Vec<String> = nodes.iter().map(|n| n.grpc.clone()).collect();
    let host = spawn_host(grpc_addrs.clone(), "sim-host-1", Duration::from_secs(240));
    wait_for("the simulated host to register", Duration::from_secs(15), || async {
        let s = operator(&nodes[li].grpc)?
            .list_hosts(op_req(&admin, steward_proto::v1::ListHostsRequest {}))
            .await?
            .into_inner();
        Ok(s.hosts.iter().any(|h| h.id == "sim-host-1" && h.state == "active").then_some(()))
    })
    .await?;

    // Writes through the leader and through a follower.
    let t_leader = create_team(&rest, &nodes[li], &admin, "alpha").await?;
    let t_follower = create_team(&rest, &nodes[fi], &admin, "beta").await?;
    let mut acked = BTreeSet::new();
    for i in 0..6 {
        acked.insert(create_db(&rest, &nodes[li], &t_leader, &format!("a{i}")).await?);
        acked.insert(create_db(&rest, &nodes[fi], &t_follower, &format!("b{i}")).await?);
    }
    // A follower serves a linearizable read of what was just written through the leader.
    ensure!(
        listed_ids(&rest, &nodes[fi], &admin).await?.is_superset(&acked),
        "follower read misses acknowledged creates"
    );

    // Kill the leader.
    let before = status(&nodes[li].grpc, &admin).await?;
    let killed_last = before.last_log_index;
    nodes[li].kill();
    let killed_at = Instant::now();
    let new_leader = wait_for("a new leader among the survivors", Duration::from_secs(15), || async {
        for n in nodes.iter().filter(|n| n.id != leader) {
            if let Ok(s) = status(&n.grpc, &admin).await {
                if s.leader_id != 0 && s.leader_id != leader {
                    return Ok(Some(s.leader_id));
                }
            }
        }
        Ok(None)
    })
    .await?;
    let election = killed_at.elapsed();
    println!("new leader node {new_leader} elected {:?} after the kill", election);
    ensure!(election < Duration::from_secs(10), "re-election took {election:?}");

    for n in nodes.iter().filter(|n| n.id != leader) {
        let ids = listed_ids(&rest, n, &admin).await?;
        ensure!(
            ids.is_superset(&acked),
            "node {} lost acknowledged creates: missing {:?}",
            n.id,
            acked.difference(&ids).collect::<Vec<_>>()
        );
    }

    // Keep writing while the old leader is down, until the survivors have purged the entries it
    // lacks, so its catch-up must go through a snapshot.
    let nli = nodes.iter().position(|n| n.id == new_leader).unwrap_or((li + 1) % 3);
    let nl = &nodes[nli];
    let mut more = 0;
    wait_for("survivors to purge the log past the killed node", Duration::from_secs(60), || {
        more += 1;
        let name = format!("extra{more}");
        let (rest, admin, nl) = (&rest, &admin, nl);
        async move {
            let (s, v) = rest.post(&nl.url("/v1/teams"), admin, &json!({"name": name})).await?;
            ensure!(s == 201, "team {name}: {s} {v}");
            let st = status(&nl.grpc, admin).await?;
            Ok((st.first_log_index > killed_last + 1 && st.snapshot_index > killed_last).then_some(()))
        }
    })
    .await?;
    let acked_after = create_db(&rest, nl, &t_leader, "after_failover").await?;
    acked.insert(acked_after);

    // Restart the killed node: it must catch up via snapshot.
    let target = status(&nodes[nli].grpc, &admin).await?.last_applied;
    nodes[li].start()?;
    let caught = wait_for("the restarted node to catch up", Duration::from_secs(60), || async {
        let s = status(&nodes[li].grpc, &admin).await?;
        Ok((s.last_applied >= target).then_some(s))
    })
    .await?;
    ensure!(caught.snapshots_installed >= 1, "restarted node caught up without installing a snapshot: {caught:?}");
    let ids = listed_ids(&rest, &nodes[li], &admin).await?;
    ensure!(ids.is_superset(&acked), "restarted node misses acknowledged creates");

    // Add a fourth node at runtime (through a follower: forwarded to the leader), then remove it.
    // It gets its certificate and the CA key with a one-time join token, as a new machine would.
    let join = operator(&nodes[li].grpc)?
        .create_join_token(op_req(&admin, CreateJoinTokenRequest { role: "controlplane".into(), ttl_seconds: 600 }))
        .await?
        .into_inner();
    let mut n4 = Node::new(root, 4, &token_file, RAFT_ARGS);
    n4.args.extend(["--join-url".to_string(), nodes[li].api.clone(), "--join-token".to_string(), join.token]);
    n4.start()?;
    let follower = nodes.iter().find(|n| n.id != new_leader).map(|n| n.grpc.clone()).unwrap_or_default();
    let add = AddNodeRequest { id: 4, grpc_addr: n4.grpc.clone(), api_addr: n4.api.clone() };
    let m = wait_for("node 4 to be added", Duration::from_secs(30), || {
        let (follower, add, admin) = (follower.clone(), add.clone(), admin.clone());
        async move { Ok(Some(operator(&follower)?.add_node(op_req(&admin, add)).await?.into_inner())) }
    })
    .await?;
    ensure!(m.members.iter().any(|m| m.id == 4 && m.voter), "node 4 is not a voter: {:?}", m.members);
    // A membership change commits with a majority of the new configuration, so node 4 may still be
    // joining and catching up when it returns: wait until it serves everything acknowledged.
    let via4 = wait_for("node 4 to serve the replicated state", Duration::from_secs(30), || async {
        let ids = listed_ids(&rest, &n4, &admin).await?;
        Ok(ids.is_superset(&acked).then_some(ids))
    })
    .await?;
    ensure!(via4.is_superset(&acked), "new node does not serve the replicated state");
    let n4_tls = steward_proto::tls::TlsDir(n4.dir.join("tls"));
    ensure!(n4_tls.ca_key().exists(), "the joined node did not receive the CA key");
    ensure!(
        n4_tls.identity()? == steward_proto::tls::Identity::new(steward_proto::tls::Role::ControlPlane, "4"),
        "joined node's identity"
    );
    let m = operator(&nodes[li].grpc)?.remove_node(op_req(&admin, RemoveNodeRequest { id: 4 })).await?.into_inner();
    ensure!(!m.members.iter().any(|m| m.id == 4), "node 4 still a member: {:?}", m.members);
    ensure!(m.members.len() == 3, "expected 3 members, got {:?}", m.members);

    // A host reboot under a follower: its state file was written without fsync in the earlier
    // boot, so at start the node discards it and rebuilds it from its snapshot and log.
    let fo = nodes.iter().position(|n| n.id != new_leader && n.id != 3).unwrap_or(li);
    let target = status(&nodes[nli].grpc, &admin).await?.last_applied;
    nodes[fo].kill();
    let marker = nodes[fo].dir.join("raft").join("state.db.boot");
    ensure!(marker.exists(), "no boot marker at {}", marker.display());
    std::fs::write(&marker, "an-earlier-boot")?;
    nodes[fo].start()?;
    rebuilt(&rest, &nodes[fo], &admin, target, "rebuilding it from the local snapshot", &acked).await?;

    // The same reboot under node 3, whose state lives on tmpfs in production: the reboot empties
    // its state directory, and the node rebuilds the state from its snapshot and log.
    let s3 = nodes.iter().position(|n| n.id == 3).unwrap_or(2);
    ensure!(state3.join("state.db").exists(), "node 3 has no state.db in its --state-dir");
    ensure!(!nodes[s3].dir.join("raft").join("state.db").exists(), "node 3 wrote state.db into its data dir");
    let other = nodes.iter().position(|n| n.id != 3).unwrap_or(0);
    let target = status(&nodes[other].grpc, &admin).await?.last_applied;
    nodes[s3].kill();
    std::fs::remove_dir_all(&state3)?;
    nodes[s3].start()?;
    let restored = "the state database is empty: restoring it from the local snapshot";
    rebuilt(&rest, &nodes[s3], &admin, target, restored, &acked).await?;
    host.abort();
    Ok(())
}
