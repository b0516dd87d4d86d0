//! The wallet's ledger: accounts, transfers and the entries they post.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// Longest account name (`escrow:` + a 64-character id, with room to spare).
const ACCOUNT_NAME_LEN: u32 = 80;
/// Longest client-chosen transfer id.
const TRANSFER_ID_LEN: u32 = 128;

#[derive(DeriveIden)]
enum WalletAccounts {
    Table,
    Name,
    Currency,
    Balance,
    Version,
    CreatedAtMs,
    UpdatedAtMs,
}

#[derive(DeriveIden)]
enum WalletTransfers {
    Table,
    Id,
    Debit,
    Credit,
    Amount,
    Currency,
    Metadata,
    DebitBalanceAfter,
    CreditBalanceAfter,
    CreatedAtMs,
}

#[derive(DeriveIden)]
enum WalletEntries {
    Table,
    Id,
    Account,
    TransferId,
    Amount,
    BalanceAfter,
    CreatedAtMs,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(WalletAccounts::Table)
                    .col(
                        ColumnDef::new(WalletAccounts::Name)
                            .string_len(ACCOUNT_NAME_LEN)
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(WalletAccounts::Currency)
                            .string_len(3)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(WalletAccounts::Balance)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(WalletAccounts::Version)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(WalletAccounts::CreatedAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(WalletAccounts::UpdatedAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(WalletTransfers::Table)
                    .col(
                        ColumnDef::new(WalletTransfers::Id)
                            .string_len(TRANSFER_ID_LEN)
                            .not_null()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(WalletTransfers::Debit)
                            .string_len(ACCOUNT_NAME_LEN)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(WalletTransfers::Credit)
                            .string_len(ACCOUNT_NAME_LEN)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(WalletTransfers::Amount)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(WalletTransfers::Currency)
                            .string_len(3)
                            .not_null(),
                    )
                    .col(ColumnDef::new(WalletTransfers::Metadata).text().null())
                    .col(
                        ColumnDef::new(WalletTransfers::DebitBalanceAfter)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(WalletTransfers::CreditBalanceAfter)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(WalletTransfers::CreatedAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(WalletEntries::Table)
                    .col(
                        ColumnDef::new(WalletEntries::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(
                        ColumnDef::new(WalletEntries::Account)
                            .string_len(ACCOUNT_NAME_LEN)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(WalletEntries::TransferId)
                            .string_len(TRANSFER_ID_LEN)
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(WalletEntries::Amount)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(WalletEntries::BalanceAfter)
                            .big_integer()
                            .not_null(),
                    )
                    .col(
                        ColumnDef::new(WalletEntries::CreatedAtMs)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await?;
        // An account's history is read newest first by id.
        manager
            .create_index(
                Index::create()
                    .name("wallet_entries_account_id")
                    .table(WalletEntries::Table)
                    .col(WalletEntries::Account)
                    .col(WalletEntries::Id)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("wallet_entries_transfer")
                    .table(WalletEntries::Table)
                    .col(WalletEntries::TransferId)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            WalletEntries::Table.into_iden(),
            WalletTransfers::Table.into_iden(),
            WalletAccounts::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).to_owned())
                .await?;
        }
        Ok(())
    }
}
