//! An operator's repair across the services: each service repairs what it owns through its own
//! internal API, and the gateway passes on what one found for another to re-drive.
//!
//! 1. The campaign service records claims its pool granted that its database does not know,
//!    mends or rebuilds pools that disagree with the database, and lists the claims still
//!    `pending` and the ended campaigns not settled past the age bound.
//! 2. The saga worker starts, replays or re-drives the sagas of those claims and campaigns
//!    when they are missing, stuck or stalled, then replays waiting dead letters and re-drives
//!    stalled sagas.
//!
//! Every repair moves money only through the sagas' steps, idempotent by their transfer ids
//! (`grab:{claim}`, `refund:{campaign}`), so a repair run twice, or racing the normal path,
//! credits nothing twice.

use bytes::Bytes;
use poem::http::Method;
use redpacket_campaign::api::{DEFAULT_REPAIR_MIN_AGE_MS, MAX_REPAIR_MIN_AGE_MS, RepairReportDto};
use redpacket_common::Problem;
use redpacket_saga_worker::api::{GrabToCheck, RefundToCheck, SagaRepairBody, SagaRepairReport};

use crate::Gateway;
use crate::dto::{RepairBody, RepairFinding, RepairReport};
use crate::error::GatewayError;

/// The most items each service takes in one repair call.
pub const MAX_REPAIR_ITEMS: u64 = 500;
/// The shortest time without progress after which the saga worker re-drives a saga: below
/// it, a saga between two retries would be sent again for nothing.
const MIN_STALLED_AFTER_MS: i64 = 1_000;

/// Runs one repair call: the campaign service's, then the saga worker's.
pub async fn run(
    gateway: &Gateway,
    body: RepairBody,
    request_id: &str,
) -> Result<RepairReport, GatewayError> {
    let limit = body.limit.unwrap_or(100);
    if !(1..=MAX_REPAIR_ITEMS).contains(&limit) {
        return Err(Problem::unprocessable(
            "invalid_limit",
            format!("`limit` must be between 1 and {MAX_REPAIR_ITEMS}"),
        )
        .with_field("limit")
        .into());
    }
    let min_age_ms = body.min_age_ms.unwrap_or(DEFAULT_REPAIR_MIN_AGE_MS);
    if !(0..=MAX_REPAIR_MIN_AGE_MS).contains(&min_age_ms) {
        return Err(Problem::unprocessable(
            "invalid_field",
            format!("`min_age_ms` must be between 0 and {MAX_REPAIR_MIN_AGE_MS}"),
        )
        .with_field("min_age_ms")
        .into());
    }
    // One repair at a time per replica: a repair reads whole pools and walks dead letters.
    let _permit = gateway.repair_gate.try_acquire().map_err(|_| {
        Problem::unavailable(
            "repair_in_progress",
            "a repair is already running; try again when it is done",
        )
    })?;
    let deadline = gateway.timeouts.write;
    let mut campaign_body = serde_json::json!({ "limit": limit, "min_age_ms": min_age_ms });
    if let Some(cursor) = &body.cursor {
        // The campaign service owns the cursor's meaning, and refuses one it did not answer.
        campaign_body["cursor"] = serde_json::json!(cursor);
    }
    let campaign: RepairReportDto = gateway
        .campaign
        .call(
            Method::POST,
            "/repair",
            Some(Bytes::from(campaign_body.to_string())),
            &[],
            request_id,
            deadline,
        )
        .await?
        .json()?;
    let saga_body = SagaRepairBody {
        grabs: campaign
            .pending_claims
            .into_iter()
            .map(|claim| GrabToCheck {
                claim_id: claim.claim_id,
                campaign_id: claim.campaign_id,
                user_id: claim.user_id,
                packet_seq: claim.packet_seq,
                amount: claim.amount,
                currency: claim.currency,
                grabbed_at_ms: claim.grabbed_at_ms,
            })
            .collect(),
        refunds: campaign
            .ended_campaigns
            .into_iter()
            .map(|campaign| RefundToCheck {
                campaign_id: campaign.campaign_id,
                merchant_id: campaign.merchant_id,
                currency: campaign.currency,
                total_amount: campaign.total_amount,
            })
            .collect(),
        limit: Some(limit),
        stalled_after_ms: Some(min_age_ms.max(MIN_STALLED_AFTER_MS)),
    };
    let saga_bytes = serde_json::to_vec(&saga_body).map_err(|_| Problem::internal())?;
    let sagas: SagaRepairReport = gateway
        .saga
        .call(
            Method::POST,
            "/repair",
            Some(Bytes::from(saga_bytes)),
            &[],
            request_id,
            deadline,
        )
        .await?
        .json()?;
    let findings: Vec<RepairFinding> = campaign
        .findings
        .into_iter()
        .map(|finding| RepairFinding {
            service: "campaign".to_owned(),
            kind: finding.kind,
            id: finding.id,
            repaired: finding.repaired,
            action: finding.action,
        })
        .chain(sagas.findings.into_iter().map(|finding| RepairFinding {
            service: "saga".to_owned(),
            kind: finding.kind,
            id: finding.id,
            repaired: finding.repaired,
            action: finding.action,
        }))
        .collect();
    let repaired = findings.iter().filter(|finding| finding.repaired).count() as u64;
    let unrepaired = findings.len() as u64 - repaired;
    Ok(RepairReport {
        ok: unrepaired == 0,
        repaired,
        unrepaired,
        findings,
        more: campaign.more || sagas.more,
        cursor: campaign.cursor.filter(|_| campaign.more),
    })
}
