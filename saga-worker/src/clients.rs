//! The internal APIs the sagas call: the campaign service and the wallet.
//!
//! Every call has a timeout. Failures are sorted once, here: a timeout, a connection error or
//! a 5xx is transient (retry later); a 4xx is the service's final word (compensate or give up).

use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

/// How long one call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a step failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// Worth retrying: the other side may answer later.
    #[error("transient: {0}")]
    Transient(String),
    /// The other side refused for good (`code`: its problem code).
    #[error("permanent ({code}): {detail}")]
    Permanent { code: String, detail: String },
}

impl StepError {
    pub fn transient(text: impl Into<String>) -> Self {
        StepError::Transient(text.into())
    }
}

fn from_reqwest(err: reqwest::Error) -> StepError {
    StepError::Transient(err.to_string())
}

/// Reads a problem answer into a step error.
async fn refusal(response: reqwest::Response) -> StepError {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let code = body["code"].as_str().unwrap_or("unknown").to_owned();
    let detail = body["detail"].as_str().unwrap_or_default().to_owned();
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        StepError::Transient(format!("{status} {code}: {detail}"))
    } else {
        StepError::Permanent { code, detail }
    }
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

/// Sends a batch call and sorts its answer into one result per item, in order.
async fn send_batch(
    request: reqwest::RequestBuilder,
    items: usize,
) -> Result<Vec<Result<Value, StepError>>, StepError> {
    let response = request.send().await.map_err(from_reqwest)?;
    if !response.status().is_success() {
        return Err(refusal(response).await);
    }
    let results: BatchResults = response.json().await.map_err(from_reqwest)?;
    if results.results.len() != items {
        return Err(StepError::transient(
            "a batch was answered with the wrong number of results",
        ));
    }
    Ok(results
        .results
        .into_iter()
        .map(|item| {
            if item.ok {
                Ok(item.claim.unwrap_or(Value::Null))
            } else {
                let error = item.error.unwrap_or(Value::Null);
                let code = error["code"].as_str().unwrap_or("unknown").to_owned();
                let detail = error["detail"].as_str().unwrap_or_default().to_owned();
                if item.status >= 500 || item.status == 429 {
                    Err(StepError::Transient(format!(
                        "{} {code}: {detail}",
                        item.status
                    )))
                } else {
                    Err(StepError::Permanent { code, detail })
                }
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

    pub async fn transfer(
        &self,
        transfer: &Transfer,
        request_id: &str,
    ) -> Result<Value, StepError> {
        send(
            self.http
                .post(format!("{}/transfers", self.base))
                .header("x-request-id", request_id)
                .timeout(CALL_TIMEOUT)
                .json(&transfer.to_json()),
        )
        .await
    }

    /// Applies up to 1,000 transfers; one result per transfer, in order.
    pub async fn transfer_batch(
        &self,
        transfers: &[Transfer],
    ) -> Result<Vec<Result<(), StepError>>, StepError> {
        let body =
            json!({"transfers": transfers.iter().map(Transfer::to_json).collect::<Vec<_>>()});
        let request = self
            .http
            .post(format!("{}/transfers/batch", self.base))
            .timeout(CALL_TIMEOUT)
            .json(&body);
        Ok(send_batch(request, transfers.len())
            .await?
            .into_iter()
            .map(|result| result.map(|_| ()))
            .collect())
    }

    /// An account's balance; 0 when it was never used.
    pub async fn balance(&self, account: &str) -> Result<i64, StepError> {
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

    pub async fn record_claim(
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

    /// Records many claims (each a `record` body with its `id`): one result per claim.
    pub async fn record_claims(
        &self,
        claims: &[Value],
    ) -> Result<Vec<Result<Value, StepError>>, StepError> {
        send_batch(
            self.post("/claims/batch/record", "")
                .json(&json!({ "claims": claims })),
            claims.len(),
        )
        .await
    }

    /// Marks many recorded claims credited: one result per claim.
    pub async fn mark_claims_credited(
        &self,
        claim_ids: &[&str],
    ) -> Result<Vec<Result<Value, StepError>>, StepError> {
        send_batch(
            self.post("/claims/batch/credited", "")
                .json(&json!({ "ids": claim_ids })),
            claim_ids.len(),
        )
        .await
    }

    pub async fn mark_credited(
        &self,
        claim_id: &str,
        request_id: &str,
    ) -> Result<Value, StepError> {
        send(
            self.post(&format!("/claims/{claim_id}/credited"), request_id)
                .json(&json!({})),
        )
        .await
    }

    pub async fn mark_compensated(
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

    pub async fn mark_funded(
        &self,
        campaign_id: &str,
        request_id: &str,
    ) -> Result<Value, StepError> {
        send(
            self.post(&format!("/campaigns/{campaign_id}/funded"), request_id)
                .json(&json!({})),
        )
        .await
    }

    pub async fn mark_rejected(
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

    pub async fn mark_settled(
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

    pub async fn stats(&self, campaign_id: &str) -> Result<Value, StepError> {
        send(
            self.http
                .get(format!("{}/campaigns/{campaign_id}/stats", self.base))
                .timeout(CALL_TIMEOUT),
        )
        .await
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
