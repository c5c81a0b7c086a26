//! Backups: the leader schedules a full backup of every cluster that serves databases every
//! `full_every` and an incremental one every `incr_every` in between, with the retention of the
//! most demanding database on it (`backup_retention_days`). Each backup is a durable operation
//! in the Raft state, taken from a healthy standby when the cluster has one (the primary keeps
//! its I/O for clients), else from the primary; the agent expires what retention no longer
//! needs right after. A new leader resumes a running backup by asking the same agent again
//! with the same operation id, which joins the backup instead of starting another.

use std::time::Duration;

use chrono::{DateTime, Utc};
use steward_proto::v1::{BackupRequest, InstanceStatus};

use super::Ctx;
use crate::state::model::{cluster_state, host_state, member_role, op_kind, op_state, Backup, Operation};
use crate::state::query::{self, BackupHistory};
use crate::state::{Command, Response};

/// When backups are due.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackupPolicy {
    /// Interval between full backups; zero turns scheduled backups off.
    pub full_every: Duration,
    /// Interval between backups of any kind (incrementals in between fulls); zero: fulls only.
    pub incr_every: Duration,
    /// After a failed backup, wait this long before the scheduler tries again.
    pub retry_after: Duration,
}

impl Default for BackupPolicy {
    fn default() -> Self {
        BackupPolicy {
            full_every: Duration::from_secs(7 * 86_400),
            incr_every: Duration::from_secs(86_400),
            retry_after: Duration::from_secs(600),
        }
    }
}

/// Parses an interval such as `90s`, `15m`, `6h`, `7d` (or `0`/`off` for none).
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t == "0" || t.eq_ignore_ascii_case("off") {
        return Ok(Duration::ZERO);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("interval '{s}' must be a number with a unit, e.g. 6h or 7d"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("interval '{s}' needs a unit: s, m, h or d (e.g. 6h, 7d)")),
    };
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

fn older_than(at: Option<&str>, now: DateTime<Utc>, age: Duration) -> bool {
    match at.and_then(|t| DateTime::parse_from_rfc3339(t).ok()) {
        None => true,
        Some(t) => (now - t.with_timezone(&Utc)).to_std().map(|d| d >= age).unwrap_or(false),
    }
}

/// Which backup a cluster needs now, if any: `full` when it has no full backup younger than
/// `full_every`, `incr` when it has no backup younger than `incr_every`.
pub fn due(h: &BackupHistory, now: DateTime<Utc>, p: &BackupPolicy) -> Option<&'static str> {
    if p.full_every.is_zero() || h.running {
        return None;
    }
    if h.last_failure.as_deref().is_some_and(|f| !older_than(Some(f), now, p.retry_after))
        && h.last_failure.as_deref() > h.last_any.as_deref()
    {
        return None;
    }
    if older_than(h.last_full.as_deref(), now, p.full_every) {
        return Some("full");
    }
    if !p.incr_every.is_zero() && older_than(h.last_any.as_deref(), now, p.incr_every) {
        return Some("incr");
    }
    None
}

/// Starts the backups that are due. Runs on the leader; the operations do the work.
pub async fn schedule(ctx: &Ctx) -> Result<(), String> {
    let policy = ctx.backup_policy;
    if policy.full_every.is_zero() {
        return Ok(());
    }
    let pool = ctx.node.store.pool();
    // Three queries per pass whatever the number of clusters (thousands on a large fleet).
    let history: std::collections::HashMap<String, BackupHistory> = query::backup_history(pool)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|h| (h.cluster_id.clone(), h))
        .collect();
    let retention_of = query::active_retention_by_cluster(pool).await.map_err(|e| e.to_string())?;
    let now = Utc::now();
    for cluster in query::clusters(pool).await.map_err(|e| e.to_string())? {
        if cluster.state != cluster_state::READY || !archiving(ctx, &cluster.primary_host, &cluster.id) {
            continue;
        }
        let Some(&retention) = retention_of.get(&cluster.id) else { continue };
        let h = history
            .get(&cluster.id)
            .cloned()
            .unwrap_or_else(|| BackupHistory { cluster_id: cluster.id.clone(), ..Default::default() });
        if let Some(kind) = due(&h, now, &policy) {
            match start(ctx, &cluster.id, kind, retention, "schedule").await {
                Ok(id) => tracing::info!(cluster = %cluster.id, kind, op = %id, "scheduled backup started"),
                Err(e) => tracing::warn!(cluster = %cluster.id, error = %e, "starting a scheduled backup failed"),
            }
        }
    }
    Ok(())
}

/// Whether the primary's agent reports WAL archiving on (a backup without it is useless).
fn archiving(ctx: &Ctx, host_id: &str, cluster_id: &str) -> bool {
    ctx.liveness.instance(host_id, cluster_id).1.is_some_and(|i| i.running && i.archiving)
}

/// Records a new backup operation; returns its id. `Conflict` if one of the cluster runs.
pub async fn start(
    ctx: &Ctx,
    cluster_id: &str,
    kind: &str,
    retention_days: i64,
    requested_by: &str,
) -> Result<String, String> {
    let id = uuid::Uuid::new_v4().to_string();
    let at = crate::now();
    let backup = Backup {
        operation_id: id.clone(),
        cluster_id: cluster_id.to_string(),
        kind: kind.to_string(),
        kind_taken: String::new(),
        requested_by: requested_by.to_string(),
        retention_days,
        state: op_state::RUNNING.into(),
        host_id: String::new(),
        from_standby: false,
        label: String::new(),
        size_bytes: 0,
        stored_bytes: 0,
        stop_lsn: String::new(),
        error: String::new(),
        created_at: at.clone(),
        finished_at: String::new(),
    };
    let operation = Operation { id: id.clone(), ..Operation::start(op_kind::BACKUP, "", &at) };
    match ctx.node.write(Command::StartBackup { backup, operation }).await.map_err(|e| e.to_string())? {
        Response::Done => Ok(id),
        Response::Conflict { message } | Response::NotFound { message } => Err(message),
        other => Err(format!("unexpected result {other:?}")),
    }
}

/// Attempts before a backup operation is declared failed.
const MAX_ATTEMPTS: i64 = 3;

/// A backup may run this long before the control plane stops waiting for it.
const BACKUP_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// Step name recording the member a backup runs on, so a new leader asks the same one.
const STEP_PREFIX: &str = "backing_up_from:";

/// Drives one backup operation until it ends or this node stops leading.
pub async fn run(ctx: &Ctx, op: Operation) {
    let mut attempts = op.attempts;
    let mut host_hint = op.step.strip_prefix(STEP_PREFIX).map(str::to_string);
    loop {
        if !ctx.node.is_leader() {
            return;
        }
        let result = attempt(ctx, &op, attempts, host_hint.as_deref()).await;
        let finish = match result {
            Ok((host_id, reply)) => Command::FinishBackup {
                operation_id: op.id.clone(),
                succeeded: true,
                kind_taken: reply.kind.clone(),
                host_id,
                from_standby: reply.from_standby,
                label: reply.label.clone(),
                size_bytes: reply.size_bytes as i64,
                stored_bytes: reply.stored_bytes as i64,
                stop_lsn: reply.stop_lsn.clone(),
                error: reply.expire_error.clone(),
                at: crate::now(),
            },
            Err(Attempt::Abandon(why)) => {
                tracing::info!(op = %op.id, %why, "backup handed over");
                return;
            }
            Err(Attempt::Retry(error)) => {
                attempts += 1;
                ctx.metrics.agent_calls_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(op = %op.id, attempts, %error, "backup attempt failed");
                if attempts < MAX_ATTEMPTS {
                    host_hint = None; // another member may do better
                    super::retry_later(ctx, &op.id, "backup", attempts, error).await;
                    continue;
                }
                Command::FinishBackup {
                    operation_id: op.id.clone(),
                    succeeded: false,
                    kind_taken: String::new(),
                    host_id: String::new(),
                    from_standby: false,
                    label: String::new(),
                    size_bytes: 0,
                    stored_bytes: 0,
                    stop_lsn: String::new(),
                    error,
                    at: crate::now(),
                }
            }
        };
        let ok = matches!(finish, Command::FinishBackup { succeeded: true, .. });
        match ctx.node.write(finish).await {
            Ok(_) => {
                let outcome = if ok { "succeeded" } else { "failed" };
                tracing::info!(op = %op.id, outcome, "backup operation finished");
                return;
            }
            Err(e) => {
                tracing::warn!(op = %op.id, error = %e, "recording the backup's end failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

enum Attempt {
    Retry(String),
    Abandon(String),
}

/// The member to back up from: a running standby that keeps up with the primary (lag under
/// 64 MiB) on an active host, preferring `hint`; else the primary.
pub fn choose_source(
    members: &[(String, String, Option<InstanceStatus>)],
    primary_lsn: u64,
    hint: Option<&str>,
) -> Option<String> {
    let healthy_standby = |(_, role, st): &(String, String, Option<InstanceStatus>)| {
        role == member_role::STANDBY
            && st
                .as_ref()
                .is_some_and(|s| s.running && s.in_recovery && primary_lsn.saturating_sub(s.replayed_lsn) < (64 << 20))
    };
    if let Some(h) = hint {
        if members.iter().any(|m| m.0 == h && (healthy_standby(m) || m.1 == member_role::PRIMARY)) {
            return Some(h.to_string());
        }
    }
    members
        .iter()
        .filter(|m| healthy_standby(m))
        .map(|m| m.0.clone())
        .next()
        .or_else(|| members.iter().find(|m| m.1 == member_role::PRIMARY).map(|m| m.0.clone()))
}

async fn attempt(
    ctx: &Ctx,
    op: &Operation,
    attempts: i64,
    hint: Option<&str>,
) -> Result<(String, steward_proto::v1::BackupReply), Attempt> {
    let pool = ctx.node.store.pool();
    let read = |e: sqlx::Error| Attempt::Retry(format!("reading state: {e}"));
    let backup =
        query::backup(pool, &op.id).await.map_err(read)?.ok_or_else(|| Attempt::Abandon("backup vanished".into()))?;
    let cluster = query::cluster(pool, &backup.cluster_id)
        .await
        .map_err(read)?
        .ok_or_else(|| Attempt::Abandon("cluster vanished".into()))?;
    let members = query::members(pool, &cluster.id).await.map_err(read)?;
    let hosts = query::hosts(pool).await.map_err(read)?;
    let status = |host_id: &str| ctx.liveness.instance(host_id, &cluster.id).1;
    let active = |host_id: &str| hosts.iter().any(|h| h.id == host_id && h.state == host_state::ACTIVE);
    let primary_lsn = status(&cluster.primary_host).map(|s| s.received_lsn).unwrap_or(0);
    let candidates: Vec<_> = members
        .iter()
        .filter(|m| active(&m.host_id))
        .map(|m| (m.host_id.clone(), m.role.clone(), status(&m.host_id)))
        .collect();
    let source = choose_source(&candidates, primary_lsn, hint)
        .ok_or_else(|| Attempt::Retry(format!("cluster {} has no member on an active host", cluster.id)))?;
    let host = hosts.iter().find(|h| h.id == source).ok_or_else(|| Attempt::Abandon("host vanished".into()))?;
    let cmd = Command::UpdateOperation {
        id: op.id.clone(),
        step: format!("{STEP_PREFIX}{source}"),
        attempts,
        error: String::new(),
        at: crate::now(),
    };
    match ctx.node.write(cmd).await {
        Ok(Response::Done) => {}
        Ok(_) => return Err(Attempt::Abandon("operation is no longer running".into())),
        Err(e) => return Err(Attempt::Retry(e.to_string())),
    }
    let mut agent = ctx.agents.get(&host.agent_addr).await.map_err(|e| Attempt::Retry(e.to_string()))?;
    let mut req = tonic::Request::new(BackupRequest {
        cluster_id: cluster.id.clone(),
        epoch: cluster.epoch as u64,
        operation_id: op.id.clone(),
        kind: backup.kind.clone(),
        retention_days: u32::try_from(backup.retention_days.max(0)).unwrap_or(u32::MAX),
    });
    req.set_timeout(BACKUP_TIMEOUT);
    tracing::info!(op = %op.id, cluster = %cluster.id, host = %source, kind = %backup.kind, "backup running");
    let reply = agent
        .backup(req)
        .await
        .map_err(|s| Attempt::Retry(format!("agent {source} backup: {}", s.message())))?
        .into_inner();
    Ok((source, reply))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(full: Option<&str>, any: Option<&str>, failure: Option<&str>) -> BackupHistory {
        BackupHistory {
            cluster_id: "c".into(),
            last_full: full.map(Into::into),
            last_any: any.map(Into::into),
            last_failure: failure.map(Into::into),
            running: false,
        }
    }

    #[test]
    fn intervals_parse() {
        assert_eq!(parse_interval("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_interval("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert_eq!(parse_interval("off").unwrap(), Duration::ZERO);
        assert!(parse_interval("7").unwrap_err().contains("unit"));
        assert!(parse_interval("d").is_err());
        assert!(parse_interval("-1h").is_err());
    }

    #[test]
    fn schedule_follows_the_policy() {
        let p = BackupPolicy::default();
        let now: DateTime<Utc> = "2026-11-25T12:00:00Z".parse().unwrap();
        // never backed up: full
        assert_eq!(due(&hist(None, None, None), now, &p), Some("full"));
        // full 2 days ago, nothing since: incremental
        let two_days = "2026-11-23T12:00:00.000Z";
        assert_eq!(due(&hist(Some(two_days), Some(two_days), None), now, &p), Some("incr"));
        // incremental an hour ago: nothing
        assert_eq!(due(&hist(Some(two_days), Some("2026-11-25T11:00:00.000Z"), None), now, &p), None);
        // full 8 days ago: full again, even with a recent incremental
        assert_eq!(
            due(&hist(Some("2026-11-17T12:00:00.000Z"), Some("2026-11-25T11:00:00.000Z"), None), now, &p),
            Some("full")
        );
        // a failure 5 minutes ago holds the next try back; 20 minutes ago it does not
        assert_eq!(due(&hist(None, None, Some("2026-11-25T11:55:00.000Z")), now, &p), None);
        assert_eq!(due(&hist(None, None, Some("2026-11-25T11:40:00.000Z")), now, &p), Some("full"));
        // running: nothing; scheduling off: nothing
        assert_eq!(due(&BackupHistory { running: true, ..hist(None, None, None) }, now, &p), None);
        let off = BackupPolicy { full_every: Duration::ZERO, ..p };
        assert_eq!(due(&hist(None, None, None), now, &off), None);
    }

    #[test]
    fn backups_come_from_a_healthy_standby() {
        let st = |running, lag: u64| {
            Some(InstanceStatus { running, in_recovery: true, replayed_lsn: (1 << 30) - lag, ..Default::default() })
        };
        let primary =
            ("p".to_string(), "primary".to_string(), Some(InstanceStatus { running: true, ..Default::default() }));
        let lagging = ("s1".to_string(), "standby".to_string(), st(true, 1 << 28));
        let good = ("s2".to_string(), "standby".to_string(), st(true, 1 << 10));
        let stopped = ("s3".to_string(), "standby".to_string(), st(false, 0));
        let lsn = 1 << 30;
        let all = vec![primary.clone(), lagging.clone(), good.clone(), stopped.clone()];
        assert_eq!(choose_source(&all, lsn, None).as_deref(), Some("s2"));
        assert_eq!(choose_source(&[primary.clone(), lagging.clone(), stopped], lsn, None).as_deref(), Some("p"));
        // a new leader keeps the member a running backup was started on
        assert_eq!(choose_source(&all, lsn, Some("p")).as_deref(), Some("p"));
        assert_eq!(choose_source(&all, lsn, Some("s1")).as_deref(), Some("s2"));
        assert_eq!(choose_source(&[lagging], lsn, None), None);
    }
}
