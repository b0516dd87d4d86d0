//! The double-entry ledger: idempotent transfers applied in batches.
//!
//! Every transfer posts two entries, `-amount` on the debited account and `+amount` on the
//! credited one, so the sum of all balances stays zero. A batch is one database transaction:
//! it locks every account it touches in name order (one `SELECT … FOR UPDATE … ORDER BY name`,
//! so concurrent batches cannot deadlock on each other), applies the transfers in memory one
//! by one (a transfer that breaks a rule is left out with its error; the others go on), and
//! writes the outcome with a handful of multi-row statements. Each transfer is therefore atomic
//! on its own, and one hot account (a campaign's escrow) is locked once per batch instead of
//! once per transfer.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use redpacket_common::{AccountName, Amount, TransferId};
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveValue::{NotSet, Set},
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, DbErr, EntityTrait,
    IsolationLevel, QueryFilter, QueryOrder, QuerySelect, Statement, TransactionTrait,
};

use crate::entity::{account, entry, transfer};

/// The most transfers one batch may carry.
pub const MAX_BATCH_TRANSFERS: usize = 1000;
/// The largest metadata object, serialized.
pub const MAX_METADATA_BYTES: usize = 4096;
/// How often a batch is retried after a lock conflict, deadlock or a concurrent creation of
/// the same account or transfer.
const MAX_ATTEMPTS: u32 = 5;
/// Rows per multi-row statement. Small enough that a statement fits in a few kilobytes:
/// larger messages stall on the database connection (TCP delayed acknowledgements cost up to
/// 40 ms a statement), and far under every backend's bound on bind parameters.
const STATEMENT_CHUNK_ROWS: usize = 100;

/// A transfer to apply, already parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferRequest {
    pub id: TransferId,
    pub debit: AccountName,
    pub credit: AccountName,
    pub amount: Amount,
    /// Canonical JSON of the metadata object (sorted keys). It describes the transfer and is
    /// kept as the first attempt wrote it; it takes no part in the replay comparison, since
    /// callers put per-attempt details there (request ids, times).
    pub metadata: Option<String>,
}

/// Why a transfer request is invalid on its own, before touching the ledger.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("debit and credit are the same account `{0}`")]
    SameAccount(String),
    #[error("metadata must be a JSON object")]
    MetadataNotObject,
    #[error("metadata is {0} bytes, more than the {MAX_METADATA_BYTES} allowed")]
    MetadataTooLarge(usize),
}

impl TransferRequest {
    pub fn new(
        id: TransferId,
        debit: AccountName,
        credit: AccountName,
        amount: Amount,
        metadata: Option<serde_json::Value>,
    ) -> Result<Self, RequestError> {
        if debit == credit {
            return Err(RequestError::SameAccount(debit.to_string()));
        }
        let metadata = match metadata {
            None | Some(serde_json::Value::Null) => None,
            Some(value @ serde_json::Value::Object(_)) => {
                // serde_json's map is ordered by key, so this text is canonical.
                let text = value.to_string();
                if text.len() > MAX_METADATA_BYTES {
                    return Err(RequestError::MetadataTooLarge(text.len()));
                }
                Some(text)
            }
            Some(_) => return Err(RequestError::MetadataNotObject),
        };
        Ok(TransferRequest {
            id,
            debit,
            credit,
            amount,
            metadata,
        })
    }

    /// A replay is the same transfer when it moves the same money between the same accounts:
    /// what the caller asked for. The metadata is left out on purpose (see the field).
    fn same_body_as(&self, original: &transfer::Model) -> bool {
        original.debit == self.debit.as_str()
            && original.credit == self.credit.as_str()
            && original.amount == self.amount.minor()
            && original.currency == self.amount.currency().code()
    }
}

/// A transfer as applied (or as first applied, for a replay).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub id: String,
    pub debit: String,
    pub credit: String,
    pub amount: i64,
    pub currency: String,
    pub metadata: Option<String>,
    pub debit_balance_after: i64,
    pub credit_balance_after: i64,
    pub created_at_ms: i64,
    /// True when this id had already been applied: nothing moved this time.
    pub replayed: bool,
}

impl Transfer {
    fn from_model(model: &transfer::Model, replayed: bool) -> Self {
        Transfer {
            id: model.id.clone(),
            debit: model.debit.clone(),
            credit: model.credit.clone(),
            amount: model.amount,
            currency: model.currency.clone(),
            metadata: model.metadata.clone(),
            debit_balance_after: model.debit_balance_after,
            credit_balance_after: model.credit_balance_after,
            created_at_ms: model.created_at_ms,
            replayed,
        }
    }
}

/// Why the ledger refused one transfer; nothing of it was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    #[error("transfer `{0}` was already applied with a different body")]
    Conflict(String),
    #[error("account `{account}` holds {balance}, less than the {amount} to debit")]
    InsufficientFunds {
        account: String,
        balance: i64,
        amount: i64,
    },
    #[error("account `{account}` is in {account_currency}, the transfer in {currency}")]
    CurrencyMismatch {
        account: String,
        account_currency: String,
        currency: String,
    },
    #[error("the balance of `{0}` would overflow")]
    BalanceOverflow(String),
}

/// A failure of the ledger itself (not of one transfer).
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("database error: {0}")]
    Db(#[from] DbErr),
    #[error("a batch holds {0} transfers, more than {MAX_BATCH_TRANSFERS}")]
    BatchTooLarge(usize),
    #[error("ledger invariant broken: {0}")]
    Invariant(String),
}

/// An account as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub currency: String,
    pub balance: i64,
    pub version: i64,
}

/// A ledger entry as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: i64,
    pub transfer_id: String,
    pub amount: i64,
    pub balance_after: i64,
    pub created_at_ms: i64,
}

/// A page of entries, newest first.
#[derive(Debug, Clone)]
pub struct EntryPage {
    pub entries: Vec<Entry>,
    /// Pass as `before` to get the next page; `None` on the last page.
    pub next_before: Option<i64>,
}

/// The outcome of a ledger-wide check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvariantCheck {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug)]
struct AccountState {
    currency: String,
    balance: i64,
    version: i64,
    created_at_ms: i64,
    exists: bool,
    dirty: bool,
}

/// The ledger over one database.
#[derive(Debug, Clone)]
pub struct Ledger {
    db: DatabaseConnection,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Lock conflicts and concurrent creation of the same row resolve by running the whole batch
/// again: the retry sees the winner's rows.
fn is_retryable(err: &DbErr) -> bool {
    let text = err.to_string().to_ascii_lowercase();
    [
        "deadlock",
        "could not serialize",
        "lock wait timeout",
        "database is locked",
        "duplicate",
        "unique",
    ]
    .iter()
    .any(|needle| text.contains(needle))
}

impl Ledger {
    pub fn new(db: DatabaseConnection) -> Self {
        Ledger { db }
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Applies transfers in order, each atomically on its own; returns one result per request.
    pub async fn apply(
        &self,
        requests: &[TransferRequest],
    ) -> Result<Vec<Result<Transfer, TransferError>>, LedgerError> {
        if requests.len() > MAX_BATCH_TRANSFERS {
            return Err(LedgerError::BatchTooLarge(requests.len()));
        }
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let mut attempt = 1;
        loop {
            match self.try_apply(requests).await {
                Err(LedgerError::Db(err)) if attempt < MAX_ATTEMPTS && is_retryable(&err) => {
                    tracing::debug!(attempt, error = %err, "retrying a transfer batch");
                    tokio::time::sleep(Duration::from_millis(u64::from(attempt) * 3)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn try_apply(
        &self,
        requests: &[TransferRequest],
    ) -> Result<Vec<Result<Transfer, TransferError>>, LedgerError> {
        let backend = self.db.get_database_backend();
        // MySQL defaults to REPEATABLE READ, whose reads after the locks would see a snapshot
        // older than the rows just locked; READ COMMITTED reads what the lock holder committed.
        let isolation = (backend == DbBackend::MySql).then_some(IsolationLevel::ReadCommitted);
        let txn = self.db.begin_with_config(isolation, None).await?;
        // A single transfer's few keys are planned as probes anyway: its round trip is spared.
        if requests.len() > 1 {
            redpacket_common::db::plan_as_lookups(&txn).await?;
        }

        let mut names: Vec<&str> = requests
            .iter()
            .flat_map(|r| [r.debit.as_str(), r.credit.as_str()])
            .collect();
        names.sort_unstable();
        names.dedup();
        // Chunks of sorted names keep the global lock order while keeping every statement
        // small (large messages stall on TCP's delayed acknowledgements).
        let mut locked = Vec::with_capacity(names.len());
        for chunk in names.chunks(STATEMENT_CHUNK_ROWS) {
            locked.extend(
                account::Entity::find()
                    .filter(account::Column::Name.is_in(chunk.iter().copied()))
                    .order_by_asc(account::Column::Name)
                    .lock_exclusive()
                    .all(&txn)
                    .await?,
            );
        }
        let mut ids: Vec<&str> = requests.iter().map(|r| r.id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut applied: HashMap<String, transfer::Model> = HashMap::new();
        for chunk in ids.chunks(STATEMENT_CHUNK_ROWS) {
            applied.extend(
                transfer::Entity::find()
                    .filter(transfer::Column::Id.is_in(chunk.iter().copied()))
                    .all(&txn)
                    .await?
                    .into_iter()
                    .map(|model| (model.id.clone(), model)),
            );
        }

        let mut accounts: BTreeMap<String, AccountState> = locked
            .into_iter()
            .map(|model| {
                (
                    model.name,
                    AccountState {
                        currency: model.currency,
                        balance: model.balance,
                        version: model.version,
                        created_at_ms: model.created_at_ms,
                        exists: true,
                        dirty: false,
                    },
                )
            })
            .collect();
        let opening_total: i128 = accounts.values().map(|a| i128::from(a.balance)).sum();

        let now = now_ms();
        let mut new_transfers = Vec::new();
        let mut new_entries = Vec::new();
        let mut results = Vec::with_capacity(requests.len());
        for request in requests {
            if let Some(original) = applied.get(request.id.as_str()) {
                results.push(if request.same_body_as(original) {
                    Ok(Transfer::from_model(original, true))
                } else {
                    Err(TransferError::Conflict(request.id.to_string()))
                });
                continue;
            }
            match post(&mut accounts, request, now) {
                Ok((debit_after, credit_after)) => {
                    let model = transfer::Model {
                        id: request.id.to_string(),
                        debit: request.debit.to_string(),
                        credit: request.credit.to_string(),
                        amount: request.amount.minor(),
                        currency: request.amount.currency().code().to_owned(),
                        metadata: request.metadata.clone(),
                        debit_balance_after: debit_after,
                        credit_balance_after: credit_after,
                        created_at_ms: now,
                    };
                    for (account, amount, balance_after) in [
                        (&model.debit, -model.amount, debit_after),
                        (&model.credit, model.amount, credit_after),
                    ] {
                        new_entries.push(entry::ActiveModel {
                            id: NotSet,
                            account: Set(account.clone()),
                            transfer_id: Set(model.id.clone()),
                            amount: Set(amount),
                            balance_after: Set(balance_after),
                            created_at_ms: Set(now),
                        });
                    }
                    results.push(Ok(Transfer::from_model(&model, false)));
                    applied.insert(model.id.clone(), model.clone());
                    new_transfers.push(model);
                }
                Err(err) => results.push(Err(err)),
            }
        }
        if new_transfers.is_empty() {
            txn.commit().await?;
            return Ok(results);
        }

        // Money is conserved and only `external` goes negative: checked on what is about to be
        // written, so a bug here can never reach the database.
        let closing_total: i128 = accounts.values().map(|a| i128::from(a.balance)).sum();
        if opening_total != closing_total {
            return Err(LedgerError::Invariant(format!(
                "a batch changed the total of its accounts from {opening_total} to {closing_total}"
            )));
        }
        if let Some((name, state)) = accounts.iter().find(|(name, state)| {
            state.balance < 0 && name.as_str() != AccountName::external().as_str()
        }) {
            return Err(LedgerError::Invariant(format!(
                "account {name} would end at {}",
                state.balance
            )));
        }

        let (created, changed): (Vec<_>, Vec<_>) = accounts
            .into_iter()
            .filter(|(_, state)| state.dirty)
            .map(|(name, state)| {
                let exists = state.exists;
                let model = account::ActiveModel {
                    name: Set(name),
                    currency: Set(state.currency),
                    balance: Set(state.balance),
                    version: Set(state.version),
                    created_at_ms: Set(state.created_at_ms),
                    updated_at_ms: Set(now),
                };
                (exists, model)
            })
            .partition(|(exists, _)| !exists);
        if !created.is_empty() {
            // A plain insert: if another batch created one of these accounts meanwhile, the
            // unique violation sends this batch round again, now locking the account.
            let mut created = created.into_iter().map(|(_, model)| model).peekable();
            while created.peek().is_some() {
                let chunk: Vec<_> = created.by_ref().take(STATEMENT_CHUNK_ROWS).collect();
                account::Entity::insert_many(chunk)
                    .exec_without_returning(&txn)
                    .await?;
            }
        }
        if !changed.is_empty() {
            // Every row here is locked by this transaction; the upsert is a multi-row update.
            let mut changed = changed.into_iter().map(|(_, model)| model).peekable();
            while changed.peek().is_some() {
                let chunk: Vec<_> = changed.by_ref().take(STATEMENT_CHUNK_ROWS).collect();
                account::Entity::insert_many(chunk)
                    .on_conflict(
                        OnConflict::column(account::Column::Name)
                            .update_columns([
                                account::Column::Balance,
                                account::Column::Version,
                                account::Column::UpdatedAtMs,
                            ])
                            .to_owned(),
                    )
                    .exec_without_returning(&txn)
                    .await?;
            }
        }
        for chunk in new_transfers.chunks(STATEMENT_CHUNK_ROWS) {
            transfer::Entity::insert_many(chunk.iter().map(|model| transfer::ActiveModel {
                id: Set(model.id.clone()),
                debit: Set(model.debit.clone()),
                credit: Set(model.credit.clone()),
                amount: Set(model.amount),
                currency: Set(model.currency.clone()),
                metadata: Set(model.metadata.clone()),
                debit_balance_after: Set(model.debit_balance_after),
                credit_balance_after: Set(model.credit_balance_after),
                created_at_ms: Set(model.created_at_ms),
            }))
            .exec_without_returning(&txn)
            .await?;
        }
        let mut entries = new_entries.into_iter().peekable();
        while entries.peek().is_some() {
            let chunk: Vec<_> = entries.by_ref().take(STATEMENT_CHUNK_ROWS).collect();
            entry::Entity::insert_many(chunk)
                .exec_without_returning(&txn)
                .await?;
        }
        txn.commit().await?;
        Ok(results)
    }

    /// One account, or `None` when it was never used.
    pub async fn account(&self, name: &AccountName) -> Result<Option<Account>, LedgerError> {
        Ok(account::Entity::find_by_id(name.as_str())
            .one(&self.db)
            .await?
            .map(|model| Account {
                name: model.name,
                currency: model.currency,
                balance: model.balance,
                version: model.version,
            }))
    }

    /// An account's entries, newest first, strictly older than `before` when given.
    pub async fn entries(
        &self,
        name: &AccountName,
        before: Option<i64>,
        limit: u64,
    ) -> Result<EntryPage, LedgerError> {
        let mut query = entry::Entity::find().filter(entry::Column::Account.eq(name.as_str()));
        if let Some(before) = before {
            query = query.filter(entry::Column::Id.lt(before));
        }
        let mut rows = query
            .order_by_desc(entry::Column::Id)
            .limit(limit + 1)
            .all(&self.db)
            .await?;
        let has_more = rows.len() as u64 > limit;
        rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        let next_before = if has_more {
            rows.last().map(|row| row.id)
        } else {
            None
        };
        Ok(EntryPage {
            entries: rows
                .into_iter()
                .map(|row| Entry {
                    id: row.id,
                    transfer_id: row.transfer_id,
                    amount: row.amount,
                    balance_after: row.balance_after,
                    created_at_ms: row.created_at_ms,
                })
                .collect(),
            next_before,
        })
    }

    /// The ledger's invariants, checked now over the whole database: balances sum to zero, no
    /// account but `external` is negative, every balance equals the sum of its entries and
    /// every version the count of its entries, and every transfer posted exactly two entries.
    pub async fn check_invariants(&self) -> Result<Vec<InvariantCheck>, LedgerError> {
        let backend = self.db.get_database_backend();
        let sum = |expr: &str| match backend {
            DbBackend::Postgres => format!("CAST(COALESCE(SUM({expr}), 0) AS BIGINT)"),
            DbBackend::MySql => format!("CAST(COALESCE(SUM({expr}), 0) AS SIGNED)"),
            _ => format!("COALESCE(SUM({expr}), 0)"),
        };
        let total: i64 = self
            .scalar(&format!("SELECT {} FROM wallet_accounts", sum("balance")))
            .await?;
        let negative = self
            .names(
                "SELECT name FROM wallet_accounts WHERE balance < 0 AND name <> 'external' \
                 ORDER BY name LIMIT 20",
            )
            .await?;
        let drifted = self
            .names(
                "SELECT a.name FROM wallet_accounts a LEFT JOIN (SELECT account, SUM(amount) AS \
                 total, COUNT(*) AS n FROM wallet_entries GROUP BY account) e ON e.account = \
                 a.name WHERE a.balance <> COALESCE(e.total, 0) OR a.version <> COALESCE(e.n, 0) \
                 ORDER BY a.name LIMIT 20",
            )
            .await?;
        let unbalanced = self
            .names(
                "SELECT t.id FROM wallet_transfers t LEFT JOIN (SELECT transfer_id, COUNT(*) AS \
                 n, SUM(amount) AS total FROM wallet_entries GROUP BY transfer_id) e ON \
                 e.transfer_id = t.id WHERE COALESCE(e.n, 0) <> 2 OR COALESCE(e.total, 1) <> 0 \
                 ORDER BY t.id LIMIT 20",
            )
            .await?;
        let listed = |names: &[String]| {
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        };
        Ok(vec![
            InvariantCheck {
                name: "ledger_sums_to_zero",
                ok: total == 0,
                detail: format!("sum of all balances = {total}"),
            },
            InvariantCheck {
                name: "no_negative_balance",
                ok: negative.is_empty(),
                detail: format!("negative accounts: {}", listed(&negative)),
            },
            InvariantCheck {
                name: "balances_match_entries",
                ok: drifted.is_empty(),
                detail: format!(
                    "accounts whose balance or version drifted: {}",
                    listed(&drifted)
                ),
            },
            InvariantCheck {
                name: "transfers_post_two_entries",
                ok: unbalanced.is_empty(),
                detail: format!(
                    "transfers without two balancing entries: {}",
                    listed(&unbalanced)
                ),
            },
        ])
    }

    async fn scalar(&self, sql: &str) -> Result<i64, LedgerError> {
        let backend = self.db.get_database_backend();
        let row = self
            .db
            .query_one_raw(Statement::from_string(backend, sql.to_owned()))
            .await?
            .ok_or_else(|| LedgerError::Invariant(format!("no row from {sql}")))?;
        Ok(row.try_get_by_index::<i64>(0)?)
    }

    async fn names(&self, sql: &str) -> Result<Vec<String>, LedgerError> {
        let backend = self.db.get_database_backend();
        let rows = self
            .db
            .query_all_raw(Statement::from_string(backend, sql.to_owned()))
            .await?;
        rows.iter()
            .map(|row| row.try_get_by_index::<String>(0).map_err(LedgerError::from))
            .collect()
    }
}

/// Applies one transfer to the in-memory account states, or leaves them untouched.
fn post(
    accounts: &mut BTreeMap<String, AccountState>,
    request: &TransferRequest,
    now: i64,
) -> Result<(i64, i64), TransferError> {
    let currency = request.amount.currency().code();
    let amount = request.amount.minor();
    for name in [&request.debit, &request.credit] {
        if let Some(state) = accounts.get(name.as_str())
            && state.currency != currency
        {
            return Err(TransferError::CurrencyMismatch {
                account: name.to_string(),
                account_currency: state.currency.clone(),
                currency: currency.to_owned(),
            });
        }
    }
    let balance_of = |name: &AccountName| accounts.get(name.as_str()).map_or(0, |s| s.balance);
    let debit_balance = balance_of(&request.debit);
    let debit_after = debit_balance
        .checked_sub(amount)
        .ok_or_else(|| TransferError::BalanceOverflow(request.debit.to_string()))?;
    if debit_after < 0 && !request.debit.may_go_negative() {
        return Err(TransferError::InsufficientFunds {
            account: request.debit.to_string(),
            balance: debit_balance,
            amount,
        });
    }
    let credit_after = balance_of(&request.credit)
        .checked_add(amount)
        .ok_or_else(|| TransferError::BalanceOverflow(request.credit.to_string()))?;
    for (name, balance) in [
        (&request.debit, debit_after),
        (&request.credit, credit_after),
    ] {
        let state = accounts
            .entry(name.to_string())
            .or_insert_with(|| AccountState {
                currency: currency.to_owned(),
                balance: 0,
                version: 0,
                created_at_ms: now,
                exists: false,
                dirty: false,
            });
        state.balance = balance;
        state.version += 1;
        state.dirty = true;
    }
    Ok((debit_after, credit_after))
}
