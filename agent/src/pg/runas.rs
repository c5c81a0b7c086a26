//! The OS identity PostgreSQL programs run under. PostgreSQL refuses to run as
//! root, so a root agent drops to the `postgres` user for every PG command.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Output, Stdio};

use nix::unistd::{Gid, Uid, User};

use super::PgError;

/// Name of the OS user a root agent runs PostgreSQL as.
pub const POSTGRES_OS_USER: &str = "postgres";

/// Who PostgreSQL processes run as. PostgreSQL refuses to run as root: when the agent is root,
/// commands run as the `postgres` OS user; otherwise as the current user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// Numeric user id.
    pub uid: u32,
    /// Primary group id (supplementary groups are dropped when switching).
    pub gid: u32,
    /// User name, for messages.
    pub name: String,
}

impl RunAs {
    /// `postgres` when the agent is root (error if that user is missing), else the current user.
    pub fn detect() -> Result<Self, PgError> {
        let euid = nix::unistd::geteuid();
        if euid.is_root() {
            let user = User::from_name(POSTGRES_OS_USER)
                .map_err(|source| PgError::UserLookup { name: POSTGRES_OS_USER.into(), source })?
                .ok_or(PgError::PostgresUserMissing)?;
            return Ok(Self::from_user(user));
        }
        match User::from_uid(euid) {
            Ok(Some(user)) => Ok(Self::from_user(user)),
            Ok(None) | Err(_) => {
                Ok(RunAs { uid: euid.as_raw(), gid: nix::unistd::getegid().as_raw(), name: euid.to_string() })
            }
        }
    }

    /// The agent's own identity, for files only the agent reads (its state, its TLS key).
    pub fn current() -> Self {
        let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
        RunAs { uid: uid.as_raw(), gid: gid.as_raw(), name: uid.to_string() }
    }

    fn from_user(user: User) -> Self {
        RunAs { uid: user.uid.as_raw(), gid: user.gid.as_raw(), name: user.name }
    }

    /// True when commands must switch identity: the agent is root and this user is not.
    pub fn needs_switch(&self) -> bool {
        nix::unistd::geteuid().is_root() && self.uid != 0
    }

    /// Whether this user may enter a directory with the given owner and mode,
    /// judged by owner / primary group / other execute bits.
    pub fn can_enter(&self, owner_uid: u32, owner_gid: u32, mode: u32) -> bool {
        if self.uid == 0 {
            return true;
        }
        let bit = if owner_uid == self.uid {
            0o100
        } else if owner_gid == self.gid {
            0o010
        } else {
            0o001
        };
        mode & bit != 0
    }

    /// Gives `path` to this user when the agent is root (no-op otherwise: we
    /// already own what we create).
    pub fn chown(&self, path: &Path) -> Result<(), PgError> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(());
        }
        nix::unistd::chown(path, Some(Uid::from_raw(self.uid)), Some(Gid::from_raw(self.gid)))
            .map_err(|e| PgError::io(format!("chown to {}", self.name), path, e.into()))
    }

    /// A synchronous command that runs `program` as this user, with HOME=`home`,
    /// cwd `/`, stdin closed and output captured.
    pub fn std_command(&self, program: &Path, home: &Path) -> std::process::Command {
        let mut cmd = std::process::Command::new(program);
        if self.needs_switch() {
            cmd.uid(self.uid).gid(self.gid);
        }
        cmd.env("HOME", home).current_dir("/").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // Own process group: a Ctrl-C in the agent's terminal must not reach pg_ctl or the
        // postmaster it forks; the agent stops PostgreSQL itself when it should.
        cmd.process_group(0);
        cmd
    }

    /// Async variant of [`RunAs::std_command`]; not killed on drop, so a
    /// postmaster forked by `pg_ctl start` outlives it.
    pub fn command(&self, program: &Path, home: &Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::from(self.std_command(program, home));
        cmd.kill_on_drop(false);
        cmd
    }
}

/// Runs a prepared command to completion; a non-zero exit becomes
/// [`PgError::Command`] carrying its output, labelled `label`.
pub async fn run(cmd: &mut tokio::process::Command, label: &str) -> Result<Output, PgError> {
    tracing::debug!(command = label, "running");
    let out = cmd.output().await.map_err(|e| PgError::io("run", label.split(' ').next().unwrap_or(label), e))?;
    if out.status.success() {
        return Ok(out);
    }
    Err(PgError::Command { command: label.to_string(), status: out.status.to_string(), output: output_text(&out) })
}

/// stderr then stdout of a finished command, trimmed to the last 4000 bytes.
pub fn output_text(out: &Output) -> String {
    let mut text = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !stdout.trim().is_empty() {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(stdout.trim());
    }
    const MAX: usize = 4000;
    if text.len() > MAX {
        let mut start = text.len() - MAX;
        while !text.is_char_boundary(start) {
            start += 1;
        }
        text = format!("...{}", &text[start..]);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traversal_uses_matching_permission_class() {
        let pg = RunAs { uid: 101, gid: 104, name: "postgres".into() };
        assert!(!pg.can_enter(0, 0, 0o700)); // /root
        assert!(pg.can_enter(0, 0, 0o755));
        assert!(pg.can_enter(101, 0, 0o700));
        assert!(pg.can_enter(0, 104, 0o750));
        assert!(!pg.can_enter(0, 104, 0o705)); // group class applies, not other
    }
}
