//! Clients of agents' command service, one lazily connected channel per agent address.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use steward_proto::tls::TlsError;

use steward_proto::v1::agent_client::AgentClient;
use tokio::sync::Mutex;
use tonic::transport::Channel;

/// Cache of agent clients.
pub struct AgentClients {
    tls: Arc<rustls::ClientConfig>,
    clients: Mutex<HashMap<String, AgentClient<Channel>>>,
}

impl AgentClients {
    /// Clients that present this node's certificate and accept only agent certificates.
    pub fn new(tls: Arc<rustls::ClientConfig>) -> Self {
        Self { tls, clients: Mutex::new(HashMap::new()) }
    }

    /// The client for `addr` (host:port).
    pub async fn get(&self, addr: &str) -> Result<AgentClient<Channel>, TlsError> {
        let mut map = self.clients.lock().await;
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let channel = steward_proto::tls::transport::channel(addr, self.tls.clone(), Duration::from_secs(2))?;
        let client = AgentClient::new(channel);
        map.insert(addr.to_string(), client.clone());
        Ok(client)
    }
}
