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
