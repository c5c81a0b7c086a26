//! A client that keeps writing to a database the way an application following the platform
//! would: it connects with the database's current `connection.uri` from the REST API, inserts
//! one row at a time into `acks (id bigint primary key)`, and after an error asks the API again
//! (a move changes the URI). Every acknowledged insert is recorded with its time and the server
//! port that acknowledged it, so tests can check that nothing acknowledged was lost and measure
//! the write pause.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::Rest;

/// One acknowledged insert.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    pub at: Instant,
    pub id: i64,
    /// `inet_server_port()` of the server that acknowledged it.
    pub port: u16,
}

/// The running writer; [`UriWriter::stop`] ends it.
pub struct UriWriter {
    acks: Arc<Mutex<Vec<Ack>>>,
    stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl UriWriter {
    /// Starts writing to the database whose view is at any of `urls` (`.../v1/databases/<id>`
    /// on each control-plane node: the next is asked when one does not answer) with `token`. The
    /// table `acks (id bigint primary key)` must exist.
    pub fn start(rest: Rest, urls: Vec<String>, token: String) -> Self {
        let acks = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(run(rest, urls, token, acks.clone(), stop.clone()));
        UriWriter { acks, stop, task: Some(task) }
    }

    /// Acknowledged inserts so far.
    pub fn acks(&self) -> Vec<Ack> {
        self.acks.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn count(&self) -> usize {
        self.acks.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Stops writing and returns every acknowledged insert.
    pub async fn stop(mut self) -> Vec<Ack> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        self.acks()
    }
}

impl Drop for UriWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn current_uri(rest: &Rest, url: &str, token: &str) -> Result<String> {
    let (s, v) = rest.get(url, token).await?;
    anyhow::ensure!(s == 200, "get {url}: {s} {v}");
    v["connection"]["uri"].as_str().map(str::to_string).context("no connection uri")
}

async fn run(rest: Rest, urls: Vec<String>, token: String, acks: Arc<Mutex<Vec<Ack>>>, stop: Arc<AtomicBool>) {
    let mut next = 1i64;
    let mut node = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let url = &urls[node % urls.len().max(1)];
        let Ok(uri) = current_uri(&rest, url, &token).await else {
            node += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let connected = tokio::time::timeout(Duration::from_secs(3), crate::pg_connect_task(&uri)).await;
        let Ok(Ok((client, task))) = connected else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            let id = next;
            next += 1;
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                client.query_one("INSERT INTO acks (id) VALUES ($1) RETURNING inet_server_port()", &[&id]),
            )
            .await;
            match r {
                Ok(Ok(row)) => {
                    let port: Option<i32> = row.get(0);
                    let ack =
                        Ack { at: Instant::now(), id, port: port.and_then(|p| u16::try_from(p).ok()).unwrap_or(0) };
                    acks.lock().unwrap_or_else(|e| e.into_inner()).push(ack);
                }
                _ => break,
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        task.abort();
    }
}

/// The longest time between two consecutive acknowledgements by different servers: how long
/// writers waited while the database switched from one to the other.
pub fn switch_pause(acks: &[Ack]) -> Option<Duration> {
    acks.windows(2).filter(|w| w[0].port != w[1].port).map(|w| w[1].at.duration_since(w[0].at)).max()
}
