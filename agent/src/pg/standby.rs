//! Changing which side of streaming replication a data directory is on: cloning
//! a new standby from its upstream (pg_basebackup), rewinding an old primary so
//! it can follow the new one (pg_rewind), and promoting a standby.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};

use super::config::{self, STANDBY_SIGNAL};
use super::paths::{self, blocking};
use super::replication::{validate_role, Role, Upstream, REPLICATION_ROLE};
use super::runas::{output_text, run};
use super::{Instance, PgError};

/// How often pg_basebackup progress is logged at info level.
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(10);

/// Lines of pg_basebackup's stderr kept for the error message.
const KEEP_LINES: usize = 30;

/// libpq connect timeout (seconds) for pg_basebackup and pg_rewind, so a dead
/// upstream fails the call instead of hanging it.
const CONNECT_TIMEOUT_SECS: &str = "10";

/// Where pg_basebackup writes before the finished copy is renamed into place.
fn staging_dir(data_dir: &Path) -> PathBuf {
    let mut name = data_dir.as_os_str().to_owned();
    name.push(".steward-clone");
    PathBuf::from(name)
}

impl Instance {
    /// A client program next to pg_ctl, or a message saying which package to install.
    fn require_tool(&self, tool: &'static str) -> Result<PathBuf, PgError> {
        let path = self.bins.bin(tool);
        if path.is_file() {
            Ok(path)
        } else {
            Err(PgError::ToolMissing { tool, bindir: self.bins.bindir.clone(), major: self.bins.major })
        }
    }

    /// Writes the passfile for `upstream` (0600, owned by the run-as user, next to PGDATA).
    async fn write_passfile(&self, upstream: &Upstream) -> Result<(), PgError> {
        let text = config::render_passfile(upstream)?;
        let (path, run_as) = (self.passfile_path(), self.run_as.clone());
        blocking(move || paths::write_atomic(&path, &text, &run_as).map(|_| ())).await
    }

    /// Turn an empty (or missing) PGDATA into a standby of `upstream`: pg_basebackup
    /// (as the run-as user, `-X stream -c fast -S <slot>`; the slot must exist on the
    /// upstream) into a staging directory that is renamed into place only when
    /// complete, then [`Instance::set_role`] (Standby) + [`Instance::write_config`].
    /// Returns true if it cloned now, false if PGDATA was already initialized (then
    /// only role and configuration are applied). A failed clone leaves no half
    /// PGDATA behind; nothing of an initialized cluster is ever deleted.
    pub async fn clone_from(
        &self,
        upstream: &Upstream,
        slot_name: &str,
        application_name: &str,
    ) -> Result<bool, PgError> {
        let role = Role::Standby { upstream: upstream.clone(), slot_name: slot_name.to_string() };
        validate_role(&role, application_name)?;
        if !self.prepare().await? {
            self.set_role(role, application_name);
            self.write_config().await?;
            return Ok(false);
        }
        let tool = self.require_tool("pg_basebackup")?;
        self.write_passfile(upstream).await?;
        let data_dir = self.spec.data_dir.clone();
        let staging = staging_dir(&data_dir);
        {
            let (staging, run_as) = (staging.clone(), self.run_as.clone());
            blocking(move || {
                if !paths::is_missing_or_empty(&staging)? {
                    // left by a clone that was interrupted; keep it for inspection
                    paths::move_aside(&staging)?;
                }
                paths::ensure_owned_dir(&staging, &run_as, 0o700)
            })
            .await?;
        }

        let started = Instant::now();
        tracing::info!(cluster_id = %self.spec.cluster_id, upstream = %upstream.endpoint(), slot = slot_name,
            data_dir = %data_dir.display(), "cloning standby with pg_basebackup");
        let port = upstream.port.to_string();
        let mut cmd = self.run_as.command(&tool, &self.home());
        cmd.args(["-h", &upstream.host, "-p", &port, "-U", REPLICATION_ROLE, "-D"])
            .arg(&staging)
            .args(["-X", "stream", "-c", "fast", "-S", slot_name, "-w", "--progress", "--verbose"])
            .env("PGPASSFILE", self.passfile_path())
            .env("PGSSLMODE", "require")
            .env("PGCONNECT_TIMEOUT", CONNECT_TIMEOUT_SECS)
            .stdout(Stdio::null())
            .kill_on_drop(true);
        let result = self.run_with_progress(cmd, "pg_basebackup").await;

        let fail = |status: String, output: String| PgError::CloneFailed {
            upstream: upstream.endpoint(),
            slot: slot_name.to_string(),
            data_dir: data_dir.clone(),
            status,
            output,
        };
        let error = match result {
            Ok((status, _)) if status.success() => None,
            Ok((status, lines)) => Some(fail(status.to_string(), lines)),
            Err(e) => Some(fail("could not run".into(), e.to_string())),
        };
        if let Some(error) = error {
            let staging = staging.clone();
            let cleanup = blocking(move || {
                if paths::is_missing_or_empty(&staging)? {
                    std::fs::remove_dir(&staging)
                        .or_else(ignore_not_found)
                        .map_err(|e| PgError::io("remove", &staging, e))
                } else {
                    paths::move_aside(&staging).map(|_| ())
                }
            })
            .await;
            if let Err(e) = cleanup {
                tracing::warn!(error = %e, "could not clean up after the failed clone");
            }
            tracing::error!(cluster_id = %self.spec.cluster_id, upstream = %upstream.endpoint(), error = %error,
                "clone failed");
            return Err(error);
        }

        let size = {
            let (staging, data_dir) = (staging.clone(), data_dir.clone());
            blocking(move || {
                let size = paths::dir_size(&staging);
                paths::rename_dir_durably(&staging, &data_dir)?;
                Ok(size)
            })
            .await?
        };
        tracing::info!(cluster_id = %self.spec.cluster_id, upstream = %upstream.endpoint(), size_bytes = size,
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), "cloned standby");
        self.set_role(role, application_name);
        self.write_config().await?;
        Ok(true)
    }

    /// Runs `cmd` with stderr piped, logging progress lines (throttled) at info;
    /// returns the exit status and the last stderr lines.
    async fn run_with_progress(
        &self,
        mut cmd: tokio::process::Command,
        tool: &str,
    ) -> Result<(std::process::ExitStatus, String), PgError> {
        cmd.stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| PgError::io("run", tool, e))?;
        let mut last_lines: VecDeque<String> = VecDeque::new();
        if let Some(stderr) = child.stderr.take() {
            let mut reader = BufReader::new(stderr);
            let mut buf = Vec::new();
            let mut last_log: Option<Instant> = None;
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf).await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(tool, error = %e, "could not read progress output");
                        break;
                    }
                }
                for line in String::from_utf8_lossy(&buf).split(['\r', '\n']).map(str::trim).filter(|l| !l.is_empty()) {
                    tracing::debug!(tool, line, "output");
                    let is_progress = line.contains(" kB (");
                    if is_progress && last_log.is_none_or(|t| t.elapsed() >= PROGRESS_LOG_EVERY) {
                        tracing::info!(cluster_id = %self.spec.cluster_id, tool, progress = line, "clone progress");
                        last_log = Some(Instant::now());
                    }
                    if last_lines.len() == KEEP_LINES {
                        last_lines.pop_front();
                    }
                    last_lines.push_back(line.to_string());
                }
            }
        }
        let status = child.wait().await.map_err(|e| PgError::io("wait for", tool, e))?;
        Ok((status, Vec::from(last_lines).join("\n")))
    }

    /// pg_rewind this (old primary's) data directory against `upstream` so it can
    /// follow it, connecting as [`REPLICATION_ROLE`] with the passfile (the upstream
    /// needs the grants from [`Instance::ensure_replication_role`]). A running server
    /// is stopped first. Afterwards [`Instance::set_role`] (Standby) +
    /// [`Instance::write_config`]; start it to stream. `standby.signal` is in place
    /// even if the rewind fails, so the old primary never comes back as a primary by
    /// accident. Errors carry pg_rewind's output.
    pub async fn rewind_from(
        &self,
        upstream: &Upstream,
        slot_name: &str,
        application_name: &str,
    ) -> Result<(), PgError> {
        let role = Role::Standby { upstream: upstream.clone(), slot_name: slot_name.to_string() };
        validate_role(&role, application_name)?;
        if !self.is_initialized() {
            return Err(PgError::NotInitialized { path: self.spec.data_dir.clone() });
        }
        let tool = self.require_tool("pg_rewind")?;
        if self.is_running().await {
            tracing::info!(data_dir = %self.spec.data_dir.display(), "stopping PostgreSQL for pg_rewind");
            self.stop().await?;
        }
        self.set_role(role, application_name);
        self.write_passfile(upstream).await?;
        let signal = self.spec.data_dir.join(STANDBY_SIGNAL);
        {
            // pg_rewind finishes crash recovery in single-user mode, which refuses standby mode
            let signal = signal.clone();
            blocking(move || paths::remove_file_if_exists(&signal)).await?;
        }

        wait_for_new_timeline(upstream).await;
        let conninfo = format!(
            "host={} port={} user={} dbname={} passfile={} connect_timeout={} application_name=steward-rewind \
             sslmode=require",
            config::conninfo_value(&upstream.host),
            upstream.port,
            REPLICATION_ROLE,
            config::REPLICATION_ROLE_DATABASE,
            config::conninfo_value(&self.passfile_path().to_string_lossy()),
            CONNECT_TIMEOUT_SECS,
        );
        let mut cmd = self.run_as.command(&tool, &self.home());
        cmd.arg(format!("--target-pgdata={}", self.spec.data_dir.display()))
            .arg(format!("--source-server={conninfo}"))
            .env("PGPASSFILE", self.passfile_path())
            .env("PGCONNECT_TIMEOUT", CONNECT_TIMEOUT_SECS);
        let label = format!("pg_rewind --target-pgdata={}", self.spec.data_dir.display());
        tracing::info!(cluster_id = %self.spec.cluster_id, upstream = %upstream.endpoint(),
            data_dir = %self.spec.data_dir.display(), "rewinding with pg_rewind");
        let outcome = run(&mut cmd, &label).await;

        let (run_as, signal_path) = (self.run_as.clone(), signal.clone());
        let restored = blocking(move || paths::write_atomic(&signal_path, "", &run_as)).await;
        match outcome {
            Ok(out) => {
                restored?;
                tracing::info!(cluster_id = %self.spec.cluster_id, upstream = %upstream.endpoint(),
                    output = %output_text(&out), "pg_rewind finished");
                self.write_config().await?;
                Ok(())
            }
            Err(e) => {
                if let Err(re) = restored {
                    tracing::error!(error = %re, "could not restore standby.signal after a failed rewind");
                }
                let (status, output) = match e {
                    PgError::Command { status, output, .. } => (status, output),
                    other => ("could not run".into(), other.to_string()),
                };
                let error = PgError::RewindFailed {
                    upstream: upstream.endpoint(),
                    data_dir: self.spec.data_dir.clone(),
                    status,
                    output,
                };
                tracing::error!(cluster_id = %self.spec.cluster_id, error = %error, "rewind failed");
                Err(error)
            }
        }
    }

    /// Promote a standby: `pg_ctl promote -w -t 30` (a stopped standby is started
    /// first), a CHECKPOINT so pg_control shows the new timeline (pg_rewind of the
    /// old primary reads it), then [`Instance::set_role`] (Primary) +
    /// [`Instance::write_config`] (+ reload). Idempotent: promoting a primary only
    /// applies the configuration.
    pub async fn promote(&self, synchronous_standby_names: &str) -> Result<(), PgError> {
        let application_name = self.application_name().unwrap_or_default();
        let role = Role::Primary { synchronous_standby_names: synchronous_standby_names.to_string() };
        validate_role(&role, &application_name)?;
        let data_dir = self.spec.data_dir.clone();
        if !self.is_running().await {
            if !self.is_standby_configured() {
                // a stopped primary: only its configuration changes
                self.set_role(role, &application_name);
                self.write_config().await?;
                return Ok(());
            }
            self.start().await?;
        }
        let client = self.superuser_client().await?;
        if self.in_recovery(&client).await? {
            if !synchronous_standby_names.is_empty() {
                self.arm_promotion_sync(synchronous_standby_names).await?;
            }
            let (mut cmd, label) = self.pg_ctl("promote");
            cmd.args(["-w", "-t", "30"]);
            run(&mut cmd, &label)
                .await
                .map_err(|e| PgError::PromoteFailed { data_dir: data_dir.clone(), detail: e.to_string() })?;
            if self.in_recovery(&client).await? {
                let detail = "the server is still in recovery after pg_ctl promote".to_string();
                return Err(PgError::PromoteFailed { data_dir, detail });
            }
            client
                .batch_execute("CHECKPOINT")
                .await
                .map_err(|source| PgError::Sql { action: "checkpointing after promotion".into(), source })?;
            let status = self.replication_status().await?;
            tracing::info!(cluster_id = %self.spec.cluster_id, timeline = status.timeline,
                lsn = %super::replication::format_lsn(status.received_lsn), "promoted to primary");
        }
        {
            // the server removes it when promoting; make sure a restart cannot demote it
            let signal = data_dir.join(STANDBY_SIGNAL);
            blocking(move || paths::remove_file_if_exists(&signal)).await?;
        }
        self.set_role(role, &application_name);
        *self.promotion_sync_names.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        if self.write_config().await? {
            self.reload().await?;
            self.config_changed.store(false, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    }

    /// Makes the standby about to be promoted enforce `names` from its first commit as a
    /// primary: without it, writes acknowledged between the promotion and the rewrite of its
    /// configuration would exist on this server alone. Waits (up to 2 s) until new sessions
    /// see the setting; carries on with a warning if they do not.
    async fn arm_promotion_sync(&self, names: &str) -> Result<(), PgError> {
        *self.promotion_sync_names.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(names.to_string());
        if self.write_config().await? {
            self.reload().await?;
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            if let Ok(c) = self.superuser_client().await {
                if let Ok(row) = c.query_one("SHOW synchronous_standby_names", &[]).await {
                    if row.get::<_, String>(0) == names {
                        return Ok(());
                    }
                }
            }
            if std::time::Instant::now() >= deadline {
                tracing::warn!(cluster_id = %self.spec.cluster_id, "synchronous_standby_names not in effect before promotion");
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

/// Waits (up to 60 s) until the upstream's last checkpoint is on its current timeline. pg_rewind
/// reads the source's timeline from its pg_control, which a promotion updates only at the next
/// checkpoint: before that, pg_rewind finds "the same timeline", rewinds nothing, and the old
/// primary then refuses to follow ("requested timeline is not a child of this server's
/// history"). The promoting agent checkpoints at once, but under load the rejoin can come first.
async fn wait_for_new_timeline(upstream: &Upstream) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while Instant::now() < deadline {
        match upstream_timelines(upstream).await {
            Ok((checkpoint, current)) if checkpoint == current => {
                if !last.is_empty() {
                    tracing::info!(upstream = %upstream.endpoint(), timeline = current,
                        "the upstream checkpointed its new timeline: rewinding");
                }
                return;
            }
            Ok((checkpoint, current)) => last = format!("checkpoint on timeline {checkpoint}, WAL on {current}"),
            // An upstream whose role lacks the grant (made by an older agent), or one that cannot be
            // asked: pg_rewind decides alone, as it always did.
            Err(e) => {
                tracing::debug!(upstream = %upstream.endpoint(), error = %e, "cannot read the upstream's timelines");
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::warn!(upstream = %upstream.endpoint(), %last, "the upstream did not checkpoint its new timeline in 60 s");
}

/// The upstream's (checkpoint timeline, current WAL timeline), asked as the replication role.
async fn upstream_timelines(upstream: &Upstream) -> Result<(u32, u32), String> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&upstream.host)
        .port(upstream.port)
        .user(REPLICATION_ROLE)
        .password(upstream.password.as_bytes())
        .dbname(config::REPLICATION_ROLE_DATABASE)
        .application_name("steward-rewind")
        .connect_timeout(Duration::from_secs(5));
    let (client, conn) = super::tls::connect(cfg).await.map_err(|e| super::sql::describe(&e))?;
    let task = tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT (SELECT timeline_id FROM pg_control_checkpoint()),
                    substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)",
            &[],
        )
        .await
        .map_err(|e| super::sql::describe(&e));
    task.abort();
    let row = row?;
    let checkpoint: i32 = row.get(0);
    let current: String = row.get(1);
    let current = u32::from_str_radix(&current, 16).map_err(|e| format!("timeline {current:?}: {e}"))?;
    Ok((u32::try_from(checkpoint).unwrap_or(0), current))
}

fn ignore_not_found(e: std::io::Error) -> std::io::Result<()> {
    if e.kind() == std::io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}
