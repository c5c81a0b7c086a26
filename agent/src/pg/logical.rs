//! Logical replication as a database move uses it: the names one move gives its role,
//! publication, slot and subscription, the subscriber's connection string, and the catalog
//! queries that find what cannot be replicated and what must match on both sides. Pure (SQL
//! text and string building), so every rule has a unit test; the move steps that run them are in
//! `tasks::moves`.

use super::config::conninfo_value;

/// Prefix of every object a move creates, so leftovers are recognisable.
pub const MOVE_PREFIX: &str = "steward_move_";

/// The one name a move gives its role, publication, replication slot and subscription: derived
/// from the operation id (letters, digits and '-'), so both agents and every retry agree.
pub fn move_name(operation_id: &str) -> String {
    let id: String = operation_id.chars().filter(char::is_ascii_alphanumeric).take(24).collect();
    format!("{MOVE_PREFIX}{}", id.to_ascii_lowercase())
}

/// How the subscriber reaches the source, over TLS (the source refuses plaintext TCP): the move
/// role's password is inside (PostgreSQL keeps it in `pg_subscription`, readable by superusers
/// only).
pub fn subscription_conninfo(host: &str, port: u16, database: &str, user: &str, password: &str) -> String {
    format!(
        "host={} port={port} dbname={} user={} password={} application_name={} connect_timeout=5 sslmode=require",
        conninfo_value(host),
        conninfo_value(database),
        conninfo_value(user),
        conninfo_value(password),
        conninfo_value(user),
    )
}

/// Tables whose rows logical replication cannot carry, or whose updates it would refuse once
/// the database is published: `(qualified name, relreplident, relpersistence, has primary key,
/// has replica identity index)`.
pub const UNREPLICABLE_TABLES: &str = "
    SELECT format('%I.%I', n.nspname, c.relname), c.relreplident::text, c.relpersistence::text,
           EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
           EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident)
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
      AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
      AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                      AND d.deptype = 'e')
    ORDER BY 1";

/// What is wrong with one table of [`UNREPLICABLE_TABLES`] and what to do about it; `None` if
/// it replicates fine.
pub fn table_problem(table: &str, replident: &str, persistence: &str, has_pk: bool, has_ri: bool) -> Option<String> {
    if persistence == "u" {
        return Some(format!(
            "table {table} is UNLOGGED, so logical replication cannot copy its rows: \
             ALTER TABLE {table} SET LOGGED before the move (or TRUNCATE it if its contents are disposable)"
        ));
    }
    let missing = match replident {
        "f" => false,
        "n" => true,
        "i" => !has_ri,
        _ => !has_pk,
    };
    missing.then(|| {
        format!(
            "table {table} has no primary key or replica identity, so its updates and deletes cannot be \
             replicated: add a primary key (ALTER TABLE {table} ADD PRIMARY KEY (...)), or, if no set of \
             columns is unique, ALTER TABLE {table} REPLICA IDENTITY FULL"
        )
    })
}

/// The problem large objects make, if the database has any (`pg_largeobject_metadata` rows).
pub fn large_object_problem(count: i64) -> Option<String> {
    (count > 0).then(|| {
        format!(
            "the database holds {count} large objects, which logical replication does not copy: \
             store them in bytea columns instead, or archive the database and restore it elsewhere"
        )
    })
}

/// The problem a `wal_level` other than `logical` makes.
pub fn wal_level_problem(wal_level: &str) -> Option<String> {
    (wal_level != "logical").then(|| {
        format!(
            "PostgreSQL runs with wal_level = {wal_level}, and a move needs 'logical': the agent configures \
             it, and it takes effect when the cluster's primary restarts (restart it, or switch over an HA \
             cluster), then move again"
        )
    })
}

/// A digest of every user table's columns and types: equal on source and target unless the
/// schema changed (DDL) after it was copied, which logical replication does not carry.
pub const SCHEMA_FINGERPRINT: &str = "
    SELECT coalesce(md5(string_agg(format('%s.%s %s %s', n.nspname, c.relname, a.attname,
                                          format_type(a.atttypid, a.atttypmod)),
                                   ',' ORDER BY n.nspname, c.relname, a.attnum)), '')
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
      AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'";

/// Sequences that were used, with their last value (`setval` on the target after the block).
pub const SEQUENCES: &str = "
    SELECT format('%I.%I', schemaname, sequencename), last_value FROM pg_sequences
    WHERE last_value IS NOT NULL ORDER BY 1";

/// Roles other than the owner (and the system's) that own or are granted something in the
/// database: the target must have them for the schema's grants to apply. Columns: name,
/// `CREATE ROLE` options, SCRAM verifier or NULL.
pub const REFERENCED_ROLES: &str = "
    WITH refs AS (
        SELECT relowner AS r FROM pg_class UNION SELECT nspowner FROM pg_namespace
        UNION SELECT proowner FROM pg_proc UNION SELECT typowner FROM pg_type
        UNION SELECT (aclexplode(relacl)).grantee FROM pg_class WHERE relacl IS NOT NULL
        UNION SELECT (aclexplode(nspacl)).grantee FROM pg_namespace WHERE nspacl IS NOT NULL
        UNION SELECT (aclexplode(proacl)).grantee FROM pg_proc WHERE proacl IS NOT NULL
        UNION SELECT (aclexplode(typacl)).grantee FROM pg_type WHERE typacl IS NOT NULL
        UNION SELECT (aclexplode(defaclacl)).grantee FROM pg_default_acl
    )
    SELECT a.rolname,
           concat_ws(' ', CASE WHEN a.rolcanlogin THEN 'LOGIN' ELSE 'NOLOGIN' END,
                     CASE WHEN a.rolinherit THEN 'INHERIT' ELSE 'NOINHERIT' END,
                     CASE WHEN a.rolcreatedb THEN 'CREATEDB' END,
                     CASE WHEN a.rolcreaterole THEN 'CREATEROLE' END,
                     CASE WHEN a.rolbypassrls THEN 'BYPASSRLS' END,
                     'CONNECTION LIMIT ' || a.rolconnlimit),
           CASE WHEN a.rolpassword LIKE 'SCRAM-SHA-256$%' THEN a.rolpassword END
    FROM refs JOIN pg_authid a ON a.oid = refs.r
    WHERE a.rolname <> $1 AND a.rolname NOT LIKE 'pg\\_%' AND NOT a.rolsuper
      AND a.rolname NOT LIKE 'steward\\_%' AND a.oid >= 16384
    ORDER BY 1";

/// Roles holding CONNECT on the database (from its ACL), besides the move's own.
pub const CONNECT_GRANTEES: &str = "
    SELECT DISTINCT r.rolname FROM pg_database d, aclexplode(d.datacl) x
    JOIN pg_roles r ON r.oid = x.grantee
    WHERE d.datname = $1 AND x.privilege_type = 'CONNECT' AND r.rolname <> $2";

/// `CREATE ROLE` options from [`REFERENCED_ROLES`] as safe to replay: only the known keywords
/// and a numeric connection limit survive, so nothing else can be injected.
pub fn safe_role_options(options: &str) -> String {
    const WORDS: [&str; 9] =
        ["LOGIN", "NOLOGIN", "INHERIT", "NOINHERIT", "CREATEDB", "CREATEROLE", "BYPASSRLS", "CONNECTION", "LIMIT"];
    let mut out: Vec<&str> = Vec::new();
    let words: Vec<&str> = options.split_whitespace().collect();
    let mut i = 0;
    while i < words.len() {
        let w = words[i];
        if w == "CONNECTION" {
            if words.get(i + 1) == Some(&"LIMIT") {
                if let Some(n) = words.get(i + 2).filter(|n| n.parse::<i32>().is_ok()) {
                    out.extend(["CONNECTION", "LIMIT", n]);
                }
            }
            i += 3;
            continue;
        }
        if WORDS.contains(&w) && w != "LIMIT" {
            out.push(w);
        }
        i += 1;
    }
    out.join(" ")
}

/// The subscription's state per table (`pg_subscription_rel.srsubstate`): `r` is ready (copied
/// and streaming).
pub fn tables_ready(states: &[String]) -> (u32, u32) {
    let total = states.len() as u32;
    let ready = states.iter().filter(|s| s.as_str() == "r").count() as u32;
    (total, ready)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_derived_from_the_operation() {
        assert_eq!(move_name("1b2C3d4e-0000-1111-2222-333344445555"), "steward_move_1b2c3d4e0000111122223333");
        assert!(move_name(&"a".repeat(200)).len() <= 63);
        crate::pg::sql::validate_identifier("move", &move_name("0f-9")).unwrap();
    }

    #[test]
    fn conninfo_quotes_what_needs_it() {
        let c = subscription_conninfo("10.0.0.1", 5433, "orders", "steward_move_ab", "p w'x");
        assert_eq!(
            c,
            "host=10.0.0.1 port=5433 dbname=orders user=steward_move_ab password='p w\\'x' \
             application_name=steward_move_ab connect_timeout=5 sslmode=require"
        );
    }

    #[test]
    fn problems_say_what_to_do() {
        assert_eq!(table_problem("public.a", "d", "p", true, false), None);
        assert_eq!(table_problem("public.a", "f", "p", false, false), None);
        assert_eq!(table_problem("public.a", "i", "p", false, true), None);
        let p = table_problem("public.h", "d", "p", false, false).unwrap();
        assert!(p.contains("public.h") && p.contains("ADD PRIMARY KEY") && p.contains("REPLICA IDENTITY FULL"), "{p}");
        assert!(table_problem("public.n", "n", "p", true, false).is_some());
        assert!(table_problem("public.i", "i", "p", true, false).is_some());
        let p = table_problem("public.u", "d", "u", true, false).unwrap();
        assert!(p.contains("SET LOGGED"), "{p}");
        assert!(large_object_problem(0).is_none());
        assert!(large_object_problem(3).unwrap().contains("3 large objects"));
        assert!(wal_level_problem("logical").is_none());
        assert!(wal_level_problem("replica").unwrap().contains("wal_level = replica"));
    }

    #[test]
    fn role_options_keep_only_keywords() {
        assert_eq!(
            safe_role_options("LOGIN NOINHERIT CREATEDB CONNECTION LIMIT -1"),
            "LOGIN NOINHERIT CREATEDB CONNECTION LIMIT -1"
        );
        assert_eq!(safe_role_options("LOGIN SUPERUSER; DROP TABLE x"), "LOGIN");
        assert_eq!(safe_role_options("CONNECTION LIMIT 5;x"), "");
        assert_eq!(safe_role_options("REPLICATION BYPASSRLS"), "BYPASSRLS");
    }

    #[test]
    fn ready_tables_are_counted() {
        let s: Vec<String> = ["r", "d", "r", "s"].iter().map(|s| s.to_string()).collect();
        assert_eq!(tables_ready(&s), (4, 2));
        assert_eq!(tables_ready(&[]), (0, 0));
    }
}
