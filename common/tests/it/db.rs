//! The pools and their failures on the real PostgreSQL and MariaDB servers: batch transactions
//! planned as key lookups; busy, unreachable and faulty databases told apart.

use std::time::{Duration, Instant};

use redpacket_common::Problem;
use redpacket_common::db::{
    ACQUIRE_TIMEOUT, CONNECT_WAIT, Failure, classify, connect, plan_as_lookups,
};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, Statement, TransactionTrait};

fn postgres_url() -> String {
    std::env::var("RP_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn mariadb_url() -> String {
    std::env::var("RP_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/mysql".to_owned())
}

async fn pool(url: &str, connections: u32) -> DatabaseConnection {
    connect(url, connections)
        .await
        .unwrap_or_else(|err| panic!("the test server at {url} must be running: {err}"))
}

/// The status, code and `Retry-After` a service answers for `err`.
fn answer(err: &DbErr) -> (u16, &'static str, Option<u64>) {
    let problem = Problem::from_db(err, "the test database");
    (problem.status.as_u16(), problem.code, problem.retry_after_s)
}

/// The plan of `sql`, one line per node.
async fn plan<C: ConnectionTrait>(txn: &C, sql: &str) -> String {
    txn.query_all_raw(Statement::from_string(
        txn.get_database_backend(),
        format!("EXPLAIN {sql}"),
    ))
    .await
    .unwrap()
    .iter()
    .map(|row| row.try_get_by_index::<String>(0).unwrap())
    .collect::<Vec<_>>()
    .join("\n")
}

#[tokio::test]
async fn a_batch_lookup_on_a_young_table_probes_the_key_instead_of_reading_it_whole() {
    let db = pool(&postgres_url(), 1).await;
    let txn = db.begin().await.unwrap();
    // A temporary table: this transaction's own, never analyzed, as a table is in its first
    // minutes, 20,000 rows as after a burst of credits.
    txn.execute_unprepared(
        "CREATE TEMPORARY TABLE claims (id varchar(64) PRIMARY KEY, status varchar(16) NOT NULL) \
         ON COMMIT DROP; \
         INSERT INTO claims SELECT 'c' || n, 'pending' FROM generate_series(1, 20000) AS n",
    )
    .await
    .unwrap();
    let keys: Vec<String> = (1..=200).map(|n| format!("'c{}'", n * 97)).collect();
    let batch = format!(
        "UPDATE claims SET status = 'credited' WHERE id IN ({}) AND status = 'pending'",
        keys.join(", ")
    );
    let before = plan(&txn, &batch).await;
    assert!(
        before.contains("Seq Scan on claims"),
        "the planner's own choice reads the whole table:\n{before}"
    );
    plan_as_lookups(&txn).await.unwrap();
    let after = plan(&txn, &batch).await;
    assert!(
        after.contains("Index Scan using claims_pkey"),
        "planned as lookups:\n{after}"
    );
    // A statement no index serves still runs.
    let whole = plan(&txn, "SELECT count(*) FROM claims WHERE status = 'pending'").await;
    assert!(whole.contains("Scan on claims"), "{whole}");
    txn.rollback().await.unwrap();
}

mod a_statement_that_finds_every_connection_taken_is_answered_503_within_the_acquire_wait {
    use super::*;

    async fn scenario(url: String) {
        let db = pool(&url, 1).await;
        // The pool's only connection, held by an open transaction.
        let held = db.begin().await.unwrap();
        let started = Instant::now();
        let err = db.execute_unprepared("SELECT 1").await.unwrap_err();
        let waited = started.elapsed();
        assert_eq!(classify(&err), Failure::Busy, "{err}");
        assert_eq!(answer(&err), (503, "overloaded", Some(1)));
        assert!(
            waited >= ACQUIRE_TIMEOUT - Duration::from_millis(50)
                && waited < ACQUIRE_TIMEOUT + Duration::from_millis(1500),
            "failed after {waited:?}, the wait is {ACQUIRE_TIMEOUT:?}"
        );
        held.rollback().await.unwrap();
        db.execute_unprepared("SELECT 1")
            .await
            .expect("the freed connection serves again");
        db.close().await.unwrap();
    }

    #[tokio::test]
    async fn on_postgres() {
        scenario(postgres_url()).await;
    }

    #[tokio::test]
    async fn on_mariadb() {
        scenario(mariadb_url()).await;
    }
}

#[tokio::test]
async fn on_postgres_a_statement_or_lock_timeout_is_busy_and_a_bug_stays_a_fault() {
    let db = pool(&postgres_url(), 2).await;
    let txn = db.begin().await.unwrap();
    txn.execute_unprepared("SET LOCAL statement_timeout = 50")
        .await
        .unwrap();
    let err = txn
        .execute_unprepared("SELECT pg_sleep(2)")
        .await
        .unwrap_err();
    assert_eq!(classify(&err), Failure::Busy, "statement_timeout: {err}");
    assert_eq!(answer(&err), (503, "overloaded", Some(1)));
    txn.rollback().await.unwrap();

    // lock_timeout, on an advisory lock another transaction holds.
    let key = rand_key();
    let holder = db.begin().await.unwrap();
    holder
        .execute_unprepared(&format!("SELECT pg_advisory_xact_lock({key})"))
        .await
        .unwrap();
    let waiter = db.begin().await.unwrap();
    waiter
        .execute_unprepared("SET LOCAL lock_timeout = 50")
        .await
        .unwrap();
    let err = waiter
        .execute_unprepared(&format!("SELECT pg_advisory_xact_lock({key})"))
        .await
        .unwrap_err();
    assert_eq!(classify(&err), Failure::Busy, "lock_timeout: {err}");
    waiter.rollback().await.unwrap();
    holder.rollback().await.unwrap();

    let txn = db.begin().await.unwrap();
    txn.execute_unprepared(
        "CREATE TEMPORARY TABLE once (id int PRIMARY KEY) ON COMMIT DROP; \
         INSERT INTO once VALUES (1)",
    )
    .await
    .unwrap();
    let err = txn
        .execute_unprepared("INSERT INTO once VALUES (1)")
        .await
        .unwrap_err();
    assert_eq!(classify(&err), Failure::Fault, "unique violation: {err}");
    assert_eq!(answer(&err), (500, "internal", None));
    txn.rollback().await.unwrap();
    for bug in ["SELECT 1 / 0", "SELEC 1", "SELECT 'x'::int"] {
        let err = db.execute_unprepared(bug).await.unwrap_err();
        assert_eq!(classify(&err), Failure::Fault, "{bug}: {err}");
    }
    db.close().await.unwrap();
}

#[tokio::test]
async fn on_mariadb_a_statement_timeout_is_busy_and_a_bug_stays_a_fault() {
    let db = pool(&mariadb_url(), 1).await;
    let err = db
        .execute_unprepared("SET STATEMENT max_statement_time = 0.05 FOR SELECT SLEEP(2)")
        .await
        .unwrap_err();
    assert_eq!(classify(&err), Failure::Busy, "max_statement_time: {err}");
    assert_eq!(answer(&err), (503, "overloaded", Some(1)));

    let txn = db.begin().await.unwrap();
    txn.execute_unprepared("CREATE TEMPORARY TABLE once (id INT PRIMARY KEY)")
        .await
        .unwrap();
    txn.execute_unprepared("INSERT INTO once VALUES (1)")
        .await
        .unwrap();
    let err = txn
        .execute_unprepared("INSERT INTO once VALUES (1)")
        .await
        .unwrap_err();
    assert_eq!(classify(&err), Failure::Fault, "duplicate key: {err}");
    assert_eq!(answer(&err), (500, "internal", None));
    txn.rollback().await.unwrap();
    let err = db.execute_unprepared("SELEC 1").await.unwrap_err();
    assert_eq!(classify(&err), Failure::Fault, "{err}");
    db.close().await.unwrap();
}

#[tokio::test]
async fn a_database_nobody_listens_for_is_retried_at_start_for_the_connect_wait_then_transient() {
    // Port 1 on the loopback: refused at once, every time.
    let started = Instant::now();
    let err = connect("postgres://postgres@127.0.0.1:1/postgres", 1)
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert!(classify(&err).is_transient(), "{err}");
    assert_eq!(answer(&err).0, 503);
    assert!(
        waited >= CONNECT_WAIT && waited < CONNECT_WAIT + ACQUIRE_TIMEOUT + Duration::from_secs(2),
        "gave up after {waited:?}"
    );
}

/// A key for an advisory lock no other test takes.
fn rand_key() -> i64 {
    i64::from(uuid::Uuid::new_v4().as_fields().0)
}
