//! The internal APIs the sagas call: the campaign service and the wallet.
//!
//! Every call has a timeout. Failures are sorted once, here, and the rule is narrow on
//! purpose: only the service that owns an item can refuse that item. A refusal is a
//! `application/problem+json` answer of that service with a 4xx status and a `code`, for one
//! call or for one item of a batch's answer ([`StepError::Refused`]); the step decides which
//! codes may undo a saga. Everything else is [`StepError::Transient`] and is retried: a
//! timeout, a connection error, a 5xx, a 408 or 429, a refusal of the whole call (401, 403,
//! 413: auth or size, not the item), and any answer that is not the owner's problem (a proxy's
//! page). A batch the receiver refuses for its size is split and sent again, and batches are
//! built under [`MAX_BATCH_BODY_BYTES`] so that it does not happen in the first place.

use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

/// How long one call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest body of a batch call this worker sends: under every receiver's bound (the
/// campaign service takes 1 MiB on its batch endpoints, the wallet 8 MiB), so a batch is never
/// refused for its size; a larger batch is sent as several calls.
pub const MAX_BATCH_BODY_BYTES: usize = 256 * 1024;

/// Why a step failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// Worth retrying: the other side may answer later, or did not answer for the item.
    #[error("transient: {0}")]
    Transient(String),
    /// The service that owns the item refused it (`code`: its problem code). Only some codes
    /// let a saga undo; the others park the saga for an operator.
    #[error("refused ({code}): {detail}")]
    Refused { code: String, detail: String },
}

impl StepError {
    pub fn transient(text: impl Into<String>) -> Self {
        StepError::Transient(text.into())
    }
}

fn from_reqwest(err: reqwest::Error) -> StepError {
    StepError::Transient(err.to_string())
}

/// Whether a status refuses the whole call rather than the item it carries: a timeout, a
/// limit, the caller's credentials or the request's size. Such an answer says nothing about
/// the item, whoever sent it.
fn refuses_the_call(status: StatusCode) -> bool {
    status.is_server_error()
        || matches!(
            status,
            StatusCode::REQUEST_TIMEOUT
                | StatusCode::TOO_MANY_REQUESTS
                | StatusCode::UNAUTHORIZED
                | StatusCode::FORBIDDEN
                | StatusCode::PAYLOAD_TOO_LARGE
        )
}

/// Sorts one problem (a call's answer or a batch item's) into a step error.
fn sort_problem(status: StatusCode, problem: Option<&Value>) -> StepError {
    let code = problem.and_then(|p| p["code"].as_str());
    let detail = problem
        .and_then(|p| p["detail"].as_str())
        .unwrap_or_default();
    match code {
        Some(code) if status.is_client_error() && !refuses_the_call(status) => StepError::Refused {
            code: code.to_owned(),
            detail: detail.to_owned(),
        },
        Some(code) => StepError::Transient(format!("{status} {code}: {detail}")),
        None => StepError::Transient(format!("{status} without a problem of the service")),
    }
}

/// Reads a failed answer into a step error: a refusal only when it is the owner's problem.
async fn refusal(response: reqwest::Response) -> StepError {
    let status = response.status();
    let is_problem = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/problem+json"));
    let body: Option<Value> = if is_problem {
        response.json().await.ok()
    } else {
        None
    };
    sort_problem(status, body.as_ref())
}

async fn send(request: reqwest::RequestBuilder) -> Result<Value, StepError> {
    let response = request.send().await.map_err(from_reqwest)?;
    if response.status().is_success() {
        response.json().await.map_err(from_reqwest)
    } else {
        Err(refusal(response).await)
    }
}

/// One credit or transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub id: String,
    pub debit: String,
    pub credit: String,
    pub amount: i64,
    pub currency: String,
}

impl Transfer {
    fn to_json(&self) -> Value {
        json!({"id": self.id, "debit": self.debit, "credit": self.credit,
               "amount": self.amount, "currency": self.currency})
    }
}

/// The wallet's internal API.
#[derive(Debug, Clone)]
pub struct WalletClient {
    http: reqwest::Client,
    base: String,
}

#[derive(Debug, Deserialize)]
struct BatchResults {
    results: Vec<BatchItem>,
}

/// One outcome of a batch call (the wallet's transfers, the campaign's claims): what the
/// item's own call would have answered.
#[derive(Debug, Deserialize)]
struct BatchItem {
    ok: bool,
    status: u16,
    #[serde(default)]
    claim: Option<Value>,
    error: Option<Value>,
}

/// Sends `items` to a batch endpoint as `{wrapper: [items]}`, in as many calls as the size
/// bound needs: each call's body stays under [`MAX_BATCH_BODY_BYTES`], and a call refused for
/// its size (413) is split in two and sent again. Answers one result per item, in order; a
/// call that fails as a whole fails each of its items with the same (transient) error.
async fn send_batch(
    request: impl Fn() -> reqwest::RequestBuilder + Sync,
    wrapper: &str,
    items: &[Value],
) -> Vec<Result<Value, StepError>> {
    let mut results = Vec::with_capacity(items.len());
    for chunk in chunks_under(items, MAX_BATCH_BODY_BYTES) {
        results.extend(send_splitting(&request, wrapper, chunk).await);
    }
    results
}

/// Splits items into runs whose JSON array (with the wrapper's few bytes) stays under `limit`;
/// an item larger than the limit on its own travels alone.
fn chunks_under(items: &[Value], limit: usize) -> Vec<&[Value]> {
    // Room for `{"wrapper":[...]}` around the items.
    const ENVELOPE_BYTES: usize = 64;
    let mut chunks = Vec::new();
    let (mut start, mut size) = (0, ENVELOPE_BYTES);
    for (index, item) in items.iter().enumerate() {
        let item_size = item.to_string().len() + 1;
        if index > start && size + item_size > limit {
            chunks.push(&items[start..index]);
            (start, size) = (index, ENVELOPE_BYTES);
        }
        size += item_size;
    }
    if start < items.len() {
        chunks.push(&items[start..]);
    }
    chunks
}

/// One batch call; a 413 splits it in halves (at most log2 of the batch size deep).
fn send_splitting<'a, F>(
    request: &'a F,
    wrapper: &'a str,
    items: &'a [Value],
) -> futures::future::BoxFuture<'a, Vec<Result<Value, StepError>>>
where
    F: Fn() -> reqwest::RequestBuilder + Sync,
{
    Box::pin(async move {
        match send_once(request(), wrapper, items).await {
            Ok(results) => results,
            Err(TooLarge) if items.len() > 1 => {
                let (left, right) = items.split_at(items.len() / 2);
                let mut results = send_splitting(request, wrapper, left).await;
                results.extend(send_splitting(request, wrapper, right).await);
                results
            }
            Err(Failed(err)) => vec![Err(err); items.len()],
            Err(TooLarge) => vec![
                Err(StepError::transient(
                    "the receiver refused a single item for its size"
                ));
                items.len()
            ],
        }
    })
}

/// Why one batch call gave no per-item answer.
enum CallFailure {
    TooLarge,
    Failed(StepError),
}
use CallFailure::{Failed, TooLarge};

async fn send_once(
    request: reqwest::RequestBuilder,
    wrapper: &str,
    items: &[Value],
) -> Result<Vec<Result<Value, StepError>>, CallFailure> {
    let response = request
        .json(&json!({ wrapper: items }))
        .send()
        .await
        .map_err(|err| Failed(from_reqwest(err)))?;
    let status = response.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return Err(TooLarge);
    }
    if !status.is_success() {
        // Whatever the status, a failed batch call refuses no item on its own: the items are
        // retried (a refusal of one item comes as that item's result).
        let err = match refusal(response).await {
            StepError::Refused { code, detail } => {
                StepError::Transient(format!("{status} {code} for the whole batch: {detail}"))
            }
            transient => transient,
        };
        return Err(Failed(err));
    }
    let answer: BatchResults = response
        .json()
        .await
        .map_err(|err| Failed(from_reqwest(err)))?;
    if answer.results.len() != items.len() {
        return Err(Failed(StepError::transient(
            "a batch was answered with the wrong number of results",
        )));
    }
    Ok(answer
        .results
        .into_iter()
        .map(|item| {
            if item.ok {
                Ok(item.claim.unwrap_or(Value::Null))
            } else {
                let status =
                    StatusCode::from_u16(item.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                Err(sort_problem(status, item.error.as_ref()))
            }
        })
        .collect())
}

impl WalletClient {
    pub fn new(http: reqwest::Client, base: &str) -> Self {
        WalletClient {
            http,
            base: base.trim_end_matches('/').to_owned(),
        }
    }
}

/// What the sagas ask of the wallet. [`WalletClient`] answers it over HTTP; the engine holds
/// it as a trait object so that a deterministic simulation can stand in for the wallet.
#[async_trait::async_trait]
pub trait WalletApi: Send + Sync + std::fmt::Debug {
    /// Applies one transfer, idempotent by its id.
    async fn transfer(&self, transfer: &Transfer, request_id: &str) -> Result<Value, StepError>;

    /// Applies transfers in batch calls (one for up to 1,000 unless the size bound splits
    /// them); one result per transfer, in order.
    async fn transfer_batch(&self, transfers: &[Transfer]) -> Vec<Result<(), StepError>>;

    /// An account's balance; 0 when it was never used.
    async fn balance(&self, account: &str) -> Result<i64, StepError>;
}

#[async_trait::async_trait]
impl WalletApi for WalletClient {
    async fn transfer(&self, transfer: &Transfer, request_id: &str) -> Result<Value, StepError> {
        send(
            self.http
                .post(format!("{}/transfers", self.base))
                .header("x-request-id", request_id)
                .timeout(CALL_TIMEOUT)
                .json(&transfer.to_json()),
        )
        .await
    }

    async fn transfer_batch(&self, transfers: &[Transfer]) -> Vec<Result<(), StepError>> {
        let items: Vec<Value> = transfers.iter().map(Transfer::to_json).collect();
        let request = || {
            self.http
                .post(format!("{}/transfers/batch", self.base))
                .timeout(CALL_TIMEOUT)
        };
        send_batch(request, "transfers", &items)
            .await
            .into_iter()
            .map(|result| result.map(|_| ()))
            .collect()
    }

    async fn balance(&self, account: &str) -> Result<i64, StepError> {
        let response = self
            .http
            .get(format!("{}/accounts/{account}", self.base))
            .timeout(CALL_TIMEOUT)
            .send()
            .await
            .map_err(from_reqwest)?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(0);
        }
        if !response.status().is_success() {
            return Err(refusal(response).await);
        }
        let account: Value = response.json().await.map_err(from_reqwest)?;
        account["balance"]
            .as_i64()
            .ok_or_else(|| StepError::transient("the wallet answered an account without a balance"))
    }
}

/// The campaign service's internal API.
#[derive(Debug, Clone)]
pub struct CampaignClient {
    http: reqwest::Client,
    base: String,
}

impl CampaignClient {
    pub fn new(http: reqwest::Client, base: &str) -> Self {
        CampaignClient {
            http,
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    fn post(&self, path: &str, request_id: &str) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.base))
            .header("x-request-id", request_id)
            .timeout(CALL_TIMEOUT)
    }

    /// Outbox events not yet published, oldest first.
    pub async fn outbox(&self, limit: u32) -> Result<Value, StepError> {
        send(
            self.http
                .get(format!("{}/outbox?limit={limit}", self.base))
                .timeout(CALL_TIMEOUT),
        )
        .await
    }

    /// Marks outbox events published.
    pub async fn ack_outbox(&self, ids: &[String]) -> Result<Value, StepError> {
        send(
            self.http
                .post(format!("{}/outbox/ack", self.base))
                .timeout(CALL_TIMEOUT)
                .json(&json!({ "ids": ids })),
        )
        .await
    }
}

/// What the sagas ask of the campaign service. [`CampaignClient`] answers it over HTTP; the
/// engine holds it as a trait object so that a deterministic simulation can stand in for the
/// service.
#[async_trait::async_trait]
pub trait CampaignApi: Send + Sync + std::fmt::Debug {
    /// Records a claim from the hand-off (idempotent): the claim as stored.
    async fn record_claim(
        &self,
        claim_id: &str,
        body: &Value,
        request_id: &str,
    ) -> Result<Value, StepError>;

    /// Records many claims (each a `record` body with its `id`): one result per claim.
    async fn record_claims(&self, claims: &[Value]) -> Vec<Result<Value, StepError>>;

    /// Marks many recorded claims credited: one result per claim.
    async fn mark_claims_credited(&self, claim_ids: &[&str]) -> Vec<Result<Value, StepError>>;

    /// `pending` → `credited`; already credited answers as it is.
    async fn mark_credited(&self, claim_id: &str, request_id: &str) -> Result<Value, StepError>;

    /// `pending` → `compensated` with the reason; its packet goes back while the campaign is
    /// live.
    async fn mark_compensated(
        &self,
        claim_id: &str,
        reason: &str,
        request_id: &str,
    ) -> Result<Value, StepError>;

    /// `funding` → `scheduled`.
    async fn mark_funded(&self, campaign_id: &str, request_id: &str) -> Result<Value, StepError>;

    /// `funding` → `rejected` with the reason.
    async fn mark_rejected(
        &self,
        campaign_id: &str,
        reason: &str,
        request_id: &str,
    ) -> Result<Value, StepError>;

    /// An ended campaign → `settled`, with what its refund returned.
    async fn mark_settled(
        &self,
        campaign_id: &str,
        amount_refunded: i64,
        request_id: &str,
    ) -> Result<Value, StepError>;

    /// The campaign's status and counters.
    async fn stats(&self, campaign_id: &str) -> Result<Value, StepError>;
}

#[async_trait::async_trait]
impl CampaignApi for CampaignClient {
    async fn record_claim(
        &self,
        claim_id: &str,
        body: &Value,
        request_id: &str,
    ) -> Result<Value, StepError> {
        send(
            self.post(&format!("/claims/{claim_id}/record"), request_id)
                .json(body),
        )
        .await
    }

    async fn record_claims(&self, claims: &[Value]) -> Vec<Result<Value, StepError>> {
        send_batch(|| self.post("/claims/batch/record", ""), "claims", claims).await
    }

    async fn mark_claims_credited(&self, claim_ids: &[&str]) -> Vec<Result<Value, StepError>> {
        let ids: Vec<Value> = claim_ids.iter().map(|&id| Value::from(id)).collect();
        send_batch(|| self.post("/claims/batch/credited", ""), "ids", &ids).await
    }

    async fn mark_credited(&self, claim_id: &str, request_id: &str) -> Result<Value, StepError> {
        send(
            self.post(&format!("/claims/{claim_id}/credited"), request_id)
                .json(&json!({})),
        )
        .await
    }

    async fn mark_compensated(
        &self,
        claim_id: &str,
        reason: &str,
        request_id: &str,
    ) -> Result<Value, StepError> {
        send(
            self.post(&format!("/claims/{claim_id}/compensated"), request_id)
                .json(&json!({ "reason": reason })),
        )
        .await
    }

    async fn mark_funded(&self, campaign_id: &str, request_id: &str) -> Result<Value, StepError> {
        send(
            self.post(&format!("/campaigns/{campaign_id}/funded"), request_id)
                .json(&json!({})),
        )
        .await
    }

    async fn mark_rejected(
        &self,
        campaign_id: &str,
        reason: &str,
        request_id: &str,
    ) -> Result<Value, StepError> {
        send(
            self.post(&format!("/campaigns/{campaign_id}/rejected"), request_id)
                .json(&json!({ "reason": reason })),
        )
        .await
    }

    async fn mark_settled(
        &self,
        campaign_id: &str,
        amount_refunded: i64,
        request_id: &str,
    ) -> Result<Value, StepError> {
        send(
            self.post(&format!("/campaigns/{campaign_id}/settled"), request_id)
                .json(&json!({ "amount_refunded": amount_refunded })),
        )
        .await
    }

    async fn stats(&self, campaign_id: &str) -> Result<Value, StepError> {
        send(
            self.http
                .get(format!("{}/campaigns/{campaign_id}/stats", self.base))
                .timeout(CALL_TIMEOUT),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_cut_under_the_body_bound_and_keep_their_order() {
        let items: Vec<Value> = (0..1000)
            .map(|i| json!({"id": format!("claim-{i}"), "request_id": "r".repeat(128)}))
            .collect();
        let limit = 16 * 1024;
        let chunks = chunks_under(&items, limit);
        assert!(chunks.len() > 1);
        let mut seen = 0;
        for chunk in &chunks {
            let body = json!({ "claims": chunk }).to_string();
            assert!(body.len() <= limit, "{} bytes", body.len());
            assert_eq!(chunk[0], items[seen]);
            seen += chunk.len();
        }
        assert_eq!(seen, items.len());
        let huge = vec![json!("x".repeat(limit * 2)), json!(1)];
        assert_eq!(
            chunks_under(&huge, limit).len(),
            2,
            "an oversized item goes alone"
        );
        assert!(chunks_under(&[], limit).is_empty());
    }

    #[test]
    fn only_the_owner_s_problem_for_the_item_is_a_refusal() {
        let problem = json!({"code": "insufficient_funds", "detail": "no money"});
        assert_eq!(
            sort_problem(StatusCode::UNPROCESSABLE_ENTITY, Some(&problem)),
            StepError::Refused {
                code: "insufficient_funds".into(),
                detail: "no money".into()
            }
        );
        for status in [
            StatusCode::REQUEST_TIMEOUT,
            StatusCode::PAYLOAD_TOO_LARGE,
            StatusCode::UNAUTHORIZED,
            StatusCode::FORBIDDEN,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::BAD_GATEWAY,
            StatusCode::INTERNAL_SERVER_ERROR,
        ] {
            assert!(
                matches!(
                    sort_problem(status, Some(&problem)),
                    StepError::Transient(_)
                ),
                "{status} refuses the call, not the item"
            );
        }
        // A 4xx that is no problem of the service (a proxy's page) says nothing of the item.
        assert!(matches!(
            sort_problem(StatusCode::NOT_FOUND, None),
            StepError::Transient(_)
        ));
    }
}
