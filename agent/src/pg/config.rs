//! Rendering of the files the agent owns inside PGDATA: `steward.conf`
//! (included from `postgresql.conf`) and `pg_hba.conf`. Pure functions, so
//! the exact output is unit tested and writes can be skipped when unchanged.

use std::path::Path;

use super::tuning::Tuning;

/// File name of the agent-managed settings file inside PGDATA.
pub const STEWARD_CONF: &str = "steward.conf";

/// The line that makes `postgresql.conf` pick up [`STEWARD_CONF`].
pub const INCLUDE_LINE: &str = "include_if_exists = 'steward.conf'";

/// Directory (relative to PGDATA) for server logs, including `startup.log`.
pub const LOG_DIR: &str = "log";

const HEADER: &str = "# Managed by steward-agent: manual changes are overwritten.\n";

/// Connection-related inputs of `steward.conf`.
#[derive(Debug, Clone, Copy)]
pub struct Listen<'a> {
    /// Becomes `cluster_name`, shown in `ps` output and logs.
    pub cluster_id: &'a str,
    /// TCP port (also names the unix socket file).
    pub port: u16,
    /// `listen_addresses`, e.g. "127.0.0.1" or "*".
    pub listen_addresses: &'a str,
    /// `unix_socket_directories`: the agent-private socket directory.
    pub socket_dir: &'a Path,
}

/// Full `steward.conf`: listen/socket settings, logging and tuning.
pub fn render_steward_conf(listen: &Listen<'_>, tuning: &Tuning) -> String {
    let socket_dir = listen.socket_dir.to_string_lossy();
    let mut s = String::from(HEADER);
    s.push_str("\n# connections\n");
    s.push_str(&format!("cluster_name = {}\n", conf_quote(&cluster_name(listen.cluster_id))));
    s.push_str(&format!("port = {}\n", listen.port));
    s.push_str(&format!("listen_addresses = {}\n", conf_quote(listen.listen_addresses)));
    s.push_str(&format!("unix_socket_directories = {}\n", conf_quote(&socket_dir)));
    s.push_str("unix_socket_permissions = 0700\n");
    s.push_str("\n# logging\n");
    s.push_str("logging_collector = on\n");
    s.push_str(&format!("log_directory = {}\n", conf_quote(LOG_DIR)));
    s.push_str("log_filename = 'postgresql-%a.log'\n");
    s.push_str("log_truncate_on_rotation = on\n");
    s.push_str("log_rotation_age = '1d'\n");
    s.push_str("log_rotation_size = 0\n");
    s.push_str("log_line_prefix = '%m [%p] %q%u@%d '\n");
    s.push_str("\n# tuning\n");
    s.push_str(&tuning.render());
    s
}

/// `pg_hba.conf`: the local `postgres` superuser is trusted over the
/// (private, 0700) socket; everyone else authenticates with SCRAM; the
/// superuser is rejected over TCP.
pub fn render_pg_hba() -> String {
    let mut s = String::from(HEADER);
    s.push_str(concat!(
        "# TYPE  DATABASE  USER      ADDRESS    METHOD\n",
        "local   all       postgres             trust\n",
        "local   all       all                  scram-sha-256\n",
        "host    all       postgres  0.0.0.0/0  reject\n",
        "host    all       postgres  ::/0       reject\n",
        "host    all       all       0.0.0.0/0  scram-sha-256\n",
        "host    all       all       ::/0       scram-sha-256\n",
    ));
    s
}

/// `postgresql.conf` with [`INCLUDE_LINE`] appended, or `None` if it is
/// already there (idempotent).
pub fn with_include(postgresql_conf: &str) -> Option<String> {
    let present = postgresql_conf.lines().any(|l| {
        let l = l.trim();
        l.starts_with("include_if_exists") && l.contains(STEWARD_CONF) && !l.starts_with('#')
    });
    if present {
        return None;
    }
    let mut s = postgresql_conf.to_string();
    if !s.is_empty() && !s.ends_with('\n') {
        s.push('\n');
    }
    s.push_str("\n# Added by steward-agent; keep this last so its settings win.\n");
    s.push_str(INCLUDE_LINE);
    s.push('\n');
    Some(s)
}

/// Single-quoted `postgresql.conf` string value.
fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// `cluster_name` only accepts printable ASCII; keep it short for `ps` output.
fn cluster_name(id: &str) -> String {
    id.chars().map(|c| if c.is_ascii_graphic() { c } else { '_' }).take(63).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::tuning::tuning_for;

    #[test]
    fn steward_conf_has_connection_and_tuning() {
        let listen = Listen {
            cluster_id: "c1 é",
            port: 6543,
            listen_addresses: "*",
            socket_dir: Path::new("/run/steward/it's"),
        };
        let conf = render_steward_conf(&listen, &tuning_for(1 << 30, 2));
        assert!(conf.contains("cluster_name = 'c1__'\n"), "{conf}");
        assert!(conf.contains("port = 6543\n"));
        assert!(conf.contains("listen_addresses = '*'\n"));
        assert!(conf.contains("unix_socket_directories = '/run/steward/it''s'\n"));
        assert!(conf.contains("unix_socket_permissions = 0700\n"));
        assert!(conf.contains("log_directory = 'log'\n"));
        assert!(conf.contains("shared_buffers = '256MB'\n"));
    }

    #[test]
    fn hba_rejects_superuser_over_tcp_before_generic_rule() {
        let hba = render_pg_hba();
        let reject = hba.find("postgres  0.0.0.0/0  reject").unwrap();
        let generic = hba.find("all       0.0.0.0/0  scram-sha-256").unwrap();
        assert!(reject < generic);
        assert!(hba.contains("local   all       postgres             trust\n"));
        assert!(hba.contains("::/0       reject\n"));
    }

    #[test]
    fn include_is_added_once() {
        let first = with_include("max_connections = 100").unwrap();
        assert!(first.ends_with("include_if_exists = 'steward.conf'\n"));
        assert_eq!(with_include(&first), None);
        let commented = "#include_if_exists = 'steward.conf'\n";
        assert!(with_include(commented).is_some());
    }
}
