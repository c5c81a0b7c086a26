//! Host facts the agent reports to the control plane so it can place
//! clusters on hosts that have room for them.

use std::io;
use std::path::{Path, PathBuf};

/// Capacity of this host, used by the control plane for placement decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostResources {
    /// CPUs this process may use (respects affinity / cgroup cpusets).
    pub cores: u32,
    /// Total physical memory (`MemTotal` in `/proc/meminfo`).
    pub memory_bytes: u64,
    /// Bytes available to unprivileged users on the filesystem holding the data path.
    pub disk_free_bytes: u64,
    /// Size of the filesystem holding the data path.
    pub disk_total_bytes: u64,
}

/// Measures cores, memory and the disk that will hold PostgreSQL data, so the
/// control plane knows what this host can take. Creates nothing: if `data_path`
/// does not exist yet, the nearest existing ancestor's filesystem is measured.
pub fn host_resources(data_path: &Path) -> io::Result<HostResources> {
    let cores = std::thread::available_parallelism().map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX)).unwrap_or(1);

    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let memory_bytes = parse_meminfo_total(&meminfo).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, "no MemTotal line in /proc/meminfo; is /proc mounted?")
    })?;

    let measured = nearest_existing(data_path);
    let st = nix::sys::statvfs::statvfs(&measured)
        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("statvfs {}: {e}", measured.display())))?;
    // c_ulong / fsblkcnt_t are u64 on 64-bit Linux but narrower elsewhere.
    #[allow(clippy::useless_conversion)]
    let (frag, avail, total) =
        (u64::from(st.fragment_size()), u64::from(st.blocks_available()), u64::from(st.blocks()));
    let resources = HostResources {
        cores,
        memory_bytes,
        disk_free_bytes: avail.saturating_mul(frag),
        disk_total_bytes: total.saturating_mul(frag),
    };
    tracing::debug!(
        cores = resources.cores,
        memory_bytes = resources.memory_bytes,
        disk_free_bytes = resources.disk_free_bytes,
        disk_total_bytes = resources.disk_total_bytes,
        measured_path = %measured.display(),
        "measured host resources"
    );
    Ok(resources)
}

/// Host name the agent registers under; never fails so registration can proceed.
pub fn hostname() -> String {
    match nix::unistd::gethostname() {
        Ok(name) => name.to_string_lossy().into_owned(),
        Err(e) => {
            tracing::warn!(error = %e, "gethostname failed; reporting \"unknown\"");
            "unknown".to_string()
        }
    }
}

/// Extracts `MemTotal` (reported in kB) from `/proc/meminfo` text, in bytes.
fn parse_meminfo_total(text: &str) -> Option<u64> {
    let rest = text.lines().find_map(|line| line.strip_prefix("MemTotal:"))?;
    let mut parts = rest.split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    let factor = match parts.next() {
        Some("kB") | Some("KB") => 1024,
        None => 1,
        Some(_) => return None,
    };
    value.checked_mul(factor)
}

/// `path` itself if it exists, else its nearest existing ancestor (or `.`).
fn nearest_existing(path: &Path) -> PathBuf {
    path.ancestors()
        .find(|p| !p.as_os_str().is_empty() && p.exists())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_memtotal_in_kb() {
        let text = "MemTotal:       16318360 kB\nMemFree:         1234 kB\n";
        assert_eq!(parse_meminfo_total(text), Some(16318360 * 1024));
        assert_eq!(parse_meminfo_total("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn measures_missing_path_via_ancestor() {
        let missing = Path::new("/tmp/steward-does-not-exist/a/b/c");
        assert_eq!(nearest_existing(missing), PathBuf::from("/tmp"));
        let res = host_resources(missing).unwrap();
        assert!(res.cores >= 1);
        assert!(res.memory_bytes > 0);
        assert!(res.disk_total_bytes >= res.disk_free_bytes);
        assert!(!Path::new("/tmp/steward-does-not-exist").exists());
    }

    #[test]
    fn hostname_is_not_empty() {
        assert!(!hostname().is_empty());
    }
}
