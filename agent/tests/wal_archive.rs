//! WAL archiving with a real PostgreSQL: the agent's archive_command stores every switched
//! segment in the repository, and `steward-agent archive-get` / `archive-push` keep
//! PostgreSQL's exit-code contract (missing, duplicate, foreign, corrupt).

mod common;

use common::{agent, code};
use steward_agent::backup::cli::{EXIT_ABORT_RECOVERY, EXIT_FAILED, EXIT_MISSING};
use steward_agent::backup::{wal, Archive, Repository};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_are_archived_and_restored_by_a_real_server() {
    let lab = common::Lab::new("steward-archive");
    let stanza = "archive-test";
    let (inst, _stop) = lab.instance("pg", stanza, true);
    let (exe, repo, tmp) = (&lab.exe, &lab.repo, lab.tmp.path());
    let spec = inst.spec().clone();
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
    let segment = common::switch_and_wait_archived(&inst).await;

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
    let repo_args = ["--repo", repo_s.as_str(), "--stanza", stanza];
    // archive-get restores exactly what was archived.
    let dest = tmp.join("RECOVERYXLOG");
    let dest_s = dest.display().to_string();
    let out = agent(exe, &[&["archive-get"][..], &repo_args, &[&segment, &dest_s]].concat());
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let restored = std::fs::read(&dest).expect("restored segment");
    let original = std::fs::read(spec.data_dir.join("pg_wal").join(&segment)).ok();
    if let Some(original) = &original {
        assert_eq!(&restored, original, "restored segment differs from pg_wal's");
    }
    assert_eq!(wal::parse_segment_header(&dest, &restored).expect("header").system_identifier, sysid);

    // A segment that was never archived: exit 1, nothing written.
    let missing = tmp.join("missing");
    let out = agent(
        exe,
        &[&["archive-get"][..], &repo_args, &["0000000100000000000000FF", &missing.display().to_string()]].concat(),
    );
    assert_eq!(code(&out), i32::from(EXIT_MISSING));
    assert!(!missing.exists());

    // Pushing the archived segment again succeeds; a foreign segment is refused.
    let again = tmp.join(&segment);
    std::fs::write(&again, &restored).expect("copy");
    let out = agent(exe, &[&["archive-push"][..], &repo_args, &[&again.display().to_string()]].concat());
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let foreign = tmp.join("0000000100000000000000FE");
    std::fs::write(&foreign, wal::fake_segment(sysid ^ 1, 1, restored.len() as u32, 0)).expect("write");
    let out = agent(exe, &[&["archive-push"][..], &repo_args, &[&foreign.display().to_string()]].concat());
    assert_eq!(code(&out), i32::from(EXIT_FAILED));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("belongs to database system"), "{err}");

    // A corrupted archived object: archive-get refuses with the code that aborts recovery.
    let object = repo.join(&objects[0].key);
    let mut bytes = std::fs::read(&object).expect("object");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xFF;
    std::fs::write(&object, bytes).expect("corrupt");
    let out = agent(exe, &[&["archive-get"][..], &repo_args, &[&segment, &dest_s]].concat());
    assert_eq!(code(&out), i32::from(EXIT_ABORT_RECOVERY), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("corrupt"));

    drop(client);
    inst.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asynchronous_archiving_pushes_ahead_through_the_spool() {
    let lab = common::Lab::new("steward-archive-async");
    let stanza = "archive-async";
    let (inst, _stop) = lab.instance_with("pg", stanza, true, 2);
    inst.ensure_initialized().await.expect("initdb");
    inst.write_config().await.expect("config");
    inst.start().await.expect("start");
    let client = inst.superuser_client().await.expect("connect");
    let command: String = client.query_one("SHOW archive_command", &[]).await.expect("show").get(0);
    assert!(command.contains("--spool") && command.contains("--process-max 2"), "{command}");
    client.batch_execute("CREATE TABLE t (id int, v text)").await.expect("table");
    let mut switched = Vec::new();
    for i in 0..6 {
        client
            .batch_execute(&format!("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 5000) g; -- {i}"))
            .await
            .expect("insert");
        switched.push(
            client.query_one("SELECT pg_walfile_name(pg_switch_wal())", &[]).await.expect("switch").get::<_, String>(0),
        );
    }
    let last = common::switch_and_wait_archived(&inst).await;
    let archive =
        Archive::new(Repository::open(&lab.repo.display().to_string()).expect("repo"), stanza).expect("archive");
    for seg in switched.iter().chain([&last]) {
        assert_eq!(archive.find(seg).await.expect("find").len(), 1, "{seg} is not in the archive");
        assert!(archive.fetch(seg).await.expect("fetch").is_some());
    }
    // No file failed: no error marks are left in the spool.
    let spool = inst.spec().archive_spool();
    let errors: Vec<String> = std::fs::read_dir(&spool)
        .expect("spool")
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.ends_with(".error"))
        .collect();
    assert!(errors.is_empty(), "error marks: {errors:?}");
    drop(client);
    inst.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_get_prefetches_the_following_segments() {
    let lab = common::Lab::new("steward-archive-prefetch");
    let repo = Repository::open(&lab.repo.display().to_string()).expect("repo");
    let archive = Archive::new(repo, "prefetch").expect("archive");
    let seg = 1u32 << 16;
    let names: Vec<String> = (1..=6).map(|i| format!("0000000100000000000000{i:02X}")).collect();
    for (i, n) in names.iter().enumerate() {
        let p = lab.tmp.path().join(n);
        std::fs::write(&p, wal::fake_segment(7_400_000_000_000_000_001, 1, seg, i as u8)).expect("write");
        archive.push(&p, None, steward_agent::backup::PushOptions::default()).await.expect("push");
    }
    let spool = lab.tmp.path().join("prefetch-spool");
    let repo_s = lab.repo.display().to_string();
    let spool_s = spool.display().to_string();
    let get = |name: &str, dest: &std::path::Path| {
        agent(
            &lab.exe,
            &[
                "archive-get",
                "--repo",
                &repo_s,
                "--stanza",
                "prefetch",
                "--prefetch",
                "3",
                "--spool",
                &spool_s,
                name,
                &dest.display().to_string(),
            ],
        )
    };
    let dest = lab.tmp.path().join("RECOVERYXLOG");
    let out = get(&names[0], &dest);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&dest).expect("restored"), wal::fake_segment(7_400_000_000_000_000_001, 1, seg, 0));
    // The next three arrive in the spool in the background.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !names[1..4].iter().all(|n| spool.join(n).is_file()) {
        assert!(std::time::Instant::now() < deadline, "segments 2-4 were not prefetched within 30 s");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(!spool.join(&names[4]).exists(), "only three ahead");
    // The next call is served from the spool (its copy moves out) with the right contents.
    let out = get(&names[1], &dest);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!spool.join(&names[1]).exists());
    assert_eq!(std::fs::read(&dest).expect("restored"), wal::fake_segment(7_400_000_000_000_000_001, 1, seg, 1));
    // A prefetch flag without a spool is refused by the command line.
    let out = agent(
        &lab.exe,
        &["archive-get", "--repo", &repo_s, "--stanza", "prefetch", "--prefetch", "3", &names[2], "/tmp/x"],
    );
    assert_ne!(code(&out), 0);
}
