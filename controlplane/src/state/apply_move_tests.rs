//! The move commands at apply time: what they refuse and what they change, on a real state
//! database.

use super::*;
use crate::state::model::{cluster_state, move_state, Cluster, Database, Host, Member, Move, Operation};
use crate::state::{query, Store};

fn cluster(id: &str, host: &str) -> (Cluster, Vec<Member>) {
    let c = Cluster {
        id: id.into(),
        pg_major: 15,
        primary_host: host.into(),
        port: 5432,
        epoch: 1,
        state: cluster_state::READY.into(),
        created_at: "t0".into(),
        availability: "single".into(),
        replication_password: String::new(),
    };
    let m = Member {
        cluster_id: id.into(),
        host_id: host.into(),
        port: 5432,
        role: "primary".into(),
        state: cluster_state::READY.into(),
    };
    (c, vec![m])
}

fn database(id: &str, cluster: &str) -> Database {
    Database {
        id: id.into(),
        name: "orders".into(),
        owner: "shop".into(),
        purpose: "p".into(),
        plan: "small".into(),
        availability: "single".into(),
        backup_retention_days: 7,
        state: db_state::ACTIVE.into(),
        cluster_id: cluster.into(),
        pg_name: "orders".into(),
        role_name: "orders".into(),
        password: "pw".into(),
        created_at: "t0".into(),
        updated_at: "t0".into(),
        deprecation_reason: String::new(),
        sunset_at: String::new(),
        archive_location: String::new(),
        archive_bytes: 0,
        deleted_at: String::new(),
        archive_key: String::new(),
        archive_sha256: String::new(),
    }
}

fn move_of(op: &str, db: &str) -> Move {
    Move {
        operation_id: op.into(),
        database_id: db.into(),
        source_cluster_id: "c-a".into(),
        source_pg_name: "orders".into(),
        source_role: "orders".into(),
        target_cluster_id: "c-b".into(),
        target_pg_name: "orders".into(),
        target_role: "orders".into(),
        move_password: "secret".into(),
        requested_by: "operator".into(),
        state: move_state::COPYING.into(),
        abort_reason: String::new(),
        write_pause_ms: 0,
        created_at: "t1".into(),
        finished_at: String::new(),
    }
}

async fn run(store: &Store, cmd: Command) -> Response {
    store.writer().run(move |conn| apply(conn, &cmd)).await.unwrap()
}

fn start(mv: &Move) -> Command {
    Command::StartMove {
        mv: mv.clone(),
        operation: Operation { id: mv.operation_id.clone(), ..Operation::start(op_kind::MOVE, &mv.database_id, "t1") },
        new_cluster: None,
        new_members: vec![],
        actor: "operator".into(),
    }
}

/// A team, two hosts with a single cluster each, and database `d1` on the first.
async fn setup() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).await.unwrap();
    let team = Command::CreateTeam {
        name: "shop".into(),
        contact: "c".into(),
        token_hash: "h".into(),
        at: "t0".into(),
        actor: "a".into(),
        token_id: None,
    };
    assert_eq!(run(&store, team).await, Response::Done);
    for (h, c) in [("a", "c-a"), ("b", "c-b")] {
        run(&store, Command::UpsertHost { host: Host::for_test(h) }).await;
        let (cl, members) = cluster(c, h);
        let mut db = database(&format!("seed-{h}"), c);
        db.name = format!("seed_{h}");
        db.pg_name = db.name.clone();
        db.role_name = db.name.clone();
        let create = Command::CreateDatabase {
            database: db.clone(),
            new_cluster: Some(cl),
            new_members: members,
            operation: Operation::start(op_kind::PROVISION, &db.id, "t0"),
            idempotency_key: None,
            actor: "a".into(),
            restore_of: None,
        };
        assert!(matches!(run(&store, create).await, Response::DatabaseCreated { .. }));
    }
    let create = Command::CreateDatabase {
        database: database("d1", "c-a"),
        new_cluster: None,
        new_members: vec![],
        operation: Operation::start(op_kind::PROVISION, "d1", "t0"),
        idempotency_key: None,
        actor: "a".into(),
        restore_of: None,
    };
    assert!(matches!(run(&store, create).await, Response::DatabaseCreated { .. }));
    (dir, store)
}

#[tokio::test]
async fn a_switched_move_places_the_database_on_its_target() {
    let (_dir, store) = setup().await;
    let mv = move_of("op-1", "d1");
    assert_eq!(run(&store, start(&mv)).await, Response::Done);
    // One move at a time, and no archive while it runs.
    let second = move_of("op-2", "d1");
    assert!(
        matches!(run(&store, start(&second)).await, Response::Conflict { message } if message.contains("being moved"))
    );
    let archive = Command::StartArchive {
        id: "d1".into(),
        operation: Operation::start(op_kind::ARCHIVE, "d1", "t2"),
        at: "t2".into(),
        actor: "team:shop".into(),
    };
    assert!(matches!(run(&store, archive).await, Response::Conflict { message } if message.contains("being moved")));
    let switch = Command::SwitchMove { operation_id: "op-1".into(), write_pause_ms: 420, at: "t3".into() };
    assert_eq!(run(&store, switch).await, Response::Done);
    let db = query::database(store.pool(), "d1").await.unwrap().unwrap();
    assert_eq!(db.cluster_id, "c-b");
    // Too late to abort once switched; the end is a success.
    let abort =
        Command::AbortMove { operation_id: "op-1".into(), reason: "x".into(), at: "t4".into(), actor: "o".into() };
    assert!(matches!(run(&store, abort).await, Response::Conflict { message } if message.contains("too late")));
    let finish = Command::FinishMove {
        operation_id: "op-1".into(),
        succeeded: true,
        error: String::new(),
        detail: "writes paused 420 ms".into(),
        at: "t5".into(),
    };
    assert_eq!(run(&store, finish).await, Response::Done);
    let op = query::operation(store.pool(), "op-1").await.unwrap().unwrap();
    assert_eq!((op.state.as_str(), op.detail.as_str()), ("succeeded", "writes paused 420 ms"));
    assert_eq!(query::move_of(store.pool(), "op-1").await.unwrap().unwrap().state, move_state::DONE);
}

#[tokio::test]
async fn an_aborted_move_cannot_switch_and_ends_rolled_back() {
    let (_dir, store) = setup().await;
    let mv = move_of("op-1", "d1");
    assert_eq!(run(&store, start(&mv)).await, Response::Done);
    let abort = Command::AbortMove {
        operation_id: "op-1".into(),
        reason: "aborted by operator".into(),
        at: "t2".into(),
        actor: "o".into(),
    };
    assert_eq!(run(&store, abort).await, Response::Done);
    let switch = Command::SwitchMove { operation_id: "op-1".into(), write_pause_ms: 1, at: "t3".into() };
    assert!(matches!(run(&store, switch).await, Response::Conflict { .. }));
    assert_eq!(query::database(store.pool(), "d1").await.unwrap().unwrap().cluster_id, "c-a");
    // Even a driver that thinks it succeeded cannot turn a move that never switched into one.
    let finish = Command::FinishMove {
        operation_id: "op-1".into(),
        succeeded: true,
        error: "aborted by operator".into(),
        detail: String::new(),
        at: "t4".into(),
    };
    assert_eq!(run(&store, finish).await, Response::Done);
    assert_eq!(query::operation(store.pool(), "op-1").await.unwrap().unwrap().state, "failed");
    assert_eq!(query::move_of(store.pool(), "op-1").await.unwrap().unwrap().state, move_state::ROLLED_BACK);
    // A new move may start now.
    assert_eq!(run(&store, start(&move_of("op-2", "d1"))).await, Response::Done);
}

#[tokio::test]
async fn moves_need_a_live_database_and_a_free_name() {
    let (_dir, store) = setup().await;
    let mut mv = move_of("op-1", "d1");
    mv.target_pg_name = "seed_b".into();
    assert!(matches!(run(&store, start(&mv)).await, Response::Conflict { message } if message.contains("raced")));
    let mut mv = move_of("op-2", "d1");
    mv.target_role = "seed_b".into();
    assert!(matches!(run(&store, start(&mv)).await, Response::Conflict { .. }));
    let mut mv = move_of("op-3", "d1");
    mv.source_cluster_id = "c-b".into();
    assert!(
        matches!(run(&store, start(&mv)).await, Response::Conflict { message } if message.contains("placement changed"))
    );
    sqlx::query("UPDATE databases SET state = 'archived' WHERE id = 'd1'").execute(store.pool()).await.unwrap();
    let mv = move_of("op-4", "d1");
    assert!(matches!(run(&store, start(&mv)).await, Response::Conflict { message } if message.contains("only a live")));
    // Draining is kept apart from liveness: a re-registration does not end it.
    let drain = Command::SetHostDraining { host_id: "a".into(), draining: true, at: "t".into(), actor: "o".into() };
    assert_eq!(run(&store, drain).await, Response::Done);
    run(&store, Command::UpsertHost { host: Host::for_test("a") }).await;
    let a = query::host(store.pool(), "a").await.unwrap().unwrap();
    assert!(a.draining && a.shown_state() == "draining" && !a.accepts_databases());
}
