//! Clients of agents' command service, one lazily connected channel per agent address.

use std::sync::Arc;
use std::time::Duration;

use steward_proto::tls::transport::{Channels, KeepAlive};
use steward_proto::tls::TlsError;
use steward_proto::v1::agent_client::AgentClient;
use tonic::transport::Channel;

/// Cache of agent clients.
pub struct AgentClients {
    channels: Channels,
}

impl AgentClients {
    /// Clients that present this node's certificate and accept only agent certificates.
    pub fn new(tls: Arc<rustls::ClientConfig>) -> Self {
        Self { channels: Channels::new(tls, Duration::from_secs(2), KeepAlive::default()) }
    }

    /// The client for `addr` (host:port).
    pub async fn get(&self, addr: &str) -> Result<AgentClient<Channel>, TlsError> {
        self.channels.get(addr).map(AgentClient::new)
    }
}
