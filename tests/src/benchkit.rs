//! Helpers of the benchmarks that compare with pgBackRest: commands run as the `postgres` OS
//! user, the PostgreSQL binaries, sizes and percentiles.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};

/// Runs `cmd`, failing with its output unless it exits 0; returns its stdout.
pub fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    ensure!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command run as the `postgres` OS user.
pub fn as_postgres(program: &Path) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(program);
    c
}

/// The newest PostgreSQL bin directory that has pgbench.
pub fn pg_bindir() -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("no /usr/lib/postgresql: install postgresql")?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("pgbench").is_file())
        .collect();
    found.sort();
    found.pop().context("no PostgreSQL with pgbench under /usr/lib/postgresql")
}

/// A command run as the `postgres` OS user by switching uid/gid in the child, as PostgreSQL's
/// own archiver runs archive_command (a fork of the postgres user's server): no `runuser`,
/// whose PAM session costs tens of milliseconds per call and would dwarf what is measured.
pub fn as_postgres_direct(program: &Path) -> Result<Command> {
    use std::os::unix::process::CommandExt;
    let user = nix::unistd::User::from_name("postgres")?.context("no postgres OS user: install postgresql")?;
    let mut c = Command::new(program);
    c.uid(user.uid.as_raw()).gid(user.gid.as_raw()).env("HOME", &user.dir);
    Ok(c)
}

/// `chown -R postgres:postgres`.
pub fn chown_postgres(path: &Path) -> Result<()> {
    run(Command::new("chown").args(["-R", "postgres:postgres"]).arg(path), "chown")?;
    Ok(())
}

/// Bytes of the files under `dir`.
pub fn dir_bytes(dir: &Path) -> u64 {
    dir_bytes_where(dir, |_| true)
}

/// Bytes of the files under `dir` (recursively) whose name `keep` accepts.
pub fn dir_bytes_where(dir: &Path, keep: impl Fn(&str) -> bool) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) if keep(&e.file_name().to_string_lossy()) => total += m.len(),
                _ => {}
            }
        }
    }
    total
}

/// WAL segment file names in `dir`, sorted.
pub fn segment_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    v.sort();
    v
}

/// Nearest-rank percentile of sorted values (0 for none).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// A pgBackRest configuration for stanza `bench` on `pgdata`, with repository, spool and lock
/// directories under `dir`: zstd level 1, as steward-agent's default.
pub fn pgbackrest_conf(dir: &Path, pgdata: &Path, asynchronous: bool, processes: u32, extra: &str) -> Result<PathBuf> {
    let conf = dir.join("pgbackrest.conf");
    let text = format!(
        "[global]\nrepo1-path={}\ncompress-type=zst\ncompress-level=1\narchive-async={}\nspool-path={}\n\
         process-max={processes}\nlog-level-console=warn\nlog-level-file=off\nlock-path={}\n\n[bench]\npg1-path={}\n{extra}",
        dir.join("repo").display(),
        if asynchronous { "y" } else { "n" },
        dir.join("spool").display(),
        dir.join("lock").display(),
        pgdata.display()
    );
    std::fs::write(&conf, text)?;
    for d in ["repo", "spool", "lock"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    chown_postgres(dir)?;
    Ok(conf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
