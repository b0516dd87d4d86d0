use sea_orm::entity::prelude::*;

/// Counters kept alongside the claims, updated in the same transaction as each claim's change,
/// so stats never scan the claims table. Each campaign has `STATS_SHARDS` rows and a claim
/// counts in the row its id hashes to: a hot campaign's counters are not one hot row. The
/// final remainder and the refund live on shard 0.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "campaign_stats")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub campaign_id: i64,
    #[sea_orm(primary_key, auto_increment = false)]
    pub shard: i32,
    pub packets_recorded: i64,
    pub amount_recorded: i64,
    pub packets_credited: i64,
    pub amount_credited: i64,
    pub packets_compensated: i64,
    pub amount_compensated: i64,
    /// Compensated claims whose packet went back to the pool (a subset of compensated).
    pub packets_returned: i64,
    pub amount_returned: i64,
    /// The pool's remainder when the campaign ended (then the pool is no longer read).
    pub packets_remaining_final: Option<i64>,
    pub amount_remaining_final: Option<i64>,
    pub amount_refunded: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
