//! Several "hosts" on one machine, each a Linux network namespace, for failover and chaos
//! tests that need to cut, freeze or kill a whole host. Needs root, `ip` and `tc`
//! (iproute2).
//!
//! # Topology and addressing
//!
//! A [`Lab`] has a numeric id, unique on the machine, reserved by creating the marker file
//! `/run/steward-labs/<id>.pid` (it holds the creating process's pid and start time). The id
//! picks the lab's /24: `10.<200 + id / 256>.<id % 256>.0/24`, so ids run from 0 to 14335 and
//! parallel labs (other test binaries, other threads) never share a subnet. A lab whose subnet
//! overlaps any address or non-default route that already exists in the root namespace is not
//! used. The lab owns, in the root namespace:
//!
//! - a bridge `stw<id>br` (STP off, no forward delay) with address `10.<a>.<b>.1/24`;
//!
//! and for every [`Lab::host`]`(n)`, `n` in `1..=244`:
//!
//! - a namespace `stw<id>h<n>` with loopback up;
//! - a veth pair: `stw<id>h<n>a` in the root namespace, a port of the bridge, and `eth0`
//!   inside the namespace with address `10.<a>.<b>.<10 + n>/24`.
//!
//! The root namespace reaches every host through the bridge (a server run there should listen
//! on [`Lab::bridge_ip`] or 0.0.0.0), and hosts reach each other and the root namespace through
//! the bridge. Nothing leaves the lab's subnet: the hosts' only other route is an
//! `unreachable default`, so a stray packet to any other address fails at once inside the host
//! instead of being handed to the root namespace; there is no NAT and no sysctl is changed.
//! Interface names stay within Linux's 15 characters (`stw14335h244a` is 13).
//!
//! # Faults
//!
//! - [`Host::partition`] / [`Host::heal`]: the root-side veth goes down / up, which cuts the
//!   host off from everyone in both directions (its own loopback still works).
//! - [`Host::partition_outbound`] / [`Host::heal_outbound`]: every IPv4/IPv6 packet the host
//!   sends is dropped (on the egress of its `eth0`), while it still receives.
//! - [`Host::partition_inbound`] / [`Host::heal_inbound`]: every packet sent to the host is
//!   dropped (on the egress of the root-side veth, i.e. towards the host), while what the host
//!   sends still gets out.
//! - One-way partitions let ARP through in both directions, so neighbours keep resolving each
//!   other and the open direction keeps working for as long as the partition lasts. They are
//!   built from an HTB qdisc whose default class does not exist and whose direct queue holds 0
//!   packets (so every unclassified packet is dropped), plus a u32 filter that sends ARP to a
//!   real class. `tc netem loss 100%` would be the obvious tool, but `sch_netem` (and the
//!   `gact` drop action) are missing from some kernels, including the one this harness runs
//!   on; HTB, u32 and veth are nearly always there.
//! - [`Host::delay`] adds latency to what the host sends with `netem`; it fails with a clear
//!   error where the kernel has no `sch_netem`. It shares the root qdisc of `eth0` with the
//!   outbound partition: `delay` refuses while the host is partitioned outbound, and
//!   `partition_outbound` replaces a delay (which `heal_outbound` does not restore).
//! - [`Host::freeze`] / [`Host::thaw`]: SIGSTOP / SIGCONT every process in the namespace (the
//!   kernel still completes TCP handshakes on its listening sockets, but nothing answers).
//! - [`Host::kill_all`]: SIGKILL every process in the namespace (host death).
//!
//! # Cleanup
//!
//! Dropping a [`Lab`] (also during a panic's unwinding, or when the test returns an error)
//! SIGKILLs every process in its namespaces and waits up to 5 s for `ip netns pids` to come back
//! empty, deletes the root-side veths (which takes the namespace ends with them), the
//! namespaces and the bridge, and finally its marker file. [`Lab::cleanup`] does the same
//! explicitly and reports errors. A process that died without unwinding (SIGKILL, abort)
//! leaves its lab behind: [`sweep_stale`], which [`Lab::new`] calls first, removes every
//! namespace and link named `stw<id>...` whose marker is missing or names a process that is no
//! longer alive (pid and start time compared). Nothing else is ever touched: only names
//! matching `stw<digits>br`, `stw<digits>h<digits>` and `stw<digits>h<digits>a`. Reserving
//! ids and sweeping hold an exclusive `flock` on `/run/steward-labs/.lock`, so a sweep in
//! one process never races another process's new lab.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::Proc;

/// Directory of the labs' marker files and lock.
pub const MARKER_DIR: &str = "/run/steward-labs";
/// Highest host number: its address `10.<a>.<b>.<10 + n>` must stay below .255.
pub const MAX_HOST: u8 = 244;

const PREFIX: &str = "stw";
/// Lab ids map to 10.200.0.0/24 ..= 10.255.255.0/24.
const ID_SPACE: u32 = 56 * 256;
const SECOND_OCTET_BASE: u32 = 200;
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
const LOCK_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(20);
/// Same environment as [`Proc::spawn`] gives workspace binaries.
const RUST_LOG: &str = "info,openraft=info,sqlx=warn,h2=warn,tower=warn,hyper=warn";

// ---------------------------------------------------------------------------------------------
// Running commands

/// `program arg...` for error messages.
fn cmdline(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(char::is_whitespace) {
            parts.push(format!("{a:?}"));
        } else {
            parts.push(a.into_owned());
        }
    }
    parts.join(" ")
}

/// Runs `cmd` to completion; a failure names the command line and its stderr. Returns stdout.
fn run(cmd: &mut Command) -> Result<String> {
    let line = cmdline(cmd);
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running `{line}`"))?;
    if !out.status.success() {
        bail!("`{line}` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// `tc [-n ns] args...`.
fn tc(netns: Option<&str>, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("tc");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    run(cmd.args(args))
}

/// Runs `cmd` (stdin null, stdout and stderr captured) and waits at most `timeout` for it;
/// on timeout the child is SIGKILLed and an error names the command line.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let line = cmdline(cmd);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning `{line}`"))?;
    let pid = Pid::from_raw(i32::try_from(child.id()).context("child pid out of range")?);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.with_context(|| format!("waiting for `{line}`")),
        Err(_) => {
            // The child is not reaped until the waiting thread returns, so the pid is still ours.
            let _ = kill(pid, Signal::SIGKILL);
            let _ = rx.recv_timeout(KILL_TIMEOUT);
            bail!("`{line}` did not finish within {timeout:?}")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

/// The process's state letter from /proc (`R`, `S`, `T`, `Z`...), `None` if it is gone.
fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// The process's start time (clock ticks since boot), `None` if it is gone.
fn proc_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after "(comm)" start at field 3 (state); starttime is field 22.
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// Sends `sig` to `pid`; a process that is already gone is not an error. Never signals init
/// or this process.
fn signal(pid: i32, sig: Signal) -> Result<()> {
    if pid <= 1 || u32::try_from(pid).is_ok_and(|p| p == std::process::id()) {
        bail!("refusing to send {sig} to pid {pid}");
    }
    match kill(Pid::from_raw(pid), sig) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(anyhow!("sending {sig} to pid {pid}: {e}")),
    }
}

/// Every process in namespace `ns` (zombies are not listed).
fn netns_pids(ns: &str) -> Result<Vec<i32>> {
    let out = ip(&["netns", "pids", ns])?;
    out.split_whitespace().map(|p| p.parse::<i32>().with_context(|| format!("`ip netns pids {ns}`: {p:?}"))).collect()
}

/// SIGKILLs everything in `ns` until `ip netns pids` is empty, for at most [`KILL_TIMEOUT`].
fn kill_netns_processes(ns: &str) -> Result<()> {
    let deadline = Instant::now() + KILL_TIMEOUT;
    loop {
        let pids = netns_pids(ns)?;
        if pids.is_empty() {
            return Ok(());
        }
        for &p in &pids {
            signal(p, Signal::SIGKILL)?;
        }
        if Instant::now() > deadline {
            bail!("processes {pids:?} in namespace {ns} still alive {KILL_TIMEOUT:?} after SIGKILL");
        }
        std::thread::sleep(POLL);
    }
}

// ---------------------------------------------------------------------------------------------
// Names, markers and the lock

fn bridge_name(id: u32) -> String {
    format!("{PREFIX}{id}br")
}

fn ns_name(id: u32, n: u8) -> String {
    format!("{PREFIX}{id}h{n}")
}

fn veth_name(id: u32, n: u8) -> String {
    format!("{PREFIX}{id}h{n}a")
}

/// Second and third octets of lab `id`'s subnet.
fn subnet_octets(id: u32) -> (u8, u8) {
    let a = u8::try_from(SECOND_OCTET_BASE + id / 256).unwrap_or(u8::MAX);
    let b = u8::try_from(id % 256).unwrap_or(0);
    (a, b)
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit())
}

/// The lab id of a name this module creates (`stw<id>br`, `stw<id>h<n>`, `stw<id>h<n>a`);
/// `None` for any other name.
fn parse_lab_id(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    let (id, tail) = rest.split_at(digits);
    if !all_digits(id) {
        return None;
    }
    let ok = tail == "br"
        || tail.strip_prefix('h').is_some_and(|h| all_digits(h) || h.strip_suffix('a').is_some_and(all_digits));
    if !ok {
        return None;
    }
    id.parse().ok()
}

fn marker_path(id: u32) -> PathBuf {
    Path::new(MARKER_DIR).join(format!("{id}.pid"))
}

/// Whether the process that created lab `id`'s marker is still running.
fn marker_owner_alive(id: u32) -> bool {
    let Ok(text) = std::fs::read_to_string(marker_path(id)) else { return false };
    let mut it = text.split_whitespace();
    let (Some(pid), Some(start)) =
        (it.next().and_then(|p| p.parse::<i32>().ok()), it.next().and_then(|s| s.parse::<u64>().ok()))
    else {
        return false;
    };
    proc_start_time(pid) == Some(start)
}

/// Holds the exclusive lock on `MARKER_DIR/.lock` while alive.
struct LabLock(#[allow(dead_code)] Flock<File>);

fn lock_labs() -> Result<LabLock> {
    std::fs::create_dir_all(MARKER_DIR).with_context(|| format!("creating {MARKER_DIR}"))?;
    let path = Path::new(MARKER_DIR).join(".lock");
    let deadline = Instant::now() + LOCK_TIMEOUT;
    loop {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(LabLock(lock)),
            Err((_, Errno::EWOULDBLOCK)) if Instant::now() < deadline => std::thread::sleep(POLL * 5),
            Err((_, e)) => bail!("locking {}: {e} (waited up to {LOCK_TIMEOUT:?})", path.display()),
        }
    }
}

/// Creates lab `id`'s marker for this process; `false` if it exists already. Caller holds the
/// lock.
fn reserve(id: u32, _lock: &LabLock) -> Result<bool> {
    let me = i32::try_from(std::process::id()).context("pid out of range")?;
    let start = proc_start_time(me).context("reading this process's start time from /proc")?;
    let path = marker_path(id);
    match OpenOptions::new().write(true).create_new(true).open(&path) {
        Ok(mut f) => {
            f.write_all(format!("{me} {start}\n").as_bytes()).with_context(|| format!("writing {}", path.display()))?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(anyhow!("creating {}: {e}", path.display())),
    }
}

// ---------------------------------------------------------------------------------------------
// Listing and removing objects

/// Names of all network namespaces (`ip netns list`).
fn list_netns() -> Result<Vec<String>> {
    Ok(ip(&["netns", "list"])?.lines().filter_map(|l| l.split_whitespace().next()).map(String::from).collect())
}

/// Names of all links in this process's namespace (`ip -o link show`).
fn list_links() -> Result<Vec<String>> {
    Ok(ip(&["-o", "link", "show"])?
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect())
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn join_errors(what: &str, errors: Vec<anyhow::Error>) -> Result<()> {
    if errors.is_empty() {
        return Ok(());
    }
    let msgs: Vec<String> = errors.iter().map(|e| format!("{e:#}")).collect();
    bail!("{what}: {}", msgs.join("; "))
}

/// Removes every namespace and root-namespace link of lab `id` that exists now, killing the
/// namespaces' processes first, then the marker once nothing is left.
fn destroy_lab(id: u32) -> Result<()> {
    let mut errors = Vec::new();
    let namespaces: Vec<String> = list_netns()?.into_iter().filter(|n| parse_lab_id(n) == Some(id)).collect();
    let links: Vec<String> = list_links()?.into_iter().filter(|n| parse_lab_id(n) == Some(id)).collect();
    for ns in &namespaces {
        if let Err(e) = kill_netns_processes(ns) {
            errors.push(e);
        }
    }
    // Veths first (their namespace ends go with them, synchronously), then the bridge.
    let bridge = bridge_name(id);
    for link in links.iter().filter(|l| **l != bridge).chain(links.iter().filter(|l| **l == bridge)) {
        if let Err(e) = ip(&["link", "del", "dev", link]) {
            if link_exists(link) {
                errors.push(e);
            }
        }
    }
    for ns in &namespaces {
        if let Err(e) = ip(&["netns", "del", ns]) {
            if netns_exists(ns) {
                errors.push(e);
            }
        }
    }
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let left: Vec<&String> = links.iter().filter(|l| link_exists(l)).collect();
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            errors.push(anyhow!("links {left:?} still exist {SETTLE_TIMEOUT:?} after deletion"));
            break;
        }
        std::thread::sleep(POLL);
    }
    if errors.is_empty() {
        let marker = marker_path(id);
        if let Err(e) = std::fs::remove_file(&marker) {
            if e.kind() != std::io::ErrorKind::NotFound {
                errors.push(anyhow!("removing {}: {e}", marker.display()));
            }
        }
    }
    join_errors(&format!("cleaning up netns lab {id}"), errors)
}

fn sweep_locked(_lock: &LabLock) -> Result<usize> {
    let mut ids = BTreeSet::new();
    ids.extend(list_netns()?.iter().filter_map(|n| parse_lab_id(n)));
    ids.extend(list_links()?.iter().filter_map(|n| parse_lab_id(n)));
    if let Ok(entries) = std::fs::read_dir(MARKER_DIR) {
        for e in entries.flatten() {
            let name = e.file_name();
            if let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".pid")).and_then(|n| n.parse::<u32>().ok()) {
                ids.insert(id);
            }
        }
    }
    let mut swept = 0;
    let mut errors = Vec::new();
    for id in ids {
        if marker_owner_alive(id) {
            continue;
        }
        match destroy_lab(id) {
            Ok(()) => swept += 1,
            Err(e) => errors.push(e),
        }
    }
    join_errors("sweeping stale netns labs", errors)?;
    Ok(swept)
}

/// Removes what earlier runs left behind: every namespace and link named like a lab's
/// (`stw<id>br`, `stw<id>h<n>`, `stw<id>h<n>a`) and every marker in [`MARKER_DIR`] whose lab's
/// creating process is no longer alive (or has no marker). Returns how many labs were removed.
pub fn sweep_stale() -> Result<usize> {
    let lock = lock_labs()?;
    sweep_locked(&lock)
}

/// IPv4 prefixes (address, length) of every address and route in this namespace, default
/// routes excluded.
fn used_prefixes() -> Result<Vec<(u32, u8)>> {
    let mut text = ip(&["-4", "-o", "addr", "show"])?;
    text.push('\n');
    text.push_str(&ip(&["-4", "route", "show", "table", "all"])?);
    let mut out = Vec::new();
    for tok in text.split_whitespace() {
        let (addr, len) = match tok.split_once('/') {
            Some((a, l)) => (a, l.parse::<u8>().ok()),
            None => (tok, Some(32)),
        };
        let (Ok(addr), Some(len)) = (addr.parse::<Ipv4Addr>(), len) else { continue };
        if len == 0 || len > 32 {
            continue;
        }
        out.push((u32::from(addr), len));
    }
    Ok(out)
}

fn overlaps((a, alen): (u32, u8), (b, blen): (u32, u8)) -> bool {
    let len = alen.min(blen);
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
    a & mask == b & mask
}

// ---------------------------------------------------------------------------------------------
// Lab

/// A bridge in the root namespace plus hosts in their own namespaces; see the module doc.
pub struct Lab {
    id: u32,
    bridge: String,
    bridge_ip: Ipv4Addr,
    hosts: Vec<Host>,
    cleaned: bool,
}

static LAB_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Lab {
    /// Sweeps stale labs ([`sweep_stale`]), reserves a fresh id and subnet and creates the
    /// bridge. Needs root.
    pub fn new() -> Result<Self> {
        ensure!(nix::unistd::geteuid().is_root(), "a netns lab needs root (network namespaces, veths, bridges)");
        let lock = lock_labs()?;
        sweep_locked(&lock)?;
        let used = used_prefixes()?;
        let mut taken: BTreeSet<u32> = BTreeSet::new();
        taken.extend(list_netns()?.iter().filter_map(|n| parse_lab_id(n)));
        taken.extend(list_links()?.iter().filter_map(|n| parse_lab_id(n)));

        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u64(LAB_COUNTER.fetch_add(1, Ordering::Relaxed));
        let start = u32::try_from(h.finish() % u64::from(ID_SPACE)).unwrap_or(0);
        for i in 0..ID_SPACE {
            let id = (start + i) % ID_SPACE;
            let (a, b) = subnet_octets(id);
            let net = (u32::from(Ipv4Addr::new(10, a, b, 0)), 24);
            if taken.contains(&id) || used.iter().any(|p| overlaps(*p, net)) || !reserve(id, &lock)? {
                continue;
            }
            drop(lock);
            // From here on, Drop removes whatever exists of the lab.
            let mut lab = Self {
                id,
                bridge: bridge_name(id),
                bridge_ip: Ipv4Addr::new(10, a, b, 1),
                hosts: Vec::new(),
                cleaned: false,
            };
            lab.create_bridge()?;
            return Ok(lab);
        }
        bail!("no free netns lab id: every 10.200-255.x.0/24 is in use on this machine")
    }

    fn create_bridge(&mut self) -> Result<()> {
        let br = self.bridge.as_str();
        ip(&["link", "add", "name", br, "type", "bridge", "stp_state", "0", "forward_delay", "0"])?;
        ip(&["addr", "add", &format!("{}/24", self.bridge_ip), "dev", br])?;
        ip(&["link", "set", "dev", br, "up"])?;
        Ok(())
    }

    /// Creates host `n` (`1..=`[`MAX_HOST`]): namespace, veth pair on the bridge, address
    /// `10.<a>.<b>.<10 + n>/24`. Returns a handle (a cheap copy; the lab keeps its own).
    pub fn host(&mut self, n: u8) -> Result<Host> {
        ensure!((1..=MAX_HOST).contains(&n), "host number {n} outside 1..={MAX_HOST}");
        ensure!(!self.cleaned, "netns lab {} is already cleaned up", self.id);
        ensure!(self.hosts.iter().all(|h| h.n != n), "host {n} already exists in netns lab {}", self.id);
        let o = self.bridge_ip.octets();
        let host = Host {
            name: format!("h{n}"),
            n,
            ns: ns_name(self.id, n),
            ip: Ipv4Addr::new(o[0], o[1], o[2], 10 + n),
            root_veth: veth_name(self.id, n),
            ns_veth: "eth0".into(),
        };
        let ns = host.ns.as_str();
        let rv = host.root_veth.as_str();
        ip(&["netns", "add", ns])?;
        ip(&["link", "add", "name", rv, "type", "veth", "peer", "name", &host.ns_veth, "netns", ns])?;
        ip(&["link", "set", "dev", rv, "master", &self.bridge])?;
        ip(&["link", "set", "dev", rv, "up"])?;
        ip(&["-n", ns, "link", "set", "dev", "lo", "up"])?;
        ip(&["-n", ns, "addr", "add", &format!("{}/24", host.ip), "dev", &host.ns_veth])?;
        ip(&["-n", ns, "link", "set", "dev", &host.ns_veth, "up"])?;
        ip(&["-n", ns, "route", "add", "unreachable", "default"])?;
        host.wait_link_forwarding()?;
        self.hosts.push(host.clone());
        Ok(host)
    }

    /// The lab's id (as in its names, `stw<id>...`).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The bridge's name in the root namespace.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The root namespace's address on the lab's subnet, `10.<a>.<b>.1`.
    pub fn bridge_ip(&self) -> Ipv4Addr {
        self.bridge_ip
    }

    /// Hosts created so far.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Namespaces of the hosts created so far.
    pub fn namespaces(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.ns.clone()).collect()
    }

    /// Root-namespace links of the lab: the bridge and the hosts' root-side veths.
    pub fn links(&self) -> Vec<String> {
        std::iter::once(self.bridge.clone()).chain(self.hosts.iter().map(|h| h.root_veth.clone())).collect()
    }

    /// Kills every process in the lab's namespaces and removes namespaces, veths, bridge and
    /// marker (see the module doc). Idempotent; `Drop` calls it.
    pub fn cleanup(&mut self) -> Result<()> {
        if self.cleaned {
            return Ok(());
        }
        destroy_lab(self.id)?;
        self.cleaned = true;
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            eprintln!("netns lab {}: {e:#}", self.id);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Host

/// One host of a [`Lab`]: a network namespace with one interface on the lab's bridge.
#[derive(Clone, Debug)]
pub struct Host {
    /// `h<n>`.
    pub name: String,
    pub n: u8,
    /// Namespace name, `stw<id>h<n>`.
    pub ns: String,
    /// `10.<a>.<b>.<10 + n>`.
    pub ip: Ipv4Addr,
    /// The veth end in the root namespace (a bridge port), `stw<id>h<n>a`.
    pub root_veth: String,
    /// The veth end inside the namespace, `eth0`.
    pub ns_veth: String,
}

impl Host {
    /// `ip:port` on this host.
    pub fn addr(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.ip, port)
    }

    /// A command running `program args...` inside the namespace (`ip netns exec <ns> ...`);
    /// `ip` execs the program, so the child's pid is the program's.
    pub fn command<P, I, S>(&self, program: P, args: I) -> Command
    where
        P: AsRef<OsStr>,
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.ns.as_str()]).arg(program).args(args);
        cmd
    }

    /// Spawns `program args...` inside the namespace as a [`Proc`] (SIGKILLed on drop), with
    /// stdout and stderr to `log` and the same environment as [`Proc::spawn`].
    pub fn spawn<P, I, S>(&self, name: &str, program: P, args: I, log: &Path) -> Result<Proc>
    where
        P: AsRef<OsStr>,
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(program, args);
        cmd.env("RUST_LOG", RUST_LOG).env_remove("STEWARD_ADMIN_TOKEN");
        Proc::from_command(name, cmd, log).with_context(|| format!("in namespace {}", self.ns))
    }

    /// Every process in the namespace (`ip netns pids`).
    pub fn pids(&self) -> Result<Vec<i32>> {
        netns_pids(&self.ns)
    }

    /// SIGSTOPs every process in the namespace, again for processes that appear meanwhile,
    /// and returns once all of them are stopped (at most 5 s).
    pub fn freeze(&self) -> Result<()> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let mut signalled = BTreeSet::new();
        loop {
            let pids = self.pids()?;
            let mut fresh = false;
            for &p in &pids {
                if signalled.insert(p) {
                    fresh = true;
                    signal(p, Signal::SIGSTOP)?;
                }
            }
            let running: Vec<i32> =
                pids.iter().copied().filter(|p| proc_state(*p).is_some_and(|s| s != 'T' && s != 'Z')).collect();
            if !fresh && running.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{}: processes {running:?} not stopped {SETTLE_TIMEOUT:?} after SIGSTOP", self.ns);
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGCONTs every process in the namespace and returns once none is stopped (at most 5 s).
    pub fn thaw(&self) -> Result<()> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let stopped: Vec<i32> = self.pids()?.into_iter().filter(|p| proc_state(*p) == Some('T')).collect();
            if stopped.is_empty() {
                return Ok(());
            }
            for &p in &stopped {
                signal(p, Signal::SIGCONT)?;
            }
            if Instant::now() > deadline {
                bail!("{}: processes {stopped:?} still stopped {SETTLE_TIMEOUT:?} after SIGCONT", self.ns);
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGKILLs every process in the namespace and waits (at most 5 s) until none is left.
    /// Children of this process linger as zombies until their [`Proc`] is dropped, but they are
    /// no longer in the namespace.
    pub fn kill_all(&self) -> Result<()> {
        kill_netns_processes(&self.ns)
    }

    /// Cuts the host off from everyone, both directions: the root-side veth goes down.
    pub fn partition(&self) -> Result<()> {
        ip(&["link", "set", "dev", &self.root_veth, "down"])?;
        Ok(())
    }

    /// Undoes [`Host::partition`] and returns once the bridge port forwards again.
    pub fn heal(&self) -> Result<()> {
        ip(&["link", "set", "dev", &self.root_veth, "up"])?;
        self.wait_link_forwarding()
    }

    /// One-way loss: every IPv4/IPv6 packet the host sends is dropped (egress of its `eth0`);
    /// it still receives everything. ARP passes. Replaces a [`Host::delay`].
    pub fn partition_outbound(&self) -> Result<()> {
        install_drop(Some(&self.ns), &self.ns_veth)
    }

    /// Undoes [`Host::partition_outbound`] (no-op if not partitioned).
    pub fn heal_outbound(&self) -> Result<()> {
        remove_drop(Some(&self.ns), &self.ns_veth)
    }

    /// One-way loss the other way: every IPv4/IPv6 packet sent to the host, from other hosts or
    /// the root namespace, is dropped (egress of the root-side veth, towards the host); what the
    /// host sends still gets out. ARP passes.
    pub fn partition_inbound(&self) -> Result<()> {
        install_drop(None, &self.root_veth)
    }

    /// Undoes [`Host::partition_inbound`] (no-op if not partitioned).
    pub fn heal_inbound(&self) -> Result<()> {
        remove_drop(None, &self.root_veth)
    }

    /// Delays every packet the host sends by `ms` milliseconds (`netem` on the egress of its
    /// `eth0`). Fails if the kernel has no `sch_netem`, or while partitioned outbound.
    pub fn delay(&self, ms: u32) -> Result<()> {
        let ns = Some(self.ns.as_str());
        ensure!(
            !root_qdisc(ns, &self.ns_veth)?.starts_with("qdisc htb 1:"),
            "{} is partitioned outbound; heal_outbound() before delay()",
            self.ns
        );
        clear_root_qdisc(ns, &self.ns_veth)?;
        tc(ns, &["qdisc", "add", "dev", &self.ns_veth, "root", "handle", "2:", "netem", "delay", &format!("{ms}ms")])
            .context("adding a netem delay (the kernel needs sch_netem)")?;
        Ok(())
    }

    /// Removes a [`Host::delay`] (no-op without one).
    pub fn clear_delay(&self) -> Result<()> {
        let ns = Some(self.ns.as_str());
        if root_qdisc(ns, &self.ns_veth)?.starts_with("qdisc netem 2:") {
            tc(ns, &["qdisc", "del", "dev", &self.ns_veth, "root"])?;
        }
        Ok(())
    }

    /// Waits until the root-side veth is up with carrier (so the namespace end is up too) and
    /// its bridge port forwards.
    fn wait_link_forwarding(&self) -> Result<()> {
        let sys = Path::new("/sys/class/net").join(&self.root_veth);
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let oper = std::fs::read_to_string(sys.join("operstate")).unwrap_or_default();
            let port = std::fs::read_to_string(sys.join("brport/state")).unwrap_or_default();
            // BR_STATE_FORWARDING = 3
            if oper.trim() == "up" && port.trim() == "3" {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: link not forwarding after {SETTLE_TIMEOUT:?} (operstate {:?}, bridge port state {:?})",
                    self.root_veth,
                    oper.trim(),
                    port.trim()
                );
            }
            std::thread::sleep(POLL);
        }
    }
}

/// The first line of `tc qdisc show dev <dev>` that describes the root qdisc ("" if none).
fn root_qdisc(netns: Option<&str>, dev: &str) -> Result<String> {
    let out = tc(netns, &["qdisc", "show", "dev", dev])?;
    Ok(out.lines().find(|l| l.contains(" root ")).unwrap_or("").to_string())
}

/// Removes a root qdisc set up by this module or anyone (back to the device default).
fn clear_root_qdisc(netns: Option<&str>, dev: &str) -> Result<()> {
    let root = root_qdisc(netns, dev)?;
    if !root.is_empty() && !root.starts_with("qdisc noqueue") {
        tc(netns, &["qdisc", "del", "dev", dev, "root"])?;
    }
    Ok(())
}

/// Drops everything leaving `dev` except ARP: an HTB root whose default class 1:2 does not
/// exist sends unclassified packets to its direct queue, which holds 0 packets; a u32 filter
/// sends ARP to the real class 1:1.
fn install_drop(netns: Option<&str>, dev: &str) -> Result<()> {
    if root_qdisc(netns, dev)?.starts_with("qdisc htb 1:") {
        return Ok(());
    }
    clear_root_qdisc(netns, dev)?;
    tc(netns, &["qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "2", "direct_qlen", "0"])?;
    let rest = (|| {
        tc(
            netns,
            &["class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb", "rate", "10gbit", "quantum", "1514"],
        )?;
        tc(
            netns,
            &[
                "filter", "add", "dev", dev, "parent", "1:", "protocol", "arp", "prio", "1", "u32", "match", "u32",
                "0", "0", "flowid", "1:1",
            ],
        )?;
        Ok::<_, anyhow::Error>(())
    })();
    if let Err(e) = rest {
        let _ = tc(netns, &["qdisc", "del", "dev", dev, "root"]);
        return Err(e);
    }
    Ok(())
}

fn remove_drop(netns: Option<&str>, dev: &str) -> Result<()> {
    if root_qdisc(netns, dev)?.starts_with("qdisc htb 1:") {
        tc(netns, &["qdisc", "del", "dev", dev, "root"])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_names_parse_back_and_nothing_else_does() {
        for id in [0, 7, 14335] {
            assert_eq!(parse_lab_id(&bridge_name(id)), Some(id));
            assert_eq!(parse_lab_id(&ns_name(id, 244)), Some(id));
            assert_eq!(parse_lab_id(&veth_name(id, 1)), Some(id));
            assert!(veth_name(id, MAX_HOST).len() <= 15);
        }
        for other in ["stw", "stwbr", "stw1", "stw1h", "stw1ha", "stw1h2b", "stw1brx", "stwx1br", "eth0", "stw1h2a3"] {
            assert_eq!(parse_lab_id(other), None, "{other}");
        }
    }

    #[test]
    fn subnets_are_distinct_and_in_range() {
        assert_eq!(subnet_octets(0), (200, 0));
        assert_eq!(subnet_octets(ID_SPACE - 1), (255, 255));
        assert_eq!(subnet_octets(257), (201, 1));
    }

    #[test]
    fn prefix_overlap() {
        let ten = |a, b, c| u32::from(Ipv4Addr::new(10, a, b, c));
        assert!(overlaps((ten(200, 1, 0), 24), (ten(200, 1, 7), 32)));
        assert!(overlaps((ten(0, 0, 0), 8), (ten(200, 1, 0), 24)));
        assert!(!overlaps((ten(200, 2, 0), 24), (ten(200, 1, 0), 24)));
        assert!(!overlaps((u32::from(Ipv4Addr::new(192, 0, 2, 0)), 24), (ten(200, 1, 0), 24)));
    }
}
