//! Records of the replicated state, as stored in SQLite and carried inside Raft commands.

use serde::{Deserialize, Serialize};

/// Lifecycle states of a database (DESIGN.md: provisioning → active → deprecated → archived →
/// deleted, plus failed).
pub mod db_state {
    pub const PROVISIONING: &str = "provisioning";
    pub const ACTIVE: &str = "active";
    /// Still fully usable, with a reason and a sunset date; may be reactivated.
    pub const DEPRECATED: &str = "deprecated";
    /// Its archive operation runs: sessions ended, final dump being stored and verified.
    pub const ARCHIVING: &str = "archiving";
    /// A verified final backup exists; the live data is gone.
    pub const ARCHIVED: &str = "archived";
    /// Being brought back from its archive.
    pub const RESTORING: &str = "restoring";
    /// Deleted by its owner after archival; the record stays for audit.
    pub const DELETED: &str = "deleted";
    pub const FAILED: &str = "failed";
}

/// Host states: `active` hosts receive new databases; `down` hosts missed their heartbeats.
pub mod host_state {
    pub const ACTIVE: &str = "active";
    pub const DOWN: &str = "down";
    /// Shown for an active host an operator drains (stored as `draining` beside `state`).
    pub const DRAINING: &str = "draining";
}

/// Cluster states: `creating` until its first instance answered, then `ready`.
pub mod cluster_state {
    pub const CREATING: &str = "creating";
    pub const READY: &str = "ready";
}

/// Operation states.
pub mod op_state {
    pub const RUNNING: &str = "running";
    pub const SUCCEEDED: &str = "succeeded";
    pub const FAILED: &str = "failed";
}

/// A product team: owns databases and authenticates with a token whose SHA-256 is stored here.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, PartialEq)]
pub struct Team {
    pub name: String,
    pub contact: String,
    pub token_hash: String,
    pub created_at: String,
}

/// An API token (other than the admin token): only its hash is kept.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, PartialEq)]
pub struct Token {
    pub id: String,
    pub hash: String,
    /// `admin`, `operator` or `team`.
    pub scope: String,
    pub team: Option<String>,
    pub name: String,
    pub created_at: String,
    pub revoked_at: Option<String>,
}

/// Token scopes.
pub mod token_scope {
    pub const ADMIN: &str = "admin";
    pub const OPERATOR: &str = "operator";
    pub const TEAM: &str = "team";
}

/// A database host as its agent described it at registration.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, PartialEq)]
pub struct Host {
    pub id: String,
    pub hostname: String,
    pub agent_addr: String,
    pub zone: String,
    pub cores: i64,
    pub memory_bytes: i64,
    pub memory_budget_bytes: i64,
    pub disk_free_bytes: i64,
    pub disk_total_bytes: i64,
    pub data_path: String,
    pub agent_version: String,
    pub pg_major: i64,
    pub pg_host: String,
    pub pg_port: i64,
    pub state: String,
    pub registered_at: String,
    pub state_changed_at: String,
    /// An operator drains the host: it takes no new databases and its databases are moved away.
    /// Kept across re-registrations; `state` still says whether it is alive.
    #[serde(default)]
    pub draining: bool,
    /// Set when an operator revoked the host's certificate.
    #[serde(default)]
    pub revoked_at: Option<String>,
}

#[cfg(test)]
impl Host {
    /// An active host with room for databases (its zone is its id), for tests.
    pub(crate) fn for_test(id: &str) -> Host {
        Host {
            id: id.into(),
            hostname: id.into(),
            agent_addr: format!("{id}:1"),
            zone: id.into(),
            cores: 2,
            memory_bytes: 1 << 30,
            memory_budget_bytes: 1 << 30,
            disk_free_bytes: 10 << 30,
            disk_total_bytes: 20 << 30,
            data_path: "/d".into(),
            agent_version: "t".into(),
            pg_major: 15,
            pg_host: "127.0.0.1".into(),
            pg_port: 5432,
            state: host_state::ACTIVE.into(),
            registered_at: "t0".into(),
            state_changed_at: "t0".into(),
            draining: false,
            revoked_at: None,
        }
    }
}

impl Host {
    /// `down`, `draining` or `active`, as operators see it.
    pub fn shown_state(&self) -> &str {
        if self.revoked_at.is_some() {
            "revoked"
        } else if self.state == host_state::ACTIVE && self.draining {
            host_state::DRAINING
        } else {
            &self.state
        }
    }

    /// Alive and not drained: may receive databases.
    pub fn accepts_databases(&self) -> bool {
        self.state == host_state::ACTIVE && !self.draining
    }
}

/// A PostgreSQL cluster: for `single` availability, one instance on one host.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, PartialEq)]
pub struct Cluster {
    pub id: String,
    pub pg_major: i64,
    /// Host of the current primary (also in `cluster_members`).
    pub primary_host: String,
    /// Port of the current primary.
    pub port: i64,
    /// Bumped on every promotion; agents refuse commands with an older epoch.
    pub epoch: i64,
    pub state: String,
    pub created_at: String,
    /// `single` or `ha`.
    #[serde(default = "single")]
    pub availability: String,
    #[serde(default)]
    pub replication_password: String,
}

fn single() -> String {
    "single".into()
}

/// Member roles in a cluster.
pub mod member_role {
    pub const PRIMARY: &str = "primary";
    pub const STANDBY: &str = "standby";
    /// A former primary that lost its role in a failover and has to rejoin as a standby.
    pub const FAILED: &str = "failed";
}

/// One PostgreSQL instance of a cluster, on one host.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, PartialEq)]
pub struct Member {
    pub cluster_id: String,
    pub host_id: String,
    pub port: i64,
    pub role: String,
    pub state: String,
}

/// A database as product teams see it, plus its placement and credentials.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, PartialEq)]
pub struct Database {
    pub id: String,
    pub name: String,
    pub owner: String,
    pub purpose: String,
    pub plan: String,
    pub availability: String,
    pub backup_retention_days: i64,
    pub state: String,
    pub cluster_id: String,
    pub pg_name: String,
    pub role_name: String,
    pub password: String,
    pub created_at: String,
    pub updated_at: String,
    #[serde(default)]
    pub deprecation_reason: String,
    /// RFC 3339, when deprecated.
    #[serde(default)]
    pub sunset_at: String,
    /// Where the final archive of an archived database is, and its size.
    #[serde(default)]
    pub archive_location: String,
    #[serde(default)]
    pub archive_bytes: i64,
    #[serde(default)]
    pub deleted_at: String,
    #[serde(default)]
    pub archive_key: String,
    #[serde(default)]
    pub archive_sha256: String,
}

/// A durable multi-step job (provision, later failover, move, ...), resumed by whichever node leads.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, PartialEq)]
pub struct Operation {
    pub id: String,
    pub kind: String,
    pub database_id: String,
    pub state: String,
    pub step: String,
    pub attempts: i64,
    pub error: String,
    pub created_at: String,
    pub updated_at: String,
    /// What a finished operation achieved, in words (a move's write pause, ...).
    #[serde(default)]
    pub detail: String,
}

/// A backup of a cluster into the repository, as the control plane scheduled and recorded it
/// (the repository itself is the agents' business; this is what operators and the scheduler see).
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, PartialEq)]
pub struct Backup {
    pub operation_id: String,
    pub cluster_id: String,
    /// `full` or `incr`, as requested.
    pub kind: String,
    /// What the agent took (an incremental backup without a prior one is a full one).
    pub kind_taken: String,
    /// `schedule`, or who asked.
    pub requested_by: String,
    pub retention_days: i64,
    /// An [`op_state`] value.
    pub state: String,
    pub host_id: String,
    pub from_standby: bool,
    pub label: String,
    pub size_bytes: i64,
    pub stored_bytes: i64,
    pub stop_lsn: String,
    pub error: String,
    pub created_at: String,
    pub finished_at: String,
}

impl Operation {
    /// A new running operation of `kind` on `database_id` ("" for cluster operations).
    pub fn start(kind: &str, database_id: &str, at: &str) -> Self {
        Operation {
            id: uuid::Uuid::new_v4().to_string(),
            kind: kind.into(),
            database_id: database_id.into(),
            state: op_state::RUNNING.into(),
            step: "queued".into(),
            attempts: 0,
            error: String::new(),
            created_at: at.into(),
            updated_at: at.into(),
            detail: String::new(),
        }
    }
}

/// Operation kinds.
pub mod op_kind {
    pub const PROVISION: &str = "provision";
    pub const BACKUP: &str = "backup";
    /// Provisioning of a database that is then filled from another one's backups.
    pub const RESTORE: &str = "restore";
    /// Final verified dump of a database, then its live data dropped.
    pub const ARCHIVE: &str = "archive";
    /// Provisioning of an archived database again, filled from its archive.
    pub const UNARCHIVE: &str = "unarchive";
    /// A live database copied to another cluster by logical replication, then switched there.
    pub const MOVE: &str = "move";
}

/// Move states (see [`Move`]).
pub mod move_state {
    /// Copying and streaming; the database is still served by its source.
    pub const COPYING: &str = "copying";
    /// The database's placement is the target now; the source's copy is being removed.
    pub const SWITCHED: &str = "switched";
    pub const DONE: &str = "done";
    pub const ROLLED_BACK: &str = "rolled_back";
}

/// A move of a live database to another cluster: where from, where to, how far.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, PartialEq)]
pub struct Move {
    pub operation_id: String,
    pub database_id: String,
    pub source_cluster_id: String,
    pub source_pg_name: String,
    pub source_role: String,
    pub target_cluster_id: String,
    pub target_pg_name: String,
    pub target_role: String,
    /// Password of the move's replication role on the source (the subscription connects with it).
    pub move_password: String,
    pub requested_by: String,
    /// A [`move_state`] value.
    pub state: String,
    /// Why the move is being rolled back ("" while it goes on).
    pub abort_reason: String,
    pub write_pause_ms: i64,
    pub created_at: String,
    pub finished_at: String,
}

/// Where a database created as a point-in-time copy takes its data from.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow, PartialEq)]
pub struct RestoreSource {
    pub database_id: String,
    pub source_database_id: String,
    /// Stanza of the source's cluster in the backup repository.
    pub source_cluster_id: String,
    pub source_pg_name: String,
    /// RFC 3339; empty for the latest archived WAL.
    pub target_time: String,
    pub created_at: String,
}
