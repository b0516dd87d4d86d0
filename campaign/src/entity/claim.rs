use sea_orm::entity::prelude::*;

/// A grabbed packet as recorded by the saga: `pending`, then `credited` or `compensated`.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "campaign_claims")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub campaign_id: i64,
    pub user_id: String,
    pub packet_seq: i32,
    pub amount: i64,
    pub currency: String,
    pub status: String,
    pub reason: Option<String>,
    pub request_id: Option<String>,
    pub grabbed_at_ms: i64,
    pub recorded_at_ms: i64,
    pub credited_at_ms: Option<i64>,
    pub compensated_at_ms: Option<i64>,
    pub returned_to_pool: bool,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
