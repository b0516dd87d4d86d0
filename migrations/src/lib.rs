//! Every table of every service, as sea-orm migrations that run on PostgreSQL, MySQL/MariaDB
//! and SQLite.
//!
//! Each service owns its tables, named with the service as prefix (`wallet_*`); no service
//! reads another's. An applied migration is never edited: a change is a new migration.
//! Times are stored as `BIGINT` milliseconds since the Unix epoch (`*_at_ms`), the one
//! representation that behaves the same on all three databases. Every string column compares
//! bytes exactly (a binary collation on MySQL/MariaDB, migration 4): ids that differ only by
//! case are different keys on all three.

pub use sea_orm_migration::prelude::*;

mod m20261126_000001_wallet;
mod m20261126_000002_campaign;
mod m20261126_000003_saga;
mod m20261201_000004_binary_keys;
mod m20261201_000005_dead_letter_replays;
mod m20261201_000006_pool_rebuilds;

/// Applies, reverts and reports the migrations.
#[derive(Debug)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261126_000001_wallet::Migration),
            Box::new(m20261126_000002_campaign::Migration),
            Box::new(m20261126_000003_saga::Migration),
            Box::new(m20261201_000004_binary_keys::Migration),
            Box::new(m20261201_000005_dead_letter_replays::Migration),
            Box::new(m20261201_000006_pool_rebuilds::Migration),
        ]
    }
}
