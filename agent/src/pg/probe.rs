//! The write probe: proof that the primary can commit to its own disk right now,
//! so a lease holder with stuck storage is noticed and fenced instead of
//! silently accepting connections it cannot serve.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;

use super::{Instance, PgError};

/// Created once per instance object; lives in the `postgres` database, away from user data.
const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS public.steward_probe (id int PRIMARY KEY, at timestamptz)";

/// One row, rewritten each time: a real WAL write and flush, but no growth.
const UPSERT: &str = "INSERT INTO public.steward_probe (id, at) VALUES (1, now()) \
                      ON CONFLICT (id) DO UPDATE SET at = now()";

impl Instance {
    /// Proves the instance can commit a write to its own disk right now: upserts one
    /// row of `steward_probe` in the `postgres` database (creating the table once)
    /// with `synchronous_commit = local`, so only this host's WAL flush is measured,
    /// not the standbys. Everything, connecting included, must finish within
    /// `timeout` (client-side), so a stuck disk fails the probe in time. Returns the
    /// latency; on a standby fails with [`PgError::NotPrimary`].
    pub async fn write_probe(&self, timeout: Duration) -> Result<Duration, PgError> {
        let started = Instant::now();
        match tokio::time::timeout(timeout, self.probe_once()).await {
            Ok(Ok(())) => {
                let latency = started.elapsed();
                tracing::debug!(cluster_id = %self.spec.cluster_id, latency_ms = latency.as_secs_f64() * 1e3,
                    "write probe committed");
                Ok(latency)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => {
                tracing::warn!(cluster_id = %self.spec.cluster_id, timeout_ms = timeout.as_secs_f64() * 1e3,
                    "write probe timed out");
                Err(PgError::ProbeTimeout { data_dir: self.spec.data_dir.clone(), timeout })
            }
        }
    }

    async fn probe_once(&self) -> Result<(), PgError> {
        let client = self.superuser_client().await?;
        let not_primary =
            || PgError::NotPrimary { action: "run the write probe".into(), data_dir: self.spec.data_dir.clone() };
        let classify = |action: &str, e: tokio_postgres::Error| {
            if e.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION) {
                not_primary()
            } else {
                PgError::Sql { action: action.into(), source: e }
            }
        };
        client
            .batch_execute("SET synchronous_commit = local")
            .await
            .map_err(|e| classify("setting synchronous_commit", e))?;
        if !self.probe_table_ready.load(Ordering::SeqCst) {
            self.require_primary(&client, "run the write probe").await?;
            client.batch_execute(CREATE_TABLE).await.map_err(|e| classify("creating the probe table", e))?;
            self.probe_table_ready.store(true, Ordering::SeqCst);
        }
        match client.batch_execute(UPSERT).await {
            Ok(()) => Ok(()),
            Err(e) => {
                if e.code() == Some(&SqlState::UNDEFINED_TABLE) {
                    // dropped behind our back: recreate it next time
                    self.probe_table_ready.store(false, Ordering::SeqCst);
                }
                Err(classify("writing the probe row", e))
            }
        }
    }
}
