//! Batch transactions planned as key lookups, on the real PostgreSQL server.

use redpacket_common::db::{connect, plan_as_lookups};
use sea_orm::{ConnectionTrait, Statement, TransactionTrait};

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
    let url = std::env::var("RP_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let db = connect(&url, 1)
        .await
        .expect("the PostgreSQL test server must be running");
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
