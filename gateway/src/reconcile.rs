//! The system's money invariants, checked now across the services: the ledger's own checks,
//! the campaign database's own checks, the saga worker's (no saga stuck), and for every funded
//! campaign that its escrow account
//! holds exactly the unclaimed packets plus the claims in flight.

use futures::StreamExt;
use poem::http::StatusCode;
use serde::Deserialize;

use crate::Gateway;
use crate::dto::{CheckView, Reconciliation};
use crate::error::GatewayError;

/// Campaigns checked at once against the wallet.
const CONCURRENCY: usize = 8;

#[derive(Deserialize)]
struct Checks {
    checks: Vec<CheckView>,
}

#[derive(Deserialize)]
struct CampaignSide {
    checks: Vec<CheckView>,
    campaigns: Vec<Brief>,
}

#[derive(Deserialize)]
struct Brief {
    id: String,
    status: String,
}

#[derive(Deserialize)]
struct Stats {
    status: String,
    amount_total: i64,
    amount_credited: i64,
    amount_refunded: i64,
}

#[derive(Deserialize)]
struct Account {
    balance: i64,
}

/// What a campaign's escrow must hold, or `None` while money may be moving for a reason the
/// counters do not show yet (funding, or a cancel before its refund).
fn expected_escrow(stats: &Stats) -> Option<i64> {
    match stats.status.as_str() {
        "scheduled" | "active" | "exhausted" | "expired" => {
            Some(stats.amount_total - stats.amount_credited - stats.amount_refunded)
        }
        "settled" | "rejected" => Some(0),
        _ => None,
    }
}

/// Runs every check.
pub async fn run(gateway: &Gateway, request_id: &str) -> Result<Reconciliation, GatewayError> {
    let read = gateway.timeouts.write;
    let ledger: Checks = gateway
        .wallet
        .get("/invariants", request_id, read)
        .await?
        .json()?;
    let campaign: CampaignSide = gateway
        .campaign
        .get("/reconciliation", request_id, read)
        .await?
        .json()?;
    let sagas: Checks = gateway
        .saga
        .get("/reconciliation", request_id, read)
        .await?
        .json()?;
    let mut checks = ledger.checks;
    checks.extend(campaign.checks);
    checks.extend(sagas.checks);

    let checked = campaign.campaigns.len();
    let outcomes: Vec<Result<Option<String>, GatewayError>> = futures::stream::iter(
        campaign
            .campaigns
            .into_iter()
            .filter(|brief| !matches!(brief.status.as_str(), "funding" | "cancelled")),
    )
    .map(|brief| check_escrow(gateway, brief, request_id))
    .buffer_unordered(CONCURRENCY)
    .collect()
    .await;
    let mut offenders = Vec::new();
    for outcome in outcomes {
        if let Some(offender) = outcome? {
            offenders.push(offender);
        }
    }
    offenders.sort();
    checks.push(CheckView {
        name: "escrow_matches_claims".to_owned(),
        ok: offenders.is_empty(),
        detail: if offenders.is_empty() {
            format!("escrow = total - credited - refunded for the {checked} newest campaigns")
        } else {
            format!("campaigns whose escrow differs: {}", offenders.join("; "))
        },
    });
    Ok(Reconciliation {
        ok: checks.iter().all(|check| check.ok),
        checks,
    })
}

/// Reads the counters, the escrow, then the counters again: credits only lower the escrow, so
/// while traffic flows the balance must lie between the two expectations.
async fn check_escrow(
    gateway: &Gateway,
    brief: Brief,
    request_id: &str,
) -> Result<Option<String>, GatewayError> {
    let read = gateway.timeouts.read;
    let stats_path = format!("/campaigns/{}/stats", brief.id);
    let before: Stats = gateway
        .campaign
        .get(&stats_path, request_id, read)
        .await?
        .json()?;
    let reply = gateway
        .wallet
        .get(&format!("/accounts/escrow:{}", brief.id), request_id, read)
        .await?;
    let balance = if reply.status == StatusCode::NOT_FOUND {
        0
    } else {
        reply.json::<Account>()?.balance
    };
    let after: Stats = gateway
        .campaign
        .get(&stats_path, request_id, read)
        .await?
        .json()?;
    let (Some(high), Some(low)) = (expected_escrow(&before), expected_escrow(&after)) else {
        return Ok(None);
    };
    let (low, high) = (low.min(high), low.max(high));
    Ok((balance < low || balance > high).then(|| {
        format!(
            "{} ({}): escrow {balance}, expected {}",
            brief.id,
            after.status,
            if low == high {
                low.to_string()
            } else {
                format!("{low}..{high}")
            }
        )
    }))
}
