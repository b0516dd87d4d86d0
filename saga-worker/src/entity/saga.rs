use sea_orm::entity::prelude::*;

/// One saga: where it is, how often it was tried, what failed last. One row per saga, its
/// error text bounded: state does not grow with retries.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "saga_sagas")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub kind: String,
    pub state: String,
    pub step: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    /// Why the saga turned to compensation (kept apart from the last error, which retries
    /// overwrite).
    pub reason: Option<String>,
    /// The message that started it (JSON envelope), to re-drive it.
    pub payload: String,
    pub request_id: Option<String>,
    /// The highest fencing token that wrote this row.
    pub fence: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
