//! Security of every network surface, against a real control-plane node: mutual TLS refuses
//! clients without a certificate from the cluster CA, roles are enforced per service, a revoked
//! host cannot heartbeat, join tokens work once, certificates rotate without interrupting
//! heartbeats, API tokens are scoped and revocable, and requests are rate limited.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use steward_proto::tls::pki::{self, LeafRequest};
use steward_proto::tls::{Identity, Role, TlsDir, TlsMaterial};
use steward_proto::v1::control_plane_client::ControlPlaneClient;
use steward_proto::v1::operator_client::OperatorClient;
use steward_proto::v1::raft_client::RaftClient;
use steward_proto::v1::{HeartbeatRequest, ListHostsRequest, RaftPayload, RaftStatusRequest, RegisterRequest};
use steward_tests::sim::{facts, op_req};
use steward_tests::{admin_token, bin, tls, wait_for, wait_leader, Node, Proc, Rest, Scratch};

/// One started single-node control plane.
struct One {
    node: Node,
    admin: String,
    token_file: PathBuf,
    rest: Rest,
}

async fn one_node(root: &Path, extra: &[&str]) -> Result<One> {
    let (token_file, admin) = admin_token(root)?;
    let mut node = Node::new(root, 1, &token_file, extra);
    let m = node.member();
    node.args.extend(["--initial-member".to_string(), m]);
    node.start()?;
    let rest = Rest::default();
    wait_leader(&rest, &[&node], Duration::from_secs(30)).await?;
    Ok(One { node, admin, token_file, rest })
}

fn stewardctl(one: &One, args: &[&str]) -> Result<(bool, String, String)> {
    let out = std::process::Command::new(bin("stewardctl"))
        .arg("--tls-dir")
        .arg(tls::operator_dir())
        .args(["--server", &one.node.grpc, "--token-file", &one.token_file.display().to_string()])
        .args(args)
        .output()
        .context("running stewardctl")?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
    Ok((out.status.success(), text(&out.stdout), text(&out.stderr)))
}

fn log_of(node: &Node) -> String {
    std::fs::read_to_string(node.dir.with_extension("log")).unwrap_or_default()
}

/// A TLS directory that trusts the tests' CA but holds a certificate from `ca` (another CA).
fn foreign_identity(root: &Path, identity: Identity) -> Result<TlsDir> {
    let other_ca = TlsDir(root.join("other-ca"));
    pki::ensure_ca(&other_ca)?;
    let out = TlsDir(root.join(format!("foreign-{}", identity.name)));
    let req = LeafRequest { identity, hosts: vec!["127.0.0.1".into()], lifetime: Duration::from_secs(3600) };
    pki::issue_into(&other_ca, &req, &out)?;
    // trust the real CA, so the client accepts the server and the server is the one to refuse
    std::fs::copy(tls::ca_pem(), out.ca_cert())?;
    Ok(out)
}

async fn raft_status(channel: tonic::transport::Channel, admin: &str) -> Result<u64, tonic::Status> {
    let mut c = OperatorClient::new(channel);
    c.raft_status(op_req(admin, RaftStatusRequest {})).await.map(|r| r.into_inner().leader_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_admits_only_certificates_of_the_cluster_ca_with_the_right_role() -> Result<()> {
    let scratch = Scratch::new("steward-sec-mtls-")?;
    let root = scratch.path();
    let one = one_node(root, &[]).await?;
    let addr = one.node.grpc.clone();

    // the test operator's certificate works: the control case
    let leader = raft_status(tls::operator_channel(&addr)?, &one.admin).await?;
    ensure!(leader == 1, "leader {leader}");

    // no client certificate at all
    let refused_before = log_of(&one.node).matches("TLS handshake refused").count();
    let anonymous = pki::read(&tls::ca_pem())?;
    let cfg = steward_proto::tls::transport::anonymous_client_config(anonymous.as_bytes())?;
    let ch = steward_proto::tls::transport::channel(&addr, cfg, Duration::from_secs(2))?;
    let e = raft_status(ch, &one.admin).await.err().context("a client without a certificate was served")?;
    // refused by the transport (TLS 1.3 reports it after the client's side of the handshake)
    ensure!(matches!(e.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled), "{e:?}");

    // a certificate from another CA (same identity shape, same token)
    let foreign = TlsMaterial::load(&foreign_identity(root, Identity::new(Role::Operator, "mallory"))?)?;
    let e = raft_status(tls::channel_with(&addr, &foreign)?, &one.admin).await.err();
    ensure!(e.is_some(), "a certificate from another CA was accepted");

    // plaintext HTTP/2
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
    ensure!(raft_status(plain, &one.admin).await.is_err(), "a plaintext client was served");
    wait_for("the node to log the refused handshakes", Duration::from_secs(5), || async {
        Ok((log_of(&one.node).matches("TLS handshake refused").count() >= refused_before + 2).then_some(()))
    })
    .await?;

    // roles: an agent certificate may not use the operator service, nor Raft; an operator may
    // not heartbeat; an agent speaks only for its own host id
    let agent = tls::host_material("sec-host-1")?;
    let e =
        raft_status(tls::channel_with(&addr, &agent)?, &one.admin).await.err().context("agent used operator API")?;
    ensure!(e.code() == tonic::Code::PermissionDenied, "{e:?}");
    let mut raft = RaftClient::new(tls::channel_with(&addr, &agent)?);
    let e = raft.vote(RaftPayload { json: b"{}".to_vec() }).await.err().context("agent used the Raft transport")?;
    ensure!(e.code() == tonic::Code::PermissionDenied, "{e:?}");
    let mut cp = ControlPlaneClient::new(tls::operator_channel(&addr)?);
    let e =
        cp.register(RegisterRequest { facts: Some(facts("sec-host-1")) }).await.err().context("operator registered")?;
    ensure!(e.code() == tonic::Code::PermissionDenied, "{e:?}");
    let mut cp = ControlPlaneClient::new(tls::channel_with(&addr, &agent)?);
    let e = cp
        .register(RegisterRequest { facts: Some(facts("someone-else")) })
        .await
        .err()
        .context("an agent registered as another host")?;
    ensure!(e.code() == tonic::Code::PermissionDenied && e.message().contains("sec-host-1"), "{e:?}");
    cp.register(RegisterRequest { facts: Some(facts("sec-host-1")) }).await.context("registering as itself")?;

    // the REST API is TLS too: plaintext HTTP gets no answer
    let plain = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let r = plain.get(format!("http://{}/healthz", one.node.api)).send().await;
    ensure!(r.is_err() || r.is_ok_and(|r| !r.status().is_success()), "plaintext REST was served");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_cannot_heartbeat_or_rejoin() -> Result<()> {
    let scratch = Scratch::new("steward-sec-revoke-")?;
    let one = one_node(scratch.path(), &[]).await?;
    let addr = one.node.grpc.clone();
    let agent = tls::host_material("doomed-host")?;
    let mut cp = ControlPlaneClient::new(tls::channel_with(&addr, &agent)?);
    cp.register(RegisterRequest { facts: Some(facts("doomed-host")) }).await?;
    let beat = || HeartbeatRequest { facts: Some(facts("doomed-host")), instances: vec![] };
    ensure!(cp.heartbeat(beat()).await?.into_inner().known, "heartbeat before revocation");

    let (ok, out, err) = stewardctl(&one, &["host", "revoke", "doomed-host", "--output", "json"])?;
    ensure!(ok, "stewardctl host revoke: {err}");
    let shown: Value = serde_json::from_str(&out)?;
    ensure!(shown[0]["state"] == "revoked", "{shown}");

    // the open connection: refused by the service
    let e = cp.heartbeat(beat()).await.err().context("a revoked host heartbeated on its open connection")?;
    ensure!(e.code() == tonic::Code::PermissionDenied, "{e:?}");
    // a new connection: refused at the handshake (the revocation list follows within a second)
    wait_for("new connections of the revoked host to be refused", Duration::from_secs(10), || async {
        let mut fresh = ControlPlaneClient::new(tls::channel_with(&addr, &agent)?);
        Ok(match fresh.heartbeat(beat()).await {
            Ok(_) => None,
            Err(e) if e.code() == tonic::Code::PermissionDenied => None,
            Err(e) => Some(e),
        })
    })
    .await?;
    ensure!(log_of(&one.node).contains("refused a revoked certificate"), "no revocation in the node's log");

    // it cannot get a new certificate with a join token either
    let (ok, token, err) = stewardctl(&one, &["join-token", "create", "--role", "agent"])?;
    ensure!(ok, "join-token create: {err}");
    let dir = TlsDir(scratch.path().join("rejoin"));
    let e = steward_proto::tls::join::join(
        &one.node.api,
        token.trim(),
        &Identity::new(Role::Agent, "doomed-host"),
        vec![],
        &dir,
    )
    .await
    .err()
    .context("a revoked host joined again")?;
    ensure!(e.to_string().contains("revoked"), "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_work_once_and_certificates_rotate_without_interruption() -> Result<()> {
    let scratch = Scratch::new("steward-sec-join-")?;
    let root = scratch.path();
    // short-lived certificates: every holder renews after 20 s
    let one = one_node(root, &["--cert-lifetime", "30s", "--agent-heartbeat-ms", "300"]).await?;
    let (ok, token, err) = stewardctl(&one, &["join-token", "create", "--role", "agent", "--ttl", "600"])?;
    ensure!(ok, "join-token create: {err}");
    let token = token.trim().to_string();
    ensure!(token.starts_with("stj_"), "{token}");

    // a real agent joins with it (PostgreSQL is not needed to register)
    let data = root.join("joined-host");
    let args: Vec<String> = [
        "run",
        "--control-plane",
        &one.node.grpc,
        "--listen",
        &format!("127.0.0.1:{}", steward_tests::free_port()),
        "--data-path",
        &data.display().to_string(),
        "--host-id",
        "joined-host",
        "--pg-listen",
        "127.0.0.1",
        "--pg-port",
        &steward_tests::free_port().to_string(),
        "--join-url",
        &one.node.api,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut cmd = std::process::Command::new(bin("steward-agent"));
    cmd.args(&args).env("STEWARD_JOIN_TOKEN", &token).env("RUST_LOG", "info");
    let log = root.join("joined-agent.log");
    let _agent = Proc::from_command("joined-agent", cmd, &log)?;
    let hosts = || async {
        let r = OperatorClient::new(tls::operator_channel(&one.node.grpc)?)
            .list_hosts(op_req(&one.admin, ListHostsRequest {}))
            .await?
            .into_inner();
        anyhow::Ok(r.hosts)
    };
    wait_for("the joined agent to register", Duration::from_secs(30), || async {
        Ok(hosts().await?.iter().any(|h| h.id == "joined-host" && h.state == "active").then_some(()))
    })
    .await?;
    let cert = TlsDir(data.join("tls"));
    ensure!(cert.identity()? == Identity::new(Role::Agent, "joined-host"), "joined identity");
    ensure!(!cert.ca_key().exists(), "an agent received the CA key");

    // the token is spent
    let e = steward_proto::tls::join::join(
        &one.node.api,
        &token,
        &Identity::new(Role::Agent, "second-host"),
        vec![],
        &TlsDir(root.join("second")),
    )
    .await
    .err()
    .context("a join token worked twice")?;
    ensure!(e.to_string().contains("already used"), "{e}");
    // a token naming another CA is refused by the joiner before it sends anything
    let forged = format!("{}.{}", token.split('.').next().unwrap_or_default(), "ab".repeat(32));
    let e = steward_proto::tls::join::join(
        &one.node.api,
        &forged,
        &Identity::new(Role::Agent, "third-host"),
        vec![],
        &TlsDir(root.join("third")),
    )
    .await
    .err()
    .context("a token pinning another CA was accepted")?;
    ensure!(e.to_string().contains("CA"), "{e}");

    // rotation: both the agent's and the node's certificates are renewed before they expire,
    // and heartbeats keep flowing past the first certificates' expiry
    let first_agent = pki::read(&cert.node_cert())?;
    let node_tls = TlsDir(one.node.dir.join("tls"));
    let first_node = pki::read(&node_tls.node_cert())?;
    let first_expiry = pki::validity(&first_agent)?.not_after;
    wait_for("both certificates to be renewed", Duration::from_secs(40), || async {
        Ok((pki::read(&cert.node_cert())? != first_agent && pki::read(&node_tls.node_cert())? != first_node)
            .then_some(()))
    })
    .await?;
    let until = first_expiry + Duration::from_secs(5);
    wait_for("the first agent certificate to have expired", Duration::from_secs(40), || async {
        Ok((std::time::SystemTime::now() > until).then_some(()))
    })
    .await?;
    let hs = hosts().await?;
    let h = hs.iter().find(|h| h.id == "joined-host").context("joined host missing")?;
    ensure!(h.state == "active", "host after rotation: {h:?}");
    let beat = chrono::DateTime::parse_from_rfc3339(&h.last_heartbeat).context("last heartbeat")?;
    let age = chrono::Utc::now().signed_duration_since(beat);
    ensure!(age < chrono::Duration::seconds(3), "last heartbeat {age} ago: heartbeats stopped during rotation");
    let agent_log = std::fs::read_to_string(&log)?;
    ensure!(agent_log.contains("renewed this host's certificate"), "agent log has no renewal");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_tokens_are_scoped_revocable_and_rate_limited() -> Result<()> {
    let scratch = Scratch::new("steward-sec-tokens-")?;
    let one = one_node(scratch.path(), &["--rate-limit", "20"]).await?;
    let url = |p: &str| one.node.url(p);
    let rest = &one.rest;
    let (s, v) = rest.post(&url("/v1/teams"), &one.admin, &json!({"name": "shop", "contact": "c"})).await?;
    ensure!(s == 201, "team: {s} {v}");
    let team = v["token"].as_str().context("team token")?.to_string();

    // a team token cannot call admin routes
    let (s, _) = rest.post(&url("/v1/teams"), &team, &json!({"name": "evil", "contact": "c"})).await?;
    ensure!(s == 403, "team created a team: {s}");
    for path in ["/v1/tokens", "/v1/audit"] {
        let (s, _) = rest.get(&url(path), &team).await?;
        ensure!(s == 403, "team read {path}: {s}");
    }
    let (s, _) = rest.post(&url("/v1/tokens"), &team, &json!({"scope": "admin", "name": "escalate"})).await?;
    ensure!(s == 403, "team created a token: {s}");

    // an operator token reads everything on REST but changes nothing there; it drives stewardctl
    let (s, v) = rest.post(&url("/v1/tokens"), &one.admin, &json!({"scope": "operator", "name": "on-call"})).await?;
    ensure!(s == 201, "operator token: {s} {v}");
    let operator = v["token"].as_str().context("operator token")?.to_string();
    let operator_id = v["id"].as_str().context("token id")?.to_string();
    let (s, _) = rest.get(&url("/v1/databases"), &operator).await?;
    ensure!(s == 200, "operator list: {s}");
    let (s, _) =
        rest.post(&url("/v1/databases"), &operator, &json!({"name": "x", "owner": "shop", "purpose": "p"})).await?;
    ensure!(s == 403, "operator created a database: {s}");
    let ctl = |token: &str| {
        std::process::Command::new(bin("stewardctl"))
            .arg("--tls-dir")
            .arg(tls::operator_dir())
            .args(["--server", &one.node.grpc, "--token", token, "raft", "status"])
            .output()
    };
    ensure!(ctl(&operator)?.status.success(), "stewardctl with an operator token failed");
    let out = ctl(&team)?;
    ensure!(!out.status.success(), "stewardctl accepted a team token");
    ensure!(String::from_utf8_lossy(&out.stderr).contains("team tokens"), "{}", String::from_utf8_lossy(&out.stderr));

    // listed without secrets; revoked at once
    let (s, v) = rest.get(&url("/v1/tokens"), &one.admin).await?;
    ensure!(s == 200 && v["tokens"].as_array().is_some_and(|t| t.len() >= 2), "token list: {s} {v}");
    let listed = v.to_string();
    ensure!(
        !listed.contains(&operator) && !listed.contains(&team) && !listed.contains("hash"),
        "secrets listed: {listed}"
    );
    let (s, v) =
        rest.send(reqwest::Method::DELETE, &url(&format!("/v1/tokens/{operator_id}")), Some(&one.admin), None).await?;
    ensure!(s == 200 && v["revoked_at"].is_string(), "revoke: {s} {v}");
    let (s, v) = rest.get(&url("/v1/databases"), &operator).await?;
    ensure!(s == 401, "a revoked token still works: {s} {v}");
    ensure!(!v.to_string().contains(&operator), "the error echoes the token: {v}");
    ensure!(!ctl(&operator)?.status.success(), "stewardctl accepted a revoked token");

    // rate limit: a burst of twice the rate, then 429 with Retry-After; others are unaffected
    let mut limited = None;
    for _ in 0..60 {
        let resp = rest.http.get(url("/v1/databases")).bearer_auth(&team).send().await?;
        if resp.status() == 429 {
            limited = Some(resp);
            break;
        }
    }
    let resp = limited.context("60 quick requests were never rate limited at 20/s")?;
    ensure!(resp.headers().get("retry-after").is_some(), "429 without Retry-After");
    let (s, _) = rest.get(&url("/v1/databases"), &one.admin).await?;
    ensure!(s == 200, "another token was limited too: {s}");
    Ok(())
}

/// Every regular file under `dir` (logs of the node, the agent and PostgreSQL).
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => files_under(&p, out),
            Ok(t) if t.is_file() => out.push(p),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_credentials_work_and_no_secret_reaches_logs_metrics_or_errors() -> Result<()> {
    let scratch = Scratch::new("steward-sec-secrets-")?;
    let root = scratch.path();
    let stack = steward_tests::Stack::start(root).await?;
    let team = stack.team("vault").await?;
    let db = stack.active_database(&team, "ledger").await?;
    let id = db["id"].as_str().context("database id")?.to_string();
    let old_uri = db["connection"]["uri"].as_str().context("uri")?.to_string();
    let old_password = db["connection"]["password"].as_str().context("password")?.to_string();
    ensure!(old_uri.contains("sslmode=require"), "the URI does not require TLS: {old_uri}");
    steward_tests::pg_connect(&old_uri).await?.simple_query("CREATE TABLE t (x int)").await?;
    // operators see the provisioning among recent operations
    let (ok, out, err) = stack.stewardctl(&["operations", "--kind", "provision", "--output", "json"])?;
    ensure!(ok, "stewardctl operations: {err}");
    let ops: Value = serde_json::from_str(&out)?;
    ensure!(
        ops.as_array().is_some_and(|a| a.iter().any(|o| o["database_id"] == id.as_str() && o["state"] == "succeeded")),
        "operations: {ops}"
    );

    // rotate: the new password works, the old one no longer does
    let url = |p: &str| stack.node().url(p);
    let (s, v) = stack.rest.post(&url(&format!("/v1/databases/{id}/credentials/rotate")), &team, &json!({})).await?;
    ensure!(s == 200, "rotate: {s} {v}");
    let new_uri = v["connection"]["uri"].as_str().context("new uri")?.to_string();
    let new_password = v["connection"]["password"].as_str().context("new password")?.to_string();
    ensure!(new_password != old_password && new_uri != old_uri, "the password did not change");
    let c = steward_tests::pg_connect(&new_uri).await?;
    let n = c.simple_query("SELECT count(*) FROM t").await?;
    ensure!(!n.is_empty(), "the data is still there");
    let e = steward_tests::pg_connect(&old_uri).await.err().context("the old password still works")?;
    ensure!(format!("{e:#}").contains("password"), "{e:#}");
    let (s, v) = stack.rest.get(&url(&format!("/v1/databases/{id}")), &team).await?;
    ensure!(s == 200 && v["connection"]["password"] == new_password.as_str(), "GET after rotate: {v}");
    // another team cannot rotate it, an operator token cannot either
    let other = stack.team("nosy").await?;
    let (s, _) = stack.rest.post(&url(&format!("/v1/databases/{id}/credentials/rotate")), &other, &json!({})).await?;
    ensure!(s == 404, "another team rotated: {s}");

    // errors do not echo secrets
    let wrong = format!("{}x", team);
    let (s, v) = stack.rest.get(&url("/v1/databases"), &wrong).await?;
    ensure!(s == 401 && !v.to_string().contains(&wrong), "401 echoes the token: {v}");
    let (s, v) = stack
        .rest
        .post(
            &url("/v1/join"),
            &team,
            &json!({"token": format!("stj_{}", "0".repeat(48)), "role": "agent", "name": "x", "csr": "junk"}),
        )
        .await?;
    ensure!(s == 401 || s == 422, "bad join: {s} {v}");
    let (ok, join_token, err) = stack.stewardctl(&["join-token", "create", "--role", "agent"])?;
    ensure!(ok, "join-token: {err}");
    let join_secret = join_token.trim().trim_start_matches("stj_").split('.').next().unwrap_or_default().to_string();
    ensure!(join_secret.len() == 48, "join token: {join_token}");

    // nothing secret in /metrics or in any file the node, the agent or PostgreSQL wrote
    let (_, metrics) = stack.rest.send(reqwest::Method::GET, &url("/metrics"), None, None).await?;
    let mut haystacks = vec![("/metrics".to_string(), metrics.as_str().unwrap_or_default().to_string())];
    let mut files = Vec::new();
    files_under(root, &mut files);
    for f in files {
        let name = f.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        // the node's admin token file, TLS keys, the agent's replication passfiles and the
        // replicated state hold secrets by design; logs must not
        let is_log = name.ends_with(".log") || name.contains(".log.") || f.components().any(|c| c.as_os_str() == "log");
        if is_log {
            if let Ok(bytes) = std::fs::read(&f) {
                haystacks.push((f.display().to_string(), String::from_utf8_lossy(&bytes).to_string()));
            }
        }
    }
    ensure!(
        haystacks.len() >= 3,
        "found too few logs to check: {:?}",
        haystacks.iter().map(|h| &h.0).collect::<Vec<_>>()
    );
    let secrets = [
        ("admin token", stack.admin.as_str()),
        ("team token", team.as_str()),
        ("old database password", old_password.as_str()),
        ("new database password", new_password.as_str()),
        ("join token", join_secret.as_str()),
    ];
    for (what, secret) in secrets {
        for (file, text) in &haystacks {
            ensure!(!text.contains(secret), "the {what} appears in {file}");
        }
    }
    Ok(())
}
