use sea_orm::entity::prelude::*;

/// A transfer, kept forever: its id is the idempotency key, its row the original result.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "wallet_transfers")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub debit: String,
    pub credit: String,
    pub amount: i64,
    pub currency: String,
    pub metadata: Option<String>,
    pub debit_balance_after: i64,
    pub credit_balance_after: i64,
    pub created_at_ms: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
