//! `POST /v1/databases`, `GET /v1/databases`, `GET /v1/databases/{id}`. A team sees only its own
//! databases: another team's database is reported as not found.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::Json;
use serde_json::{json, Value};
use sqlx::SqlitePool;

use super::auth::{caller, Caller};
use super::error::ApiError;
use super::validate::{self, NewDatabase};
use super::AppState;
use crate::reconcile::placement::{self, Candidate, Placement};
use crate::state::model::{cluster_state, db_state, host_state, op_state, Cluster, Database, Operation};
use crate::state::{query, Command, Response};

/// The libpq connection details of an active database.
pub async fn connection(pool: &SqlitePool, db: &Database) -> Result<Value, sqlx::Error> {
    let Some(cluster) = query::cluster(pool, &db.cluster_id).await? else { return Ok(Value::Null) };
    let Some(host) = query::host(pool, &cluster.primary_host).await? else { return Ok(Value::Null) };
    let uri = format!(
        "postgresql://{}:{}@{}:{}/{}?target_session_attrs=read-write",
        db.role_name, db.password, host.pg_host, cluster.port, db.pg_name
    );
    Ok(json!({
        "uri": uri,
        "host": host.pg_host,
        "port": cluster.port,
        "database": db.pg_name,
        "user": db.role_name,
        "password": db.password,
    }))
}

/// JSON view of a database; `connection` only once it is usable.
pub async fn view(pool: &SqlitePool, db: &Database) -> Result<Value, sqlx::Error> {
    let conn = if db.state == db_state::ACTIVE { connection(pool, db).await? } else { Value::Null };
    let op = query::provision_operation_of(pool, &db.id).await?;
    Ok(json!({
        "id": db.id,
        "name": db.name,
        "owner": db.owner,
        "purpose": db.purpose,
        "plan": db.plan,
        "availability": db.availability,
        "backup_retention_days": db.backup_retention_days,
        "state": db.state,
        "created_at": db.created_at,
        "updated_at": db.updated_at,
        "operation_id": op.map(|o| o.id),
        "connection": conn,
    }))
}

/// Decides placement from the local replica (the leader re-checks uniqueness at apply time).
async fn plan_placement(pool: &SqlitePool) -> Result<(String, Option<Cluster>, Vec<String>), ApiError> {
    let hosts = query::hosts(pool).await?;
    let clusters = query::clusters(pool).await?;
    let counts = query::database_counts(pool).await?;
    let candidates: Vec<Candidate> = hosts
        .iter()
        .map(|h| {
            let cluster = clusters.iter().find(|c| c.primary_host == h.id);
            let dbs =
                cluster.and_then(|c| counts.iter().find(|(id, _)| id == &c.id)).map(|(_, n)| *n as u64).unwrap_or(0);
            Candidate {
                host_id: h.id.clone(),
                // A host without PostgreSQL binaries (pg_major 0) cannot take databases.
                active: h.state == host_state::ACTIVE && h.pg_major > 0,
                memory_budget_bytes: h.memory_budget_bytes as u64,
                disk_free_bytes: h.disk_free_bytes as u64,
                cluster_id: cluster.map(|c| c.id.clone()),
                databases: dbs,
            }
        })
        .collect();
    let decision = placement::place(&candidates).map_err(|e| ApiError::Unavailable(e.to_string()))?;
    match decision {
        Placement::Existing { cluster_id, .. } => {
            let taken = query::databases_in_cluster(pool, &cluster_id).await?.into_iter().map(|d| d.pg_name).collect();
            Ok((cluster_id, None, taken))
        }
        Placement::New { host_id } => {
            let host = hosts
                .iter()
                .find(|h| h.id == host_id)
                .ok_or_else(|| ApiError::Internal("placement chose an unknown host".into()))?;
            let cluster = Cluster {
                id: format!("single-{}", host.id),
                pg_major: host.pg_major,
                primary_host: host.id.clone(),
                port: host.pg_port,
                epoch: 1,
                state: cluster_state::CREATING.into(),
                created_at: crate::now(),
            };
            Ok((cluster.id.clone(), Some(cluster), Vec::new()))
        }
    }
}

fn new_password() -> String {
    use rand::distributions::{Alphanumeric, DistString};
    Alphanumeric.sample_string(&mut rand::thread_rng(), 32)
}

pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<NewDatabase>, JsonRejection>,
) -> Result<HttpResponse, ApiError> {
    let who = caller(&state, &headers).await?;
    let Json(req) = body?;
    let valid = validate::database(&req)?;
    let owner = match (&who, &req.owner) {
        (_, Some(o)) => o.clone(),
        (Caller::Team(t), None) => t.clone(),
        (Caller::Admin, None) => {
            return Err(ApiError::Unprocessable("owner is required: name the team that owns this database".into()))
        }
    };
    let idempotency_key = match headers.get("idempotency-key") {
        Some(v) => {
            let k = v.to_str().map_err(|_| ApiError::BadRequest("Idempotency-Key must be plain text".into()))?;
            if k.is_empty() || k.len() > 200 {
                return Err(ApiError::BadRequest("Idempotency-Key must be 1-200 characters".into()));
            }
            Some(k.to_string())
        }
        None => None,
    };
    state.node.linearizable_read().await?;
    let pool = state.node.store.pool();
    if query::team(pool, &owner).await?.is_none() {
        return Err(ApiError::Unprocessable(format!(
            "owner '{owner}' is not an existing team: create it first with POST /v1/teams (admin)"
        )));
    }
    if let Caller::Team(t) = &who {
        if t != &owner {
            return Err(ApiError::Forbidden(format!(
                "your token belongs to team '{t}': it can only create databases owned by '{t}'"
            )));
        }
    }
    let (cluster_id, new_cluster, taken) = plan_placement(pool).await?;
    let id = uuid::Uuid::new_v4().to_string();
    let pg_name = placement::pg_name(&valid.name, &id, &taken);
    let at = crate::now();
    let database = Database {
        id: id.clone(),
        name: valid.name,
        owner: owner.clone(),
        purpose: valid.purpose,
        plan: valid.plan,
        availability: valid.availability,
        backup_retention_days: valid.backup_retention_days,
        state: db_state::PROVISIONING.into(),
        cluster_id,
        pg_name: pg_name.clone(),
        role_name: pg_name,
        password: new_password(),
        created_at: at.clone(),
        updated_at: at.clone(),
    };
    let operation = Operation {
        id: uuid::Uuid::new_v4().to_string(),
        kind: "provision".into(),
        database_id: id,
        state: op_state::RUNNING.into(),
        step: "queued".into(),
        attempts: 0,
        error: String::new(),
        created_at: at.clone(),
        updated_at: at,
    };
    let actor = match &who {
        Caller::Admin => "admin".to_string(),
        Caller::Team(t) => format!("team:{t}"),
    };
    let cmd = Command::CreateDatabase { database, new_cluster, operation, idempotency_key, actor };
    let (db_id, replayed) = match state.node.write(cmd).await? {
        Response::DatabaseCreated { id, existing } => (id, existing),
        Response::Conflict { message } => return Err(ApiError::Conflict(message)),
        Response::NotFound { message } => return Err(ApiError::Unprocessable(message)),
        other => return Err(ApiError::Internal(format!("unexpected result {other:?}"))),
    };
    state.metrics.databases_created.fetch_add(u64::from(!replayed), std::sync::atomic::Ordering::Relaxed);
    let db =
        query::database(pool, &db_id).await?.ok_or_else(|| ApiError::Internal("created database vanished".into()))?;
    let body = view(pool, &db).await?;
    let mut resp = (StatusCode::ACCEPTED, Json(body)).into_response();
    if let Ok(loc) = HeaderValue::from_str(&format!("/v1/databases/{db_id}")) {
        resp.headers_mut().insert(axum::http::header::LOCATION, loc);
    }
    if replayed {
        resp.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

pub async fn list(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let who = caller(&state, &headers).await?;
    state.node.linearizable_read().await?;
    let pool = state.node.store.pool();
    let dbs = match &who {
        Caller::Admin => query::all_databases(pool).await?,
        Caller::Team(t) => query::databases_of(pool, t).await?,
    };
    let mut out = Vec::with_capacity(dbs.len());
    for db in &dbs {
        out.push(view(pool, db).await?);
    }
    Ok(Json(json!({"databases": out})))
}

pub async fn get(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&state, &headers).await?;
    state.node.linearizable_read().await?;
    let pool = state.node.store.pool();
    let not_found = || ApiError::NotFound(format!("database {id} does not exist"));
    let db = query::database(pool, &id).await?.ok_or_else(not_found)?;
    if let Caller::Team(t) = &who {
        if &db.owner != t {
            return Err(not_found());
        }
    }
    Ok(Json(view(pool, &db).await?))
}
