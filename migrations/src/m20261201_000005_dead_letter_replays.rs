//! A dead letter is kept after its replay, marked with when it was replayed, so that a
//! replay retried (by an operator, a script, a bulk replay) answers the first one's result
//! instead of "not found", and the list shows what was replayed.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum SagaDeadLetters {
    Table,
    ReplayedAtMs,
    Id,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(SagaDeadLetters::Table)
                    .add_column(
                        ColumnDef::new(SagaDeadLetters::ReplayedAtMs)
                            .big_integer()
                            .null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("saga_dead_letters_pending")
                    .table(SagaDeadLetters::Table)
                    .col(SagaDeadLetters::ReplayedAtMs)
                    .col(SagaDeadLetters::Id)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("saga_dead_letters_pending")
                    .table(SagaDeadLetters::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(SagaDeadLetters::Table)
                    .drop_column(SagaDeadLetters::ReplayedAtMs)
                    .to_owned(),
            )
            .await
    }
}
