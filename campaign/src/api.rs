//! The campaign service's internal HTTP API, called by the gateway and the saga worker.

use poem::IntoResponse;
use poem::http::StatusCode;
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Enum, Object, OpenApi, Tags};
use redpacket_common::Problem;
use redpacket_common::front::{self, Head, HotRoute, Reply};
use redpacket_common::http::{FastJson, StrictJson, parse_strict};
use redpacket_common::time::rfc3339;
use serde::Deserialize;

use crate::entity::{campaign, claim};
use crate::service::{
    CampaignError, CampaignService, ClaimView, CreateRequest, Stats, parse_owner_id,
};
use crate::store::{ClaimRecord, StoreError};

/// Items per page unless `limit` says otherwise.
const DEFAULT_PAGE_LIMIT: u64 = 50;
/// The largest page.
const MAX_PAGE_LIMIT: u64 = 200;
/// The longest reason text a saga may attach.
const MAX_REASON_LEN: usize = 1000;

#[derive(Tags)]
enum ApiTags {
    /// Creating and reading campaigns.
    Campaigns,
    /// The seckill grab.
    Grab,
    /// Claims and their progress through the saga.
    Claims,
    /// Lifecycle steps driven by the saga worker.
    Saga,
}

impl From<CampaignError> for Problem {
    fn from(err: CampaignError) -> Problem {
        let detail = err.to_string();
        match err {
            CampaignError::Invalid { field, .. } => {
                Problem::unprocessable("invalid_field", detail).with_field(field)
            }
            CampaignError::Split(split) => {
                Problem::unprocessable("impossible_split", detail).with_field(split.field())
            }
            CampaignError::UnknownCampaign(_) => Problem::not_found("campaign_not_found", detail),
            CampaignError::UnknownClaim(_) => Problem::not_found("claim_not_found", detail),
            CampaignError::IdempotencyConflict => {
                Problem::conflict("idempotency_key_reused", detail).with_field("Idempotency-Key")
            }
            CampaignError::NotFunded => Problem::conflict("campaign_not_funded", detail),
            CampaignError::NotStarted => Problem::conflict("campaign_not_started", detail),
            CampaignError::Rejected(_) => Problem::conflict("campaign_rejected", detail),
            CampaignError::Cancelled => {
                Problem::new(StatusCode::GONE, "campaign_cancelled", "Gone", detail)
            }
            CampaignError::Ended => {
                Problem::new(StatusCode::GONE, "campaign_ended", "Gone", detail)
            }
            CampaignError::SoldOut => Problem::new(StatusCode::GONE, "sold_out", "Gone", detail),
            CampaignError::PoolRebuilding => Problem::unavailable("pool_rebuilding", detail),
            CampaignError::LimitReached(claims) => {
                let claims = claims
                    .into_iter()
                    .map(|(claim_id, amount)| serde_json::json!({"claim_id": claim_id, "amount": amount}))
                    .collect();
                Problem::conflict("limit_reached", detail)
                    .with_extension("claims", serde_json::Value::Array(claims))
            }
            CampaignError::WrongState(..) => Problem::conflict("wrong_state", detail),
            CampaignError::AlreadyStarted => Problem::conflict("already_started", detail),
            CampaignError::ClaimState(_) => Problem::conflict("claim_state", detail),
            CampaignError::PoolUnavailable(source) => {
                tracing::error!(error = %source, "packet pool failure");
                Problem::unavailable("pool_unavailable", detail)
            }
            CampaignError::Store(StoreError::Db(source)) => {
                Problem::from_db(&source, "the campaign database")
            }
            CampaignError::Store(source) => {
                tracing::error!(error = %source, "campaign database failure");
                Problem::internal()
            }
            // Another repair holds the lease for at most its time budget: come back after it.
            CampaignError::RepairBusy => Problem::unavailable("repair_in_progress", detail)
                .with_retry_after(crate::service::REPAIR_TIME_BUDGET.as_secs()),
            CampaignError::Ids(_) => {
                tracing::error!(error = %detail, "id generation failure");
                Problem::unavailable("ids_unavailable", detail)
            }
        }
    }
}

/// How the total is divided into packets.
#[derive(Debug, Clone, Copy, Enum, Deserialize, PartialEq, Eq)]
#[oai(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum SplitModeDto {
    /// Equal packets; the remainder goes one minor unit at a time to the first packets.
    Fixed,
    /// WeChat's double-mean rule: each draw uniform in [min, 2 × remaining / packets left].
    DoubleMean,
    /// Random within `min_amount` and `max_amount`.
    Bounded,
}

/// The split of a campaign.
#[derive(Debug, Clone, Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct SplitDto {
    /// The split rule.
    pub mode: SplitModeDto,
    /// Smallest packet in minor units (default 1).
    #[serde(default)]
    pub min_amount: Option<i64>,
    /// Largest packet in minor units (required by `bounded`).
    #[serde(default)]
    pub max_amount: Option<i64>,
}

/// A campaign to create for a merchant.
#[derive(Debug, Clone, Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct CreateCampaignBody {
    /// The merchant funding it.
    pub merchant_id: String,
    /// 1-200 characters.
    pub title: String,
    /// ISO 4217 code.
    pub currency: String,
    /// The total in minor units.
    pub total_amount: i64,
    /// 1 to 10,000,000 packets.
    pub packet_count: i64,
    /// How the total is split.
    pub split: SplitDto,
    /// Claims one user may hold, 1-100 (default 1).
    #[serde(default)]
    pub per_user_limit: Option<i64>,
    /// When grabs open (RFC 3339).
    pub starts_at: chrono::DateTime<chrono::Utc>,
    /// When grabs close (RFC 3339); after `starts_at`, at most 30 days later.
    pub ends_at: chrono::DateTime<chrono::Utc>,
    /// Seed of the random split; the same seed gives the same packets.
    #[serde(default)]
    pub seed: Option<u64>,
}

/// A campaign.
#[derive(Debug, Clone, Object)]
pub struct CampaignView {
    /// The campaign's id.
    pub id: String,
    /// The merchant that funds it.
    pub merchant_id: String,
    /// Its title.
    pub title: String,
    /// ISO 4217 code.
    pub currency: String,
    /// The total in minor units.
    pub total_amount: i64,
    /// Number of packets.
    pub packet_count: i64,
    /// The split.
    pub split: SplitView,
    /// Claims one user may hold.
    pub per_user_limit: i64,
    /// When grabs open.
    pub starts_at: String,
    /// When grabs close.
    pub ends_at: String,
    /// The split's seed.
    pub seed: u64,
    /// `funding`, `scheduled`, `active`, `exhausted`, `expired`, `settled`, `cancelled` or
    /// `rejected`.
    pub status: String,
    /// Why it is `rejected` or `cancelled`.
    #[oai(skip_serializing_if_is_none)]
    pub status_reason: Option<String>,
    /// When it was created.
    pub created_at: String,
}

/// The split as stored.
#[derive(Debug, Clone, Object)]
pub struct SplitView {
    /// `fixed`, `double_mean` or `bounded`.
    pub mode: String,
    /// Smallest packet.
    pub min_amount: i64,
    /// Largest packet.
    pub max_amount: i64,
}

impl From<campaign::Model> for CampaignView {
    fn from(model: campaign::Model) -> Self {
        CampaignView {
            id: model.id.to_string(),
            merchant_id: model.merchant_id,
            title: model.title,
            currency: model.currency,
            total_amount: model.total_amount,
            packet_count: i64::from(model.packet_count),
            split: SplitView {
                mode: model.split_mode,
                min_amount: model.min_amount,
                max_amount: model.max_amount,
            },
            per_user_limit: i64::from(model.per_user_limit),
            starts_at: rfc3339(model.starts_at_ms),
            ends_at: rfc3339(model.ends_at_ms),
            seed: model.seed.cast_unsigned(),
            status: model.status,
            status_reason: model.status_reason,
            created_at: rfc3339(model.created_at_ms),
        }
    }
}

/// A page of campaigns, newest first.
#[derive(Debug, Clone, Object)]
pub struct CampaignPage {
    /// The campaigns.
    pub campaigns: Vec<CampaignView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[oai(skip_serializing_if_is_none)]
    pub next_cursor: Option<String>,
}

/// Who grabs.
#[derive(Debug, Clone, Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct GrabBody {
    /// The user grabbing.
    pub user_id: String,
}

/// A granted grab: the amount is the user's; the credit follows asynchronously.
#[derive(Debug, Clone, Object, serde::Serialize)]
pub struct GrabResult {
    /// The claim's id; follow it with `GET /claims/{id}`.
    pub claim_id: String,
    /// The campaign.
    pub campaign_id: String,
    /// Minor units won.
    pub amount: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// Always `pending` here: the wallet credit follows.
    pub status: String,
}

/// A claim.
#[derive(Debug, Clone, Object)]
pub struct ClaimDto {
    /// The claim's id.
    pub id: String,
    /// Its campaign.
    pub campaign_id: String,
    /// The user who grabbed.
    pub user_id: String,
    /// Minor units.
    pub amount: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// `pending`, `credited` or `compensated`.
    pub status: String,
    /// When it was grabbed.
    pub created_at: String,
    /// When the wallet was credited.
    #[oai(skip_serializing_if_is_none)]
    pub credited_at: Option<String>,
    /// When it was compensated.
    #[oai(skip_serializing_if_is_none)]
    pub compensated_at: Option<String>,
    /// Why it was compensated.
    #[oai(skip_serializing_if_is_none)]
    pub reason: Option<String>,
    /// The packet's number within the campaign.
    pub packet_seq: i64,
}

impl From<claim::Model> for ClaimDto {
    fn from(model: claim::Model) -> Self {
        ClaimDto {
            id: model.id,
            campaign_id: model.campaign_id.to_string(),
            user_id: model.user_id,
            amount: model.amount,
            currency: model.currency,
            status: model.status,
            created_at: rfc3339(model.grabbed_at_ms),
            credited_at: model.credited_at_ms.map(rfc3339),
            compensated_at: model.compensated_at_ms.map(rfc3339),
            reason: model.reason,
            packet_seq: i64::from(model.packet_seq),
        }
    }
}

impl From<ClaimView> for ClaimDto {
    fn from(view: ClaimView) -> Self {
        match view {
            ClaimView::Recorded(model) => model.into(),
            ClaimView::Pending {
                campaign_id,
                currency,
                pending,
            } => ClaimDto {
                id: pending.claim_id,
                campaign_id: campaign_id.to_string(),
                user_id: pending.user_id,
                amount: pending.amount,
                currency,
                status: crate::store::claim_status::PENDING.to_owned(),
                created_at: rfc3339(pending.grabbed_at_ms),
                credited_at: None,
                compensated_at: None,
                reason: None,
                packet_seq: i64::from(pending.seq),
            },
        }
    }
}

/// A page of claims, newest first.
#[derive(Debug, Clone, Object)]
pub struct ClaimPage {
    /// The claims.
    pub claims: Vec<ClaimDto>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[oai(skip_serializing_if_is_none)]
    pub next_cursor: Option<String>,
}

/// Campaign statistics, served from counters.
#[derive(Debug, Clone, Object)]
pub struct StatsDto {
    /// The campaign's status.
    pub status: String,
    /// Packets in all.
    pub packets_total: i64,
    /// Packets still in the pool.
    pub packets_remaining: i64,
    /// Packets taken from the pool and held.
    pub packets_grabbed: i64,
    /// Claims credited to a wallet.
    pub packets_credited: i64,
    /// Claims compensated.
    pub packets_compensated: i64,
    /// Grabbed, neither credited nor compensated yet.
    pub packets_in_flight: i64,
    /// The total in minor units.
    pub amount_total: i64,
    /// Minor units still in the pool.
    pub amount_remaining: i64,
    /// Minor units taken from the pool and held.
    pub amount_grabbed: i64,
    /// Minor units credited to wallets.
    pub amount_credited: i64,
    /// Minor units of compensated claims.
    pub amount_compensated: i64,
    /// Minor units grabbed and not yet credited or compensated.
    pub amount_in_flight: i64,
    /// Minor units returned to the merchant at settlement.
    pub amount_refunded: i64,
}

impl From<Stats> for StatsDto {
    fn from(stats: Stats) -> Self {
        StatsDto {
            packets_grabbed: stats.packets_grabbed(),
            amount_grabbed: stats.amount_grabbed(),
            packets_in_flight: stats.packets_in_flight(),
            amount_in_flight: stats.amount_in_flight(),
            status: stats.status,
            packets_total: stats.packets_total,
            packets_remaining: stats.packets_remaining,
            packets_credited: stats.packets_credited,
            packets_compensated: stats.packets_compensated,
            amount_total: stats.amount_total,
            amount_remaining: stats.amount_remaining,
            amount_credited: stats.amount_credited,
            amount_compensated: stats.amount_compensated,
            amount_refunded: stats.amount_refunded,
        }
    }
}

/// A claim handed off by the pool, to record.
#[derive(Debug, Clone, Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct RecordClaimBody {
    /// The campaign.
    pub campaign_id: String,
    /// The user.
    pub user_id: String,
    /// The packet's number.
    pub packet_seq: u32,
    /// Minor units.
    pub amount: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// When the pool granted it (epoch milliseconds).
    pub grabbed_at_ms: i64,
    /// The request id of the grab.
    #[serde(default)]
    pub request_id: Option<String>,
}

/// The most claims one batch call carries.
pub const MAX_CLAIM_BATCH: usize = 1000;
/// The largest body of a batch call: room for [`MAX_CLAIM_BATCH`] claims of the largest size
/// (ids, a 64-byte user id and a 128-byte request id come to under 600 bytes a claim), so a
/// batch within the count bound is never refused for its size.
pub const CLAIM_BATCH_BODY_LIMIT_BYTES: usize = 1024 * 1024;

/// One claim of a batch to record.
#[derive(Debug, Clone, Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct RecordClaimItem {
    /// The claim's id, as the pool handed it off.
    pub id: String,
    /// The campaign.
    pub campaign_id: String,
    /// The user.
    pub user_id: String,
    /// The packet's number.
    pub packet_seq: u32,
    /// Minor units.
    pub amount: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// When the pool granted it (epoch milliseconds).
    pub grabbed_at_ms: i64,
    /// The request id of the grab.
    #[serde(default)]
    pub request_id: Option<String>,
}

impl RecordClaimItem {
    /// The claim's id and its record body, as the one-claim operation takes them.
    fn split(self) -> (String, RecordClaimBody) {
        let RecordClaimItem {
            id,
            campaign_id,
            user_id,
            packet_seq,
            amount,
            currency,
            grabbed_at_ms,
            request_id,
        } = self;
        let body = RecordClaimBody {
            campaign_id,
            user_id,
            packet_seq,
            amount,
            currency,
            grabbed_at_ms,
            request_id,
        };
        (id, body)
    }
}

/// A claim to record, its ids checked.
fn claim_record(id: String, body: RecordClaimBody) -> Result<ClaimRecord, Problem> {
    Ok(ClaimRecord {
        campaign_id: crate::service::parse_campaign_id(&body.campaign_id)?,
        user_id: parse_owner_id("user_id", &body.user_id)?,
        id,
        seq: body.packet_seq,
        amount: body.amount,
        currency: body.currency,
        grabbed_at_ms: body.grabbed_at_ms,
        request_id: body.request_id,
    })
}

/// Claims to record together.
#[derive(Debug, Clone, Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct RecordClaimsBody {
    /// 1 to 1,000 claims with distinct ids.
    pub claims: Vec<RecordClaimItem>,
}

/// Claims to mark together.
#[derive(Debug, Clone, Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct ClaimIdsBody {
    /// 1 to 1,000 distinct claim ids.
    pub ids: Vec<String>,
}

/// The outcome for one claim of a batch.
#[derive(Debug, Clone, Object)]
pub struct ClaimBatchItem {
    /// True when the claim is in the asked state (now or by an earlier request).
    pub ok: bool,
    /// HTTP status this claim would have had alone.
    pub status: u16,
    /// The claim, when `ok`.
    #[oai(skip_serializing_if_is_none)]
    pub claim: Option<ClaimDto>,
    /// Why it was refused, when not `ok`.
    #[oai(skip_serializing_if_is_none)]
    pub error: Option<redpacket_common::problem::ProblemBody>,
}

/// One outcome per claim of the request, in its order.
#[derive(Debug, Clone, Object)]
pub struct ClaimBatchResults {
    pub results: Vec<ClaimBatchItem>,
}

fn claim_item(result: Result<claim::Model, CampaignError>) -> ClaimBatchItem {
    match result {
        Ok(claim) => ClaimBatchItem {
            ok: true,
            status: 200,
            claim: Some(claim.into()),
            error: None,
        },
        Err(err) => {
            let problem = Problem::from(err);
            ClaimBatchItem {
                ok: false,
                status: problem.status.as_u16(),
                claim: None,
                error: Some(problem.body()),
            }
        }
    }
}

/// A batch must hold 1 to [`MAX_CLAIM_BATCH`] distinct ids.
fn check_batch<'a>(
    field: &'static str,
    ids: impl ExactSizeIterator<Item = &'a str>,
) -> Result<(), Problem> {
    let count = ids.len();
    if !(1..=MAX_CLAIM_BATCH).contains(&count) {
        return Err(Problem::unprocessable(
            "invalid_field",
            format!("a batch holds 1 to {MAX_CLAIM_BATCH} claims, not {count}"),
        )
        .with_field(field));
    }
    let mut seen = std::collections::HashSet::with_capacity(count);
    for id in ids {
        if !seen.insert(id) {
            return Err(Problem::unprocessable(
                "invalid_field",
                format!("claim `{id}` appears twice in the batch"),
            )
            .with_field(field));
        }
    }
    Ok(())
}

/// The grab, as both routes to it answer it.
async fn grab(
    service: &CampaignService,
    campaign_id: &str,
    user_id: &str,
    request_id: &str,
) -> Result<FastJson<GrabResult>, Problem> {
    let grabbed = service.grab(campaign_id, user_id, request_id).await?;
    Ok(FastJson(GrabResult {
        claim_id: grabbed.claim_id,
        campaign_id: grabbed.campaign_id.to_string(),
        amount: grabbed.amount,
        currency: grabbed.currency,
        status: crate::store::claim_status::PENDING.to_owned(),
    }))
}

/// `POST /campaigns/{id}/grab` answered ahead of the framework, the hottest path of a seckill:
/// the documented operation (`CampaignApi::grab`, which stays in the spec) with the same checks
/// in the same order (content type, bounded strict body, grab) and the same answers. A request
/// without a JSON content type goes to the documented operation, which refuses it.
#[derive(Debug, Clone)]
pub struct HotGrab {
    pub service: CampaignService,
}

/// The campaign id of `/campaigns/{id}/grab`.
fn campaign_id_of(path: &str) -> Option<&str> {
    front::path_segment(path, "/campaigns/", "/grab")
}

impl HotRoute for HotGrab {
    /// A grab with a JSON body; any other content type goes to the documented operation, which
    /// refuses it.
    fn wants(&self, head: &Head<'_>) -> bool {
        use poem_openapi::payload::Payload;
        head.method() == "POST"
            && campaign_id_of(head.path()).is_some()
            && head
                .header("content-type")
                .and_then(|value| std::str::from_utf8(value).ok())
                .is_some_and(StrictJson::<GrabBody>::check_content_type)
    }

    async fn call(&self, head: &Head<'_>, body: &[u8], request_id: &str) -> Reply {
        let id = campaign_id_of(head.path()).unwrap_or_default();
        let granted = async {
            let body: GrabBody = parse_strict(body)?;
            grab(&self.service, id, &body.user_id, request_id).await
        };
        match granted.await {
            Ok(FastJson(granted)) => match serde_json::to_vec(&granted) {
                Ok(body) => Reply::Json(StatusCode::OK, body.into()),
                Err(err) => {
                    tracing::error!(error = %err, "serializing a grab failed");
                    Reply::Response(Problem::internal().into_response())
                }
            },
            Err(problem) => Reply::Response(problem.into_response()),
        }
    }
}

/// Why something failed for good.
#[derive(Debug, Clone, Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct ReasonBody {
    /// A human-readable reason, at most 1,000 characters.
    pub reason: String,
}

/// The refund of a settled campaign.
#[derive(Debug, Clone, Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct SettleBody {
    /// Minor units returned from the escrow to the merchant.
    pub amount_refunded: i64,
}

/// Who cancels.
#[derive(Debug, Clone, Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    /// The merchant; a campaign of another merchant answers 404.
    #[serde(default)]
    pub merchant_id: Option<String>,
}

/// A lifecycle event waiting in the outbox.
#[derive(Debug, Clone, Object)]
pub struct OutboxEvent {
    /// The event's id.
    pub id: String,
    /// The campaign it is about.
    pub campaign_id: String,
    /// `campaign.created` or `campaign.ended`.
    pub kind: String,
    /// The campaign as it was: `campaign_id`, `merchant_id`, `currency`, `total_amount`,
    /// `status`.
    pub payload: serde_json::Value,
    /// When it happened (epoch milliseconds).
    pub created_at_ms: i64,
}

/// Events not yet published, oldest first.
#[derive(Debug, Clone, Object)]
pub struct OutboxPage {
    /// The events.
    pub events: Vec<OutboxEvent>,
}

/// Events the relay published.
#[derive(Debug, Clone, Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct AckBody {
    /// Their ids (at most 1,000).
    pub ids: Vec<String>,
}

/// How many events were marked published.
#[derive(Debug, Clone, Object)]
pub struct AckResult {
    /// Events marked.
    pub acked: u64,
}

#[derive(ApiResponse)]
enum CreateResponse {
    /// Created, in `funding` until the funding saga moves the money.
    #[oai(status = 201)]
    Created(Json<CampaignView>),
    /// The same `Idempotency-Key` and body were seen before: the original campaign.
    #[oai(status = 200)]
    Existing(Json<CampaignView>),
}

fn page_limit(limit: Option<u64>) -> Result<u64, Problem> {
    let limit = limit.unwrap_or(DEFAULT_PAGE_LIMIT);
    if (1..=MAX_PAGE_LIMIT).contains(&limit) {
        Ok(limit)
    } else {
        Err(Problem::bad_request(
            "invalid_limit",
            format!("`limit` must be between 1 and {MAX_PAGE_LIMIT}"),
        )
        .with_field("limit"))
    }
}

fn claim_cursor(cursor: Option<&str>) -> Result<Option<&str>, Problem> {
    match cursor {
        Some(c) if c.len() == 32 && c.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(Some(c)),
        Some(_) => Err(Problem::bad_request(
            "invalid_cursor",
            "`cursor` is not a cursor this API returned",
        )
        .with_field("cursor")),
        None => Ok(None),
    }
}

fn claim_page(claims: Vec<claim::Model>, limit: u64) -> ClaimPage {
    let next_cursor = (claims.len() as u64 == limit)
        .then(|| claims.last().map(|c| c.id.clone()))
        .flatten();
    ClaimPage {
        claims: claims.into_iter().map(Into::into).collect(),
        next_cursor,
    }
}

fn check_reason(reason: &str) -> Result<(), Problem> {
    if reason.is_empty() || reason.chars().count() > MAX_REASON_LEN {
        return Err(Problem::unprocessable(
            "invalid_field",
            format!("reason must have 1-{MAX_REASON_LEN} characters"),
        )
        .with_field("reason"));
    }
    Ok(())
}

/// The campaign API.
#[derive(Debug, Clone)]
pub struct CampaignApi {
    service: CampaignService,
}

impl CampaignApi {
    pub fn new(service: CampaignService) -> Self {
        CampaignApi { service }
    }
}

#[OpenApi]
impl CampaignApi {
    /// Create a campaign.
    ///
    /// Splits the total into packets now (seeded, reproducible) and stores them; the campaign
    /// waits in `funding` for the funding saga. With an `Idempotency-Key`, a retry answers the
    /// original campaign (200); the same key with another body is 409.
    #[oai(path = "/campaigns", method = "post", tag = "ApiTags::Campaigns")]
    async fn create(
        &self,
        body: StrictJson<CreateCampaignBody>,
        /// Makes a retried create return the same campaign (1-128 visible ASCII characters).
        #[oai(name = "Idempotency-Key")]
        idempotency_key: Header<Option<String>>,
        http_request: &poem::Request,
    ) -> Result<CreateResponse, Problem> {
        // A key that is not visible ASCII reaches `idempotency_key` as no key at all: it is
        // read again as sent, so that the service refuses it instead of ignoring it.
        let idempotency_key = idempotency_key
            .0
            .or_else(|| redpacket_common::http::header_text(http_request, "Idempotency-Key"));
        let body = body.0;
        let request = CreateRequest {
            merchant_id: body.merchant_id,
            title: body.title,
            currency: body.currency,
            total_amount: body.total_amount,
            packet_count: body.packet_count,
            split_mode: match body.split.mode {
                SplitModeDto::Fixed => "fixed",
                SplitModeDto::DoubleMean => "double_mean",
                SplitModeDto::Bounded => "bounded",
            }
            .to_owned(),
            min_amount: body.split.min_amount,
            max_amount: body.split.max_amount,
            per_user_limit: body.per_user_limit,
            starts_at_ms: body.starts_at.timestamp_millis(),
            ends_at_ms: body.ends_at.timestamp_millis(),
            seed: body.seed,
        };
        let (campaign, created) = self.service.create(request, idempotency_key).await?;
        Ok(if created {
            CreateResponse::Created(Json(campaign.into()))
        } else {
            CreateResponse::Existing(Json(campaign.into()))
        })
    }

    /// A merchant's campaigns, newest first.
    #[oai(path = "/campaigns", method = "get", tag = "ApiTags::Campaigns")]
    async fn list(
        &self,
        /// The merchant.
        merchant_id: Query<String>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
        /// Campaigns per page, 1-200 (default 50).
        limit: Query<Option<u64>>,
    ) -> Result<Json<CampaignPage>, Problem> {
        let merchant_id = parse_owner_id("merchant_id", &merchant_id.0)?;
        let limit = page_limit(limit.0)?;
        let before = match cursor.0 {
            Some(cursor) => Some(cursor.parse::<i64>().map_err(|_| {
                Problem::bad_request(
                    "invalid_cursor",
                    "`cursor` is not a cursor this API returned",
                )
                .with_field("cursor")
            })?),
            None => None,
        };
        let campaigns = self
            .service
            .store()
            .campaigns_of(&merchant_id, before, limit)
            .await
            .map_err(CampaignError::from)?;
        let next_cursor = (campaigns.len() as u64 == limit)
            .then(|| campaigns.last().map(|c| c.id.to_string()))
            .flatten();
        Ok(Json(CampaignPage {
            campaigns: campaigns.into_iter().map(Into::into).collect(),
            next_cursor,
        }))
    }

    /// Read a campaign.
    #[oai(path = "/campaigns/:id", method = "get", tag = "ApiTags::Campaigns")]
    async fn get(&self, id: Path<String>) -> Result<Json<CampaignView>, Problem> {
        Ok(Json(self.service.campaign(&id.0).await?.into()))
    }

    /// A campaign's statistics, from counters kept alongside (no table scans).
    #[oai(
        path = "/campaigns/:id/stats",
        method = "get",
        tag = "ApiTags::Campaigns"
    )]
    async fn stats(&self, id: Path<String>) -> Result<Json<StatsDto>, Problem> {
        Ok(Json(self.service.stats(&id.0).await?.into()))
    }

    /// Cancel a campaign before its start.
    #[oai(
        path = "/campaigns/:id/cancel",
        method = "post",
        tag = "ApiTags::Campaigns"
    )]
    async fn cancel(
        &self,
        id: Path<String>,
        body: StrictJson<CancelBody>,
    ) -> Result<Json<CampaignView>, Problem> {
        Ok(Json(
            self.service
                .cancel(&id.0, body.0.merchant_id.as_deref())
                .await?
                .into(),
        ))
    }

    /// Grab a packet.
    ///
    /// One atomic step in the pool checks the window and state, the user's limit and the
    /// packets left, takes a packet, records the claim and appends it to the hand-off. The
    /// answer is immediate; the wallet is credited asynchronously. 409 `limit_reached` lists
    /// the user's claims in `claims`; 410 `sold_out` or `campaign_ended`; 409
    /// `campaign_not_started` or `campaign_not_funded`.
    #[oai(path = "/campaigns/:id/grab", method = "post", tag = "ApiTags::Grab")]
    async fn grab(
        &self,
        id: Path<String>,
        body: StrictJson<GrabBody>,
        /// Carried into the hand-off and the saga's messages.
        #[oai(name = "X-Request-Id")]
        request_id: Header<Option<String>>,
    ) -> Result<FastJson<GrabResult>, Problem> {
        let request_id = request_id.0.unwrap_or_default();
        grab(&self.service, &id.0, &body.0.user_id, &request_id).await
    }

    /// Read a claim (also while it is only in the pool, not yet recorded).
    #[oai(path = "/claims/:id", method = "get", tag = "ApiTags::Claims")]
    async fn claim(&self, id: Path<String>) -> Result<Json<ClaimDto>, Problem> {
        Ok(Json(self.service.claim(&id.0).await?.into()))
    }

    /// A user's recorded claims, newest first.
    #[oai(
        path = "/users/:user_id/claims",
        method = "get",
        tag = "ApiTags::Claims"
    )]
    async fn user_claims(
        &self,
        user_id: Path<String>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
        /// Claims per page, 1-200 (default 50).
        limit: Query<Option<u64>>,
    ) -> Result<Json<ClaimPage>, Problem> {
        let limit = page_limit(limit.0)?;
        let before = claim_cursor(cursor.0.as_deref())?;
        let claims = self
            .service
            .claims_of_user(&user_id.0, before, limit)
            .await?;
        Ok(Json(claim_page(claims, limit)))
    }

    /// A campaign's recorded claims, newest first.
    #[oai(
        path = "/campaigns/:id/claims",
        method = "get",
        tag = "ApiTags::Claims"
    )]
    async fn campaign_claims(
        &self,
        id: Path<String>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
        /// Claims per page, 1-200 (default 50).
        limit: Query<Option<u64>>,
    ) -> Result<Json<ClaimPage>, Problem> {
        let limit = page_limit(limit.0)?;
        let before = claim_cursor(cursor.0.as_deref())?;
        let claims = self
            .service
            .claims_of_campaign(&id.0, before, limit)
            .await?;
        Ok(Json(claim_page(claims, limit)))
    }

    /// Mark a campaign funded (`funding` → `scheduled`). Idempotent.
    #[oai(path = "/campaigns/:id/funded", method = "post", tag = "ApiTags::Saga")]
    async fn funded(&self, id: Path<String>) -> Result<Json<CampaignView>, Problem> {
        Ok(Json(self.service.mark_funded(&id.0).await?.into()))
    }

    /// Mark a campaign rejected (`funding` → `rejected`) with the reason. Idempotent.
    #[oai(
        path = "/campaigns/:id/rejected",
        method = "post",
        tag = "ApiTags::Saga"
    )]
    async fn rejected(
        &self,
        id: Path<String>,
        body: StrictJson<ReasonBody>,
    ) -> Result<Json<CampaignView>, Problem> {
        check_reason(&body.0.reason)?;
        Ok(Json(
            self.service
                .mark_rejected(&id.0, &body.0.reason)
                .await?
                .into(),
        ))
    }

    /// Mark an ended campaign settled with what its refund returned. Idempotent.
    #[oai(
        path = "/campaigns/:id/settled",
        method = "post",
        tag = "ApiTags::Saga"
    )]
    async fn settled(
        &self,
        id: Path<String>,
        body: StrictJson<SettleBody>,
    ) -> Result<Json<CampaignView>, Problem> {
        if body.0.amount_refunded < 0 {
            return Err(Problem::unprocessable(
                "invalid_field",
                "amount_refunded must not be negative",
            )
            .with_field("amount_refunded"));
        }
        Ok(Json(
            self.service
                .settle(&id.0, body.0.amount_refunded)
                .await?
                .into(),
        ))
    }

    /// Record a claim from the hand-off. Idempotent by claim id.
    #[oai(path = "/claims/:id/record", method = "post", tag = "ApiTags::Saga")]
    async fn record(
        &self,
        id: Path<String>,
        body: StrictJson<RecordClaimBody>,
    ) -> Result<Json<ClaimDto>, Problem> {
        let claim = self
            .service
            .record_claim(claim_record(id.0, body.0)?)
            .await?;
        Ok(Json(claim.into()))
    }

    /// Lifecycle events not yet published (the outbox), oldest first. The saga worker's relay
    /// reads them, publishes them, then acknowledges them: at least once.
    #[oai(path = "/outbox", method = "get", tag = "ApiTags::Saga")]
    async fn outbox(
        &self,
        /// Events per page, 1-200 (default 50).
        limit: Query<Option<u64>>,
    ) -> Result<Json<OutboxPage>, Problem> {
        let limit = page_limit(limit.0)?;
        let events = self
            .service
            .store()
            .unpublished_events(limit)
            .await
            .map_err(CampaignError::from)?;
        Ok(Json(OutboxPage {
            events: events
                .into_iter()
                .map(|event| OutboxEvent {
                    id: event.id.to_string(),
                    campaign_id: event.campaign_id.to_string(),
                    kind: event.kind,
                    payload: serde_json::from_str(&event.payload).unwrap_or_default(),
                    created_at_ms: event.created_at_ms,
                })
                .collect(),
        }))
    }

    /// Mark outbox events published. Idempotent.
    #[oai(path = "/outbox/ack", method = "post", tag = "ApiTags::Saga")]
    async fn ack_outbox(&self, body: StrictJson<AckBody>) -> Result<Json<AckResult>, Problem> {
        let ids: Vec<i64> = body
            .0
            .ids
            .iter()
            .map(|id| id.parse::<i64>())
            .collect::<Result<_, _>>()
            .map_err(|_| {
                Problem::unprocessable("invalid_field", "ids must be event ids").with_field("ids")
            })?;
        if ids.len() > 1000 {
            return Err(
                Problem::unprocessable("invalid_field", "at most 1,000 ids").with_field("ids")
            );
        }
        self.service
            .store()
            .mark_published(&ids, chrono::Utc::now().timestamp_millis())
            .await
            .map_err(CampaignError::from)?;
        Ok(Json(AckResult {
            acked: ids.len() as u64,
        }))
    }

    /// Record many claims from the hand-off at once, each as `/claims/{id}/record` would (one
    /// transaction for the batch). Idempotent by claim id; one outcome per claim.
    #[oai(path = "/claims/batch/record", method = "post", tag = "ApiTags::Saga")]
    async fn record_batch(
        &self,
        body: StrictJson<RecordClaimsBody, CLAIM_BATCH_BODY_LIMIT_BYTES>,
    ) -> Result<Json<ClaimBatchResults>, Problem> {
        let claims = body.0.claims;
        check_batch("claims", claims.iter().map(|claim| claim.id.as_str()))?;
        let records = claims
            .into_iter()
            .map(|claim| {
                let (id, body) = claim.split();
                claim_record(id, body)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let results = self.service.record_claims(records).await?;
        Ok(Json(ClaimBatchResults {
            results: results.into_iter().map(claim_item).collect(),
        }))
    }

    /// Mark many recorded claims credited at once, each as `/claims/{id}/credited` would (one
    /// transaction for the batch). Idempotent; one outcome per claim.
    #[oai(
        path = "/claims/batch/credited",
        method = "post",
        tag = "ApiTags::Saga"
    )]
    async fn credited_batch(
        &self,
        body: StrictJson<ClaimIdsBody, CLAIM_BATCH_BODY_LIMIT_BYTES>,
    ) -> Result<Json<ClaimBatchResults>, Problem> {
        let ids: Vec<&str> = body.0.ids.iter().map(String::as_str).collect();
        check_batch("ids", ids.iter().copied())?;
        let results = self.service.mark_claims_credited(&ids).await?;
        Ok(Json(ClaimBatchResults {
            results: results.into_iter().map(claim_item).collect(),
        }))
    }

    /// Mark a recorded claim credited. Idempotent.
    #[oai(path = "/claims/:id/credited", method = "post", tag = "ApiTags::Saga")]
    async fn credited(&self, id: Path<String>) -> Result<Json<ClaimDto>, Problem> {
        Ok(Json(self.service.mark_credited(&id.0).await?.into()))
    }

    /// Compensate a recorded claim: its packet returns to the pool while the campaign is live,
    /// else to the refund. Idempotent.
    #[oai(
        path = "/claims/:id/compensated",
        method = "post",
        tag = "ApiTags::Saga"
    )]
    async fn compensated(
        &self,
        id: Path<String>,
        body: StrictJson<ReasonBody>,
    ) -> Result<Json<ClaimDto>, Problem> {
        check_reason(&body.0.reason)?;
        Ok(Json(
            self.service
                .mark_compensated(&id.0, &body.0.reason)
                .await?
                .into(),
        ))
    }

    /// Repair what the campaign service owns (operator, through the gateway): claims the pool
    /// granted that the database does not know are recorded (with the checks of a rebuilt
    /// pool), live pools that disagree with the database are mended, lost ones rebuilt; claims
    /// still pending and ended campaigns not settled past the age bound are listed for the saga
    /// worker. At most `limit` items and 5 s a call; one repair at a time (503 otherwise).
    #[oai(path = "/repair", method = "post", tag = "ApiTags::Saga")]
    async fn repair(&self, body: StrictJson<RepairBody>) -> Result<Json<RepairReportDto>, Problem> {
        let limit = body
            .0
            .limit
            .unwrap_or(crate::service::DEFAULT_REPAIR_ITEMS as u64);
        if !(1..=crate::service::MAX_REPAIR_ITEMS as u64).contains(&limit) {
            return Err(Problem::unprocessable(
                "invalid_limit",
                format!(
                    "`limit` must be between 1 and {}",
                    crate::service::MAX_REPAIR_ITEMS
                ),
            )
            .with_field("limit"));
        }
        let min_age_ms = body.0.min_age_ms.unwrap_or(DEFAULT_REPAIR_MIN_AGE_MS);
        if !(0..=MAX_REPAIR_MIN_AGE_MS).contains(&min_age_ms) {
            return Err(Problem::unprocessable(
                "invalid_field",
                format!("`min_age_ms` must be between 0 and {MAX_REPAIR_MIN_AGE_MS}"),
            )
            .with_field("min_age_ms"));
        }
        let cursor = body
            .0
            .cursor
            .as_deref()
            .map(str::parse::<crate::service::RepairCursor>)
            .transpose()?;
        let report = self
            .service
            .repair(crate::service::RepairOptions {
                limit: usize::try_from(limit).unwrap_or(usize::MAX),
                min_age_ms,
                cursor,
            })
            .await?;
        Ok(Json(RepairReportDto {
            findings: report
                .findings
                .into_iter()
                .map(|finding| RepairFindingDto {
                    kind: finding.kind.to_owned(),
                    id: finding.id,
                    repaired: finding.repaired,
                    action: finding.action,
                })
                .collect(),
            pending_claims: report
                .pending_claims
                .into_iter()
                .map(|claim| StaleClaimDto {
                    claim_id: claim.id,
                    campaign_id: claim.campaign_id.to_string(),
                    user_id: claim.user_id,
                    packet_seq: u32::try_from(claim.packet_seq).unwrap_or(0),
                    amount: claim.amount,
                    currency: claim.currency,
                    grabbed_at_ms: claim.grabbed_at_ms,
                })
                .collect(),
            ended_campaigns: report
                .ended_campaigns
                .into_iter()
                .map(|campaign| UnsettledCampaignDto {
                    campaign_id: campaign.id.to_string(),
                    merchant_id: campaign.merchant_id,
                    currency: campaign.currency,
                    total_amount: campaign.total_amount,
                })
                .collect(),
            more: report.more,
            cursor: report.cursor.map(|cursor| cursor.to_string()),
        }))
    }

    /// The campaign database's invariants, checked now, and the newest campaigns (at most
    /// 500) with what their escrow must hold, for a reconciliation against the wallet.
    #[oai(path = "/reconciliation", method = "get", tag = "ApiTags::Saga")]
    async fn reconciliation(&self) -> Result<Json<ReconciliationDto>, Problem> {
        let store = self.service.store();
        let checks = store
            .check_invariants()
            .await
            .map_err(CampaignError::from)?;
        let campaigns = store
            .recent_campaigns()
            .await
            .map_err(CampaignError::from)?;
        Ok(Json(ReconciliationDto {
            checks: checks
                .into_iter()
                .map(|check| CheckDto {
                    name: check.name.to_owned(),
                    ok: check.ok,
                    detail: check.detail,
                })
                .collect(),
            campaigns: campaigns
                .into_iter()
                .map(|campaign| CampaignBrief {
                    id: campaign.id.to_string(),
                    status: campaign.status,
                    total_amount: campaign.total_amount,
                })
                .collect(),
        }))
    }
}

/// What an operator's repair asks of the campaign service.
#[derive(Debug, Clone, Object, Deserialize, serde::Serialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct RepairBody {
    /// The most items answered, findings and claims or campaigns for the saga worker
    /// together (1-500, default 100); call again while `more` is true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// Only claims grabbed, and campaigns ended, at least this long ago are taken (the
    /// service's floor, 60,000 unless configured otherwise, to 86,400,000; default 60,000):
    /// younger ones are still moving on the normal path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_age_ms: Option<i64>,
    /// Where to resume: the `cursor` the previous call answered; absent to start at the
    /// oldest campaign not settled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// The longest age bound a repair takes.
pub const MAX_REPAIR_MIN_AGE_MS: i64 = 86_400_000;
/// The age bound of a repair unless the caller says otherwise: longer than a relay's and a
/// saga's normal path, so a repair does not chase grabs that are simply on their way.
pub const DEFAULT_REPAIR_MIN_AGE_MS: i64 = 60_000;

/// One thing a repair found wrong, and what became of it.
#[derive(Debug, Clone, Object, Deserialize, serde::Serialize)]
pub struct RepairFindingDto {
    /// `claim_unrecorded`, `pool_mismatch`, `pool_lost`, `packet_granted_twice` (a packet
    /// more than one claim holds, for an operator) or `repair_failed` (one campaign's repair
    /// failed with the error; the others went on).
    pub kind: String,
    /// The claim or campaign.
    pub id: String,
    /// Whether it was repaired.
    pub repaired: bool,
    /// What was done, or why it could not be.
    pub action: String,
}

/// A claim still `pending` past the age bound: its saga may be lost.
#[derive(Debug, Clone, Object, Deserialize, serde::Serialize)]
pub struct StaleClaimDto {
    pub claim_id: String,
    pub campaign_id: String,
    pub user_id: String,
    pub packet_seq: u32,
    pub amount: i64,
    pub currency: String,
    pub grabbed_at_ms: i64,
}

/// A campaign ended past the age bound and not settled: its refund may be lost.
#[derive(Debug, Clone, Object, Deserialize, serde::Serialize)]
pub struct UnsettledCampaignDto {
    pub campaign_id: String,
    pub merchant_id: String,
    pub currency: String,
    pub total_amount: i64,
}

/// What the campaign service repaired, and what the saga worker should look at.
#[derive(Debug, Clone, Object, Deserialize, serde::Serialize)]
pub struct RepairReportDto {
    pub findings: Vec<RepairFindingDto>,
    pub pending_claims: Vec<StaleClaimDto>,
    pub ended_campaigns: Vec<UnsettledCampaignDto>,
    /// Whether the call stopped at its item or time bound before looking at everything.
    pub more: bool,
    /// Where the next call resumes when `more` is true: pass it back as the body's `cursor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// One invariant, checked now.
#[derive(Debug, Clone, Object, serde::Serialize, Deserialize)]
pub struct CheckDto {
    /// A stable name.
    pub name: String,
    /// Whether it holds.
    pub ok: bool,
    /// What was measured, or the offending ids.
    pub detail: String,
}

/// A campaign as the escrow check needs it.
#[derive(Debug, Clone, Object, serde::Serialize, Deserialize)]
pub struct CampaignBrief {
    pub id: String,
    pub status: String,
    pub total_amount: i64,
}

/// The campaign side of a reconciliation.
#[derive(Debug, Clone, Object, serde::Serialize, Deserialize)]
pub struct ReconciliationDto {
    pub checks: Vec<CheckDto>,
    /// The newest campaigns, newest first.
    pub campaigns: Vec<CampaignBrief>,
}
