//! Shared by the agent's tests that run a real PostgreSQL with WAL archiving.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use steward_agent::pg::{Instance, InstanceSpec, PgBinaries, RunAs, WalArchiving};

/// Stops a server (immediately) even when an assertion fails.
pub struct Stop {
    pub pg_ctl: PathBuf,
    pub data_dir: PathBuf,
    pub run_as: RunAs,
}

impl Drop for Stop {
    fn drop(&mut self) {
        if self.data_dir.join("postmaster.pid").exists() {
            let _ = self
                .run_as
                .std_command(&self.pg_ctl, Path::new("/tmp"))
                .args(["stop", "-m", "immediate", "-D"])
                .arg(&self.data_dir)
                .output();
        }
    }
}

/// A scratch directory PostgreSQL's user can reach, a copy of the agent binary it can run, and
/// an empty repository it can write.
pub struct Lab {
    pub tmp: tempfile::TempDir,
    pub exe: PathBuf,
    pub repo: PathBuf,
    pub bins: PgBinaries,
    pub run_as: RunAs,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(54329)
}

impl Lab {
    pub fn new(prefix: &str) -> Lab {
        let bins = PgBinaries::discover(None)
            .unwrap_or_else(|e| panic!("PostgreSQL server binaries are needed (make deps installs them): {e}"));
        let run_as = RunAs::detect().expect("run-as user");
        let tmp = tempfile::Builder::new().prefix(prefix).tempdir_in("/tmp").expect("tempdir");
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        // PostgreSQL's user runs archive_command: give it a copy of the binary it can surely reach.
        let exe = tmp.path().join("steward-agent");
        std::fs::copy(env!("CARGO_BIN_EXE_steward-agent"), &exe).expect("copy the agent binary");
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let repo = tmp.path().join("repo");
        std::fs::create_dir(&repo).expect("repo dir");
        run_as.chown(&repo).expect("chown repo");
        Lab { tmp, exe, repo, bins, run_as }
    }

    /// A loopback instance in `<tmp>/<name>`, archiving into the repository under `stanza`
    /// (or not archiving).
    pub fn instance(&self, name: &str, stanza: &str, archive: bool) -> (Instance, Stop) {
        self.instance_with(name, stanza, archive, 0)
    }

    /// Like [`Lab::instance`], archiving asynchronously with `processes` background pushes
    /// (0: synchronously).
    pub fn instance_with(&self, name: &str, stanza: &str, archive: bool, processes: u16) -> (Instance, Stop) {
        let dir = self.tmp.path().join(name);
        let spec = InstanceSpec {
            cluster_id: stanza.into(),
            data_dir: dir.join("data"),
            socket_dir: dir.join("sock"),
            port: free_port(),
            listen_addresses: "127.0.0.1".into(),
            memory_budget_bytes: 256 << 20,
            cores: 2,
            archive: archive.then(|| WalArchiving {
                agent_exe: self.exe.clone(),
                repo: self.repo.display().to_string(),
                async_processes: processes,
            }),
        };
        let stop =
            Stop { pg_ctl: self.bins.bin("pg_ctl"), data_dir: spec.data_dir.clone(), run_as: self.run_as.clone() };
        (Instance::new(spec, self.bins.clone(), self.run_as.clone()), stop)
    }
}

/// Runs the agent binary with `args` and waits for it.
pub fn agent(exe: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(exe).args(args).output().expect("run steward-agent")
}

/// A process's exit code (-1 when killed by a signal).
pub fn code(out: &std::process::Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

/// Output bytes as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Writes the configuration of a restored instance, starts it, and waits (up to 60 s) until
/// its recovery has ended and it was promoted; returns a superuser connection.
pub async fn start_and_await_promotion(inst: &Instance) -> tokio_postgres::Client {
    inst.write_config().await.expect("config of the restored server");
    inst.start().await.expect("start the restored server");
    let client = inst.superuser_client().await.expect("connect to the restored server");
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.query_one("SELECT pg_is_in_recovery()", &[]).await.expect("recovery state").get::<_, bool>(0) {
        assert!(Instant::now() < deadline, "the restored server did not finish recovery within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client
}

/// Switches to a new WAL segment and waits (up to 60 s) until PostgreSQL reports the old one
/// archived, failing on any archive_command failure. Returns the archived segment's name.
pub async fn switch_and_wait_archived(inst: &Instance) -> String {
    let client = inst.superuser_client().await.expect("superuser connection");
    let segment: String =
        client.query_one("SELECT pg_walfile_name(pg_switch_wal())", &[]).await.expect("switch").get(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let row = client
            .query_one(
                "SELECT coalesce(last_archived_wal, ''), failed_count, coalesce(last_failed_wal, '') FROM pg_stat_archiver",
                &[],
            )
            .await
            .expect("pg_stat_archiver");
        let (last, failed, last_failed): (String, i64, String) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(failed, 0, "archive_command failed for {last_failed}; see {}/log", inst.spec().data_dir.display());
        if last.as_str() >= segment.as_str() {
            return segment;
        }
        assert!(Instant::now() < deadline, "{segment} not archived within 60 s (last archived: {last:?})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
