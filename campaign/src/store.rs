//! The campaign database: campaigns, packets, claims, counters and the event outbox.

use std::collections::{BTreeMap, HashMap, HashSet};

use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait,
    QueryFilter, QueryOrder, QuerySelect, TransactionTrait,
};

use redpacket_common::db::plan_as_lookups;

use crate::entity::{campaign, claim, event, packet, stats};

/// Packet rows per multi-row insert: small enough that one statement stays well under 64 KiB
/// (larger messages stall on TCP delayed acknowledgements of the database connection), and
/// far under every backend's bound on bind parameters.
const PACKET_INSERT_ROWS: usize = 500;

/// Counter rows per campaign: claims of a hot campaign update `STATS_SHARDS` rows instead of
/// serializing on one.
pub const STATS_SHARDS: i32 = 16;

/// The counter row a claim counts in.
/// Rows per statement when claims are read or written in batches.
const CLAIM_BATCH_ROWS: usize = 200;

fn shard_of(claim_id: &str) -> i32 {
    i32::try_from(crate::pool::fnv1a(claim_id) % u64::from(STATS_SHARDS.unsigned_abs()))
        .unwrap_or(0)
}

/// Lifecycle states.
pub mod status {
    pub const FUNDING: &str = "funding";
    pub const SCHEDULED: &str = "scheduled";
    pub const ACTIVE: &str = "active";
    pub const EXHAUSTED: &str = "exhausted";
    pub const EXPIRED: &str = "expired";
    pub const SETTLED: &str = "settled";
    pub const CANCELLED: &str = "cancelled";
    pub const REJECTED: &str = "rejected";
}

/// Pool states of a campaign row.
pub mod pool_state {
    pub const NONE: &str = "none";
    pub const LOADING: &str = "loading";
    pub const LOADED: &str = "loaded";
    pub const CLOSED: &str = "closed";
    /// Loaded once, then found missing from the pool's store while the campaign is live; the
    /// time it was noticed is in `pool_claimed_at_ms`.
    pub const LOST: &str = "lost";
    /// Being rebuilt from the database by one process (claimed at `pool_claimed_at_ms`).
    pub const REBUILDING: &str = "rebuilding";
}

/// What a lost pool is rebuilt from: the packets no claim holds, and each user's claims.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolContents {
    /// `(seq, amount)` of every packet no live claim holds, by seq.
    pub available: Vec<(u32, i64)>,
    /// Each user with claims, and them as `(claim id, amount)` by id: every claim counts
    /// towards the per-user limit, a compensated one too (as in the pool itself).
    pub users: Vec<(String, Vec<(String, i64)>)>,
}

/// Claim states.
pub mod claim_status {
    pub const PENDING: &str = "pending";
    pub const CREDITED: &str = "credited";
    pub const COMPENSATED: &str = "compensated";
}

/// Event kinds of the outbox.
pub mod event_kind {
    /// A campaign waits for its funding saga.
    pub const CREATED: &str = "campaign.created";
    /// A campaign ended (exhausted, expired or cancelled): its refund saga may run.
    pub const ENDED: &str = "campaign.ended";
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] DbErr),
    #[error("idempotency key `{0}` was used with another request")]
    IdempotencyConflict(String),
    #[error("claim `{0}` is {1}; it cannot become {2}")]
    ClaimState(String, String, &'static str),
    #[error("claim `{0}` does not match its packet or its earlier record")]
    ClaimMismatch(String),
    #[error("campaign {0} does not exist")]
    UnknownCampaign(i64),
    /// A repair's record of a packet another claim holds (`packet_taken`) in a campaign whose
    /// pool was never rebuilt: nothing written, for a later run or an operator.
    #[error("claim `{0}` conflicts with the database: {1}")]
    RecordConflict(String, &'static str),
}

/// What a checked record does with a claim whose packet another claim holds or whose user is
/// at the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflicts {
    /// Records it `compensated` with the reason: a rebuilt pool's rule, where the lost pool and
    /// the rebuilt one may each have granted without knowing of the other.
    Compensate,
    /// A packet another claim holds writes nothing and answers
    /// [`StoreError::RecordConflict`]: in a pool never rebuilt such a conflict may mean the
    /// database lags the pool (a compensation's return landed before its row), so refusing the
    /// grant could leave a user answered 200 unpaid. A user over the limit is still recorded
    /// `compensated`: the pool counts a compensated claim against the limit as the database
    /// does, so that conflict is never a lag.
    RefuseTakenPacket,
}

/// A campaign's packets (`packets[seq]` is packet `seq`'s amount) and the claims holding each.
pub type PacketHolders = (Vec<i64>, HashMap<u32, Vec<String>>);

/// The result of a create with an idempotency key.
#[derive(Debug)]
pub enum Created {
    New(campaign::Model),
    /// The same key and body were seen before: the original campaign.
    Existing(campaign::Model),
}

/// A claim as handed off by the pool, to record.
#[derive(Debug, Clone)]
pub struct ClaimRecord {
    pub id: String,
    pub campaign_id: i64,
    pub user_id: String,
    pub seq: u32,
    pub amount: i64,
    pub currency: String,
    pub grabbed_at_ms: i64,
    pub request_id: Option<String>,
}

/// The campaign database.
#[derive(Debug, Clone)]
pub struct Store {
    db: DatabaseConnection,
}

fn is_unique_violation(err: &DbErr) -> bool {
    let text = err.to_string().to_ascii_lowercase();
    text.contains("unique") || text.contains("duplicate")
}

impl Store {
    pub fn new(db: DatabaseConnection) -> Self {
        Store { db }
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Creates a campaign with its packets, counters and `campaign.created` event in one
    /// transaction; with an idempotency key, a repeat answers the original.
    pub async fn create(
        &self,
        model: campaign::Model,
        packets: &[i64],
        event_id: i64,
    ) -> Result<Created, StoreError> {
        if let Some(existing) = self.by_idempotency_key(&model).await? {
            return Ok(existing);
        }
        match self.insert_campaign(&model, packets, event_id).await {
            Ok(()) => Ok(Created::New(model)),
            // Two creates with the same key raced: the loser answers like a repeat.
            Err(StoreError::Db(err)) if is_unique_violation(&err) => self
                .by_idempotency_key(&model)
                .await?
                .ok_or(StoreError::Db(err)),
            Err(err) => Err(err),
        }
    }

    async fn by_idempotency_key(
        &self,
        model: &campaign::Model,
    ) -> Result<Option<Created>, StoreError> {
        let Some(key) = &model.idempotency_key else {
            return Ok(None);
        };
        let existing = campaign::Entity::find()
            .filter(campaign::Column::MerchantId.eq(&model.merchant_id))
            .filter(campaign::Column::IdempotencyKey.eq(key))
            .one(&self.db)
            .await?;
        match existing {
            Some(existing) if existing.request_hash == model.request_hash => {
                Ok(Some(Created::Existing(existing)))
            }
            Some(_) => Err(StoreError::IdempotencyConflict(key.clone())),
            None => Ok(None),
        }
    }

    async fn insert_campaign(
        &self,
        model: &campaign::Model,
        packets: &[i64],
        event_id: i64,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin().await?;
        campaign::Entity::insert(campaign_active_model(model))
            .exec_without_returning(&txn)
            .await?;
        for (chunk_index, chunk) in packets.chunks(PACKET_INSERT_ROWS).enumerate() {
            let first = chunk_index * PACKET_INSERT_ROWS;
            packet::Entity::insert_many(chunk.iter().enumerate().map(|(offset, amount)| {
                packet::ActiveModel {
                    campaign_id: Set(model.id),
                    seq: Set(i32::try_from(first + offset).unwrap_or(i32::MAX)),
                    amount: Set(*amount),
                }
            }))
            .exec_without_returning(&txn)
            .await?;
        }
        stats::Entity::insert_many((0..STATS_SHARDS).map(|shard| stats::ActiveModel {
            campaign_id: Set(model.id),
            shard: Set(shard),
            packets_recorded: Set(0),
            amount_recorded: Set(0),
            packets_credited: Set(0),
            amount_credited: Set(0),
            packets_compensated: Set(0),
            amount_compensated: Set(0),
            packets_returned: Set(0),
            amount_returned: Set(0),
            packets_remaining_final: Set(None),
            amount_remaining_final: Set(None),
            amount_refunded: Set(0),
        }))
        .exec_without_returning(&txn)
        .await?;
        insert_event(
            &txn,
            event_id,
            model,
            event_kind::CREATED,
            model.created_at_ms,
        )
        .await?;
        txn.commit().await?;
        Ok(())
    }

    pub async fn campaign(&self, id: i64) -> Result<Option<campaign::Model>, StoreError> {
        Ok(campaign::Entity::find_by_id(id).one(&self.db).await?)
    }

    /// A merchant's campaigns, newest first, with ids below `before`.
    pub async fn campaigns_of(
        &self,
        merchant_id: &str,
        before: Option<i64>,
        limit: u64,
    ) -> Result<Vec<campaign::Model>, StoreError> {
        let mut query =
            campaign::Entity::find().filter(campaign::Column::MerchantId.eq(merchant_id));
        if let Some(before) = before {
            query = query.filter(campaign::Column::Id.lt(before));
        }
        Ok(query
            .order_by_desc(campaign::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?)
    }

    /// Campaigns the lifecycle has to watch.
    pub async fn live_campaigns(&self) -> Result<Vec<campaign::Model>, StoreError> {
        Ok(campaign::Entity::find()
            .filter(campaign::Column::Status.is_in([status::SCHEDULED, status::ACTIVE]))
            .all(&self.db)
            .await?)
    }

    /// Moves a campaign from one of `from` to `to`, with an optional outbox event, in one
    /// transaction. Returns false when the campaign was not in any of `from`.
    pub async fn transition(
        &self,
        id: i64,
        from: &[&str],
        to: &str,
        reason: Option<String>,
        event: Option<(i64, &'static str)>,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let txn = self.db.begin().await?;
        let mut update = campaign::Entity::update_many()
            .col_expr(campaign::Column::Status, Expr::value(to))
            .col_expr(campaign::Column::UpdatedAtMs, Expr::value(now_ms));
        if let Some(reason) = reason {
            update = update.col_expr(campaign::Column::StatusReason, Expr::value(reason));
        }
        let result = update
            .filter(campaign::Column::Id.eq(id))
            .filter(campaign::Column::Status.is_in(from.iter().copied()))
            .exec(&txn)
            .await?;
        if result.rows_affected == 0 {
            return Ok(false);
        }
        if let Some((event_id, kind)) = event {
            let model = campaign::Entity::find_by_id(id)
                .one(&txn)
                .await?
                .ok_or(StoreError::UnknownCampaign(id))?;
            insert_event(&txn, event_id, &model, kind, now_ms).await?;
        }
        txn.commit().await?;
        Ok(true)
    }

    /// Claims the right to load a campaign's pool: only one process wins, and a loader that
    /// has not finished within `stale_after_ms` may be replaced.
    pub async fn claim_pool_load(
        &self,
        id: i64,
        now_ms: i64,
        stale_after_ms: i64,
    ) -> Result<bool, StoreError> {
        self.claim_pool_work(
            id,
            now_ms,
            stale_after_ms,
            pool_state::NONE,
            pool_state::LOADING,
        )
        .await
    }

    /// Takes work on a live campaign's pool for this process: its `pool_state` goes from
    /// `idle` to `busy`, or stays `busy` with a new claim time when the last claim is older than
    /// `stale_after_ms` (its process died). False when another process has it.
    async fn claim_pool_work(
        &self,
        id: i64,
        now_ms: i64,
        stale_after_ms: i64,
        idle: &str,
        busy: &str,
    ) -> Result<bool, StoreError> {
        let result = campaign::Entity::update_many()
            .col_expr(campaign::Column::PoolState, Expr::value(busy))
            .col_expr(campaign::Column::PoolClaimedAtMs, Expr::value(now_ms))
            .filter(campaign::Column::Id.eq(id))
            .filter(campaign::Column::Status.is_in([status::SCHEDULED, status::ACTIVE]))
            .filter(
                campaign::Column::PoolState
                    .eq(idle)
                    .or(campaign::Column::PoolState
                        .eq(busy)
                        .and(campaign::Column::PoolClaimedAtMs.lt(now_ms - stale_after_ms))),
            )
            .exec(&self.db)
            .await?;
        Ok(result.rows_affected == 1)
    }

    pub async fn set_pool_state(&self, id: i64, state: &str) -> Result<(), StoreError> {
        campaign::Entity::update_many()
            .col_expr(campaign::Column::PoolState, Expr::value(state))
            .filter(campaign::Column::Id.eq(id))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// The packets of a campaign in `seq` order.
    pub async fn packets(&self, id: i64) -> Result<Vec<i64>, StoreError> {
        Ok(packet::Entity::find()
            .select_only()
            .column(packet::Column::Amount)
            .filter(packet::Column::CampaignId.eq(id))
            .order_by_asc(packet::Column::Seq)
            .into_tuple::<i64>()
            .all(&self.db)
            .await?)
    }

    /// What the campaign's pool holds by the database: the packets no claim holds (one that is
    /// pending or credited, or compensated with its packet kept out for the refund) and every
    /// user's claims. Claims the pool granted that are not recorded yet are not known here.
    pub async fn pool_contents(&self, id: i64) -> Result<PoolContents, StoreError> {
        let packets = self.packets(id).await?;
        let claims = claim::Entity::find()
            .filter(claim::Column::CampaignId.eq(id))
            .order_by_asc(claim::Column::Id)
            .all(&self.db)
            .await?;
        let mut held = vec![false; packets.len()];
        let mut users: BTreeMap<String, Vec<(String, i64)>> = BTreeMap::new();
        for claim in claims {
            let live = claim.status != claim_status::COMPENSATED || !claim.returned_to_pool;
            if live
                && let Some(slot) = usize::try_from(claim.packet_seq)
                    .ok()
                    .and_then(|s| held.get_mut(s))
            {
                *slot = true;
            }
            users
                .entry(claim.user_id)
                .or_default()
                .push((claim.id, claim.amount));
        }
        let available = packets
            .iter()
            .enumerate()
            .filter(|(seq, _)| !held[*seq])
            .map(|(seq, amount)| (u32::try_from(seq).unwrap_or(u32::MAX), *amount))
            .collect();
        Ok(PoolContents {
            available,
            users: users.into_iter().collect(),
        })
    }

    /// A campaign's packets in `seq` order and, for each packet claims hold (pending,
    /// credited, or compensated with the packet kept out for the refund), those claims' ids
    /// (more than one is a packet granted twice): what a repair compares the pool with. `None`
    /// when the campaign has more than `max_rows` packets (its row's `packet_count`, which its
    /// packets match) or claims: a repair reads no more.
    pub async fn packet_holders(
        &self,
        campaign: &campaign::Model,
        max_rows: u64,
    ) -> Result<Option<PacketHolders>, StoreError> {
        let id = campaign.id;
        if u64::try_from(campaign.packet_count).unwrap_or(u64::MAX) > max_rows {
            return Ok(None);
        }
        let packets = self.packets(id).await?;
        let claims: Vec<(String, i32, String, bool)> = claim::Entity::find()
            .select_only()
            .column(claim::Column::Id)
            .column(claim::Column::PacketSeq)
            .column(claim::Column::Status)
            .column(claim::Column::ReturnedToPool)
            .filter(claim::Column::CampaignId.eq(id))
            .limit(max_rows + 1)
            .into_tuple()
            .all(&self.db)
            .await?;
        if claims.len() as u64 > max_rows {
            return Ok(None);
        }
        let mut holders: HashMap<u32, Vec<String>> = HashMap::new();
        for (claim_id, seq, status, returned) in claims {
            if status == claim_status::COMPENSATED && returned {
                continue;
            }
            if let Ok(seq) = u32::try_from(seq) {
                holders.entry(seq).or_default().push(claim_id);
            }
        }
        Ok(Some((packets, holders)))
    }

    /// Makes every later record of the campaign a checked one ([`Store::record_claim_checked`]),
    /// as after a rebuild: set when a repair found packets granted and still in a bucket, whose
    /// second grants the normal path's record would not notice. Kept once set.
    pub async fn require_checked_records(&self, id: i64, now_ms: i64) -> Result<(), StoreError> {
        campaign::Entity::update_many()
            .col_expr(campaign::Column::PoolRebuiltAtMs, Expr::value(now_ms))
            .filter(campaign::Column::Id.eq(id))
            .filter(campaign::Column::PoolRebuiltAtMs.is_null())
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// Campaigns not settled (live, ended or cancelled) from id `from` on, oldest first: the
    /// ones a repair looks at.
    pub async fn unsettled_campaigns(
        &self,
        from: i64,
        limit: u64,
    ) -> Result<Vec<campaign::Model>, StoreError> {
        Ok(campaign::Entity::find()
            .filter(campaign::Column::Id.gte(from))
            .filter(campaign::Column::Status.is_in([
                status::SCHEDULED,
                status::ACTIVE,
                status::EXHAUSTED,
                status::EXPIRED,
                status::CANCELLED,
            ]))
            .order_by_asc(campaign::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?)
    }

    /// A campaign's claims still `pending` that were grabbed before `before_ms`, by id, after
    /// the claim `after` when given.
    pub async fn stale_pending_claims(
        &self,
        campaign_id: i64,
        before_ms: i64,
        after: Option<&str>,
        limit: u64,
    ) -> Result<Vec<claim::Model>, StoreError> {
        let mut query = claim::Entity::find().filter(claim::Column::CampaignId.eq(campaign_id));
        if let Some(after) = after {
            query = query.filter(claim::Column::Id.gt(after));
        }
        Ok(query
            .filter(claim::Column::Status.eq(claim_status::PENDING))
            .filter(claim::Column::GrabbedAtMs.lt(before_ms))
            .order_by_asc(claim::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?)
    }

    /// Marks a loaded pool lost (noticed at `now_ms`); false when it was not `loaded`.
    pub async fn mark_pool_lost(&self, id: i64, now_ms: i64) -> Result<bool, StoreError> {
        let result = campaign::Entity::update_many()
            .col_expr(campaign::Column::PoolState, Expr::value(pool_state::LOST))
            .col_expr(campaign::Column::PoolClaimedAtMs, Expr::value(now_ms))
            .filter(campaign::Column::Id.eq(id))
            .filter(campaign::Column::PoolState.eq(pool_state::LOADED))
            .exec(&self.db)
            .await?;
        Ok(result.rows_affected == 1)
    }

    /// A rebuilt pool is loaded again (its claims are checked since the rebuild was claimed).
    pub async fn mark_pool_rebuilt(&self, id: i64) -> Result<(), StoreError> {
        campaign::Entity::update_many()
            .col_expr(campaign::Column::PoolState, Expr::value(pool_state::LOADED))
            .filter(campaign::Column::Id.eq(id))
            .filter(campaign::Column::PoolState.eq(pool_state::REBUILDING))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// Takes the rebuild of a lost pool (or of one whose rebuilder stopped `stale_after_ms`
    /// ago) for this process; false when another has it.
    pub async fn claim_pool_rebuild(
        &self,
        id: i64,
        now_ms: i64,
        stale_after_ms: i64,
    ) -> Result<bool, StoreError> {
        let claimed = self
            .claim_pool_work(
                id,
                now_ms,
                stale_after_ms,
                pool_state::LOST,
                pool_state::REBUILDING,
            )
            .await?;
        if claimed {
            // Before the rebuilt pool hands out a packet: every record from then on is checked,
            // whatever the pool's state later.
            campaign::Entity::update_many()
                .col_expr(campaign::Column::PoolRebuiltAtMs, Expr::value(now_ms))
                .filter(campaign::Column::Id.eq(id))
                .exec(&self.db)
                .await?;
        }
        Ok(claimed)
    }

    /// Remembers what was left in the pool when the campaign ended.
    pub async fn finalize_remaining(
        &self,
        id: i64,
        packets_left: i64,
        amount_left: i64,
    ) -> Result<(), StoreError> {
        stats::Entity::update_many()
            .col_expr(
                stats::Column::PacketsRemainingFinal,
                Expr::value(packets_left),
            )
            .col_expr(
                stats::Column::AmountRemainingFinal,
                Expr::value(amount_left),
            )
            .filter(stats::Column::CampaignId.eq(id))
            .filter(stats::Column::Shard.eq(0))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// A campaign's counters, summed over their shards.
    pub async fn stats(&self, id: i64) -> Result<Option<stats::Model>, StoreError> {
        let shards = stats::Entity::find()
            .filter(stats::Column::CampaignId.eq(id))
            .all(&self.db)
            .await?;
        Ok(shards.into_iter().reduce(|mut total, shard| {
            total.packets_recorded += shard.packets_recorded;
            total.amount_recorded += shard.amount_recorded;
            total.packets_credited += shard.packets_credited;
            total.amount_credited += shard.amount_credited;
            total.packets_compensated += shard.packets_compensated;
            total.amount_compensated += shard.amount_compensated;
            total.packets_returned += shard.packets_returned;
            total.amount_returned += shard.amount_returned;
            total.packets_remaining_final = total
                .packets_remaining_final
                .or(shard.packets_remaining_final);
            total.amount_remaining_final = total
                .amount_remaining_final
                .or(shard.amount_remaining_final);
            total.amount_refunded += shard.amount_refunded;
            total
        }))
    }

    /// Records the refund of a settled campaign.
    pub async fn settle(
        &self,
        id: i64,
        amount_refunded: i64,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let txn = self.db.begin().await?;
        let moved = campaign::Entity::update_many()
            .col_expr(campaign::Column::Status, Expr::value(status::SETTLED))
            .col_expr(campaign::Column::UpdatedAtMs, Expr::value(now_ms))
            .filter(campaign::Column::Id.eq(id))
            .filter(campaign::Column::Status.is_in([
                status::EXHAUSTED,
                status::EXPIRED,
                status::CANCELLED,
            ]))
            .exec(&txn)
            .await?;
        if moved.rows_affected == 1 {
            stats::Entity::update_many()
                .col_expr(stats::Column::AmountRefunded, Expr::value(amount_refunded))
                .filter(stats::Column::CampaignId.eq(id))
                .filter(stats::Column::Shard.eq(0))
                .exec(&txn)
                .await?;
        }
        txn.commit().await?;
        Ok(moved.rows_affected == 1)
    }

    /// Records a claim once; a repeat answers the stored claim.
    pub async fn record_claim(&self, record: &ClaimRecord) -> Result<claim::Model, StoreError> {
        if let Some(existing) = self.claim(&record.id).await? {
            return same_record(existing, record);
        }
        let packet = packet::Entity::find_by_id((
            record.campaign_id,
            i32::try_from(record.seq).unwrap_or(i32::MAX),
        ))
        .one(&self.db)
        .await?;
        if packet.is_none_or(|packet| packet.amount != record.amount) {
            return Err(StoreError::ClaimMismatch(record.id.clone()));
        }
        let model = pending_claim(record, chrono::Utc::now().timestamp_millis());
        let txn = self.db.begin().await?;
        let inserted = claim::Entity::insert(claim_active_model(&model))
            .on_conflict(
                OnConflict::column(claim::Column::Id)
                    .do_nothing_on([claim::Column::Id])
                    .to_owned(),
            )
            .exec_without_returning(&txn)
            .await?;
        if inserted == 1 {
            bump(
                &txn,
                record.campaign_id,
                &record.id,
                stats::Column::PacketsRecorded,
                stats::Column::AmountRecorded,
                record.amount,
            )
            .await?;
        }
        txn.commit().await?;
        if inserted == 1 {
            return Ok(model);
        }
        // Recorded by a concurrent call between the first read and the insert.
        self.claim(&record.id)
            .await?
            .ok_or_else(|| StoreError::ClaimMismatch(record.id.clone()))
    }

    /// Of these campaigns, the ones whose pool was ever rebuilt, with their per-user limit: their
    /// claims are recorded with [`Store::record_claim_checked`]. One lookup by key per batch.
    pub async fn rebuilt_limits(
        &self,
        campaign_ids: &[i64],
    ) -> Result<HashMap<i64, i64>, StoreError> {
        Ok(campaign::Entity::find()
            .filter(campaign::Column::Id.is_in(campaign_ids.iter().copied()))
            .filter(campaign::Column::PoolRebuiltAtMs.is_not_null())
            .all(&self.db)
            .await?
            .into_iter()
            .map(|campaign| (campaign.id, i64::from(campaign.per_user_limit)))
            .collect())
    }

    /// Records a claim of a campaign whose pool was rebuilt: as [`Store::record_claim`], except
    /// that a claim whose packet another claim holds (pending, credited, or compensated with
    /// the packet kept out), or whose user already holds `per_user_limit` claims, is recorded
    /// `compensated` with the reason, in the same transaction: it was granted by the lost pool
    /// or by the rebuilt one without knowing of the other, nothing moved for it, and the claim
    /// recorded first keeps the packet. `granted_by_rebuilt_pool`: the rebuilt pool still holds
    /// the claim as pending (a grant of the lost pool is not known to it).
    pub async fn record_claim_checked(
        &self,
        record: &ClaimRecord,
        per_user_limit: i64,
        granted_by_rebuilt_pool: bool,
    ) -> Result<claim::Model, StoreError> {
        self.record_claim_repaired(
            record,
            per_user_limit,
            granted_by_rebuilt_pool,
            &HashSet::new(),
            Conflicts::Compensate,
        )
        .await
    }

    /// [`Store::record_claim_checked`] for a repair: a claim in `returned_claims` (its packet
    /// went back to the pool, whatever its row says yet) holds no packet, and `on_conflict`
    /// says whether a conflict is recorded `compensated` or refused with nothing written.
    pub async fn record_claim_repaired(
        &self,
        record: &ClaimRecord,
        per_user_limit: i64,
        granted_by_rebuilt_pool: bool,
        returned_claims: &HashSet<String>,
        on_conflict: Conflicts,
    ) -> Result<claim::Model, StoreError> {
        let seq = i32::try_from(record.seq).unwrap_or(i32::MAX);
        let txn = self.db.begin().await?;
        // The campaign's row is the lock: the checked records of a campaign are one at a time,
        // so neither a packet nor a user's limit can pass two checks at once.
        campaign::Entity::find_by_id(record.campaign_id)
            .lock_exclusive()
            .one(&txn)
            .await?;
        let packet = packet::Entity::find_by_id((record.campaign_id, seq))
            .one(&txn)
            .await?;
        if let Some(existing) = claim::Entity::find_by_id(&record.id).one(&txn).await? {
            txn.commit().await?;
            return same_record(existing, record);
        }
        if packet.is_none_or(|packet| packet.amount != record.amount) {
            return Err(StoreError::ClaimMismatch(record.id.clone()));
        }
        let others = claim::Entity::find()
            .filter(claim::Column::CampaignId.eq(record.campaign_id))
            .filter(
                claim::Column::PacketSeq
                    .eq(seq)
                    .or(claim::Column::UserId.eq(&record.user_id)),
            )
            .all(&txn)
            .await?;
        let packet_taken = others.iter().any(|other| {
            other.packet_seq == seq
                && (other.status != claim_status::COMPENSATED || !other.returned_to_pool)
                && !returned_claims.contains(&other.id)
        });
        let user_claims = others
            .iter()
            .filter(|other| other.user_id == record.user_id)
            .count();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut model = pending_claim(record, now_ms);
        let refused = if packet_taken {
            Some(
                "packet_taken: another claim holds the packet (granted twice after the packet pool was lost)",
            )
        } else if i64::try_from(user_claims).unwrap_or(i64::MAX) >= per_user_limit {
            Some(
                "limit_reached: the user already holds the campaign's limit of claims (granted after the packet pool was lost)",
            )
        } else {
            None
        };
        // Whether the refused claim's packet counts as back (not this claim's to hold): yes when
        // another claim holds it, or when the lost pool granted it (the rebuilt pool has it);
        // no for the rebuilt pool's own grant to a user over the limit, whose packet it took
        // out: that packet stays out for the refund, as after any compensation at the end. So
        // the in-flight count, which counts the packets taken from the pool, stays exact.
        let returned = packet_taken || !granted_by_rebuilt_pool;
        if let (Some(reason), true, Conflicts::RefuseTakenPacket) =
            (refused, packet_taken, on_conflict)
        {
            txn.rollback().await?;
            let code = reason.split(':').next().unwrap_or(reason);
            return Err(StoreError::RecordConflict(record.id.clone(), code));
        }
        if let Some(reason) = refused {
            model.status = claim_status::COMPENSATED.to_owned();
            model.reason = Some(reason.to_owned());
            model.compensated_at_ms = Some(now_ms);
            model.returned_to_pool = returned;
        }
        claim::Entity::insert(claim_active_model(&model))
            .exec_without_returning(&txn)
            .await?;
        bump(
            &txn,
            record.campaign_id,
            &record.id,
            stats::Column::PacketsRecorded,
            stats::Column::AmountRecorded,
            record.amount,
        )
        .await?;
        if refused.is_some() {
            count_compensation(&txn, &model, returned).await?;
        }
        txn.commit().await?;
        Ok(model)
    }

    pub async fn claim(&self, id: &str) -> Result<Option<claim::Model>, StoreError> {
        Ok(claim::Entity::find_by_id(id).one(&self.db).await?)
    }

    /// The claims among `ids` that exist, by id.
    async fn claims_by_id<C: ConnectionTrait>(
        db: &C,
        ids: &[&str],
    ) -> Result<HashMap<String, claim::Model>, StoreError> {
        let mut found = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(CLAIM_BATCH_ROWS) {
            for claim in claim::Entity::find()
                .filter(claim::Column::Id.is_in(chunk.iter().copied()))
                .all(db)
                .await?
            {
                found.insert(claim.id.clone(), claim);
            }
        }
        Ok(found)
    }

    /// Records many claims (distinct ids) at once: what [`Store::record_claim`] does for each,
    /// in one transaction with one counter update per campaign. A claim recorded concurrently
    /// by another call makes the batch's insert fail as a whole; the claims are then recorded
    /// one by one, so every answer is still exact. The outer error is the database's; the inner
    /// ones are each claim's.
    pub async fn record_claims(
        &self,
        records: &[ClaimRecord],
    ) -> Result<Vec<Result<claim::Model, StoreError>>, StoreError> {
        let ids: Vec<&str> = records.iter().map(|record| record.id.as_str()).collect();
        // The reads by key of the batch, in a transaction of their own planned as lookups.
        let reads = self.db.begin().await?;
        plan_as_lookups(&reads).await?;
        let mut existing = Self::claims_by_id(&reads, &ids).await?;
        let mut seqs: BTreeMap<i64, Vec<i32>> = BTreeMap::new();
        for record in records.iter().filter(|r| !existing.contains_key(&r.id)) {
            seqs.entry(record.campaign_id)
                .or_default()
                .push(i32::try_from(record.seq).unwrap_or(i32::MAX));
        }
        let mut amounts: HashMap<(i64, i32), i64> = HashMap::new();
        for (campaign_id, mut seqs) in seqs {
            // Sorted chunks, each also bounded by its lowest and highest seq: the planner may
            // guess a campaign holds a few hundred packets (it has no statistics yet) and then
            // walks all of the campaign's packets checking the list; the range keeps even that
            // walk to the chunk's own stretch of the key.
            seqs.sort_unstable();
            for chunk in seqs.chunks(CLAIM_BATCH_ROWS) {
                let (Some(first), Some(last)) = (chunk.first(), chunk.last()) else {
                    continue;
                };
                for packet in packet::Entity::find()
                    .filter(packet::Column::CampaignId.eq(campaign_id))
                    .filter(packet::Column::Seq.between(*first, *last))
                    .filter(packet::Column::Seq.is_in(chunk.iter().copied()))
                    .all(&reads)
                    .await?
                {
                    amounts.insert((packet.campaign_id, packet.seq), packet.amount);
                }
            }
        }
        reads.commit().await?;
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut results: Vec<Option<Result<claim::Model, StoreError>>> = Vec::new();
        let mut fresh: Vec<(usize, claim::Model)> = Vec::new();
        for (index, record) in records.iter().enumerate() {
            let packet = (
                record.campaign_id,
                i32::try_from(record.seq).unwrap_or(i32::MAX),
            );
            results.push(if let Some(claim) = existing.remove(&record.id) {
                Some(same_record(claim, record))
            } else if amounts.get(&packet) == Some(&record.amount) {
                fresh.push((index, pending_claim(record, now_ms)));
                None
            } else {
                Some(Err(StoreError::ClaimMismatch(record.id.clone())))
            });
        }
        if !fresh.is_empty() {
            let models: Vec<&claim::Model> = fresh.iter().map(|(_, model)| model).collect();
            if self.insert_claims(&models).await? {
                for (index, model) in fresh {
                    results[index] = Some(Ok(model));
                }
            } else {
                for (index, _) in fresh {
                    results[index] = Some(self.record_claim(&records[index]).await);
                }
            }
        }
        Ok(results.into_iter().flatten().collect())
    }

    /// Inserts new claims and counts them as recorded, in one transaction; false (and nothing
    /// written) when one of them exists already.
    async fn insert_claims(&self, models: &[&claim::Model]) -> Result<bool, StoreError> {
        let txn = self.db.begin().await?;
        for chunk in models.chunks(CLAIM_BATCH_ROWS) {
            // A plain insert: a duplicate fails it, and its count of rows is exact everywhere.
            let inserted = claim::Entity::insert_many(chunk.iter().map(|m| claim_active_model(m)))
                .exec_without_returning(&txn)
                .await;
            if inserted.is_err() {
                txn.rollback().await?;
                return Ok(false);
            }
        }
        bump_campaigns(
            &txn,
            models,
            stats::Column::PacketsRecorded,
            stats::Column::AmountRecorded,
        )
        .await?;
        txn.commit().await?;
        Ok(true)
    }

    /// Marks many claims (distinct ids) credited at once: what [`Store::mark_credited`] does
    /// for each, in one transaction with one counter update per campaign. When a claim moved
    /// concurrently, they are marked one by one instead, so every answer is exact.
    pub async fn mark_claims_credited(
        &self,
        ids: &[&str],
        now_ms: i64,
    ) -> Result<Vec<Result<claim::Model, StoreError>>, StoreError> {
        let reads = self.db.begin().await?;
        plan_as_lookups(&reads).await?;
        let mut current = Self::claims_by_id(&reads, ids).await?;
        reads.commit().await?;
        let mut results: Vec<Option<Result<claim::Model, StoreError>>> = Vec::new();
        let mut pending: Vec<(usize, claim::Model)> = Vec::new();
        for (index, id) in ids.iter().enumerate() {
            results.push(match current.remove(*id) {
                None => Some(Err(StoreError::ClaimState(
                    (*id).to_owned(),
                    "unrecorded".into(),
                    claim_status::CREDITED,
                ))),
                Some(claim) if claim.status == claim_status::CREDITED => Some(Ok(claim)),
                Some(claim) if claim.status != claim_status::PENDING => Some(Err(
                    StoreError::ClaimState(claim.id, claim.status, claim_status::CREDITED),
                )),
                Some(claim) => {
                    pending.push((index, claim));
                    None
                }
            });
        }
        if !pending.is_empty() {
            let txn = self.db.begin().await?;
            plan_as_lookups(&txn).await?;
            let mut moved = 0;
            for chunk in pending.chunks(CLAIM_BATCH_ROWS) {
                moved += claim::Entity::update_many()
                    .col_expr(claim::Column::Status, Expr::value(claim_status::CREDITED))
                    .col_expr(claim::Column::CreditedAtMs, Expr::value(now_ms))
                    .filter(claim::Column::Id.is_in(chunk.iter().map(|(_, c)| c.id.as_str())))
                    .filter(claim::Column::Status.eq(claim_status::PENDING))
                    .exec(&txn)
                    .await?
                    .rows_affected;
            }
            if moved == pending.len() as u64 {
                let models: Vec<&claim::Model> = pending.iter().map(|(_, c)| c).collect();
                bump_campaigns(
                    &txn,
                    &models,
                    stats::Column::PacketsCredited,
                    stats::Column::AmountCredited,
                )
                .await?;
                txn.commit().await?;
                for (index, mut claim) in pending {
                    claim.status = claim_status::CREDITED.to_owned();
                    claim.credited_at_ms = Some(now_ms);
                    results[index] = Some(Ok(claim));
                }
            } else {
                txn.rollback().await?;
                for (index, claim) in pending {
                    results[index] = Some(self.mark_credited(&claim.id, now_ms).await);
                }
            }
        }
        Ok(results.into_iter().flatten().collect())
    }

    /// `pending` → `credited`; already credited is a no-op.
    pub async fn mark_credited(&self, id: &str, now_ms: i64) -> Result<claim::Model, StoreError> {
        self.finish_claim(id, claim_status::CREDITED, None, false, now_ms)
            .await
    }

    /// `pending` → `compensated` with the reason; already compensated is a no-op.
    pub async fn mark_compensated(
        &self,
        id: &str,
        reason: &str,
        returned_to_pool: bool,
        now_ms: i64,
    ) -> Result<claim::Model, StoreError> {
        self.finish_claim(
            id,
            claim_status::COMPENSATED,
            Some(reason),
            returned_to_pool,
            now_ms,
        )
        .await
    }

    async fn finish_claim(
        &self,
        id: &str,
        to: &'static str,
        reason: Option<&str>,
        returned_to_pool: bool,
        now_ms: i64,
    ) -> Result<claim::Model, StoreError> {
        let current = self
            .claim(id)
            .await?
            .ok_or_else(|| StoreError::ClaimState(id.to_owned(), "unrecorded".into(), to))?;
        if current.status == to {
            return Ok(current);
        }
        if current.status != claim_status::PENDING {
            return Err(StoreError::ClaimState(id.to_owned(), current.status, to));
        }
        let txn = self.db.begin().await?;
        let mut update = claim::Entity::update_many()
            .col_expr(claim::Column::Status, Expr::value(to))
            .filter(claim::Column::Id.eq(id))
            .filter(claim::Column::Status.eq(claim_status::PENDING));
        update = if to == claim_status::CREDITED {
            update.col_expr(claim::Column::CreditedAtMs, Expr::value(now_ms))
        } else {
            update
                .col_expr(claim::Column::CompensatedAtMs, Expr::value(now_ms))
                .col_expr(
                    claim::Column::Reason,
                    Expr::value(reason.map(str::to_owned)),
                )
                .col_expr(claim::Column::ReturnedToPool, Expr::value(returned_to_pool))
        };
        let result = update.exec(&txn).await?;
        if result.rows_affected == 1 {
            if to == claim_status::CREDITED {
                bump(
                    &txn,
                    current.campaign_id,
                    &current.id,
                    stats::Column::PacketsCredited,
                    stats::Column::AmountCredited,
                    current.amount,
                )
                .await?;
            } else {
                count_compensation(&txn, &current, returned_to_pool).await?;
            }
        }
        txn.commit().await?;
        if result.rows_affected == 1 {
            let mut after = current;
            after.status = to.to_owned();
            if to == claim_status::CREDITED {
                after.credited_at_ms = Some(now_ms);
            } else {
                after.compensated_at_ms = Some(now_ms);
                after.reason = reason.map(str::to_owned);
                after.returned_to_pool = returned_to_pool;
            }
            return Ok(after);
        }
        // Another call moved the claim first: answer what it became.
        let after = self
            .claim(id)
            .await?
            .ok_or_else(|| StoreError::ClaimState(id.to_owned(), "unrecorded".into(), to))?;
        if after.status != to {
            return Err(StoreError::ClaimState(id.to_owned(), after.status, to));
        }
        Ok(after)
    }

    /// Claims of a user, newest first, with ids below `before`.
    pub async fn claims_of_user(
        &self,
        user_id: &str,
        before: Option<&str>,
        limit: u64,
    ) -> Result<Vec<claim::Model>, StoreError> {
        self.claims_page(claim::Column::UserId.eq(user_id), before, limit)
            .await
    }

    /// Claims of a campaign, newest first, with ids below `before`.
    pub async fn claims_of_campaign(
        &self,
        campaign_id: i64,
        before: Option<&str>,
        limit: u64,
    ) -> Result<Vec<claim::Model>, StoreError> {
        self.claims_page(claim::Column::CampaignId.eq(campaign_id), before, limit)
            .await
    }

    async fn claims_page(
        &self,
        owner: sea_orm::sea_query::SimpleExpr,
        before: Option<&str>,
        limit: u64,
    ) -> Result<Vec<claim::Model>, StoreError> {
        let mut query = claim::Entity::find().filter(owner);
        if let Some(before) = before {
            query = query.filter(claim::Column::Id.lt(before));
        }
        Ok(query
            .order_by_desc(claim::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?)
    }

    /// Outbox events not yet published, oldest first.
    pub async fn unpublished_events(&self, limit: u64) -> Result<Vec<event::Model>, StoreError> {
        Ok(event::Entity::find()
            .filter(event::Column::PublishedAtMs.is_null())
            .order_by_asc(event::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?)
    }

    /// Marks outbox events as published.
    pub async fn mark_published(&self, ids: &[i64], now_ms: i64) -> Result<(), StoreError> {
        event::Entity::update_many()
            .col_expr(event::Column::PublishedAtMs, Expr::value(now_ms))
            .filter(event::Column::Id.is_in(ids.iter().copied()))
            .exec(&self.db)
            .await?;
        Ok(())
    }
}

async fn bump(
    txn: &impl ConnectionTrait,
    campaign_id: i64,
    claim_id: &str,
    packets: stats::Column,
    amount: stats::Column,
    by: i64,
) -> Result<(), DbErr> {
    bump_shard(
        txn,
        (campaign_id, shard_of(claim_id)),
        packets,
        amount,
        (1, by),
    )
    .await
}

/// Counts a claim's compensation, and the return of its packet to the pool when it went back,
/// in the counters of its shard.
async fn count_compensation(
    txn: &impl ConnectionTrait,
    claim: &claim::Model,
    returned_to_pool: bool,
) -> Result<(), DbErr> {
    let (campaign_id, id, amount) = (claim.campaign_id, claim.id.as_str(), claim.amount);
    bump(
        txn,
        campaign_id,
        id,
        stats::Column::PacketsCompensated,
        stats::Column::AmountCompensated,
        amount,
    )
    .await?;
    if returned_to_pool {
        bump(
            txn,
            campaign_id,
            id,
            stats::Column::PacketsReturned,
            stats::Column::AmountReturned,
            amount,
        )
        .await?;
    }
    Ok(())
}

/// Adds `(count, sum)` to one shard of a campaign's counters.
async fn bump_shard(
    txn: &impl ConnectionTrait,
    (campaign_id, shard): (i64, i32),
    packets: stats::Column,
    amount: stats::Column,
    (count, sum): (i64, i64),
) -> Result<(), DbErr> {
    stats::Entity::update_many()
        .col_expr(packets, Expr::col(packets).add(count))
        .col_expr(amount, Expr::col(amount).add(sum))
        .filter(stats::Column::CampaignId.eq(campaign_id))
        .filter(stats::Column::Shard.eq(shard))
        .exec(txn)
        .await?;
    Ok(())
}

/// Counts a batch of claims into their campaigns' counters: one update per campaign, on the
/// shard of its first claim (the counters are sums over shards; any shard serves).
async fn bump_campaigns(
    txn: &impl ConnectionTrait,
    claims: &[&claim::Model],
    packets: stats::Column,
    amount: stats::Column,
) -> Result<(), DbErr> {
    let mut totals: BTreeMap<i64, (i32, i64, i64)> = BTreeMap::new();
    for claim in claims {
        let entry = totals
            .entry(claim.campaign_id)
            .or_insert((shard_of(&claim.id), 0, 0));
        entry.1 += 1;
        entry.2 += claim.amount;
    }
    for (campaign_id, (shard, count, sum)) in totals {
        bump_shard(txn, (campaign_id, shard), packets, amount, (count, sum)).await?;
    }
    Ok(())
}

/// An earlier record of a claim answers a repeat only when it is the same claim.
fn same_record(existing: claim::Model, record: &ClaimRecord) -> Result<claim::Model, StoreError> {
    let same = existing.campaign_id == record.campaign_id
        && existing.user_id == record.user_id
        && existing.packet_seq == i32::try_from(record.seq).unwrap_or(i32::MAX)
        && existing.amount == record.amount;
    if same {
        Ok(existing)
    } else {
        Err(StoreError::ClaimMismatch(record.id.clone()))
    }
}

/// A claim as first recorded: pending.
fn pending_claim(record: &ClaimRecord, now_ms: i64) -> claim::Model {
    claim::Model {
        id: record.id.clone(),
        campaign_id: record.campaign_id,
        user_id: record.user_id.clone(),
        packet_seq: i32::try_from(record.seq).unwrap_or(i32::MAX),
        amount: record.amount,
        currency: record.currency.clone(),
        status: claim_status::PENDING.to_owned(),
        reason: None,
        request_id: record.request_id.clone(),
        grabbed_at_ms: record.grabbed_at_ms,
        recorded_at_ms: now_ms,
        credited_at_ms: None,
        compensated_at_ms: None,
        returned_to_pool: false,
    }
}

async fn insert_event(
    txn: &impl ConnectionTrait,
    event_id: i64,
    model: &campaign::Model,
    kind: &str,
    now_ms: i64,
) -> Result<(), DbErr> {
    let payload = serde_json::json!({
        "campaign_id": model.id.to_string(),
        "merchant_id": model.merchant_id,
        "currency": model.currency,
        "total_amount": model.total_amount,
        "status": model.status,
    });
    event::Entity::insert(event::ActiveModel {
        id: Set(event_id),
        campaign_id: Set(model.id),
        kind: Set(kind.to_owned()),
        payload: Set(payload.to_string()),
        created_at_ms: Set(now_ms),
        published_at_ms: Set(None),
    })
    .exec_without_returning(txn)
    .await?;
    Ok(())
}

fn campaign_active_model(model: &campaign::Model) -> campaign::ActiveModel {
    campaign::ActiveModel {
        id: Set(model.id),
        merchant_id: Set(model.merchant_id.clone()),
        title: Set(model.title.clone()),
        currency: Set(model.currency.clone()),
        total_amount: Set(model.total_amount),
        packet_count: Set(model.packet_count),
        split_mode: Set(model.split_mode.clone()),
        min_amount: Set(model.min_amount),
        max_amount: Set(model.max_amount),
        per_user_limit: Set(model.per_user_limit),
        starts_at_ms: Set(model.starts_at_ms),
        ends_at_ms: Set(model.ends_at_ms),
        seed: Set(model.seed),
        buckets: Set(model.buckets),
        status: Set(model.status.clone()),
        status_reason: Set(model.status_reason.clone()),
        pool_state: Set(model.pool_state.clone()),
        pool_claimed_at_ms: Set(model.pool_claimed_at_ms),
        pool_rebuilt_at_ms: Set(model.pool_rebuilt_at_ms),
        idempotency_key: Set(model.idempotency_key.clone()),
        request_hash: Set(model.request_hash.clone()),
        created_at_ms: Set(model.created_at_ms),
        updated_at_ms: Set(model.updated_at_ms),
    }
}

/// The most offending ids a check lists.
const MAX_OFFENDERS: usize = 20;
/// The most campaigns one reconciliation lists for the escrow check (newest first).
pub const MAX_RECONCILED_CAMPAIGNS: u64 = 500;

/// One invariant of the campaign database, checked now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

impl Check {
    fn over(name: &'static str, what: &str, offenders: Vec<String>) -> Check {
        Check {
            name,
            ok: offenders.is_empty(),
            detail: if offenders.is_empty() {
                format!("{what}: none")
            } else {
                format!("{what}: {}", offenders.join(", "))
            },
        }
    }
}

impl Store {
    /// The campaign database's own invariants: no campaign has more claims than packets, no
    /// user holds more claims than the campaign's limit, and the sharded counters agree with
    /// the claims they count.
    pub async fn check_invariants(&self) -> Result<Vec<Check>, StoreError> {
        let over_packets = self
            .texts(
                "SELECT CAST(c.id AS CHAR(20)) FROM campaign_campaigns c JOIN (SELECT campaign_id, \
                 COUNT(*) AS n FROM campaign_claims GROUP BY campaign_id) k ON k.campaign_id = \
                 c.id WHERE k.n > c.packet_count ORDER BY c.id",
            )
            .await?;
        let over_limit = self
            .texts(
                "SELECT CONCAT(CAST(k.campaign_id AS CHAR(20)), CONCAT('/', k.user_id)) FROM \
                 (SELECT campaign_id, user_id, COUNT(*) AS n FROM campaign_claims GROUP BY \
                 campaign_id, user_id) k JOIN campaign_campaigns c ON c.id = k.campaign_id WHERE \
                 k.n > c.per_user_limit ORDER BY k.campaign_id",
            )
            .await?;
        let drifted = self
            .texts(
                "SELECT CAST(s.campaign_id AS CHAR(20)) FROM (SELECT campaign_id, \
                 SUM(packets_recorded) AS pr, SUM(packets_credited) AS pc, SUM(amount_credited) \
                 AS ac, SUM(packets_compensated) AS pp, SUM(amount_compensated) AS ap FROM \
                 campaign_stats GROUP BY campaign_id) s LEFT JOIN (SELECT campaign_id, COUNT(*) AS \
                 pr, SUM(CASE WHEN status = 'credited' THEN 1 ELSE 0 END) AS pc, SUM(CASE WHEN \
                 status = 'credited' THEN amount ELSE 0 END) AS ac, SUM(CASE WHEN status = \
                 'compensated' THEN 1 ELSE 0 END) AS pp, SUM(CASE WHEN status = 'compensated' THEN \
                 amount ELSE 0 END) AS ap FROM campaign_claims GROUP BY campaign_id) k ON \
                 k.campaign_id = s.campaign_id WHERE s.pr <> COALESCE(k.pr, 0) OR s.pc <> \
                 COALESCE(k.pc, 0) OR s.ac <> COALESCE(k.ac, 0) OR s.pp <> COALESCE(k.pp, 0) OR \
                 s.ap <> COALESCE(k.ap, 0) ORDER BY s.campaign_id",
            )
            .await?;
        Ok(vec![
            Check::over(
                "grabs_within_packets",
                "campaigns with more claims than packets",
                over_packets,
            ),
            Check::over(
                "users_within_limit",
                "campaign/user pairs above the per-user limit",
                over_limit,
            ),
            Check::over(
                "counters_match_claims",
                "campaigns whose counters disagree with their claims",
                drifted,
            ),
        ])
    }

    /// The newest campaigns, for the escrow check.
    pub async fn recent_campaigns(&self) -> Result<Vec<campaign::Model>, StoreError> {
        Ok(campaign::Entity::find()
            .order_by_desc(campaign::Column::Id)
            .limit(MAX_RECONCILED_CAMPAIGNS)
            .all(&self.db)
            .await?)
    }

    async fn texts(&self, sql: &str) -> Result<Vec<String>, StoreError> {
        let backend = self.db.get_database_backend();
        // SQLite has no CONCAT before 3.44 and spells CHAR casts differently: rewrite the two
        // portable-enough spellings rather than keep three copies of each query.
        let sql = match backend {
            sea_orm::DbBackend::Sqlite => sqlite_dialect(sql),
            sea_orm::DbBackend::Postgres => sql.replace("AS CHAR(20)", "AS VARCHAR(20)"),
            _ => sql.to_owned(),
        };
        let sql = format!("{sql} LIMIT {MAX_OFFENDERS}");
        let rows = self
            .db
            .query_all_raw(sea_orm::Statement::from_string(backend, sql))
            .await?;
        rows.iter()
            .map(|row| row.try_get_by_index::<String>(0).map_err(StoreError::from))
            .collect()
    }
}

/// `CAST(x AS CHAR(20))` → `CAST(x AS TEXT)`, `CONCAT(a, b)` → `(a || b)`.
fn sqlite_dialect(sql: &str) -> String {
    let mut out = sql.replace("AS CHAR(20)", "AS TEXT");
    while let Some(start) = out.find("CONCAT(") {
        // The arguments hold no top-level commas but the one that separates them.
        let args_start = start + "CONCAT(".len();
        let mut depth = 0usize;
        let mut split = None;
        let mut end = None;
        for (offset, ch) in out[args_start..].char_indices() {
            match ch {
                '(' => depth += 1,
                ')' if depth == 0 => {
                    end = Some(args_start + offset);
                    break;
                }
                ')' => depth -= 1,
                ',' if depth == 0 && split.is_none() => split = Some(args_start + offset),
                _ => {}
            }
        }
        let (Some(split), Some(end)) = (split, end) else {
            break;
        };
        let replaced = format!(
            "({} || {})",
            out[args_start..split].trim(),
            out[split + 1..end].trim()
        );
        out.replace_range(start..=end, &replaced);
    }
    out
}

fn claim_active_model(model: &claim::Model) -> claim::ActiveModel {
    claim::ActiveModel {
        id: Set(model.id.clone()),
        campaign_id: Set(model.campaign_id),
        user_id: Set(model.user_id.clone()),
        packet_seq: Set(model.packet_seq),
        amount: Set(model.amount),
        currency: Set(model.currency.clone()),
        status: Set(model.status.clone()),
        reason: Set(model.reason.clone()),
        request_id: Set(model.request_id.clone()),
        grabbed_at_ms: Set(model.grabbed_at_ms),
        recorded_at_ms: Set(model.recorded_at_ms),
        credited_at_ms: Set(model.credited_at_ms),
        compensated_at_ms: Set(model.compensated_at_ms),
        returned_to_pool: Set(model.returned_to_pool),
    }
}
