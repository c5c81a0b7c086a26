//! The network-namespace lab: three hosts on a bridge reach each other and the root namespace;
//! partitions (both ways and one way), freezing and killing a host behave as documented; and
//! dropping the lab leaves no namespace or link behind. Needs root, `ip`, `tc` and `python3`.
//! All traffic goes to the lab's own addresses.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use steward_tests::netns::{output_within, Host, Lab};
use steward_tests::{wait_for, Scratch};

/// GETs argv[1] with a timeout of argv[2] seconds, ignoring any proxy settings.
const HTTP_GET: &str = r#"
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    body = opener.open(sys.argv[1], timeout=float(sys.argv[2])).read()
    print("ok", len(body))
except Exception as e:
    print("error:", repr(e))
    sys.exit(1)
"#;

/// Appends every UDP datagram received on argv[1]:argv[2] as a line to the file argv[3].
const UDP_SINK: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    data, _ = s.recvfrom(2048)
    with open(sys.argv[3], "a") as f:
        f.write(data.decode() + "\n")
"#;

/// Sends argv[3] as one UDP datagram to argv[1]:argv[2].
const UDP_SEND: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
"#;

const HTTP_PORT: u16 = 8080;
const UDP_PORT: u16 = 9999;
/// The HTTP client's own timeout; a request that fails must fail about this fast.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

fn python(from: Option<&Host>, script: &str, args: &[&str]) -> Command {
    let mut all = vec!["-c", script];
    all.extend_from_slice(args);
    match from {
        Some(h) => h.command("python3", all),
        None => {
            let mut c = Command::new("python3");
            c.args(all);
            c
        }
    }
}

/// GET `url` from inside `from` (the root namespace if `None`); Err says why it failed.
fn get(from: Option<&Host>, url: &str) -> Result<()> {
    let t = CLIENT_TIMEOUT.as_secs_f64().to_string();
    let out = output_within(&mut python(from, HTTP_GET, &[url, &t]), CLIENT_TIMEOUT * 4)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "GET {url}: {} {}", stdout.trim(), String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

/// Asserts that a GET of `url` from `from` fails, and fails within the client timeout (plus
/// interpreter start-up), i.e. by timing out or being refused rather than hanging.
fn assert_get_fails(from: Option<&Host>, url: &str, why: &str) -> Result<()> {
    let t = Instant::now();
    if get(from, url).is_ok() {
        bail!("GET {url} succeeded although {why}");
    }
    ensure!(t.elapsed() < CLIENT_TIMEOUT * 3, "GET {url} took {:?} to fail ({why})", t.elapsed());
    Ok(())
}

async fn wait_get(from: Option<&Host>, url: &str, what: &str) -> Result<()> {
    wait_for(what, Duration::from_secs(20), || async { Ok(get(from, url).ok()) }).await
}

/// Sends UDP datagrams from `from` to `to`'s sink until `sink_file` shows one (bounded by the
/// deadline of `wait_for`).
async fn wait_udp(from: &Host, to: &Host, sink_file: &std::path::Path, tag: &str) -> Result<()> {
    let ip = to.ip.to_string();
    let port = UDP_PORT.to_string();
    wait_for(&format!("UDP {tag} from {} to {}", from.name, to.name), Duration::from_secs(10), || async {
        output_within(&mut python(Some(from), UDP_SEND, &[&ip, &port, tag]), Duration::from_secs(10))?;
        let seen = std::fs::read_to_string(sink_file).unwrap_or_default();
        Ok(seen.lines().any(|l| l == tag).then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_hosts_reach_each_other_and_faults_behave() -> Result<()> {
    let scratch = Scratch::new("steward-netns-")?;
    let mut lab = Lab::new()?;
    let h1 = lab.host(1)?;
    let h2 = lab.host(2)?;
    let h3 = lab.host(3)?;
    eprintln!("lab {} bridge {} ({}), hosts {} {} {}", lab.id(), lab.bridge(), lab.bridge_ip(), h1.ip, h2.ip, h3.ip);
    for l in lab.links() {
        ensure!(l.len() <= 15, "link name {l} too long");
    }

    // An HTTP server in h2 (http.server serves the scratch directory).
    let dir = scratch.path().display().to_string();
    let h2_ip = h2.ip.to_string();
    let server = h2.spawn(
        "http-h2",
        "python3",
        ["-m", "http.server", "--bind", &h2_ip, &HTTP_PORT.to_string(), "--directory", &dir],
        &scratch.path().join("http-h2.log"),
    )?;
    let url = format!("http://{}/", h2.addr(HTTP_PORT));
    wait_get(Some(&h1), &url, "h2's HTTP server, from h1").await?;
    get(None, &url).context("root namespace -> h2")?;
    get(Some(&h3), &url).context("h3 -> h2")?;
    let server_pid = server.pid().and_then(|p| i32::try_from(p).ok()).context("server pid")?;
    ensure!(h2.pids()?.contains(&server_pid), "h2's pids {:?} lack the server {server_pid}", h2.pids()?);
    ensure!(h1.pids()?.is_empty(), "h1 runs {:?}", h1.pids()?);

    // Full partition of h2, both directions; then healed.
    h2.partition()?;
    assert_get_fails(Some(&h1), &url, "h2 is partitioned")?;
    assert_get_fails(None, &url, "h2 is partitioned")?;
    h2.heal()?;
    wait_get(Some(&h1), &url, "h2 again after heal, from h1").await?;
    get(None, &url).context("root namespace -> h2 after heal")?;

    // One-way partitions, checked with UDP in the direction that stays open.
    let sink1 = scratch.path().join("udp-h1.txt");
    let sink2 = scratch.path().join("udp-h2.txt");
    let (h1_ip, port) = (h1.ip.to_string(), UDP_PORT.to_string());
    let s1 = sink1.display().to_string();
    let s2 = sink2.display().to_string();
    let _udp1 = h1.spawn("udp-h1", "python3", ["-c", UDP_SINK, &h1_ip, &port, &s1], &scratch.path().join("u1.log"))?;
    let _udp2 = h2.spawn("udp-h2", "python3", ["-c", UDP_SINK, &h2_ip, &port, &s2], &scratch.path().join("u2.log"))?;
    wait_udp(&h1, &h2, &sink2, "warmup-1to2").await?;
    wait_udp(&h2, &h1, &sink1, "warmup-2to1").await?;

    h2.partition_outbound()?;
    assert_get_fails(Some(&h1), &url, "h2's outbound packets are dropped")?;
    wait_udp(&h1, &h2, &sink2, "h2-out-cut-still-receives").await?;
    h2.heal_outbound()?;
    wait_get(Some(&h1), &url, "h2 after heal_outbound, from h1").await?;

    h2.partition_inbound()?;
    assert_get_fails(Some(&h1), &url, "h2's inbound packets are dropped")?;
    assert_get_fails(None, &url, "h2's inbound packets are dropped")?;
    wait_udp(&h2, &h1, &sink1, "h2-in-cut-still-sends").await?;
    h2.heal_inbound()?;
    wait_get(Some(&h1), &url, "h2 after heal_inbound, from h1").await?;

    // Frozen host: the kernel may accept the TCP connection but nobody answers.
    h2.freeze()?;
    assert_get_fails(Some(&h1), &url, "h2 is frozen")?;
    h2.thaw()?;
    wait_get(Some(&h1), &url, "h2 after thaw, from h1").await?;

    // Delay needs sch_netem, which not every kernel has.
    match h2.delay(300) {
        Ok(()) => {
            let t = Instant::now();
            get(Some(&h1), &url)?;
            ensure!(t.elapsed() >= Duration::from_millis(300), "delayed GET took only {:?}", t.elapsed());
            h2.clear_delay()?;
        }
        Err(e) => eprintln!("delay not available here: {e:#}"),
    }

    // Host death.
    h2.kill_all()?;
    ensure!(h2.pids()?.is_empty(), "h2 still runs {:?}", h2.pids()?);
    assert_get_fails(Some(&h1), &url, "h2's processes are dead")?;

    // Dropping the lab removes everything, processes included (h1's UDP sink still runs).
    ensure!(!h1.pids()?.is_empty(), "h1's UDP sink is gone early");
    let namespaces = lab.namespaces();
    let links = lab.links();
    drop(lab);
    let ns_list = String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output()?.stdout).into_owned();
    let link_list =
        String::from_utf8_lossy(&Command::new("ip").args(["-o", "link", "show"]).output()?.stdout).into_owned();
    for ns in &namespaces {
        ensure!(!ns_list.split_whitespace().any(|w| w == ns), "namespace {ns} survived the lab:\n{ns_list}");
    }
    for l in &links {
        let named = |line: &str| line.split(": ").nth(1).map(|n| n.split('@').next() == Some(l.as_str()));
        ensure!(!link_list.lines().any(|line| named(line) == Some(true)), "link {l} survived the lab:\n{link_list}");
    }
    Ok(())
}
