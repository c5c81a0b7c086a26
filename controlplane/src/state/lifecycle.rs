//! The database lifecycle as a pure transition table (DESIGN.md: provisioning → active →
//! deprecated → archived → deleted, plus failed), so every refusal has one place, one message
//! that says what to do instead, and a unit test. Apply checks it on every node, so a request
//! that raced with another change gets the same answer everywhere.

use super::model::db_state;

/// What a caller asks of a database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Deprecate,
    Reactivate,
    Transfer,
    Delete,
    /// Start the archive operation.
    Archive,
    /// Bring an archived database back.
    Unarchive,
}

impl Action {
    /// Name in the audit log.
    pub fn audit_name(self) -> &'static str {
        match self {
            Action::Deprecate => "database.deprecate",
            Action::Reactivate => "database.reactivate",
            Action::Transfer => "database.transfer",
            Action::Delete => "database.delete",
            Action::Archive => "database.archive",
            Action::Unarchive => "database.unarchive",
        }
    }
}

/// The state `action` leads to from `from`, or why it is refused.
pub fn transition(from: &str, action: Action) -> Result<&'static str, String> {
    use db_state::*;
    match (action, from) {
        (Action::Deprecate, ACTIVE) => Ok(DEPRECATED),
        (Action::Deprecate, DEPRECATED) => Ok(DEPRECATED), // new reason or sunset date
        (Action::Reactivate, DEPRECATED) => Ok(ACTIVE),
        (Action::Reactivate, ACTIVE) => Err("the database is active already; nothing to reactivate".into()),
        (Action::Transfer, ACTIVE) => Ok(ACTIVE),
        (Action::Transfer, DEPRECATED) => Ok(DEPRECATED),
        (Action::Transfer, ARCHIVED) => Ok(ARCHIVED),
        (Action::Delete, ARCHIVED) => Ok(DELETED),
        (Action::Archive, ACTIVE | DEPRECATED) => Ok(ARCHIVING),
        (Action::Archive, ARCHIVED) => Err("the database is archived already".into()),
        (Action::Unarchive, ARCHIVED) => Ok(RESTORING),
        (Action::Delete, ACTIVE | DEPRECATED) => Err(format!(
            "the database is {from}: only an archived database can be deleted; archive it first \
             (POST /v1/databases/<id>/archive takes a verified final backup), then delete it"
        )),
        (_, PROVISIONING) => Err("the database is still being provisioned; wait until it is active".into()),
        (_, FAILED) => Err("the database failed to provision; see its operation's error".into()),
        (_, DELETED) => Err("the database was deleted".into()),
        (Action::Unarchive, ACTIVE | DEPRECATED) => {
            Err("the database is live; a restore of it makes a point-in-time copy instead".into())
        }
        (_, ARCHIVED) => Err(format!(
            "the database is archived: restore it first (POST /v1/databases/<id>/restore) to {}",
            match action {
                Action::Deprecate => "deprecate it",
                _ => "use it",
            }
        )),
        (_, other) => Err(format!("the database is {other}; wait until its operation ends")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use db_state::*;

    #[test]
    fn transitions() {
        assert_eq!(transition(ACTIVE, Action::Deprecate), Ok(DEPRECATED));
        assert_eq!(transition(DEPRECATED, Action::Deprecate), Ok(DEPRECATED));
        assert_eq!(transition(DEPRECATED, Action::Reactivate), Ok(ACTIVE));
        assert_eq!(transition(ACTIVE, Action::Transfer), Ok(ACTIVE));
        assert_eq!(transition(ARCHIVED, Action::Transfer), Ok(ARCHIVED));
        assert_eq!(transition(ARCHIVED, Action::Delete), Ok(DELETED));
        assert!(transition(ACTIVE, Action::Delete).unwrap_err().contains("archive it first"));
        assert!(transition(DEPRECATED, Action::Delete).unwrap_err().contains("only an archived database"));
        assert!(transition(ACTIVE, Action::Reactivate).unwrap_err().contains("active already"));
        assert!(transition(PROVISIONING, Action::Deprecate).unwrap_err().contains("provisioned"));
        assert!(transition(ARCHIVED, Action::Deprecate).unwrap_err().contains("restore it first"));
        assert!(transition(DELETED, Action::Transfer).unwrap_err().contains("deleted"));
        assert!(transition(FAILED, Action::Delete).is_err());
        assert_eq!(transition(DEPRECATED, Action::Archive), Ok(ARCHIVING));
        assert_eq!(transition(ARCHIVED, Action::Unarchive), Ok(RESTORING));
        assert!(transition(ARCHIVING, Action::Delete).unwrap_err().contains("wait until its operation ends"));
        assert!(transition(ARCHIVED, Action::Archive).unwrap_err().contains("archived already"));
    }
}
