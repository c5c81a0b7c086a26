//! Backups with a real PostgreSQL: a full and an incremental backup of a running primary,
//! restored to a point in time between two commits; a corrupted backup object is refused.

mod common;

use std::time::Duration;

use steward_agent::backup::manifest::FileSource;
use steward_agent::backup::{self, BackupKind, BackupOptions, RecoveryTarget, Repository, RestoreOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_and_incremental_backups_restore_to_a_point_in_time() {
    full_and_incremental(backup::base::STREAM_ABOVE).await;
}

/// The same with every file streamed through spool files, as relation segments above 64 MiB
/// are: the objects and checksums must be what the in-memory path makes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_full_and_incremental_backups_restore_to_a_point_in_time() {
    full_and_incremental(0).await;
}

async fn full_and_incremental(stream_above: u64) {
    let lab = common::Lab::new("steward-backup");
    let stanza = "backup-test";
    let (inst, _stop) = lab.instance("source", stanza, true);
    inst.ensure_initialized().await.expect("initdb");
    inst.write_config().await.expect("config");
    inst.start().await.expect("start");
    let repo = Repository::open(&lab.repo.display().to_string()).expect("repo");
    let client = inst.superuser_client().await.expect("connect");
    client
        .batch_execute(
            "CREATE TABLE big AS SELECT g AS id, repeat(md5(g::text), 8) AS v FROM generate_series(1, 60000) g;
             CREATE TABLE events (id int PRIMARY KEY, note text, at timestamptz NOT NULL DEFAULT clock_timestamp());",
        )
        .await
        .expect("load");
    // Set hint bits and freeze now: the first reads after a bulk load rewrite every page (and,
    // with data checksums, WAL-log them), which would make the next backup see them all changed.
    client.batch_execute("VACUUM (FREEZE, ANALYZE) big").await.expect("vacuum");

    // Full backup.
    let opts = BackupOptions { parallel: 2, stream_above, ..Default::default() };
    let full = backup::take(&inst, &repo, stanza, opts.clone()).await.expect("full backup");
    assert_eq!(full.kind, BackupKind::Full);
    assert!(full.size_bytes > 20 << 20, "the table alone is ~20 MiB: {}", full.size_bytes);
    assert!(full.files.iter().all(|f| matches!(f.source, FileSource::Whole { .. })));
    assert!(full.files.iter().any(|f| f.path == "global/pg_control"));
    assert!(!full.files.iter().any(|f| f.path.starts_with("pg_wal/") || f.path == "postmaster.pid"));

    // A few changed rows, then an incremental backup: only changed pages are stored.
    client.batch_execute("UPDATE big SET v = 'changed' WHERE id % 5000 = 0").await.expect("update");
    let incr = backup::take(&inst, &repo, stanza, BackupOptions { kind: BackupKind::Incr, ..opts })
        .await
        .expect("incremental");
    assert_eq!(incr.kind, BackupKind::Incr);
    assert_eq!(incr.prior.as_deref(), Some(full.label.as_str()));
    assert!(incr.label.starts_with(&format!("{}_", full.label)), "{}", incr.label);
    let pages: u32 =
        incr.files.iter().map(|f| if let FileSource::Pages { pages, .. } = f.source { pages } else { 0 }).sum();
    assert!(pages > 0, "the updated table must be stored as changed pages");
    let mut stored: Vec<(u64, &str)> = incr
        .files
        .iter()
        .filter_map(|f| match f.source {
            FileSource::Whole { stored_bytes, .. } | FileSource::Pages { stored_bytes, .. } => {
                Some((stored_bytes, f.path.as_str()))
            }
            FileSource::Prior => None,
        })
        .collect();
    stored.sort_unstable_by(|a, b| b.cmp(a));
    assert!(
        incr.stored_bytes * 10 < full.stored_bytes,
        "incremental stored {} bytes, the full one {}; its largest objects: {:?}",
        incr.stored_bytes,
        full.stored_bytes,
        &stored[..stored.len().min(8)]
    );
    println!(
        "full backup: {} files, {} bytes stored of {}; incremental: {} changed pages, {} bytes stored",
        full.files.len(),
        full.stored_bytes,
        full.size_bytes,
        pages,
        incr.stored_bytes
    );

    // Commits a second apart, with the target between the first two.
    client.execute("INSERT INTO events (id, note) VALUES (1, 'before')", &[]).await.expect("insert 1");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let target: chrono::DateTime<chrono::FixedOffset> = client
        .query_one("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')", &[])
        .await
        .expect("clock")
        .get::<_, String>(0)
        .parse()
        .expect("rfc3339");
    tokio::time::sleep(Duration::from_millis(600)).await;
    client.execute("INSERT INTO events (id, note) VALUES (2, 'after')", &[]).await.expect("insert 2");
    client.execute("INSERT INTO events (id, note) VALUES (3, 'later')", &[]).await.expect("insert 3");
    common::switch_and_wait_archived(&inst).await;

    // Restore the incremental chain into a new directory and recover to the target.
    let (restored, _stop2) = lab.instance("restored", "restored-copy", false);
    let ropts = RestoreOptions {
        label: None,
        target: RecoveryTarget::Time(target),
        agent_exe: lab.exe.clone(),
        parallel: 2,
        delta: false,
    };
    let report = backup::restore(&repo, stanza, &restored.spec().data_dir, &lab.run_as, &ropts).await.expect("restore");
    assert_eq!(report.label, incr.label, "the newest backup before the target is the incremental one");
    let rc = common::start_and_await_promotion(&restored).await;
    let notes: Vec<String> =
        rc.query("SELECT note FROM events ORDER BY id", &[]).await.expect("events").iter().map(|r| r.get(0)).collect();
    assert_eq!(notes, vec!["before".to_string()], "recovery to {target} must keep exactly the earlier commit");
    let changed: i64 = rc.query_one("SELECT count(*) FROM big WHERE v = 'changed'", &[]).await.expect("big").get(0);
    assert_eq!(changed, 12, "the incremental backup's pages were applied");
    let total: i64 = rc.query_one("SELECT count(*) FROM big", &[]).await.expect("big").get(0);
    assert_eq!(total, 60000);
    drop(rc);
    restored.stop().await.expect("stop restored");

    // Restoring into a directory that is not empty is refused; a delta restore over it, to the
    // latest archived WAL, keeps what matches and brings every commit back.
    let err = backup::restore(&repo, stanza, &restored.spec().data_dir, &lab.run_as, &ropts).await.unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
    let delta = RestoreOptions { target: RecoveryTarget::Latest, delta: true, ..ropts.clone() };
    let report =
        backup::restore(&repo, stanza, &restored.spec().data_dir, &lab.run_as, &delta).await.expect("delta restore");
    assert!(report.unchanged > report.files / 2, "most files match: {report:?}");
    assert!(report.unchanged < report.files, "recovery changed some files: {report:?}");
    let rc = common::start_and_await_promotion(&restored).await;
    let notes: Vec<String> =
        rc.query("SELECT note FROM events ORDER BY id", &[]).await.expect("events").iter().map(|r| r.get(0)).collect();
    assert_eq!(notes, vec!["before", "after", "later"], "a restore to the latest WAL has every commit");
    drop(rc);
    restored.stop().await.expect("stop restored");

    // The operator commands: verify, info, a third (full) backup, expire.
    let repo_s = lab.repo.display().to_string();
    let args = ["--repo", repo_s.as_str(), "--stanza", stanza];
    let out = common::agent(&lab.exe, &[&["verify"][..], &args].concat());
    assert!(out.status.success(), "verify: {}{}", common::text(&out.stdout), common::text(&out.stderr));
    assert!(common::text(&out.stdout).contains("all readable and complete"), "{}", common::text(&out.stdout));
    let out = common::agent(&lab.exe, &["info", "--repo", &repo_s, "--output", "json"]);
    assert!(out.status.success(), "info: {}", common::text(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("info JSON");
    assert_eq!(info[0]["stanza"], stanza);
    assert_eq!(info[0]["backups"].as_array().map(Vec::len), Some(2), "{info}");
    assert_eq!(info[0]["backups"][1]["kind"], "incr");
    let (sock, port) = (inst.spec().socket_dir.display().to_string(), inst.spec().port.to_string());
    let pg_data = inst.spec().data_dir.display().to_string();
    let out = common::agent(
        &lab.exe,
        &[&["backup"][..], &args, &["--pg-data", &pg_data, "--socket-dir", &sock, "--port", &port, "--output", "json"]]
            .concat(),
    );
    assert!(out.status.success(), "backup: {}", common::text(&out.stderr));
    let third: serde_json::Value = serde_json::from_slice(&out.stdout).expect("backup JSON");
    let third_label = third["label"].as_str().expect("label").to_string();
    let out =
        common::agent(&lab.exe, &[&["expire"][..], &args, &["--retention-days", "0", "--output", "json"]].concat());
    assert!(out.status.success(), "expire: {}", common::text(&out.stderr));
    let expired: serde_json::Value = serde_json::from_slice(&out.stdout).expect("expire JSON");
    assert_eq!(expired["plan"]["keep"], serde_json::json!([third_label]), "{expired}");
    assert_eq!(expired["plan"]["remove"], serde_json::json!([full.label, incr.label]), "{expired}");
    assert!(expired["wal_removed"].as_u64().unwrap_or(0) > 0, "WAL before the kept backup goes: {expired}");
    let out = common::agent(&lab.exe, &[&["verify"][..], &args].concat());
    assert!(out.status.success(), "verify after expire: {}", common::text(&out.stdout));

    // A corrupted object: restore refuses it, verify names it.
    let kept = backup::catalog::load(&repo, stanza, &third_label).await.expect("load").expect("manifest");
    let victim = kept
        .files
        .iter()
        .filter_map(|f| match &f.source {
            FileSource::Whole { key, .. } if f.size > 100_000 => Some(key.clone()),
            _ => None,
        })
        .next()
        .expect("a large file");
    let path = lab.repo.join(&victim);
    let mut bytes = std::fs::read(&path).expect("object");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&path, bytes).expect("corrupt");
    let (again, _stop3) = lab.instance("again", "again", false);
    let latest = RestoreOptions { target: RecoveryTarget::Latest, ..ropts };
    let err = backup::restore(&repo, stanza, &again.spec().data_dir, &lab.run_as, &latest).await.unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");
    let out = common::agent(&lab.exe, &[&["verify"][..], &args].concat());
    assert_eq!(out.status.code(), Some(1), "verify must fail: {}", common::text(&out.stdout));
    assert!(
        common::text(&out.stdout).contains("does not decompress") || common::text(&out.stdout).contains("sha256"),
        "{}",
        common::text(&out.stdout)
    );
    drop(client);
    inst.stop().await.expect("stop");
}
