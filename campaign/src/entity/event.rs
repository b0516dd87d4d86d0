use sea_orm::entity::prelude::*;

/// The outbox: lifecycle events written in the same transaction as the change they announce,
/// and published later (at least once) to the sagas.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "campaign_events")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: i64,
    pub campaign_id: i64,
    pub kind: String,
    pub payload: String,
    pub created_at_ms: i64,
    pub published_at_ms: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
