//! Request limits of the REST API: a token bucket per caller (the hash of its bearer token, or
//! its address when it sends none) and a deadline per request, so one noisy client or one stuck
//! request cannot take the API from everyone else.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::auth::token_hash;
use super::error::ApiError;

/// Buckets kept before idle ones are dropped (bounds memory under a flood of random tokens).
const MAX_BUCKETS: usize = 10_000;

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Rate limit and request deadline of one node's REST API.
pub struct Limits {
    rate: f64,
    burst: f64,
    timeout: Duration,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl Limits {
    /// `rate` requests per second per caller, bursts of twice that; requests end after `timeout`.
    pub fn new(rate: u32, timeout: Duration) -> Self {
        let rate = f64::from(rate.max(1));
        Self { rate, burst: rate * 2.0, timeout, buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one request from `key`'s bucket, or says how many seconds until one is available.
    pub fn take(&self, key: &str, now: Instant) -> Result<(), u64> {
        let mut buckets = match self.buckets.lock() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        };
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(key) {
            let full_after = Duration::from_secs_f64(self.burst / self.rate);
            buckets.retain(|_, b| now.duration_since(b.last) < full_after);
        }
        let b = buckets.entry(key.to_string()).or_insert(Bucket { tokens: self.burst, last: now });
        let elapsed = now.duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - b.tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

/// The middleware: rate limit, then the request with a deadline.
pub async fn enforce(State(limits): State<Arc<Limits>>, req: Request, next: Next) -> Response {
    let key = match req.headers().get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        // Keyed by the hash: the bucket map never holds a usable token.
        Some(v) => format!("t:{}", token_hash(v)),
        None => match req.extensions().get::<ConnectInfo<SocketAddr>>() {
            Some(ConnectInfo(addr)) => format!("a:{}", addr.ip()),
            None => "a:unknown".to_string(),
        },
    };
    if let Err(wait) = limits.take(&key, Instant::now()) {
        return ApiError::TooManyRequests(wait).into_response();
    }
    match tokio::time::timeout(limits.timeout, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::Unavailable(format!(
            "the request did not finish within {} s; it may still take effect: check before retrying",
            limits.timeout.as_secs()
        ))
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_a_burst_then_the_rate() {
        let l = Limits::new(5, Duration::from_secs(1));
        let t0 = Instant::now();
        for _ in 0..10 {
            assert!(l.take("k", t0).is_ok());
        }
        assert_eq!(l.take("k", t0), Err(1));
        // another caller has its own bucket
        assert!(l.take("other", t0).is_ok());
        // 200 ms at 5/s refills one request
        assert!(l.take("k", t0 + Duration::from_millis(200)).is_ok());
        assert!(l.take("k", t0 + Duration::from_millis(200)).is_err());
    }
}
