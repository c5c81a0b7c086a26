//! Locating the PostgreSQL server binaries, so the agent works with distro
//! packages (several majors side by side) as well as custom builds.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::PgError;

/// Environment variable that pins the server bin directory.
pub const BINDIR_ENV: &str = "STEWARD_PG_BINDIR";

/// Majors probed under `/usr/lib/postgresql/<major>/bin`, highest first.
const KNOWN_MAJORS: [u32; 4] = [17, 16, 15, 14];

/// Programs that must all be present in a usable bin directory.
const REQUIRED: [&str; 3] = ["initdb", "pg_ctl", "postgres"];

/// A bin directory with `initdb`, `pg_ctl` and `postgres` of one major version;
/// the major decides data-directory compatibility.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBinaries {
    /// Directory holding the server programs.
    pub bindir: PathBuf,
    /// Major version, from `postgres --version`.
    pub major: u32,
}

impl PgBinaries {
    /// Find server binaries (initdb, pg_ctl, postgres). Search order: env STEWARD_PG_BINDIR, then
    /// /usr/lib/postgresql/<major>/bin for majors 17..=14 (highest first, or only `want_major` if
    /// Some), then `pg_config --bindir` / PATH. Major version read from `postgres --version`.
    pub fn discover(want_major: Option<u32>) -> Result<Self, PgError> {
        if let Some(dir) = std::env::var_os(BINDIR_ENV).filter(|v| !v.is_empty()) {
            let bindir = PathBuf::from(dir);
            if !has_required(&bindir) {
                return Err(PgError::BinariesNotFound { searched: format!("{BINDIR_ENV}={}", bindir.display()) });
            }
            let major = read_major(&bindir)?;
            if let Some(wanted) = want_major.filter(|w| *w != major) {
                return Err(PgError::WrongMajor { bindir, found: major, wanted });
            }
            return Ok(found(bindir, major, "env"));
        }

        let mut searched = Vec::new();
        let majors: Vec<u32> = match want_major {
            Some(m) => vec![m],
            None => KNOWN_MAJORS.to_vec(),
        };
        let mut candidates: Vec<(PathBuf, &str)> =
            majors.iter().map(|m| (PathBuf::from(format!("/usr/lib/postgresql/{m}/bin")), "distro")).collect();
        if let Some(dir) = pg_config_bindir() {
            candidates.push((dir, "pg_config"));
        }
        if let Some(dir) = path_bindir() {
            candidates.push((dir, "PATH"));
        }

        for (bindir, source) in candidates {
            searched.push(bindir.display().to_string());
            if !has_required(&bindir) {
                continue;
            }
            match read_major(&bindir) {
                Ok(major) if want_major.is_none_or(|w| w == major) => {
                    return Ok(found(bindir, major, source));
                }
                Ok(major) => {
                    tracing::debug!(bindir = %bindir.display(), major, "skipping: wrong major");
                }
                Err(e) => tracing::warn!(bindir = %bindir.display(), error = %e, "skipping"),
            }
        }
        searched.push("pg_config --bindir".into());
        searched.push("PATH".into());
        Err(PgError::BinariesNotFound { searched: searched.join(", ") })
    }

    /// Path of one program in the bin directory, e.g. `bin("pg_basebackup")`.
    pub fn bin(&self, program: &str) -> PathBuf {
        self.bindir.join(program)
    }
}

fn found(bindir: PathBuf, major: u32, source: &str) -> PgBinaries {
    tracing::info!(bindir = %bindir.display(), major, source, "found PostgreSQL binaries");
    PgBinaries { bindir, major }
}

fn has_required(dir: &Path) -> bool {
    REQUIRED.iter().all(|p| dir.join(p).is_file())
}

fn pg_config_bindir() -> Option<PathBuf> {
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let dir = text.trim();
    (out.status.success() && !dir.is_empty()).then(|| PathBuf::from(dir))
}

fn path_bindir() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find(|d| d.join("postgres").is_file())
}

fn read_major(bindir: &Path) -> Result<u32, PgError> {
    let binary = bindir.join("postgres");
    let out = Command::new(&binary)
        .arg("--version")
        .output()
        .map_err(|e| PgError::BinaryVersion { binary: binary.clone(), detail: e.to_string() })?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_major(&text)
        .ok_or_else(|| PgError::BinaryVersion { binary, detail: format!("unexpected output {:?}", text.trim()) })
}

/// Parses the major from `postgres (PostgreSQL) 15.6 (Debian 15.6-0+deb12u1)`.
pub(crate) fn parse_major(version_output: &str) -> Option<u32> {
    let (_, rest) = version_output.split_once("(PostgreSQL)")?;
    let digits: String = rest.trim_start().chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        let debian = "postgres (PostgreSQL) 15.6 (Debian 15.6-0+deb12u1)\n";
        assert_eq!(parse_major(debian), Some(15));
        assert_eq!(parse_major("postgres (PostgreSQL) 17beta2"), Some(17));
        assert_eq!(parse_major("postgres (PostgreSQL) 16.0"), Some(16));
        assert_eq!(parse_major("something else"), None);
    }
}
