//! Starting, reloading, restarting and stopping an instance with `pg_ctl`,
//! idempotently, so the agent can converge to "running" after any crash.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::config::LOG_DIR;
use super::instance::prepare_socket_dir;
use super::paths::{self, blocking};
use super::runas::run;
use super::{Instance, PgError};

/// How long the server gets to start and accept a superuser connection.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The fields of `postmaster.pid` the agent cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PidFile {
    /// Postmaster process id.
    pub pid: i32,
    /// Port it listens on.
    pub port: Option<u16>,
    /// First unix socket directory ("" if none).
    pub socket_dir: String,
    /// First listen address ("" if TCP is off).
    pub listen_address: String,
}

/// Parses `postmaster.pid` (pid, datadir, start time, port, socket dir, listen address, ...).
pub fn parse_pid_file(text: &str) -> Option<PidFile> {
    let lines: Vec<&str> = text.lines().collect();
    Some(PidFile {
        pid: lines.first()?.trim().parse().ok()?,
        port: lines.get(3).and_then(|l| l.trim().parse().ok()),
        socket_dir: lines.get(4).map_or("", |l| l.trim()).to_string(),
        listen_address: lines.get(5).map_or("", |l| l.trim()).to_string(),
    })
}

/// Whether a `/proc/<pid>/stat` line describes a live process (not a zombie or dead one).
pub fn stat_alive(stat: &str) -> bool {
    // "pid (comm) S ...": the state follows the last ')' (comm may contain spaces or parens).
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, None | Some('Z') | Some('X') | Some('x'))
}

impl Instance {
    fn pid_file_path(&self) -> PathBuf {
        self.spec.data_dir.join("postmaster.pid")
    }

    /// `pg_ctl <action> -D <data_dir>` as the run-as user, plus a label for errors.
    pub(super) fn pg_ctl(&self, action: &str) -> (tokio::process::Command, String) {
        let mut cmd = self.run_as.command(&self.bins.bin("pg_ctl"), &self.home());
        cmd.arg(action).arg("-D").arg(&self.spec.data_dir);
        (cmd, format!("pg_ctl {action} -D {}", self.spec.data_dir.display()))
    }

    /// postmaster.pid present and `pg_ctl status` says running.
    pub async fn is_running(&self) -> bool {
        let Ok(text) = tokio::fs::read_to_string(self.pid_file_path()).await else {
            return false;
        };
        let Some(pid) = parse_pid_file(&text).map(|p| p.pid) else {
            return false;
        };
        // Read the process state rather than asking `pg_ctl status` (kill(pid, 0)): a SIGKILLed
        // postmaster stays a zombie until its parent reaps it, and nothing may reap it promptly
        // (it was reparented away from pg_ctl). A zombie or an unrelated process is not running.
        match tokio::fs::read_to_string(format!("/proc/{pid}/stat")).await {
            Ok(stat) => stat_alive(&stat) && self.pid_is_our_postmaster(pid).await,
            Err(_) => false,
        }
    }

    async fn pid_is_our_postmaster(&self, pid: i32) -> bool {
        let cmdline = tokio::fs::read(format!("/proc/{pid}/cmdline")).await.unwrap_or_default();
        let wanted = self.spec.data_dir.to_string_lossy().trim_end_matches('/').to_string();
        cmdline.split(|b| *b == 0).any(|arg| String::from_utf8_lossy(arg).trim_end_matches('/') == wanted)
    }

    /// Idempotent: starts the server if needed (restarting it if it listens on
    /// another port/socket, reloading it if `write_config` changed something),
    /// then waits until a superuser connection over the socket works.
    pub async fn start(&self) -> Result<(), PgError> {
        let (socket_dir, log_dir) = (self.spec.socket_dir.clone(), self.spec.data_dir.join(LOG_DIR));
        let run_as = self.run_as.clone();
        blocking(move || {
            // the socket dir may live on a tmpfs that was wiped by a reboot
            prepare_socket_dir(&socket_dir, &run_as)?;
            paths::ensure_owned_dir(&log_dir, &run_as, 0o700)
        })
        .await?;
        let log = self.startup_log();
        let from = paths::file_len(&log);

        if !self.is_running().await {
            self.config_changed.store(false, Ordering::SeqCst);
            let (mut cmd, label) = self.pg_ctl("start");
            cmd.args(["-w", "-t", "60", "-l"]).arg(&log);
            run(&mut cmd, &label).await.map_err(|e| self.start_failed(e.to_string(), from))?;
            tracing::info!(data_dir = %self.spec.data_dir.display(), port = self.spec.port, "started PostgreSQL");
        } else if self.endpoint_changed() {
            self.config_changed.store(false, Ordering::SeqCst);
            self.restart().await?;
        } else if self.config_changed.swap(false, Ordering::SeqCst) {
            self.reload().await?;
        }
        self.wait_ready(from).await
    }

    /// Whether the running postmaster listens on a different port, socket dir or address.
    fn endpoint_changed(&self) -> bool {
        let Ok(text) = std::fs::read_to_string(self.pid_file_path()) else {
            return false;
        };
        let Some(pid) = parse_pid_file(&text) else {
            return false;
        };
        let first_listen = self.spec.listen_addresses.split(',').next().unwrap_or("").trim();
        pid.port != Some(self.spec.port)
            || pid.socket_dir != self.spec.socket_dir.to_string_lossy()
            || pid.listen_address != first_listen
    }

    /// Re-reads configuration files (`pg_ctl reload`); restart-only settings stay pending.
    pub async fn reload(&self) -> Result<(), PgError> {
        let (mut cmd, label) = self.pg_ctl("reload");
        run(&mut cmd, &label).await?;
        tracing::info!(data_dir = %self.spec.data_dir.display(), "reloaded PostgreSQL configuration");
        Ok(())
    }

    /// `pg_ctl restart -m fast`, for settings that need it (port, shared_buffers, ...).
    pub async fn restart(&self) -> Result<(), PgError> {
        let log = self.startup_log();
        let from = paths::file_len(&log);
        let (mut cmd, label) = self.pg_ctl("restart");
        cmd.args(["-m", "fast", "-w", "-t", "60", "-l"]).arg(&log);
        run(&mut cmd, &label).await.map_err(|e| self.start_failed(e.to_string(), from))?;
        tracing::info!(data_dir = %self.spec.data_dir.display(), port = self.spec.port, "restarted PostgreSQL");
        Ok(())
    }

    /// `pg_ctl stop -m fast -w` as run_as; Ok if already stopped.
    pub async fn stop(&self) -> Result<(), PgError> {
        if !self.pid_file_path().exists() {
            return Ok(());
        }
        let (mut cmd, label) = self.pg_ctl("stop");
        cmd.args(["-m", "fast", "-w"]);
        match run(&mut cmd, &label).await {
            Ok(_) => {
                tracing::info!(data_dir = %self.spec.data_dir.display(), "stopped PostgreSQL");
                Ok(())
            }
            Err(_) if !self.is_running().await => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Fence: stop PostgreSQL immediately (`pg_ctl stop -m immediate -w`), Ok if not
    /// running. Used when the lease is lost, so no client can commit here any more;
    /// if pg_ctl cannot stop it (e.g. stuck storage), the postmaster is SIGKILLed.
    /// Crash recovery runs at the next start.
    pub async fn stop_immediate(&self) -> Result<(), PgError> {
        if !self.pid_file_path().exists() {
            return Ok(());
        }
        if !self.is_running().await {
            // The postmaster is gone (e.g. SIGKILLed), but its backends may live on and keep
            // running their sessions' transactions: kill whatever still works in PGDATA.
            let killed = self.kill_all_in_data_dir().await?;
            if killed > 0 {
                tracing::warn!(data_dir = %self.spec.data_dir.display(), killed, "killed orphaned PostgreSQL processes");
            }
            return Ok(());
        }
        let (mut cmd, label) = self.pg_ctl("stop");
        cmd.args(["-m", "immediate", "-w", "-t", "10"]);
        let err = match run(&mut cmd, &label).await {
            Ok(_) => {
                tracing::info!(data_dir = %self.spec.data_dir.display(), "stopped PostgreSQL immediately");
                return Ok(());
            }
            Err(_) if !self.is_running().await => return Ok(()),
            Err(e) => e,
        };
        tracing::warn!(data_dir = %self.spec.data_dir.display(), error = %err,
            "immediate stop failed; killing the postmaster");
        let data_dir = self.spec.data_dir.clone();
        let pid_file = self.pid_file_path();
        blocking(move || kill_postmaster(&pid_file, &data_dir)).await
    }

    /// Fencing: SIGKILLs every PostgreSQL process of this instance at once (they all run in
    /// PGDATA). Unlike `pg_ctl stop`, this works on a postmaster that is stopped or hung; the next
    /// start runs crash recovery, as after an immediate shutdown. Returns how many were killed.
    pub async fn kill_now(&self) -> Result<usize, PgError> {
        let killed = self.kill_all_in_data_dir().await?;
        if killed > 0 {
            tracing::warn!(data_dir = %self.spec.data_dir.display(), killed, "killed PostgreSQL processes");
        }
        Ok(killed)
    }

    /// SIGKILLs every process working in PGDATA and removes the dead postmaster's lock file, so
    /// a start or pg_rewind can follow at once. Returns how many processes were killed.
    async fn kill_all_in_data_dir(&self) -> Result<usize, PgError> {
        let data_dir = self.spec.data_dir.clone();
        blocking(move || {
            let killed = kill_processes_in(&data_dir);
            remove_stale_pid_file(&data_dir);
            Ok(killed)
        })
        .await
    }

    /// Polls a superuser connection until it works, the postmaster dies, or the deadline passes.
    async fn wait_ready(&self, log_from: u64) -> Result<(), PgError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let err = match self.superuser_client().await {
                Ok(client) => match client.simple_query("SELECT 1").await {
                    Ok(_) => return Ok(()),
                    Err(e) => super::sql::describe(&e),
                },
                Err(e) => e.to_string(),
            };
            if !self.pid_file_path().exists() {
                return Err(self.start_failed(format!("the server exited ({err})"), log_from));
            }
            if Instant::now() >= deadline {
                let reason = format!("no superuser connection within {START_TIMEOUT:?}: {err}");
                return Err(self.start_failed(reason, log_from));
            }
            tracing::debug!(error = %err, "waiting for PostgreSQL to accept connections");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// A start error with the new part of startup.log and the newest server log.
    fn start_failed(&self, reason: String, log_from: u64) -> PgError {
        let log = self.startup_log();
        let mut tail = paths::tail(&log, log_from, 30);
        if let Some(server_log) = newest_server_log(&self.spec.data_dir.join(LOG_DIR)) {
            let server_tail = paths::tail(&server_log, 0, 20);
            tail = format!("{tail}\n--- {} ---\n{server_tail}", server_log.display());
        }
        tracing::error!(data_dir = %self.spec.data_dir.display(), reason = %reason, "PostgreSQL failed to start");
        PgError::StartFailed { data_dir: self.spec.data_dir.clone(), reason, log, tail }
    }
}

/// SIGKILLs the postmaster named in `pid_file` (only if its command line names
/// `data_dir`, so a recycled pid is never hit) and waits up to 10 s for it to go.
fn kill_postmaster(pid_file: &std::path::Path, data_dir: &std::path::Path) -> Result<(), PgError> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;

    let fail = |detail: String| PgError::FenceFailed { data_dir: data_dir.to_path_buf(), detail };
    let text = match std::fs::read_to_string(pid_file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(PgError::io("read", pid_file, e)),
    };
    let pid = parse_pid_file(&text)
        .map(|p| p.pid)
        .filter(|p| *p > 0)
        .ok_or_else(|| fail("unreadable postmaster.pid".into()))?;
    if !process_alive(pid) {
        return Ok(());
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let wanted = data_dir.to_string_lossy();
    let wanted = wanted.trim_end_matches('/');
    // pg_ctl starts `postgres -D <data_dir> ...`
    if !cmdline.split(|b| *b == 0).any(|arg| String::from_utf8_lossy(arg).trim_end_matches('/') == wanted) {
        let shown = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        return Err(fail(format!("pid {pid} from postmaster.pid runs {shown:?}, not this data directory")));
    }
    kill(Pid::from_raw(pid), Signal::SIGKILL).map_err(|e| fail(format!("kill -9 {pid}: {e}")))?;
    tracing::warn!(data_dir = %data_dir.display(), pid, "sent SIGKILL to the postmaster");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if !process_alive(pid) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(fail(format!("postmaster {pid} survived SIGKILL for 10 s (uninterruptible I/O?)")))
}

/// SIGKILLs every live process whose working directory is `data_dir` (PostgreSQL's processes
/// all run in PGDATA); returns how many.
fn kill_processes_in(data_dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
    let mut killed = 0;
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(cwd) = std::fs::read_link(e.path().join("cwd")) else { continue };
        if cwd == data_dir && process_alive(pid) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            killed += 1;
        }
    }
    killed
}

/// Removes `postmaster.pid` once no live process holds it. A SIGKILLed postmaster may stay a
/// zombie until something reaps it, and PostgreSQL (and pg_rewind) refuse to start while the pid
/// in the lock file answers `kill(pid, 0)`; a zombie holds no resources, so the file is stale.
/// Waits up to 2 s for the killed processes to exit first.
fn remove_stale_pid_file(data_dir: &std::path::Path) {
    let pid_file = data_dir.join("postmaster.pid");
    let Some(pid) = std::fs::read_to_string(&pid_file).ok().and_then(|t| parse_pid_file(&t)).map(|p| p.pid) else {
        return;
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while process_alive(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !process_alive(pid) {
        match std::fs::remove_file(&pid_file) {
            Ok(()) => tracing::info!(pid, path = %pid_file.display(), "removed the lock file of a dead postmaster"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(pid, error = %e, "could not remove a stale postmaster.pid"),
        }
    }
}

/// True if `pid` exists and is not a zombie.
fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // state is the first field after the parenthesised command name
        Ok(stat) => stat_alive(&stat),
        Err(_) => false,
    }
}

/// Most recently modified `postgresql-*.log` written by the logging collector.
fn newest_server_log(dir: &std::path::Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("postgresql-"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max_by_key(|(modified, _)| *modified)
        .map(|(_, path)| path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zombies_are_not_alive() {
        assert!(stat_alive("123 (postgres) S 1 2 3"));
        assert!(stat_alive("123 (odd) name) R 1"));
        assert!(!stat_alive("123 (postgres) Z 1 2 3"));
        assert!(!stat_alive("garbage"));
    }

    #[test]
    fn parses_postmaster_pid() {
        let text = "4242\n/var/lib/steward/c1\n1700000000\n5433\n/run/steward/c1\n*\n  1234 5\nready   \n";
        let pid = parse_pid_file(text).unwrap();
        assert_eq!(pid.pid, 4242);
        assert_eq!(pid.port, Some(5433));
        assert_eq!(pid.socket_dir, "/run/steward/c1");
        assert_eq!(pid.listen_address, "*");
        assert_eq!(parse_pid_file(""), None);
    }
}
