//! The S3 repository backend against a real S3-compatible server (`s3-test-server`, s3s-fs
//! over a scratch directory, SigV4-authenticated) in its own process: the repository
//! contract every backend meets, large multipart objects, clear errors; and end to end, a
//! real PostgreSQL archiving its WAL to S3, a backup, a restore to the latest WAL, and the
//! operator commands. Needs `cargo build` first for `steward-agent` (as `make test` does).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use steward_agent::backup::repo::{check_contract, FORMAT_KEY};
use steward_agent::backup::Repository;
use steward_agent::pg::{Instance, InstanceSpec, PgBinaries, RunAs, WalArchiving};
use steward_tests::s3::{S3Server, ACCESS_KEY, SECRET_KEY};
use steward_tests::{bin, free_port, wait_for, Scratch};

/// A scratch directory with a running S3 server (bucket `steward`) and a private
/// credentials file for it.
async fn lab(prefix: &str) -> Result<(Scratch, S3Server, PathBuf)> {
    let scratch = Scratch::new(prefix)?;
    let server = S3Server::start(&scratch.path().join("s3"), &["steward"], &scratch.path().join("s3.log")).await?;
    let creds = scratch.path().join("s3.env");
    server.write_credentials(&creds, None)?;
    Ok((scratch, server, creds))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_repository_meets_the_backend_contract() -> Result<()> {
    let (scratch, mut server, creds) = lab("steward-s3-contract-").await?;
    let creds_opt = format!("&credentials_file={}", creds.display());

    // The same contract as the POSIX backend, under a prefix of the bucket.
    let loc = server.location("steward", "contract/one", &creds_opt);
    let repo = Repository::open(&loc)?;
    assert_eq!(repo.location(), loc, "the location re-opens as given");
    let shown = format!("{repo:?}");
    assert!(!shown.contains(SECRET_KEY) && !shown.contains(ACCESS_KEY), "credentials in {shown}");
    check_contract(&repo).await.map_err(anyhow::Error::msg).context("the S3 backend breaks the contract")?;
    // The layout is the POSIX one: the keys are the object names under the prefix.
    let on_disk = scratch.path().join("s3/steward/contract/one");
    assert!(on_disk.join(FORMAT_KEY).is_file(), "{FORMAT_KEY} is stored as an object under the prefix");
    assert_eq!(std::fs::read(on_disk.join("a/b/d"))?, Vec::<u8>::new());
    // Prefixes isolate repositories in one bucket.
    let root = Repository::open(&server.location("steward", "", &creds_opt))?;
    assert_eq!(root.list("").await?, vec!["contract"]);
    assert_eq!(root.list("contract").await?, vec!["one"]);
    let other = Repository::open(&server.location("steward", "contract/two", &creds_opt))?;
    assert_eq!(other.get("a/x").await?, None);
    assert!(other.list("").await?.is_empty());

    // Listings past one page (S3 answers at most 1000 keys a request) come back whole.
    let started = Instant::now();
    let mut puts = tokio::task::JoinSet::new();
    for i in 0..1010 {
        let other = other.clone();
        let key = if i % 200 == 0 { format!("many/d{i:04}/x") } else { format!("many/o{i:04}") };
        puts.spawn(async move { other.put(&key, vec![1]).await });
        if puts.len() >= 16 {
            puts.join_next().await.context("a put task")???;
        }
    }
    while let Some(r) = puts.join_next().await {
        r??;
    }
    let names = other.list("many").await?;
    assert_eq!(names.len(), 1010, "objects and prefixes over two pages");
    assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted, no duplicates");
    assert_eq!((names[0].as_str(), names[1].as_str()), ("d0000", "d0200"));
    assert_eq!(other.size("many").await?, 1010);
    println!("1010 puts and a two-page listing in {:?}", started.elapsed());

    // A large object goes up in parts and comes back whole; no part is left behind.
    let big: Vec<u8> = (0..(70u32 << 20)).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let want = big.clone();
    let started = Instant::now();
    other.put("big/object", big).await?;
    let got = other.get("big/object").await?.context("the large object is readable")?;
    assert!(got == want, "the large object came back different ({} bytes of {})", got.len(), want.len());
    assert_eq!(other.size("big").await?, 70 << 20);
    println!("70 MiB multipart put and get in {:?}", started.elapsed());
    // The same from a file, read a part at a time (large backup objects are spooled).
    let spooled = scratch.path().join("spooled.bin");
    std::fs::write(&spooled, &want)?;
    other.put_file("big/from-file", &spooled).await?;
    let got = other.get("big/from-file").await?.context("the object stored from a file is readable")?;
    assert!(got == want, "the object stored from a file came back different ({} bytes)", got.len());
    let leftovers: Vec<String> = std::fs::read_dir(scratch.path().join("s3"))?
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.starts_with(".upload_id-"))
        .collect();
    assert!(leftovers.is_empty(), "multipart parts left on the server: {leftovers:?}");
    other.delete("big/from-file").await?;

    // Clear errors: credentials, bucket, options, endpoint.
    let wrong = scratch.path().join("wrong.env");
    server.write_credentials(&wrong, Some("not-the-secret"))?;
    let bad = Repository::open(&server.location(
        "steward",
        "contract/one",
        &format!("&credentials_file={}", wrong.display()),
    ))?;
    let e = bad.get("a/x").await.expect_err("a wrong secret is refused").to_string();
    assert!(e.contains("denied access") && e.contains("SignatureDoesNotMatch"), "{e}");
    assert!(!e.contains("not-the-secret") && !e.contains(SECRET_KEY), "a secret leaked into: {e}");
    let e = bad.list("").await.expect_err("listing with a wrong secret").to_string();
    assert!(e.contains("denied access"), "{e}");
    let nob = Repository::open(&server.location("no-such-bucket", "", &creds_opt))?;
    // (s3s-fs creates a missing bucket's directory on PUT, unlike S3: the check reads)
    let e = nob.list("").await.expect_err("no bucket").to_string();
    assert!(e.contains("bucket no-such-bucket does not exist"), "{e}");
    let e = Repository::open(&format!("{loc}&access_key={ACCESS_KEY}")).expect_err("key in URL").to_string();
    assert!(e.contains("never read from the location") && !e.contains(ACCESS_KEY), "{e}");
    let e = Repository::open(&server.location("steward", "", "&credentials_file=/nonexistent/s3.env"))
        .expect_err("missing credentials file")
        .to_string();
    assert!(e.contains("/nonexistent/s3.env"), "{e}");
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o644))?;
    let e = Repository::open(&server.location("steward", "", &format!("&credentials_file={}", wrong.display())))
        .expect_err("a credentials file others can read")
        .to_string();
    assert!(e.contains("chmod 600"), "{e}");

    // An endpoint that went away fails within the retry budget, saying so.
    server.kill();
    let started = Instant::now();
    let e = repo.get("a/x").await.expect_err("the server is gone").to_string();
    assert!(e.contains(&format!("could not reach S3 endpoint {}", server.endpoint())), "{e}");
    assert!(started.elapsed() < Duration::from_secs(40), "took {:?} to give up", started.elapsed());
    Ok(())
}

/// Runs `exe args` and returns its output.
fn run(exe: &Path, args: &[&str]) -> Result<Output> {
    std::process::Command::new(exe).args(args).output().with_context(|| format!("running {} {args:?}", exe.display()))
}

/// An instance spec in `<root>/<name>` on a free loopback port.
fn spec(root: &Path, name: &str, archive: Option<WalArchiving>) -> InstanceSpec {
    let dir = root.join(name);
    InstanceSpec {
        cluster_id: name.into(),
        data_dir: dir.join("data"),
        socket_dir: dir.join("sock"),
        port: free_port(),
        listen_addresses: "127.0.0.1".into(),
        memory_budget_bytes: 256 << 20,
        cores: 2,
        archive,
    }
}

/// Switches WAL and waits until PostgreSQL reports the segment archived, failing on any
/// archive_command failure.
async fn switch_and_wait_archived(inst: &Instance) -> Result<String> {
    let client = inst.superuser_client().await?;
    let segment: String = client.query_one("SELECT pg_walfile_name(pg_switch_wal())", &[]).await?.get(0);
    let log = inst.spec().data_dir.join("log");
    wait_for(&format!("{segment} to be archived"), Duration::from_secs(60), || async {
        let row = client
            .query_one(
                "SELECT coalesce(last_archived_wal, ''), failed_count, coalesce(last_failed_wal, '') FROM pg_stat_archiver",
                &[],
            )
            .await?;
        let (last, failed, last_failed): (String, i64, String) = (row.get(0), row.get(1), row.get(2));
        ensure!(failed == 0, "archive_command failed for {last_failed}; see {}", log.display());
        Ok((last.as_str() >= segment.as_str()).then_some(()))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e:#} (server log in {})", log.display()))?;
    Ok(segment)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_archives_backs_up_and_restores_through_s3() -> Result<()> {
    let (scratch, server, creds) = lab("steward-s3-e2e-").await?;
    let root = scratch.path();
    let bins = PgBinaries::discover(None).context("PostgreSQL server binaries are needed (make deps installs them)")?;
    let run_as = RunAs::detect()?;
    // PostgreSQL's user runs archive_command and restore_command: it gets a copy of the agent
    // it can surely reach, and the credentials file.
    let exe = root.join("steward-agent");
    std::fs::copy(bin("steward-agent"), &exe).context("copying steward-agent (run `cargo build` first)")?;
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755))?;
    run_as.chown(&creds)?;
    let loc = server.location("steward", "fleet", &format!("&credentials_file={}", creds.display()));
    let stanza = "s3-e2e";

    // asynchronous archiving, as agents run it by default: the background pusher writes to S3
    let archive = WalArchiving { agent_exe: exe.clone(), repo: loc.clone(), async_processes: 2 };
    let mut source_spec = spec(root, "source", Some(archive));
    source_spec.cluster_id = stanza.into();
    let inst = Instance::new(source_spec, bins.clone(), run_as.clone());
    inst.ensure_initialized().await?;
    inst.write_config().await?;
    inst.start().await?;
    let client = inst.superuser_client().await?;
    let command: String = client.query_one("SHOW archive_command", &[]).await?.get(0);
    assert!(command.contains("s3://steward/fleet?endpoint="), "{command}");
    assert!(!command.contains(SECRET_KEY), "the secret must not be in archive_command: {command}");
    client
        .batch_execute(
            "CREATE TABLE items AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 5000) g;
             CHECKPOINT;",
        )
        .await?;
    switch_and_wait_archived(&inst).await?;

    // A full backup through the CLI, as an operator takes one.
    let (sock, port) = (inst.spec().socket_dir.display().to_string(), inst.spec().port.to_string());
    let pg_data = inst.spec().data_dir.display().to_string();
    let repo_args = ["--repo", loc.as_str(), "--stanza", stanza];
    let out = run(
        &exe,
        &[
            &["backup"][..],
            &repo_args,
            &["--pg-data", &pg_data, "--socket-dir", &sock, "--port", &port, "--output", "json"],
        ]
        .concat(),
    )?;
    assert!(out.status.success(), "backup: {}{}", text(&out.stdout), text(&out.stderr));
    let backup: serde_json::Value = serde_json::from_slice(&out.stdout).context("backup JSON")?;
    let label = backup["label"].as_str().context("backup label")?.to_string();
    // The objects sit in the bucket in the POSIX layout.
    let in_bucket = root.join("s3/steward/fleet");
    assert!(in_bucket.join(FORMAT_KEY).is_file());
    assert!(
        in_bucket.join(stanza).join("backup").join(&label).is_dir(),
        "backup {label} under {}",
        in_bucket.display()
    );

    // Rows after the backup reach the archive only as WAL.
    client.batch_execute("INSERT INTO items SELECT g, 'after backup' FROM generate_series(5001, 5300) g").await?;
    let last_segment = switch_and_wait_archived(&inst).await?;
    let archived = std::fs::read_dir(in_bucket.join(stanza).join("archive"))?.count();
    assert!(archived > 0, "WAL directories in the bucket");

    // Restore into a new directory, to the latest archived WAL, and check the rows.
    let restored_spec = spec(root, "restored", None);
    let target_dir = restored_spec.data_dir.display().to_string();
    let out = run(&exe, &[&["restore"][..], &repo_args, &["--pg-data", &target_dir]].concat())?;
    assert!(out.status.success(), "restore: {}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains(&label), "restored {label}: {}", text(&out.stdout));
    let conf = std::fs::read_to_string(restored_spec.data_dir.join("postgresql.auto.conf")).unwrap_or_default()
        + &std::fs::read_to_string(restored_spec.data_dir.join("steward.conf")).unwrap_or_default();
    let restored = Instance::new(restored_spec, bins.clone(), run_as.clone());
    restored.write_config().await?;
    restored.start().await?;
    let rc = restored.superuser_client().await?;
    wait_for("the restored server to finish recovery", Duration::from_secs(90), || async {
        Ok((!rc.query_one("SELECT pg_is_in_recovery()", &[]).await?.get::<_, bool>(0)).then_some(()))
    })
    .await
    .with_context(|| format!("recovery settings written by restore: {conf}"))?;
    let (total, after): (i64, i64) = {
        let row = rc.query_one("SELECT count(*), count(*) FILTER (WHERE v = 'after backup') FROM items", &[]).await?;
        (row.get(0), row.get(1))
    };
    assert_eq!((total, after), (5300, 300), "a restore to the latest WAL has every archived commit");
    drop(rc);
    restored.stop().await?;

    // The operator commands against S3.
    let out = run(&exe, &["info", "--repo", &loc, "--output", "json"])?;
    assert!(out.status.success(), "info: {}", text(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).context("info JSON")?;
    assert_eq!(info[0]["stanza"], stanza, "{info}");
    assert_eq!(info[0]["backups"].as_array().map(Vec::len), Some(1), "{info}");
    let out = run(&exe, &[&["verify"][..], &repo_args].concat())?;
    assert!(out.status.success(), "verify: {}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains("all readable and complete"), "{}", text(&out.stdout));

    // archive-get: an archived segment comes back, a missing one is exit 1 (PostgreSQL's
    // "not archived"), wrong credentials are a clear failure of another code.
    let fetched = root.join("fetched");
    let out =
        run(&exe, &[&["archive-get"][..], &repo_args, &[&last_segment, &fetched.display().to_string()]].concat())?;
    assert!(out.status.success(), "archive-get {last_segment}: {}", text(&out.stderr));
    assert_eq!(std::fs::metadata(&fetched)?.len(), 16 << 20, "a whole WAL segment");
    let out = run(
        &exe,
        &[&["archive-get"][..], &repo_args, &["0000000100000000000000FE", &root.join("nope").display().to_string()]]
            .concat(),
    )?;
    assert_eq!(out.status.code(), Some(1), "missing segment: {}", text(&out.stderr));
    let wrong = root.join("wrong.env");
    server.write_credentials(&wrong, Some("not-the-secret"))?;
    let bad_loc = server.location("steward", "fleet", &format!("&credentials_file={}", wrong.display()));
    let out = run(&exe, &["info", "--repo", &bad_loc])?;
    assert!(!out.status.success(), "info with a wrong secret must fail");
    assert!(text(&out.stderr).contains("denied access"), "{}", text(&out.stderr));
    let out = run(
        &exe,
        &["archive-get", "--repo", &bad_loc, "--stanza", stanza, &last_segment, &root.join("x").display().to_string()],
    )?;
    assert_eq!(out.status.code(), Some(2), "wrong credentials are a failure, not 'not archived': {out:?}");
    assert!(text(&out.stderr).contains("denied access"), "{}", text(&out.stderr));

    drop(client);
    inst.stop().await?;
    Ok(())
}
