//! Database connections shared by the services that own tables.

use std::time::Duration;

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr};

/// The bound on connections of one service's pool unless configured otherwise.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 16;
/// How long a request waits for a pooled connection before failing.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// How a commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// A commit returns once it is on disk.
    Full,
    /// A commit returns before its flush (PostgreSQL `synchronous_commit = off`): a crash can
    /// lose the last few hundred milliseconds of commits, never corrupt anything. Only for
    /// state that can be rebuilt, such as saga progress, which the sweeper re-drives.
    Relaxed,
}

/// Connects with a bounded pool, every commit durable.
pub async fn connect(
    url: &str,
    max_connections: u32,
) -> Result<DatabaseConnection, sea_orm::DbErr> {
    connect_with(url, max_connections, Durability::Full).await
}

/// Connects with a bounded pool. SQLite gets one connection: it has a single writer anyway,
/// and one connection turns concurrent writers into a queue instead of `database is locked`
/// errors.
pub async fn connect_with(
    url: &str,
    max_connections: u32,
    durability: Durability,
) -> Result<DatabaseConnection, sea_orm::DbErr> {
    let is_sqlite = url.starts_with("sqlite:");
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .max_connections(if is_sqlite { 1 } else { max_connections })
        .min_connections(if is_sqlite { 1 } else { 0 })
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .sqlx_logging(false);
    if durability == Durability::Relaxed {
        options.map_sqlx_postgres_opts(|pg| pg.options([("synchronous_commit", "off")]));
    }
    let db = Database::connect(options).await?;
    if db.get_database_backend() == DbBackend::Sqlite {
        // WAL keeps readers from blocking the writer; NORMAL sync is durable across process
        // crashes (not power loss), which is the embedded mode's promise.
        db.execute_unprepared(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;",
        )
        .await?;
    }
    Ok(db)
}

/// Plans the rest of a transaction's statements as key lookups (PostgreSQL; elsewhere
/// nothing to do).
///
/// Batch statements find rows by lists of up to a few hundred keys (`id IN (…)`). PostgreSQL's
/// cost model prices a key probe as random disk reads, so on a table that is young (never
/// analyzed) or only tens of thousands of rows long it prefers reading the whole table, once
/// per statement. In a burst of credits the tables grow with every batch and each batch scans
/// them all again: the work per credit grows with the table, and the database takes the cores
/// the grabs need. Within the transaction, scans that ignore the key are priced out; a
/// statement without a usable index still runs, as a scan.
pub async fn plan_as_lookups<C: ConnectionTrait>(txn: &C) -> Result<(), DbErr> {
    if txn.get_database_backend() == DbBackend::Postgres {
        txn.execute_unprepared("SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off")
            .await?;
    }
    Ok(())
}

/// The URL of `database` on the server of `server_url` (its database part replaced, its query
/// kept): how tests and benchmarks reach the scratch databases they create.
pub fn database_url(server_url: &str, database: &str) -> String {
    let (base, query) = match server_url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (server_url, None),
    };
    let host_start = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[host_start..]
        .find('/')
        .map_or(base.len(), |i| i + host_start);
    let mut url = format!("{}/{database}", &base[..host_end]);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    url
}
