//! Saga state in the saga worker's database, written only under a fencing token.

use std::collections::HashMap;
use std::sync::Arc;

use redpacket_common::db::plan_as_lookups;
use redpacket_common::ids::{Clock, SystemClock};
use sea_orm::sea_query::{Expr, ExprTrait, OnConflict};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, DatabaseConnection, DbErr, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, TransactionTrait,
};

use crate::entity::{dead_letter, saga};

/// The longest error text kept on a saga.
pub const MAX_ERROR_CHARS: usize = 1000;

/// Saga states.
pub mod state {
    /// Being driven (or waiting for a retry).
    pub const RUNNING: &str = "running";
    /// Every step done.
    pub const COMPLETED: &str = "completed";
    /// Undone: the claim compensated or the campaign rejected.
    pub const COMPENSATED: &str = "compensated";
    /// Out of retries: in the dead-letter list until an operator replays it.
    pub const STUCK: &str = "stuck";

    pub fn is_terminal(state: &str) -> bool {
        state == COMPLETED || state == COMPENSATED
    }
}

fn bounded(text: &str) -> String {
    text.chars().take(MAX_ERROR_CHARS).collect()
}

/// Rows per statement when sagas are written in batches.
const BATCH_ROWS: usize = 200;

/// A saga as its first message describes it.
#[derive(Debug, Clone)]
pub struct NewSaga<'a> {
    pub id: &'a str,
    pub kind: &'a str,
    pub payload: String,
    pub request_id: Option<&'a str>,
}

/// The saga tables.
#[derive(Clone)]
pub struct SagaStore {
    db: DatabaseConnection,
    /// The saga worker's clock: the times its rows carry, and the times the sweeper and the
    /// retry and wait bounds compare them with. Injected so that a simulation can step it.
    clock: Arc<dyn Clock>,
    /// A bug planted on purpose: row updates ignore the fencing token. Only a simulation
    /// build has it, to show that the simulation catches a stale executor's write.
    #[cfg(feature = "simulation")]
    planted_unfenced_writes: bool,
}

impl std::fmt::Debug for SagaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaStore").finish_non_exhaustive()
    }
}

impl SagaStore {
    pub fn new(db: DatabaseConnection) -> Self {
        Self::with_clock(db, Arc::new(SystemClock))
    }

    /// Saga tables whose times come from `clock`.
    pub fn with_clock(db: DatabaseConnection, clock: Arc<dyn Clock>) -> Self {
        SagaStore {
            db,
            clock,
            #[cfg(feature = "simulation")]
            planted_unfenced_writes: false,
        }
    }

    /// The same tables with the planted bug: updates of a saga's row skip the fence check.
    #[cfg(feature = "simulation")]
    #[must_use]
    pub fn with_planted_unfenced_writes(mut self) -> Self {
        self.planted_unfenced_writes = true;
        self
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Now, in epoch milliseconds, by the saga worker's clock.
    pub fn now_ms(&self) -> i64 {
        i64::try_from(self.clock.now_ms()).unwrap_or(i64::MAX)
    }

    /// The rows an update under `fence` may change: those no newer fence has claimed.
    fn fenced(&self, fence: i64) -> Condition {
        #[cfg(feature = "simulation")]
        if self.planted_unfenced_writes {
            return Condition::all();
        }
        Condition::all().add(saga::Column::Fence.lte(fence))
    }

    /// Takes the saga over with `fence`, creating it on first sight. Returns the row, or
    /// `None` when a holder with a newer fence has written it (this executor is stale).
    pub async fn claim(
        &self,
        id: &str,
        kind: &str,
        payload: &str,
        request_id: Option<&str>,
        fence: i64,
    ) -> Result<Option<saga::Model>, DbErr> {
        let new = NewSaga {
            id,
            kind,
            payload: payload.to_owned(),
            request_id,
        };
        Ok(self.claim_many(&[new], fence).await?.remove(id))
    }

    /// Takes many sagas over with one `fence`, creating them on first sight, as
    /// [`SagaStore::claim`] does for one: the rows this fence now owns, by id (a saga missing
    /// from the answer is owned by a newer executor).
    pub async fn claim_many(
        &self,
        sagas: &[NewSaga<'_>],
        fence: i64,
    ) -> Result<HashMap<String, saga::Model>, DbErr> {
        let now = self.now_ms();
        let mut owned = HashMap::with_capacity(sagas.len());
        for chunk in sagas.chunks(BATCH_ROWS) {
            let txn = self.db.begin().await?;
            plan_as_lookups(&txn).await?;
            saga::Entity::insert_many(chunk.iter().map(|new| saga::ActiveModel {
                id: Set(new.id.to_owned()),
                kind: Set(new.kind.to_owned()),
                state: Set(state::RUNNING.to_owned()),
                step: Set("start".to_owned()),
                attempts: Set(0),
                last_error: Set(None),
                reason: Set(None),
                payload: Set(new.payload.clone()),
                request_id: Set(new.request_id.map(str::to_owned)),
                fence: Set(0),
                created_at_ms: Set(now),
                updated_at_ms: Set(now),
            }))
            .on_conflict(
                OnConflict::column(saga::Column::Id)
                    .do_nothing_on([saga::Column::Id])
                    .to_owned(),
            )
            .exec_without_returning(&txn)
            .await?;
            let ids = chunk.iter().map(|new| new.id);
            saga::Entity::update_many()
                .col_expr(saga::Column::Fence, Expr::value(fence))
                .col_expr(
                    saga::Column::Attempts,
                    Expr::col(saga::Column::Attempts).add(1),
                )
                .col_expr(saga::Column::UpdatedAtMs, Expr::value(now))
                .filter(saga::Column::Id.is_in(ids.clone()))
                .filter(saga::Column::Fence.lte(fence))
                .exec(&txn)
                .await?;
            for row in saga::Entity::find()
                .filter(saga::Column::Id.is_in(ids))
                .filter(saga::Column::Fence.eq(fence))
                .all(&txn)
                .await?
            {
                owned.insert(row.id.clone(), row);
            }
            txn.commit().await?;
        }
        Ok(owned)
    }

    /// Ends many sagas in `state` under `fence`; the ones a newer fence owns are left alone.
    pub async fn finish_many(&self, ids: &[&str], fence: i64, state: &str) -> Result<(), DbErr> {
        for chunk in ids.chunks(BATCH_ROWS) {
            let txn = self.db.begin().await?;
            plan_as_lookups(&txn).await?;
            saga::Entity::update_many()
                .col_expr(saga::Column::Step, Expr::value("done"))
                .col_expr(saga::Column::State, Expr::value(state))
                .col_expr(saga::Column::UpdatedAtMs, Expr::value(self.now_ms()))
                .filter(saga::Column::Id.is_in(chunk.iter().copied()))
                .filter(self.fenced(fence))
                .exec(&txn)
                .await?;
            txn.commit().await?;
        }
        Ok(())
    }

    /// Records progress; false when a newer fence owns the saga (the write is refused).
    pub async fn advance(
        &self,
        id: &str,
        fence: i64,
        step: &str,
        state: &str,
        error: Option<&str>,
    ) -> Result<bool, DbErr> {
        let mut update = saga::Entity::update_many()
            .col_expr(saga::Column::Step, Expr::value(step))
            .col_expr(saga::Column::State, Expr::value(state))
            .col_expr(saga::Column::UpdatedAtMs, Expr::value(self.now_ms()));
        if let Some(reason) = error {
            update = update
                .col_expr(saga::Column::LastError, Expr::value(bounded(reason)))
                .col_expr(saga::Column::Reason, Expr::value(bounded(reason)));
        }
        let result = update
            .filter(saga::Column::Id.eq(id))
            .filter(self.fenced(fence))
            .exec(&self.db)
            .await?;
        Ok(result.rows_affected == 1)
    }

    /// Notes a failed attempt without moving the saga.
    pub async fn note_error(&self, id: &str, error: &str) -> Result<(), DbErr> {
        saga::Entity::update_many()
            .col_expr(saga::Column::LastError, Expr::value(bounded(error)))
            .col_expr(saga::Column::UpdatedAtMs, Expr::value(self.now_ms()))
            .filter(saga::Column::Id.eq(id))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// The highest fencing token any saga row carries (0 with none): every later grant must be
    /// above it, or the rows would refuse their sagas' executors.
    pub async fn highest_fence(&self) -> Result<i64, DbErr> {
        let highest: Option<Option<i64>> = saga::Entity::find()
            .select_only()
            .column_as(saga::Column::Fence.max(), "highest")
            .into_tuple()
            .one(&self.db)
            .await?;
        Ok(highest.flatten().unwrap_or(0))
    }

    pub async fn get(&self, id: &str) -> Result<Option<saga::Model>, DbErr> {
        saga::Entity::find_by_id(id).one(&self.db).await
    }

    /// Sagas in a state, most recently updated first.
    pub async fn by_state(&self, state: &str, limit: u64) -> Result<Vec<saga::Model>, DbErr> {
        saga::Entity::find()
            .filter(saga::Column::State.eq(state))
            .order_by_desc(saga::Column::UpdatedAtMs)
            .limit(limit)
            .all(&self.db)
            .await
    }

    /// Running sagas that made no progress since `before_ms`.
    pub async fn stalled(&self, before_ms: i64, limit: u64) -> Result<Vec<saga::Model>, DbErr> {
        saga::Entity::find()
            .filter(saga::Column::State.eq(state::RUNNING))
            .filter(saga::Column::UpdatedAtMs.lt(before_ms))
            .order_by_asc(saga::Column::UpdatedAtMs)
            .limit(limit)
            .all(&self.db)
            .await
    }

    /// Marks a saga stuck and keeps its message as a dead letter.
    pub async fn bury(
        &self,
        letter_id: i64,
        saga_id: &str,
        message: &str,
        reason: &str,
    ) -> Result<(), DbErr> {
        let now = self.now_ms();
        dead_letter::Entity::insert(dead_letter::ActiveModel {
            id: Set(letter_id),
            saga_id: Set(saga_id.to_owned()),
            message: Set(message.to_owned()),
            reason: Set(bounded(reason)),
            created_at_ms: Set(now),
            replayed_at_ms: Set(None),
        })
        .exec_without_returning(&self.db)
        .await?;
        saga::Entity::update_many()
            .col_expr(saga::Column::State, Expr::value(state::STUCK))
            .col_expr(saga::Column::LastError, Expr::value(bounded(reason)))
            .col_expr(saga::Column::UpdatedAtMs, Expr::value(now))
            .filter(saga::Column::Id.eq(saga_id))
            .filter(saga::Column::State.is_not_in([state::COMPLETED, state::COMPENSATED]))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// The dead letters waiting for an operator (not replayed), newest first.
    pub async fn dead_letters(&self, limit: u64) -> Result<Vec<dead_letter::Model>, DbErr> {
        dead_letter::Entity::find()
            .filter(dead_letter::Column::ReplayedAtMs.is_null())
            .order_by_desc(dead_letter::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await
    }

    /// Dead letters waiting for an operator with an id above `after`, oldest first: the pages
    /// a bulk replay walks.
    pub async fn waiting_letters(
        &self,
        after: i64,
        limit: u64,
    ) -> Result<Vec<dead_letter::Model>, DbErr> {
        dead_letter::Entity::find()
            .filter(dead_letter::Column::ReplayedAtMs.is_null())
            .filter(dead_letter::Column::Id.gt(after))
            .order_by_asc(dead_letter::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await
    }

    /// The oldest dead letter of a saga still waiting for an operator.
    pub async fn waiting_letter_of(
        &self,
        saga_id: &str,
    ) -> Result<Option<dead_letter::Model>, DbErr> {
        dead_letter::Entity::find()
            .filter(dead_letter::Column::SagaId.eq(saga_id))
            .filter(dead_letter::Column::ReplayedAtMs.is_null())
            .order_by_asc(dead_letter::Column::Id)
            .one(&self.db)
            .await
    }

    pub async fn dead_letter(&self, id: i64) -> Result<Option<dead_letter::Model>, DbErr> {
        dead_letter::Entity::find_by_id(id).one(&self.db).await
    }

    /// Marks a dead letter replayed (kept, so that a repeated replay answers the same) and sets
    /// its saga running again. False when it was already replayed.
    pub async fn unbury(&self, letter: &dead_letter::Model) -> Result<bool, DbErr> {
        let now = self.now_ms();
        let marked = dead_letter::Entity::update_many()
            .col_expr(dead_letter::Column::ReplayedAtMs, Expr::value(now))
            .filter(dead_letter::Column::Id.eq(letter.id))
            .filter(dead_letter::Column::ReplayedAtMs.is_null())
            .exec(&self.db)
            .await?;
        saga::Entity::update_many()
            .col_expr(saga::Column::State, Expr::value(state::RUNNING))
            .col_expr(saga::Column::UpdatedAtMs, Expr::value(now))
            .filter(saga::Column::Id.eq(&letter.saga_id))
            .filter(saga::Column::State.eq(state::STUCK))
            .exec(&self.db)
            .await?;
        Ok(marked.rows_affected == 1)
    }

    /// Deletes finished sagas older than `before_ms`, so saga state stays bounded, but never
    /// what a live saga still needs: a campaign's funding saga is read by its refund saga, so
    /// the two go together once the refund completed (or the funding, rejected, has no refund
    /// to wait for). Grab sagas are needed by nothing once finished. At most
    /// `PURGE_CAMPAIGNS` campaigns per call.
    pub async fn purge_finished(&self, before_ms: i64) -> Result<u64, DbErr> {
        let terminal = [state::COMPLETED, state::COMPENSATED];
        let mut purged = saga::Entity::delete_many()
            .filter(saga::Column::Kind.eq("grab"))
            .filter(saga::Column::State.is_in(terminal))
            .filter(saga::Column::UpdatedAtMs.lt(before_ms))
            .exec(&self.db)
            .await?
            .rows_affected;
        let refunded: Vec<String> = saga::Entity::find()
            .select_only()
            .column(saga::Column::Id)
            .filter(saga::Column::Kind.eq("refund"))
            .filter(saga::Column::State.eq(state::COMPLETED))
            .filter(saga::Column::UpdatedAtMs.lt(before_ms))
            .limit(PURGE_CAMPAIGNS)
            .into_tuple()
            .all(&self.db)
            .await?;
        let mut ids: Vec<String> = Vec::with_capacity(refunded.len() * 2);
        for refund in refunded {
            if let Some(campaign) = refund.strip_prefix("refund:") {
                ids.push(format!("fund:{campaign}"));
            }
            ids.push(refund);
        }
        // A rejected funding with no refund saga: nothing will ever read it.
        let rejected: Vec<String> = saga::Entity::find()
            .select_only()
            .column(saga::Column::Id)
            .filter(saga::Column::Kind.eq("funding"))
            .filter(saga::Column::State.eq(state::COMPENSATED))
            .filter(saga::Column::UpdatedAtMs.lt(before_ms))
            .limit(PURGE_CAMPAIGNS)
            .into_tuple()
            .all(&self.db)
            .await?;
        let refunds: Vec<String> = rejected
            .iter()
            .filter_map(|id| id.strip_prefix("fund:"))
            .map(|campaign| format!("refund:{campaign}"))
            .collect();
        let with_refund: std::collections::HashSet<String> = saga::Entity::find()
            .select_only()
            .column(saga::Column::Id)
            .filter(saga::Column::Id.is_in(refunds))
            .into_tuple::<String>()
            .all(&self.db)
            .await?
            .into_iter()
            .collect();
        ids.extend(rejected.into_iter().filter(|id| {
            id.strip_prefix("fund:")
                .is_some_and(|campaign| !with_refund.contains(&format!("refund:{campaign}")))
        }));
        // Replayed dead letters are kept as long as finished sagas, then go too.
        purged += dead_letter::Entity::delete_many()
            .filter(dead_letter::Column::ReplayedAtMs.lt(before_ms))
            .exec(&self.db)
            .await?
            .rows_affected;
        if !ids.is_empty() {
            purged += saga::Entity::delete_many()
                .filter(saga::Column::Id.is_in(ids))
                .filter(saga::Column::State.is_in(terminal))
                .exec(&self.db)
                .await?
                .rows_affected;
        }
        Ok(purged)
    }
}

/// Campaigns whose funding and refund sagas one purge removes at most.
const PURGE_CAMPAIGNS: u64 = 500;
