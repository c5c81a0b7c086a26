//! The Ansible roles (`ansible/`) against this machine, with Debian's `ansible` package
//! (installed by the test if missing) and `.deb` files built from the debug binaries. Two
//! inventory hosts, both this machine (`ansible_connection=local`), with
//! `steward_manage_service: false` since systemd may not run here: the test starts the services
//! itself, as their units would, between the runs.
//!
//! 1. `--check` of site.yml on a machine without Steward succeeds;
//! 2. the control-plane role installs the package, writes its configuration, creates the CA
//!    and the operator certificate;
//! 3. with that node running, site.yml installs the agent, writes its configuration and fetches
//!    a join token (never shown in Ansible's output) while the control-plane host changes
//!    nothing; a second run changes nothing at all;
//! 4. the agent, started with the token, joins and is listed by `stewardctl hosts`; the next run
//!    deletes the spent token (one change), and the one after changes nothing.
//!
//! Everything is purged and removed at the end, also on failure. The test refuses to run where
//! Steward is installed already, and takes a lock so two runs on one machine wait for each other.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use steward_tests::{bin, free_port, stop_postgres_under, Proc, Scratch};

const CP_HOST: &str = "steward-ansible-cp";
const AGENT_HOST: &str = "steward-ansible-agent";
const PACKAGES: [&str; 2] = ["steward-agent", "steward-controlplane"];
const CP_DATA: &str = "/var/lib/steward/controlplane";
const AGENT_DATA: &str = "/var/lib/steward/agent";
const JOIN_ENV: &str = "/etc/steward/agent-join.env";
/// What the roles create outside the packages' own files (removed at the end).
const LEFTOVERS: [&str; 5] =
    [CP_DATA, AGENT_DATA, "/etc/steward", "/etc/systemd/system/steward-agent.service.d", "/var/cache/steward"];
/// Serializes runs of this test (and anything else installing the packages) on one machine.
const LOCK: &str = "/tmp/steward-packages.lock";

const APT_TIMEOUT: Duration = Duration::from_secs(300);
const BUILD_TIMEOUT: Duration = Duration::from_secs(180);
const PLAYBOOK_TIMEOUT: Duration = Duration::from_secs(150);
const SHORT_TIMEOUT: Duration = Duration::from_secs(20);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the tests crate is in the workspace").to_path_buf()
}

/// Runs `cmd` (in its own process group, killed whole after `timeout`) with stdout and stderr
/// going to `log`; returns whether it succeeded and what it printed.
fn run(cmd: &mut Command, timeout: Duration, log: &Path) -> Result<(bool, String)> {
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
            let text = std::fs::read_to_string(log).unwrap_or_default();
            bail!("{cmd:?} did not finish within {timeout:?}; its output:\n{}", tail(&text, 60));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Ok((status.success(), std::fs::read_to_string(log).unwrap_or_default()))
}

/// Like [`run`], failing unless the command succeeds.
fn run_ok(cmd: &mut Command, timeout: Duration, log: &Path) -> Result<String> {
    let (ok, text) = run(cmd, timeout, log)?;
    ensure!(ok, "{cmd:?} failed:\n{}", tail(&text, 80));
    Ok(text)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file())).unwrap_or(false)
}

/// Debian's ansible, installed if missing (with the package lists refreshed once if needed).
fn ensure_ansible(scratch: &Path) -> Result<()> {
    if on_path("ansible-playbook") {
        return Ok(());
    }
    let apt = |args: &[&str], log: &str| {
        run(
            Command::new("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive"),
            APT_TIMEOUT,
            &scratch.join(log),
        )
    };
    let install = ["install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=120", "ansible"];
    if !apt(&install, "apt-install.log")?.0 {
        apt(&["update", "-q"], "apt-update.log")?;
        let (ok, text) = apt(&install, "apt-install-2.log")?;
        ensure!(ok, "installing Debian's ansible failed:\n{}", tail(&text, 30));
    }
    ensure!(on_path("ansible-playbook"), "ansible-playbook is not on PATH after installing ansible");
    Ok(())
}

/// Whether `package` is installed (or half-installed) on this machine.
fn installed(package: &str, scratch: &Path) -> Result<bool> {
    let (ok, text) = run(
        Command::new("dpkg-query").args(["--show", "--showformat=${db:Status-Status}", package]),
        SHORT_TIMEOUT,
        &scratch.join("dpkg-query.log"),
    )?;
    Ok(ok && !text.trim().is_empty() && text.trim() != "not-installed" && text.trim() != "config-files")
}

/// Purges the packages and removes what the roles and the services left, even when the test
/// failed half-way. Dropped after the processes (declared before them).
struct Cleanup {
    log: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        stop_postgres_under(Path::new(AGENT_DATA));
        let purge = run(
            Command::new("dpkg").arg("--purge").args(PACKAGES).env("DEBIAN_FRONTEND", "noninteractive"),
            Duration::from_secs(120),
            &self.log,
        );
        if !matches!(purge, Ok((true, _))) {
            eprintln!("cleanup: dpkg --purge {PACKAGES:?} failed: {purge:?}");
        }
        for path in LEFTOVERS {
            let p = Path::new(path);
            let gone = if p.is_dir() { std::fs::remove_dir_all(p) } else { std::fs::remove_file(p) };
            if let Err(e) = gone {
                if e.kind() != std::io::ErrorKind::NotFound {
                    eprintln!("cleanup: removing {path}: {e}");
                }
            }
        }
        // /var/lib/steward itself, if nothing else is in it (the steward user stays, as
        // Debian leaves system users of purged packages).
        let _ = std::fs::remove_dir("/var/lib/steward");
    }
}

/// `ansible-playbook` in ansible/ with this test's inventory; returns its output.
struct Ansible {
    dir: PathBuf,
    inventory: PathBuf,
    scratch: PathBuf,
    runs: usize,
}

impl Ansible {
    fn playbook(&mut self, extra: &[&str]) -> Result<String> {
        self.runs += 1;
        let log = self.scratch.join(format!("playbook-{}.log", self.runs));
        let tmp = self.scratch.join("ansible-tmp");
        let (ok, text) = run(
            Command::new("ansible-playbook")
                .arg("-i")
                .arg(&self.inventory)
                .arg("site.yml")
                .args(extra)
                .current_dir(&self.dir)
                .env("ANSIBLE_CONFIG", self.dir.join("ansible.cfg"))
                .env("ANSIBLE_NOCOLOR", "1")
                .env("ANSIBLE_LOCAL_TEMP", &tmp)
                .env("ANSIBLE_REMOTE_TEMP", &tmp)
                .env("ANSIBLE_STDOUT_CALLBACK", "default")
                .env_remove("STEWARD_ADMIN_TOKEN")
                .env_remove("STEWARD_TLS_DIR"),
            PLAYBOOK_TIMEOUT,
            &log,
        )?;
        ensure!(ok, "ansible-playbook {extra:?} failed (log {}):\n{}", log.display(), tail(&text, 80));
        Ok(text)
    }
}

/// The PLAY RECAP: host -> (changed, failed + unreachable).
fn recap(output: &str) -> Result<BTreeMap<String, (u32, u32)>> {
    let mut hosts = BTreeMap::new();
    let start = output.find("PLAY RECAP").context("no PLAY RECAP in the output")?;
    for line in output[start..].lines().skip(1) {
        let Some((host, counts)) = line.split_once(" : ") else { continue };
        let count = |key: &str| -> u32 {
            counts
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        hosts.insert(host.trim().to_string(), (count("changed"), count("failed") + count("unreachable")));
    }
    ensure!(!hosts.is_empty(), "empty PLAY RECAP");
    Ok(hosts)
}

fn changed(output: &str, host: &str) -> Result<u32> {
    let r = recap(output)?;
    let (changed, failed) = *r.get(host).with_context(|| format!("{host} is not in the recap {r:?}"))?;
    ensure!(failed == 0, "{host} had failures: {r:?}");
    Ok(changed)
}

/// The tasks a run changed, for messages.
fn changed_tasks(output: &str) -> String {
    let mut task = "";
    let mut out = Vec::new();
    for line in output.lines() {
        if line.starts_with("TASK [") || line.starts_with("RUNNING HANDLER [") {
            task = line.trim_end_matches('*').trim();
        } else if line.starts_with("changed:") {
            out.push(format!("{task} {line}"));
        }
    }
    out.join("\n")
}

fn read(path: &str) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {path}"))
}

fn mode(path: &str) -> Result<u32> {
    Ok(std::fs::metadata(path).with_context(|| format!("stat {path}"))?.permissions().mode() & 0o7777)
}

fn stewardctl(operator: &Path, grpc: &str, args: &[&str], log: &Path) -> Result<(bool, String)> {
    run(
        Command::new("/usr/bin/stewardctl")
            .args(["--server", grpc, "--token-file", &format!("{CP_DATA}/admin.token"), "--tls-dir"])
            .arg(operator)
            .args(["--output", "json"])
            .args(args)
            .env_remove("STEWARD_ADMIN_TOKEN"),
        SHORT_TIMEOUT,
        log,
    )
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        match f() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = format!("{e:#}"),
        }
        ensure!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what} (last error: {last})");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn ansible_roles_bootstrap_control_plane_and_join_agent() -> Result<()> {
    let started = Instant::now();
    ensure!(nix::unistd::Uid::effective().is_root(), "this test installs packages: run it as root");
    let lock = File::options().create(true).truncate(false).write(true).open(LOCK)?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking {LOCK}: {e}"))?;
    let scratch = Scratch::new("steward-ansible-")?;
    let root = scratch.path().to_path_buf();

    // Never touch a real installation.
    for p in PACKAGES {
        ensure!(!installed(p, &root)?, "{p} is installed on this machine; this test installs and purges it");
    }
    for p in LEFTOVERS {
        ensure!(!Path::new(p).exists(), "{p} exists; this test creates and removes it");
    }
    for b in ["steward-agent", "steward-controlplane", "stewardctl"] {
        ensure!(bin(b).is_file(), "{} is missing: run `cargo build --workspace --bins` first", bin(b).display());
    }
    let _cleanup = Cleanup { log: root.join("purge.log") };

    ensure_ansible(&root)?;

    // Packages from the debug binaries already built.
    let debs = root.join("debs");
    let profile_dir = bin("steward-agent").parent().map(Path::to_path_buf).context("binary directory")?;
    let profile = profile_dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug").to_string();
    run_ok(
        Command::new("bash")
            .arg(repo_root().join("packaging/build-packages.sh"))
            .args(["--profile", &profile, "--no-build", "--no-rpm", "--out"])
            .arg(&debs)
            .current_dir(repo_root()),
        BUILD_TIMEOUT,
        &root.join("build-packages.log"),
    )?;
    let built: Vec<String> = std::fs::read_dir(&debs)?
        .filter_map(|e| e.ok().and_then(|e| e.file_name().into_string().ok()))
        .filter(|n| n.ends_with(".deb"))
        .collect();
    for p in PACKAGES {
        ensure!(built.iter().any(|n| n.starts_with(&format!("{p}_"))), "no {p} .deb among {built:?}");
    }
    eprintln!("packages built after {:?}", started.elapsed());

    let (grpc_port, api_port, agent_port, pg_port) = (free_port(), free_port(), free_port(), free_port());
    let grpc = format!("127.0.0.1:{grpc_port}");
    let operator = root.join("operator-tls");
    let inventory = json!({
        "all": {
            "vars": {
                "ansible_connection": "local",
                "ansible_python_interpreter": "/usr/bin/python3",
                "ansible_become": false,
                "steward_manage_service": false,
                "steward_deb_dir": debs,
                "steward_address": "127.0.0.1",
                "steward_cp_listen_address": "127.0.0.1",
                "steward_cp_grpc_port": grpc_port,
                "steward_cp_api_port": api_port,
                "steward_operator_tls_dir": operator,
            },
            "children": {
                "steward_controlplane": {
                    "hosts": { CP_HOST: { "steward_node_id": 1, "steward_cp_settings": { "agent_heartbeat_ms": 500 } } }
                },
                "steward_agent": {
                    "hosts": { AGENT_HOST: {
                        "steward_agent_listen_address": "127.0.0.1",
                        "steward_agent_port": agent_port,
                        "steward_agent_zone": "zone-x",
                        "steward_agent_settings": { "pg_listen": "127.0.0.1", "pg_port": pg_port, "memory_budget_mb": 256 },
                    } }
                },
            },
        }
    });
    let inventory_path = root.join("inventory.yml");
    std::fs::write(&inventory_path, serde_json::to_string_pretty(&inventory)?)?;
    let mut ansible =
        Ansible { dir: repo_root().join("ansible"), inventory: inventory_path, scratch: root.clone(), runs: 0 };

    // (a) --check on a machine without Steward.
    let out = ansible.playbook(&["--check"])?;
    changed(&out, CP_HOST)?;
    changed(&out, AGENT_HOST)?;
    ensure!(!Path::new("/usr/bin/steward-agent").exists(), "--check installed something");
    eprintln!("--check done after {:?}", started.elapsed());

    // The control-plane role alone: package, configuration, CA, operator certificate.
    let out = ansible.playbook(&["--limit", "steward_controlplane"])?;
    ensure!(changed(&out, CP_HOST)? > 0, "the first control-plane run changed nothing");
    for f in ["/usr/bin/steward-controlplane", "/usr/bin/stewardctl"] {
        ensure!(Path::new(f).is_file(), "{f} is missing after the control-plane role");
    }
    let cfg = read("/etc/steward/controlplane.toml")?;
    for want in [
        "node_id = 1\n".to_string(),
        format!("grpc_listen = \"127.0.0.1:{grpc_port}\""),
        format!("advertise_api = \"127.0.0.1:{api_port}\""),
        format!("initial_members = [\n  \"1=127.0.0.1:{grpc_port},127.0.0.1:{api_port}\",\n]"),
        "agent_heartbeat_ms = 500\n".to_string(),
    ] {
        ensure!(cfg.contains(&want), "controlplane.toml lacks {want:?}:\n{cfg}");
    }
    let steward = nix::unistd::User::from_name("steward")?.context("the package did not create the steward user")?;
    for (f, m) in [(format!("{CP_DATA}/tls/ca.key"), 0o600), (format!("{CP_DATA}/tls/ca.pem"), 0o644)] {
        ensure!(mode(&f)? == m, "{f} has mode {:o}, not {m:o}", mode(&f)?);
        let uid = std::fs::metadata(&f)?.uid();
        ensure!(uid == steward.uid.as_raw(), "{f} belongs to uid {uid}, not steward");
    }
    let shown = run_ok(
        Command::new("/usr/bin/steward-controlplane").args(["pki", "show", "--dir"]).arg(&operator),
        SHORT_TIMEOUT,
        &root.join("pki-show.log"),
    )?;
    ensure!(shown.contains("operator/admin"), "the operator certificate is not for operator/admin: {shown}");

    // The node, started as its unit would (as steward, with the configuration file).
    let mut cp_cmd = Command::new("setpriv");
    cp_cmd
        .args(["--reuid=steward", "--regid=steward", "--init-groups", "--"])
        .args(["/usr/bin/steward-controlplane", "run", "--config", "/etc/steward/controlplane.toml"])
        .env("RUST_LOG", "info,openraft=warn")
        .env_remove("STEWARD_ADMIN_TOKEN");
    let _cp = Proc::from_command("controlplane", cp_cmd, &root.join("controlplane.log"))?;
    let raft_log = root.join("raft-status.log");
    wait_until("the control-plane node to lead", Duration::from_secs(30), || {
        let (ok, text) = stewardctl(&operator, &grpc, &["raft", "status"], &raft_log)?;
        ensure!(ok, "{}", tail(&text, 5));
        let v: Value = serde_json::from_str(text.trim())?;
        Ok(v["leader_id"].as_u64() == Some(1))
    })?;
    eprintln!("control plane up after {:?}", started.elapsed());

    // Everything: the control plane changes nothing, the agent is installed and gets a token.
    let out = ansible.playbook(&[])?;
    ensure!(changed(&out, CP_HOST)? == 0, "the control-plane host changed on its second run:\n{}", changed_tasks(&out));
    ensure!(changed(&out, AGENT_HOST)? > 0, "the first agent run changed nothing");
    ensure!(Path::new("/usr/bin/steward-agent").is_file(), "/usr/bin/steward-agent is missing");
    let cfg = read("/etc/steward/agent.toml")?;
    for want in [
        format!("host_id = \"{AGENT_HOST}\"\n"),
        "zone = \"zone-x\"\n".to_string(),
        format!("control_plane = [\n  \"{grpc}\",\n]"),
        format!("advertise = \"127.0.0.1:{agent_port}\""),
        format!("pg_port = {pg_port}\n"),
    ] {
        ensure!(cfg.contains(&want), "agent.toml lacks {want:?}:\n{cfg}");
    }
    ensure!(mode(JOIN_ENV)? == 0o600, "{JOIN_ENV} has mode {:o}", mode(JOIN_ENV)?);
    let env_text = read(JOIN_ENV)?;
    let env: BTreeMap<String, String> = env_text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let token = env.get("STEWARD_JOIN_TOKEN").context("no STEWARD_JOIN_TOKEN in the join file")?;
    ensure!(token.starts_with("stj_"), "the join file holds no join token");
    ensure!(env.get("STEWARD_JOIN_URL") == Some(&format!("127.0.0.1:{api_port}")), "wrong STEWARD_JOIN_URL");
    ensure!(!out.contains(token.as_str()) && !out.contains("stj_"), "the join token shows in Ansible's output");

    // The second run of everything changes nothing (the unused token is kept).
    let out = ansible.playbook(&[])?;
    for host in [CP_HOST, AGENT_HOST] {
        ensure!(changed(&out, host)? == 0, "{host} changed on a second run:\n{}", changed_tasks(&out));
    }
    ensure!(read(JOIN_ENV)? == env_text, "the second run replaced a usable join token");
    eprintln!("second run done after {:?}", started.elapsed());

    // The agent's first start, as its unit would (configuration file and join environment).
    let mut agent_cmd = Command::new("/usr/bin/steward-agent");
    agent_cmd
        .args(["run", "--config", "/etc/steward/agent.toml"])
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("RUST_LOG", "info");
    let _agent = Proc::from_command("agent", agent_cmd, &root.join("agent.log"))?;
    let hosts_log = root.join("hosts.log");
    wait_until("the agent to join and heartbeat", Duration::from_secs(60), || {
        let (ok, text) = stewardctl(&operator, &grpc, &["hosts"], &hosts_log)?;
        ensure!(ok, "{}", tail(&text, 5));
        let v: Value = serde_json::from_str(text.trim())?;
        Ok(v.as_array().is_some_and(|hs| hs.iter().any(|h| h["id"] == AGENT_HOST && h["state"] == "active")))
    })
    .with_context(|| {
        format!("agent log:\n{}", tail(&std::fs::read_to_string(root.join("agent.log")).unwrap_or_default(), 30))
    })?;
    ensure!(Path::new(&format!("{AGENT_DATA}/tls/node.pem")).is_file(), "the agent has no certificate");

    // Joined: the next run deletes the spent token, and the one after changes nothing.
    let out = ansible.playbook(&[])?;
    ensure!(changed(&out, CP_HOST)? == 0, "the control-plane host changed:\n{}", changed_tasks(&out));
    let agent_changes = changed(&out, AGENT_HOST)?;
    ensure!(agent_changes == 1, "expected one change (the spent token deleted), got:\n{}", changed_tasks(&out));
    ensure!(!Path::new(JOIN_ENV).exists(), "{JOIN_ENV} is still there after the agent joined");
    let out = ansible.playbook(&[])?;
    for host in [CP_HOST, AGENT_HOST] {
        ensure!(changed(&out, host)? == 0, "{host} changed on the last run:\n{}", changed_tasks(&out));
    }
    eprintln!("done after {:?}", started.elapsed());
    Ok(())
}
