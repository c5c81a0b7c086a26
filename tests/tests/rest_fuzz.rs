//! The REST API fuzzed against its own OpenAPI document (`GET /v1/openapi.json`) by
//! schemathesis, once with the admin token and once with a team token, on a real single-node
//! control plane with three simulated hosts (so databases can be accepted; they stay
//! `provisioning`). Every response must pass schemathesis's checks (documented status, content
//! type, headers and body schema; invalid input refused; tokens not ignored), no request may
//! make the server fail (5xx other than the documented 503 "retry later"), and the node must
//! still be serving afterwards. schemathesis comes from `make deps`
//! (`packaging/install-deps.sh`), pinned there.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use reqwest::Method;
use serde_json::Value;
use steward_tests::sim::{op_req, operator, spawn_host};
use steward_tests::{admin_token, wait_for, wait_leader, Node, Rest, Scratch};

/// Where `make deps` installs schemathesis; `STEWARD_SCHEMATHESIS` overrides.
const SCHEMATHESIS: &str = "/opt/steward-test/venv/bin/schemathesis";
/// Test cases per API operation and phase: bounded so both runs stay well under two minutes on
/// two cores.
const MAX_EXAMPLES: u32 = 30;
/// Fixed, so a failure reproduces with the same inputs.
const SEED: u64 = 20261125;
/// Seconds one request may take before schemathesis counts it as a failure.
const REQUEST_TIMEOUT_SECS: u32 = 10;
/// A whole schemathesis run is killed after this long.
const RUN_TIMEOUT: Duration = Duration::from_secs(150);
/// schemathesis's flag for the CA bundle that verifies the API's TLS certificate (or `false`).
const TLS_VERIFY_FLAG: &str = "--tls-verify";
/// The checks every response must pass: all of schemathesis's, except
/// `positive_data_acceptance`, which expects every schema-valid body to succeed while some rules
/// cannot be written in a schema (`owner` must be an existing team, `sunset_at` in the future).
const CHECKS: &str = "all";
const EXCLUDED_CHECKS: &str = "positive_data_acceptance";
/// 503 is the API's documented "no leader / no host with room, retry" answer (with three
/// simulated hosts, enough creates fill them): not a server failure. Any other 5xx is.
const CONFIG: &str = r#"
[checks.not_a_server_error]
expected-statuses = ["2xx", "3xx", "4xx", "503"]
"#;

fn schemathesis() -> PathBuf {
    std::env::var_os("STEWARD_SCHEMATHESIS").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(SCHEMATHESIS))
}

/// The operationIds of documented operations this node does not serve yet (its fallback answers
/// "no such route"): they are described ahead of their implementation and cannot be fuzzed.
async fn unserved_operations(rest: &Rest, node: &Node, doc: &Value) -> Result<Vec<String>> {
    let mut unserved = Vec::new();
    let paths = doc["paths"].as_object().context("the document has no paths")?;
    for (path, item) in paths {
        let Some(item) = item.as_object() else { continue };
        for (method, op) in item {
            let Ok(m) = Method::from_bytes(method.to_uppercase().as_bytes()) else { continue };
            let Some(id) = op["operationId"].as_str() else { continue };
            if !["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&m.as_str()) {
                continue;
            }
            // Any value for path parameters: routing does not look at it.
            let concrete: String = path
                .split('/')
                .map(|seg| if seg.starts_with('{') { "probe" } else { seg })
                .collect::<Vec<_>>()
                .join("/");
            let (s, v) = rest.send(m, &node.url(&concrete), None, None).await?;
            if s == 404 && v["error"]["message"].as_str().is_some_and(|msg| msg.starts_with("no such route")) {
                unserved.push(id.to_string());
            }
        }
    }
    Ok(unserved)
}

/// Runs schemathesis against `schema_url` with `token`, killing it after [`RUN_TIMEOUT`];
/// returns (success, output).
async fn fuzz(
    dir: &Path,
    schema_url: &str,
    token: &str,
    exclude: &[String],
    tls_verify: Option<&Path>,
) -> Result<(bool, String)> {
    let config = dir.join("schemathesis.toml");
    std::fs::write(&config, CONFIG)?;
    let log = dir.join("schemathesis.log");
    let out = std::fs::File::create(&log)?;
    let mut cmd = tokio::process::Command::new(schemathesis());
    cmd.arg("--config-file").arg(&config).args(["--no-color", "run", schema_url]);
    cmd.args(["--header", &format!("Authorization: Bearer {token}")]);
    cmd.args(["--checks", CHECKS, "--exclude-checks", EXCLUDED_CHECKS]);
    cmd.args(["--max-examples", &MAX_EXAMPLES.to_string(), "--seed", &SEED.to_string()]);
    cmd.args(["--request-timeout", &REQUEST_TIMEOUT_SECS.to_string()]);
    cmd.args(["--workers", "1", "--generation-database", "none"]);
    for id in exclude {
        cmd.args(["--exclude-operation-id", id]);
    }
    if let Some(ca) = tls_verify {
        cmd.arg(TLS_VERIFY_FLAG).arg(ca);
    }
    cmd.current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .kill_on_drop(true);
    let mut child =
        cmd.spawn().with_context(|| format!("running {} (install it with `make deps`)", schemathesis().display()))?;
    let started = Instant::now();
    let status = match tokio::time::timeout(RUN_TIMEOUT, child.wait()).await {
        Ok(status) => Some(status?),
        Err(_) => {
            // Its own process group: take down anything it started too.
            if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
            let _ = child.wait().await;
            None
        }
    };
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    eprintln!("schemathesis ({}) ran for {:.1?}", dir.display(), started.elapsed());
    match status {
        Some(s) => Ok((s.success(), output)),
        None => bail!("schemathesis did not finish within {RUN_TIMEOUT:?} and was killed; its output:\n{output}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_api_survives_fuzzing_against_its_openapi_document() -> Result<()> {
    let scratch = Scratch::new("steward-restfuzz-")?;
    let (token_file, admin) = admin_token(scratch.path())?;
    // A generous rate limit: the fuzzer should reach the handlers, not the limiter (which has
    // its own test in `security`).
    let mut node = Node::new(scratch.path(), 1, &token_file, &["--rate-limit", "1000"]);
    let m = node.member();
    node.args.extend(["--initial-member".to_string(), m]);
    node.start()?;
    let rest = Rest::default();
    wait_leader(&rest, &[&node], Duration::from_secs(30)).await?;
    let hosts: Vec<_> = (1..=3)
        .map(|i| spawn_host(vec![node.grpc.clone()], &format!("sim-host-{i}"), Duration::from_secs(600)))
        .collect();
    wait_for("three hosts to register", Duration::from_secs(15), || async {
        let r = operator(&node.grpc)?
            .list_hosts(op_req(&admin, steward_proto::v1::ListHostsRequest {}))
            .await?
            .into_inner();
        Ok((r.hosts.len() >= 3).then_some(()))
    })
    .await?;

    // The document is public, JSON, and OpenAPI 3.0.3.
    let schema_url = node.url("/v1/openapi.json");
    let resp = rest.http.get(&schema_url).send().await?;
    ensure!(resp.status().as_u16() == 200, "openapi.json: {}", resp.status());
    let content_type = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    ensure!(content_type.starts_with("application/json"), "openapi.json content type: {content_type}");
    let doc: Value = resp.json().await?;
    ensure!(doc["openapi"] == "3.0.3", "openapi version: {}", doc["openapi"]);

    // A body over 64 KiB is refused as too large, in the documented error shape.
    let big = serde_json::json!({"name": "big", "contact": "x".repeat(70 * 1024)});
    let (s, v) = rest.post(&node.url("/v1/teams"), &admin, &big).await?;
    ensure!(s == 413 && v["error"]["code"] == "payload_too_large", "oversized body: {s} {v}");

    // A path segment that is not UTF-8 once decoded gets the documented JSON error too.
    let (s, v) = rest.get(&node.url("/v1/databases/%FF"), &admin).await?;
    ensure!(s == 400 && v["error"]["code"] == "bad_request", "undecodable id: {s} {v}");

    let (s, v) = rest.post(&node.url("/v1/teams"), &admin, &serde_json::json!({"name": "fuzzers"})).await?;
    ensure!(s == 201, "team: {s} {v}");
    let team = v["token"].as_str().unwrap_or_default().to_string();

    let exclude = unserved_operations(&rest, &node, &doc).await?;
    if !exclude.is_empty() {
        eprintln!("not fuzzed (documented, not served by this build yet): {exclude:?}");
    }
    // The API speaks https with a certificate from the tests' cluster CA.
    let tls_verify: Option<PathBuf> = Some(steward_tests::tls::ca_pem());
    for (who, token) in [("admin", admin.as_str()), ("team", team.as_str())] {
        let dir = scratch.path().join(format!("fuzz-{who}"));
        std::fs::create_dir_all(&dir)?;
        let (ok, output) = fuzz(&dir, &schema_url, token, &exclude, tls_verify.as_deref()).await?;
        ensure!(ok, "schemathesis with the {who} token found problems:\n{output}");
    }

    // No crash: the node still answers.
    let (s, v) = rest.send(Method::GET, &node.url("/healthz"), None, None).await?;
    ensure!(s == 200 && v["status"] == "ok", "healthz after fuzzing: {s} {v}");
    for h in hosts {
        h.abort();
    }
    Ok(())
}
