//! Harness for cross-component tests: starts real `steward-controlplane` and `steward-agent`
//! processes on loopback, talks to them over REST and gRPC, waits on conditions with
//! deadlines, and cleans up processes and PostgreSQL instances even when a test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub mod benchkit;
pub mod fleet;
pub mod netns;
pub mod s3;
pub mod sim;
pub mod tls;
pub mod writer;

/// Path of a workspace binary (built by `cargo build` before the tests run; `make test` does):
/// next to the running executable, whether that is a test in `target/<profile>/deps` or a bench
/// binary in `target/<profile>`; `STEWARD_BIN_DIR` overrides.
pub fn bin(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("STEWARD_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let profile_dir = if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or_default()
    } else {
        dir
    };
    profile_dir.join(name)
}

/// A free TCP port on 127.0.0.1 (the OS picks; tiny race window accepted in tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

/// A client to `uri_or_conninfo` over TLS (`sslmode=require` whatever it says, with the agent's
/// connector: servers refuse plaintext TCP and their certificates are self-signed); its connection
/// runs in a spawned task, which ends when the client is dropped.
pub async fn pg_connect(uri_or_conninfo: &str) -> Result<tokio_postgres::Client> {
    pg_connect_task(uri_or_conninfo).await.map(|(client, _)| client)
}

/// Like [`pg_connect`], also returning the connection's task, for tests that cut it off.
pub async fn pg_connect_task(uri_or_conninfo: &str) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>)> {
    let cfg: tokio_postgres::Config = uri_or_conninfo.parse().context("parsing the connection string")?;
    let (client, conn) = steward_agent::pg::tls::connect(cfg)
        .await
        .map_err(|e| anyhow::anyhow!("{}", steward_agent::pg::sql::describe(&e)))?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((client, task))
}

/// Polls `f` until it returns `Ok(Some(v))` or the deadline passes; the error names `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last_err = String::new();
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = format!("{e:#}"),
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what} (last error: {last_err})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
}

/// The log filter of spawned processes: `STEWARD_TEST_RUST_LOG` when set (to look closer while
/// debugging a test or a benchmark), else info without the libraries' chatter.
fn node_log_filter() -> String {
    std::env::var("STEWARD_TEST_RUST_LOG")
        .unwrap_or_else(|_| "info,openraft=info,sqlx=warn,h2=warn,tower=warn,hyper=warn".to_string())
}

impl Proc {
    /// Spawns `program args`, logging to `log`.
    pub fn spawn(name: &str, program: &Path, args: &[String], log: &Path) -> Result<Self> {
        let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(program)
            .args(args)
            .env("RUST_LOG", node_log_filter())
            .env_remove("STEWARD_ADMIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawning {} (did `cargo build` run?)", program.display()))?;
        Ok(Self { name: name.into(), child: Some(child) })
    }

    /// Spawns a prepared `cmd` (e.g. one entering a network namespace, see
    /// [`netns::Host::spawn`]) with stdin from /dev/null and stdout and stderr written to `log`
    /// (created or truncated); the environment and arguments are the caller's.
    pub fn from_command(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        Ok(Self { name: name.into(), child: Some(child) })
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A scratch directory under /tmp that PostgreSQL's OS user can traverse; on drop it stops
/// every PostgreSQL whose data directory lies inside it.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new(prefix: &str) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new().prefix(prefix).tempdir_in("/tmp")?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        Ok(Self { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Sends SIGQUIT (immediate shutdown) to every postmaster under `root` and waits for it to exit.
pub fn stop_postgres_under(root: &Path) {
    let mut pids = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.file_name().is_some_and(|n| n == "postmaster.pid") {
                if let Some(pid) = std::fs::read_to_string(&p)
                    .ok()
                    .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
                {
                    pids.push(pid);
                }
            } else if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            }
        }
    }
    for pid in &pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGQUIT);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for pid in pids {
        while Instant::now() < deadline && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        stop_postgres_under(self.dir.path());
        // For debugging a failure: STEWARD_KEEP_TEST_DIRS=1 keeps logs and data (PostgreSQL is
        // stopped either way).
        if std::env::var_os("STEWARD_KEEP_TEST_DIRS").is_some() {
            let kept =
                std::mem::replace(&mut self.dir, tempfile::TempDir::new().unwrap_or_else(|_| std::process::abort()));
            eprintln!("keeping test directory {}", kept.keep().display());
        }
    }
}

/// One control-plane node process.
pub struct Node {
    pub id: u64,
    pub grpc: String,
    pub api: String,
    pub dir: PathBuf,
    pub args: Vec<String>,
    pub proc: Option<Proc>,
}

impl Node {
    /// Describes a node on loopback; `start` runs it.
    pub fn new(root: &Path, id: u64, token_file: &Path, extra: &[&str]) -> Self {
        Self::new_on("127.0.0.1", root, id, token_file, extra)
    }

    /// Describes a node listening on `ip` (e.g. a test lab's bridge address).
    pub fn new_on(ip: &str, root: &Path, id: u64, token_file: &Path, extra: &[&str]) -> Self {
        let grpc = format!("{ip}:{}", free_port());
        let api = format!("{ip}:{}", free_port());
        let dir = root.join(format!("cp-{id}"));
        let mut args: Vec<String> = vec![
            "run".into(),
            "--node-id".into(),
            id.to_string(),
            "--data-dir".into(),
            dir.display().to_string(),
            "--grpc-listen".into(),
            grpc.clone(),
            "--api-listen".into(),
            api.clone(),
            "--admin-token-file".into(),
            token_file.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self { id, grpc, api, dir, args, proc: None }
    }

    /// `ID=GRPC,API` for `--initial-member`.
    pub fn member(&self) -> String {
        format!("{}={},{}", self.id, self.grpc, self.api)
    }

    pub fn start(&mut self) -> Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        // A node started with a join token gets its certificate by joining instead.
        if !self.dir.join("tls").join("node.pem").exists() && !self.args.iter().any(|a| a == "--join-token") {
            tls::seed_node(&self.dir.join("tls"))?;
        }
        let log = self.dir.with_extension("log");
        let log = if self.proc.is_none() && log.exists() {
            // Keep earlier logs of a restarted node.
            let n = (1..).find(|n| !self.dir.with_extension(format!("log.{n}")).exists()).unwrap_or(1);
            let _ = std::fs::rename(&log, self.dir.with_extension(format!("log.{n}")));
            log
        } else {
            log
        };
        self.proc = Some(Proc::spawn(&format!("cp-{}", self.id), &bin("steward-controlplane"), &self.args, &log)?);
        Ok(())
    }

    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://{}{}", self.api, path)
    }
}

/// Starts `nodes` as one control-plane group (each lists all as `--initial-member`) and waits
/// until they agree on a leader.
pub async fn start_group(nodes: &mut [Node], rest: &Rest) -> Result<()> {
    let members: Vec<String> = nodes.iter().map(Node::member).collect();
    for node in nodes.iter_mut() {
        for m in &members {
            node.args.extend(["--initial-member".to_string(), m.clone()]);
        }
        node.start()?;
    }
    wait_leader(rest, &nodes.iter().collect::<Vec<_>>(), Duration::from_secs(30)).await?;
    Ok(())
}

/// Writes a fresh admin token file and returns (path, token).
pub fn admin_token(root: &Path) -> Result<(PathBuf, String)> {
    let token = format!("adm_test_{}", std::process::id());
    let path = root.join("admin.token");
    std::fs::write(&path, format!("{token}\n"))?;
    Ok((path, token))
}

/// Minimal REST client returning (status, JSON body).
#[derive(Clone)]
pub struct Rest {
    pub http: reqwest::Client,
}

impl Default for Rest {
    fn default() -> Self {
        Self { http: tls::https_client(Duration::from_secs(15)) }
    }
}

impl Rest {
    pub async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(u16, Value)> {
        let mut rb = self.http.request(method, url);
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let resp = rb.send().await.with_context(|| format!("request to {url}"))?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, json))
    }

    pub async fn get(&self, url: &str, token: &str) -> Result<(u16, Value)> {
        self.send(reqwest::Method::GET, url, Some(token), None).await
    }

    pub async fn post(&self, url: &str, token: &str, body: &Value) -> Result<(u16, Value)> {
        self.send(reqwest::Method::POST, url, Some(token), Some(body)).await
    }
}

/// Value of the unlabelled sample `name` on `node`'s `/metrics`.
pub async fn metric(rest: &Rest, node: &Node, token: &str, name: &str) -> Result<f64> {
    let (s, v) = rest.get(&node.url("/metrics"), token).await?;
    anyhow::ensure!(s == 200, "/metrics of node {}: {s}", node.id);
    v.as_str()
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .with_context(|| format!("node {} exports no {name}", node.id))
}

/// Waits until `node` answers `/healthz` and reports a leader; returns the leader id.
pub async fn wait_leader(rest: &Rest, nodes: &[&Node], timeout: Duration) -> Result<u64> {
    wait_for("a leader all listed nodes agree on", timeout, || async {
        let mut leaders = Vec::new();
        for n in nodes {
            let (s, v) = rest.send(reqwest::Method::GET, &n.url("/healthz"), None, None).await?;
            if s != 200 {
                return Ok(None);
            }
            match v["leader_id"].as_u64() {
                Some(l) => leaders.push(l),
                None => return Ok(None),
            }
        }
        let first = leaders[0];
        let agreed = leaders.iter().all(|l| *l == first) && nodes.iter().any(|n| n.id == first);
        Ok(agreed.then_some(first))
    })
    .await
}

/// `steward-agent` linked (or copied) into `dir`: agents with a repository run from there,
/// because PostgreSQL's user runs the binary as archive_command and must reach it wherever the
/// checkout lives.
pub fn agent_copy(dir: &Path) -> Result<PathBuf> {
    let copy = dir.join("steward-agent");
    if std::fs::hard_link(bin("steward-agent"), &copy).is_err() {
        std::fs::copy(bin("steward-agent"), &copy).context("copying steward-agent into the scratch dir")?;
    }
    Ok(copy)
}

/// One agent of a [`Stack`]: its process and where its PostgreSQL lives.
pub struct Agent {
    pub proc: Proc,
    /// `--data-path`; PostgreSQL's unix sockets are in `<data_path>/run`.
    pub data_path: PathBuf,
    pub pg_port: u16,
}

impl Agent {
    /// A superuser connection over the agent's private unix socket to `database` of the instance
    /// on `port` (for checks a product team could not make).
    pub async fn superuser(&self, port: u16, database: &str) -> Result<tokio_postgres::Client> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host_path(self.data_path.join("run")).port(port).user("postgres").dbname(database);
        let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.context("superuser connection")?;
        tokio::spawn(conn);
        Ok(client)
    }
}

/// A stack on loopback: control-plane nodes and real agents (PostgreSQL on free ports, one zone
/// each), files under `root`. Dropping it stops them all; the `Scratch` holding `root` stops
/// PostgreSQL.
pub struct Stack {
    pub nodes: Vec<Node>,
    pub agents: Vec<Agent>,
    pub admin: String,
    pub token_file: PathBuf,
    pub rest: Rest,
}

/// The usual single-node, single-agent stack.
pub type OneHost = Stack;

impl Stack {
    /// One node and one agent; waits for the node to lead.
    pub async fn start(root: &Path) -> Result<Self> {
        Self::launch(root, 1, 1, &[], &[], false).await
    }

    /// Like [`Stack::start`], with flags added to the node and to the agent.
    pub async fn start_with(root: &Path, node_args: &[&str], agent_args: &[&str]) -> Result<Self> {
        Self::launch(root, 1, 1, node_args, agent_args, false).await
    }

    /// [`Stack::start_with`] with the agent archiving into `<root>/repo` (created, owned by
    /// PostgreSQL's user); agents then run from a copy of their binary inside `root`, which
    /// PostgreSQL's user can execute as archive_command wherever the checkout lives.
    pub async fn start_with_repo(root: &Path, node_args: &[&str]) -> Result<Self> {
        Self::launch(root, 1, 1, node_args, &[], true).await
    }

    /// `cp` control-plane nodes and `agents` agents (zones a, b, ...).
    pub async fn launch(
        root: &Path,
        cp: u64,
        agents: usize,
        node_args: &[&str],
        agent_args: &[&str],
        with_repo: bool,
    ) -> Result<Self> {
        let (token_file, admin) = admin_token(root)?;
        let mut nodes: Vec<Node> = (1..=cp).map(|id| Node::new(root, id, &token_file, node_args)).collect();
        let rest = Rest::default();
        start_group(&mut nodes, &rest).await?;
        let control_planes: Vec<String> = nodes.iter().map(|n| n.grpc.clone()).collect();
        let mut exe = bin("steward-agent");
        let mut repo_args = Vec::new();
        if with_repo {
            let repo = root.join("repo");
            std::fs::create_dir_all(&repo)?;
            let out = std::process::Command::new("chown").args(["postgres:postgres"]).arg(&repo).output()?;
            anyhow::ensure!(out.status.success(), "chown {}: {}", repo.display(), String::from_utf8_lossy(&out.stderr));
            exe = agent_copy(root)?;
            repo_args = vec!["--repo".to_string(), repo.display().to_string()];
        }
        let mut started = Vec::new();
        for i in 0..agents {
            let letter = char::from(b'a' + (i % 26) as u8);
            let agent_addr = format!("127.0.0.1:{}", free_port());
            let pg_port = free_port();
            let data_path = root.join(format!("host-{letter}"));
            let host_id = format!("host-{letter}");
            tls::issue(steward_proto::tls::Role::Agent, &host_id, &[], &data_path.join("tls"))?;
            let mut args: Vec<String> = vec!["run".into(), "--host-id".into(), host_id];
            for cp in &control_planes {
                args.extend(["--control-plane".to_string(), cp.clone()]);
            }
            args.extend(
                [
                    "--listen",
                    &agent_addr,
                    "--data-path",
                    &data_path.display().to_string(),
                    "--pg-listen",
                    "127.0.0.1",
                    "--pg-port",
                    &pg_port.to_string(),
                    "--zone",
                    &letter.to_string(),
                ]
                .iter()
                .map(|s| s.to_string()),
            );
            if !agent_args.contains(&"--memory-budget-mb") {
                args.extend(["--memory-budget-mb".to_string(), "256".to_string()]);
            }
            args.extend(agent_args.iter().map(|s| s.to_string()));
            args.extend(repo_args.iter().cloned());
            let name = if agents == 1 { "agent".to_string() } else { format!("agent-{letter}") };
            let proc = Proc::spawn(&name, &exe, &args, &root.join(format!("{name}.log")))?;
            started.push(Agent { proc, data_path, pg_port });
        }
        Ok(Stack { nodes, agents: started, admin, token_file, rest })
    }

    /// The first node (the one a single-node stack has).
    pub fn node(&self) -> &Node {
        &self.nodes[0]
    }

    /// A node that runs (for stacks whose nodes are killed): REST and gRPC calls go there.
    pub fn live_node(&self) -> &Node {
        self.nodes.iter().find(|n| n.proc.is_some()).unwrap_or(&self.nodes[0])
    }

    /// `path` on every node (for clients that try the next node when one is down).
    pub fn urls(&self, path: &str) -> Vec<String> {
        self.nodes.iter().map(|n| n.url(path)).collect()
    }

    /// Creates a team; returns its token.
    pub async fn team(&self, name: &str) -> Result<String> {
        let url = self.live_node().url("/v1/teams");
        let (s, v) = self.rest.post(&url, &self.admin, &serde_json::json!({"name": name})).await?;
        anyhow::ensure!(s == 201, "team {name}: {s} {v}");
        Ok(v["token"].as_str().unwrap_or_default().to_string())
    }

    /// Creates a database (retrying while no agent has registered yet) and waits until it is
    /// active; returns its view.
    pub async fn active_database(&self, token: &str, name: &str) -> Result<serde_json::Value> {
        let url = self.live_node().url("/v1/databases");
        let created = wait_for("a host to accept the database", Duration::from_secs(30), || async {
            let body = serde_json::json!({"name": name, "purpose": format!("{name} for tests")});
            let (s, v) = self.rest.post(&url, token, &body).await?;
            match s {
                202 => Ok(Some(v)),
                503 => Ok(None),
                _ => anyhow::bail!("create {name}: {s} {v}"),
            }
        })
        .await?;
        let id = created["id"].as_str().unwrap_or_default().to_string();
        self.wait_state(token, &id, "active").await
    }

    /// Waits until the database is in `state` (failing if it fails); returns its view.
    pub async fn wait_state(&self, token: &str, id: &str, state: &str) -> Result<serde_json::Value> {
        wait_for(&format!("database {id} to become {state}"), Duration::from_secs(240), || async {
            let url = self.live_node().url(&format!("/v1/databases/{id}"));
            let (s, v) = self.rest.get(&url, token).await?;
            anyhow::ensure!(s == 200, "get {id}: {s} {v}");
            anyhow::ensure!(v["state"] != "failed", "database {id} failed: {v}");
            Ok((v["state"] == state).then_some(v))
        })
        .await
    }

    /// `stewardctl <args>` against a live node with the admin token: (success, stdout, stderr).
    pub fn stewardctl(&self, args: &[&str]) -> Result<(bool, String, String)> {
        let out = Command::new(bin("stewardctl"))
            .args(["--server", &self.live_node().grpc, "--token", &self.admin])
            .arg("--tls-dir")
            .arg(tls::operator_dir())
            .args(args)
            .output()
            .context("running stewardctl")?;
        let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
        Ok((out.status.success(), text(&out.stdout), text(&out.stderr)))
    }
}
