//! What the backup repository holds for each primary on this host, for the control plane's
//! metrics: the age of the newest backup and the stanza's size. Reading manifests and walking the
//! repository is too slow for every heartbeat, so a loop refreshes it every 30 s.

use std::sync::Arc;
use std::time::Duration;

use crate::backup::{catalog, Repository};
use crate::host::Host;

/// How often the report is refreshed.
pub const INTERVAL: Duration = Duration::from_secs(30);

/// The newest backup's stop time (Unix seconds, 0 if none) and the stanza's bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StanzaReport {
    pub last_backup_unix: i64,
    pub bytes: u64,
}

/// Reads the report of one stanza.
pub async fn stanza_report(repo: &Repository, stanza: &str) -> Result<StanzaReport, crate::backup::BackupError> {
    let last = catalog::list(repo, stanza)
        .await?
        .iter()
        .filter_map(|m| chrono::DateTime::parse_from_rfc3339(&m.stopped_at).ok())
        .map(|t| t.timestamp())
        .max()
        .unwrap_or(0);
    Ok(StanzaReport { last_backup_unix: last, bytes: repo.size(stanza).await? })
}

/// Refreshes the report of every primary this host runs, forever.
pub async fn run(host: Arc<Host>) {
    let Some(archiving) = host.archiving.clone() else { return };
    let repo = match Repository::open(&archiving.repo) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "backup repository unusable: no backup metrics");
            return;
        }
    };
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        refresh(&host, &repo).await;
    }
}

/// One refresh.
async fn refresh(host: &Host, repo: &Repository) {
    let primaries: Vec<String> = {
        let rt = host.runtime.lock().await;
        rt.iter().filter(|(_, r)| r.status.role == "primary").map(|(id, _)| id.clone()).collect()
    };
    for id in primaries {
        match stanza_report(repo, &id).await {
            Ok(report) => {
                if let Some(r) = host.runtime.lock().await.get_mut(&id) {
                    r.repo_report = Some(report);
                }
            }
            Err(e) => tracing::warn!(cluster = %id, error = %e, "reading the backup repository failed"),
        }
    }
}
