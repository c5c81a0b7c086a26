//! The one error type of PostgreSQL management. Every message says what went
//! wrong and what the operator can do about it, because these end up in the
//! control plane's task status and in agent logs read by humans.

use std::path::PathBuf;

/// Failure while finding, initialising, configuring, running or querying PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// No usable `initdb`/`pg_ctl`/`postgres` set was found.
    #[error(
        "PostgreSQL server binaries not found (looked in: {searched}); install the PostgreSQL \
         server package (e.g. `apt-get install postgresql`) or set STEWARD_PG_BINDIR to the \
         directory containing initdb, pg_ctl and postgres"
    )]
    BinariesNotFound { searched: String },

    /// `postgres --version` could not be run or parsed.
    #[error(
        "could not determine the PostgreSQL version from `{} --version`: {detail}; check the \
         installation or point STEWARD_PG_BINDIR at a working server bin directory",
        binary.display()
    )]
    BinaryVersion { binary: PathBuf, detail: String },

    /// STEWARD_PG_BINDIR points at a different major version than requested.
    #[error(
        "STEWARD_PG_BINDIR={} holds PostgreSQL {found}, but major {wanted} was requested; \
         unset STEWARD_PG_BINDIR or point it at the PostgreSQL {wanted} bin directory",
        bindir.display()
    )]
    WrongMajor { bindir: PathBuf, found: u32, wanted: u32 },

    /// The agent runs as root but there is no `postgres` OS user to run PostgreSQL as.
    #[error(
        "PostgreSQL refuses to run as root and the OS user `postgres` does not exist; install \
         the postgresql package or create the user (e.g. `useradd --system --create-home \
         --home-dir /var/lib/postgresql postgres`)"
    )]
    PostgresUserMissing,

    /// The user database could not be queried.
    #[error("could not look up OS user `{name}`: {source}; check /etc/passwd and NSS configuration")]
    UserLookup { name: String, source: nix::Error },

    /// Paths handed to PostgreSQL must be absolute (it runs with cwd `/`).
    #[error("{what} must be an absolute path, got {}; pass a full path such as /var/lib/steward/...", path.display())]
    RelativePath { what: &'static str, path: PathBuf },

    /// An ancestor directory of the data or socket directory is closed to the run-as user.
    #[error(
        "PostgreSQL runs as user {user}, which cannot enter {}: choose a data path outside it, \
         e.g. --data-dir /var/lib/steward (or grant search permission: chmod o+x {})",
        path.display(), path.display()
    )]
    NotTraversable { user: String, path: PathBuf },

    /// Unix socket paths are limited by `sun_path`.
    #[error(
        "unix socket path {} is {len} bytes, over the {max}-byte limit; choose a shorter \
         socket directory (e.g. /run/steward)",
        path.display()
    )]
    SocketPathTooLong { path: PathBuf, len: usize, max: usize },

    /// The socket directory is shared with, or owned by, someone else.
    #[error(
        "socket directory {} is not empty and not owned by {user}; use a dedicated directory \
         such as /run/steward/<cluster>, which the agent creates with mode 0700",
        path.display()
    )]
    SocketDirNotPrivate { path: PathBuf, user: String },

    /// PGDATA holds files that are not from PostgreSQL; the agent will not touch them.
    #[error(
        "data directory {} is not empty and does not look like a PostgreSQL data directory \
         (found {entry:?}); choose a new or empty directory (use a subdirectory of a mount point)",
        path.display()
    )]
    DataDirNotEmpty { path: PathBuf, entry: String },

    /// PGDATA was created by another major version than the binaries in use.
    #[error(
        "data directory {} was initialized by PostgreSQL {data_major} but the binaries are \
         PostgreSQL {bin_major}; install PostgreSQL {data_major} (or set STEWARD_PG_BINDIR) or \
         upgrade the data with pg_upgrade",
        path.display()
    )]
    MajorMismatch { path: PathBuf, data_major: String, bin_major: u32 },

    /// An operation needs an initialized data directory.
    #[error("data directory {} is not initialized; call ensure_initialized first", path.display())]
    NotInitialized { path: PathBuf },

    /// A filesystem operation failed.
    #[error("could not {action} {}: {source}; check permissions and free space", path.display())]
    Io { action: String, path: PathBuf, source: std::io::Error },

    /// A PostgreSQL program exited unsuccessfully.
    #[error("`{command}` failed ({status}): {output}")]
    Command { command: String, status: String, output: String },

    /// The server did not come up; the tail of its startup log says why.
    #[error(
        "PostgreSQL in {} did not start: {reason}; fix the cause shown in the log and retry. \
         Last lines of {}:\n{tail}",
        data_dir.display(), log.display()
    )]
    StartFailed { data_dir: PathBuf, reason: String, log: PathBuf, tail: String },

    /// A database or role name outside the accepted pattern.
    #[error(
        "invalid {kind} name {name:?}: use 1-63 characters of lower-case letters, digits and \
         underscores, not starting with a digit"
    )]
    InvalidIdentifier { kind: &'static str, name: String },

    /// Names the agent itself relies on (superuser, system databases).
    #[error("{kind} name {name:?} is reserved for PostgreSQL and the agent; choose another name")]
    ReservedName { kind: &'static str, name: String },

    /// Something other than a SCRAM verifier was passed as a password.
    #[error(
        "password for role {role} is not a SCRAM-SHA-256 verifier; pass \
         steward_agent::pg::scram_verifier(password), never the plaintext"
    )]
    NotAVerifier { role: String },

    /// The superuser connection over the unix socket failed.
    #[error(
        "could not connect as postgres over unix socket in {}: {}; check that the instance \
         is running (see log/ inside PGDATA)",
        socket_dir.display(), super::sql::describe(source)
    )]
    Connect { socket_dir: PathBuf, source: tokio_postgres::Error },

    /// A SQL statement failed.
    #[error("PostgreSQL error while {action}: {}", super::sql::describe(source))]
    Sql { action: String, source: tokio_postgres::Error },

    /// A replication setting handed to the agent cannot be rendered safely.
    #[error(
        "invalid replication setting {what}: {detail}; fix the value the control plane sent \
         (member names: 1-63 of A-Z a-z 0-9 _ . -; hosts without whitespace; ports 1-65535)"
    )]
    InvalidReplicationSetting { what: &'static str, detail: String },

    /// A primary-only operation was attempted on an instance in recovery.
    #[error(
        "cannot {action}: PostgreSQL in {} is a standby (in recovery); run this on the primary, \
         or promote this instance first",
        data_dir.display()
    )]
    NotPrimary { action: String, data_dir: PathBuf },

    /// The role says primary but PGDATA is still marked as a standby.
    #[error(
        "PostgreSQL in {} is configured as a standby (standby.signal present) but its role is set to \
         primary; call promote() to turn it into a primary (removing standby.signal by hand would fork \
         the timeline), or set the standby role again",
        data_dir.display()
    )]
    StillStandby { data_dir: PathBuf },

    /// The write probe did not commit in time: storage or WAL writing is stuck or overloaded.
    #[error(
        "write probe on PostgreSQL in {} did not commit within {timeout:?}; the disk or WAL writer is \
         stuck or overloaded: fence this instance (stop_immediate) and check the storage (dmesg, iostat)",
        data_dir.display()
    )]
    ProbeTimeout { data_dir: PathBuf, timeout: std::time::Duration },

    /// A PostgreSQL client program the replication code needs is not installed.
    #[error(
        "{tool} not found in {}; install the PostgreSQL {major} client/server packages (e.g. \
         `apt-get install postgresql-{major} postgresql-client-{major}`) so that it sits next to pg_ctl",
        bindir.display()
    )]
    ToolMissing { tool: &'static str, bindir: PathBuf, major: u32 },

    /// pg_basebackup failed; nothing half-cloned was left in PGDATA.
    #[error(
        "cloning {upstream} into {} with pg_basebackup failed ({status}); check that the upstream is \
         running and reachable, that slot {slot:?} exists on it (ensure_slots), that the replication \
         role and password match (ensure_replication_role) and that its pg_hba.conf allows it, then \
         retry. pg_basebackup said:\n{output}",
        data_dir.display()
    )]
    CloneFailed { upstream: String, slot: String, data_dir: PathBuf, status: String, output: String },

    /// pg_rewind failed; the data directory may be unusable until a rewind succeeds.
    #[error(
        "pg_rewind of {} from {upstream} failed ({status}); check that the upstream is a reachable \
         primary and that steward_replication may read its files (ensure_replication_role on it), then \
         retry. If the WAL needed is gone from the upstream, move PGDATA aside and clone_from instead. \
         pg_rewind said:\n{output}",
        data_dir.display()
    )]
    RewindFailed { upstream: String, data_dir: PathBuf, status: String, output: String },

    /// `pg_ctl promote` failed or the server stayed in recovery.
    #[error(
        "promoting PostgreSQL in {} failed: {detail}; check that it runs as a standby and read the \
         server log in {}/log",
        data_dir.display(), data_dir.display()
    )]
    PromoteFailed { data_dir: PathBuf, detail: String },

    /// An immediate stop (fence) did not stop the server.
    #[error(
        "could not stop PostgreSQL in {} immediately: {detail}; it may still accept writes: kill its \
         postmaster (pid in postmaster.pid) and check the storage",
        data_dir.display()
    )]
    FenceFailed { data_dir: PathBuf, detail: String },

    /// The PostgreSQL server certificate could not be made, or a given one is unusable.
    #[error(
        "unusable PostgreSQL server certificate: {0}; PostgreSQL serves this host's certificate \
         (node.pem and node.key in the agent's TLS directory): check or re-issue it"
    )]
    Certificate(String),

    /// A blocking helper task panicked or was cancelled.
    #[error("internal task failed: {0}; this is a bug in steward-agent, please report it")]
    Task(String),
}

impl PgError {
    /// Shorthand for [`PgError::Io`].
    pub fn io(action: impl Into<String>, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PgError::Io { action: action.into(), path: path.into(), source }
    }
}
