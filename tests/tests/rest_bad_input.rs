//! Bad input against a real single-node control plane: malformed JSON, unknown owner, empty
//! purpose, duplicate names, other teams' tokens, missing tokens, point-in-time copies of
//! databases one cannot copy. Each gets the documented
//! status and message, and nothing is half-created.

use std::time::Duration;

use anyhow::{ensure, Result};
use reqwest::Method;
use serde_json::{json, Value};
use steward_tests::sim::{op_req, operator, spawn_host};
use steward_tests::{admin_token, wait_for, wait_leader, Node, Rest, Scratch};

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

fn message(v: &Value) -> String {
    v["error"]["message"].as_str().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_change_nothing() -> Result<()> {
    let scratch = Scratch::new("steward-badinput-")?;
    let (token_file, admin) = admin_token(scratch.path())?;
    let mut node = Node::new(scratch.path(), 1, &token_file, &[]);
    let m = node.member();
    node.args.extend(["--initial-member".to_string(), m]);
    node.start()?;
    let rest = Rest::default();
    wait_leader(&rest, &[&node], Duration::from_secs(30)).await?;
    let host = spawn_host(vec![node.grpc.clone()], "sim-host-1", Duration::from_secs(120));
    wait_for("host registration", Duration::from_secs(15), || async {
        let r = operator(&node.grpc)?
            .list_hosts(op_req(&admin, steward_proto::v1::ListHostsRequest {}))
            .await?
            .into_inner();
        Ok((!r.hosts.is_empty()).then_some(()))
    })
    .await?;

    let dbs = node.url("/v1/databases");
    let teams = node.url("/v1/teams");
    // Missing and wrong tokens.
    let (s, v) = rest.send(Method::GET, &dbs, None, None).await?;
    ensure!(s == 401 && code(&v) == "unauthorized" && message(&v).contains("Authorization"), "missing token: {s} {v}");
    let (s, v) = rest.get(&dbs, "not-a-token").await?;
    ensure!(s == 401, "bad token: {s} {v}");

    let (s, v) = rest.post(&teams, &admin, &json!({"name": "shop", "contact": "shop@example.com"})).await?;
    ensure!(s == 201, "team: {s} {v}");
    let shop = v["token"].as_str().unwrap_or_default().to_string();
    let (s, v) = rest.post(&teams, &admin, &json!({"name": "billing"})).await?;
    ensure!(s == 201, "team: {s} {v}");
    let billing = v["token"].as_str().unwrap_or_default().to_string();
    let (s, v) = rest.post(&teams, &admin, &json!({"name": "shop"})).await?;
    ensure!(s == 409 && code(&v) == "conflict", "duplicate team: {s} {v}");
    let (s, v) = rest.post(&teams, &shop, &json!({"name": "evil"})).await?;
    ensure!(s == 403 && message(&v).contains("admin"), "team token on admin route: {s} {v}");

    // Malformed JSON.
    let resp = rest
        .http
        .post(&dbs)
        .bearer_auth(&shop)
        .header("content-type", "application/json")
        .body("{\"name\": ")
        .send()
        .await?;
    let s = resp.status().as_u16();
    let v: Value = resp.json().await?;
    ensure!(s == 400 && code(&v) == "bad_request" && message(&v).contains("malformed JSON"), "malformed: {s} {v}");
    // Wrong field type / unknown field.
    let (s, v) = rest.post(&dbs, &shop, &json!({"name": 5, "purpose": "x"})).await?;
    ensure!(s == 422, "wrong type: {s} {v}");
    let (s, v) = rest.post(&dbs, &shop, &json!({"name": "a", "purpose": "x", "colour": "red"})).await?;
    ensure!(s == 422 && message(&v).contains("colour"), "unknown field: {s} {v}");
    // Unknown owner.
    let (s, v) = rest.post(&dbs, &admin, &json!({"name": "orders", "owner": "ghost", "purpose": "x"})).await?;
    ensure!(s == 422 && message(&v).contains("not an existing team"), "unknown owner: {s} {v}");
    // Empty purpose.
    let (s, v) = rest.post(&dbs, &shop, &json!({"name": "orders", "purpose": "  "})).await?;
    ensure!(s == 422 && message(&v).contains("purpose must not be empty"), "empty purpose: {s} {v}");
    // Another team as owner.
    let (s, v) = rest.post(&dbs, &shop, &json!({"name": "orders", "owner": "billing", "purpose": "x"})).await?;
    ensure!(s == 403, "foreign owner: {s} {v}");

    // A good create, then a duplicate name for the same owner.
    let (s, v) = rest.post(&dbs, &shop, &json!({"name": "orders", "purpose": "orders of the shop"})).await?;
    ensure!(s == 202 && v["state"] == "provisioning" && v["owner"] == "shop", "create: {s} {v}");
    let id = v["id"].as_str().unwrap_or_default().to_string();
    let (s, v) = rest.post(&dbs, &shop, &json!({"name": "orders", "purpose": "again"})).await?;
    ensure!(s == 409 && message(&v).contains("already has a database named 'orders'"), "duplicate: {s} {v}");
    // The same name for another owner is fine.
    let (s, v) = rest.post(&dbs, &billing, &json!({"name": "orders", "purpose": "billing orders"})).await?;
    ensure!(s == 202, "same name other owner: {s} {v}");
    let billing_id = v["id"].as_str().unwrap_or_default().to_string();

    // Idempotency-Key: a retried create returns the same database.
    let mut ids = Vec::new();
    for _ in 0..2 {
        let resp = rest
            .http
            .post(&dbs)
            .bearer_auth(&shop)
            .header("Idempotency-Key", "create-invoices-1")
            .json(&json!({"name": "invoices", "purpose": "invoices"}))
            .send()
            .await?;
        ensure!(resp.status().as_u16() == 202, "idempotent create: {}", resp.status());
        let v: Value = resp.json().await?;
        ids.push(v["id"].as_str().unwrap_or_default().to_string());
    }
    ensure!(ids[0] == ids[1] && !ids[0].is_empty(), "idempotency key gave two databases: {ids:?}");

    // Other teams' databases are invisible.
    let (s, _) = rest.get(&format!("{dbs}/{id}"), &billing).await?;
    ensure!(s == 404, "billing sees shop's database: {s}");
    let (s, v) = rest.get(&format!("{dbs}/{billing_id}"), &billing).await?;
    ensure!(s == 200 && v["name"] == "orders", "own database: {s} {v}");
    let (s, v) = rest.get(&dbs, &billing).await?;
    ensure!(s == 200 && v["databases"].as_array().map(Vec::len) == Some(1), "billing list: {s} {v}");
    let op = v["databases"][0]["operation_id"].as_str().unwrap_or_default().to_string();
    let (s, _) = rest.get(&node.url(&format!("/v1/operations/{op}")), &shop).await?;
    ensure!(s == 404, "shop sees billing's operation: {s}");
    let (s, v) = rest.get(&node.url(&format!("/v1/operations/{op}")), &billing).await?;
    ensure!(s == 200 && v["kind"] == "provision", "own operation: {s} {v}");

    // Point-in-time copies: only of one's own, active database, with a well-formed body.
    let restore = format!("{dbs}/{id}/restore");
    let (s, v) = rest.post(&restore, &billing, &json!({})).await?;
    ensure!(s == 404, "billing copies shop's database: {s} {v}");
    let (s, v) = rest.post(&restore, &shop, &json!({"target_time": "2026-11-25T10:00:00Z", "when": 1})).await?;
    ensure!(s == 422 && message(&v).contains("when"), "unknown restore field: {s} {v}");
    let (s, v) = rest.post(&format!("{dbs}/nope/restore"), &shop, &json!({})).await?;
    ensure!(s == 404, "copy of a missing database: {s} {v}");
    // (The simulated host never runs PostgreSQL, so the database stays provisioning.)
    let (s, v) = rest.post(&restore, &shop, &json!({})).await?;
    ensure!(s == 409 && message(&v).contains("only a live database"), "copy of a new database: {s} {v}");

    // Nothing half-created: exactly the three accepted databases exist.
    let (s, v) = rest.get(&dbs, &admin).await?;
    ensure!(s == 200 && v["databases"].as_array().map(Vec::len) == Some(3), "admin list: {s} {v}");
    let (s, v) = rest.get(&node.url("/v1/nope"), &admin).await?;
    ensure!(s == 404 && code(&v) == "not_found", "unknown route: {s} {v}");
    let (s, v) = rest.send(Method::GET, &node.url("/metrics"), None, None).await?;
    ensure!(s == 200 && v.as_str().unwrap_or("").contains("steward_raft_is_leader 1"), "metrics: {s}");
    host.abort();
    Ok(())
}
