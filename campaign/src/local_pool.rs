//! The packet pool of the embedded mode: tables in the campaign's own SQLite database.
//!
//! It keeps the Redis pool's guarantees on one machine. Each operation is one transaction on
//! the database's single connection, so operations are atomic and serialized like the Redis
//! scripts; the grab appends its hand-off message to the durable local queue in that same
//! transaction (as the Redis script appends to the hand-off stream), so an answered grab
//! survives a crash. Only SQLite is supported: the embedded mode's database.

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbErr, Statement, TransactionTrait,
    Value,
};

use redpacket_common::local_queue::LocalQueue;
use redpacket_common::messages::{Envelope, SagaEvent};

use crate::pool::{
    CancelOutcome, GrabOutcome, Inventory, Mend, MendOutcome, PacketPool, PendingClaim,
    PoolCampaign, PoolError, PoolSnapshot, PoolVersion,
};

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS local_pool_meta (campaign_id BIGINT PRIMARY KEY, state TEXT NOT \
     NULL, starts_at_ms BIGINT NOT NULL, ends_at_ms BIGINT NOT NULL, per_user_limit INTEGER NOT \
     NULL, currency TEXT NOT NULL, packets_left BIGINT NOT NULL, amount_left BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS local_pool_packets (campaign_id BIGINT NOT NULL, seq INTEGER NOT \
     NULL, amount BIGINT NOT NULL, PRIMARY KEY (campaign_id, seq))",
    "CREATE TABLE IF NOT EXISTS local_pool_claims (claim_id TEXT PRIMARY KEY, campaign_id BIGINT \
     NOT NULL, user_id TEXT NOT NULL, seq INTEGER NOT NULL, amount BIGINT NOT NULL, \
     grabbed_at_ms BIGINT NOT NULL, pending INTEGER NOT NULL)",
    "CREATE INDEX IF NOT EXISTS local_pool_claims_user ON local_pool_claims (campaign_id, \
     user_id)",
    "CREATE TABLE IF NOT EXISTS local_pool_returns (claim_id TEXT PRIMARY KEY, campaign_id BIGINT \
     NOT NULL, returned INTEGER NOT NULL)",
];

/// Packets inserted per statement when loading.
const LOAD_CHUNK: usize = 500;

impl From<DbErr> for PoolError {
    fn from(err: DbErr) -> Self {
        PoolError::Local(err.to_string())
    }
}

/// The embedded packet pool.
#[derive(Debug, Clone)]
pub struct LocalPool {
    db: DatabaseConnection,
}

fn stmt(sql: &str, values: Vec<Value>) -> Statement {
    Statement::from_sql_and_values(sea_orm::DbBackend::Sqlite, sql, values)
}

struct Meta {
    state: String,
    starts_at_ms: i64,
    ends_at_ms: i64,
    per_user_limit: i64,
    currency: String,
    packets_left: i64,
    amount_left: i64,
}

async fn meta(conn: &impl ConnectionTrait, campaign_id: i64) -> Result<Option<Meta>, PoolError> {
    let row = conn
        .query_one_raw(stmt(
            "SELECT state, starts_at_ms, ends_at_ms, per_user_limit, currency, packets_left, \
             amount_left FROM local_pool_meta WHERE campaign_id = ?",
            vec![campaign_id.into()],
        ))
        .await?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some(Meta {
        state: row.try_get_by_index(0)?,
        starts_at_ms: row.try_get_by_index(1)?,
        ends_at_ms: row.try_get_by_index(2)?,
        per_user_limit: row.try_get_by_index(3)?,
        currency: row.try_get_by_index(4)?,
        packets_left: row.try_get_by_index(5)?,
        amount_left: row.try_get_by_index(6)?,
    }))
}

async fn set_state(
    txn: &DatabaseTransaction,
    campaign_id: i64,
    state: &str,
) -> Result<(), PoolError> {
    txn.execute_raw(stmt(
        "UPDATE local_pool_meta SET state = ? WHERE campaign_id = ?",
        vec![state.into(), campaign_id.into()],
    ))
    .await?;
    Ok(())
}

impl LocalPool {
    /// Opens the pool in `db` (the campaign's SQLite database), creating its tables.
    pub async fn open(db: DatabaseConnection) -> Result<Self, PoolError> {
        if db.get_database_backend() != sea_orm::DbBackend::Sqlite {
            return Err(PoolError::Local(
                "the local pool runs on SQLite only (the embedded mode)".into(),
            ));
        }
        for sql in SCHEMA {
            db.execute_unprepared(sql).await?;
        }
        // The hand-off goes into the local queue, in the same database.
        LocalQueue::open(db.clone()).await?;
        Ok(LocalPool { db })
    }

    async fn grab_in(
        txn: &DatabaseTransaction,
        campaign: &PoolCampaign,
        user_id: &str,
        claim_id: &str,
        now_ms: i64,
        request_id: &str,
    ) -> Result<GrabOutcome, PoolError> {
        let Some(m) = meta(txn, campaign.id).await? else {
            return Ok(GrabOutcome::NotLoaded);
        };
        match m.state.as_str() {
            "cancelled" => return Ok(GrabOutcome::Cancelled),
            "expired" => return Ok(GrabOutcome::Ended),
            _ => {}
        }
        if now_ms < m.starts_at_ms {
            return Ok(GrabOutcome::NotStarted);
        }
        if now_ms >= m.ends_at_ms {
            return Ok(GrabOutcome::Ended);
        }
        let mine = txn
            .query_all_raw(stmt(
                "SELECT claim_id, amount FROM local_pool_claims WHERE campaign_id = ? AND user_id \
                 = ? ORDER BY grabbed_at_ms, claim_id",
                vec![campaign.id.into(), user_id.into()],
            ))
            .await?;
        if i64::try_from(mine.len()).unwrap_or(i64::MAX) >= m.per_user_limit {
            let claims = mine
                .iter()
                .map(|row| Ok((row.try_get_by_index(0)?, row.try_get_by_index(1)?)))
                .collect::<Result<Vec<(String, i64)>, DbErr>>()?;
            return Ok(GrabOutcome::LimitReached { claims });
        }
        if m.state == "exhausted" {
            return Ok(GrabOutcome::SoldOut);
        }
        let packet = txn
            .query_one_raw(stmt(
                "SELECT seq, amount FROM local_pool_packets WHERE campaign_id = ? ORDER BY seq \
                 LIMIT 1",
                vec![campaign.id.into()],
            ))
            .await?;
        let Some(packet) = packet else {
            set_state(txn, campaign.id, "exhausted").await?;
            return Ok(GrabOutcome::SoldOut);
        };
        let seq: i64 = packet.try_get_by_index(0)?;
        let amount: i64 = packet.try_get_by_index(1)?;
        let seq = u32::try_from(seq).map_err(|_| PoolError::Protocol(format!("seq {seq}")))?;
        txn.execute_raw(stmt(
            "DELETE FROM local_pool_packets WHERE campaign_id = ? AND seq = ?",
            vec![campaign.id.into(), seq.into()],
        ))
        .await?;
        txn.execute_raw(stmt(
            "INSERT INTO local_pool_claims (claim_id, campaign_id, user_id, seq, amount, \
             grabbed_at_ms, pending) VALUES (?, ?, ?, ?, ?, ?, 1)",
            vec![
                claim_id.into(),
                campaign.id.into(),
                user_id.into(),
                seq.into(),
                amount.into(),
                now_ms.into(),
            ],
        ))
        .await?;
        let last = m.packets_left <= 1;
        txn.execute_raw(stmt(
            "UPDATE local_pool_meta SET packets_left = packets_left - 1, amount_left = \
             amount_left - ?, state = CASE WHEN packets_left - 1 <= 0 THEN 'exhausted' ELSE state \
             END WHERE campaign_id = ?",
            vec![amount.into(), campaign.id.into()],
        ))
        .await?;
        // The hand-off, in the same transaction: the grab and its saga message commit together.
        let envelope = Envelope::new(
            format!("grab:{claim_id}"),
            (!request_id.is_empty()).then(|| request_id.to_owned()),
            SagaEvent::GrabClaimed {
                claim_id: claim_id.to_owned(),
                campaign_id: campaign.id.to_string(),
                user_id: user_id.to_owned(),
                packet_seq: seq,
                amount,
                currency: m.currency.clone(),
                grabbed_at_ms: now_ms,
            },
        );
        let body = String::from_utf8(envelope.to_bytes())
            .map_err(|_| PoolError::Protocol("an envelope is not UTF-8".into()))?;
        LocalQueue::push_on(txn, "work", &envelope.message_id, &body, now_ms).await?;
        Ok(GrabOutcome::Granted {
            seq,
            amount,
            currency: m.currency,
            last,
        })
    }
}

#[async_trait::async_trait]
impl PacketPool for LocalPool {
    async fn load(&self, campaign: &PoolCampaign, packets: &[i64]) -> Result<bool, PoolError> {
        let txn = self.db.begin().await?;
        if meta(&txn, campaign.id).await?.is_some() {
            return Ok(false);
        }
        for (chunk_index, chunk) in packets.chunks(LOAD_CHUNK).enumerate() {
            let placeholders = vec!["(?, ?, ?)"; chunk.len()].join(", ");
            let mut values = Vec::with_capacity(chunk.len() * 3);
            for (offset, amount) in chunk.iter().enumerate() {
                let seq = i64::try_from(chunk_index * LOAD_CHUNK + offset).unwrap_or(i64::MAX);
                values.extend([campaign.id.into(), seq.into(), (*amount).into()]);
            }
            txn.execute_raw(stmt(
                &format!(
                    "INSERT INTO local_pool_packets (campaign_id, seq, amount) VALUES {placeholders}"
                ),
                values,
            ))
            .await?;
        }
        let total: i64 = packets.iter().sum();
        txn.execute_raw(stmt(
            "INSERT INTO local_pool_meta (campaign_id, state, starts_at_ms, ends_at_ms, \
             per_user_limit, currency, packets_left, amount_left) VALUES (?, 'scheduled', ?, ?, \
             ?, ?, ?, ?)",
            vec![
                campaign.id.into(),
                campaign.starts_at_ms.into(),
                campaign.ends_at_ms.into(),
                campaign.per_user_limit.into(),
                campaign.currency.as_str().into(),
                i64::try_from(packets.len()).unwrap_or(i64::MAX).into(),
                total.into(),
            ],
        ))
        .await?;
        txn.commit().await?;
        Ok(true)
    }

    async fn grab(
        &self,
        campaign: &PoolCampaign,
        user_id: &str,
        claim_id: &str,
        now_ms: i64,
        request_id: &str,
    ) -> Result<GrabOutcome, PoolError> {
        let txn = self.db.begin().await?;
        let outcome = Self::grab_in(&txn, campaign, user_id, claim_id, now_ms, request_id).await?;
        txn.commit().await?;
        Ok(outcome)
    }

    async fn snapshot(&self, campaign_id: i64) -> Result<Option<PoolSnapshot>, PoolError> {
        Ok(meta(&self.db, campaign_id).await?.map(|m| PoolSnapshot {
            state: m.state,
            packets_left: m.packets_left,
            amount_left: m.amount_left,
        }))
    }

    async fn cancel(
        &self,
        campaign: &PoolCampaign,
        now_ms: i64,
    ) -> Result<CancelOutcome, PoolError> {
        let txn = self.db.begin().await?;
        let Some(m) = meta(&txn, campaign.id).await? else {
            return Ok(CancelOutcome::NotLoaded);
        };
        let outcome = if m.state == "cancelled" {
            CancelOutcome::Cancelled
        } else if now_ms >= m.starts_at_ms || m.state != "scheduled" {
            CancelOutcome::AlreadyStarted
        } else {
            set_state(&txn, campaign.id, "cancelled").await?;
            CancelOutcome::Cancelled
        };
        txn.commit().await?;
        Ok(outcome)
    }

    async fn close(&self, campaign_id: i64) -> Result<Option<PoolSnapshot>, PoolError> {
        let txn = self.db.begin().await?;
        let Some(m) = meta(&txn, campaign_id).await? else {
            return Ok(None);
        };
        let state = if m.state == "scheduled" || m.state == "active" {
            set_state(&txn, campaign_id, "expired").await?;
            "expired".to_owned()
        } else {
            m.state
        };
        txn.commit().await?;
        Ok(Some(PoolSnapshot {
            state,
            packets_left: m.packets_left,
            amount_left: m.amount_left,
        }))
    }

    async fn return_packet(
        &self,
        campaign: &PoolCampaign,
        claim_id: &str,
        seq: u32,
        amount: i64,
    ) -> Result<bool, PoolError> {
        let now_ms = redpacket_common::time::now_ms();
        let txn = self.db.begin().await?;
        let done = txn
            .query_one_raw(stmt(
                "SELECT returned FROM local_pool_returns WHERE claim_id = ?",
                vec![claim_id.into()],
            ))
            .await?;
        if let Some(done) = done {
            let returned: i64 = done.try_get_by_index(0)?;
            return Ok(returned == 1);
        }
        txn.execute_raw(stmt(
            "UPDATE local_pool_claims SET pending = 0 WHERE claim_id = ?",
            vec![claim_id.into()],
        ))
        .await?;
        let live = meta(&txn, campaign.id).await?.is_some_and(|m| {
            (m.state == "scheduled" || m.state == "active") && now_ms < m.ends_at_ms
        });
        if live {
            txn.execute_raw(stmt(
                "INSERT INTO local_pool_packets (campaign_id, seq, amount) VALUES (?, ?, ?)",
                vec![campaign.id.into(), seq.into(), amount.into()],
            ))
            .await?;
            txn.execute_raw(stmt(
                "UPDATE local_pool_meta SET packets_left = packets_left + 1, amount_left = \
                 amount_left + ? WHERE campaign_id = ?",
                vec![amount.into(), campaign.id.into()],
            ))
            .await?;
        }
        txn.execute_raw(stmt(
            "INSERT INTO local_pool_returns (claim_id, campaign_id, returned) VALUES (?, ?, ?)",
            vec![claim_id.into(), campaign.id.into(), i64::from(live).into()],
        ))
        .await?;
        txn.commit().await?;
        Ok(live)
    }

    async fn pending_claim(
        &self,
        campaign_id: i64,
        claim_id: &str,
    ) -> Result<Option<PendingClaim>, PoolError> {
        let row = self
            .db
            .query_one_raw(stmt(
                "SELECT user_id, seq, amount, grabbed_at_ms FROM local_pool_claims WHERE \
                 claim_id = ? AND campaign_id = ? AND pending = 1",
                vec![claim_id.into(), campaign_id.into()],
            ))
            .await?;
        let Some(row) = row else { return Ok(None) };
        let seq: i64 = row.try_get_by_index(1)?;
        Ok(Some(PendingClaim {
            claim_id: claim_id.to_owned(),
            user_id: row.try_get_by_index(0)?,
            seq: u32::try_from(seq).map_err(|_| PoolError::Protocol(format!("seq {seq}")))?,
            amount: row.try_get_by_index(2)?,
            grabbed_at_ms: row.try_get_by_index(3)?,
        }))
    }

    async fn forget_pending(&self, campaign_id: i64, claim_ids: &[&str]) -> Result<(), PoolError> {
        // SQLite binds at most 32,766 values per statement; 500 ids stay far below.
        for chunk in claim_ids.chunks(500) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let mut values: Vec<Value> = vec![campaign_id.into()];
            values.extend(chunk.iter().map(|id| Value::from(*id)));
            self.db
                .execute_raw(stmt(
                    &format!(
                        "UPDATE local_pool_claims SET pending = 0 \
                         WHERE campaign_id = ? AND claim_id IN ({marks})"
                    ),
                    values,
                ))
                .await?;
        }
        Ok(())
    }

    async fn purge(&self, campaign: &PoolCampaign) -> Result<(), PoolError> {
        let txn = self.db.begin().await?;
        for table in [
            "local_pool_meta",
            "local_pool_packets",
            "local_pool_claims",
            "local_pool_returns",
        ] {
            txn.execute_raw(stmt(
                &format!("DELETE FROM {table} WHERE campaign_id = ?"),
                vec![campaign.id.into()],
            ))
            .await?;
        }
        txn.commit().await?;
        Ok(())
    }

    async fn rebuild(
        &self,
        _campaign: &PoolCampaign,
        _contents: &crate::store::PoolContents,
    ) -> Result<bool, PoolError> {
        // The local pool lives in the campaign database itself: it is never lost apart from it.
        Ok(false)
    }

    async fn inventory(
        &self,
        _campaign: &PoolCampaign,
        _max_items: usize,
    ) -> Result<Inventory, PoolError> {
        // The grab takes its packet, records the claim and writes its hand-off in one
        // transaction of the campaign's own database: nothing for a repair to compare.
        Ok(Inventory::NotInspected(
            "the embedded pool lives in the campaign database's own transactions".to_owned(),
        ))
    }

    async fn mend(
        &self,
        _campaign: &PoolCampaign,
        _version: &PoolVersion,
        _drift: (i64, i64),
        _mends: &[Mend],
    ) -> Result<MendOutcome, PoolError> {
        Ok(MendOutcome::Moved)
    }

    async fn ping(&self) -> Result<String, PoolError> {
        self.db.execute_unprepared("SELECT 1").await?;
        Ok("local (SQLite)".to_owned())
    }
}
