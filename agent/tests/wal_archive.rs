//! WAL archiving with a real PostgreSQL: the agent's archive_command stores every switched
//! segment in the repository, and `steward-agent archive-get` / `archive-push` keep
//! PostgreSQL's exit-code contract (missing, duplicate, foreign, corrupt).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use steward_agent::backup::cli::{EXIT_ABORT_RECOVERY, EXIT_FAILED, EXIT_MISSING};
use steward_agent::backup::{wal, Archive, Repository};
use steward_agent::pg::{Instance, InstanceSpec, PgBinaries, RunAs, WalArchiving};

/// Stops the server even when an assertion fails.
struct Stop(PathBuf, PathBuf, RunAs);

impl Drop for Stop {
    fn drop(&mut self) {
        if self.1.join("postmaster.pid").exists() {
            let _ = self
                .2
                .std_command(&self.0, Path::new("/tmp"))
                .args(["stop", "-m", "immediate", "-D"])
                .arg(&self.1)
                .output();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(54329)
}

fn agent(exe: &Path, args: &[&str]) -> Output {
    Command::new(exe).args(args).output().expect("run steward-agent")
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_are_archived_and_restored_by_a_real_server() {
    let bins = match PgBinaries::discover(None) {
        Ok(b) => b,
        Err(e) => panic!("PostgreSQL server binaries are needed (make deps installs them): {e}"),
    };
    let run_as = RunAs::detect().expect("run-as user");
    let tmp = tempfile::Builder::new().prefix("steward-archive").tempdir_in("/tmp").expect("tempdir");
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // PostgreSQL's user runs archive_command: give it a copy of the binary it can surely reach.
    let exe = tmp.path().join("steward-agent");
    std::fs::copy(env!("CARGO_BIN_EXE_steward-agent"), &exe).expect("copy the agent binary");
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let repo = tmp.path().join("repo");
    std::fs::create_dir(&repo).expect("repo dir");
    run_as.chown(&repo).expect("chown repo");

    let stanza = "archive-test";
    let spec = InstanceSpec {
        cluster_id: stanza.into(),
        data_dir: tmp.path().join("data"),
        socket_dir: tmp.path().join("sock"),
        port: free_port(),
        listen_addresses: "127.0.0.1".into(),
        memory_budget_bytes: 256 << 20,
        cores: 2,
        archive: Some(WalArchiving { agent_exe: exe.clone(), repo: repo.clone() }),
    };
    let _stop = Stop(bins.bin("pg_ctl"), spec.data_dir.clone(), run_as.clone());
    let inst = Instance::new(spec.clone(), bins, run_as);
    inst.ensure_initialized().await.expect("initdb");
    inst.write_config().await.expect("config");
    inst.start().await.expect("start");

    let client = inst.superuser_client().await.expect("superuser connection");
    let mode: String = client.query_one("SHOW archive_mode", &[]).await.expect("show").get(0);
    assert_eq!(mode, "on");
    client
        .batch_execute("CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 20000) g")
        .await
        .expect("write some WAL");
    let segment: String =
        client.query_one("SELECT pg_walfile_name(pg_switch_wal())", &[]).await.expect("switch").get(0);

    // Wait for PostgreSQL to report the segment archived (bounded).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let row = client
            .query_one("SELECT coalesce(last_archived_wal, ''), failed_count, coalesce(last_failed_wal, '') FROM pg_stat_archiver", &[])
            .await
            .expect("pg_stat_archiver");
        let (last, failed, last_failed): (String, i64, String) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(failed, 0, "archive_command failed for {last_failed}; see {}/log", spec.data_dir.display());
        if last.as_str() >= segment.as_str() {
            break;
        }
        assert!(Instant::now() < deadline, "{segment} not archived within 60 s (last archived: {last:?})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The repository holds it, pinned to this server's system identifier.
    let archive =
        Archive::new(Repository::open(&repo.display().to_string()).expect("open repo"), stanza).expect("archive");
    let objects = archive.find(&segment).await.expect("find");
    assert_eq!(objects.len(), 1, "{objects:?}");
    let info = archive.info().await.expect("info").expect("archive.info written");
    let sysid = wal::control_system_identifier(&spec.data_dir).expect("pg_control");
    assert_eq!(info.system_identifier, sysid.to_string());
    assert_eq!(info.pg_major, Some(inst.binaries().major));

    let repo_s = repo.display().to_string();
    let common = ["--repo", repo_s.as_str(), "--stanza", stanza];
    // archive-get restores exactly what was archived.
    let dest = tmp.path().join("RECOVERYXLOG");
    let dest_s = dest.display().to_string();
    let out = agent(&exe, &[&["archive-get"][..], &common, &[&segment, &dest_s]].concat());
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let restored = std::fs::read(&dest).expect("restored segment");
    let original = std::fs::read(spec.data_dir.join("pg_wal").join(&segment)).ok();
    if let Some(original) = &original {
        assert_eq!(&restored, original, "restored segment differs from pg_wal's");
    }
    assert_eq!(wal::parse_segment_header(&dest, &restored).expect("header").system_identifier, sysid);

    // A segment that was never archived: exit 1, nothing written.
    let missing = tmp.path().join("missing");
    let out = agent(
        &exe,
        &[&["archive-get"][..], &common, &["0000000100000000000000FF", &missing.display().to_string()]].concat(),
    );
    assert_eq!(code(&out), i32::from(EXIT_MISSING));
    assert!(!missing.exists());

    // Pushing the archived segment again succeeds; a foreign segment is refused.
    let again = tmp.path().join(&segment);
    std::fs::write(&again, &restored).expect("copy");
    let out = agent(&exe, &[&["archive-push"][..], &common, &[&again.display().to_string()]].concat());
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let foreign = tmp.path().join("0000000100000000000000FE");
    std::fs::write(&foreign, wal::fake_segment(sysid ^ 1, 1, restored.len() as u32, 0)).expect("write");
    let out = agent(&exe, &[&["archive-push"][..], &common, &[&foreign.display().to_string()]].concat());
    assert_eq!(code(&out), i32::from(EXIT_FAILED));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("belongs to database system"), "{err}");

    // A corrupted archived object: archive-get refuses with the code that aborts recovery.
    let object = repo.join(&objects[0].key);
    let mut bytes = std::fs::read(&object).expect("object");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xFF;
    std::fs::write(&object, bytes).expect("corrupt");
    let out = agent(&exe, &[&["archive-get"][..], &common, &[&segment, &dest_s]].concat());
    assert_eq!(code(&out), i32::from(EXIT_ABORT_RECOVERY), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("corrupt"));

    drop(client);
    inst.stop().await.expect("stop");
}
