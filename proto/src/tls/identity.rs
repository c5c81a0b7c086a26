//! Who is at the other end of a connection. Every certificate the cluster CA issues names one
//! role and one name in a URI subject-alternative name (`steward://agent/host-a`); servers
//! authorize by that identity, not by addresses, which change.

use std::fmt;

use super::TlsError;

/// What a certificate's holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A control-plane node: Raft peer, commands agents, holds the CA key.
    ControlPlane,
    /// A host agent: heartbeats to the control plane, runs PostgreSQL.
    Agent,
    /// A person or tool steering the fleet (`stewardctl`).
    Operator,
}

impl Role {
    /// The role's name in identity URIs and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ControlPlane => "controlplane",
            Role::Agent => "agent",
            Role::Operator => "operator",
        }
    }

    /// Parses `controlplane`, `agent` or `operator`.
    pub fn parse(s: &str) -> Result<Role, TlsError> {
        match s {
            "controlplane" => Ok(Role::ControlPlane),
            "agent" => Ok(Role::Agent),
            "operator" => Ok(Role::Operator),
            other => Err(TlsError::Invalid(format!("unknown role '{other}': use controlplane, agent or operator"))),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The identity a certificate carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub role: Role,
    /// Node id, host id or operator name.
    pub name: String,
}

const SCHEME: &str = "steward://";

impl Identity {
    pub fn new(role: Role, name: impl Into<String>) -> Self {
        Self { role, name: name.into() }
    }

    /// `steward://<role>/<name>`, the URI SAN issued certificates carry.
    pub fn uri(&self) -> String {
        format!("{SCHEME}{}/{}", self.role, self.name)
    }

    /// Parses an identity URI.
    pub fn from_uri(uri: &str) -> Option<Identity> {
        let rest = uri.strip_prefix(SCHEME)?;
        let (role, name) = rest.split_once('/')?;
        let role = Role::parse(role).ok()?;
        valid_name(name).ok()?;
        Some(Identity { role, name: name.to_string() })
    }

    /// The identity in a DER certificate, if it has one.
    pub fn from_der(der: &[u8]) -> Option<Identity> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let san = cert.subject_alternative_name().ok()??;
        san.value.general_names.iter().find_map(|g| match g {
            x509_parser::extensions::GeneralName::URI(u) => Identity::from_uri(u),
            _ => None,
        })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role, self.name)
    }
}

/// Names are host ids, node ids and operator names: short, no separators that would make the
/// URI ambiguous.
pub fn valid_name(name: &str) -> Result<(), TlsError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(TlsError::Invalid(format!(
            "'{name}' is not a valid certificate name: use 1-128 letters, digits, '-', '_' or '.'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip_and_reject_junk() {
        let id = Identity::new(Role::Agent, "host-a");
        assert_eq!(id.uri(), "steward://agent/host-a");
        assert_eq!(Identity::from_uri(&id.uri()), Some(id));
        assert_eq!(Identity::from_uri("steward://root/x"), None);
        assert_eq!(Identity::from_uri("steward://agent/a/b"), None);
        assert_eq!(Identity::from_uri("https://agent/a"), None);
        assert_eq!(Identity::from_uri("steward://agent/"), None);
        assert!(Role::parse("admin").is_err());
    }
}
