//! `POST /v1/databases`, `GET /v1/databases`, `GET /v1/databases/{id}`. A team sees only its own
//! databases: another team's database is reported as not found.

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::Json;
use serde_json::{json, Value};
use sqlx::SqlitePool;

use super::auth::{caller, Caller};
use super::error::ApiError;
use super::extract::Path;
use super::validate::{self, NewDatabase, RestoreRequest, ValidDatabase};
use super::AppState;
use crate::reconcile::{placement, plan};
use crate::state::model::{db_state, op_kind, Database, Operation, RestoreSource};
use crate::state::{query, Command, Response};

/// The libpq connection details of an active database: every member in the URI, primary first,
/// with `target_session_attrs=read-write` so clients follow a failover without a proxy, and
/// `sslmode=require` since servers refuse plaintext TCP; for HA clusters also a read-only URI that
/// prefers standbys.
pub async fn connection(pool: &SqlitePool, db: &Database) -> Result<Value, sqlx::Error> {
    let Some(cluster) = query::cluster(pool, &db.cluster_id).await? else { return Ok(Value::Null) };
    let Some(primary) = query::host(pool, &cluster.primary_host).await? else { return Ok(Value::Null) };
    let mut endpoints = Vec::new();
    for m in query::members(pool, &cluster.id).await? {
        if let Some(h) = query::host(pool, &m.host_id).await? {
            endpoints.push(format!("{}:{}", h.pg_host, m.port));
        }
    }
    if endpoints.is_empty() {
        endpoints.push(format!("{}:{}", primary.pg_host, cluster.port));
    }
    let hosts = endpoints.join(",");
    let base = format!("postgresql://{}:{}@{}/{}", db.role_name, db.password, hosts, db.pg_name);
    let mut conn = json!({
        // connect_timeout applies to each listed host: a frozen or partitioned member must not
        // hold a client back from trying the next one. Servers refuse plaintext TCP.
        "uri": format!("{base}?target_session_attrs=read-write&connect_timeout=2&sslmode=require"),
        "host": primary.pg_host,
        "port": cluster.port,
        "hosts": endpoints,
        "database": db.pg_name,
        "user": db.role_name,
        "password": db.password,
        "sslmode": "require",
    });
    if cluster.availability == "ha" {
        conn["read_only_uri"] =
            json!(format!("{base}?target_session_attrs=prefer-standby&connect_timeout=2&sslmode=require"));
    }
    Ok(conn)
}

/// The database `id` as `who` may see it: another team's is reported as not found. Makes the
/// read linearizable first.
pub async fn visible(state: &AppState, who: &Caller, id: &str) -> Result<Database, ApiError> {
    state.node.linearizable_read().await?;
    let not_found = || ApiError::NotFound(format!("database {id} does not exist"));
    let db = query::database(state.node.store.pool(), id).await?.ok_or_else(not_found)?;
    match who {
        Caller::Team(t) if &db.owner != t => Err(not_found()),
        _ => Ok(db),
    }
}

/// JSON view of a database; `connection` only once it is usable.
pub async fn view(pool: &SqlitePool, db: &Database) -> Result<Value, sqlx::Error> {
    let usable = db.state == db_state::ACTIVE || db.state == db_state::DEPRECATED;
    let conn = if usable { connection(pool, db).await? } else { Value::Null };
    let op = query::provision_operation_of(pool, &db.id).await?;
    let restored_from = query::restore_source(pool, &db.id).await?.map(|r| {
        json!({"database_id": r.source_database_id, "target_time": (!r.target_time.is_empty()).then_some(r.target_time)})
    });
    let deprecation =
        (db.state == db_state::DEPRECATED).then(|| json!({"reason": db.deprecation_reason, "sunset_at": db.sunset_at}));
    let mut warnings = Vec::new();
    if db.state == db_state::DEPRECATED {
        warnings.push(format!(
            "this database is deprecated ({}) and planned to go away at {}",
            db.deprecation_reason, db.sunset_at
        ));
    }
    let archive = (db.state == db_state::ARCHIVED || !db.archive_location.is_empty())
        .then(|| json!({"location": db.archive_location, "bytes": db.archive_bytes}));
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
        "restored_from": restored_from,
        "deprecation": deprecation,
        "archive": archive,
        "warnings": warnings,
        "connection": conn,
    }))
}

pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<NewDatabase>, JsonRejection>,
) -> Result<HttpResponse, ApiError> {
    let who = caller(&state, &headers).await?;
    who.require_write()?;
    let Json(req) = body?;
    let valid = validate::database(&req)?;
    let owner = match (&who, &req.owner) {
        (_, Some(o)) => o.clone(),
        (Caller::Team(t), None) => t.clone(),
        (Caller::Admin | Caller::Operator(_), None) => {
            return Err(ApiError::Unprocessable("owner is required: name the team that owns this database".into()))
        }
    };
    let idempotency_key = idempotency_key(&headers)?;
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
    let planned = plan::plan_placement(pool, &state.ctx.placing, &valid.availability, &plan::Avoid::default()).await?;
    let actor = who.actor();
    let new = NewRecord { owner, valid, kind: op_kind::PROVISION, restore_of: None };
    submit(&state, planned, new, idempotency_key, actor).await
}

/// What a new database record is made of, besides its placement.
struct NewRecord {
    owner: String,
    valid: ValidDatabase,
    /// Operation kind that brings it up: `provision`, or `restore` for a point-in-time copy.
    kind: &'static str,
    restore_of: Option<RestoreSource>,
}

/// Writes a new database with its operation through Raft and answers 202 with its view.
async fn submit(
    state: &AppState,
    planned: plan::Planned,
    new: NewRecord,
    idempotency_key: Option<String>,
    actor: String,
) -> Result<HttpResponse, ApiError> {
    let pool = state.node.store.pool();
    let id = uuid::Uuid::new_v4().to_string();
    let pg_name = placement::pg_name(&new.valid.name, &id, &planned.taken_pg_names);
    let at = crate::now();
    let valid = new.valid;
    let database = Database {
        id: id.clone(),
        name: valid.name,
        owner: new.owner,
        purpose: valid.purpose,
        plan: valid.plan,
        availability: valid.availability,
        backup_retention_days: valid.backup_retention_days,
        state: db_state::PROVISIONING.into(),
        cluster_id: planned.cluster_id,
        pg_name: pg_name.clone(),
        role_name: pg_name,
        password: plan::new_password(),
        created_at: at.clone(),
        updated_at: at.clone(),
        deprecation_reason: String::new(),
        sunset_at: String::new(),
        archive_location: String::new(),
        archive_bytes: 0,
        deleted_at: String::new(),
        archive_key: String::new(),
        archive_sha256: String::new(),
    };
    let operation = Operation::start(new.kind, &id, &at);
    let restore_of = new.restore_of.map(|r| RestoreSource { database_id: id, created_at: at, ..r });
    let cmd = Command::CreateDatabase {
        database,
        new_cluster: planned.new_cluster,
        new_members: planned.new_members,
        operation,
        idempotency_key,
        actor,
        restore_of,
    };
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

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    match headers.get("idempotency-key") {
        Some(v) => {
            let k = v.to_str().map_err(|_| ApiError::BadRequest("Idempotency-Key must be plain text".into()))?;
            if k.is_empty() || k.len() > 200 {
                return Err(ApiError::BadRequest("Idempotency-Key must be 1-200 characters".into()));
            }
            Ok(Some(k.to_string()))
        }
        None => Ok(None),
    }
}

/// `POST /v1/databases/{id}/restore`: a new database, owned by the same team, holding the
/// source database as it was at `target_time` (or as the archive holds it last), restored from
/// the source cluster's backups and WAL. The source keeps running untouched.
pub async fn restore(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<RestoreRequest>, JsonRejection>,
) -> Result<HttpResponse, ApiError> {
    let who = caller(&state, &headers).await?;
    who.require_write()?;
    let Json(req) = body?;
    let idempotency_key = idempotency_key(&headers)?;
    let source = visible(&state, &who, &id).await?;
    let pool = state.node.store.pool();
    if source.state == db_state::ARCHIVED {
        if req.target_time.is_some() || req.name.is_some() {
            return Err(ApiError::Unprocessable(
                "an archived database comes back as it was archived, under its own id and name: \
                 send no target_time and no name"
                    .into(),
            ));
        }
        return unarchive(&state, &who, source).await;
    }
    if source.state != db_state::ACTIVE && source.state != db_state::DEPRECATED {
        return Err(ApiError::Conflict(format!(
            "database {id} is {}: only a live database can be copied to a point in time, or an archived one \
             brought back",
            source.state
        )));
    }
    let first = query::first_backup_finished(pool, &source.cluster_id).await?;
    let valid = validate::restore(&req, &source.name, &source.created_at, first.as_deref(), chrono::Utc::now())?;
    let target = valid.target_time.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
    let new = ValidDatabase {
        name: valid.name,
        purpose: format!("copy of {} at {}", source.name, target.as_deref().unwrap_or("the latest archived point")),
        plan: source.plan.clone(),
        availability: source.availability.clone(),
        backup_retention_days: source.backup_retention_days,
    };
    let planned = plan::plan_placement(pool, &state.ctx.placing, &new.availability, &plan::Avoid::default()).await?;
    let restore_of = RestoreSource {
        database_id: String::new(),
        source_database_id: source.id.clone(),
        source_cluster_id: source.cluster_id.clone(),
        source_pg_name: source.pg_name.clone(),
        target_time: target.unwrap_or_default(),
        created_at: String::new(),
    };
    let new =
        NewRecord { owner: source.owner.clone(), valid: new, kind: op_kind::RESTORE, restore_of: Some(restore_of) };
    submit(&state, planned, new, idempotency_key, who.actor()).await
}

/// Brings an archived database back under its own id: a new placement, then the `unarchive`
/// operation provisions it and loads its archive.
async fn unarchive(state: &AppState, who: &Caller, db: Database) -> Result<HttpResponse, ApiError> {
    let pool = state.node.store.pool();
    let planned = plan::plan_placement(pool, &state.ctx.placing, &db.availability, &plan::Avoid::default()).await?;
    let pg_name = placement::pg_name(&db.name, &db.id, &planned.taken_pg_names);
    let at = crate::now();
    let operation = Operation::start(op_kind::UNARCHIVE, &db.id, &at);
    let cmd = Command::Unarchive {
        id: db.id.clone(),
        cluster_id: planned.cluster_id,
        pg_name,
        new_cluster: planned.new_cluster,
        new_members: planned.new_members,
        operation,
        at,
        actor: who.actor(),
    };
    match state.node.write(cmd).await? {
        Response::Done => {}
        Response::Conflict { message } => return Err(ApiError::Conflict(message)),
        Response::NotFound { message } => return Err(ApiError::NotFound(message)),
        other => return Err(ApiError::Internal(format!("unexpected result {other:?}"))),
    }
    let db = query::database(pool, &db.id).await?.ok_or_else(|| ApiError::Internal("database vanished".into()))?;
    Ok((StatusCode::ACCEPTED, Json(view(pool, &db).await?)).into_response())
}

/// `POST /v1/databases/{id}/archive`: a verified final backup, then the live data is dropped;
/// the database stays listed as `archived` with where its archive is.
pub async fn archive(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<HttpResponse, ApiError> {
    let who = caller(&state, &headers).await?;
    who.require_write()?;
    visible(&state, &who, &id).await?;
    let pool = state.node.store.pool();
    let not_found = || ApiError::NotFound(format!("database {id} does not exist"));
    let at = crate::now();
    let operation = Operation::start(op_kind::ARCHIVE, &id, &at);
    match state.node.write(Command::StartArchive { id: id.clone(), operation, at, actor: who.actor() }).await? {
        Response::Done => {}
        Response::Conflict { message } => return Err(ApiError::Conflict(message)),
        Response::NotFound { message } => return Err(ApiError::NotFound(message)),
        other => return Err(ApiError::Internal(format!("unexpected result {other:?}"))),
    }
    let db = query::database(pool, &id).await?.ok_or_else(not_found)?;
    Ok((StatusCode::ACCEPTED, Json(view(pool, &db).await?)).into_response())
}

pub async fn list(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let who = caller(&state, &headers).await?;
    state.node.linearizable_read().await?;
    let pool = state.node.store.pool();
    let dbs = match &who {
        Caller::Admin | Caller::Operator(_) => query::all_databases(pool).await?,
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
    let db = visible(&state, &who, &id).await?;
    Ok(Json(view(state.node.store.pool(), &db).await?))
}

/// `POST /v1/databases/{id}/credentials/rotate`: a new generated password for the database's
/// role. The new password is committed through Raft first (it is what `GET` returns from then
/// on), then set on the primary (as a SCRAM verifier; standbys follow through WAL). If the
/// primary cannot be reached the call fails with 503 and may simply be repeated.
pub async fn rotate_credentials(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&state, &headers).await?;
    who.require_write()?;
    let db = visible(&state, &who, &id).await?;
    if db.state != db_state::ACTIVE && db.state != db_state::DEPRECATED {
        return Err(ApiError::Conflict(format!(
            "database {id} is {}: only an active or deprecated database has credentials to rotate",
            db.state
        )));
    }
    let password = plan::new_password();
    let cmd = Command::SetDatabasePassword {
        id: id.clone(),
        password: password.clone(),
        at: crate::now(),
        actor: who.actor(),
    };
    match state.node.write(cmd).await? {
        Response::Done => {}
        Response::NotFound { message } => return Err(ApiError::NotFound(message)),
        other => return Err(ApiError::Internal(format!("unexpected result {other:?}"))),
    }
    let pool = state.node.store.pool();
    let cluster = query::cluster(pool, &db.cluster_id)
        .await?
        .ok_or_else(|| ApiError::Internal(format!("cluster {} of database {id} is missing", db.cluster_id)))?;
    let primary = query::host(pool, &cluster.primary_host)
        .await?
        .ok_or_else(|| ApiError::Internal(format!("primary host {} is missing", cluster.primary_host)))?;
    let unavailable = |e: String| {
        ApiError::Unavailable(format!(
            "the new password is recorded but the primary could not apply it ({e}); repeat this call"
        ))
    };
    let mut agent = state.ctx.agents.get(&primary.agent_addr).await.map_err(|e| unavailable(e.to_string()))?;
    let mut req = tonic::Request::new(steward_proto::v1::EnsureDatabaseRequest {
        cluster_id: cluster.id.clone(),
        epoch: cluster.epoch as u64,
        database: db.pg_name.clone(),
        role: db.role_name.clone(),
        password_scram: steward_agent::pg::scram_verifier(&password),
    });
    req.set_timeout(std::time::Duration::from_secs(30));
    agent.ensure_database(req).await.map_err(|s| unavailable(s.message().to_string()))?;
    let db =
        query::database(pool, &id).await?.ok_or_else(|| ApiError::NotFound(format!("database {id} does not exist")))?;
    Ok(Json(view(pool, &db).await?))
}
