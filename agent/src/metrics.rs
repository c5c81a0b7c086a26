//! Prometheus `/metrics` of one agent, over plain HTTP on `--metrics-listen` (off unless set).
//!
//! Everything exported is already known to the agent: the monitor's last observation of each
//! instance (role, timeline, LSNs, `pg_stat_archiver` read every few seconds on primaries), the
//! durable records (fenced), the leases, the heartbeat loop's counters and this host's
//! certificate. Rendering never queries PostgreSQL, so a scrape adds no database load, and
//! nothing secret (passwords, keys, tokens) is ever part of the output. The listener answers
//! `GET /metrics` only; any other path or method gets 404.

use std::collections::HashMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::host::Host;

/// Why the metrics listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("binding the metrics listener on {addr}: {source} (is the port taken? change --metrics-listen)")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// Heartbeat outcomes of one agent, counted by the heartbeat loop and exported as counters.
#[derive(Debug, Default)]
pub struct HeartbeatCounters {
    /// Registrations and heartbeats the control plane answered.
    pub sent: AtomicU64,
    /// Calls that failed (node down, not the leader, timeout).
    pub failed: AtomicU64,
}

impl HeartbeatCounters {
    /// Counts one answered registration or heartbeat.
    pub fn answered(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one failed call.
    pub fn failed(&self) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }
}

/// The counters of the agent with this host id. Keyed by host id rather than global, because
/// `steward-controlplane dev` runs several agents in one process.
pub fn heartbeat_counters(host_id: &str) -> Arc<HeartbeatCounters> {
    static ALL: OnceLock<Mutex<HashMap<String, Arc<HeartbeatCounters>>>> = OnceLock::new();
    let all = ALL.get_or_init(Default::default);
    let mut map = match all.lock() {
        Ok(m) => m,
        Err(poisoned) => poisoned.into_inner(),
    };
    map.entry(host_id.to_string()).or_default().clone()
}

/// What one scrape exports, gathered from the host without touching PostgreSQL.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub version: String,
    pub host_id: String,
    pub zone: String,
    /// Major version of the PostgreSQL binaries found at start (0: none).
    pub pg_major: u32,
    /// Seconds until this host's certificate expires (negative once expired).
    pub cert_expiry_seconds: i64,
    pub heartbeats_sent: u64,
    pub heartbeat_failures: u64,
    pub uptime_seconds: u64,
    pub instances: Vec<InstanceMetrics>,
}

/// One instance's numbers, as the monitor last saw them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InstanceMetrics {
    pub cluster: String,
    pub running: bool,
    /// `primary`, `standby` or `stopped`.
    pub role: String,
    pub timeline: u32,
    /// Standbys: WAL received but not replayed yet, in bytes.
    pub replay_lag_bytes: Option<u64>,
    /// Primaries: whether the last write probe committed in time.
    pub probe_ok: Option<bool>,
    pub fenced: bool,
    /// HA primaries: milliseconds left on the lease (0 when it ran out).
    pub lease_remaining_ms: Option<u64>,
    /// Primaries that archive WAL: what `pg_stat_archiver` said.
    pub archive: Option<ArchiveMetrics>,
}

/// A primary's WAL archiving, from `pg_stat_archiver` and its `.ready` files.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ArchiveMetrics {
    pub failures: u64,
    pub queue: u64,
    /// Unix seconds of the last archived file (0: never).
    pub last_success_unix: i64,
}

/// Gathers a [`Snapshot`] of `host`: the same statuses the heartbeat carries, plus leases.
pub async fn snapshot(host: &Host) -> Snapshot {
    let statuses = host.statuses().await;
    let (host_id, records) = {
        let st = host.state.lock().await;
        (st.host_id.clone(), st.clusters.clone())
    };
    let now = Instant::now();
    let leases: HashMap<String, u64> = {
        let rt = host.runtime.lock().await;
        records
            .iter()
            .filter(|(_, rec)| rec.is_primary() && rec.lease_ms > 0)
            .map(|(id, _)| {
                let lease = rt.get(id).map(|r| r.lease).unwrap_or_default();
                let until =
                    [lease.control_plane_until, lease.peers_until, lease.boot_grace_until].into_iter().flatten().max();
                let left = until.map(|u| u.saturating_duration_since(now).as_millis()).unwrap_or(0);
                (id.clone(), u64::try_from(left).unwrap_or(u64::MAX))
            })
            .collect()
    };
    let counters = heartbeat_counters(&host_id);
    let instances = statuses
        .into_iter()
        .map(|s| {
            let primary = s.running && s.role == "primary";
            InstanceMetrics {
                running: s.running,
                timeline: s.timeline,
                replay_lag_bytes: (s.running && s.role == "standby")
                    .then(|| s.received_lsn.saturating_sub(s.replayed_lsn)),
                probe_ok: primary.then_some(s.probe_ok),
                fenced: s.fenced,
                lease_remaining_ms: leases.get(&s.cluster_id).copied(),
                archive: (primary && s.archiving).then_some(ArchiveMetrics {
                    failures: s.archive_failures,
                    queue: s.archive_queue,
                    last_success_unix: s.archive_last_success_unix,
                }),
                role: s.role,
                cluster: s.cluster_id,
            }
        })
        .collect();
    Snapshot {
        version: env!("CARGO_PKG_VERSION").to_string(),
        host_id,
        zone: host.cfg.zone.clone(),
        pg_major: host.pg_major,
        cert_expiry_seconds: seconds_until(host.tls.not_after(), SystemTime::now()),
        heartbeats_sent: counters.sent.load(Ordering::Relaxed),
        heartbeat_failures: counters.failed.load(Ordering::Relaxed),
        uptime_seconds: host.started.elapsed().as_secs(),
        instances,
    }
}

/// Whole seconds from `now` to `at`, negative when `at` has passed.
pub fn seconds_until(at: SystemTime, now: SystemTime) -> i64 {
    match at.duration_since(now) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// A label value with `\`, `"` and newlines escaped, as the text format requires.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Writes `# HELP` and `# TYPE` of one metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Writes one sample with its labels.
fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {value}");
    } else {
        let _ = writeln!(out, "{name}{{{}}} {value}", labels.join(","));
    }
}

/// One per-instance family: name, type, help, and its value for an instance at a Unix time
/// (None: the instance has no such series).
type InstanceFamily = (&'static str, &'static str, &'static str, fn(&InstanceMetrics, i64) -> Option<String>);

/// Roles an instance is reported in, each as its own 0/1 series so a change shows in both.
const ROLES: [&str; 3] = ["primary", "standby", "stopped"];

/// Renders a snapshot in the Prometheus text format (version 0.0.4).
pub fn render(s: &Snapshot, now_unix: i64) -> String {
    let mut out = String::new();
    let host = s.host_id.as_str();
    family(&mut out, "steward_agent_up", "gauge", "1 while the agent serves metrics.");
    sample(&mut out, "steward_agent_up", &[], 1);
    family(&mut out, "steward_agent_info", "gauge", "Agent version, host id, zone and PostgreSQL major (value 1).");
    let pg_major = s.pg_major.to_string();
    sample(
        &mut out,
        "steward_agent_info",
        &[("version", &s.version), ("host", host), ("zone", &s.zone), ("pg_major", &pg_major)],
        1,
    );
    family(&mut out, "steward_agent_uptime_seconds", "gauge", "Seconds since the agent started.");
    sample(&mut out, "steward_agent_uptime_seconds", &[("host", host)], s.uptime_seconds);
    family(
        &mut out,
        "steward_agent_heartbeats_total",
        "counter",
        "Registrations and heartbeats the control plane answered.",
    );
    sample(&mut out, "steward_agent_heartbeats_total", &[("host", host)], s.heartbeats_sent);
    family(
        &mut out,
        "steward_agent_heartbeat_failures_total",
        "counter",
        "Registrations and heartbeats that failed (node down, not the leader, timeout).",
    );
    sample(&mut out, "steward_agent_heartbeat_failures_total", &[("host", host)], s.heartbeat_failures);
    family(
        &mut out,
        "steward_agent_tls_cert_expiry_seconds",
        "gauge",
        "Seconds until this host's TLS certificate expires (renewed after two thirds of its life).",
    );
    sample(&mut out, "steward_agent_tls_cert_expiry_seconds", &[("host", host)], s.cert_expiry_seconds);
    family(&mut out, "steward_agent_instances", "gauge", "PostgreSQL instances this agent manages.");
    sample(&mut out, "steward_agent_instances", &[("host", host)], s.instances.len());

    let per_instance: [InstanceFamily; 10] = [
        ("steward_agent_instance_running", "gauge", "1 when the instance's postmaster runs.", |i, _| {
            Some(u8::from(i.running).to_string())
        }),
        ("steward_agent_instance_timeline", "gauge", "Timeline the instance writes (primary) or receives (standby).", |i, _| {
            i.running.then(|| i.timeline.to_string())
        }),
        (
            "steward_agent_instance_replication_lag_bytes",
            "gauge",
            "Standbys: WAL received but not yet replayed, in bytes (lag behind the primary: steward_member_lag_bytes on the control plane).",
            |i, _| i.replay_lag_bytes.map(|v| v.to_string()),
        ),
        (
            "steward_agent_instance_write_probe_ok",
            "gauge",
            "Primaries: 1 when the last write probe committed to local disk in time.",
            |i, _| i.probe_ok.map(|v| u8::from(v).to_string()),
        ),
        ("steward_agent_instance_fenced", "gauge", "1 when the instance is fenced (stopped until a newer epoch).", |i, _| {
            Some(u8::from(i.fenced).to_string())
        }),
        (
            "steward_agent_instance_lease_remaining_ms",
            "gauge",
            "HA primaries: milliseconds left on the lease (0: expired, the agent fences).",
            |i, _| i.lease_remaining_ms.map(|v| v.to_string()),
        ),
        (
            "steward_agent_instance_archive_failures_total",
            "counter",
            "Primaries: failed archive_command calls since pg_stat_archiver was reset.",
            |i, _| i.archive.map(|a| a.failures.to_string()),
        ),
        (
            "steward_agent_instance_archive_queue_files",
            "gauge",
            "Primaries: WAL files waiting to be archived (.ready files).",
            |i, _| i.archive.map(|a| a.queue.to_string()),
        ),
        (
            "steward_agent_instance_archive_last_success_unix",
            "gauge",
            "Primaries: Unix time of the last archived WAL file (0: never).",
            |i, _| i.archive.map(|a| a.last_success_unix.to_string()),
        ),
        (
            "steward_agent_instance_archive_last_success_age_seconds",
            "gauge",
            "Primaries: seconds since the last WAL file was archived (-1: never).",
            |i, now| {
                i.archive.map(|a| {
                    let age = if a.last_success_unix > 0 { (now - a.last_success_unix).max(0) } else { -1 };
                    age.to_string()
                })
            },
        ),
    ];
    for (name, kind, help, value) in per_instance {
        family(&mut out, name, kind, help);
        for i in &s.instances {
            let labels = [("cluster", i.cluster.as_str()), ("host", host)];
            if let Some(v) = value(i, now_unix) {
                sample(&mut out, name, &labels, v);
            }
        }
    }
    family(
        &mut out,
        "steward_agent_instance_role",
        "gauge",
        "1 for the instance's current role (primary, standby or stopped), 0 for the others.",
    );
    for i in &s.instances {
        let mut roles: Vec<&str> = ROLES.to_vec();
        if !roles.contains(&i.role.as_str()) {
            roles.push(i.role.as_str());
        }
        for role in roles {
            let labels = [("cluster", i.cluster.as_str()), ("host", host), ("role", role)];
            sample(&mut out, "steward_agent_instance_role", &labels, u8::from(role == i.role));
        }
    }
    out
}

/// The answer to anything but `GET /metrics`.
async fn not_found() -> impl IntoResponse {
    (StatusCode::NOT_FOUND, "not found: this listener serves GET /metrics only\n")
}

/// Produces the text of one scrape.
pub type RenderFn = Arc<dyn Fn() -> BoxFuture<'static, String> + Send + Sync>;

/// The metrics routes over any renderer (tests use a fixed one).
pub fn routes(render: RenderFn) -> Router {
    let metrics = get(move || {
        let render = render.clone();
        async move {
            let body = render().await;
            (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body)
        }
    })
    .fallback(not_found);
    Router::new().route("/metrics", metrics).fallback(not_found)
}

/// Renders `host`'s metrics now.
pub async fn render_host(host: &Host) -> String {
    let now_unix = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    render(&snapshot(host).await, i64::try_from(now_unix).unwrap_or(i64::MAX))
}

/// A bound metrics listener, not yet serving.
pub struct Listener {
    listener: tokio::net::TcpListener,
    addr: SocketAddr,
}

impl Listener {
    /// Binds `addr` (at start, so a taken port stops the agent with a clear error).
    pub async fn bind(addr: SocketAddr) -> Result<Self, MetricsError> {
        let listener =
            tokio::net::TcpListener::bind(addr).await.map_err(|source| MetricsError::Bind { addr, source })?;
        let addr = listener.local_addr().map_err(|source| MetricsError::Bind { addr, source })?;
        Ok(Self { listener, addr })
    }

    /// The address it listens on (the port the OS chose for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `host`'s metrics until `stop` turns true.
    pub async fn serve(self, host: Arc<Host>, stop: watch::Receiver<bool>) {
        let render: RenderFn = Arc::new(move || {
            let host = host.clone();
            Box::pin(async move { render_host(&host).await })
        });
        self.serve_with(render, stop).await
    }

    /// Serves what `render` produces until `stop` turns true.
    pub async fn serve_with(self, render: RenderFn, mut stop: watch::Receiver<bool>) {
        let shutdown = async move {
            while !*stop.borrow() {
                if stop.changed().await.is_err() {
                    break;
                }
            }
        };
        tracing::info!(addr = %self.addr, "serving Prometheus metrics on http://{}/metrics", self.addr);
        if let Err(e) = axum::serve(self.listener, routes(render)).with_graceful_shutdown(shutdown).await {
            tracing::error!(error = %e, "metrics listener failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A primary that archives and holds a lease, and a standby 4 KiB behind.
    fn sample_snapshot() -> Snapshot {
        Snapshot {
            version: "0.1.0".into(),
            host_id: "host-a".into(),
            zone: "a".into(),
            pg_major: 16,
            cert_expiry_seconds: 86_400,
            heartbeats_sent: 12,
            heartbeat_failures: 1,
            uptime_seconds: 30,
            instances: vec![
                InstanceMetrics {
                    cluster: "ha-1".into(),
                    running: true,
                    role: "primary".into(),
                    timeline: 2,
                    probe_ok: Some(true),
                    lease_remaining_ms: Some(2100),
                    archive: Some(ArchiveMetrics { failures: 0, queue: 1, last_success_unix: 990 }),
                    ..Default::default()
                },
                InstanceMetrics {
                    cluster: "ha-2".into(),
                    running: true,
                    role: "standby".into(),
                    timeline: 1,
                    replay_lag_bytes: Some(4096),
                    ..Default::default()
                },
            ],
        }
    }

    fn value(text: &str, series: &str) -> Option<String> {
        text.lines().find_map(|l| l.strip_prefix(series)).and_then(|r| r.strip_prefix(' ')).map(str::to_string)
    }

    #[test]
    fn renders_every_family_with_help_and_labels() {
        let text = render(&sample_snapshot(), 1000);
        assert_eq!(value(&text, "steward_agent_up").as_deref(), Some("1"));
        assert_eq!(
            value(&text, "steward_agent_instance_running{cluster=\"ha-1\",host=\"host-a\"}").as_deref(),
            Some("1")
        );
        assert_eq!(
            value(&text, "steward_agent_instance_role{cluster=\"ha-1\",host=\"host-a\",role=\"primary\"}").as_deref(),
            Some("1")
        );
        assert_eq!(
            value(&text, "steward_agent_instance_role{cluster=\"ha-2\",host=\"host-a\",role=\"primary\"}").as_deref(),
            Some("0")
        );
        assert_eq!(
            value(&text, "steward_agent_instance_replication_lag_bytes{cluster=\"ha-2\",host=\"host-a\"}").as_deref(),
            Some("4096")
        );
        assert_eq!(
            value(&text, "steward_agent_instance_archive_last_success_age_seconds{cluster=\"ha-1\",host=\"host-a\"}")
                .as_deref(),
            Some("10")
        );
        assert_eq!(
            value(&text, "steward_agent_instance_lease_remaining_ms{cluster=\"ha-1\",host=\"host-a\"}").as_deref(),
            Some("2100")
        );
        assert_eq!(value(&text, "steward_agent_heartbeats_total{host=\"host-a\"}").as_deref(), Some("12"));
        assert_eq!(value(&text, "steward_agent_tls_cert_expiry_seconds{host=\"host-a\"}").as_deref(), Some("86400"));
        // a standby has no lease, archive or probe series; a primary no replay lag
        assert!(!text.contains("steward_agent_instance_lease_remaining_ms{cluster=\"ha-2\""));
        assert!(!text.contains("steward_agent_instance_archive_failures_total{cluster=\"ha-2\""));
        assert!(!text.contains("steward_agent_instance_replication_lag_bytes{cluster=\"ha-1\""));
        // every sample belongs to a family announced with HELP and TYPE
        let announced: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap_or_default();
            assert!(announced.contains(&name), "{name} has no # TYPE");
        }
    }

    #[test]
    fn label_values_are_escaped_and_expiry_can_be_negative() {
        let mut s = sample_snapshot();
        s.host_id = "we\"ird\\host\n".into();
        let text = render(&s, 1000);
        assert!(text.contains("host=\"we\\\"ird\\\\host\\n\""), "{text}");
        let t0 = UNIX_EPOCH + std::time::Duration::from_secs(1000);
        assert_eq!(seconds_until(t0, t0 + std::time::Duration::from_secs(5)), -5);
        assert_eq!(seconds_until(t0 + std::time::Duration::from_secs(7), t0), 7);
    }

    #[test]
    fn counters_are_per_host() {
        heartbeat_counters("metrics-test-a").answered();
        heartbeat_counters("metrics-test-a").answered();
        heartbeat_counters("metrics-test-b").failed();
        assert_eq!(heartbeat_counters("metrics-test-a").sent.load(Ordering::Relaxed), 2);
        assert_eq!(heartbeat_counters("metrics-test-a").failed.load(Ordering::Relaxed), 0);
        assert_eq!(heartbeat_counters("metrics-test-b").failed.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn serves_get_metrics_only() {
        let listener = Listener::bind(([127, 0, 0, 1], 0).into()).await.unwrap();
        let addr = listener.addr();
        let (stop, rx) = watch::channel(false);
        let fixed: RenderFn = Arc::new(|| Box::pin(async { render(&sample_snapshot(), 1000) }));
        let server = tokio::spawn(listener.serve_with(fixed, rx));
        let http = reqwest::Client::new();
        let url = |p: &str| format!("http://{addr}{p}");
        let r = http.get(url("/metrics")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
        assert!(r.text().await.unwrap().contains("steward_agent_up 1"));
        for (method, path) in [
            (reqwest::Method::GET, "/"),
            (reqwest::Method::GET, "/metrics/x"),
            (reqwest::Method::GET, "/healthz"),
            (reqwest::Method::POST, "/metrics"),
            (reqwest::Method::DELETE, "/metrics"),
        ] {
            let r = http.request(method.clone(), url(path)).send().await.unwrap();
            assert_eq!(r.status(), 404, "{method} {path}");
        }
        stop.send(true).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), server).await.unwrap().unwrap();
    }
}
