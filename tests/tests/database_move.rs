//! Moving live databases between clusters, against real control-plane nodes, agents and
//! PostgreSQL on loopback: a table without a primary key is reported before anything starts,
//! with what to do; a move under a concurrent writer loses no acknowledged write, carries
//! sequences, grants and data, switches `connection.uri`, and removes the source's copy; an
//! aborted move leaves the source as it was; a drain moves the database off its host; and a move
//! survives the control-plane leader being killed in the middle of it.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use steward_tests::writer::{switch_pause, UriWriter};
use steward_tests::{wait_for, Scratch, Stack};

async fn connect(uri: &str) -> Result<tokio_postgres::Client> {
    steward_tests::pg_connect(uri).await.context("connecting")
}

fn cluster_of(stack: &Stack, id: &str) -> Result<String> {
    let (ok, out, err) = stack.stewardctl(&["databases", "--output", "json"])?;
    ensure!(ok, "stewardctl databases: {err}");
    let v: Value = serde_json::from_str(&out)?;
    let db = v.as_array().and_then(|a| a.iter().find(|d| d["id"] == id)).context("database not listed")?;
    Ok(db["cluster_id"].as_str().unwrap_or_default().to_string())
}

/// Waits for `n` more acknowledged writes than `from`.
async fn more_acks(w: &UriWriter, from: usize, n: usize) -> Result<()> {
    wait_for(&format!("{n} more acknowledged writes"), Duration::from_secs(60), || async {
        Ok((w.count() >= from + n).then_some(()))
    })
    .await
}

/// Every acknowledged id is in the database now.
async fn check_no_lost_acks(uri: &str, acked: &[steward_tests::writer::Ack]) -> Result<()> {
    let client = connect(uri).await?;
    let rows = client.query("SELECT id FROM acks", &[]).await?;
    let have: std::collections::BTreeSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    let lost: Vec<i64> = acked.iter().map(|a| a.id).filter(|id| !have.contains(id)).collect();
    ensure!(lost.is_empty(), "{} acknowledged writes lost: {:?}", lost.len(), &lost[..lost.len().min(20)]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn move_under_writes_abort_and_drain() -> Result<()> {
    let scratch = Scratch::new("steward-move-")?;
    let stack = Stack::launch(scratch.path(), 1, 2, &[], &[], false).await?;
    let rest = &stack.rest;
    let shop = stack.team("shop").await?;
    let db = stack.active_database(&shop, "orders").await?;
    let id = db["id"].as_str().context("id")?.to_string();
    // A second database lands on the other host (placement fills the emptier one): its cluster
    // is where `orders` goes.
    let other = stack.active_database(&shop, "other").await?;
    let source = cluster_of(&stack, &id)?;
    let target = cluster_of(&stack, other["id"].as_str().context("id")?)?;
    ensure!(source != target, "both databases on {source}");
    let url = stack.node().url(&format!("/v1/databases/{id}"));
    let uri = db["connection"]["uri"].as_str().context("uri")?.to_string();
    let source_port = db["connection"]["port"].as_u64().context("port")? as u16;

    let client = connect(&uri).await?;
    client
        .batch_execute(
            "CREATE TABLE acks (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now());
             CREATE TABLE items (id serial PRIMARY KEY, body text NOT NULL);
             INSERT INTO items (body) SELECT 'item ' || g FROM generate_series(1, 1000) g;
             GRANT SELECT ON items TO PUBLIC;
             CREATE TABLE events (body text);
             INSERT INTO events VALUES ('before');",
        )
        .await?;

    // A table without a primary key is reported before anything starts, with what to do.
    let (ok, out, _) = stack.stewardctl(&["database", "move", "shop/orders", "--check"])?;
    ensure!(!ok && out.contains("public.events") && out.contains("ADD PRIMARY KEY"), "check: {out}");
    let (ok, _, err) = stack.stewardctl(&["database", "move", &id, "--to", &target])?;
    ensure!(!ok && err.contains("public.events") && err.contains("REPLICA IDENTITY FULL"), "refusal: {err}");
    ensure!(cluster_of(&stack, &id)? == source, "a refused move changed the placement");
    client.batch_execute("ALTER TABLE events REPLICA IDENTITY FULL").await?;
    let (ok, out, err) = stack.stewardctl(&["database", "move", &id, "--check"])?;
    ensure!(ok && out.contains("can be moved"), "check after the fix: {out} {err}");

    // The move, under a writer that follows the connection URI.
    let writer = UriWriter::start(rest.clone(), vec![url.clone()], shop.clone());
    more_acks(&writer, 0, 50).await?;
    let (ok, out, err) = stack.stewardctl(&["database", "move", &id, "--to", &target])?;
    ensure!(ok && out.contains("succeeded") && out.contains("writes paused"), "move: {out} {err}");
    let before = writer.count();
    more_acks(&writer, before, 50).await?;
    let acks = writer.stop().await;
    let (s, moved) = rest.get(&url, &shop).await?;
    ensure!(s == 200 && moved["state"] == "active", "after the move: {s} {moved}");
    let new_uri = moved["connection"]["uri"].as_str().context("uri after the move")?.to_string();
    let new_port = moved["connection"]["port"].as_u64().context("port")? as u16;
    ensure!(new_port != source_port && cluster_of(&stack, &id)? == target, "not switched: {moved}");
    ensure!(acks.iter().any(|a| a.port == source_port) && acks.last().map(|a| a.port) == Some(new_port));
    check_no_lost_acks(&new_uri, &acks).await?;
    let pause = switch_pause(&acks).context("no switch seen by the writer")?;
    println!("move: {} acknowledged writes, write pause seen by the client {} ms", acks.len(), pause.as_millis());

    // Data, sequences and grants came along; the source's copy is gone.
    let client = connect(&new_uri).await?;
    let items: i64 = client.query_one("SELECT count(*) FROM items", &[]).await?.get(0);
    ensure!(items == 1000, "items after the move: {items}");
    let next: i32 = client.query_one("INSERT INTO items (body) VALUES ('after') RETURNING id", &[]).await?.get(0);
    ensure!(next > 1000, "the sequence restarted: next id {next}");
    let public_read: bool =
        client.query_one("SELECT has_table_privilege('public', 'items', 'SELECT')", &[]).await?.get(0);
    ensure!(public_read, "the grant to PUBLIC did not come along");
    let events: i64 = client.query_one("SELECT count(*) FROM events", &[]).await?.get(0);
    ensure!(events == 1, "events after the move: {events}");
    let source_agent = stack.agents.iter().find(|a| a.pg_port == source_port).context("source agent")?;
    let left = source_agent.superuser(source_port, "postgres").await?;
    let dbs: i64 = left.query_one("SELECT count(*) FROM pg_database WHERE datname = 'orders'", &[]).await?.get(0);
    let slots: i64 = left.query_one("SELECT count(*) FROM pg_replication_slots", &[]).await?.get(0);
    let roles: i64 =
        left.query_one("SELECT count(*) FROM pg_roles WHERE rolname LIKE 'steward\\_move\\_%'", &[]).await?.get(0);
    ensure!(dbs == 0 && slots == 0 && roles == 0, "left on the source: {dbs} databases, {slots} slots, {roles} roles");
    ensure!(connect(&uri).await.is_err(), "the old URI still connects");
    let (s, v) = rest
        .get(&stack.node().url(&format!("/v1/operations/{}", moved["operation_id"].as_str().unwrap_or(""))), &shop)
        .await?;
    ensure!(s == 200 && v["kind"] == "move" && v["state"] == "succeeded", "move operation: {s} {v}");
    ensure!(v["detail"].as_str().is_some_and(|d| d.contains("writes paused")), "{v}");

    // An aborted move leaves the database where it was, writable, with nothing left behind.
    let (ok, out, err) = stack.stewardctl(&["database", "move", &id, "--to", &source, "--no-wait"])?;
    ensure!(ok, "second move: {out} {err}");
    let (ok, out, err) = stack.stewardctl(&["database", "move", &id, "--abort"])?;
    ensure!(ok && out.contains("failed") && out.contains("aborted by operator"), "abort: {out} {err}");
    let (_, after_abort) = rest.get(&url, &shop).await?;
    ensure!(after_abort["connection"]["uri"] == new_uri.as_str(), "the abort changed the URI: {after_abort}");
    let client = connect(&new_uri).await?;
    client.execute("INSERT INTO acks (id) VALUES (-1)", &[]).await.context("writing after the abort")?;
    let leftovers: i64 = source_agent
        .superuser(source_port, "postgres")
        .await?
        .query_one("SELECT count(*) FROM pg_database WHERE datname = 'orders'", &[])
        .await?
        .get(0);
    ensure!(leftovers == 0, "the aborted move left its copy on the target");
    let target_agent = stack.agents.iter().find(|a| a.pg_port == new_port).context("target agent")?;
    let t = target_agent.superuser(new_port, "orders").await?;
    let pubs: i64 = t.query_one("SELECT count(*) FROM pg_publication", &[]).await?.get(0);
    let connect_ok: bool =
        t.query_one("SELECT has_database_privilege('orders', 'orders', 'CONNECT')", &[]).await?.get(0);
    ensure!(pubs == 0 && connect_ok, "after the rollback: {pubs} publications, owner may connect: {connect_ok}");

    // A drain moves the database off its host, to the only other one.
    let target_host = stack.agents.iter().position(|a| a.pg_port == new_port).context("host")?;
    let host_id = host_id_of(&stack, target_host)?;
    let (ok, out, err) = stack.stewardctl(&["host", "drain", &host_id, "--wait"])?;
    ensure!(ok && err.contains("is drained"), "drain: {out} {err}");
    let (ok, out, _) = stack.stewardctl(&["hosts", "--output", "json"])?;
    let hosts: Value = serde_json::from_str(&out)?;
    let drained = hosts.as_array().and_then(|a| a.iter().find(|h| h["id"] == host_id.as_str())).context("host")?;
    ensure!(ok && drained["state"] == "draining" && drained["databases"] == 0, "drained host: {drained}");
    let (_, back) = rest.get(&url, &shop).await?;
    ensure!(back["connection"]["port"].as_u64() == Some(u64::from(source_port)), "not moved by the drain: {back}");
    let client = connect(back["connection"]["uri"].as_str().context("uri")?).await?;
    let n: i64 = client.query_one("SELECT count(*) FROM acks WHERE id > 0", &[]).await?.get(0);
    ensure!(n as usize >= acks.len(), "rows after the drain: {n}, acknowledged {}", acks.len());
    // A drained host takes no new databases until it is undrained.
    let (ok, _, err) = stack.stewardctl(&["host", "undrain", &host_id])?;
    ensure!(ok, "undrain: {err}");
    let (ok, out, _) = stack.stewardctl(&["audit", "--target", &id, "--output", "json"])?;
    ensure!(ok && out.contains("database.move_switch") && out.contains("database.move_abort"), "audit: {out}");
    Ok(())
}

fn host_id_of(stack: &Stack, agent: usize) -> Result<String> {
    let (ok, out, err) = stack.stewardctl(&["hosts", "--output", "json"])?;
    ensure!(ok, "stewardctl hosts: {err}");
    let hosts: Value = serde_json::from_str(&out)?;
    let port = stack.agents[agent].pg_port;
    hosts
        .as_array()
        .and_then(|a| a.iter().find(|h| h["pg_port"].as_u64() == Some(u64::from(port))))
        .and_then(|h| h["id"].as_str())
        .map(str::to_string)
        .context("host not listed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn move_survives_the_leader_being_killed() -> Result<()> {
    let scratch = Scratch::new("steward-move-leader-")?;
    let mut stack = Stack::launch(scratch.path(), 3, 2, &[], &[], false).await?;
    let shop = stack.team("shop").await?;
    let db = stack.active_database(&shop, "ledger").await?;
    let id = db["id"].as_str().context("id")?.to_string();
    let other = stack.active_database(&shop, "spare").await?;
    let target = cluster_of(&stack, other["id"].as_str().context("id")?)?;
    let client = connect(db["connection"]["uri"].as_str().context("uri")?).await?;
    client
        .batch_execute(
            "CREATE TABLE acks (id bigint PRIMARY KEY);
             CREATE TABLE bulk (id bigint PRIMARY KEY, pad text);
             INSERT INTO bulk SELECT g, repeat('x', 200) FROM generate_series(1, 200000) g;",
        )
        .await?;
    let writer = UriWriter::start(stack.rest.clone(), stack.urls(&format!("/v1/databases/{id}")), shop.clone());
    more_acks(&writer, 0, 30).await?;

    let (ok, out, err) = stack.stewardctl(&["database", "move", &id, "--to", &target, "--no-wait"])?;
    ensure!(ok, "move: {out} {err}");
    let op = out.trim().to_string();
    // Kill the leader while the move copies (200,000 rows take a moment); a new leader takes the
    // operation over.
    let op_url = stack.live_node().url(&format!("/v1/operations/{op}"));
    let leader =
        steward_tests::wait_leader(&stack.rest, &stack.nodes.iter().collect::<Vec<_>>(), Duration::from_secs(10))
            .await?;
    // The step the leader had reached when it was killed (read before: the next leader starts
    // the operation over and writes its own steps).
    let step_before = wait_for("the move to start copying", Duration::from_secs(60), || async {
        let (_, v) = stack.rest.get(&op_url, &shop).await?;
        let step = v["step"].as_str().unwrap_or("").to_string();
        ensure!(v["state"] == "running", "the move ended before the leader could be killed: {v}");
        Ok((step.starts_with("initial_copy") || step.starts_with("catching_up")).then_some(step))
    })
    .await?;
    let killed = stack.nodes.iter().position(|n| n.id == leader).context("leader node")?;
    stack.nodes[killed].kill();
    let live: Vec<&steward_tests::Node> = stack.nodes.iter().filter(|n| n.proc.is_some()).collect();
    steward_tests::wait_leader(&stack.rest, &live, Duration::from_secs(30)).await?;
    stack.nodes[killed].start()?;
    let done = wait_for("the move to end under the new leader", Duration::from_secs(240), || async {
        let (s, v) = stack.rest.get(&stack.live_node().url(&format!("/v1/operations/{op}")), &shop).await?;
        ensure!(s == 200, "operation: {s} {v}");
        Ok((v["state"] != "running").then_some(v))
    })
    .await?;
    ensure!(done["state"] == "succeeded", "move after the leader was killed (step then: {step_before}): {done}");
    let before = writer.count();
    more_acks(&writer, before, 30).await?;
    let acks = writer.stop().await;
    ensure!(cluster_of(&stack, &id)? == target, "not switched");
    let (_, v) = stack.rest.get(&stack.live_node().url(&format!("/v1/databases/{id}")), &shop).await?;
    let uri = v["connection"]["uri"].as_str().context("uri")?;
    check_no_lost_acks(uri, &acks).await?;
    let bulk: i64 = connect(uri).await?.query_one("SELECT count(*) FROM bulk", &[]).await?.get(0);
    ensure!(bulk == 200_000, "bulk rows after the move: {bulk}");
    println!(
        "leader killed at step {step_before:?}; {} acknowledged writes, pause {:?}",
        acks.len(),
        switch_pause(&acks)
    );
    Ok(())
}
