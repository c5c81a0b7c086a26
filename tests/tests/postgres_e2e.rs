//! End to end with real PostgreSQL: a control-plane node and a real agent process; create a team
//! and databases, wait for `active`, connect with the returned URI and use the database.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::json;
use steward_tests::{pg_connect, pg_connect_task, wait_for, OneHost, Scratch};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_is_created_and_usable() -> Result<()> {
    let scratch = Scratch::new("steward-e2e-")?;
    let host = OneHost::start(scratch.path()).await?;
    let (rest, node) = (&host.rest, host.node());
    let token = host.team("shop").await?;

    // The agent registers asynchronously: retry while no host is known yet (503).
    let started = Instant::now();
    let created = wait_for("a host to accept the database", Duration::from_secs(30), || async {
        let (s, v) = rest
            .post(&node.url("/v1/databases"), &token, &json!({"name": "orders", "purpose": "orders of the shop"}))
            .await?;
        match s {
            202 => Ok(Some(v)),
            503 => Ok(None),
            _ => anyhow::bail!("create: {s} {v}"),
        }
    })
    .await?;
    let t_accept = Instant::now();
    let id = created["id"].as_str().unwrap_or_default().to_string();
    let db = host.wait_state(&token, &id, "active").await?;
    let first = t_accept.elapsed();
    println!(
        "first database (initdb included): active {first:?} after POST (host registration wait {:?})",
        t_accept - started
    );

    let uri = db["connection"]["uri"].as_str().context("connection.uri missing")?.to_string();
    ensure!(uri.contains("target_session_attrs=read-write"), "uri: {uri}");
    ensure!(uri.contains("sslmode=require") && db["connection"]["sslmode"] == "require", "{db}");
    let (client, conn_task) = pg_connect_task(&uri).await.with_context(|| format!("connecting to {uri}"))?;
    client
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY, name text); INSERT INTO items VALUES (1, 'apple'), (2, 'pear');",
        )
        .await?;
    let rows = client.query("SELECT name FROM items ORDER BY id", &[]).await?;
    let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    ensure!(names == ["apple", "pear"], "read back {names:?}");
    let checksums: String = client.query_one("SHOW data_checksums", &[]).await?.get(0);
    ensure!(checksums == "on", "data checksums are {checksums}");
    let ssl: bool = client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await?.get(0);
    ensure!(ssl, "the session is not encrypted");
    drop(client);
    conn_task.abort();
    transport_rules(&db).await?;

    // A second database on the host that already runs PostgreSQL.
    let t = Instant::now();
    let (s, v) =
        rest.post(&node.url("/v1/databases"), &token, &json!({"name": "carts", "purpose": "shopping carts"})).await?;
    ensure!(s == 202, "second create: {s} {v}");
    let id2 = v["id"].as_str().unwrap_or_default().to_string();
    let db2 = host.wait_state(&token, &id2, "active").await?;
    println!("second database (PostgreSQL already running): active {:?} after POST", t.elapsed());
    ensure!(db2["connection"]["port"] == db["connection"]["port"], "both databases share the instance");
    let uri2 = db2["connection"]["uri"].as_str().context("uri2")?.to_string();
    let (c2, t2) = pg_connect_task(&uri2).await?;
    // The second database's owner cannot even connect to the first database.
    let c1 = &db["connection"];
    let c2c = &db2["connection"];
    let foreign = format!(
        "postgresql://{}:{}@{}:{}/{}",
        c2c["user"].as_str().unwrap_or(""),
        c2c["password"].as_str().unwrap_or(""),
        c1["host"].as_str().unwrap_or(""),
        c1["port"],
        c1["database"].as_str().unwrap_or("")
    );
    let denied = pg_connect(&foreign).await.err().context("owner of carts could connect to orders")?;
    ensure!(format!("{denied:#}").contains("permission denied for database"), "{denied:#}");
    let one: i32 = c2.query_one("SELECT 1", &[]).await?.get(0);
    ensure!(one == 1);
    drop(c2);
    t2.abort();
    let ops = created["operation_id"].as_str().unwrap_or_default();
    let (s, v) = rest.get(&node.url(&format!("/v1/operations/{ops}")), &token).await?;
    ensure!(s == 200 && v["state"] == "succeeded", "operation: {s} {v}");
    Ok(())
}

/// What the server lets through on TCP: libpq clients (psql with the returned URI) get TLS;
/// plaintext is refused by pg_hba.conf even with the right password; the replication role is
/// refused by pg_hba.conf on a product database (before any password is asked), while on the
/// one database it needs it gets as far as authentication.
async fn transport_rules(db: &serde_json::Value) -> Result<()> {
    let c = &db["connection"];
    let uri = c["uri"].as_str().context("uri")?;
    let psql = steward_agent::pg::PgBinaries::discover(None)?.bin("psql");
    let out = std::process::Command::new(&psql)
        .arg(uri)
        .args(["-XAtc", "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"])
        .output()
        .context("running psql")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success() && stdout.trim() == "t", "psql: {stdout} {}", String::from_utf8_lossy(&out.stderr));

    let (host, port) = (c["host"].as_str().unwrap_or_default(), c["port"].as_u64().unwrap_or_default());
    let (user, password) = (c["user"].as_str().unwrap_or_default(), c["password"].as_str().unwrap_or_default());
    let database = c["database"].as_str().unwrap_or_default();
    let password = steward_agent::pg::config::conninfo_value(password);
    let plain = format!("host={host} port={port} user={user} password={password} dbname={database} sslmode=disable");
    let refused = tokio_postgres::connect(&plain, tokio_postgres::NoTls)
        .await
        .err()
        .context("a plaintext TCP connection was accepted")?;
    let refused = steward_agent::pg::sql::describe(&refused);
    ensure!(refused.contains("pg_hba.conf rejects connection") && refused.contains("no encryption"), "{refused}");
    let out =
        std::process::Command::new(&psql).arg(&plain).args(["-XAtc", "SELECT 1"]).output().context("running psql")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("pg_hba.conf rejects connection"),
        "psql sslmode=disable: {stderr}"
    );

    let as_replication = |database: &str| {
        format!("host={host} port={port} user=steward_replication password=wrong dbname={database} sslmode=require")
    };
    let refused = pg_connect(&as_replication(database)).await.err().context("replication role got in")?;
    ensure!(format!("{refused:#}").contains("pg_hba.conf rejects connection"), "{refused:#}");
    let refused = pg_connect(&as_replication("postgres")).await.err().context("a wrong password was accepted")?;
    ensure!(format!("{refused:#}").contains("password authentication failed"), "{refused:#}");
    Ok(())
}
