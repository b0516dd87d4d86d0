//! The wallet's internal HTTP API, called by the gateway and the saga worker.
//!
//! DTOs live here and only here; the ledger never sees JSON.

use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};
use redpacket_common::http::StrictJson;
use redpacket_common::problem::ProblemBody;
use redpacket_common::time::rfc3339;
use redpacket_common::{AccountName, Amount, Currency, MoneyError, NameError, Problem, TransferId};
use serde::Deserialize;

use crate::ledger::{
    Account, Entry, Ledger, LedgerError, MAX_BATCH_TRANSFERS, RequestError, Transfer,
    TransferError, TransferRequest,
};

/// Entries per page unless `limit` says otherwise.
const DEFAULT_PAGE_LIMIT: u64 = 50;
/// The largest page of entries.
const MAX_PAGE_LIMIT: u64 = 500;

#[derive(Tags)]
enum ApiTags {
    /// Accounts and their history.
    Accounts,
    /// Moving money between accounts.
    Transfers,
}

/// Everything the wallet can refuse, mapped once to problem+json.
#[derive(Debug, thiserror::Error)]
pub enum WalletError {
    #[error("{source}")]
    InvalidAccount {
        field: &'static str,
        source: NameError,
    },
    #[error("{0}")]
    InvalidTransferId(NameError),
    #[error("{0}")]
    InvalidAmount(MoneyError),
    #[error("{0}")]
    UnknownCurrency(MoneyError),
    #[error("{0}")]
    Request(#[from] RequestError),
    #[error("{0}")]
    Transfer(#[from] TransferError),
    #[error("account `{0}` has never been used")]
    AccountNotFound(String),
    #[error("`cursor` is not a cursor this API returned")]
    InvalidCursor,
    #[error("`limit` must be between 1 and {MAX_PAGE_LIMIT}, not {0}")]
    InvalidLimit(u64),
    #[error("a batch holds 1 to {MAX_BATCH_TRANSFERS} transfers, not {0}")]
    BatchSize(usize),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

impl From<WalletError> for Problem {
    fn from(err: WalletError) -> Problem {
        let detail = err.to_string();
        match err {
            WalletError::InvalidAccount { field, .. } => {
                Problem::unprocessable("invalid_account", detail).with_field(field)
            }
            WalletError::InvalidTransferId(_) => {
                Problem::unprocessable("invalid_transfer_id", detail).with_field("id")
            }
            WalletError::InvalidAmount(_) => {
                Problem::unprocessable("invalid_amount", detail).with_field("amount")
            }
            WalletError::UnknownCurrency(_) => {
                Problem::unprocessable("unknown_currency", detail).with_field("currency")
            }
            WalletError::Request(RequestError::SameAccount(_)) => {
                Problem::unprocessable("same_account", detail).with_field("credit")
            }
            WalletError::Request(RequestError::MetadataNotObject) => {
                Problem::unprocessable("invalid_metadata", detail).with_field("metadata")
            }
            WalletError::Request(RequestError::MetadataTooLarge(_)) => {
                Problem::unprocessable("metadata_too_large", detail).with_field("metadata")
            }
            WalletError::Transfer(TransferError::Conflict(_)) => {
                Problem::conflict("transfer_conflict", detail).with_field("id")
            }
            WalletError::Transfer(TransferError::InsufficientFunds { .. }) => {
                Problem::unprocessable("insufficient_funds", detail).with_field("amount")
            }
            WalletError::Transfer(TransferError::CurrencyMismatch { .. }) => {
                Problem::unprocessable("currency_mismatch", detail).with_field("currency")
            }
            WalletError::Transfer(TransferError::BalanceOverflow(_)) => {
                Problem::unprocessable("balance_overflow", detail).with_field("amount")
            }
            WalletError::AccountNotFound(_) => Problem::not_found("account_not_found", detail),
            WalletError::InvalidCursor => {
                Problem::bad_request("invalid_cursor", detail).with_field("cursor")
            }
            WalletError::InvalidLimit(_) => {
                Problem::bad_request("invalid_limit", detail).with_field("limit")
            }
            WalletError::BatchSize(_) => {
                Problem::unprocessable("invalid_batch_size", detail).with_field("transfers")
            }
            WalletError::Ledger(LedgerError::BatchTooLarge(_)) => {
                Problem::unprocessable("invalid_batch_size", detail).with_field("transfers")
            }
            WalletError::Ledger(LedgerError::Db(err)) => {
                Problem::from_db(&err, "the ledger database")
            }
            WalletError::Ledger(err) => {
                tracing::error!(error = %err, "ledger failure");
                Problem::internal()
            }
        }
    }
}

/// A transfer to apply.
#[derive(Debug, Clone, Object, Deserialize)]
#[oai(deny_unknown_fields, example)]
#[serde(deny_unknown_fields)]
pub struct TransferBody {
    /// The client-chosen id of this transfer, its idempotency key: 1-128 letters, digits,
    /// `-`, `_`, `.` or `:`. A retry with the same id and body moves nothing again.
    pub id: String,
    /// The account money leaves: `external`, `merchant:{id}`, `escrow:{id}` or `user:{id}`.
    pub debit: String,
    /// The account money reaches; created on first use in the transfer's currency.
    pub credit: String,
    /// Minor units (cents), 1 to 10^15.
    pub amount: i64,
    /// ISO 4217 code, e.g. `CNY`.
    pub currency: String,
    /// Free-form JSON object kept with the transfer, at most 4096 bytes serialized.
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
}

impl poem_openapi::types::Example for TransferBody {
    fn example() -> Self {
        TransferBody {
            id: "topup-42".to_owned(),
            debit: "external".to_owned(),
            credit: "merchant:42".to_owned(),
            amount: 100_000,
            currency: "CNY".to_owned(),
            metadata: Some(serde_json::json!({"reason": "top-up"})),
        }
    }
}

impl TransferBody {
    /// Turns the DTO into a ledger request, naming the first field at fault.
    pub fn parse(self) -> Result<TransferRequest, WalletError> {
        let id = TransferId::parse(&self.id).map_err(WalletError::InvalidTransferId)?;
        let debit =
            AccountName::parse(&self.debit).map_err(|source| WalletError::InvalidAccount {
                field: "debit",
                source,
            })?;
        let credit =
            AccountName::parse(&self.credit).map_err(|source| WalletError::InvalidAccount {
                field: "credit",
                source,
            })?;
        let currency = Currency::parse(&self.currency).map_err(WalletError::UnknownCurrency)?;
        let amount = Amount::positive(self.amount, currency).map_err(WalletError::InvalidAmount)?;
        Ok(TransferRequest::new(
            id,
            debit,
            credit,
            amount,
            self.metadata,
        )?)
    }
}

/// A transfer as applied.
#[derive(Debug, Clone, Object)]
pub struct TransferView {
    /// The transfer's id.
    pub id: String,
    /// The debited account.
    pub debit: String,
    /// The credited account.
    pub credit: String,
    /// Minor units moved.
    pub amount: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// The metadata object given with the transfer.
    #[oai(skip_serializing_if_is_none)]
    pub metadata: Option<serde_json::Value>,
    /// The debited account's balance right after this transfer.
    pub debit_balance_after: i64,
    /// The credited account's balance right after this transfer.
    pub credit_balance_after: i64,
    /// When it was applied (RFC 3339).
    pub created_at: String,
}

impl From<Transfer> for TransferView {
    fn from(transfer: Transfer) -> Self {
        TransferView {
            id: transfer.id,
            debit: transfer.debit,
            credit: transfer.credit,
            amount: transfer.amount,
            currency: transfer.currency,
            metadata: transfer
                .metadata
                .and_then(|text| serde_json::from_str(&text).ok()),
            debit_balance_after: transfer.debit_balance_after,
            credit_balance_after: transfer.credit_balance_after,
            created_at: rfc3339(transfer.created_at_ms),
        }
    }
}

/// Up to 1,000 transfers applied in one go.
#[derive(Debug, Clone, Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct BatchBody {
    /// The transfers, applied in this order, each atomically on its own.
    pub transfers: Vec<TransferBody>,
}

/// The outcome of one transfer of a batch.
#[derive(Debug, Clone, Object)]
pub struct BatchItem {
    /// True when the transfer is applied (now or by an earlier request with the same id).
    pub ok: bool,
    /// HTTP status this transfer would have had alone (200, 409, 422).
    pub status: u16,
    /// The transfer, when `ok`.
    #[oai(skip_serializing_if_is_none)]
    pub transfer: Option<TransferView>,
    /// Why it was refused, when not `ok`.
    #[oai(skip_serializing_if_is_none)]
    pub error: Option<ProblemBody>,
}

/// The outcomes of a batch, in the order of the request.
#[derive(Debug, Clone, Object)]
pub struct BatchResults {
    /// One item per transfer of the request.
    pub results: Vec<BatchItem>,
}

/// An account.
#[derive(Debug, Clone, Object)]
pub struct AccountView {
    /// Its name.
    pub name: String,
    /// ISO 4217 code, fixed by its first transfer.
    pub currency: String,
    /// Balance in minor units; negative only for `external`.
    pub balance: i64,
    /// The number of entries posted to it.
    pub version: i64,
}

impl From<Account> for AccountView {
    fn from(account: Account) -> Self {
        AccountView {
            name: account.name,
            currency: account.currency,
            balance: account.balance,
            version: account.version,
        }
    }
}

/// One movement on an account.
#[derive(Debug, Clone, Object)]
pub struct EntryView {
    /// The entry's id.
    pub id: String,
    /// The transfer that posted it.
    pub transfer_id: String,
    /// Signed minor units: negative when money left the account.
    pub amount: i64,
    /// The account's balance right after it.
    pub balance_after: i64,
    /// When it was posted (RFC 3339).
    pub created_at: String,
}

impl From<Entry> for EntryView {
    fn from(entry: Entry) -> Self {
        EntryView {
            id: entry.id.to_string(),
            transfer_id: entry.transfer_id,
            amount: entry.amount,
            balance_after: entry.balance_after,
            created_at: rfc3339(entry.created_at_ms),
        }
    }
}

/// A page of entries, newest first.
#[derive(Debug, Clone, Object)]
pub struct EntryPageView {
    /// The entries.
    pub entries: Vec<EntryView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[oai(skip_serializing_if_is_none)]
    pub next_cursor: Option<String>,
}

#[derive(ApiResponse)]
enum TransferResponse {
    /// Applied now, or already applied earlier with the same id and body (then
    /// `Idempotent-Replayed: true` and nothing moved again).
    #[oai(status = 200)]
    Ok(
        Json<TransferView>,
        #[oai(header = "Idempotent-Replayed")] Option<String>,
    ),
}

/// The wallet API.
#[derive(Debug, Clone)]
pub struct WalletApi {
    ledger: Ledger,
}

impl WalletApi {
    pub fn new(ledger: Ledger) -> Self {
        WalletApi { ledger }
    }
}

fn parse_account(name: &str) -> Result<AccountName, WalletError> {
    AccountName::parse(name).map_err(|source| WalletError::InvalidAccount {
        field: "name",
        source,
    })
}

fn item(result: Result<Transfer, WalletError>) -> BatchItem {
    match result {
        Ok(transfer) => BatchItem {
            ok: true,
            status: 200,
            transfer: Some(transfer.into()),
            error: None,
        },
        Err(err) => {
            let problem = Problem::from(err);
            BatchItem {
                ok: false,
                status: problem.status.as_u16(),
                transfer: None,
                error: Some(problem.body()),
            }
        }
    }
}

#[OpenApi]
impl WalletApi {
    /// Apply one transfer.
    ///
    /// Moves `amount` from `debit` to `credit`. Idempotent by `id`: the same id with the same
    /// body answers the original result and moves nothing; with another body, 409
    /// `transfer_conflict`. Only `external` may go negative (else 422 `insufficient_funds`).
    #[oai(path = "/transfers", method = "post", tag = "ApiTags::Transfers")]
    async fn transfer(&self, body: StrictJson<TransferBody>) -> Result<TransferResponse, Problem> {
        let request = body.0.parse()?;
        let mut results = self
            .ledger
            .apply(std::slice::from_ref(&request))
            .await
            .map_err(WalletError::from)?;
        let transfer = results
            .pop()
            .ok_or_else(|| WalletError::Ledger(LedgerError::Invariant("no result".into())))?
            .map_err(WalletError::from)?;
        let replayed = transfer.replayed.then(|| "true".to_owned());
        Ok(TransferResponse::Ok(Json(transfer.into()), replayed))
    }

    /// Apply up to 1,000 transfers.
    ///
    /// Each transfer is applied atomically on its own, in order, with one result per item;
    /// a refused item leaves the others untouched. All the applied ones commit together, in
    /// one database transaction, which is what makes crediting a hot escrow account fast.
    #[oai(path = "/transfers/batch", method = "post", tag = "ApiTags::Transfers")]
    async fn transfer_batch(
        &self,
        body: StrictJson<BatchBody, { crate::BODY_LIMIT_BYTES }>,
    ) -> Result<Json<BatchResults>, Problem> {
        let bodies = body.0.transfers;
        if bodies.is_empty() || bodies.len() > MAX_BATCH_TRANSFERS {
            return Err(WalletError::BatchSize(bodies.len()).into());
        }
        let parsed: Vec<Result<TransferRequest, WalletError>> =
            bodies.into_iter().map(TransferBody::parse).collect();
        let valid: Vec<TransferRequest> = parsed
            .iter()
            .filter_map(|p| p.as_ref().ok().cloned())
            .collect();
        let applied = self.ledger.apply(&valid).await.map_err(WalletError::from)?;
        if applied.len() != valid.len() {
            return Err(WalletError::Ledger(LedgerError::Invariant(format!(
                "{} results for {} transfers",
                applied.len(),
                valid.len()
            )))
            .into());
        }
        let mut applied = applied.into_iter();
        let results = parsed
            .into_iter()
            .map(|parsed| match parsed {
                // One result per valid transfer, in order: the lengths were checked above.
                Ok(_) => item(applied.next().map_or_else(
                    || {
                        Err(WalletError::Ledger(LedgerError::Invariant(
                            "result missing".into(),
                        )))
                    },
                    |result| result.map_err(WalletError::from),
                )),
                Err(err) => item(Err(err)),
            })
            .collect();
        Ok(Json(BatchResults { results }))
    }

    /// Read an account.
    #[oai(path = "/accounts/:name", method = "get", tag = "ApiTags::Accounts")]
    async fn account(&self, name: Path<String>) -> Result<Json<AccountView>, Problem> {
        let name = parse_account(&name.0)?;
        let account = self
            .ledger
            .account(&name)
            .await
            .map_err(WalletError::from)?
            .ok_or_else(|| WalletError::AccountNotFound(name.to_string()))?;
        Ok(Json(account.into()))
    }

    /// An account's entries, newest first.
    #[oai(
        path = "/accounts/:name/entries",
        method = "get",
        tag = "ApiTags::Accounts"
    )]
    async fn entries(
        &self,
        name: Path<String>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
        /// Entries per page, 1-500 (default 50).
        limit: Query<Option<u64>>,
    ) -> Result<Json<EntryPageView>, Problem> {
        let name = parse_account(&name.0)?;
        let limit = limit.0.unwrap_or(DEFAULT_PAGE_LIMIT);
        if !(1..=MAX_PAGE_LIMIT).contains(&limit) {
            return Err(WalletError::InvalidLimit(limit).into());
        }
        let before = cursor
            .0
            .map(|cursor| {
                cursor
                    .parse::<i64>()
                    .ok()
                    .filter(|id| *id > 0)
                    .ok_or(WalletError::InvalidCursor)
            })
            .transpose()?;
        if self
            .ledger
            .account(&name)
            .await
            .map_err(WalletError::from)?
            .is_none()
        {
            return Err(WalletError::AccountNotFound(name.to_string()).into());
        }
        let page = self
            .ledger
            .entries(&name, before, limit)
            .await
            .map_err(WalletError::from)?;
        Ok(Json(EntryPageView {
            entries: page.entries.into_iter().map(Into::into).collect(),
            next_cursor: page.next_before.map(|id| id.to_string()),
        }))
    }

    /// The ledger's invariants, checked now over the whole database.
    #[oai(path = "/invariants", method = "get", tag = "ApiTags::Accounts")]
    async fn invariants(&self) -> Result<Json<InvariantList>, Problem> {
        let checks = self
            .ledger
            .check_invariants()
            .await
            .map_err(WalletError::from)?;
        Ok(Json(InvariantList {
            checks: checks
                .into_iter()
                .map(|check| InvariantView {
                    name: check.name.to_owned(),
                    ok: check.ok,
                    detail: check.detail,
                })
                .collect(),
        }))
    }
}

/// One invariant, checked now.
#[derive(Debug, Clone, Object)]
pub struct InvariantView {
    /// A stable name, e.g. `ledger_sums_to_zero`.
    pub name: String,
    /// Whether it holds.
    pub ok: bool,
    /// What was measured, or the offending ids.
    pub detail: String,
}

/// The ledger's invariants.
#[derive(Debug, Clone, Object)]
pub struct InvariantList {
    pub checks: Vec<InvariantView>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use redpacket_common::money::MAX_AMOUNT_MINOR;

    fn body() -> TransferBody {
        TransferBody {
            id: "t-1".into(),
            debit: "external".into(),
            credit: "user:1".into(),
            amount: 100,
            currency: "CNY".into(),
            metadata: None,
        }
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases: Vec<(TransferBody, &str, &str)> = vec![
            (
                TransferBody {
                    id: "a b".into(),
                    ..body()
                },
                "invalid_transfer_id",
                "id",
            ),
            (
                TransferBody {
                    debit: "bank".into(),
                    ..body()
                },
                "invalid_account",
                "debit",
            ),
            (
                TransferBody {
                    credit: "user:".into(),
                    ..body()
                },
                "invalid_account",
                "credit",
            ),
            (
                TransferBody {
                    amount: 0,
                    ..body()
                },
                "invalid_amount",
                "amount",
            ),
            (
                TransferBody {
                    amount: -5,
                    ..body()
                },
                "invalid_amount",
                "amount",
            ),
            (
                TransferBody {
                    amount: MAX_AMOUNT_MINOR + 1,
                    ..body()
                },
                "invalid_amount",
                "amount",
            ),
            (
                TransferBody {
                    currency: "XYZ".into(),
                    ..body()
                },
                "unknown_currency",
                "currency",
            ),
            (
                TransferBody {
                    credit: "external".into(),
                    ..body()
                },
                "same_account",
                "credit",
            ),
            (
                TransferBody {
                    metadata: Some(serde_json::json!([1])),
                    ..body()
                },
                "invalid_metadata",
                "metadata",
            ),
            (
                TransferBody {
                    metadata: Some(serde_json::json!({"x": "y".repeat(5000)})),
                    ..body()
                },
                "metadata_too_large",
                "metadata",
            ),
        ];
        for (body, code, field) in cases {
            let problem = Problem::from(body.parse().unwrap_err());
            assert_eq!(
                (problem.code, problem.field.as_deref()),
                (code, Some(field))
            );
            assert_eq!(problem.status.as_u16(), 422);
        }
    }
}
