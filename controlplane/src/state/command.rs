//! Commands appended to the Raft log and their results. Every field a command needs is decided by
//! the proposer (ids, timestamps, tokens), so applying it is deterministic on every node; checks
//! that must not race (unique names, idempotency keys) happen at apply time.

use serde::{Deserialize, Serialize};

use super::model::{Backup, Cluster, Database, Host, Member, Move, Operation, RestoreSource, Token};

/// One change to the replicated state. (Variants differ in size; commands are short-lived and
/// serialized right away, so boxing would buy nothing.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    CreateTeam {
        name: String,
        contact: String,
        token_hash: String,
        at: String,
        actor: String,
        /// Id of the team's first token (entries from before tokens had ids: `team-<name>`).
        #[serde(default)]
        token_id: Option<String>,
    },
    /// A new API token (its hash) with a scope.
    CreateToken {
        token: Token,
        actor: String,
    },
    RevokeToken {
        id: String,
        at: String,
        actor: String,
    },
    /// A one-time join token for an agent or a control-plane node.
    AddJoinToken {
        hash: String,
        role: String,
        expires_at: String,
        at: String,
        actor: String,
    },
    /// Spends a join token: refused if unknown, used, expired or for another role.
    UseJoinToken {
        hash: String,
        role: String,
        name: String,
        at: String,
    },
    /// Revokes a host's certificate.
    RevokeHost {
        host_id: String,
        at: String,
        actor: String,
    },
    /// A database's generated password was rotated.
    SetDatabasePassword {
        id: String,
        password: String,
        at: String,
        actor: String,
    },
    /// Registration (or re-registration with new facts) of a host.
    UpsertHost {
        host: Host,
    },
    SetHostState {
        host_id: String,
        state: String,
        at: String,
    },
    /// A new database with its provisioning operation, placed on an existing or a new cluster.
    CreateDatabase {
        database: Database,
        new_cluster: Option<Cluster>,
        /// Members of the new cluster (empty for entries written before members existed: then
        /// the cluster's primary is its only member).
        #[serde(default)]
        new_members: Vec<Member>,
        operation: Operation,
        idempotency_key: Option<String>,
        actor: String,
        /// Set for a point-in-time copy of another database.
        #[serde(default)]
        restore_of: Option<RestoreSource>,
    },
    /// Progress of an operation that is still running.
    UpdateOperation {
        id: String,
        step: String,
        attempts: i64,
        error: String,
        at: String,
    },
    SetClusterState {
        cluster_id: String,
        state: String,
        at: String,
    },
    /// A member finished its first setup (or changed role after rejoining).
    SetMember {
        cluster_id: String,
        host_id: String,
        role: String,
        state: String,
        at: String,
    },
    /// Promotion of `new_primary`, valid only if the cluster is still at `from_epoch`: bumps the
    /// epoch, makes the old primary `failed` (to rejoin later) and the new one `primary`.
    Failover {
        cluster_id: String,
        from_epoch: i64,
        new_primary: String,
        reason: String,
        at: String,
    },
    /// A backup of a cluster starts, with its operation; refused (`Conflict`) while another
    /// backup of the same cluster runs.
    StartBackup {
        backup: Backup,
        operation: Operation,
    },
    /// Ends a backup operation with what the agent reported.
    FinishBackup {
        operation_id: String,
        succeeded: bool,
        kind_taken: String,
        host_id: String,
        from_standby: bool,
        label: String,
        size_bytes: i64,
        stored_bytes: i64,
        stop_lsn: String,
        error: String,
        at: String,
    },
    /// A lifecycle change a caller asked for (deprecate, reactivate, transfer, delete), checked
    /// against the transition table at apply time; `Conflict` with the reason otherwise.
    ChangeDatabase {
        id: String,
        action: super::lifecycle::Action,
        /// Deprecate: why, and the planned end (RFC 3339).
        #[serde(default)]
        reason: String,
        #[serde(default)]
        sunset_at: String,
        /// Transfer: the team that owns the database from now on.
        #[serde(default)]
        new_owner: String,
        at: String,
        actor: String,
    },
    /// The archive of a database starts (it becomes `archiving`), with its operation.
    StartArchive {
        id: String,
        operation: Operation,
        at: String,
        actor: String,
    },
    /// Ends an archive operation: `archived` with where the archive is, or, if it failed, the
    /// database is as it was before (`active` or `deprecated`).
    FinishArchive {
        operation_id: String,
        succeeded: bool,
        #[serde(default)]
        location: String,
        #[serde(default)]
        key: String,
        #[serde(default)]
        bytes: i64,
        #[serde(default)]
        sha256: String,
        #[serde(default)]
        error: String,
        at: String,
    },
    /// An archived database comes back (`restoring`) on a new placement, with the operation
    /// that provisions it and loads its archive; it ends with `FinishProvision`.
    Unarchive {
        id: String,
        cluster_id: String,
        pg_name: String,
        new_cluster: Option<Cluster>,
        #[serde(default)]
        new_members: Vec<Member>,
        operation: Operation,
        at: String,
        actor: String,
    },
    /// A deleted database's archive was removed from the repository after its grace period.
    ArchivePurged {
        id: String,
        at: String,
    },
    /// An operator drains a host (no new databases; its databases are moved away) or ends that.
    SetHostDraining {
        host_id: String,
        draining: bool,
        at: String,
        actor: String,
    },
    /// A move of a live database to another cluster starts, with its operation (and the target
    /// cluster, if it is new); refused while the database is not live or another move runs.
    StartMove {
        #[serde(rename = "move")]
        mv: Move,
        operation: Operation,
        new_cluster: Option<Cluster>,
        #[serde(default)]
        new_members: Vec<Member>,
        actor: String,
    },
    /// The move must be rolled back (an operator's abort, or the control plane giving up);
    /// refused once the database was switched.
    AbortMove {
        operation_id: String,
        reason: String,
        at: String,
        actor: String,
    },
    /// The database's placement becomes the move's target (refused if an abort came first).
    SwitchMove {
        operation_id: String,
        write_pause_ms: i64,
        at: String,
    },
    /// Ends a move operation: done (after the switch) or rolled back.
    FinishMove {
        operation_id: String,
        succeeded: bool,
        #[serde(default)]
        error: String,
        #[serde(default)]
        detail: String,
        at: String,
    },
    /// Ends a provisioning operation: the database becomes `active` (or `failed`).
    FinishProvision {
        operation_id: String,
        succeeded: bool,
        error: String,
        at: String,
    },
    /// Several independent commands proposed together as one log entry (group commit): they
    /// are applied in order, each as if it were its own entry, and answered one by one.
    Batch {
        commands: Vec<Command>,
    },
}

/// What applying a command produced; conflicts are results, not errors, so every node agrees.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// Membership changes and blank entries.
    Empty,
    Done,
    /// The database was created now (`existing: false`) or an earlier create with the same
    /// idempotency key is returned (`existing: true`).
    DatabaseCreated {
        id: String,
        existing: bool,
    },
    Conflict {
        message: String,
    },
    NotFound {
        message: String,
    },
    /// The answers to a [`Command::Batch`], in the order of its commands.
    Batch {
        responses: Vec<Response>,
    },
}
