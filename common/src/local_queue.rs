//! A durable message queue in a SQL table, for the embedded mode: what RabbitMQ and the Redis
//! hand-off streams are to the distributed system, on one machine.
//!
//! A message is a row. Publishing inserts it, in the caller's transaction when there is one
//! (the embedded grab appends its hand-off in the same transaction that takes the packet, as
//! the Redis script does). Consuming claims rows by pushing their `available_at_ms` past a
//! visibility timeout; acknowledging deletes them; a negative acknowledgement makes them
//! available again after a delay. A consumer that dies leaves its claimed rows to come back
//! when their visibility timeout passes: at least once, as with RabbitMQ.

use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, Statement, TransactionTrait, Value};

/// The table, created on first use.
const CREATE: &str = "CREATE TABLE IF NOT EXISTS local_messages (\
    id INTEGER PRIMARY KEY AUTOINCREMENT, \
    queue TEXT NOT NULL, \
    message_id TEXT NOT NULL, \
    body TEXT NOT NULL, \
    available_at_ms BIGINT NOT NULL, \
    created_at_ms BIGINT NOT NULL)";
const INDEX: &str = "CREATE INDEX IF NOT EXISTS local_messages_ready \
    ON local_messages (queue, available_at_ms, id)";

/// The longest body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A claimed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub id: i64,
    pub message_id: String,
    pub body: String,
}

/// A queue table in one SQLite database.
#[derive(Debug, Clone)]
pub struct LocalQueue {
    db: DatabaseConnection,
}

fn statement(db: &impl ConnectionTrait, sql: &str, values: Vec<Value>) -> Statement {
    Statement::from_sql_and_values(db.get_database_backend(), sql, values)
}

impl LocalQueue {
    /// Opens the queue, creating its table when missing.
    pub async fn open(db: DatabaseConnection) -> Result<Self, DbErr> {
        db.execute_unprepared(CREATE).await?;
        db.execute_unprepared(INDEX).await?;
        Ok(LocalQueue { db })
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Appends a message to `queue`, available at `available_at_ms`, on `conn` (a transaction
    /// or the database).
    pub async fn push_on(
        conn: &impl ConnectionTrait,
        queue: &str,
        message_id: &str,
        body: &str,
        available_at_ms: i64,
    ) -> Result<(), DbErr> {
        if body.len() > MAX_BODY_BYTES {
            return Err(DbErr::Custom(format!(
                "a queued message is limited to {MAX_BODY_BYTES} bytes"
            )));
        }
        conn.execute_raw(statement(
            conn,
            "INSERT INTO local_messages (queue, message_id, body, available_at_ms, created_at_ms) \
             VALUES (?, ?, ?, ?, ?)",
            vec![
                queue.into(),
                message_id.into(),
                body.into(),
                available_at_ms.into(),
                crate::time::now_ms().into(),
            ],
        ))
        .await?;
        Ok(())
    }

    /// Appends many messages in one transaction.
    pub async fn push_all(
        &self,
        queue: &str,
        messages: &[(String, String)],
        available_at_ms: i64,
    ) -> Result<(), DbErr> {
        let txn = self.db.begin().await?;
        for (message_id, body) in messages {
            Self::push_on(&txn, queue, message_id, body, available_at_ms).await?;
        }
        txn.commit().await
    }

    /// Claims up to `limit` available messages of `queue`, hiding them for `visibility_ms`.
    pub async fn claim(
        &self,
        queue: &str,
        limit: u32,
        visibility_ms: i64,
    ) -> Result<Vec<Claimed>, DbErr> {
        let now = crate::time::now_ms();
        let txn = self.db.begin().await?;
        let rows = txn
            .query_all_raw(statement(
                &txn,
                "SELECT id, message_id, body FROM local_messages \
                 WHERE queue = ? AND available_at_ms <= ? ORDER BY available_at_ms, id LIMIT ?",
                vec![queue.into(), now.into(), i64::from(limit).into()],
            ))
            .await?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            claimed.push(Claimed {
                id: row.try_get_by_index(0)?,
                message_id: row.try_get_by_index(1)?,
                body: row.try_get_by_index(2)?,
            });
        }
        for message in &claimed {
            txn.execute_raw(statement(
                &txn,
                "UPDATE local_messages SET available_at_ms = ? WHERE id = ?",
                vec![(now + visibility_ms).into(), message.id.into()],
            ))
            .await?;
        }
        txn.commit().await?;
        Ok(claimed)
    }

    /// Deletes a handled message.
    pub async fn ack(&self, id: i64) -> Result<(), DbErr> {
        self.db
            .execute_raw(statement(
                &self.db,
                "DELETE FROM local_messages WHERE id = ?",
                vec![id.into()],
            ))
            .await?;
        Ok(())
    }

    /// Makes a claimed message available again after `delay_ms`.
    pub async fn nack(&self, id: i64, delay_ms: i64) -> Result<(), DbErr> {
        self.db
            .execute_raw(statement(
                &self.db,
                "UPDATE local_messages SET available_at_ms = ? WHERE id = ?",
                vec![(crate::time::now_ms() + delay_ms).into(), id.into()],
            ))
            .await?;
        Ok(())
    }

    /// Messages waiting in `queue` (claimed ones included).
    pub async fn len(&self, queue: &str) -> Result<i64, DbErr> {
        let row = self
            .db
            .query_one_raw(statement(
                &self.db,
                "SELECT COUNT(*) FROM local_messages WHERE queue = ?",
                vec![queue.into()],
            ))
            .await?
            .ok_or_else(|| DbErr::Custom("COUNT answered no row".into()))?;
        row.try_get_by_index(0)
    }
}
