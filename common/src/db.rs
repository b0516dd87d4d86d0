//! Database connections shared by the services that own tables.

use std::time::{Duration, Instant};

use sea_orm::sqlx::error::{DatabaseError, Error as SqlxError};
use sea_orm::{
    ConnAcquireErr, ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend,
    DbErr, RuntimeErr, SqlxMySqlError, SqlxPostgresError, SqlxSqliteError,
};

/// The bound on connections of one service's pool unless configured otherwise.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 16;
/// How long a statement waits for a pooled connection of PostgreSQL or MySQL before it fails
/// as [`Failure::Busy`] (answered 503 `overloaded`). Short on purpose: when every connection
/// is taken, a crowd waiting for them only grows the queue, and the caller's own deadline (the
/// gateway's read route: 5 s) would turn the wait into a 504 anyway. A long statement is not
/// cut by it: it bounds the wait for a connection, not the work done on one.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);
/// The same wait for SQLite, whose single connection is the embedded mode's write queue: every
/// writer of the process (grabs on the local pool, the local queue, saga rows) takes its turn
/// on it, and a burst of a few hundred grabs queues there for a moment by design.
pub const SQLITE_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a start waits for its database to accept a first connection (a server still
/// starting up, or refusing connections for a moment), retrying.
pub const CONNECT_WAIT: Duration = Duration::from_secs(5);
/// The pause between two attempts of that first connection.
const CONNECT_RETRY_PAUSE: Duration = Duration::from_millis(200);
/// The `Retry-After` of an answer the database could not serve for now, in seconds.
pub const RETRY_AFTER_S: u64 = 1;

/// What a database error means for the caller, decided by the error's variant and the server's
/// error code (SQLSTATE, MySQL's error number, SQLite's result code), never by its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No capacity right now: every pooled connection is taken (the acquire wait ran out), or
    /// the server refuses more work for the moment (too many connections, out of memory, a
    /// statement or lock timeout, a deadlock or serialization failure). Retry shortly.
    Busy,
    /// The database cannot be reached or went away: an I/O error on the connection, a closed
    /// pool, a server shutting down or still starting, a full disk. Retry shortly.
    Unavailable,
    /// Anything else: an unexpected constraint violation, a value that does not decode, a
    /// statement the server rejects. A bug; a retry would fail the same way.
    Fault,
}

impl Failure {
    /// Whether the same call may succeed later.
    pub fn is_transient(self) -> bool {
        self != Failure::Fault
    }
}

/// Sorts a database error into a [`Failure`].
///
/// sqlx retries a refused connection until the acquire wait ends and then reports only the
/// timeout, so a pool that cannot open any connection is [`Failure::Busy`] as well: both are
/// answered 503 with `Retry-After`, and the log line carries the cause.
pub fn classify(err: &DbErr) -> Failure {
    match err {
        DbErr::ConnectionAcquire(ConnAcquireErr::Timeout) => Failure::Busy,
        DbErr::ConnectionAcquire(ConnAcquireErr::ConnectionClosed) => Failure::Unavailable,
        DbErr::Conn(RuntimeErr::SqlxError(err))
        | DbErr::Exec(RuntimeErr::SqlxError(err))
        | DbErr::Query(RuntimeErr::SqlxError(err)) => classify_sqlx(err),
        // sea-orm's own connection errors: the connection was closed (`Disconnected`).
        DbErr::Conn(_) => Failure::Unavailable,
        _ => Failure::Fault,
    }
}

fn classify_sqlx(err: &SqlxError) -> Failure {
    match err {
        SqlxError::PoolTimedOut => Failure::Busy,
        SqlxError::PoolClosed | SqlxError::Io(_) | SqlxError::Tls(_) | SqlxError::WorkerCrashed => {
            Failure::Unavailable
        }
        SqlxError::Database(err) => classify_server(err.as_ref()),
        _ => Failure::Fault,
    }
}

/// An error the server itself answered, by its code.
fn classify_server(err: &dyn DatabaseError) -> Failure {
    if let Some(err) = err.try_downcast_ref::<SqlxPostgresError>() {
        return postgres_failure(err.code());
    }
    if let Some(err) = err.try_downcast_ref::<SqlxMySqlError>() {
        return mysql_failure(err.number());
    }
    if err.try_downcast_ref::<SqlxSqliteError>().is_some() {
        let code = err.code().and_then(|code| code.parse::<i32>().ok());
        return code.map_or(Failure::Fault, sqlite_failure);
    }
    Failure::Fault
}

/// PostgreSQL by SQLSTATE (<https://www.postgresql.org/docs/current/errcodes-appendix.html>).
fn postgres_failure(sqlstate: &str) -> Failure {
    match sqlstate {
        // disk_full; admin_shutdown, crash_shutdown, cannot_connect_now.
        "53100" | "57P01" | "57P02" | "57P03" => Failure::Unavailable,
        // Class 08: connection exceptions.
        code if code.starts_with("08") => Failure::Unavailable,
        // Class 53, insufficient resources: too_many_connections (53300), out_of_memory
        // (53200), ...
        code if code.starts_with("53") => Failure::Busy,
        // query_canceled (statement_timeout), lock_not_available (lock_timeout, NOWAIT),
        // serialization_failure, deadlock_detected.
        "57014" | "55P03" | "40001" | "40P01" => Failure::Busy,
        _ => Failure::Fault,
    }
}

/// MySQL and MariaDB by error number
/// (<https://dev.mysql.com/doc/mysql-errors/8.0/en/server-error-reference.html>).
fn mysql_failure(number: u16) -> Failure {
    match number {
        // ER_CON_COUNT_ERROR (too many connections), ER_TOO_MANY_USER_CONNECTIONS,
        // ER_USER_LIMIT_REACHED, ER_OUTOFMEMORY, ER_OUT_OF_SORTMEMORY, ER_OUT_OF_RESOURCES,
        // ER_LOCK_WAIT_TIMEOUT, ER_LOCK_DEADLOCK, ER_QUERY_TIMEOUT (MySQL's
        // max_execution_time), ER_STATEMENT_TIMEOUT (MariaDB's max_statement_time),
        // ER_LOCK_NOWAIT.
        1040 | 1203 | 1226 | 1037 | 1038 | 1041 | 1205 | 1213 | 3024 | 1969 | 3572 => Failure::Busy,
        // ER_DISK_FULL, ER_SERVER_SHUTDOWN, ER_ABORTING_CONNECTION, ER_NET_READ_ERROR,
        // ER_NET_READ_INTERRUPTED, ER_NET_ERROR_ON_WRITE, ER_NET_WRITE_INTERRUPTED,
        // ER_CONNECTION_KILLED (MariaDB).
        1021 | 1053 | 1152 | 1158 | 1159 | 1160 | 1161 | 1927 => Failure::Unavailable,
        _ => Failure::Fault,
    }
}

/// SQLite by the primary part of its extended result code
/// (<https://www.sqlite.org/rescode.html>).
fn sqlite_failure(code: i32) -> Failure {
    match code & 0xff {
        // SQLITE_BUSY, SQLITE_LOCKED, SQLITE_NOMEM.
        5..=7 => Failure::Busy,
        // SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN.
        10 | 13 | 14 => Failure::Unavailable,
        _ => Failure::Fault,
    }
}

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
///
/// A statement waits at most [`ACQUIRE_TIMEOUT`] ([`SQLITE_ACQUIRE_TIMEOUT`] on SQLite) for a
/// connection. The first connection to a server is retried for [`CONNECT_WAIT`] while the
/// failure is transient, so a service may start while its database is still coming up.
pub async fn connect_with(
    url: &str,
    max_connections: u32,
    durability: Durability,
) -> Result<DatabaseConnection, sea_orm::DbErr> {
    let acquire = if url.starts_with("sqlite:") {
        SQLITE_ACQUIRE_TIMEOUT
    } else {
        ACQUIRE_TIMEOUT
    };
    open(url, max_connections, durability, acquire).await
}

/// How long [`connect_patient`]'s statements may wait for a connection.
pub const PATIENT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects for a caller that would rather wait than be refused (a test's or a tool's own
/// reads, never a service answering requests): statements wait up to
/// [`PATIENT_ACQUIRE_TIMEOUT`] for a connection, opening one included.
pub async fn connect_patient(
    url: &str,
    max_connections: u32,
) -> Result<DatabaseConnection, sea_orm::DbErr> {
    open(
        url,
        max_connections,
        Durability::Full,
        PATIENT_ACQUIRE_TIMEOUT,
    )
    .await
}

async fn open(
    url: &str,
    max_connections: u32,
    durability: Durability,
    acquire_timeout: Duration,
) -> Result<DatabaseConnection, sea_orm::DbErr> {
    let is_sqlite = url.starts_with("sqlite:");
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .max_connections(if is_sqlite { 1 } else { max_connections })
        .min_connections(if is_sqlite { 1 } else { 0 })
        .acquire_timeout(acquire_timeout)
        .sqlx_logging(false);
    if durability == Durability::Relaxed {
        options.map_sqlx_postgres_opts(|pg| pg.options([("synchronous_commit", "off")]));
    }
    let started = Instant::now();
    let db = loop {
        match Database::connect(options.clone()).await {
            Ok(db) => break db,
            // A file that cannot be opened does not improve by waiting: no server to wait for.
            Err(err)
                if !is_sqlite
                    && classify(&err).is_transient()
                    && started.elapsed() < CONNECT_WAIT =>
            {
                tracing::info!(error = %err, "the database does not accept connections yet");
                tokio::time::sleep(CONNECT_RETRY_PAUSE).await;
            }
            Err(err) => return Err(err),
        }
    };
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn sqlx(err: SqlxError) -> RuntimeErr {
        RuntimeErr::SqlxError(Arc::new(err))
    }

    #[test]
    fn an_exhausted_or_closed_pool_is_transient_by_its_variant() {
        assert_eq!(
            classify(&DbErr::ConnectionAcquire(ConnAcquireErr::Timeout)),
            Failure::Busy
        );
        assert_eq!(
            classify(&DbErr::ConnectionAcquire(ConnAcquireErr::ConnectionClosed)),
            Failure::Unavailable
        );
        assert_eq!(
            classify(&DbErr::Conn(sqlx(SqlxError::PoolTimedOut))),
            Failure::Busy,
            "a first connection that could not be opened within the wait"
        );
        assert_eq!(
            classify(&DbErr::Conn(RuntimeErr::Internal("Disconnected".into()))),
            Failure::Unavailable
        );
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(
            classify(&DbErr::Query(sqlx(SqlxError::Io(reset)))),
            Failure::Unavailable,
            "a connection lost in the middle of a statement"
        );
    }

    #[test]
    fn a_bug_is_a_fault_whatever_its_text_says() {
        let decode = SqlxError::ColumnDecode {
            index: "0".into(),
            source: "pool timed out, too many connections".into(),
        };
        assert_eq!(classify(&DbErr::Query(sqlx(decode))), Failure::Fault);
        assert_eq!(
            classify(&DbErr::Custom("connection refused".into())),
            Failure::Fault
        );
        assert_eq!(classify(&DbErr::Type("deadlock".into())), Failure::Fault);
        assert_eq!(classify(&DbErr::RecordNotFound("x".into())), Failure::Fault);
        assert_eq!(
            classify(&DbErr::Conn(sqlx(SqlxError::Configuration(
                "bad url".into()
            )))),
            Failure::Fault,
            "a configuration error does not pass by waiting"
        );
        assert!(!Failure::Fault.is_transient());
        assert!(Failure::Busy.is_transient() && Failure::Unavailable.is_transient());
    }

    #[test]
    fn server_codes_sort_capacity_from_reachability_from_bugs() {
        for code in ["53300", "53200", "57014", "55P03", "40001", "40P01"] {
            assert_eq!(postgres_failure(code), Failure::Busy, "{code}");
        }
        for code in ["08006", "08001", "57P01", "57P03", "53100"] {
            assert_eq!(postgres_failure(code), Failure::Unavailable, "{code}");
        }
        for code in ["23505", "23503", "42601", "22P02", "XX000"] {
            assert_eq!(postgres_failure(code), Failure::Fault, "{code}");
        }
        for number in [1040, 1203, 1205, 1213, 1969, 3024] {
            assert_eq!(mysql_failure(number), Failure::Busy, "{number}");
        }
        for number in [1053, 1927, 1021] {
            assert_eq!(mysql_failure(number), Failure::Unavailable, "{number}");
        }
        for number in [1062, 1452, 1064, 1146] {
            assert_eq!(mysql_failure(number), Failure::Fault, "{number}");
        }
        // SQLITE_BUSY, SQLITE_BUSY_SNAPSHOT, SQLITE_LOCKED.
        for code in [5, 517, 6] {
            assert_eq!(sqlite_failure(code), Failure::Busy, "{code}");
        }
        assert_eq!(sqlite_failure(13), Failure::Unavailable);
        // SQLITE_CONSTRAINT_UNIQUE, SQLITE_ERROR.
        for code in [2067, 1] {
            assert_eq!(sqlite_failure(code), Failure::Fault, "{code}");
        }
    }
}
