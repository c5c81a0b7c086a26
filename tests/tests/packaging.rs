//! The packages: both systemd units pass `systemd-analyze verify`; `packaging/build-packages.sh`
//! turns the built debug binaries into .deb packages (and .rpm ones, with the same files, when
//! rpmbuild is there); on this machine the .debs install the binaries, configuration, units,
//! the `steward` user and the /var/lib/steward directories, the binaries accept the shipped
//! configuration, and a purge removes binaries, units and configuration but keeps the data in
//! /var/lib/steward.
//!
//! Needs root, dpkg and systemd-analyze, and installs into the real system: it refuses to run
//! where either package is already installed, and undoes what it did (except the `steward`
//! user, which packages never remove) even when it fails. Every external command has a timeout.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use steward_tests::{bin, free_port, Proc, Scratch};

const PACKAGES: [&str; 2] = ["steward-agent", "steward-controlplane"];
const BINARIES: [&str; 3] = ["steward-agent", "steward-controlplane", "stewardctl"];
const VAR_LIB: &str = "/var/lib/steward";
const MARKER: &str = "/var/lib/steward/agent/packaging-test-marker";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ lies in the workspace").to_path_buf()
}

/// Runs `program args` under `timeout` (SIGTERM after `secs`, SIGKILL 5 s later); stdin closed.
fn run(program: &str, args: &[&str], secs: u64) -> Result<Output> {
    let limit = secs.to_string();
    let mut all = vec!["--kill-after=5", limit.as_str(), program];
    all.extend_from_slice(args);
    let out = Command::new("timeout")
        .args(&all)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program} {args:?}"))?;
    if out.status.code() == Some(124) || out.status.code() == Some(137) {
        bail!("{program} {args:?} did not finish within {secs} s");
    }
    Ok(out)
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Like [`run`], failing unless it exits 0; returns stdout and stderr together.
fn run_ok(program: &str, args: &[&str], secs: u64) -> Result<String> {
    let out = run(program, args, secs)?;
    ensure!(out.status.success(), "{program} {args:?} failed ({}):\n{}", out.status, text(&out));
    Ok(text(&out))
}

/// dpkg, retried while another dpkg or apt holds its lock (for up to a minute).
fn dpkg(args: &[&str]) -> Result<String> {
    let start = Instant::now();
    loop {
        let out = run("dpkg", args, 300)?;
        let all = text(&out);
        if out.status.success() {
            return Ok(all);
        }
        if all.contains("lock") && start.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_secs(2));
            continue;
        }
        bail!("dpkg {args:?} failed ({}):\n{all}", out.status);
    }
}

/// dpkg's status of `pkg` ("install ok installed", ...), empty if dpkg does not know it.
fn dpkg_status(pkg: &str) -> String {
    run("dpkg-query", &["-W", "-f=${Status}", pkg], 30)
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn installed(pkg: &str) -> bool {
    let status = dpkg_status(pkg);
    !status.is_empty() && !status.ends_with("not-installed")
}

/// Undoes the installation: purges the packages if still installed, removes the marker and the
/// directories the test made (only when empty: it never deletes data it did not create).
struct Cleanup {
    made: Vec<PathBuf>,
}

impl Cleanup {
    fn new() -> Self {
        let made = [VAR_LIB, "/var/lib/steward/controlplane", "/var/lib/steward/agent", "/etc/steward"]
            .into_iter()
            .map(PathBuf::from)
            .filter(|p| !p.exists())
            .collect();
        Cleanup { made }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let left: Vec<&str> = PACKAGES.into_iter().filter(|p| installed(p)).collect();
        if !left.is_empty() {
            let mut args = vec!["--purge"];
            args.extend(left);
            if let Err(e) = dpkg(&args) {
                eprintln!("cleanup: {e:#}");
            }
        }
        let _ = std::fs::remove_file(MARKER);
        // deepest first, so a parent is empty when its turn comes
        let mut made = self.made.clone();
        made.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for dir in made {
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

/// Regular files in a .deb, as absolute paths.
fn deb_files(deb: &Path) -> Result<BTreeSet<String>> {
    let list = run_ok("dpkg-deb", &["--contents", &deb.to_string_lossy()], 120)?;
    Ok(list
        .lines()
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches('.').to_string())
        .collect())
}

/// Regular files in an .rpm, with the unit directory spelt as in the .deb.
fn rpm_files(rpm: &Path) -> Result<BTreeSet<String>> {
    let list = run_ok("rpm", &["-qp", "--qf", "[%{FILEMODES:perms} %{FILENAMES}\\n]", &rpm.to_string_lossy()], 120)?;
    Ok(list
        .lines()
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.replacen("/usr/lib/systemd/system/", "/lib/systemd/system/", 1))
        .collect())
}

fn find_package(dir: &Path, prefix: &str, suffix: &str) -> Result<PathBuf> {
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name().to_string_lossy().to_string();
        if name.starts_with(prefix) && name.ends_with(suffix) {
            return Ok(dir.join(name));
        }
    }
    bail!("no {prefix}*{suffix} in {}", dir.display())
}

fn check_dir(path: &str, uid: u32, gid: u32, mode: u32) -> Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("{path} is missing"))?;
    ensure!(meta.is_dir(), "{path} is not a directory");
    let found = (meta.uid(), meta.gid(), meta.mode() & 0o7777);
    ensure!(found == (uid, gid, mode), "{path}: owner, group, mode are {found:?}, expected ({uid}, {gid}, {mode:o})");
    Ok(())
}

fn user_ids(name: &str) -> Result<(u32, u32)> {
    let user = nix::unistd::User::from_name(name)?.with_context(|| format!("no user {name}"))?;
    Ok((user.uid.as_raw(), user.gid.as_raw()))
}

/// (a): both units pass `systemd-analyze verify`, with ExecStart pointing at the built binaries.
fn verify_units(repo: &Path, bin_dir: &Path, scratch: &Path) -> Result<()> {
    let dir = scratch.join("units");
    std::fs::create_dir_all(&dir)?;
    let mut paths = Vec::new();
    for pkg in PACKAGES {
        let unit = std::fs::read_to_string(repo.join(format!("systemd/{pkg}.service")))?;
        ensure!(unit.contains(&format!("ExecStart=/usr/bin/{pkg} run --config /etc/steward/")), "{pkg}: ExecStart");
        let local = unit.replace("ExecStart=/usr/bin/", &format!("ExecStart={}/", bin_dir.display()));
        let path = dir.join(format!("{pkg}.service"));
        std::fs::write(&path, local)?;
        paths.push(path.to_string_lossy().to_string());
    }
    let args: Vec<&str> = std::iter::once("verify").chain(paths.iter().map(String::as_str)).collect();
    let out = run("systemd-analyze", &args, 60)?;
    let said = text(&out);
    ensure!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify ({}):\n{said}", out.status);

    // The settings the design depends on.
    let agent = std::fs::read_to_string(repo.join("systemd/steward-agent.service"))?;
    for line in ["KillMode=process", "User=root", "ReadWritePaths=/var/lib/steward/agent", "CapabilityBoundingSet=CAP_"]
    {
        ensure!(agent.lines().any(|l| l.starts_with(line)), "steward-agent.service lacks {line}");
    }
    ensure!(!agent.lines().any(|l| l.starts_with("StateDirectory=")), "a root StateDirectory= would chown PGDATA");
    let cp = std::fs::read_to_string(repo.join("systemd/steward-controlplane.service"))?;
    for line in [
        "User=steward",
        "StateDirectory=steward/controlplane",
        "RuntimeDirectory=steward-controlplane",
        "RuntimeDirectoryPreserve=yes",
        "Environment=STEWARD_STATE_DIR=/run/steward-controlplane",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
    ] {
        ensure!(cp.lines().any(|l| l.starts_with(line)), "steward-controlplane.service lacks {line}");
    }
    Ok(())
}

/// The .rpm holds the same files as the .deb, with the scriptlets and dependencies.
fn check_rpms(out: &Path) -> Result<()> {
    for pkg in PACKAGES {
        let deb = find_package(out, &format!("{pkg}_"), ".deb")?;
        let rpm = find_package(out, &format!("{pkg}-"), ".rpm")?;
        let (d, r) = (deb_files(&deb)?, rpm_files(&rpm)?);
        ensure!(d == r, "{pkg}: the .deb holds {d:?} but the .rpm {r:?}");
        let config = run_ok("rpm", &["-qp", "--configfiles", &rpm.to_string_lossy()], 60)?;
        ensure!(config.contains("/etc/steward/"), "{pkg}.rpm marks no configuration file: {config}");
        let scripts = run_ok("rpm", &["-qp", "--scripts", &rpm.to_string_lossy()], 60)?;
        for part in ["postinstall scriptlet", "preuninstall scriptlet", "postuninstall scriptlet", "useradd"] {
            ensure!(scripts.contains(part), "{pkg}.rpm scriptlets lack {part}:\n{scripts}");
        }
    }
    let requires =
        run_ok("rpm", &["-qp", "--requires", &find_package(out, "steward-agent-", ".rpm")?.to_string_lossy()], 60)?;
    ensure!(requires.contains("postgresql-server"), "steward-agent.rpm does not require PostgreSQL: {requires}");
    Ok(())
}

/// Waits until `log` contains `needle`; fails with the log after `timeout`.
fn wait_for_log(log: &Path, needle: &str, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("no '{needle}' in {} after {timeout:?}:\n{text}", log.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The installed binaries accept the installed configuration: the control plane starts with it
/// (data directory and ports moved by flags); the agent gets past the configuration to its
/// certificate, which it has no join token for.
fn check_configs(scratch: &Path) -> Result<()> {
    let log = scratch.join("controlplane.log");
    let (grpc, api) = (free_port(), free_port());
    let args: Vec<String> = [
        "run",
        "--config",
        "/etc/steward/controlplane.toml",
        "--data-dir",
        &scratch.join("cp-data").to_string_lossy(),
        "--grpc-listen",
        &format!("127.0.0.1:{grpc}"),
        "--api-listen",
        &format!("127.0.0.1:{api}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut cp = Proc::spawn("controlplane", Path::new("/usr/bin/steward-controlplane"), &args, &log)?;
    wait_for_log(&log, "control-plane node started", Duration::from_secs(60))?;
    cp.kill();

    let data = scratch.join("agent-data");
    let out = run(
        "env",
        &[
            "-u",
            "STEWARD_JOIN_TOKEN",
            "/usr/bin/steward-agent",
            "run",
            "--config",
            "/etc/steward/agent.toml",
            "--data-path",
            &data.to_string_lossy(),
        ],
        60,
    )?;
    let said = text(&out);
    ensure!(!out.status.success(), "the agent started without a certificate:\n{said}");
    ensure!(
        said.contains("no certificate for this host") && !said.contains("invalid agent configuration"),
        "the agent did not get past its configuration to the certificate:\n{said}"
    );
    Ok(())
}

#[test]
fn packages_build_install_and_purge_keeping_data() -> Result<()> {
    ensure!(nix::unistd::geteuid().is_root(), "the packaging test installs packages: run it as root");
    // The Ansible test installs the same packages: the two wait for each other.
    let lock = std::fs::File::options().create(true).truncate(false).write(true).open("/tmp/steward-packages.lock")?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking /tmp/steward-packages.lock: {e}"))?;
    for tool in ["dpkg", "dpkg-deb", "systemd-analyze", "timeout"] {
        ensure!(run("sh", &["-c", &format!("command -v {tool}")], 10)?.status.success(), "{tool} is not installed");
    }
    for pkg in PACKAGES {
        ensure!(
            !installed(pkg),
            "{pkg} is installed on this machine ({}); the test will not purge a real installation",
            dpkg_status(pkg)
        );
    }
    let repo = workspace();
    let bin_dir = bin("steward-agent").parent().context("binary directory")?.to_path_buf();
    for b in BINARIES {
        ensure!(bin_dir.join(b).exists(), "{} is missing: run cargo build --bins first", bin_dir.join(b).display());
    }
    let scratch = Scratch::new("steward-packaging")?;

    // (a) the units
    verify_units(&repo, &bin_dir, scratch.path())?;

    // (b) the packages, from the debug binaries
    let out_dir = scratch.path().join("packages");
    let with_rpm = run("sh", &["-c", "command -v rpmbuild && command -v rpm"], 10)?.status.success();
    let script = repo.join("packaging/build-packages.sh");
    let mut args = vec![
        script.to_string_lossy().to_string(),
        "--profile".into(),
        "debug".into(),
        "--no-build".into(),
        "--bin-dir".into(),
        bin_dir.to_string_lossy().to_string(),
        "--out".into(),
        out_dir.to_string_lossy().to_string(),
    ];
    if !with_rpm {
        eprintln!("rpmbuild is not installed: building and checking the .deb packages only");
        args.push("--no-rpm".into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let built = run_ok("bash", &args, 600)?;
    eprintln!("{built}");
    let version = run_ok(&bin_dir.join("steward-agent").to_string_lossy(), &["--version"], 30)?;
    let version = version.split_whitespace().nth(1).context("steward-agent --version")?.to_string();
    let agent_deb =
        out_dir.join(format!("steward-agent_{version}_{}.deb", run_ok("dpkg", &["--print-architecture"], 10)?.trim()));
    ensure!(agent_deb.exists(), "{} was not built", agent_deb.display());
    let cp_deb = find_package(&out_dir, "steward-controlplane_", ".deb")?;
    let control = run_ok("dpkg-deb", &["--field", &agent_deb.to_string_lossy()], 60)?;
    for field in ["Depends: adduser, postgresql-15 | postgresql-16", "Maintainer: Steward maintainers", "Description: "]
    {
        ensure!(control.contains(field), "steward-agent control file lacks '{field}':\n{control}");
    }
    if with_rpm {
        check_rpms(&out_dir)?;
    }

    // (c) install
    let cleanup = Cleanup::new();
    dpkg(&["-i", &agent_deb.to_string_lossy()])?;
    dpkg(&["-i", &cp_deb.to_string_lossy()])?;
    for b in BINARIES {
        let said = run_ok(&format!("/usr/bin/{b}"), &["--version"], 30)?;
        ensure!(said.contains(&version), "/usr/bin/{b} --version says {said}");
    }
    for (pkg, config) in [("steward-agent", "agent.toml"), ("steward-controlplane", "controlplane.toml")] {
        let installed = std::fs::read(format!("/etc/steward/{config}"))?;
        ensure!(installed == std::fs::read(repo.join("packaging").join(config))?, "/etc/steward/{config} differs");
        let unit = std::fs::read(format!("/lib/systemd/system/{pkg}.service"))?;
        ensure!(unit == std::fs::read(repo.join(format!("systemd/{pkg}.service")))?, "{pkg}.service differs");
        let conffiles = run_ok("dpkg-query", &["-W", "-f=${Conffiles}", pkg], 30)?;
        ensure!(conffiles.contains(&format!("/etc/steward/{config}")), "{pkg} conffiles: {conffiles}");
    }
    let passwd = run_ok("getent", &["passwd", "steward"], 10)?;
    ensure!(passwd.contains(":/var/lib/steward:"), "steward's home is not /var/lib/steward: {passwd}");
    let (steward_uid, steward_gid) = user_ids("steward")?;
    ensure!(steward_uid != 0 && steward_uid < 1000, "steward is not a system user: {passwd}");
    let postgres_gid = nix::unistd::Group::from_name("postgres")?.context("no group postgres")?.gid.as_raw();
    check_dir(VAR_LIB, 0, 0, 0o755)?;
    check_dir("/var/lib/steward/controlplane", steward_uid, steward_gid, 0o750)?;
    check_dir("/var/lib/steward/agent", 0, postgres_gid, 0o750)?;
    check_configs(scratch.path())?;
    std::fs::write(MARKER, "data the packages must keep\n")?;

    // purge: binaries, units and conffiles go; /var/lib/steward stays
    let said = dpkg(&["--purge", "steward-agent", "steward-controlplane"])?;
    ensure!(said.contains("data kept in /var/lib/steward/agent"), "purge did not say where the data stays:\n{said}");
    for pkg in PACKAGES {
        ensure!(!installed(pkg), "{pkg} is still installed: {}", dpkg_status(pkg));
        ensure!(!Path::new(&format!("/lib/systemd/system/{pkg}.service")).exists(), "{pkg}.service left behind");
    }
    for b in BINARIES {
        ensure!(!Path::new(&format!("/usr/bin/{b}")).exists(), "/usr/bin/{b} left behind");
    }
    for config in ["agent.toml", "controlplane.toml"] {
        ensure!(!Path::new(&format!("/etc/steward/{config}")).exists(), "purge left /etc/steward/{config}");
    }
    ensure!(std::fs::read_to_string(MARKER).is_ok(), "purge deleted {MARKER}");
    check_dir("/var/lib/steward/controlplane", steward_uid, steward_gid, 0o750)?;
    check_dir("/var/lib/steward/agent", 0, postgres_gid, 0o750)?;
    drop(cleanup);
    Ok(())
}
