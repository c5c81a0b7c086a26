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
    use tokio::sync::Semaphore;

    /// Polls `cond` until it holds (bounded: 10 s).
    async fn until(what: &str, cond: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// A caller's answer, bounded: a caller left without a round would otherwise hang the test.
    async fn answer(t: tokio::task::JoinHandle<Option<u64>>) -> Option<u64> {
        tokio::time::timeout(Duration::from_secs(10), t).await.expect("the caller got no answer in 10 s").unwrap()
    }

    /// Callers that arrive while a round runs do not get its result: they all share the next
    /// round, which starts only after the running one ends. 50 callers, exactly 2 rounds.
    #[tokio::test]
    async fn callers_share_the_round_after_the_running_one() {
        let c: Arc<Coalescer<u64>> = Arc::new(Coalescer::default());
        let started = Arc::new(AtomicU64::new(0));
        // Each round takes one permit before it answers: the test decides when rounds end.
        let gate = Arc::new(Semaphore::new(0));
        let call = |c: Arc<Coalescer<u64>>| {
            let (started, gate) = (started.clone(), gate.clone());
            tokio::spawn(async move {
                c.join(move || {
                    let (started, gate) = (started.clone(), gate.clone());
                    Box::pin(async move {
                        let n = started.fetch_add(1, Ordering::SeqCst) + 1;
                        if let Ok(p) = gate.acquire().await {
                            p.forget();
                        }
                        n
                    })
                })
                .await
            })
        };
        let first = call(c.clone());
        until("the first round to start", || started.load(Ordering::SeqCst) == 1).await;
        let later: Vec<_> = (0..49).map(|_| call(c.clone())).collect();
        until("49 callers to queue", || c.rounds.lock().map(|r| r.waiters.len() == 49).unwrap_or(false)).await;
        gate.add_permits(2);
        assert_eq!(answer(first).await, Some(1));
        for t in later {
            assert_eq!(answer(t).await, Some(2), "a caller that arrived during round 1 got an older round");
        }
        assert_eq!(started.load(Ordering::SeqCst), 2, "50 callers should have shared 2 rounds");
        // Rounds stop when nobody waits, and a new caller starts a fresh one.
        until("the round task to stop", || c.rounds.lock().map(|r| !r.running).unwrap_or(false)).await;
        gate.add_permits(1);
        assert_eq!(answer(call(c.clone())).await, Some(3));
    }
}
