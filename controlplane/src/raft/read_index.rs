//! Coalesced read-index rounds. A linearizable read needs one confirmation of leadership (a
//! heartbeat round to a quorum, or on a follower a `ReadIndex` call to the leader) that *starts
//! after* the read arrived. Reads that arrive while a round is running all share the next round,
//! so the cost is one round per round-trip time instead of one per read, and no read is answered
//! from a round that began before it.

use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use tokio::sync::oneshot;

struct Rounds<T> {
    running: bool,
    waiters: Vec<oneshot::Sender<T>>,
}

/// Shares rounds of an expensive check among concurrent callers; cheap to clone.
pub struct Coalescer<T> {
    rounds: Arc<Mutex<Rounds<T>>>,
}

impl<T> Default for Coalescer<T> {
    fn default() -> Self {
        Self { rounds: Arc::new(Mutex::new(Rounds { running: false, waiters: Vec::new() })) }
    }
}

impl<T: Clone + Send + 'static> Coalescer<T> {
    /// Waits for the result of a round that starts after this call. If no round is running, one
    /// starts now with `round`, and repeats while callers keep arriving. `None` only if the
    /// round's task died.
    pub async fn join<F>(&self, round: F) -> Option<T>
    where
        F: Fn() -> BoxFuture<'static, T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut r = self.rounds.lock().unwrap_or_else(|p| p.into_inner());
            r.waiters.push(tx);
            !std::mem::replace(&mut r.running, true)
        };
        if start {
            let rounds = self.rounds.clone();
            // A task, not the first caller's future: if that caller goes away (client
            // disconnected, request timed out), the others still get their answer.
            tokio::spawn(async move {
                loop {
                    let waiters = {
                        let mut r = rounds.lock().unwrap_or_else(|p| p.into_inner());
                        if r.waiters.is_empty() {
                            r.running = false;
                            break;
                        }
                        std::mem::take(&mut r.waiters)
                    };
                    let result = round().await;
                    for w in waiters {
                        let _ = w.send(result.clone());
                    }
                }
            });
        }
        rx.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    /// Many concurrent callers share few rounds, and each caller's round started after it
    /// arrived (its result is a round number at least as high as the rounds started before it).
    #[tokio::test]
    async fn callers_share_rounds_started_after_them() {
        let c: Arc<Coalescer<u64>> = Arc::new(Coalescer::default());
        let started = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (c, started) = (c.clone(), started.clone());
            tasks.push(tokio::spawn(async move {
                let seen_before = started.load(Ordering::SeqCst);
                let round_started = started.clone();
                let got = c
                    .join(move || {
                        let started = round_started.clone();
                        Box::pin(async move {
                            let n = started.fetch_add(1, Ordering::SeqCst) + 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            n
                        })
                    })
                    .await;
                (seen_before, got)
            }));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for t in tasks {
            let (before, got) = t.await.unwrap();
            let got = got.unwrap();
            assert!(got > before, "answered by round {got}, but {before} rounds had started before the call");
        }
        let rounds = started.load(Ordering::SeqCst);
        assert!(rounds < 25, "50 callers over ~50 ms should share rounds, got {rounds}");
    }
}
