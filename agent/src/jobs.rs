//! Long jobs the control plane asked this agent for (backups, database restores), by operation
//! id: a job outlives the gRPC call that started it (a control-plane leader change retries the
//! call), so a repeated request joins the running job or gets its result instead of starting a
//! second one.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;

use tokio::sync::watch;

/// How many finished results are kept for late retries.
const KEEP_FINISHED: usize = 64;

type Outcome<T> = Option<Result<T, String>>;

/// Running and recently finished jobs with results of type `T`.
pub struct JobTable<T> {
    jobs: Mutex<Jobs<T>>,
}

impl<T> Default for JobTable<T> {
    fn default() -> Self {
        JobTable { jobs: Mutex::new(Jobs { by_id: HashMap::new(), finished: Vec::new() }) }
    }
}

struct Jobs<T> {
    by_id: HashMap<String, watch::Receiver<Outcome<T>>>,
    /// Finished ids, oldest first, so the map stays bounded.
    finished: Vec<String>,
}

impl<T: Clone + Send + Sync + 'static> JobTable<T> {
    /// Runs `job` under `operation_id` unless it runs already (or finished recently), and waits
    /// for its result. The job runs to its end even if every caller gives up.
    pub async fn run<F>(&self, operation_id: &str, job: F) -> Result<T, String>
    where
        F: Future<Output = Result<T, String>> + Send + 'static,
    {
        let mut rx = {
            let mut jobs = self.jobs.lock().map_err(|_| "job table poisoned".to_string())?;
            match jobs.by_id.get(operation_id) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    jobs.by_id.insert(operation_id.to_string(), rx.clone());
                    tokio::spawn(async move {
                        let outcome = job.await;
                        let _ = tx.send(Some(outcome));
                    });
                    rx
                }
            }
        };
        let outcome = loop {
            if let Some(o) = rx.borrow_and_update().clone() {
                break o;
            }
            if rx.changed().await.is_err() {
                break Err("the job ended without a result".to_string());
            }
        };
        self.finished(operation_id, outcome.is_ok());
        outcome
    }

    /// Remembers a success for late retries; forgets a failure, so a retry runs again.
    fn finished(&self, operation_id: &str, ok: bool) {
        let Ok(mut jobs) = self.jobs.lock() else { return };
        if !ok {
            jobs.by_id.remove(operation_id);
            return;
        }
        if !jobs.finished.iter().any(|id| id == operation_id) {
            jobs.finished.push(operation_id.to_string());
        }
        while jobs.finished.len() > KEEP_FINISHED {
            let old = jobs.finished.remove(0);
            jobs.by_id.remove(&old);
        }
    }
}

/// One lock per key (a move's operation id): steps of the same operation run one at a time, so
/// a retried call waits for the first and then finds its work done; other keys do not wait.
#[derive(Default)]
pub struct KeyedLocks {
    locks: Mutex<HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    /// Holds `key`'s lock until the guard drops.
    pub async fn lock(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            // Forget locks nobody holds or waits for, so the map stays small.
            locks.retain(|_, l| std::sync::Arc::strong_count(l) > 1);
            locks.entry(key.to_string()).or_default().clone()
        };
        lock.lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use steward_proto::v1::BackupReply;

    #[tokio::test]
    async fn a_repeated_request_joins_the_running_job() {
        let jobs = Arc::new(JobTable::<BackupReply>::default());
        let runs = Arc::new(AtomicU32::new(0));
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let counter = runs.clone();
        let job = move |label: &'static str, wait: Option<tokio::sync::oneshot::Receiver<()>>| {
            let runs = counter.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                if let Some(w) = wait {
                    let _ = w.await;
                }
                Ok(BackupReply { label: label.into(), ..Default::default() })
            }
        };
        let (j1, j2) = (jobs.clone(), jobs.clone());
        let f1 = job("a", Some(wait));
        let first = tokio::spawn(async move { j1.run("op-1", f1).await });
        tokio::task::yield_now().await;
        let second = tokio::spawn(async move { j2.run("op-1", async { Err("must not run".to_string()) }).await });
        tokio::task::yield_now().await;
        go.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap().label, "a");
        assert_eq!(second.await.unwrap().unwrap().label, "a");
        // finished: a late retry gets the same result without running again
        assert_eq!(jobs.run("op-1", async { Err("must not run".to_string()) }).await.unwrap().label, "a");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // a failure is forgotten, so the retry runs
        assert!(jobs.run("op-2", async { Err("disk full".to_string()) }).await.is_err());
        assert_eq!(jobs.run("op-2", job("b", None)).await.unwrap().label, "b");
    }
}
