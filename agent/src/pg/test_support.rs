//! Helpers shared by the tests that run a real PostgreSQL.

use std::path::{Path, PathBuf};

use std::sync::OnceLock;

use super::{Instance, InstanceSpec, PgBinaries, RunAs, ServerCert};

/// Stops the server even when an assertion fails mid-test.
pub struct StopGuard {
    pub pg_ctl: PathBuf,
    pub data_dir: PathBuf,
    pub run_as: RunAs,
}

impl StopGuard {
    /// A guard for `inst`'s data directory.
    pub fn for_instance(inst: &Instance) -> Self {
        StopGuard {
            pg_ctl: inst.binaries().bin("pg_ctl"),
            data_dir: inst.spec().data_dir.clone(),
            run_as: inst.run_as().clone(),
        }
    }
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        if !self.data_dir.join("postmaster.pid").exists() {
            return;
        }
        let _ = self
            .run_as
            .std_command(&self.pg_ctl, Path::new("/tmp"))
            .args(["stop", "-m", "immediate", "-D"])
            .arg(&self.data_dir)
            .output();
    }
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Spec for a small loopback instance with data and socket under `dir`.
pub fn spec_in(dir: &Path, cluster_id: &str) -> InstanceSpec {
    InstanceSpec {
        cluster_id: cluster_id.into(),
        data_dir: dir.join("data"),
        socket_dir: dir.join("sock"),
        port: free_port(),
        listen_addresses: "127.0.0.1".into(),
        memory_budget_bytes: 256 << 20,
        cores: 2,
        archive: None,
    }
}

/// Binaries and run-as user, or None (test skipped) without PostgreSQL.
pub fn binaries() -> Option<(PgBinaries, RunAs)> {
    match PgBinaries::discover(None) {
        Ok(b) => Some((b, RunAs::detect().unwrap())),
        Err(e) => {
            println!("skipping: no PostgreSQL binaries found ({e})");
            None
        }
    }
}

/// One self-signed loopback certificate shared by the tests (making one takes a moment).
pub fn test_cert() -> ServerCert {
    static CERT: OnceLock<ServerCert> = OnceLock::new();
    CERT.get_or_init(|| super::tls::generate(&super::tls::host_names("127.0.0.1", "127.0.0.1")).unwrap()).clone()
}

/// An instance serving TLS with [`test_cert`], as the agent runs them.
pub fn instance(spec: InstanceSpec, bins: &PgBinaries, run_as: &RunAs) -> Instance {
    let inst = Instance::new(spec, bins.clone(), run_as.clone());
    inst.set_server_cert(test_cert());
    inst
}
