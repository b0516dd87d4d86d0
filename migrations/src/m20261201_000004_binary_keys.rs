//! Every string column compares bytes exactly: ids that differ only by case, accents or
//! trailing spaces are different keys on every database.
//!
//! MySQL and MariaDB give a new database the server's default collation, which for `utf8mb4`
//! is case- and accent-insensitive (`utf8mb4_general_ci` on MariaDB, `utf8mb4_0900_ai_ci` on
//! MySQL 8). With it `user:alice` finds `user:Alice`'s row: one user reads another's balance,
//! and a credit to the second spelling collides with the first on the primary key. This
//! migration converts every table of migrations 1 to 3 to a binary collation, and makes it the
//! database's default so that tables created later get it too.
//!
//! The collation is the server's binary `NO PAD` one when it has one (`utf8mb4_nopad_bin` on
//! MariaDB, `utf8mb4_0900_bin` on MySQL 8), so that even a trailing space makes another key;
//! otherwise (MySQL 5.7) `utf8mb4_bin`, which compares bytes but ignores trailing spaces. No
//! id the APIs accept can end with a space. The character set stays `utf8mb4`, so no index
//! grows: the longest key, `campaign_campaigns_idempotency`, is (64 + 128) × 4 = 768 bytes,
//! under InnoDB's 3,072-byte bound, and every column in it under the 767-byte bound of old
//! row formats.
//!
//! PostgreSQL needs nothing: a database's default collation is always deterministic (strings
//! are equal only when their bytes are) and no column names another. SQLite compares with
//! `BINARY` unless a column says otherwise, and none does. The migration tests check both.
//!
//! Operators: on MySQL/MariaDB each `ALTER TABLE … CONVERT TO` rebuilds its table, blocking
//! writes to it meanwhile; on a large ledger, run it in a quiet hour.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend, Statement};

#[derive(DeriveMigrationName)]
pub struct Migration;

/// The tables of the migrations before this one.
const TABLES: [&str; 10] = [
    "wallet_accounts",
    "wallet_transfers",
    "wallet_entries",
    "campaign_campaigns",
    "campaign_packets",
    "campaign_claims",
    "campaign_stats",
    "campaign_events",
    "saga_sagas",
    "saga_dead_letters",
];

/// The binary collations of `utf8mb4`, the most exact first.
const BINARY_COLLATIONS: [&str; 3] = ["utf8mb4_nopad_bin", "utf8mb4_0900_bin", "utf8mb4_bin"];

/// What `down` restores: MariaDB's default collation of `utf8mb4`, which the tables had on
/// the project's servers before this migration. (The collation the tables had cannot be read
/// at `down` time, so it is stated here.)
const PREVIOUS_COLLATION: &str = "utf8mb4_general_ci";

/// The most exact binary collation this server has.
async fn binary_collation(manager: &SchemaManager<'_>) -> Result<&'static str, DbErr> {
    let db = manager.get_connection();
    let rows = db
        .query_all_raw(Statement::from_string(
            DbBackend::MySql,
            format!(
                "SELECT COLLATION_NAME FROM information_schema.COLLATIONS \
                 WHERE COLLATION_NAME IN ('{}')",
                BINARY_COLLATIONS.join("', '")
            ),
        ))
        .await?;
    let mut known = Vec::with_capacity(rows.len());
    for row in rows {
        known.push(row.try_get_by_index::<String>(0)?);
    }
    BINARY_COLLATIONS
        .into_iter()
        .find(|collation| known.iter().any(|name| name == collation))
        .ok_or_else(|| DbErr::Migration("the server has no utf8mb4_bin collation".to_owned()))
}

/// Converts every table of the project to `collation`, then makes it the current database's
/// default. Each `ALTER TABLE` is atomic, and converting a table to the collation it has
/// changes nothing, so a migration that failed halfway is finished by running it again.
async fn convert(manager: &SchemaManager<'_>, collation: &str) -> Result<(), DbErr> {
    let db = manager.get_connection();
    for table in TABLES {
        db.execute_unprepared(&format!(
            "ALTER TABLE {table} CONVERT TO CHARACTER SET utf8mb4 COLLATE {collation}"
        ))
        .await?;
    }
    db.execute_unprepared(&format!(
        "ALTER DATABASE CHARACTER SET utf8mb4 COLLATE {collation}"
    ))
    .await?;
    Ok(())
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::MySql {
            return Ok(());
        }
        let collation = binary_collation(manager).await?;
        convert(manager, collation).await
    }

    /// Restores [`PREVIOUS_COLLATION`]. Keys that differ only in what it ignores (`user:Alice`
    /// and `user:alice`) cannot both live under it: `down` then fails on their table with a
    /// duplicate-key error and leaves it binary, until one of them is removed.
    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::MySql {
            return Ok(());
        }
        convert(manager, PREVIOUS_COLLATION).await
    }
}
