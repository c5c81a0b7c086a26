//! Reading `pg_controldata`: where the last checkpoint is, which after a clean shutdown is the
//! end of the WAL a standby must have received to lose nothing.

use super::replication::parse_lsn;
use super::runas::run;
use super::{Instance, PgError};

/// The LSN after `label:` in `pg_controldata` output.
pub fn field_lsn(output: &str, label: &str) -> Option<u64> {
    output.lines().find_map(|l| l.strip_prefix(label).and_then(|rest| parse_lsn(rest.trim_start_matches(':').trim())))
}

impl Instance {
    /// "Latest checkpoint location" of a stopped (or running) instance.
    pub async fn checkpoint_lsn(&self) -> Result<u64, PgError> {
        let mut cmd = self.run_as.command(&self.bins.bin("pg_controldata"), &self.home());
        cmd.arg("-D").arg(&self.spec.data_dir);
        let label = format!("pg_controldata -D {}", self.spec.data_dir.display());
        let out = run(&mut cmd, &label).await?;
        let text = String::from_utf8_lossy(&out.stdout);
        field_lsn(&text, "Latest checkpoint location").ok_or_else(|| PgError::Command {
            command: label,
            status: "ok".into(),
            output: "no 'Latest checkpoint location' line in the output".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_checkpoint_location() {
        let out = "pg_control version number:            1300\nLatest checkpoint location:           0/3000148\nLatest checkpoint's REDO location:    0/3000110\n";
        assert_eq!(field_lsn(out, "Latest checkpoint location"), Some(0x3000148));
        assert_eq!(field_lsn(out, "Missing"), None);
    }
}
