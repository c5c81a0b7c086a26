//! Streaming replication state of one instance: the role the control plane
//! gives it (primary or standby of an upstream), the replication role and
//! slots on a primary, and the observed role, timeline and LSNs. Turning a
//! data directory into a standby (clone, rewind, promote) lives in
//! `standby.rs`; the disk write probe in `probe.rs`.

use tokio_postgres::error::SqlState;

use super::sql;
use super::{Instance, PgError};

/// Name of the role standbys connect with.
pub const REPLICATION_ROLE: &str = "steward_replication";

/// Prefix of the physical slots the agent manages (see [`Instance::drop_slots_except`]).
pub const SLOT_PREFIX: &str = "steward_";

/// Where a standby streams from.
#[derive(Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Host name or address of the upstream PostgreSQL (as reachable from this host).
    pub host: String,
    /// Its TCP port.
    pub port: u16,
    /// Plaintext password of [`REPLICATION_ROLE`]: goes only into the 0600 passfile, never into logs.
    pub password: String,
}

/// Debug without the password, so an `Upstream` (or an `Instance` holding one) can be logged.
impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Upstream {
    /// `host:port`, for messages and logs.
    pub fn endpoint(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// The replication role this instance should have, rendered into steward.conf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Accepts writes; waits for the standbys named in `synchronous_standby_names`
    /// ("" = asynchronous; e.g. `ANY 1 ("h2", "h3")`).
    Primary {
        /// Value of PostgreSQL's `synchronous_standby_names`.
        synchronous_standby_names: String,
    },
    /// Streams WAL from `upstream` through the physical slot `slot_name` (which must
    /// exist on the upstream, see [`Instance::ensure_slots`]).
    Standby {
        /// Where to stream from.
        upstream: Upstream,
        /// Physical replication slot on the upstream.
        slot_name: String,
    },
}

/// Role and position of an instance as PostgreSQL reports it, for heartbeats and
/// failover decisions (the most advanced standby wins).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReplicationStatus {
    /// True on a standby (`pg_is_in_recovery()`).
    pub in_recovery: bool,
    /// Current timeline: on a primary its WAL insert timeline, on a standby the
    /// timeline it receives (or, without a WAL receiver, of its last restartpoint).
    pub timeline: u32,
    /// Primary: pg_current_wal_lsn. Standby: last received (pg_last_wal_receive_lsn, or replay if none).
    pub received_lsn: u64,
    /// Standby: pg_last_wal_replay_lsn; primary: same as current.
    pub replayed_lsn: u64,
    /// Primary only: application_names of connected streaming standbys with their sync_state
    /// ("sync"/"potential"/"quorum"/"async") and flush LSN.
    pub standbys: Vec<StandbyState>,
}

/// One streaming standby as its primary sees it (`pg_stat_replication`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandbyState {
    /// The standby's `application_name` (its member name).
    pub application_name: String,
    /// "sync", "potential", "quorum" or "async".
    pub sync_state: String,
    /// WAL the standby has flushed to its disk (0 if not reported yet).
    pub flush_lsn: u64,
    /// WAL the standby has replayed (0 if not reported yet).
    pub replay_lsn: u64,
}

/// The role plus this member's name, as held by an [`Instance`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RoleConfig {
    /// Primary or standby of an upstream.
    pub role: Role,
    /// This member's name, sent as `application_name` when streaming.
    pub application_name: String,
}

/// Parses PostgreSQL's textual LSN (`"0/3000148"`, two hex halves) into a number
/// that can be compared and subtracted.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    let half = |h: &str| -> Option<u64> {
        if h.is_empty() || h.len() > 8 || !h.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(h, 16).ok()
    };
    Some((half(hi)? << 32) | half(lo)?)
}

/// Formats an LSN the way PostgreSQL prints it (`%X/%X`), for logs and SQL.
pub fn format_lsn(v: u64) -> String {
    format!("{:X}/{:X}", v >> 32, v & 0xFFFF_FFFF)
}

/// Member names end up in `application_name` (truncated and mangled by PostgreSQL if
/// longer than 63 bytes or non-ASCII) and must match `synchronous_standby_names`.
pub(crate) fn validate_member_name(name: &str) -> Result<(), PgError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(PgError::InvalidReplicationSetting {
            what: "application_name",
            detail: format!("{name:?} is not 1-63 characters of A-Z a-z 0-9 _ . -"),
        })
    }
}

/// An upstream must be renderable into a conninfo string and a one-line passfile entry.
pub(crate) fn validate_upstream(upstream: &Upstream) -> Result<(), PgError> {
    let bad = |detail: String| Err(PgError::InvalidReplicationSetting { what: "upstream", detail });
    let host = &upstream.host;
    let odd = |c: char| c.is_whitespace() || c.is_control();
    if host.is_empty() || host.len() > 255 || host.starts_with('-') || host.chars().any(odd) {
        return bad(format!("host {host:?} must be a host name or address without whitespace"));
    }
    if upstream.port == 0 {
        return bad("port must not be 0".into());
    }
    if upstream.password.chars().any(|c| matches!(c, '\n' | '\r' | '\0')) {
        // never echo the password itself
        return bad("the replication password must not contain line breaks or NUL".into());
    }
    Ok(())
}

/// Checks every value of `role` that is rendered into configuration files.
pub(crate) fn validate_role(role: &Role, application_name: &str) -> Result<(), PgError> {
    match role {
        Role::Primary { synchronous_standby_names } => {
            if synchronous_standby_names.chars().any(char::is_control) || synchronous_standby_names.len() > 4096 {
                return Err(PgError::InvalidReplicationSetting {
                    what: "synchronous_standby_names",
                    detail: format!("{synchronous_standby_names:?} contains control characters or is too long"),
                });
            }
            Ok(())
        }
        Role::Standby { upstream, slot_name } => {
            validate_member_name(application_name)?;
            validate_upstream(upstream)?;
            sql::validate_identifier("replication slot", slot_name)
        }
    }
}

fn sql_err(action: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> PgError {
    let action = action.into();
    move |source| PgError::Sql { action, source }
}

/// Text column holding an LSN (None for NULL or unparsable text).
fn lsn_col(row: &tokio_postgres::Row, idx: usize) -> Result<Option<u64>, PgError> {
    let text: Option<String> = row.try_get(idx).map_err(sql_err("reading replication status"))?;
    Ok(text.as_deref().and_then(parse_lsn))
}

/// Timeline from a WAL file name (`00000002000000000000000A` -> 2).
fn timeline_of_walfile(name: &str) -> Option<u32> {
    name.get(..8).and_then(|tli| u32::from_str_radix(tli, 16).ok())
}

/// State, position and (on a primary) connected standbys in one statement, so the
/// values belong together. Functions that fail in recovery are guarded by CASE.
const STATUS_QUERY: &str = "
WITH st AS MATERIALIZED (
    SELECT r.rec,
           CASE WHEN r.rec THEN NULL ELSE pg_walfile_name(c.cur) END AS walfile,
           c.cur::text AS current_lsn,
           pg_last_wal_receive_lsn()::text AS receive_lsn,
           pg_last_wal_replay_lsn()::text AS replay_lsn,
           (SELECT received_tli FROM pg_stat_wal_receiver WHERE received_tli > 0 LIMIT 1) AS received_tli,
           (SELECT timeline_id FROM pg_control_checkpoint()) AS checkpoint_tli
    FROM (SELECT pg_is_in_recovery() AS rec) AS r,
         LATERAL (SELECT CASE WHEN r.rec THEN NULL ELSE pg_current_wal_lsn() END AS cur) AS c
)
SELECT st.rec, st.walfile, st.current_lsn, st.receive_lsn, st.replay_lsn, st.received_tli, st.checkpoint_tli,
       rep.application_name, rep.sync_state, rep.flush_lsn::text, rep.replay_lsn::text
FROM st LEFT JOIN pg_stat_replication AS rep ON rep.state = 'streaming'
ORDER BY rep.application_name, rep.pid";

impl Instance {
    /// Sets the replication role and `application_name` (this member's name, used in
    /// `synchronous_standby_names` of the primary). Takes effect with the next
    /// [`Instance::write_config`] (reloadable: primary_conninfo, primary_slot_name and
    /// synchronous_standby_names need no restart). Until a role is set, `write_config`
    /// renders no replication settings and leaves `standby.signal` as it is.
    pub fn set_role(&self, role: Role, application_name: &str) {
        let kind = match &role {
            Role::Primary { .. } => "primary",
            Role::Standby { .. } => "standby",
        };
        let upstream = match &role {
            Role::Standby { upstream, .. } => upstream.endpoint(),
            Role::Primary { .. } => String::new(),
        };
        let new = RoleConfig { role, application_name: application_name.to_string() };
        let mut guard = self.replication.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if guard.as_ref() != Some(&new) {
            tracing::info!(cluster_id = %self.spec.cluster_id, role = kind, application_name, upstream = %upstream,
                "replication role set");
        }
        *guard = Some(new);
    }

    /// The role last given to [`Instance::set_role`] (None: never set, replication
    /// settings are left unmanaged).
    pub fn role(&self) -> Option<Role> {
        self.role_config().map(|c| c.role)
    }

    /// This member's `application_name` as last given to [`Instance::set_role`].
    pub fn application_name(&self) -> Option<String> {
        self.role_config().map(|c| c.application_name)
    }

    pub(crate) fn role_config(&self) -> Option<RoleConfig> {
        self.replication.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// On a primary: create or update [`REPLICATION_ROLE`] (LOGIN REPLICATION, the SCRAM
    /// verifier given) idempotently, and grant it the file-access functions pg_rewind
    /// needs on its source, so neither standbys nor rewinds need the superuser. Commits
    /// locally (`synchronous_commit = local`): standbys cannot acknowledge before this
    /// role exists.
    pub async fn ensure_replication_role(&self, password_scram: &str) -> Result<(), PgError> {
        sql::check_verifier(REPLICATION_ROLE, password_scram)?;
        let client = self.superuser_client().await?;
        self.require_primary(&client, "create the replication role").await?;
        client.batch_execute("SET synchronous_commit = local").await.map_err(sql_err("setting synchronous_commit"))?;
        let exists = super::database::role_exists(&client, REPLICATION_ROLE)
            .await
            .map_err(sql_err("looking up the replication role"))?;
        let mut created = false;
        if !exists {
            match client.batch_execute(&sql::create_replication_role(REPLICATION_ROLE, password_scram)).await {
                Ok(()) => created = true,
                Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => {}
                Err(e) => return Err(sql_err("creating the replication role")(e)),
            }
        }
        if !created {
            client
                .batch_execute(&sql::alter_replication_role(REPLICATION_ROLE, password_scram))
                .await
                .map_err(sql_err("updating the replication role"))?;
        }
        for grant in sql::replication_role_grants(REPLICATION_ROLE) {
            client.batch_execute(&grant).await.map_err(sql_err("granting the replication role's functions"))?;
        }
        tracing::info!(cluster_id = %self.spec.cluster_id, role = REPLICATION_ROLE, created, "replication role ensured");
        Ok(())
    }

    /// On a primary: make sure physical slots with these names exist
    /// (`pg_create_physical_replication_slot(name, true)`, so WAL is reserved from
    /// now on); other slots are kept. Names are validated as identifiers.
    pub async fn ensure_slots(&self, names: &[String]) -> Result<(), PgError> {
        for name in names {
            sql::validate_identifier("replication slot", name)?;
        }
        let client = self.superuser_client().await?;
        let rows = client
            .query("SELECT slot_name::text, slot_type FROM pg_replication_slots", &[])
            .await
            .map_err(sql_err("listing replication slots"))?;
        let mut existing = Vec::new();
        for row in &rows {
            let name: String = row.try_get(0).map_err(sql_err("listing replication slots"))?;
            let kind: String = row.try_get(1).map_err(sql_err("listing replication slots"))?;
            existing.push((name, kind));
        }
        for name in names {
            match existing.iter().find(|(n, _)| n == name) {
                Some((_, kind)) if kind == "physical" => continue,
                Some((_, kind)) => {
                    return Err(PgError::InvalidReplicationSetting {
                        what: "replication slot",
                        detail: format!("slot {name} exists but is a {kind} slot; drop it or choose another name"),
                    })
                }
                None => {}
            }
            let created =
                client.execute("SELECT pg_create_physical_replication_slot($1, true)", &[&name.as_str()]).await;
            match created {
                Ok(_) => tracing::info!(cluster_id = %self.spec.cluster_id, slot = %name, "created replication slot"),
                Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => {}
                Err(e) => return Err(sql_err(format!("creating replication slot {name}"))(e)),
            }
        }
        Ok(())
    }

    /// Drop physical slots whose name starts with "steward_" and is not in `keep` (and
    /// is not active), so WAL kept for departed members is released. Returns the
    /// names dropped; a slot that became active meanwhile is skipped.
    pub async fn drop_slots_except(&self, keep: &[String]) -> Result<Vec<String>, PgError> {
        let client = self.superuser_client().await?;
        let rows = client
            .query("SELECT slot_name::text FROM pg_replication_slots WHERE slot_type = 'physical' AND NOT active", &[])
            .await
            .map_err(sql_err("listing replication slots"))?;
        let mut dropped = Vec::new();
        for row in &rows {
            let name: String = row.try_get(0).map_err(sql_err("listing replication slots"))?;
            if !name.starts_with(SLOT_PREFIX) || keep.contains(&name) {
                continue;
            }
            match client.execute("SELECT pg_drop_replication_slot($1)", &[&name.as_str()]).await {
                Ok(_) => {
                    tracing::info!(cluster_id = %self.spec.cluster_id, slot = %name, "dropped replication slot");
                    dropped.push(name);
                }
                Err(e) if matches!(e.code(), Some(c) if *c == SqlState::OBJECT_IN_USE || *c == SqlState::UNDEFINED_OBJECT) =>
                {
                    tracing::info!(cluster_id = %self.spec.cluster_id, slot = %name, error = %sql::describe(&e),
                        "slot became active or vanished; not dropped");
                }
                Err(e) => return Err(sql_err(format!("dropping replication slot {name}"))(e)),
            }
        }
        Ok(dropped)
    }

    /// Role, timeline and LSNs from one superuser query; works on primary and standby.
    pub async fn replication_status(&self) -> Result<ReplicationStatus, PgError> {
        let client = self.superuser_client().await?;
        let rows = client.query(STATUS_QUERY, &[]).await.map_err(sql_err("reading replication status"))?;
        let Some(first) = rows.first() else {
            return Ok(ReplicationStatus::default());
        };
        const READING: &str = "reading replication status";
        let in_recovery: bool = first.try_get(0).map_err(sql_err(READING))?;
        let walfile: Option<String> = first.try_get(1).map_err(sql_err(READING))?;
        let current = lsn_col(first, 2)?;
        let receive = lsn_col(first, 3)?;
        let replay = lsn_col(first, 4)?;
        let received_tli: Option<i32> = first.try_get(5).map_err(sql_err(READING))?;
        let checkpoint_tli: Option<i32> = first.try_get(6).map_err(sql_err(READING))?;
        let tli = |v: Option<i32>| v.and_then(|t| u32::try_from(t).ok()).filter(|t| *t > 0);

        let mut status = ReplicationStatus { in_recovery, ..ReplicationStatus::default() };
        if in_recovery {
            status.timeline = tli(received_tli).or(tli(checkpoint_tli)).unwrap_or(0);
            status.replayed_lsn = replay.unwrap_or(0);
            status.received_lsn = receive.unwrap_or(status.replayed_lsn).max(status.replayed_lsn);
        } else {
            status.timeline = walfile.as_deref().and_then(timeline_of_walfile).or(tli(checkpoint_tli)).unwrap_or(0);
            status.received_lsn = current.unwrap_or(0);
            status.replayed_lsn = status.received_lsn;
            for row in &rows {
                let name: Option<String> = row.try_get(7).map_err(sql_err("reading pg_stat_replication"))?;
                let Some(application_name) = name else { continue };
                let sync_state: Option<String> = row.try_get(8).map_err(sql_err("reading pg_stat_replication"))?;
                status.standbys.push(StandbyState {
                    application_name,
                    sync_state: sync_state.unwrap_or_default(),
                    flush_lsn: lsn_col(row, 9)?.unwrap_or(0),
                    replay_lsn: lsn_col(row, 10)?.unwrap_or(0),
                });
            }
        }
        Ok(status)
    }

    /// `pg_is_in_recovery()` over `client`: true on a standby.
    pub(crate) async fn in_recovery(&self, client: &tokio_postgres::Client) -> Result<bool, PgError> {
        client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .and_then(|r| r.try_get(0))
            .map_err(sql_err("checking pg_is_in_recovery()"))
    }

    /// Errors with [`PgError::NotPrimary`] if the server is in recovery.
    pub(crate) async fn require_primary(&self, client: &tokio_postgres::Client, action: &str) -> Result<(), PgError> {
        if self.in_recovery(client).await? {
            return Err(PgError::NotPrimary { action: action.into(), data_dir: self.spec.data_dir.clone() });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::pg::scram_verifier;
    use crate::pg::test_support::{binaries, instance, spec_in, StopGuard};

    #[test]
    fn lsn_round_trip() {
        assert_eq!(parse_lsn("0/3000148"), Some(0x0300_0148));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374_D848));
        assert_eq!(parse_lsn("FFFFFFFF/FFFFFFFF"), Some(u64::MAX));
        assert_eq!(parse_lsn(" 1/0 "), Some(1 << 32));
        for bad in ["", "0", "/1", "1/", "x/1", "1/2/3", "+1/2", "123456789/0", "0/-1"] {
            assert_eq!(parse_lsn(bad), None, "{bad}");
        }
        for v in [0, 1, 0x0300_0148, (0x16 << 32) | 0xB374_D848, u64::MAX] {
            assert_eq!(parse_lsn(&format_lsn(v)), Some(v));
        }
        assert_eq!(format_lsn(0x0300_0148), "0/3000148");
        assert_eq!(format_lsn((0x16 << 32) | 0xB374_D848), "16/B374D848");
    }

    #[test]
    fn walfile_timeline_and_redacted_debug() {
        assert_eq!(timeline_of_walfile("00000002000000000000000A"), Some(2));
        assert_eq!(timeline_of_walfile("0000000A"), Some(10));
        assert_eq!(timeline_of_walfile("xyz"), None);
        let up = Upstream { host: "h".into(), port: 1, password: "hunter2".into() };
        assert!(!format!("{up:?}").contains("hunter2"));
        let role = Role::Standby { upstream: up, slot_name: "steward_b".into() };
        assert!(!format!("{role:?}").contains("hunter2"));
    }

    #[test]
    fn member_names() {
        for ok in ["a", "h2", "agent-1.dc_a", &"x".repeat(63)] {
            assert!(validate_member_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a'b", "a\"b", "é", &"x".repeat(64)] {
            assert!(validate_member_name(bad).is_err(), "{bad}");
        }
    }

    /// Polls `check` until it returns Some or `what` times out after 60 s.
    async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = check().await {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The value of `t.v` for `id` on `inst`, if the row is there.
    async fn read_row(inst: &Instance, id: i32) -> Option<String> {
        let client = inst.superuser_client().await.ok()?;
        let row = client.query_opt("SELECT v FROM t WHERE id = $1", &[&id]).await.ok()??;
        row.try_get(0).ok()
    }

    async fn insert_row(inst: &Instance, id: i32, v: &str) {
        let client = inst.superuser_client().await.unwrap();
        client.execute("INSERT INTO t (id, v) VALUES ($1, $2)", &[&id, &v]).await.unwrap();
    }

    fn upstream_of(inst: &Instance, password: &str) -> Upstream {
        Upstream { host: "127.0.0.1".into(), port: inst.spec().port, password: password.into() }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn clone_failover_and_rewind_with_real_postgres() {
        let _ = tracing_subscriber::fmt().with_env_filter("steward_agent=info").with_test_writer().try_init();
        let Some((bins, run_as)) = binaries() else { return };
        let tmp = tempfile::Builder::new().prefix("steward-repl").tempdir_in("/tmp").unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let password = r"repl:pass\word 'x'";
        let verifier = scram_verifier(password);

        // 1. primary A, synchronous with B
        let a = instance(spec_in(&tmp.path().join("a"), "repl-test"), &bins, &run_as);
        let _guard_a = StopGuard::for_instance(&a);
        assert!(a.ensure_initialized().await.unwrap());
        a.set_role(Role::Primary { synchronous_standby_names: "ANY 1 (\"b\")".into() }, "a");
        assert!(a.write_config().await.unwrap());
        a.start().await.unwrap();
        a.ensure_replication_role(&verifier).await.unwrap();
        a.ensure_replication_role(&verifier).await.unwrap(); // idempotent
        a.ensure_slots(&["steward_b".to_string()]).await.unwrap();
        a.ensure_slots(&["steward_b".to_string()]).await.unwrap();
        assert!(a.ensure_slots(&["Bad-Name".to_string()]).await.is_err());
        // commits locally even though the synchronous standby is not there yet
        let latency = a.write_probe(Duration::from_secs(5)).await.unwrap();
        assert!(latency < Duration::from_secs(5));
        a.write_probe(Duration::from_secs(5)).await.unwrap();

        // a clone from a slot that does not exist fails and leaves nothing behind
        let c = instance(spec_in(&tmp.path().join("c"), "repl-test"), &bins, &run_as);
        let _guard_c = StopGuard::for_instance(&c);
        let err = c.clone_from(&upstream_of(&a, password), "steward_missing", "c").await.unwrap_err();
        assert!(matches!(err, PgError::CloneFailed { .. }), "{err}");
        assert!(!c.is_initialized());
        assert!(crate::pg::paths::is_missing_or_empty(&c.spec().data_dir).unwrap());
        assert!(!tmp.path().join("c").join("data.steward-clone").exists());

        // 2. standby B cloned from A
        let b = instance(spec_in(&tmp.path().join("b"), "repl-test"), &bins, &run_as);
        let _guard_b = StopGuard::for_instance(&b);
        assert!(b.clone_from(&upstream_of(&a, password), "steward_b", "b").await.unwrap());
        assert!(b.is_standby_configured());
        let passfile = b.passfile_path();
        assert!(!passfile.starts_with(&b.spec().data_dir));
        let meta = fs::metadata(&passfile).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::mode(&meta) & 0o777, 0o600);
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), run_as.uid);
        let conf = fs::read_to_string(b.spec().data_dir.join("steward.conf")).unwrap();
        assert!(conf.contains("primary_slot_name = 'steward_b'"), "{conf}");
        assert!(!conf.contains(password));
        // configuration alone never turns a standby into a primary
        let standby_role = b.role().unwrap();
        b.set_role(Role::Primary { synchronous_standby_names: String::new() }, "b");
        assert!(matches!(b.write_config().await, Err(PgError::StillStandby { .. })));
        assert!(b.is_standby_configured());
        b.set_role(standby_role, "b");
        b.start().await.unwrap();
        assert!(!b.clone_from(&upstream_of(&a, password), "steward_b", "b").await.unwrap()); // idempotent

        let standby = wait_for("b streaming synchronously from a", || async {
            let st = a.replication_status().await.ok()?;
            st.standbys.into_iter().find(|s| s.application_name == "b" && ["quorum", "sync"].contains(&&*s.sync_state))
        })
        .await;
        assert!(standby.flush_lsn > 0);
        {
            // the standby streams over TLS
            let client = a.superuser_client().await.unwrap();
            let row = client
                .query_one(
                    "SELECT count(*), count(*) FILTER (WHERE s.ssl)
                     FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)",
                    &[],
                )
                .await
                .unwrap();
            let (all, encrypted): (i64, i64) = (row.get(0), row.get(1));
            assert_eq!((all, encrypted), (1, 1));
        }
        {
            let client = a.superuser_client().await.unwrap();
            // normal (synchronous) commits: they wait for b
            client.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)").await.unwrap();
        }
        insert_row(&a, 1, "from a").await;
        let v = wait_for("row 1 on b", || read_row(&b, 1)).await;
        assert_eq!(v, "from a");
        let st_a = a.replication_status().await.unwrap();
        assert!(!st_a.in_recovery);
        assert_eq!(st_a.timeline, 1);
        assert_eq!(st_a.received_lsn, st_a.replayed_lsn);
        let st_b = b.replication_status().await.unwrap();
        assert!(st_b.in_recovery, "{st_b:?}");
        assert_eq!(st_b.timeline, 1);
        assert!(st_b.replayed_lsn > 0 && st_b.received_lsn >= st_b.replayed_lsn, "{st_b:?}");
        assert!(st_b.standbys.is_empty());
        let err = b.write_probe(Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, PgError::NotPrimary { .. }), "{err}");
        assert!(matches!(b.ensure_replication_role(&verifier).await, Err(PgError::NotPrimary { .. })));

        // 3. B goes down; A commits one more row locally (lost in the failover), then is fenced
        b.stop().await.unwrap();
        {
            let client = a.superuser_client().await.unwrap();
            client.batch_execute("SET synchronous_commit = local; INSERT INTO t VALUES (99, 'lost')").await.unwrap();
        }
        a.stop_immediate().await.unwrap();
        a.stop_immediate().await.unwrap(); // not running: Ok
        assert!(!a.is_running().await);
        // B is promoted (started as a standby first, since it is down)
        b.promote("").await.unwrap();
        assert!(b.is_running().await);
        b.promote("").await.unwrap(); // idempotent
        assert!(!b.is_standby_configured());
        assert_eq!(b.role(), Some(Role::Primary { synchronous_standby_names: String::new() }));
        let st_b = b.replication_status().await.unwrap();
        assert!(!st_b.in_recovery);
        assert_eq!(st_b.timeline, 2);
        insert_row(&b, 2, "from b").await;
        b.write_probe(Duration::from_secs(5)).await.unwrap();

        // 4. A rewound to follow B
        b.ensure_slots(&["steward_a".to_string()]).await.unwrap();
        a.rewind_from(&upstream_of(&b, password), "steward_a", "a").await.unwrap();
        assert!(a.is_standby_configured());
        a.start().await.unwrap();
        insert_row(&b, 3, "after rewind").await;
        let v = wait_for("row 3 on a", || read_row(&a, 3)).await;
        assert_eq!(v, "after rewind");
        assert_eq!(read_row(&a, 2).await.as_deref(), Some("from b"));
        assert_eq!(read_row(&a, 99).await, None, "the rewind must undo A's divergent commit");
        let st_a = a.replication_status().await.unwrap();
        assert!(st_a.in_recovery);
        assert_eq!(st_a.timeline, 2);
        wait_for("a listed by b", || async {
            let st = b.replication_status().await.ok()?;
            st.standbys.iter().any(|s| s.application_name == "a").then_some(())
        })
        .await;

        // slots work on a standby too (for cascading); the one A had as a primary did not survive the rewind
        a.ensure_slots(&["steward_cascade".to_string()]).await.unwrap();
        assert_eq!(a.drop_slots_except(&[]).await.unwrap(), vec!["steward_cascade".to_string()]);

        // slots: B keeps the active steward_a and drops an unused one
        b.ensure_slots(&["steward_gone".to_string()]).await.unwrap();
        assert_eq!(b.drop_slots_except(&["steward_x".to_string()]).await.unwrap(), vec!["steward_gone".to_string()]);
        assert!(b.drop_slots_except(&[]).await.unwrap().is_empty());

        // 5. stuck primary: the probe times out and the fence still stops it (SIGKILL after pg_ctl gives up)
        a.stop().await.unwrap();
        let pid_text = fs::read_to_string(b.spec().data_dir.join("postmaster.pid")).unwrap();
        let postmaster = crate::pg::lifecycle::parse_pid_file(&pid_text).unwrap().pid;
        let _cont = ContinueGuard(postmaster);
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(postmaster), nix::sys::signal::Signal::SIGSTOP).unwrap();
        let started = Instant::now();
        let err = b.write_probe(Duration::from_millis(300)).await.unwrap_err();
        assert!(matches!(err, PgError::ProbeTimeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
        b.stop_immediate().await.unwrap();
        wait_for("b's postmaster gone", || async { (!b.is_running().await).then_some(()) }).await;
    }

    /// Resumes a SIGSTOPped process even when an assertion fails.
    struct ContinueGuard(i32);

    impl Drop for ContinueGuard {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0), nix::sys::signal::Signal::SIGCONT);
        }
    }
}
