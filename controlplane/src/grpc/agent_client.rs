//! Clients of agents' command service, one lazily connected channel per agent address.

use std::collections::HashMap;
use std::time::Duration;

use steward_proto::v1::agent_client::AgentClient;
use tokio::sync::Mutex;
use tonic::transport::Channel;

/// Cache of agent clients.
#[derive(Default)]
pub struct AgentClients {
    clients: Mutex<HashMap<String, AgentClient<Channel>>>,
}

impl AgentClients {
    /// The client for `addr` (host:port or URL).
    pub async fn get(&self, addr: &str) -> Result<AgentClient<Channel>, tonic::transport::Error> {
        let mut map = self.clients.lock().await;
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let url = if addr.contains("://") { addr.to_string() } else { format!("http://{addr}") };
        let channel = tonic::transport::Endpoint::from_shared(url)?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        let client = AgentClient::new(channel);
        map.insert(addr.to_string(), client.clone());
        Ok(client)
    }
}
