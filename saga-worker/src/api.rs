//! The saga worker's internal API: sagas by id or state, the dead letters and their replay.

use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, Tags};
use redpacket_common::Problem;
use redpacket_common::messages::{Envelope, SagaEvent};
use redpacket_common::time::rfc3339;

use crate::bus::Bus;
use crate::entity::{dead_letter, saga};
use crate::store::SagaStore;

#[derive(Tags)]
enum ApiTags {
    /// Saga state.
    Sagas,
    /// Messages that exhausted their retries.
    DeadLetters,
}

fn store_failure(err: sea_orm::DbErr) -> Problem {
    Problem::from_db(&err, "the saga database")
}

/// A saga's state.
#[derive(Debug, Clone, Object)]
pub struct SagaView {
    /// `grab:{claim}`, `fund:{campaign}` or `refund:{campaign}`.
    pub id: String,
    /// `grab`, `funding` or `refund`.
    pub kind: String,
    /// `running`, `completed`, `compensated` or `stuck`.
    pub state: String,
    /// The step it is at (or `done`).
    pub step: String,
    /// Executions so far.
    pub attempts: i64,
    /// The last failure, at most 1,000 characters.
    #[oai(skip_serializing_if_is_none)]
    pub last_error: Option<String>,
    /// The request that started it.
    #[oai(skip_serializing_if_is_none)]
    pub request_id: Option<String>,
    /// When it started.
    pub created_at: String,
    /// When it last moved.
    pub updated_at: String,
}

impl From<saga::Model> for SagaView {
    fn from(model: saga::Model) -> Self {
        SagaView {
            id: model.id,
            kind: model.kind,
            state: model.state,
            step: model.step,
            attempts: i64::from(model.attempts),
            last_error: model.last_error,
            request_id: model.request_id,
            created_at: rfc3339(model.created_at_ms),
            updated_at: rfc3339(model.updated_at_ms),
        }
    }
}

/// Sagas.
#[derive(Debug, Clone, Object)]
pub struct SagaList {
    /// The sagas, most recently updated first.
    pub sagas: Vec<SagaView>,
}

/// A dead letter.
#[derive(Debug, Clone, Object)]
pub struct DeadLetterView {
    /// Its id, for replay.
    pub id: String,
    /// The saga it drives.
    pub saga_id: String,
    /// Why it was given up.
    pub reason: String,
    /// The message (JSON envelope).
    pub message: serde_json::Value,
    /// When it was given up.
    pub created_at: String,
}

impl From<dead_letter::Model> for DeadLetterView {
    fn from(model: dead_letter::Model) -> Self {
        DeadLetterView {
            id: model.id.to_string(),
            saga_id: model.saga_id,
            reason: model.reason,
            message: serde_json::from_str(&model.message)
                .unwrap_or(serde_json::Value::String(model.message)),
            created_at: rfc3339(model.created_at_ms),
        }
    }
}

/// Dead letters.
#[derive(Debug, Clone, Object)]
pub struct DeadLetterList {
    /// Newest first.
    pub dead_letters: Vec<DeadLetterView>,
}

/// Which dead letters a bulk replay takes: those matching every filter given; `all` must be
/// set to take every one.
#[derive(Debug, Clone, Object, serde::Deserialize, serde::Serialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct ReplayFilter {
    /// Only the letters of this campaign's sagas (grabs, funding, refund).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign_id: Option<String>,
    /// Only the letters whose reason contains this text (1-200 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Every waiting letter; required when neither filter is given.
    #[oai(default)]
    #[serde(default)]
    pub all: bool,
    /// The most letters replayed by this call (1-500, default 100); call again for more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
}

/// What became of one dead letter in a replay.
#[derive(Debug, Clone, Object)]
pub struct ReplayOutcome {
    /// The dead letter.
    pub id: String,
    /// Its saga.
    pub saga_id: String,
    /// `replayed` (back on the work queue), `already_replayed` (an earlier replay sent it),
    /// `unreadable` (its message is not a saga's; it stays for an operator) or `failed` (the
    /// broker did not take it; it stays and can be replayed again).
    pub outcome: String,
    /// Why, for `unreadable` and `failed`.
    #[oai(skip_serializing_if_is_none)]
    pub detail: Option<String>,
}

/// The outcome of a bulk replay.
#[derive(Debug, Clone, Object)]
pub struct ReplayReport {
    /// Each letter taken, oldest first.
    pub outcomes: Vec<ReplayOutcome>,
    /// Whether matching letters may remain beyond this call's limit or scan.
    pub more: bool,
}

/// The most letters one bulk replay takes.
pub const MAX_REPLAY_BATCH: u64 = 500;
/// The most waiting letters one bulk replay looks at to find its matches.
const MAX_REPLAY_SCAN: u64 = 10_000;
/// Letters re-published per second at most by a bulk replay, so that replaying a whole
/// outage's letters does not hit the services with all of them at once.
pub const REPLAY_PER_SECOND: u32 = 200;

/// A replayed dead letter as a repair's finding.
fn replayed(saga_id: &str, outcome: &ReplayOutcome) -> SagaFinding {
    let repaired = matches!(outcome.outcome.as_str(), "replayed" | "already_replayed");
    SagaFinding {
        kind: "saga_stuck".to_owned(),
        id: saga_id.to_owned(),
        repaired,
        action: match &outcome.detail {
            Some(detail) => format!("dead letter {}: {} ({detail})", outcome.id, outcome.outcome),
            None => format!("dead letter {}: {}", outcome.id, outcome.outcome),
        },
    }
}

/// Whether a dead letter's saga belongs to a campaign.
fn of_campaign(letter: &dead_letter::Model, campaign_id: &str) -> bool {
    match Envelope::from_bytes(letter.message.as_bytes()) {
        Ok(envelope) => match envelope.event {
            SagaEvent::GrabClaimed { campaign_id: c, .. }
            | SagaEvent::CampaignCreated { campaign_id: c, .. }
            | SagaEvent::CampaignEnded { campaign_id: c, .. } => c == campaign_id,
        },
        Err(_) => false,
    }
}

/// One check of the reconciliation.
#[derive(Debug, Clone, Object)]
pub struct CheckView {
    /// The invariant checked.
    pub name: String,
    /// Whether it holds.
    pub ok: bool,
    /// What was found.
    pub detail: String,
}

/// The saga worker's part of the reconciliation.
#[derive(Debug, Clone, Object)]
pub struct SagaChecks {
    /// Every check.
    pub checks: Vec<CheckView>,
}

/// A claim the campaign service still shows `pending` past the repair's age bound: its grab
/// saga may be lost.
#[derive(Debug, Clone, Object, serde::Deserialize, serde::Serialize)]
pub struct GrabToCheck {
    pub claim_id: String,
    pub campaign_id: String,
    pub user_id: String,
    pub packet_seq: u32,
    pub amount: i64,
    pub currency: String,
    pub grabbed_at_ms: i64,
}

/// A campaign ended and not settled past the repair's age bound: its refund saga may be lost.
#[derive(Debug, Clone, Object, serde::Deserialize, serde::Serialize)]
pub struct RefundToCheck {
    pub campaign_id: String,
    pub merchant_id: String,
    pub currency: String,
    pub total_amount: i64,
}

/// Refuses a repair body whose ids are outside their alphabets (422 naming the field, e.g.
/// `grabs[2].claim_id`): a saga id is made of them, so a folded or odd id would start a saga
/// nobody else can name.
fn check_repair_ids(body: &SagaRepairBody) -> Result<(), Problem> {
    let owner = |field: String, id: &str| {
        if redpacket_common::accounts::is_owner_id(id) {
            Ok(())
        } else {
            Err(Problem::unprocessable(
                "invalid_field",
                format!("`{field}` must be 1-64 ASCII letters, digits, `-` or `_`"),
            )
            .with_field(field))
        }
    };
    let campaign = |field: String, id: &str| {
        if !id.is_empty() && id.len() <= 19 && id.bytes().all(|b| b.is_ascii_digit()) {
            Ok(())
        } else {
            Err(Problem::unprocessable(
                "invalid_field",
                format!("`{field}` must be a campaign id (decimal digits)"),
            )
            .with_field(field))
        }
    };
    let currency = |field: String, code: &str| {
        if code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase()) {
            Ok(())
        } else {
            Err(Problem::unprocessable(
                "invalid_field",
                format!("`{field}` must be an ISO 4217 code"),
            )
            .with_field(field))
        }
    };
    for (i, grab) in body.grabs.iter().enumerate() {
        owner(format!("grabs[{i}].claim_id"), &grab.claim_id)?;
        campaign(format!("grabs[{i}].campaign_id"), &grab.campaign_id)?;
        owner(format!("grabs[{i}].user_id"), &grab.user_id)?;
        currency(format!("grabs[{i}].currency"), &grab.currency)?;
    }
    for (i, refund) in body.refunds.iter().enumerate() {
        campaign(format!("refunds[{i}].campaign_id"), &refund.campaign_id)?;
        owner(format!("refunds[{i}].merchant_id"), &refund.merchant_id)?;
        currency(format!("refunds[{i}].currency"), &refund.currency)?;
    }
    Ok(())
}

/// What an operator's repair asks of the saga worker.
#[derive(Debug, Clone, Object, serde::Deserialize, serde::Serialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct SagaRepairBody {
    /// Claims whose grab saga to look at (at most 500 with `refunds`).
    #[oai(default)]
    #[serde(default)]
    pub grabs: Vec<GrabToCheck>,
    /// Campaigns whose refund saga to look at.
    #[oai(default)]
    #[serde(default)]
    pub refunds: Vec<RefundToCheck>,
    /// The most stuck or stalled sagas taken besides those (1-500, default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// A running saga that has not moved for this long is re-driven (1,000 to 86,400,000 ms;
    /// default 60,000, the sweeper's bound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled_after_ms: Option<i64>,
}

/// One thing a repair found wrong, and what became of it.
#[derive(Debug, Clone, Object, serde::Deserialize, serde::Serialize)]
pub struct SagaFinding {
    /// `claim_pending` (a claim with no live saga), `campaign_unsettled` (an ended campaign
    /// with no live refund), `saga_stuck` (dead-lettered) or `saga_stalled` (no progress).
    pub kind: String,
    /// The saga (`grab:{claim}`, `refund:{campaign}`, `fund:{campaign}`).
    pub id: String,
    /// Whether it was repaired (re-driven or replayed).
    pub repaired: bool,
    /// What was done, or why it could not be.
    pub action: String,
}

/// What the saga worker repaired.
#[derive(Debug, Clone, Object, serde::Deserialize, serde::Serialize)]
pub struct SagaRepairReport {
    pub findings: Vec<SagaFinding>,
    /// Whether stuck or stalled sagas may remain beyond this call's limit or time.
    pub more: bool,
}

/// The most items one repair call takes: sagas to look at, and stuck or stalled ones.
pub const MAX_REPAIR_ITEMS: u64 = 500;
/// Time one repair call may spend before it answers what it did.
pub const REPAIR_TIME_BUDGET: std::time::Duration = std::time::Duration::from_secs(5);

/// Stuck sagas named at most in the reconciliation's detail.
const STUCK_SHOWN: u64 = 20;

/// The saga worker API.
#[derive(Debug, Clone)]
pub struct SagaApi {
    pub store: SagaStore,
    pub broker: std::sync::Arc<dyn Bus>,
    /// One operator repair at a time per process.
    repair_gate: std::sync::Arc<tokio::sync::Semaphore>,
}

fn limit_of(limit: Option<u64>) -> Result<u64, Problem> {
    let limit = limit.unwrap_or(50);
    if (1..=500).contains(&limit) {
        Ok(limit)
    } else {
        Err(
            Problem::bad_request("invalid_limit", "`limit` must be between 1 and 500")
                .with_field("limit"),
        )
    }
}

#[OpenApi]
impl SagaApi {
    /// Read one saga.
    #[oai(path = "/sagas/:id", method = "get", tag = "ApiTags::Sagas")]
    async fn saga(&self, id: Path<String>) -> Result<Json<SagaView>, Problem> {
        self.store
            .get(&id.0)
            .await
            .map_err(store_failure)?
            .map(|saga| Json(saga.into()))
            .ok_or_else(|| Problem::not_found("saga_not_found", format!("no saga `{}`", id.0)))
    }

    /// Sagas in one state.
    #[oai(path = "/sagas", method = "get", tag = "ApiTags::Sagas")]
    async fn sagas(
        &self,
        /// `running`, `completed`, `compensated` or `stuck`.
        state: Query<String>,
        /// 1-500 (default 50).
        limit: Query<Option<u64>>,
    ) -> Result<Json<SagaList>, Problem> {
        if !["running", "completed", "compensated", "stuck"].contains(&state.0.as_str()) {
            return Err(
                Problem::bad_request("invalid_state", "unknown saga state").with_field("state")
            );
        }
        let sagas = self
            .store
            .by_state(&state.0, limit_of(limit.0)?)
            .await
            .map_err(store_failure)?;
        Ok(Json(SagaList {
            sagas: sagas.into_iter().map(Into::into).collect(),
        }))
    }

    /// The saga worker's checks: no saga is stuck (out of retries, or waiting past its bound);
    /// each stuck one is named with its reason.
    #[oai(path = "/reconciliation", method = "get", tag = "ApiTags::Sagas")]
    async fn reconciliation(&self) -> Result<Json<SagaChecks>, Problem> {
        let stuck = self
            .store
            .by_state(crate::store::state::STUCK, STUCK_SHOWN)
            .await
            .map_err(store_failure)?;
        let detail = if stuck.is_empty() {
            "no saga is stuck".to_owned()
        } else {
            let named: Vec<String> = stuck
                .iter()
                .map(|saga| {
                    format!(
                        "{} ({})",
                        saga.id,
                        saga.last_error.as_deref().unwrap_or("no reason recorded")
                    )
                })
                .collect();
            format!(
                "stuck sagas (newest {STUCK_SHOWN} at most), each in the dead letters: {}",
                named.join("; ")
            )
        };
        Ok(Json(SagaChecks {
            checks: vec![CheckView {
                name: "no_stuck_sagas".to_owned(),
                ok: stuck.is_empty(),
                detail,
            }],
        }))
    }

    /// Repair sagas (operator, through the gateway): each claim and campaign given whose saga
    /// is missing, stuck or stalled is re-driven (a stuck one by replaying its dead letter);
    /// then waiting dead letters are replayed and stalled sagas re-driven, at most `limit` of
    /// them and 5 s a call. Every step is idempotent by its transfer id (`grab:{claim}`,
    /// `refund:{campaign}`), so a saga driven twice moves money once. One repair at a time.
    #[oai(path = "/repair", method = "post", tag = "ApiTags::Sagas")]
    async fn repair(&self, body: Json<SagaRepairBody>) -> Result<Json<SagaRepairReport>, Problem> {
        let body = body.0;
        let limit = body.limit.unwrap_or(100);
        if !(1..=MAX_REPAIR_ITEMS).contains(&limit) {
            return Err(Problem::unprocessable(
                "invalid_limit",
                format!("`limit` must be between 1 and {MAX_REPAIR_ITEMS}"),
            )
            .with_field("limit"));
        }
        if (body.grabs.len() + body.refunds.len()) as u64 > MAX_REPAIR_ITEMS {
            return Err(Problem::unprocessable(
                "too_many_items",
                format!("at most {MAX_REPAIR_ITEMS} grabs and refunds together"),
            )
            .with_field("grabs"));
        }
        check_repair_ids(&body)?;
        let stalled_after_ms = body.stalled_after_ms.unwrap_or(60_000);
        if !(1_000..=86_400_000).contains(&stalled_after_ms) {
            return Err(Problem::unprocessable(
                "invalid_field",
                "`stalled_after_ms` must be between 1,000 and 86,400,000",
            )
            .with_field("stalled_after_ms"));
        }
        let _permit = self.repair_gate.try_acquire().map_err(|_| {
            Problem::unavailable(
                "repair_in_progress",
                "a repair is already running in this process; try again when it is done",
            )
        })?;
        let started = std::time::Instant::now();
        let stalled_before = chrono::Utc::now().timestamp_millis() - stalled_after_ms;
        let mut report = SagaRepairReport {
            findings: Vec::new(),
            more: false,
        };
        let mut seen = std::collections::HashSet::new();
        let events = body
            .grabs
            .into_iter()
            .map(|grab| {
                (
                    "claim_pending",
                    SagaEvent::GrabClaimed {
                        claim_id: grab.claim_id,
                        campaign_id: grab.campaign_id,
                        user_id: grab.user_id,
                        packet_seq: grab.packet_seq,
                        amount: grab.amount,
                        currency: grab.currency,
                        grabbed_at_ms: grab.grabbed_at_ms,
                    },
                )
            })
            .chain(body.refunds.into_iter().map(|refund| {
                (
                    "campaign_unsettled",
                    SagaEvent::CampaignEnded {
                        campaign_id: refund.campaign_id,
                        merchant_id: refund.merchant_id,
                        currency: refund.currency,
                        total_amount: refund.total_amount,
                    },
                )
            }));
        for (kind, event) in events {
            if started.elapsed() >= REPAIR_TIME_BUDGET {
                report.more = true;
                break;
            }
            seen.insert(event.saga_id());
            if let Some(finding) = self.redrive(kind, event, stalled_before).await? {
                report.findings.push(finding);
            }
        }
        // Sagas out of retries or waiting past their bound, whoever's they are.
        let letters = self
            .store
            .waiting_letters(0, limit)
            .await
            .map_err(store_failure)?;
        report.more |= letters.len() as u64 == limit;
        for letter in letters {
            if started.elapsed() >= REPAIR_TIME_BUDGET {
                report.more = true;
                break;
            }
            if !seen.insert(letter.saga_id.clone()) {
                continue;
            }
            let outcome = self.replay_letter(&letter).await?;
            report.findings.push(replayed(&letter.saga_id, &outcome));
            tokio::time::sleep(std::time::Duration::from_secs(1) / REPLAY_PER_SECOND).await;
        }
        // Sagas that stopped moving (the sweeper's work, done now).
        let stalled = self
            .store
            .stalled(stalled_before, limit)
            .await
            .map_err(store_failure)?;
        report.more |= stalled.len() as u64 == limit;
        for saga in stalled {
            if started.elapsed() >= REPAIR_TIME_BUDGET {
                report.more = true;
                break;
            }
            if !seen.insert(saga.id.clone()) {
                continue;
            }
            report
                .findings
                .push(self.republish("saga_stalled", &saga).await);
        }
        Ok(Json(report))
    }

    /// The dead letters, newest first.
    #[oai(path = "/dead-letters", method = "get", tag = "ApiTags::DeadLetters")]
    async fn dead_letters(
        &self,
        /// 1-500 (default 50).
        limit: Query<Option<u64>>,
    ) -> Result<Json<DeadLetterList>, Problem> {
        let letters = self
            .store
            .dead_letters(limit_of(limit.0)?)
            .await
            .map_err(store_failure)?;
        Ok(Json(DeadLetterList {
            dead_letters: letters.into_iter().map(Into::into).collect(),
        }))
    }

    /// Replay a dead letter: its message goes back to the work queue with fresh retries. A
    /// replay repeated answers the same: the saga as it is now, without sending it again.
    #[oai(
        path = "/dead-letters/:id/replay",
        method = "post",
        tag = "ApiTags::DeadLetters"
    )]
    async fn replay(&self, id: Path<String>) -> Result<Json<SagaView>, Problem> {
        let not_found = || {
            Problem::not_found(
                "dead_letter_not_found",
                format!("no dead letter `{}`", id.0),
            )
        };
        let letter_id: i64 = id.0.parse().map_err(|_| not_found())?;
        let letter = self
            .store
            .dead_letter(letter_id)
            .await
            .map_err(store_failure)?
            .ok_or_else(not_found)?;
        let outcome = self.replay_letter(&letter).await?;
        match outcome.outcome.as_str() {
            "unreadable" => {
                return Err(Problem::unprocessable(
                    "unreadable_message",
                    format!(
                        "the dead letter cannot be replayed: {}",
                        outcome.detail.unwrap_or_default()
                    ),
                ));
            }
            "failed" => {
                return Err(Problem::unavailable(
                    "broker_unavailable",
                    outcome.detail.unwrap_or_default(),
                ));
            }
            _ => {}
        }
        self.store
            .get(&letter.saga_id)
            .await
            .map_err(store_failure)?
            .map(|saga| Json(saga.into()))
            .ok_or_else(|| {
                Problem::not_found("saga_not_found", format!("no saga `{}`", letter.saga_id))
            })
    }

    /// Replay many dead letters at once: by campaign, by reason, or all. At most `limit` per
    /// call (500), oldest first, sent at most 200 a second; each letter's outcome is listed.
    #[oai(
        path = "/dead-letters/replay",
        method = "post",
        tag = "ApiTags::DeadLetters"
    )]
    async fn replay_many(&self, filter: Json<ReplayFilter>) -> Result<Json<ReplayReport>, Problem> {
        let filter = filter.0;
        let limit = filter.limit.unwrap_or(100);
        if !(1..=MAX_REPLAY_BATCH).contains(&limit) {
            return Err(Problem::unprocessable(
                "invalid_limit",
                format!("`limit` must be between 1 and {MAX_REPLAY_BATCH}"),
            )
            .with_field("limit"));
        }
        if let Some(reason) = &filter.reason
            && (reason.is_empty() || reason.chars().count() > 200)
        {
            return Err(Problem::unprocessable(
                "invalid_field",
                "`reason` must have 1-200 characters",
            )
            .with_field("reason"));
        }
        if filter.campaign_id.is_none() && filter.reason.is_none() && !filter.all {
            return Err(Problem::unprocessable(
                "invalid_field",
                "name a `campaign_id` or a `reason`, or set `all` to replay every dead letter",
            )
            .with_field("all"));
        }
        let matches = |letter: &dead_letter::Model| {
            filter
                .campaign_id
                .as_deref()
                .is_none_or(|campaign| of_campaign(letter, campaign))
                && filter
                    .reason
                    .as_deref()
                    .is_none_or(|reason| letter.reason.contains(reason))
        };
        let mut taken = Vec::new();
        let (mut after, mut scanned, mut more) = (0_i64, 0_u64, false);
        'scan: while scanned < MAX_REPLAY_SCAN {
            let page = self
                .store
                .waiting_letters(after, 500)
                .await
                .map_err(store_failure)?;
            let Some(last) = page.last() else {
                break;
            };
            after = last.id;
            scanned += page.len() as u64;
            for letter in page {
                if matches(&letter) {
                    if taken.len() as u64 == limit {
                        more = true;
                        break 'scan;
                    }
                    taken.push(letter);
                }
            }
        }
        more |= scanned >= MAX_REPLAY_SCAN;
        let pause = std::time::Duration::from_secs(1) / REPLAY_PER_SECOND;
        let mut outcomes = Vec::with_capacity(taken.len());
        for letter in &taken {
            outcomes.push(self.replay_letter(letter).await?);
            tokio::time::sleep(pause).await;
        }
        Ok(Json(ReplayReport { outcomes, more }))
    }
}

impl SagaApi {
    pub fn new(store: SagaStore, broker: std::sync::Arc<dyn Bus>) -> Self {
        SagaApi {
            store,
            broker,
            repair_gate: std::sync::Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }

    /// Looks at the saga an event drives and re-drives it when it is missing, stuck or
    /// stalled; `None` when it is moving (or just finished).
    async fn redrive(
        &self,
        kind: &str,
        event: SagaEvent,
        stalled_before: i64,
    ) -> Result<Option<SagaFinding>, Problem> {
        let saga_id = event.saga_id();
        let finding = |repaired: bool, action: String| SagaFinding {
            kind: kind.to_owned(),
            id: saga_id.clone(),
            repaired,
            action,
        };
        let saga = self.store.get(&saga_id).await.map_err(store_failure)?;
        if saga
            .as_ref()
            .is_none_or(|saga| !crate::store::state::is_terminal(&saga.state))
            && let Some(letter) = self
                .store
                .waiting_letter_of(&saga_id)
                .await
                .map_err(store_failure)?
        {
            // Given up (out of retries, or waiting past its bound): its dead letter is replayed,
            // which marks it, so the next repair does not replay it again.
            let outcome = self.replay_letter(&letter).await?;
            let mut replayed = replayed(&saga_id, &outcome);
            replayed.kind = kind.to_owned();
            return Ok(Some(replayed));
        }
        let Some(saga) = saga else {
            let envelope = Envelope::new(format!("repair:{saga_id}"), None, event);
            return Ok(Some(match self.publish(&envelope).await {
                Ok(()) => finding(true, "no saga had started: started it".to_owned()),
                Err(err) => finding(false, format!("no saga had started; not started: {err}")),
            }));
        };
        if saga.state == crate::store::state::STUCK {
            // Stuck with no letter waiting (replayed already, and lost again): sent afresh.
            return Ok(Some(self.republish(kind, &saga).await));
        }
        if saga.state == crate::store::state::RUNNING {
            // Moving (or waiting for a retry) unless it made no progress for the bound.
            if saga.updated_at_ms < stalled_before {
                return Ok(Some(self.republish(kind, &saga).await));
            }
            return Ok(None);
        }
        // Finished, yet its campaign still shows it unfinished: unless it finished a moment
        // ago (the campaign's answer was read before), the two disagree, for an operator.
        Ok((saga.updated_at_ms < stalled_before).then(|| {
            finding(
                false,
                format!(
                    "the saga is {} but the campaign service still shows it unfinished",
                    saga.state
                ),
            )
        }))
    }

    /// Publishes a saga's message again with fresh retries, as the sweeper does.
    async fn republish(&self, kind: &str, saga: &saga::Model) -> SagaFinding {
        let finding = |repaired: bool, action: String| SagaFinding {
            kind: kind.to_owned(),
            id: saga.id.clone(),
            repaired,
            action,
        };
        let envelope = match Envelope::from_bytes(saga.payload.as_bytes()) {
            Ok(envelope) => envelope.restarted(),
            Err(reason) => {
                return finding(false, format!("its message is unreadable: {reason}"));
            }
        };
        match self.publish(&envelope).await {
            Ok(()) => {
                let _ = self
                    .store
                    .note_error(&saga.id, "re-driven by an operator's repair")
                    .await;
                finding(true, format!("{} without progress: re-driven", saga.state))
            }
            Err(err) => finding(false, format!("not re-driven: {err}")),
        }
    }

    async fn publish(&self, envelope: &Envelope) -> Result<(), String> {
        let message_id = format!(
            "repair:{}:{}",
            envelope.event.saga_id(),
            chrono::Utc::now().timestamp_millis()
        );
        self.broker
            .publish("work", &message_id, &envelope.to_bytes())
            .await
            .map_err(|err| err.to_string())
    }

    /// Sends one dead letter's message back to the work queue, unless an earlier replay did.
    async fn replay_letter(&self, letter: &dead_letter::Model) -> Result<ReplayOutcome, Problem> {
        let outcome = |outcome: &str, detail: Option<String>| ReplayOutcome {
            id: letter.id.to_string(),
            saga_id: letter.saga_id.clone(),
            outcome: outcome.to_owned(),
            detail,
        };
        if letter.replayed_at_ms.is_some() {
            return Ok(outcome("already_replayed", None));
        }
        let envelope = match Envelope::from_bytes(letter.message.as_bytes()) {
            Ok(envelope) => envelope.restarted(),
            Err(reason) => return Ok(outcome("unreadable", Some(reason))),
        };
        if let Err(err) = self
            .broker
            .publish(
                "work",
                &format!("replay:{}", letter.id),
                &envelope.to_bytes(),
            )
            .await
        {
            return Ok(outcome("failed", Some(err.to_string())));
        }
        self.store.unbury(letter).await.map_err(store_failure)?;
        Ok(outcome("replayed", None))
    }
}
