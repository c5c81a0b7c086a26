//! Group commit and coalesced read-index rounds on a real 3-node control plane: concurrent
//! writes are batched into fewer log entries yet each keeps its own answer (name conflicts are
//! still decided one command at a time, also inside one batch), and reads on a follower that
//! share read-index rounds still see writes acknowledged just before them; the leader's
//! leadership confirmations reuse its connections to the followers.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::json;
use steward_tests::{admin_token, metric, start_group, wait_leader, Node, Rest, Scratch};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_entries_and_reads_see_them() -> Result<()> {
    let scratch = Scratch::new("steward-group-commit-")?;
    let (token_file, admin) = admin_token(scratch.path())?;
    // Many calls with one token within a second: above the default per-token rate limit.
    let fast = ["--rate-limit", "1000"];
    let mut nodes: Vec<Node> = (1..=3).map(|id| Node::new(scratch.path(), id, &token_file, &fast)).collect();
    let rest = Rest::default();
    start_group(&mut nodes, &rest).await?;
    let leader_id = wait_leader(&rest, &nodes.iter().collect::<Vec<_>>(), Duration::from_secs(30)).await?;
    let li = nodes.iter().position(|n| n.id == leader_id).context("leader is not one of the nodes")?;
    let follower = &nodes[(li + 1) % nodes.len()];
    let leader = &nodes[li];

    const PROPOSALS: &str = "steward_raft_proposals_total";
    const ENTRIES: &str = "steward_raft_proposal_entries_total";
    const CONNECTIONS: &str = "steward_grpc_connections_total";
    let p0 = metric(&rest, leader, &admin, PROPOSALS).await?;
    let e0 = metric(&rest, leader, &admin, ENTRIES).await?;

    // 120 distinct teams at once, half through the leader and half through the follower (which
    // forwards); each created team's token is then used at once on the follower, whose
    // authentication falls back to a (coalesced) linearizable read when the token is not yet
    // in its replica: it must find it.
    let mut tasks = Vec::new();
    for i in 0..120 {
        let (rest, admin) = (rest.clone(), admin.clone());
        let via = if i % 2 == 0 { leader.url("/v1/teams") } else { follower.url("/v1/teams") };
        let read = follower.url("/v1/databases");
        tasks.push(tokio::spawn(async move {
            let name = format!("team{i}");
            let (s, v) = rest.post(&via, &admin, &json!({"name": name, "contact": "ops@example.com"})).await?;
            ensure!(s == 201, "creating {name}: {s} {v}");
            let token = v["token"].as_str().context("no token in the answer")?.to_string();
            let (s, v) = rest.get(&read, &token).await?;
            ensure!(s == 200, "{name}'s new token on the follower right after the create: {s} {v}");
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }

    // Peers keep their connections: 30 linearizable reads one after another on the leader are 30
    // leadership confirmations (no coalescing), each a heartbeat to both followers, and they
    // must travel over the connections the leader already has, not new ones.
    let followers: Vec<&Node> = nodes.iter().filter(|n| n.id != leader_id).collect();
    let mut before = Vec::new();
    for f in &followers {
        before.push(metric(&rest, f, &admin, CONNECTIONS).await?);
    }
    for _ in 0..30 {
        let (s, v) = rest.get(&leader.url("/v1/databases"), &admin).await?;
        ensure!(s == 200, "GET /v1/databases on the leader: {s} {v}");
    }
    for (f, b) in followers.iter().zip(before) {
        let opened = metric(&rest, f, &admin, CONNECTIONS).await? - b;
        ensure!(
            opened <= 2.0,
            "node {} accepted {opened} gRPC connections during 30 reads on the leader: peers reconnect per call",
            f.id
        );
    }

    // 40 creates of the same name at once: exactly one wins, whatever batches they land in.
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (rest, admin) = (rest.clone(), admin.clone());
        let via = if i % 2 == 0 { leader.url("/v1/teams") } else { follower.url("/v1/teams") };
        tasks.push(tokio::spawn(async move {
            let (s, v) = rest.post(&via, &admin, &json!({"name": "contested", "contact": "ops@example.com"})).await?;
            ensure!(s == 201 || s == 409, "contested create: {s} {v}");
            Ok::<_, anyhow::Error>(s)
        }));
    }
    let mut created = 0;
    for t in tasks {
        if t.await?? == 201 {
            created += 1;
        }
    }
    ensure!(created == 1, "{created} of 40 concurrent creates of one name succeeded; exactly 1 must");

    let p1 = metric(&rest, leader, &admin, PROPOSALS).await?;
    let e1 = metric(&rest, leader, &admin, ENTRIES).await?;
    let (proposals, entries) = (p1 - p0, e1 - e0);
    println!("{proposals} proposals in {entries} log entries");
    ensure!(proposals >= 160.0, "the leader counted {proposals} proposals for 160 creates");
    ensure!(entries < proposals, "{proposals} concurrent proposals took {entries} entries: nothing was batched");

    // Every node holds all 121 teams' audit records: the batches were applied everywhere.
    for n in &nodes {
        let (s, v) = rest.get(&n.url("/v1/audit?limit=1000"), &admin).await?;
        ensure!(s == 200, "audit on node {}: {s} {v}", n.id);
        let ok = v["entries"]
            .as_array()
            .map(|a| a.iter().filter(|e| e["action"] == "team.create" && e["outcome"] == "ok").count())
            .unwrap_or(0);
        ensure!(ok == 121, "node {} has {ok} successful team creations in its audit log, expected 121", n.id);
    }
    Ok(())
}
