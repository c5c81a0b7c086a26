//! SQL-level provisioning over the superuser unix-socket connection: the
//! application role and database a Steward cluster hands to its user.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use super::sql;
use super::{Instance, PgError};

/// Role and database names the agent keeps for itself.
const RESERVED_ROLES: [&str; 2] = ["postgres", super::replication::REPLICATION_ROLE];
const RESERVED_DATABASES: [&str; 3] = ["postgres", "template0", "template1"];

fn sql_err(action: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> PgError {
    let action = action.into();
    move |source| PgError::Sql { action, source }
}

impl Instance {
    /// Superuser client over the unix socket; the connection task is spawned
    /// and ends when the client is dropped.
    pub async fn superuser_client(&self) -> Result<Client, PgError> {
        self.superuser_client_to("postgres").await
    }

    /// A superuser connection to `database` over the private unix socket.
    pub async fn superuser_client_to(&self, database: &str) -> Result<Client, PgError> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host_path(&self.spec.socket_dir)
            .port(self.spec.port)
            .user("postgres")
            .dbname(database)
            .application_name("steward-agent")
            .connect_timeout(Duration::from_secs(10));
        let (client, connection) = cfg
            .connect(NoTls)
            .await
            .map_err(|source| PgError::Connect { socket_dir: self.spec.socket_dir.clone(), source })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %sql::describe(&e), "superuser connection ended");
            }
        });
        Ok(client)
    }

    /// Idempotently creates (or updates the password of) `role`, creates
    /// `database` owned by it, and lets only that role connect. The password
    /// must be a SCRAM verifier (see [`super::scram_verifier`]); it is never
    /// logged. Returns true if the database was created now.
    pub async fn ensure_database(&self, database: &str, role: &str, password_scram: &str) -> Result<bool, PgError> {
        sql::validate_identifier("database", database)?;
        sql::validate_identifier("role", role)?;
        if RESERVED_DATABASES.contains(&database) {
            return Err(PgError::ReservedName { kind: "database", name: database.into() });
        }
        if RESERVED_ROLES.contains(&role) || role.starts_with("pg_") {
            return Err(PgError::ReservedName { kind: "role", name: role.into() });
        }
        sql::check_verifier(role, password_scram)?;
        let client = self.superuser_client().await?;

        ensure_role(&client, role, password_scram).await?;

        let exists = client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&database])
            .await
            .map_err(sql_err(format!("looking up database {database}")))?
            .is_some();
        let mut created = false;
        if !exists {
            // a single simple-protocol statement runs outside a transaction block
            match client.batch_execute(&sql::create_database(database, role)).await {
                Ok(()) => created = true,
                Err(e) if e.code() == Some(&SqlState::DUPLICATE_DATABASE) => {}
                Err(e) => return Err(sql_err(format!("creating database {database}"))(e)),
            }
        }
        for stmt in sql::restrict_connect(database, role) {
            client.batch_execute(&stmt).await.map_err(sql_err(format!("setting CONNECT privileges on {database}")))?;
        }
        tracing::info!(
            cluster_id = %self.spec.cluster_id,
            database,
            role,
            created,
            "database ensured"
        );
        Ok(created)
    }

    /// Names of changed settings that only take effect after a restart.
    pub async fn pending_restart(&self) -> Result<Vec<String>, PgError> {
        let client = self.superuser_client().await?;
        let rows = client
            .query("SELECT name FROM pg_settings WHERE pending_restart ORDER BY name", &[])
            .await
            .map_err(sql_err("reading pg_settings"))?;
        rows.iter().map(|r| r.try_get::<_, String>(0).map_err(sql_err("reading pg_settings"))).collect()
    }
}

/// Whether a role of this name exists in the instance.
pub async fn role_exists(client: &Client, role: &str) -> Result<bool, tokio_postgres::Error> {
    Ok(client.query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role]).await?.is_some())
}

/// CREATE ROLE, or ALTER ROLE if it exists (also when created concurrently).
async fn ensure_role(client: &Client, role: &str, verifier: &str) -> Result<(), PgError> {
    let exists = role_exists(client, role).await.map_err(sql_err(format!("looking up role {role}")))?;
    if !exists {
        match client.batch_execute(&sql::create_role(role, verifier)).await {
            Ok(()) => {
                tracing::info!(role, "created role");
                return Ok(());
            }
            Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => {}
            Err(e) => return Err(sql_err(format!("creating role {role}"))(e)),
        }
    }
    client
        .batch_execute(&sql::alter_role(role, verifier))
        .await
        .map_err(sql_err(format!("setting password of role {role}")))?;
    tracing::debug!(role, "updated role password");
    Ok(())
}
