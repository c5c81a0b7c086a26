//! The agent's durable memory: its host id, and for each cluster it runs the newest epoch it has
//! seen and the port. Written atomically (temp file, fsync, rename) with a generation number, so
//! a crash leaves either the old or the new file.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One cluster this host runs an instance of: what the control plane last asked for, so the
/// agent can re-apply it after a restart.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ClusterRecord {
    pub epoch: u64,
    pub port: u16,
    pub pg_major: u32,
    /// "primary" or "standby".
    #[serde(default = "primary")]
    pub role: String,
    #[serde(default)]
    pub member_name: String,
    #[serde(default)]
    pub upstream_host: String,
    #[serde(default)]
    pub upstream_port: u16,
    /// Kept in this 0600 file because a standby needs it for its passfile after a restart.
    #[serde(default)]
    pub replication_password: String,
    #[serde(default)]
    pub synchronous_standby_names: String,
    #[serde(default)]
    pub slots: Vec<String>,
    #[serde(default)]
    pub slot_name: String,
    #[serde(default)]
    pub peer_agents: Vec<String>,
    /// > 0: an HA primary that must hold a lease (or every peer's acknowledgement) to run.
    #[serde(default)]
    pub lease_ms: u32,
    /// The agent stopped this primary itself and waits for a command with a newer epoch.
    #[serde(default)]
    pub fenced: bool,
}

fn primary() -> String {
    "primary".into()
}

impl ClusterRecord {
    /// True for the primary role.
    pub fn is_primary(&self) -> bool {
        self.role != "standby"
    }
}

/// Contents of `agent-state.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AgentState {
    pub generation: u64,
    pub host_id: String,
    pub clusters: BTreeMap<String, ClusterRecord>,
}

/// Failures reading or writing the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("agent state {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("agent state {path} is corrupt ({source}); move it aside to start afresh (the host then registers as a new host)")]
    Corrupt { path: PathBuf, source: serde_json::Error },
}

/// Whether a command's epoch may act on a cluster: never older than the newest seen.
pub fn epoch_allowed(known: Option<u64>, incoming: u64) -> bool {
    known.is_none_or(|k| incoming >= k)
}

impl AgentState {
    fn path(dir: &Path) -> PathBuf {
        dir.join("agent-state.json")
    }

    /// Loads the state, or a fresh one with a new host id if there is none.
    pub fn load_or_new(dir: &Path, host_id: Option<&str>) -> Result<Self, StateError> {
        let path = Self::path(dir);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let mut s: AgentState = serde_json::from_slice(&bytes)
                    .map_err(|source| StateError::Corrupt { path: path.clone(), source })?;
                if let Some(h) = host_id {
                    s.host_id = h.to_string();
                }
                Ok(s)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let host_id = host_id.map(str::to_string).unwrap_or_else(|| {
                    let id = uuid::Uuid::new_v4().simple().to_string();
                    format!("h{}", &id[..12])
                });
                Ok(AgentState { generation: 0, host_id, clusters: BTreeMap::new() })
            }
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// Persists the state with the next generation number.
    pub fn save(&mut self, dir: &Path) -> Result<(), StateError> {
        self.generation += 1;
        let path = Self::path(dir);
        let io = |source| StateError::Io { path: path.clone(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| io(std::io::Error::other(e)))?;
        // Holds replication passwords: readable by the agent's user only.
        let mut f = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io)?
        };
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_epochs_are_refused() {
        assert!(epoch_allowed(None, 1));
        assert!(epoch_allowed(Some(3), 3));
        assert!(epoch_allowed(Some(3), 4));
        assert!(!epoch_allowed(Some(3), 2));
    }

    #[test]
    fn round_trips_and_bumps_generation() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = AgentState::load_or_new(dir.path(), None).unwrap();
        assert!(s.host_id.starts_with('h'));
        s.clusters.insert("c1".into(), ClusterRecord { epoch: 2, port: 5432, pg_major: 15, ..Default::default() });
        s.save(dir.path()).unwrap();
        let back = AgentState::load_or_new(dir.path(), None).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.generation, 1);
        std::fs::write(dir.path().join("agent-state.json"), b"{not json").unwrap();
        assert!(matches!(AgentState::load_or_new(dir.path(), None), Err(StateError::Corrupt { .. })));
    }
}
