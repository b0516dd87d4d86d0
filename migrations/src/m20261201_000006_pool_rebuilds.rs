//! When a campaign's packet pool was last rebuilt from the database after its store lost it.
//! Its claims are recorded with a check from then on, whatever the pool's state later (a grab
//! the lost pool answered may be recorded after the campaign ended).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum CampaignCampaigns {
    Table,
    PoolRebuiltAtMs,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(CampaignCampaigns::Table)
                    .add_column(
                        ColumnDef::new(CampaignCampaigns::PoolRebuiltAtMs)
                            .big_integer()
                            .null(),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(CampaignCampaigns::Table)
                    .drop_column(CampaignCampaigns::PoolRebuiltAtMs)
                    .to_owned(),
            )
            .await
    }
}
