//! One PostgreSQL instance on this host: its description, initialisation and
//! configuration. Lifecycle (start/stop) lives in `lifecycle.rs`, SQL-level
//! provisioning in `database.rs`, replication in `replication.rs` and
//! `standby.rs`.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::config::{self, Listen, LOG_DIR, PASSFILE, STANDBY_SIGNAL, STEWARD_CONF};
use super::paths::{self, blocking};
use super::replication::{Role, RoleConfig};
use super::runas::{output_text, run};
use super::tuning::tuning_for;
use super::{PgBinaries, PgError, RunAs};

/// Everything the agent needs to know to run one cluster member on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSpec {
    /// Control-plane cluster id (also used as `cluster_name`).
    pub cluster_id: String,
    /// PGDATA.
    pub data_dir: PathBuf,
    /// `unix_socket_directories` (agent-private dir, mode 0700, owned by run-as user).
    pub socket_dir: PathBuf,
    /// TCP port; also part of the socket file name.
    pub port: u16,
    /// e.g. "127.0.0.1" or "*".
    pub listen_addresses: String,
    /// Memory this instance may use; drives [`tuning_for`].
    pub memory_budget_bytes: u64,
    /// Cores this instance may use; drives parallelism settings.
    pub cores: u32,
    /// Where its WAL is archived, if anywhere.
    pub archive: Option<WalArchiving>,
}

/// WAL archiving of an instance into a backup repository, under its cluster id as stanza:
/// `archive_command` and `restore_command` run this agent's `archive-push` / `archive-get`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalArchiving {
    /// The steward-agent executable PostgreSQL runs (absolute).
    pub agent_exe: PathBuf,
    /// The repository location: an absolute directory or an `s3://` URL (never credentials:
    /// archive_command is visible in pg_settings).
    pub repo: String,
    /// Background pushes at once (archive-push's asynchronous mode, with a spool next to
    /// PGDATA); 0 pushes each file within the archive_command call.
    pub async_processes: u16,
}

impl InstanceSpec {
    /// The spool directory of asynchronous WAL archiving: next to PGDATA, never inside it.
    pub fn archive_spool(&self) -> PathBuf {
        self.data_dir.with_file_name("archive-spool")
    }
}

/// One PostgreSQL instance on this host, driven through initdb/pg_ctl and a superuser
/// connection over the unix socket.
#[derive(Debug)]
pub struct Instance {
    pub(super) spec: InstanceSpec,
    pub(super) bins: PgBinaries,
    pub(super) run_as: RunAs,
    /// Set by `write_config` when a file changed; `start` reloads and clears it.
    pub(super) config_changed: AtomicBool,
    /// Replication role set by `set_role` and rendered by `write_config`.
    pub(super) replication: Mutex<Option<RoleConfig>>,
    /// Whether `write_probe` has made sure its table exists.
    pub(super) probe_table_ready: AtomicBool,
    /// While a standby is being promoted: the `synchronous_standby_names` it must enforce from
    /// its first commit as a primary (written into its standby configuration beforehand).
    pub(super) promotion_sync_names: Mutex<Option<String>>,
    /// The server certificate `write_config` installs next to PGDATA (see `tls.rs`).
    pub(super) server_cert: Mutex<Option<super::tls::ServerCert>>,
}

/// Entries initdb (or a server) creates in PGDATA; a directory holding only
/// these may be moved aside as a failed initdb.
fn is_pg_entry(name: &str) -> bool {
    name.starts_with("pg_")
        || name.starts_with("postgresql.")
        || name.starts_with("postmaster.")
        || [
            "base",
            "global",
            "PG_VERSION",
            LOG_DIR,
            STEWARD_CONF,
            STANDBY_SIGNAL,
            "recovery.signal",
            "backup_label",
            "backup_label.old",
            "backup_manifest",
            "tablespace_map",
            "current_logfiles",
        ]
        .contains(&name)
}

impl Instance {
    /// Binds a spec to the binaries and OS user that will run it.
    pub fn new(spec: InstanceSpec, bins: PgBinaries, run_as: RunAs) -> Self {
        Instance {
            spec,
            bins,
            run_as,
            config_changed: AtomicBool::new(false),
            replication: Mutex::new(None),
            probe_table_ready: AtomicBool::new(false),
            promotion_sync_names: Mutex::new(None),
            server_cert: Mutex::new(None),
        }
    }

    /// The spec this instance was created with.
    pub fn spec(&self) -> &InstanceSpec {
        &self.spec
    }

    /// The server binaries used for this instance.
    pub fn binaries(&self) -> &PgBinaries {
        &self.bins
    }

    /// The OS user PostgreSQL runs as.
    pub fn run_as(&self) -> &RunAs {
        &self.run_as
    }

    /// Where `pg_ctl start -l` writes early server output.
    pub fn startup_log(&self) -> PathBuf {
        self.spec.data_dir.join(LOG_DIR).join("startup.log")
    }

    /// HOME for PostgreSQL commands: the data dir's parent, else /tmp.
    pub(super) fn home(&self) -> PathBuf {
        self.spec.data_dir.parent().map_or_else(|| PathBuf::from("/tmp"), Path::to_path_buf)
    }

    /// The libpq password file for the upstream: next to PGDATA, never inside it,
    /// so pg_basebackup and pg_rewind never copy it.
    pub fn passfile_path(&self) -> PathBuf {
        self.home().join(PASSFILE)
    }

    /// True if PGDATA holds `standby.signal`, i.e. the server starts (or runs) as a standby.
    pub fn is_standby_configured(&self) -> bool {
        self.spec.data_dir.join(STANDBY_SIGNAL).is_file()
    }

    /// True if PGDATA holds a complete cluster (PG_VERSION and pg_control).
    pub fn is_initialized(&self) -> bool {
        let d = &self.spec.data_dir;
        d.join("PG_VERSION").is_file() && d.join("global").join("pg_control").is_file()
    }

    /// initdb if PGDATA holds no complete cluster (PG_VERSION + global/pg_control),
    /// after checking paths and preparing owned directories; a half-finished
    /// PGDATA is moved aside, never deleted. Returns true if initdb ran now.
    pub async fn ensure_initialized(&self) -> Result<bool, PgError> {
        if !self.prepare().await? {
            return Ok(false);
        }
        let data = &self.spec.data_dir;
        let mut last = None;
        for locale in ["C.UTF-8", "C"] {
            let mut cmd = self.run_as.command(&self.bins.bin("initdb"), &self.home());
            cmd.arg("-D").arg(data).args([
                "--data-checksums",
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
            ]);
            cmd.arg(format!("--locale={locale}"));
            let label = format!("initdb -D {} --locale={locale}", data.display());
            match run(&mut cmd, &label).await {
                Ok(out) => {
                    tracing::info!(data_dir = %data.display(), locale, major = self.bins.major,
                        user = %self.run_as.name, "initialized data directory");
                    tracing::debug!(output = %output_text(&out), "initdb output");
                    return Ok(true);
                }
                Err(PgError::Command { output, .. }) if output.contains("invalid locale") => {
                    tracing::warn!(locale, output = %output, "initdb rejected locale; retrying");
                    last = Some(PgError::Command { command: label, status: "failed".into(), output });
                    self.prepare().await?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(PgError::Task("initdb attempts exhausted".into())))
    }

    /// Path checks and directory setup; true if PGDATA must be created (initdb or clone).
    pub(super) async fn prepare(&self) -> Result<bool, PgError> {
        let (spec, run_as, major) = (self.spec.clone(), self.run_as.clone(), self.bins.major);
        let initialized = self.is_initialized();
        blocking(move || {
            paths::require_absolute("data directory", &spec.data_dir)?;
            paths::require_absolute("socket directory", &spec.socket_dir)?;
            paths::check_socket_path(&spec.socket_dir, spec.port)?;
            paths::check_traversable(&run_as, &spec.data_dir)?;
            paths::check_traversable(&run_as, &spec.socket_dir)?;
            prepare_socket_dir(&spec.socket_dir, &run_as)?;
            if initialized {
                let version_file = spec.data_dir.join("PG_VERSION");
                let found = fs::read_to_string(&version_file).map_err(|e| PgError::io("read", &version_file, e))?;
                if found.trim() != major.to_string() {
                    let data_major = found.trim().to_string();
                    return Err(PgError::MajorMismatch { path: spec.data_dir, data_major, bin_major: major });
                }
                return Ok(false);
            }
            prepare_data_dir(&spec.data_dir, &run_as)?;
            Ok(true)
        })
        .await
    }

    /// Writes `steward.conf` (with the settings of the role from [`Instance::set_role`],
    /// if any), the include line in `postgresql.conf` and `pg_hba.conf` (each
    /// atomically); for a standby also the passfile and `standby.signal`. Returns
    /// whether anything changed (so `start` reloads). Refuses to turn a standby into
    /// a primary by configuration: that is [`Instance::promote`]'s job.
    pub async fn write_config(&self) -> Result<bool, PgError> {
        if !self.is_initialized() {
            return Err(PgError::NotInitialized { path: self.spec.data_dir.clone() });
        }
        let (spec, run_as) = (self.spec.clone(), self.run_as.clone());
        let role = self.role_config();
        let promotion_sync =
            self.promotion_sync_names.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let passfile = self.passfile_path();
        let (tls_conf, cert_changed) = self.install_server_cert().await?;
        let changed = blocking(move || {
            let data = &spec.data_dir;
            let listen = Listen {
                cluster_id: &spec.cluster_id,
                port: spec.port,
                listen_addresses: &spec.listen_addresses,
                socket_dir: &spec.socket_dir,
            };
            let tuning = tuning_for(spec.memory_budget_bytes, spec.cores);
            let mut conf = config::render_steward_conf(&listen, &tuning);
            conf.push_str(&tls_conf);
            if let Some(a) = &spec.archive {
                let spool = (a.async_processes > 0).then(|| spec.archive_spool());
                if let Some(dir) = &spool {
                    paths::ensure_owned_dir(dir, &run_as, 0o700)?;
                }
                conf.push_str(&config::render_archiving_conf(a, &spec.cluster_id, spool.as_deref()));
            }
            // render (and so validate) everything before writing anything
            let mut passfile_text = None;
            if let Some(rc) = &role {
                conf.push_str(&config::render_replication_conf(&rc.role, &rc.application_name, &passfile)?);
                if let Role::Standby { upstream, .. } = &rc.role {
                    passfile_text = Some(config::render_passfile(upstream)?);
                    if let Some(names) = &promotion_sync {
                        conf.push_str(&config::render_promotion_sync(names));
                    }
                }
            }
            let signal = data.join(STANDBY_SIGNAL);
            let mut changed = cert_changed;
            match role.as_ref().map(|rc| &rc.role) {
                Some(Role::Primary { .. }) if signal.exists() => {
                    return Err(PgError::StillStandby { data_dir: data.clone() });
                }
                Some(Role::Standby { .. }) => {
                    // passfile and signal first: a crash in between must not leave a primary
                    if let Some(text) = &passfile_text {
                        changed |= paths::write_atomic(&passfile, text, &run_as)?;
                    }
                    if paths::write_atomic(&signal, "", &run_as)? {
                        changed = true;
                        if data.join("postmaster.pid").exists() {
                            tracing::warn!(data_dir = %data.display(),
                                "standby.signal created while the server runs: it stays a primary until restarted; \
                                 stop it and rewind_from the new primary");
                        }
                    }
                }
                _ => {}
            }
            changed |= paths::write_atomic(&data.join(STEWARD_CONF), &conf, &run_as)?;
            let main = data.join("postgresql.conf");
            let current = fs::read_to_string(&main).map_err(|e| PgError::io("read", &main, e))?;
            if let Some(updated) = config::with_include(&current) {
                changed |= paths::write_atomic(&main, &updated, &run_as)?;
            }
            let hba = config::render_pg_hba();
            changed |= paths::write_atomic(&data.join("pg_hba.conf"), &hba, &run_as)?;
            paths::ensure_owned_dir(&data.join(LOG_DIR), &run_as, 0o700)?;
            Ok(changed)
        })
        .await?;
        if changed {
            self.config_changed.store(true, Ordering::SeqCst);
            tracing::info!(data_dir = %self.spec.data_dir.display(), "configuration updated");
        }
        Ok(changed)
    }
}

/// Creates the socket dir 0700 for `run_as`, refusing to take over a shared one.
pub(super) fn prepare_socket_dir(dir: &Path, run_as: &RunAs) -> Result<(), PgError> {
    use std::os::unix::fs::MetadataExt;
    if let Ok(meta) = fs::metadata(dir) {
        if meta.uid() != run_as.uid && !paths::is_missing_or_empty(dir)? {
            let user = run_as.name.clone();
            return Err(PgError::SocketDirNotPrivate { path: dir.to_path_buf(), user });
        }
    }
    paths::ensure_owned_dir(dir, run_as, 0o700)?;
    paths::check_traversable(run_as, dir)
}

/// Makes an empty, owned, 0700 PGDATA, moving a failed initdb's leftovers aside.
fn prepare_data_dir(data: &Path, run_as: &RunAs) -> Result<(), PgError> {
    if !paths::is_missing_or_empty(data)? {
        let entries = fs::read_dir(data).map_err(|e| PgError::io("list", data, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| PgError::io("list", data, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !is_pg_entry(&name) {
                return Err(PgError::DataDirNotEmpty { path: data.to_path_buf(), entry: name });
            }
        }
        paths::move_aside(data)?;
    }
    if let Some(parent) = data.parent() {
        fs::create_dir_all(parent).map_err(|e| PgError::io("create directory", parent, e))?;
    }
    // re-check: directories we just created follow the umask
    paths::check_traversable(run_as, data)?;
    paths::ensure_owned_dir(data, run_as, 0o700)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::pg::sql::describe;
    use crate::pg::test_support::{self, free_port, StopGuard};
    use crate::pg::{scram_verifier, tls, REPLICATION_ROLE};

    /// A client over TLS; its connection runs in the background.
    async fn connect_tls(cfg: tokio_postgres::Config) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) = tls::connect(cfg).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// Why a connection attempt failed (panics if it worked).
    fn refused<T>(attempt: Result<T, tokio_postgres::Error>) -> String {
        match attempt {
            Ok(_) => panic!("the connection was accepted"),
            Err(e) => describe(&e),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_lifecycle_with_real_postgres() {
        let bins = match PgBinaries::discover(None) {
            Ok(b) => b,
            Err(e) => {
                println!("skipping: no PostgreSQL binaries found ({e})");
                return;
            }
        };
        let run_as = RunAs::detect().unwrap();
        let tmp = tempfile::Builder::new().prefix("steward-pg").tempdir_in("/tmp").unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let spec = InstanceSpec {
            cluster_id: "test-cluster".into(),
            data_dir: tmp.path().join("data"),
            socket_dir: tmp.path().join("sock"),
            port: free_port(),
            listen_addresses: "127.0.0.1".into(),
            memory_budget_bytes: 256 << 20,
            cores: 2,
            archive: None,
        };
        let _guard = StopGuard { pg_ctl: bins.bin("pg_ctl"), data_dir: spec.data_dir.clone(), run_as: run_as.clone() };
        let inst = test_support::instance(spec.clone(), &bins, &run_as);

        assert!(inst.ensure_initialized().await.unwrap());
        assert!(inst.write_config().await.unwrap());
        assert!(!inst.write_config().await.unwrap());
        // the certificate lives next to PGDATA, never inside it, and only its user reads the key
        let key = inst.tls_dir().join(tls::KEY_FILE);
        assert!(!key.starts_with(&spec.data_dir));
        let meta = fs::metadata(&key).unwrap();
        assert_eq!(
            (meta.permissions().mode() & 0o777, std::os::unix::fs::MetadataExt::uid(&meta)),
            (0o600, run_as.uid)
        );
        inst.start().await.unwrap();
        assert!(inst.is_running().await);
        inst.start().await.unwrap(); // idempotent

        let password = "correct horse 'battery' \\ staple";
        let verifier = scram_verifier(password);
        assert!(inst.ensure_database("appdb", "app", &verifier).await.unwrap());
        assert!(!inst.ensure_database("appdb", "app", &verifier).await.unwrap());
        assert!(inst.ensure_database("Bad", "app", &verifier).await.is_err());
        assert!(inst.ensure_database("x", "app", password).await.is_err());

        let tcp = |user: &str, database: &str, password: &str| {
            let mut cfg = tokio_postgres::Config::new();
            cfg.host("127.0.0.1").port(spec.port).user(user).dbname(database).password(password);
            cfg
        };
        let client = connect_tls(tcp("app", "appdb", password)).await.unwrap();
        client.batch_execute("CREATE TABLE t (id int primary key, v text)").await.unwrap();
        client.execute("INSERT INTO t VALUES (1, $1)", &[&"hello"]).await.unwrap();
        let v: String = client.query_one("SELECT v FROM t WHERE id = 1", &[]).await.unwrap().get(0);
        assert_eq!(v, "hello");
        let ssl: bool =
            client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap().get(0);
        assert!(ssl, "the session must be encrypted");
        drop(client);
        // the right password is still needed over TLS
        let err = connect_tls(tcp("app", "appdb", "wrong")).await.unwrap_err();
        assert!(describe(&err).contains("password authentication failed"), "{}", describe(&err));

        // plaintext TCP is refused by pg_hba.conf, whatever the password
        let err = refused(tcp("app", "appdb", password).connect(tokio_postgres::NoTls).await);
        assert!(err.contains("pg_hba.conf rejects connection"), "{err}");
        let mut disabled = tcp("app", "appdb", password);
        disabled.ssl_mode(tokio_postgres::config::SslMode::Disable);
        let err = refused(disabled.connect(tls::connector()).await);
        assert!(err.contains("no encryption"), "{err}");

        // the superuser is rejected over TCP, with or without TLS
        assert!(tcp("postgres", "postgres", "").connect(tokio_postgres::NoTls).await.is_err());
        let err = connect_tls(tcp("postgres", "postgres", "x")).await.unwrap_err();
        assert!(describe(&err).contains("pg_hba.conf rejects connection"), "{}", describe(&err));

        // the replication role reaches the one database its checks use, and no other
        let repl_password = "repl secret";
        inst.ensure_replication_role(&scram_verifier(repl_password)).await.unwrap();
        let repl = connect_tls(tcp(REPLICATION_ROLE, config::REPLICATION_ROLE_DATABASE, repl_password)).await.unwrap();
        repl.query_one("SELECT timeline_id FROM pg_control_checkpoint()", &[]).await.unwrap();
        drop(repl);
        for db in ["appdb", "template1"] {
            let err = connect_tls(tcp(REPLICATION_ROLE, db, repl_password)).await.unwrap_err();
            assert!(describe(&err).contains("pg_hba.conf rejects connection"), "{db}: {}", describe(&err));
        }

        // a new certificate is served after a reload, without a restart
        let psql_verify = |root: &Path| {
            std::process::Command::new(inst.binaries().bin("psql"))
                .arg(format!(
                    "host=127.0.0.1 port={} user=app dbname=appdb sslmode=verify-ca sslrootcert={}",
                    spec.port,
                    root.display()
                ))
                .args(["-XAtc", "SELECT 1"])
                .env("PGPASSWORD", password)
                .output()
                .unwrap()
        };
        let old_root = tmp.path().join("old-root.crt");
        fs::write(&old_root, test_support::test_cert().cert_pem).unwrap();
        assert!(psql_verify(&old_root).status.success(), "{:?}", psql_verify(&old_root));
        let postmaster = fs::read_to_string(spec.data_dir.join("postmaster.pid")).unwrap();
        let new_cert = tls::generate(&["127.0.0.1".to_string()]).unwrap();
        assert!(inst.rotate_server_cert(new_cert.clone()).await.unwrap());
        assert!(!inst.rotate_server_cert(new_cert.clone()).await.unwrap());
        let new_root = tmp.path().join("new-root.crt");
        fs::write(&new_root, &new_cert.cert_pem).unwrap();
        let out = psql_verify(&new_root);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let out = psql_verify(&old_root);
        assert!(!out.status.success(), "the old certificate is still served");
        assert_eq!(fs::read_to_string(spec.data_dir.join("postmaster.pid")).unwrap(), postmaster, "restarted");

        assert!(!inst.ensure_initialized().await.unwrap());
        inst.stop().await.unwrap();
        assert!(!inst.is_running().await);
        inst.stop().await.unwrap(); // already stopped
    }

    #[test]
    fn recognises_initdb_leftovers() {
        assert!(is_pg_entry("pg_wal"));
        assert!(is_pg_entry("PG_VERSION"));
        assert!(is_pg_entry("postgresql.auto.conf"));
        assert!(!is_pg_entry("lost+found"));
        assert!(!is_pg_entry("etc"));
    }
}
