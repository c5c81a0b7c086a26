//! Rendering of the files the agent owns: `steward.conf` (included from
//! `postgresql.conf`, with the replication role's settings), `pg_hba.conf` and
//! the upstream password file next to PGDATA. Pure functions, so the exact
//! output is unit tested and writes can be skipped when unchanged.

use std::path::Path;

use super::replication::{self, Role, Upstream, REPLICATION_ROLE};
use super::tuning::Tuning;
use super::PgError;

/// File name of the agent-managed settings file inside PGDATA.
pub const STEWARD_CONF: &str = "steward.conf";

/// The line that makes `postgresql.conf` pick up [`STEWARD_CONF`].
pub const INCLUDE_LINE: &str = "include_if_exists = 'steward.conf'";

/// Directory (relative to PGDATA) for server logs, including `startup.log`.
pub const LOG_DIR: &str = "log";

/// Marker file in PGDATA that makes PostgreSQL start (and stay) a standby.
pub const STANDBY_SIGNAL: &str = "standby.signal";

/// libpq password file for the upstream, kept next to PGDATA (never inside it,
/// so pg_basebackup and pg_rewind never copy the secret to other hosts).
pub const PASSFILE: &str = "steward.pgpass";

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

/// The TLS part of `steward.conf`: `ssl = on` with the certificate and key installed next to
/// PGDATA (see `tls.rs`). Reloadable: a rotated certificate needs no restart.
pub fn render_tls_conf(cert_file: &Path, key_file: &Path) -> String {
    let mut s = String::from("\n# TLS: required for every TCP connection (pg_hba.conf)\n");
    s.push_str("ssl = on\n");
    s.push_str(&format!("ssl_cert_file = {}\n", conf_quote(&cert_file.to_string_lossy())));
    s.push_str(&format!("ssl_key_file = {}\n", conf_quote(&key_file.to_string_lossy())));
    s.push_str("ssl_min_protocol_version = 'TLSv1.2'\n");
    s
}

/// How often an idle primary switches to a new WAL segment so its last writes reach the
/// archive: the bound on how much an archive-only restore can miss.
pub const ARCHIVE_TIMEOUT: &str = "60s";

/// The WAL-archiving part of `steward.conf`: `archive-push` / `archive-get` of this agent,
/// with the cluster id as stanza. Standbys keep `archive_mode = on` (they archive nothing
/// until promoted), so a promotion needs no restart.
pub fn render_archiving_conf(a: &super::WalArchiving, stanza: &str, spool: Option<&Path>) -> String {
    // PostgreSQL expands %-escapes in the whole command: a literal % must be doubled.
    let exe = sh_quote(&a.agent_exe.to_string_lossy()).replace('%', "%%");
    let repo = sh_quote(&a.repo).replace('%', "%%");
    let stanza = sh_quote(stanza);
    let mut s = String::from("\n# WAL archiving into the backup repository\n");
    s.push_str("archive_mode = on\n");
    let mut push = format!("{exe} archive-push --repo {repo} --stanza {stanza}");
    if let Some(dir) = spool {
        let dir = sh_quote(&dir.to_string_lossy()).replace('%', "%%");
        push.push_str(&format!(" --spool {dir} --process-max {}", a.async_processes));
    }
    push.push_str(" %p");
    s.push_str(&format!("archive_command = {}\n", conf_quote(&push)));
    s.push_str(&format!("archive_timeout = {}\n", conf_quote(ARCHIVE_TIMEOUT)));
    let get = format!("{exe} archive-get --repo {repo} --stanza {stanza} %f %p");
    s.push_str(&format!("restore_command = {}\n", conf_quote(&get)));
    s
}

/// Quotes a word for `/bin/sh` (PostgreSQL runs archive_command through it): bare when it
/// is plainly safe, otherwise in single quotes.
pub fn sh_quote(word: &str) -> String {
    let plain = !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+:,=@".contains(&b));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// The replication part of `steward.conf` for `role`; appended after the tuning
/// so it wins over anything above. `application_name` is this member's name (the
/// primary lists it in `synchronous_standby_names`); `passfile` is where
/// [`render_passfile`] is written. Inputs are validated, because a bad value
/// would make PostgreSQL refuse the whole file.
pub fn render_replication_conf(role: &Role, application_name: &str, passfile: &Path) -> Result<String, PgError> {
    replication::validate_role(role, application_name)?;
    let mut s = String::new();
    match role {
        Role::Primary { synchronous_standby_names } => {
            s.push_str("\n# replication: primary\n");
            s.push_str(&format!("synchronous_standby_names = {}\n", conf_quote(synchronous_standby_names)));
            s.push_str("primary_conninfo = ''\n");
            s.push_str("primary_slot_name = ''\n");
        }
        Role::Standby { upstream, slot_name } => {
            s.push_str("\n# replication: standby\n");
            let conninfo = standby_conninfo(upstream, application_name, passfile);
            s.push_str(&format!("primary_conninfo = {}\n", conf_quote(&conninfo)));
            s.push_str(&format!("primary_slot_name = {}\n", conf_quote(slot_name)));
            s.push_str("hot_standby = on\n");
            s.push_str("recovery_target_timeline = 'latest'\n");
            // How long the startup process sleeps after both streaming and the archive came up
            // empty. A promotion that arrives in that state (the upstream died a moment ago)
            // waits out the rest of the sleep before it ends recovery: PostgreSQL's 5 s default
            // outlasts the new primary's lease.
            s.push_str("wal_retrieve_retry_interval = '200ms'\n");
            s.push_str("synchronous_standby_names = ''\n");
        }
    }
    Ok(s)
}

/// Appended to a standby's settings just before it is promoted: later lines win, so the
/// server enforces synchronous replication from its very first commit as a primary instead of
/// only after the configuration is rewritten for its new role. Ignored while in recovery.
pub fn render_promotion_sync(synchronous_standby_names: &str) -> String {
    format!(
        "\n# being promoted: synchronous standbys from the first commit\nsynchronous_standby_names = {}\n",
        conf_quote(synchronous_standby_names)
    )
}

/// libpq connection string a standby streams with: the password comes from
/// `passfile`, so it never appears in `steward.conf` or `pg_stat_wal_receiver`; TLS is
/// required (the upstream refuses plaintext TCP).
pub fn standby_conninfo(upstream: &Upstream, application_name: &str, passfile: &Path) -> String {
    format!(
        "host={} port={} user={} passfile={} application_name={} sslmode=require connect_timeout=2",
        conninfo_value(&upstream.host),
        upstream.port,
        REPLICATION_ROLE,
        conninfo_value(&passfile.to_string_lossy()),
        conninfo_value(application_name),
    )
}

/// A libpq conninfo value: bare when that is unambiguous, otherwise
/// single-quoted with `\` and `'` backslash-escaped.
pub fn conninfo_value(value: &str) -> String {
    let plain = !value.is_empty() && !value.chars().any(|c| c.is_whitespace() || c == '\'' || c == '\\');
    if plain {
        value.to_string()
    } else {
        format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}

/// The libpq password file for the replication role on `upstream`: one line
/// for replication connections (streaming, pg_basebackup) and one for regular
/// ones (pg_rewind). Holds the plaintext password: write it 0600 only.
pub fn render_passfile(upstream: &Upstream) -> Result<String, PgError> {
    replication::validate_upstream(upstream)?;
    let (host, password) = (pgpass_field(&upstream.host), pgpass_field(&upstream.password));
    let port = upstream.port;
    Ok(format!(
        "{HEADER}{host}:{port}:replication:{REPLICATION_ROLE}:{password}\n\
         {host}:{port}:*:{REPLICATION_ROLE}:{password}\n"
    ))
}

/// One `.pgpass` field: `\` and `:` are backslash-escaped.
fn pgpass_field(value: &str) -> String {
    value.replace('\\', "\\\\").replace(':', "\\:")
}

/// The one ordinary database the replication role may connect to: pg_rewind's source
/// connection, the rejoin's wait for the new primary's checkpoint (`pg_control_checkpoint`) and a
/// standby backup's `pg_switch_wal` all use it.
pub const REPLICATION_ROLE_DATABASE: &str = "postgres";

/// `pg_hba.conf`, first match wins: the local `postgres` superuser is trusted over the (private,
/// 0700) socket and everyone else authenticates with SCRAM there; over TCP, plaintext is refused,
/// the superuser is refused, the replication role may open replication connections (standbys,
/// pg_basebackup) and reach [`REPLICATION_ROLE_DATABASE`] and nothing else, and every other role
/// authenticates with SCRAM over TLS.
pub fn render_pg_hba() -> String {
    let mut s = String::from(HEADER);
    s.push_str(concat!(
        "# TYPE    DATABASE     USER                 ADDRESS    METHOD\n",
        "local     all          postgres                        trust\n",
        "local     all          all                             scram-sha-256\n",
        "hostnossl all          all                  0.0.0.0/0  reject\n",
        "hostnossl all          all                  ::/0       reject\n",
        "hostnossl replication  all                  0.0.0.0/0  reject\n",
        "hostnossl replication  all                  ::/0       reject\n",
        "hostssl   all          postgres             0.0.0.0/0  reject\n",
        "hostssl   all          postgres             ::/0       reject\n",
        "hostssl   replication  steward_replication  0.0.0.0/0  scram-sha-256\n",
        "hostssl   replication  steward_replication  ::/0       scram-sha-256\n",
        "hostssl   postgres     steward_replication  0.0.0.0/0  scram-sha-256\n",
        "hostssl   postgres     steward_replication  ::/0       scram-sha-256\n",
        "hostssl   all          steward_replication  0.0.0.0/0  reject\n",
        "hostssl   all          steward_replication  ::/0       reject\n",
        "hostssl   all          all                  0.0.0.0/0  scram-sha-256\n",
        "hostssl   all          all                  ::/0       scram-sha-256\n",
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
    fn archiving_conf_golden_and_quoting() {
        let a = crate::pg::WalArchiving {
            agent_exe: "/usr/bin/steward-agent".into(),
            repo: "/srv/it's 100%".into(),
            async_processes: 0,
        };
        let expected = r#"
# WAL archiving into the backup repository
archive_mode = on
archive_command = '/usr/bin/steward-agent archive-push --repo ''/srv/it''\\''''s 100%%'' --stanza ha-1 %p'
archive_timeout = '60s'
restore_command = '/usr/bin/steward-agent archive-get --repo ''/srv/it''\\''''s 100%%'' --stanza ha-1 %f %p'
"#;
        assert_eq!(render_archiving_conf(&a, "ha-1", None), expected);
        let a = crate::pg::WalArchiving { repo: "/srv/repo".into(), async_processes: 3, ..a };
        let conf = render_archiving_conf(&a, "ha-1", Some(Path::new("/data/ha-1/archive-spool")));
        assert!(
            conf.contains(
                "archive-push --repo /srv/repo --stanza ha-1 --spool /data/ha-1/archive-spool --process-max 3 %p'"
            ),
            "{conf}"
        );
        let a = crate::pg::WalArchiving { repo: "s3://bkt/p?endpoint=http://127.0.0.1:9000&region=x%2Fy".into(), ..a };
        let conf = render_archiving_conf(&a, "ha-1", None);
        assert!(
            conf.contains("archive-push --repo ''s3://bkt/p?endpoint=http://127.0.0.1:9000&region=x%%2Fy'' --stanza"),
            "{conf}"
        );
        assert_eq!(sh_quote("/plain/path-1.2"), "/plain/path-1.2");
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r#"'it'\''s'"#);
        assert_eq!(sh_quote(""), "''");
    }

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

    /// The pg_hba.conf lines without comments, as (type, database, user, address, method).
    fn hba_rules() -> Vec<[String; 5]> {
        render_pg_hba()
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                if f[0] == "local" {
                    [f[0], f[1], f[2], "", f[3]].map(str::to_string)
                } else {
                    [f[0], f[1], f[2], f[3], f[4]].map(str::to_string)
                }
            })
            .collect()
    }

    /// The method of the first rule matching a TCP connection, as PostgreSQL picks it.
    fn hba_decision(ssl: bool, database: &str, user: &str) -> String {
        for [kind, db, role, addr, method] in hba_rules() {
            let kind_ok = match kind.as_str() {
                "host" => true,
                "hostssl" => ssl,
                "hostnossl" => !ssl,
                _ => false,
            };
            // "all" never matches the replication pseudo-database
            let db_ok = db == database || (db == "all" && database != "replication");
            if kind_ok && db_ok && (role == "all" || role == user) && addr == "0.0.0.0/0" {
                return method;
            }
        }
        "no entry".into()
    }

    #[test]
    fn hba_requires_tls_and_limits_each_role() {
        for [kind, _, _, addr, method] in hba_rules() {
            if kind == "local" {
                continue;
            }
            assert!(addr == "0.0.0.0/0" || addr == "::/0", "{addr}");
            if kind != "hostssl" {
                assert_eq!((kind.as_str(), method.as_str()), ("hostnossl", "reject"));
            } else {
                assert!(method == "scram-sha-256" || method == "reject", "{method}");
            }
        }
        let hba = render_pg_hba();
        assert!(hba.contains("local     all          postgres                        trust\n"));
        assert!(hba.contains("local     all          all                             scram-sha-256\n"));
        // plaintext TCP is refused for everyone, replication connections included
        for (db, user) in [("app", "app"), ("replication", "steward_replication"), ("postgres", "steward_replication")]
        {
            assert_eq!(hba_decision(false, db, user), "reject", "{db} {user}");
        }
        // over TLS: the superuser never, the replication role only where it must, others by SCRAM
        assert_eq!(hba_decision(true, "postgres", "postgres"), "reject");
        assert_eq!(hba_decision(true, "replication", "postgres"), "no entry", "refused too");
        assert_eq!(hba_decision(true, "replication", "steward_replication"), "scram-sha-256");
        assert_eq!(hba_decision(true, REPLICATION_ROLE_DATABASE, "steward_replication"), "scram-sha-256");
        assert_eq!(hba_decision(true, "app", "steward_replication"), "reject");
        assert_eq!(hba_decision(true, "template1", "steward_replication"), "reject");
        assert_eq!(hba_decision(true, "app", "app"), "scram-sha-256");
        assert_eq!(hba_decision(true, "app", "steward_move_x"), "scram-sha-256");
        assert_eq!(hba_decision(true, "replication", "app"), "no entry");
        // the same rules for IPv6
        let v4 = hba.lines().filter(|l| l.contains("0.0.0.0/0")).count();
        let v6 = hba.lines().filter(|l| l.contains("::/0")).count();
        assert_eq!(v4, v6);
    }

    #[test]
    fn tls_conf_points_at_the_installed_pair() {
        let conf = render_tls_conf(Path::new("/srv/c1/tls/pg-server.crt"), Path::new("/srv/it's/pg-server.key"));
        assert!(conf.contains("ssl = on\n"), "{conf}");
        assert!(conf.contains("ssl_cert_file = '/srv/c1/tls/pg-server.crt'\n"), "{conf}");
        assert!(conf.contains("ssl_key_file = '/srv/it''s/pg-server.key'\n"), "{conf}");
    }

    fn upstream(host: &str, password: &str) -> Upstream {
        Upstream { host: host.into(), port: 5433, password: password.into() }
    }

    #[test]
    fn primary_replication_conf_golden() {
        let role = Role::Primary { synchronous_standby_names: "ANY 1 (\"h2\", \"h3\")".into() };
        let conf = render_replication_conf(&role, "h1", Path::new("/var/lib/steward/c1/steward.pgpass")).unwrap();
        assert_eq!(
            conf,
            "\n# replication: primary\n\
             synchronous_standby_names = 'ANY 1 (\"h2\", \"h3\")'\n\
             primary_conninfo = ''\n\
             primary_slot_name = ''\n"
        );
        let async_conf =
            render_replication_conf(&Role::Primary { synchronous_standby_names: String::new() }, "h1", Path::new("/p"))
                .unwrap();
        assert!(async_conf.contains("synchronous_standby_names = ''\n"), "{async_conf}");
    }

    #[test]
    fn standby_replication_conf_golden() {
        let role = Role::Standby { upstream: upstream("10.0.0.1", "secret"), slot_name: "steward_h2".into() };
        let conf = render_replication_conf(&role, "h2", Path::new("/var/lib/steward/c1/steward.pgpass")).unwrap();
        assert_eq!(
            conf,
            "\n# replication: standby\n\
             primary_conninfo = 'host=10.0.0.1 port=5433 user=steward_replication \
             passfile=/var/lib/steward/c1/steward.pgpass application_name=h2 sslmode=require connect_timeout=2'\n\
             primary_slot_name = 'steward_h2'\n\
             hot_standby = on\n\
             recovery_target_timeline = 'latest'\n\
             wal_retrieve_retry_interval = '200ms'\n\
             synchronous_standby_names = ''\n"
        );
        assert!(!conf.contains("secret"), "the password must stay in the passfile");
        // odd paths are quoted for conninfo, then again for postgresql.conf
        let conf = render_replication_conf(&role, "h2", Path::new("/srv/it's here/steward.pgpass")).unwrap();
        // conninfo: '/srv/it\'s here/...'; then postgresql.conf doubles ' and \
        assert!(conf.contains(r"passfile=''/srv/it\\''s here/steward.pgpass'' application_name"), "{conf}");
    }

    #[test]
    fn replication_conf_rejects_values_that_would_break_the_file() {
        let standby = |host: &str, slot: &str| Role::Standby { upstream: upstream(host, "pw"), slot_name: slot.into() };
        let p = Path::new("/p");
        assert!(render_replication_conf(&standby("db1", "steward_a"), "a", p).is_ok());
        assert!(render_replication_conf(&standby("db1", "Bad-Slot"), "a", p).is_err());
        assert!(render_replication_conf(&standby("db 1", "steward_a"), "a", p).is_err());
        assert!(render_replication_conf(&standby("", "steward_a"), "a", p).is_err());
        assert!(render_replication_conf(&standby("db1", "steward_a"), "a b", p).is_err());
        assert!(render_replication_conf(&standby("db1", "steward_a"), "", p).is_err());
        let newline = Role::Primary { synchronous_standby_names: "a\nb".into() };
        assert!(render_replication_conf(&newline, "a", p).is_err());
    }

    #[test]
    fn conninfo_values_are_quoted_only_when_needed() {
        assert_eq!(conninfo_value("db1.example"), "db1.example");
        assert_eq!(conninfo_value(""), "''");
        assert_eq!(conninfo_value("a b"), "'a b'");
        assert_eq!(conninfo_value(r"it's\x"), r"'it\'s\\x'");
    }

    #[test]
    fn passfile_escapes_colon_and_backslash() {
        let text = render_passfile(&upstream("fe80::1", r"pa:ss\word")).unwrap();
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                r"fe80\:\:1:5433:replication:steward_replication:pa\:ss\\word",
                r"fe80\:\:1:5433:*:steward_replication:pa\:ss\\word",
            ]
        );
        assert!(render_passfile(&upstream("db1", "two\nlines")).is_err());
        assert!(render_passfile(&Upstream { host: "db1".into(), port: 0, password: "x".into() }).is_err());
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
