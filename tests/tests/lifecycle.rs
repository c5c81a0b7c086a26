//! Database lifecycle through REST against a real control plane, agent and PostgreSQL:
//! deprecate (still usable, a warning, listed as deprecated), reactivate, transfer to another
//! team, illegal transitions refused with what to do instead, another team neither sees nor
//! touches the database, and the admin's audit log records every change with its outcome.

use anyhow::{ensure, Context, Result};
use reqwest::Method;
use serde_json::{json, Value};
use steward_tests::{OneHost, Scratch};

fn message(v: &Value) -> String {
    v["error"]["message"].as_str().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_transitions_ownership_and_audit() -> Result<()> {
    let scratch = Scratch::new("steward-lifecycle-")?;
    let host = OneHost::start(scratch.path()).await?;
    let (rest, node) = (&host.rest, host.node());
    let shop = host.team("shop").await?;
    let billing = host.team("billing").await?;
    let ops = host.team("ops").await?;
    let db = host.active_database(&shop, "orders").await?;
    let id = db["id"].as_str().context("id")?.to_string();
    let url = |suffix: &str| node.url(&format!("/v1/databases/{id}{suffix}"));

    // Deprecate: still usable, listed as deprecated, with a warning.
    let body = json!({"reason": "replaced by orders_v2", "sunset_at": "2099-01-01T00:00:00Z"});
    let (s, v) = rest.post(&url("/deprecate"), &billing, &body).await?;
    ensure!(s == 404, "another team deprecated shop's database: {s} {v}");
    let (s, v) = rest.post(&url("/deprecate"), &shop, &json!({"reason": "x", "sunset_at": "soon"})).await?;
    ensure!(s == 422 && message(&v).contains("RFC 3339"), "bad sunset_at: {s} {v}");
    let (s, v) = rest.post(&url("/deprecate"), &shop, &body).await?;
    ensure!(s == 200 && v["state"] == "deprecated", "deprecate: {s} {v}");
    ensure!(v["deprecation"]["reason"] == "replaced by orders_v2", "{v}");
    ensure!(v["warnings"][0].as_str().is_some_and(|w| w.contains("deprecated")), "no warning: {v}");
    let uri = v["connection"]["uri"].as_str().context("a deprecated database keeps its connection")?;
    let (client, task) = steward_tests::pg_connect_task(uri).await?;
    client.batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)").await?;
    task.abort();
    let (s, v) = rest.get(&node.url("/v1/databases"), &shop).await?;
    ensure!(s == 200 && v["databases"][0]["state"] == "deprecated", "list: {s} {v}");
    let (_, m) = rest.send(Method::GET, &node.url("/metrics"), None, None).await?;
    ensure!(
        m.as_str().unwrap_or("").contains("steward_databases{state=\"deprecated\"} 1"),
        "no deprecated count in the metrics"
    );

    // Delete is refused while not archived; reactivate works once.
    let (s, v) = rest.send(Method::DELETE, &url(""), Some(&shop), None).await?;
    ensure!(s == 409 && message(&v).contains("archive it first"), "delete of a live database: {s} {v}");
    let (s, v) = rest.post(&url("/reactivate"), &shop, &json!({})).await?;
    ensure!(s == 200 && v["state"] == "active" && v["deprecation"].is_null(), "reactivate: {s} {v}");
    let (s, v) = rest.post(&url("/reactivate"), &shop, &json!({})).await?;
    ensure!(s == 409 && message(&v).contains("active already"), "second reactivate: {s} {v}");

    // Transfer: only the owner (or admin); to an existing team; then the new owner has it.
    let (s, v) = rest.post(&url("/transfer"), &ops, &json!({"owner": "ops"})).await?;
    ensure!(s == 404, "a third team took the database: {s} {v}");
    let (s, v) = rest.post(&url("/transfer"), &shop, &json!({"owner": "ghost"})).await?;
    ensure!(s == 422 && message(&v).contains("does not exist"), "transfer to nobody: {s} {v}");
    let (s, v) = rest.post(&url("/transfer"), &shop, &json!({"owner": "billing"})).await?;
    ensure!(s == 200 && v["owner"] == "billing", "transfer: {s} {v}");
    let (s, _) = rest.get(&url(""), &shop).await?;
    ensure!(s == 404, "the old owner still sees the database: {s}");
    let (s, v) = rest.get(&url(""), &billing).await?;
    ensure!(s == 200 && v["connection"]["uri"].is_string(), "the new owner: {s} {v}");

    // The audit log: admin only; every change above with its outcome, refusals included.
    let (s, _) = rest.get(&node.url("/v1/audit"), &billing).await?;
    ensure!(s == 403, "a team read the audit log: {s}");
    let (s, v) = rest.get(&node.url(&format!("/v1/audit?target={id}")), &host.admin).await?;
    ensure!(s == 200, "audit: {s} {v}");
    let entries: Vec<(String, String, String)> = v["entries"]
        .as_array()
        .context("entries")?
        .iter()
        .rev()
        .map(|e| {
            let f = |k: &str| e[k].as_str().unwrap_or("").to_string();
            (f("actor"), f("action"), f("outcome"))
        })
        .collect();
    let expect = [
        ("team:shop", "database.create", "accepted"),
        ("controlplane", "database.provision", "succeeded"),
        ("team:shop", "database.deprecate", "ok"),
        ("team:shop", "database.delete", "refused"),
        ("team:shop", "database.reactivate", "ok"),
        ("team:shop", "database.reactivate", "refused"),
        ("team:shop", "database.transfer", "ok"),
    ];
    ensure!(entries.len() == expect.len(), "audit entries: {entries:?}");
    for ((actor, action, outcome), (a, b, c)) in entries.iter().zip(expect) {
        ensure!(
            actor == a && action == b && outcome.starts_with(c),
            "audit entry {actor} {action} {outcome}, want {a} {b} {c}"
        );
    }
    let (s, v) = rest.get(&node.url("/v1/audit?limit=0&bogus=1"), &host.admin).await?;
    ensure!(s == 400, "unknown audit parameter: {s} {v}");
    // Operators read the same log over gRPC.
    let out = std::process::Command::new(steward_tests::bin("stewardctl"))
        .arg("--tls-dir")
        .arg(steward_tests::tls::operator_dir())
        .args(["--server", &node.grpc, "--token", &host.admin, "audit", "--target", &id, "--output", "json"])
        .output()?;
    ensure!(out.status.success(), "stewardctl audit: {}", String::from_utf8_lossy(&out.stderr));
    let listed: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(listed.as_array().map(Vec::len) == Some(expect.len()), "stewardctl audit: {listed}");
    ensure!(listed[0]["action"] == "database.transfer", "newest first: {listed}");
    Ok(())
}

/// Archive → restore → archive → delete with a real repository: the archive is verified before
/// the live database goes, the restored database holds the same data under the same id, a
/// deleted database's archive is removed after the grace period (0 here), and the record stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_restore_delete_round_trip() -> Result<()> {
    let scratch = Scratch::new("steward-archive-")?;
    let host = OneHost::start_with_repo(scratch.path(), &["--archive-delete-grace", "0"]).await?;
    let (rest, node) = (&host.rest, host.node());
    let shop = host.team("shop").await?;
    let db = host.active_database(&shop, "ledger").await?;
    let id = db["id"].as_str().context("id")?.to_string();
    let url = |suffix: &str| node.url(&format!("/v1/databases/{id}{suffix}"));
    let uri = db["connection"]["uri"].as_str().context("uri")?.to_string();
    let (client, task) = steward_tests::pg_connect_task(&uri).await?;
    client
        .batch_execute(
            "CREATE TABLE entries (id int PRIMARY KEY, amount numeric NOT NULL);
             INSERT INTO entries SELECT g, g * 1.5 FROM generate_series(1, 1000) g;
             CREATE TABLE notes (body text); INSERT INTO notes VALUES ('kept');",
        )
        .await?;
    task.abort();

    // Archive: verified final backup, then the live data goes; listed with its archive.
    let (s, v) = rest.post(&url("/archive"), &shop, &json!({})).await?;
    ensure!(s == 202 && v["state"] == "archiving", "archive: {s} {v}");
    let op = v["operation_id"].as_str().context("operation")?.to_string();
    let archived = host.wait_state(&shop, &id, "archived").await?;
    ensure!(archived["connection"].is_null(), "an archived database has no connection: {archived}");
    let location = archived["archive"]["location"].as_str().context("archive location")?;
    ensure!(
        location.contains(&format!("archives/{id}/")) && archived["archive"]["bytes"].as_i64() > Some(0),
        "{archived}"
    );
    let (s, v) = rest.get(&node.url(&format!("/v1/operations/{op}")), &shop).await?;
    ensure!(s == 200 && v["kind"] == "archive" && v["state"] == "succeeded", "archive operation: {s} {v}");
    ensure!(steward_tests::pg_connect(&uri).await.is_err(), "the archived database still serves");
    let (s, v) = rest.post(&url("/archive"), &shop, &json!({})).await?;
    ensure!(s == 409 && message(&v).contains("archived already"), "second archive: {s} {v}");
    let (s, v) = rest.post(&url("/restore"), &shop, &json!({"target_time": "2026-11-25T00:00:00Z"})).await?;
    ensure!(s == 422, "point in time of an archived database: {s} {v}");

    // Restore: the same database, same id and owner, with its data.
    let (s, v) = rest.post(&url("/restore"), &shop, &json!({})).await?;
    ensure!(s == 202 && v["id"] == id.as_str() && v["state"] == "restoring", "restore: {s} {v}");
    let back = host.wait_state(&shop, &id, "active").await?;
    let uri = back["connection"]["uri"].as_str().context("uri after restore")?.to_string();
    let (client, task) = steward_tests::pg_connect_task(&uri).await?;
    let row = client.query_one("SELECT count(*), sum(amount)::text FROM entries", &[]).await?;
    let (n, sum): (i64, String) = (row.get(0), row.get(1));
    ensure!(n == 1000 && sum == "750750.0", "restored entries: {n} rows, sum {sum}");
    let note: String = client.query_one("SELECT body FROM notes", &[]).await?.get(0);
    ensure!(note == "kept", "restored note {note}");
    client.batch_execute("INSERT INTO notes VALUES ('writable')").await?;
    task.abort();

    // Archive again, delete: the record stays as deleted, the archive goes after the grace.
    let (s, v) = rest.post(&url("/archive"), &shop, &json!({})).await?;
    ensure!(s == 202, "second archive: {s} {v}");
    let archived = host.wait_state(&shop, &id, "archived").await?;
    let dump = archived["archive"]["location"].as_str().context("location")?.to_string();
    let dump_path = std::path::PathBuf::from(&dump);
    ensure!(dump_path.is_file(), "the archive {dump} is not in the repository");
    let (s, v) = rest.send(Method::DELETE, &url(""), Some(&shop), None).await?;
    ensure!(s == 200 && v["state"] == "deleted", "delete: {s} {v}");
    steward_tests::wait_for(
        "the deleted database's archive to be removed",
        std::time::Duration::from_secs(60),
        || async {
            let (s, v) = rest.get(&url(""), &host.admin).await?;
            ensure!(s == 200 && v["state"] == "deleted", "deleted record: {s} {v}");
            Ok((v["archive"].is_null() && !dump_path.exists()).then_some(()))
        },
    )
    .await?;
    let (s, v) = rest.get(&node.url("/v1/databases"), &shop).await?;
    ensure!(s == 200 && v["databases"].as_array().is_some_and(|d| d.is_empty()), "a deleted database is listed: {v}");
    Ok(())
}
