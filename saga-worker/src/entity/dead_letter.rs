use sea_orm::entity::prelude::*;

/// A message that exhausted its retries, kept for an operator to inspect and replay.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "saga_dead_letters")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: i64,
    pub saga_id: String,
    pub message: String,
    pub reason: String,
    pub created_at_ms: i64,
    /// When an operator replayed it; `None` while it waits.
    pub replayed_at_ms: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
