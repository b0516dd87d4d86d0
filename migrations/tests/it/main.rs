//! Every migration applies and reverts on PostgreSQL, MariaDB and SQLite.

use redpacket_common::testing::{Backend, TestDatabase};
use redpacket_migrations::{Migrator, MigratorTrait};
use sea_orm::{ConnectionTrait, Statement};

async fn tables(db: &sea_orm::DatabaseConnection) -> Vec<String> {
    let backend = db.get_database_backend();
    let sql = match backend {
        sea_orm::DbBackend::Postgres => {
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' \
             AND (table_name LIKE 'wallet%' OR table_name LIKE 'campaign%' OR table_name LIKE 'saga%') ORDER BY table_name"
        }
        sea_orm::DbBackend::MySql => {
            "SELECT table_name FROM information_schema.tables WHERE table_schema = DATABASE() \
             AND (table_name LIKE 'wallet%' OR table_name LIKE 'campaign%' OR table_name LIKE 'saga%') ORDER BY table_name"
        }
        _ => {
            "SELECT name FROM sqlite_master WHERE type = 'table' AND (name LIKE 'wallet%' OR name LIKE 'campaign%' OR name LIKE 'saga%') ORDER BY name"
        }
    };
    db.query_all_raw(Statement::from_string(backend, sql))
        .await
        .unwrap()
        .iter()
        .map(|row| row.try_get_by_index::<String>(0).unwrap())
        .collect()
}

async fn every_migration_goes_up_and_down(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let db = redpacket_common::db::connect(&database.url, 2)
        .await
        .unwrap();
    let total = Migrator::migrations().len();

    Migrator::up(&db, None).await.unwrap();
    assert_eq!(
        Migrator::get_pending_migrations(&db).await.unwrap().len(),
        0
    );
    assert_eq!(
        tables(&db).await,
        [
            "campaign_campaigns",
            "campaign_claims",
            "campaign_events",
            "campaign_packets",
            "campaign_stats",
            "saga_dead_letters",
            "saga_sagas",
            "wallet_accounts",
            "wallet_entries",
            "wallet_transfers"
        ]
    );
    // Applying again is a no-op.
    Migrator::up(&db, None).await.unwrap();

    Migrator::down(&db, None).await.unwrap();
    assert_eq!(
        Migrator::get_pending_migrations(&db).await.unwrap().len(),
        total
    );
    assert!(tables(&db).await.is_empty());

    // And up once more after a full revert, step by step.
    for _ in 0..total {
        Migrator::up(&db, Some(1)).await.unwrap();
    }
    assert_eq!(
        Migrator::get_applied_migrations(&db).await.unwrap().len(),
        total
    );
    db.close().await.unwrap();
    database.drop_database().await;
}

#[tokio::test]
async fn migrations_go_up_and_down_on_postgres() {
    every_migration_goes_up_and_down(Backend::Postgres).await;
}

#[tokio::test]
async fn migrations_go_up_and_down_on_mariadb() {
    every_migration_goes_up_and_down(Backend::MySql).await;
}

#[tokio::test]
async fn migrations_go_up_and_down_on_sqlite() {
    every_migration_goes_up_and_down(Backend::Sqlite).await;
}

/// Every string column of the project's tables, with its collation: `(table.column,
/// collation, compares bytes)`. sea-orm-migration's own `seaql_migrations` is left out.
async fn string_columns(db: &sea_orm::DatabaseConnection) -> Vec<(String, String, bool)> {
    let backend = db.get_database_backend();
    match backend {
        sea_orm::DbBackend::MySql => {
            let sql = "SELECT CONCAT(TABLE_NAME, '.', COLUMN_NAME), COLLATION_NAME \
                       FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() \
                       AND COLLATION_NAME IS NOT NULL AND TABLE_NAME <> 'seaql_migrations' \
                       ORDER BY TABLE_NAME, ORDINAL_POSITION";
            let rows = db
                .query_all_raw(Statement::from_string(backend, sql))
                .await
                .unwrap();
            rows.iter()
                .map(|row| {
                    let column: String = row.try_get_by_index(0).unwrap();
                    let collation: String = row.try_get_by_index(1).unwrap();
                    let binary = collation.ends_with("_bin");
                    (column, collation, binary)
                })
                .collect()
        }
        sea_orm::DbBackend::Postgres => {
            // A deterministic collation calls strings equal only when their bytes are.
            let sql = "SELECT c.relname::text || '.' || a.attname::text, coll.collname::text, \
                       coll.collisdeterministic FROM pg_attribute a \
                       JOIN pg_class c ON c.oid = a.attrelid \
                       JOIN pg_namespace n ON n.oid = c.relnamespace \
                       JOIN pg_collation coll ON coll.oid = a.attcollation \
                       WHERE n.nspname = 'public' AND c.relkind = 'r' AND a.attnum > 0 \
                       AND NOT a.attisdropped AND c.relname <> 'seaql_migrations' \
                       ORDER BY c.relname, a.attnum";
            let rows = db
                .query_all_raw(Statement::from_string(backend, sql))
                .await
                .unwrap();
            rows.iter()
                .map(|row| {
                    (
                        row.try_get_by_index(0).unwrap(),
                        row.try_get_by_index(1).unwrap(),
                        row.try_get_by_index(2).unwrap(),
                    )
                })
                .collect()
        }
        _ => {
            // A column compares with BINARY unless its declaration says COLLATE; an index key
            // column reports the collation it compares with.
            let tables = db
                .query_all_raw(Statement::from_string(
                    backend,
                    "SELECT name, sql FROM sqlite_master WHERE type = 'table' \
                     AND name NOT LIKE 'sqlite_%' AND name <> 'seaql_migrations' ORDER BY name",
                ))
                .await
                .unwrap();
            let mut columns = Vec::new();
            for table in tables {
                let name: String = table.try_get_by_index(0).unwrap();
                let sql: String = table.try_get_by_index(1).unwrap();
                assert!(
                    !sql.to_ascii_uppercase().contains("COLLATE"),
                    "{name} names a collation: {sql}"
                );
                let typed = db
                    .query_all_raw(Statement::from_string(
                        backend,
                        format!(
                            "SELECT name FROM pragma_table_info('{name}') \
                             WHERE type LIKE '%CHAR%' OR type LIKE '%TEXT%' OR type LIKE '%CLOB%'"
                        ),
                    ))
                    .await
                    .unwrap();
                for column in typed {
                    let column: String = column.try_get_by_index(0).unwrap();
                    columns.push((format!("{name}.{column}"), "BINARY".to_owned(), true));
                }
            }
            let keys = db
                .query_all_raw(Statement::from_string(
                    backend,
                    "SELECT m.name || '.' || COALESCE(k.name, '?'), k.coll \
                     FROM sqlite_master m, pragma_index_xinfo(m.name) k \
                     WHERE m.type = 'index' AND k.key = 1 AND m.tbl_name <> 'seaql_migrations'",
                ))
                .await
                .unwrap();
            for key in keys {
                let column: String = key.try_get_by_index(0).unwrap();
                let collation: String = key.try_get_by_index(1).unwrap();
                let binary = collation == "BINARY";
                columns.push((format!("index {column}"), collation, binary));
            }
            columns
        }
    }
}

/// Ids differing only by case, by accents (composed or not) or by a trailing space.
const LOOK_ALIKE_NAMES: [&str; 8] = [
    "user:Alice",
    "user:alice",
    "user:ALICE",
    "user:cafe",
    "user:café",
    "user:CAFÉ",
    "user:cafe\u{301}",
    "user:alice ",
];

/// Stores every look-alike as a row of each keyed table and reads each back alone by its key.
async fn look_alike_keys_are_distinct_rows(db: &sea_orm::DatabaseConnection) {
    use sea_orm::sea_query::{Expr, ExprTrait, Query};
    for name in LOOK_ALIKE_NAMES {
        let account = Query::insert()
            .into_table("wallet_accounts")
            .columns([
                "name",
                "currency",
                "balance",
                "version",
                "created_at_ms",
                "updated_at_ms",
            ])
            .values_panic([
                name.into(),
                "CNY".into(),
                0.into(),
                0.into(),
                0.into(),
                0.into(),
            ])
            .to_owned();
        db.execute(&account)
            .await
            .unwrap_or_else(|err| panic!("account {name:?}: {err}"));
        let saga = Query::insert()
            .into_table("saga_sagas")
            .columns([
                "id",
                "kind",
                "state",
                "step",
                "attempts",
                "payload",
                "fence",
                "created_at_ms",
                "updated_at_ms",
            ])
            .values_panic([
                name.into(),
                "grab".into(),
                "running".into(),
                "start".into(),
                0.into(),
                "{}".into(),
                0.into(),
                0.into(),
                0.into(),
            ])
            .to_owned();
        db.execute(&saga)
            .await
            .unwrap_or_else(|err| panic!("saga {name:?}: {err}"));
    }
    for (table, key) in [("wallet_accounts", "name"), ("saga_sagas", "id")] {
        for name in LOOK_ALIKE_NAMES {
            let select = Query::select()
                .column(key)
                .from(table)
                .and_where(Expr::col(key).eq(name))
                .to_owned();
            let found: Vec<String> = db
                .query_all(&select)
                .await
                .unwrap()
                .iter()
                .map(|row| row.try_get_by_index(0).unwrap())
                .collect();
            assert_eq!(found, [name], "{table} looked up by {name:?}");
        }
    }
}

async fn every_key_column_compares_bytes_exactly_after_migrating(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let db = redpacket_common::db::connect(&database.url, 2)
        .await
        .unwrap();
    Migrator::up(&db, None).await.unwrap();

    let columns = string_columns(&db).await;
    for key in [
        "wallet_accounts.name",
        "wallet_transfers.id",
        "wallet_entries.account",
        "campaign_campaigns.merchant_id",
        "campaign_campaigns.idempotency_key",
        "campaign_claims.id",
        "campaign_claims.user_id",
        "saga_sagas.id",
        "saga_dead_letters.saga_id",
    ] {
        assert!(
            columns.iter().any(|(column, _, _)| column == key),
            "{key} is missing from {columns:?}"
        );
    }
    let inexact: Vec<_> = columns.iter().filter(|(_, _, exact)| !exact).collect();
    assert!(
        inexact.is_empty(),
        "columns that do not compare bytes: {inexact:?}"
    );
    if backend == Backend::MySql {
        // Tables and the database default to it too: what a later migration creates.
        let defaults = db
            .query_all_raw(Statement::from_string(
                sea_orm::DbBackend::MySql,
                "SELECT TABLE_COLLATION FROM information_schema.TABLES \
                 WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME <> 'seaql_migrations' \
                 UNION ALL SELECT DEFAULT_COLLATION_NAME FROM information_schema.SCHEMATA \
                 WHERE SCHEMA_NAME = DATABASE()",
            ))
            .await
            .unwrap();
        assert_eq!(defaults.len(), 11);
        for row in defaults {
            let collation: String = row.try_get_by_index(0).unwrap();
            assert!(collation.ends_with("_bin"), "{collation}");
        }
    }
    look_alike_keys_are_distinct_rows(&db).await;
    db.close().await.unwrap();
    database.drop_database().await;
}
redpacket_common::on_every_backend!(every_key_column_compares_bytes_exactly_after_migrating);

/// The collation of every string column and of the database, on MariaDB.
async fn mysql_collations(db: &sea_orm::DatabaseConnection) -> Vec<String> {
    let rows = db
        .query_all_raw(Statement::from_string(
            sea_orm::DbBackend::MySql,
            "SELECT DISTINCT COLLATION_NAME FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = DATABASE() AND COLLATION_NAME IS NOT NULL \
             AND TABLE_NAME <> 'seaql_migrations' \
             UNION SELECT DEFAULT_COLLATION_NAME FROM information_schema.SCHEMATA \
             WHERE SCHEMA_NAME = DATABASE()",
        ))
        .await
        .unwrap();
    rows.iter()
        .map(|row| row.try_get_by_index(0).unwrap())
        .collect()
}

/// Asserts that the columns and the database have one collation, a binary one: the server's
/// most exact (`utf8mb4_nopad_bin` on MariaDB, `utf8mb4_0900_bin` on MySQL 8).
fn assert_one_binary_collation(collations: &[String]) {
    assert_eq!(collations.len(), 1, "{collations:?}");
    assert!(
        ["utf8mb4_nopad_bin", "utf8mb4_0900_bin"].contains(&collations[0].as_str()),
        "{collations:?}"
    );
}

#[tokio::test]
async fn the_binary_keys_migration_goes_down_to_the_old_collation_and_up_again_on_mariadb() {
    use sea_orm::sea_query::Query;
    let database = TestDatabase::create(Backend::MySql).await;
    let db = redpacket_common::db::connect(&database.url, 2)
        .await
        .unwrap();
    let insert_account = |name: &str| {
        Query::insert()
            .into_table("wallet_accounts")
            .columns([
                "name",
                "currency",
                "balance",
                "version",
                "created_at_ms",
                "updated_at_ms",
            ])
            .values_panic([
                name.into(),
                "CNY".into(),
                0.into(),
                0.into(),
                0.into(),
                0.into(),
            ])
            .to_owned()
    };
    // Before the migration, as on a database created by an earlier release: `user:alice`
    // collides with `user:Alice`.
    let migrations = Migrator::migrations();
    let before = migrations
        .iter()
        .position(|m| m.name() == "m20261201_000004_binary_keys")
        .unwrap();
    // The migrations from the binary keys on: down reverts the later ones first.
    let from_binary_keys = u32::try_from(migrations.len() - before).unwrap();
    Migrator::up(&db, Some(u32::try_from(before).unwrap()))
        .await
        .unwrap();
    assert_eq!(mysql_collations(&db).await, ["utf8mb4_general_ci"]);
    db.execute(&insert_account("user:Alice")).await.unwrap();
    let collision = db.execute(&insert_account("user:alice")).await.unwrap_err();
    assert!(collision.to_string().contains("Duplicate"), "{collision}");

    Migrator::up(&db, None).await.unwrap();
    assert_one_binary_collation(&mysql_collations(&db).await);
    db.execute(&insert_account("user:alice")).await.unwrap();

    // Down restores the stated old collation, which cannot hold both spellings: it refuses,
    // leaving the accounts whole and binary, until one is removed.
    let refused = Migrator::down(&db, Some(from_binary_keys))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("Duplicate"), "{refused}");
    assert_one_binary_collation(&mysql_collations(&db).await);
    db.execute_unprepared("DELETE FROM wallet_accounts WHERE name = 'user:alice'")
        .await
        .unwrap();
    Migrator::down(&db, Some(1)).await.unwrap();
    assert_eq!(mysql_collations(&db).await, ["utf8mb4_general_ci"]);
    assert_eq!(
        Migrator::get_pending_migrations(&db).await.unwrap().len(),
        usize::try_from(from_binary_keys).unwrap()
    );

    Migrator::up(&db, None).await.unwrap();
    assert_one_binary_collation(&mysql_collations(&db).await);
    db.execute(&insert_account("user:alice")).await.unwrap();
    db.close().await.unwrap();
    database.drop_database().await;
}
