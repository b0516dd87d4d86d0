use sea_orm::entity::prelude::*;

/// A campaign as stored. `status` is the lifecycle state, `pool_state` whether its packets are
/// in the pool (`none`, `loading`, `loaded`, `closed`).
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "campaign_campaigns")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: i64,
    pub merchant_id: String,
    pub title: String,
    pub currency: String,
    pub total_amount: i64,
    pub packet_count: i32,
    pub split_mode: String,
    pub min_amount: i64,
    pub max_amount: i64,
    pub per_user_limit: i32,
    pub starts_at_ms: i64,
    pub ends_at_ms: i64,
    pub seed: i64,
    pub buckets: i32,
    pub status: String,
    pub status_reason: Option<String>,
    pub pool_state: String,
    pub pool_claimed_at_ms: Option<i64>,
    /// When the pool was last rebuilt after its store lost it.
    pub pool_rebuilt_at_ms: Option<i64>,
    pub idempotency_key: Option<String>,
    pub request_hash: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
