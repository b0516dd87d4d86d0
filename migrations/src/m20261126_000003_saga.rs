//! The saga worker's tables: saga state and dead letters.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum SagaSagas {
    Table,
    Id,
    Kind,
    State,
    Step,
    Attempts,
    LastError,
    Reason,
    Payload,
    RequestId,
    Fence,
    CreatedAtMs,
    UpdatedAtMs,
}

#[derive(DeriveIden)]
enum SagaDeadLetters {
    Table,
    Id,
    SagaId,
    Message,
    Reason,
    CreatedAtMs,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(SagaSagas::Table)
                    .col(
                        ColumnDef::new(SagaSagas::Id)
                            .string_len(100)
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(SagaSagas::Kind).string_len(32).not_null())
                    .col(ColumnDef::new(SagaSagas::State).string_len(16).not_null())
                    .col(ColumnDef::new(SagaSagas::Step).string_len(32).not_null())
                    .col(ColumnDef::new(SagaSagas::Attempts).integer().not_null())
                    .col(ColumnDef::new(SagaSagas::LastError).text().null())
                    .col(ColumnDef::new(SagaSagas::Reason).text().null())
                    .col(ColumnDef::new(SagaSagas::Payload).text().not_null())
                    .col(ColumnDef::new(SagaSagas::RequestId).string_len(128).null())
                    .col(ColumnDef::new(SagaSagas::Fence).big_integer().not_null())
                    .col(
                        ColumnDef::new(SagaSagas::CreatedAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(SagaSagas::UpdatedAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("saga_sagas_state")
                    .table(SagaSagas::Table)
                    .col(SagaSagas::State)
                    .col(SagaSagas::UpdatedAtMs)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(SagaDeadLetters::Table)
                    .col(
                        ColumnDef::new(SagaDeadLetters::Id)
                            .big_integer()
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(SagaDeadLetters::SagaId)
                            .string_len(100)
                            .not_null(),
                    )
                    .col(ColumnDef::new(SagaDeadLetters::Message).text().not_null())
                    .col(ColumnDef::new(SagaDeadLetters::Reason).text().not_null())
                    .col(
                        ColumnDef::new(SagaDeadLetters::CreatedAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(SagaDeadLetters::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(SagaSagas::Table).to_owned())
            .await
    }
}
