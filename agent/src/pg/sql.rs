//! Safe construction of the utility statements (CREATE ROLE / DATABASE, GRANT)
//! that cannot take bind parameters, plus SCRAM verifiers so plaintext
//! passwords never have to reach the agent.

use super::PgError;

/// SCRAM-SHA-256 verifier for a password, so the control plane can hand agents
/// a verifier rather than a plaintext password.
pub fn scram_verifier(password: &str) -> String {
    postgres_protocol::password::scram_sha_256(password.as_bytes())
}

/// Rejects names outside `[a-z_][a-z0-9_]{0,62}`, so identifiers are
/// predictable, need no case folding and fit NAMEDATALEN.
pub fn validate_identifier(kind: &'static str, name: &str) -> Result<(), PgError> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if first_ok && rest_ok && name.len() <= 63 {
        Ok(())
    } else {
        Err(PgError::InvalidIdentifier { kind, name: name.to_string() })
    }
}

/// Double-quoted identifier (quotes doubled), safe even for reserved words.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// String literal safe under any `standard_conforming_strings` setting, like
/// PostgreSQL's own `quote_literal`.
pub fn quote_literal(value: &str) -> String {
    let body = value.replace('\'', "''");
    if body.contains('\\') {
        format!("E'{}'", body.replace('\\', "\\\\"))
    } else {
        format!("'{body}'")
    }
}

/// Checks that `verifier` looks like `SCRAM-SHA-256$<iter>:<salt>$<stored>:<server>`,
/// so a plaintext password is never stored by mistake.
pub fn check_verifier(role: &str, verifier: &str) -> Result<(), PgError> {
    let ok = verifier
        .strip_prefix("SCRAM-SHA-256$")
        .and_then(|rest| rest.split_once('$'))
        .is_some_and(|(iter_salt, keys)| iter_salt.contains(':') && keys.contains(':'));
    if ok {
        Ok(())
    } else {
        Err(PgError::NotAVerifier { role: role.to_string() })
    }
}

/// `CREATE ROLE` with login and a SCRAM verifier (inputs validated by caller).
pub fn create_role(role: &str, verifier: &str) -> String {
    format!("CREATE ROLE {} LOGIN PASSWORD {}", quote_ident(role), quote_literal(verifier))
}

/// `ALTER ROLE` to (re)set login and the password verifier.
pub fn alter_role(role: &str, verifier: &str) -> String {
    format!("ALTER ROLE {} WITH LOGIN PASSWORD {}", quote_ident(role), quote_literal(verifier))
}

/// `CREATE ROLE` for streaming replication: login, REPLICATION, SCRAM verifier.
pub fn create_replication_role(role: &str, verifier: &str) -> String {
    format!("CREATE ROLE {} LOGIN REPLICATION PASSWORD {}", quote_ident(role), quote_literal(verifier))
}

/// `ALTER ROLE` that restores login, REPLICATION and the verifier of the replication role.
pub fn alter_replication_role(role: &str, verifier: &str) -> String {
    format!("ALTER ROLE {} WITH LOGIN REPLICATION PASSWORD {}", quote_ident(role), quote_literal(verifier))
}

/// The grants the replication role needs beyond streaming: pg_rewind's on its source when it
/// connects as a non-superuser (see the pg_rewind documentation, PostgreSQL 11+),
/// `pg_switch_wal`, which a backup taken from a standby asks the primary for, and
/// `pg_control_checkpoint`, which a rejoining old primary reads to wait for the new primary's
/// first checkpoint on its timeline.
pub fn replication_role_grants(role: &str) -> [String; 6] {
    let role = quote_ident(role);
    [
        format!("GRANT EXECUTE ON FUNCTION pg_catalog.pg_control_checkpoint() TO {role}"),
        format!("GRANT EXECUTE ON FUNCTION pg_catalog.pg_switch_wal() TO {role}"),
        format!("GRANT EXECUTE ON FUNCTION pg_catalog.pg_ls_dir(text, boolean, boolean) TO {role}"),
        format!("GRANT EXECUTE ON FUNCTION pg_catalog.pg_stat_file(text, boolean) TO {role}"),
        format!("GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text) TO {role}"),
        format!("GRANT EXECUTE ON FUNCTION pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean) TO {role}"),
    ]
}

/// `CREATE DATABASE` owned by `owner`; must run outside a transaction block.
pub fn create_database(database: &str, owner: &str) -> String {
    format!("CREATE DATABASE {} OWNER {}", quote_ident(database), quote_ident(owner))
}

/// Restricts connecting to the database to its owner role (and superusers).
pub fn restrict_connect(database: &str, role: &str) -> [String; 2] {
    let db = quote_ident(database);
    [
        format!("REVOKE CONNECT ON DATABASE {db} FROM PUBLIC"),
        format!("GRANT CONNECT ON DATABASE {db} TO {}", quote_ident(role)),
    ]
}

/// Human-readable text of a client error, including the server's message,
/// detail and hint, which `tokio_postgres::Error`'s Display omits.
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code());
        if let Some(detail) = db.detail() {
            s.push_str(&format!("; detail: {detail}"));
        }
        if let Some(hint) = db.hint() {
            s.push_str(&format!("; hint: {hint}"));
        }
        return s;
    }
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(cause) = cur {
        s.push_str(&format!(": {cause}"));
        cur = cause.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        for ok in ["app", "_x", "a1_b2", &"a".repeat(63)] {
            assert!(validate_identifier("database", ok).is_ok(), "{ok}");
        }
        for bad in ["", "1abc", "App", "a-b", "a b", "a\"b", "é", &"a".repeat(64), "x;drop"] {
            assert!(validate_identifier("database", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("user"), "\"user\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b'"), "E'a\\\\b'''");
    }

    #[test]
    fn verifier_round_trip_and_statements() {
        let v = scram_verifier("s3cret");
        assert!(v.starts_with("SCRAM-SHA-256$4096:"), "{v}");
        assert!(check_verifier("app", &v).is_ok());
        assert!(check_verifier("app", "s3cret").is_err());
        assert_eq!(
            create_role("app", "SCRAM-SHA-256$1:s$a:b"),
            "CREATE ROLE \"app\" LOGIN PASSWORD 'SCRAM-SHA-256$1:s$a:b'"
        );
        assert_eq!(create_database("db", "app"), "CREATE DATABASE \"db\" OWNER \"app\"");
        assert_eq!(
            create_replication_role("steward_replication", "SCRAM-SHA-256$1:s$a:b"),
            "CREATE ROLE \"steward_replication\" LOGIN REPLICATION PASSWORD 'SCRAM-SHA-256$1:s$a:b'"
        );
        assert!(alter_replication_role("r", "v").starts_with("ALTER ROLE \"r\" WITH LOGIN REPLICATION PASSWORD "));
        assert!(
            replication_role_grants("r")[5].ends_with("pg_read_binary_file(text, bigint, bigint, boolean) TO \"r\"")
        );
        let [revoke, grant] = restrict_connect("db", "app");
        assert_eq!(revoke, "REVOKE CONNECT ON DATABASE \"db\" FROM PUBLIC");
        assert_eq!(grant, "GRANT CONNECT ON DATABASE \"db\" TO \"app\"");
    }
}
